"""The kappa monitor: how training reshapes the spectra of the tensors it trains.

The paper calls low-kappa tensors "raw marble" that fine-tuning may carve. ``KappaMonitor`` records, for every
trained weight matrix, kappa, log-volume (eq. 6) and the entropy deficit from the kappa = 1 maximum
(Theorem 1) before training, every ``every`` optimizer steps, and after training. For PEFT adapter layers
(LoRA and its variants, OSF) it follows the merged weight W + delta (what the model computes with), not the
adapter factors; for DoRA that is the LoRA part without its magnitude rescaling.

Use it with any HF ``Trainer`` (``callbacks=[KappaMonitor(every=10, output="kappa_monitor.json")]``);
``kappatune train --monitor-every N`` adds it and writes ``kappa_monitor.json`` beside the model.
"""

from __future__ import annotations

import logging
import math

import torch
from transformers import TrainerCallback

from ._io import atomic_write_json
from .spectral import spectrum

log = logging.getLogger(__name__)

FIGURES = ("kappa", "log_volume", "entropy_deficit", "sigma_max", "sigma_min")


def _as_matrix(w: torch.Tensor) -> torch.Tensor | None:
    """A 2-D view of a weight (conv kernels as (d_out, d_in * k...)); None for 1-D tensors."""
    if w.dim() < 2:
        return None
    return w.detach().reshape(w.shape[0], -1)


def _peft_merged(model) -> dict[str, torch.Tensor]:
    """{base weight name: merged weight} for every PEFT adapter layer with a weight of its own and a
    ``get_delta_weight`` (LoRA and its variants, OSF): the weight the model computes with, W + delta."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return {}
    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, BaseTunerLayer) or getattr(m, "parameter_name", None):
            continue  # fused-expert parameter wrappers: no single weight matrix to follow
        deltas = [d for d in (_delta(m, a) for a in m.active_adapters) if d is not None]
        if not deltas:
            continue
        base = m.get_base_layer().weight.detach()
        out[name.replace("base_model.model.", "", 1) + ".weight"] = base + sum(deltas).to(base.dtype)
    return out


def _delta(layer, adapter: str) -> torch.Tensor | None:
    """The layer's weight delta for ``adapter``, or None where the layer holds no such adapter."""
    try:
        return layer.get_delta_weight(adapter).detach()
    except (KeyError, AttributeError, NotImplementedError):
        return None


def trained_matrices(model) -> dict[str, torch.Tensor]:
    """The weight matrices training changes: PEFT-merged weights, else every trainable >= 2-D parameter."""
    merged = _peft_merged(model)
    if merged:
        return merged
    out = {}
    for n, p in model.named_parameters():
        mat = _as_matrix(p) if p.requires_grad else None
        if mat is not None:
            out[n] = mat
    return out


def measure(model) -> dict[str, dict[str, float]]:
    """{tensor name: {kappa, log_volume, entropy_deficit, sigma_max, sigma_min}} for the trained matrices."""
    out = {}
    for name, mat in trained_matrices(model).items():
        s = spectrum(mat.float().cpu())
        out[name] = {k: float(getattr(s, k)) for k in FIGURES}
    return out


def summarise(records: list[dict]) -> dict:
    """Per tensor: first and last figures and the change of log10 kappa; plus the median change."""
    if len(records) < 2:
        return {}
    first, last = records[0]["tensors"], records[-1]["tensors"]
    rows = {}
    for n in first.keys() & last.keys():
        k0, k1 = first[n]["kappa"], last[n]["kappa"]
        ok = all(math.isfinite(x) and x > 0 for x in (k0, k1))
        rows[n] = {"kappa_before": k0, "kappa_after": k1,
                   "dlog10_kappa": math.log10(k1) - math.log10(k0) if ok else float("nan"),
                   "d_entropy_deficit": last[n]["entropy_deficit"] - first[n]["entropy_deficit"]}
    changes = sorted(r["dlog10_kappa"] for r in rows.values() if math.isfinite(r["dlog10_kappa"]))
    median = changes[len(changes) // 2] if changes else float("nan")
    return {"tensors": rows, "median_dlog10_kappa": median,
            "mean_abs_dlog10_kappa": sum(abs(c) for c in changes) / len(changes) if changes else float("nan")}


class KappaMonitor(TrainerCallback):
    """HF Trainer callback: spectra of the trained tensors before, every ``every`` steps (0: never) and after
    training; ``records`` holds them, ``output`` (a JSON path) receives them with a summary at the end."""

    def __init__(self, every: int = 0, output: str | None = None):
        self.every = int(every)
        self.output = output
        self.records: list[dict] = []

    def _record(self, step: int, model) -> None:
        with torch.no_grad():
            self.records.append({"step": step, "tensors": measure(model)})

    def on_train_begin(self, args, state, control, model=None, **kw):
        if not self.records or self.records[-1]["step"] != state.global_step:
            self._record(state.global_step, model)

    def on_step_end(self, args, state, control, model=None, **kw):
        if self.every and state.global_step % self.every == 0:
            self._record(state.global_step, model)

    def on_train_end(self, args, state, control, model=None, **kw):
        if self.records[-1]["step"] != state.global_step:
            self._record(state.global_step, model)
        if self.output and args.should_save:
            atomic_write_json(self.output, self.to_dict())
        log.info("kappa monitor: median change of log10 kappa %.4f over %d trained tensors",
                 self.summary().get("median_dlog10_kappa", float("nan")), len(self.records[-1]["tensors"]))

    def summary(self) -> dict:
        return summarise(self.records)

    def to_dict(self) -> dict:
        return {"format": "kappatune.kappa_monitor/1", "records": self.records, "summary": self.summary()}
