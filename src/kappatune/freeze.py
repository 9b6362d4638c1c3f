"""apply(model, selection): freeze everything, unfreeze exactly the selected parameters, in one pass.

Also: snapshots of frozen tensors (content hashes) to prove after training that they are bit-identical.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import torch

from .errors import KappaTuneError
from .report import Selection

log = logging.getLogger(__name__)


@dataclass
class TrainableSummary:
    trainable_params: int
    all_params: int
    trainable_names: list[str] = field(default_factory=list)

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / max(self.all_params, 1)

    def __str__(self) -> str:  # the line PEFT's print_trainable_parameters prints
        return (f"trainable params: {self.trainable_params:,} || all params: {self.all_params:,} || "
                f"trainable%: {self.trainable_percent:.4f}")

    def to_dict(self) -> dict:
        return {"trainable_params": self.trainable_params, "all_params": self.all_params,
                "trainable_percent": self.trainable_percent, "trainable_names": list(self.trainable_names)}


def check_fingerprint(model: torch.nn.Module, selection: Selection) -> None:
    """Raise if the selection was made for a model with other unit names or shapes."""
    from .scanner import model_structure_fingerprint

    fp, specs = model_structure_fingerprint(model, selection.scan_options)
    if fp == selection.structure_fingerprint:
        return
    missing = [u["name"] for u in selection.units if u["name"] not in specs]
    detail = f"e.g. selected unit {missing[0]!r} does not exist in it" if missing else \
        "the unit names/shapes differ"
    raise KappaTuneError(f"selection does not match this model (fingerprint {selection.structure_fingerprint} vs "
                         f"{fp}; {detail}); pass check_fingerprint=False / --no-fingerprint-check to override")


def apply(model: torch.nn.Module, selection: Selection, *, check: bool = True) -> TrainableSummary:
    """Set ``requires_grad`` on exactly the selected parameters and nothing else; return a summary.

    Slices of fused MoE parameters (unit names ``param@E...``): the fused parameter becomes trainable as a
    whole, a gradient hook zeroes the rows of unselected slices, and ``model._kappatune_slice_rows`` records
    the selected rows. Train such a model with ``kappatune.slices.build_optimizer`` (``kappatune train`` does):
    a standard AdamW's decoupled weight decay would still move the unselected slices.
    """
    if not isinstance(selection, Selection):
        raise KappaTuneError(f"apply() needs a Selection, got {type(selection).__name__}")
    if check:
        check_fingerprint(model, selection)
    params = dict(model.named_parameters())
    wanted = {u["param"] for u in selection.units}
    missing = sorted(wanted - params.keys())
    if missing:
        raise KappaTuneError(f"selected parameter {missing[0]!r} is not a parameter of this model "
                             f"({len(missing)} missing)")
    for h in getattr(model, "_kappatune_hooks", []):  # a previous apply's gradient masks
        h.remove()
    rows: dict = {}
    if selection.has_slices:
        from .slices import install_grad_masks, slice_rows

        rows = slice_rows(selection, params)
        model._kappatune_hooks = install_grad_masks(params, rows)
    else:
        model._kappatune_hooks = []
    model._kappatune_slice_rows = rows
    trainable = 0
    names = []
    for name, p in params.items():  # one pass; tied parameters appear once
        on = name in wanted
        p.requires_grad_(on)
        if on:
            trainable += p.numel() if name not in rows else int(rows[name].numel()) * p.shape[-1]
            names.append(name)
    total = sum(p.numel() for p in params.values())
    summary = TrainableSummary(trainable, total, names)
    log.info("%s%s", summary, f" ({sum(len(r) for r in rows.values())} rows of {len(rows)} fused expert "
                               f"parameters)" if rows else "")
    return summary


def tensor_digest(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu()
    h = hashlib.blake2b(digest_size=16)
    h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def gathered(p: torch.Tensor) -> torch.Tensor:
    """The full value of a parameter, also when it is a DeepSpeed ZeRO-3 partition or an FSDP2 DTensor (then
    a collective: every rank must call it for the same parameters in the same order). A CPU copy for sharded
    parameters, the parameter itself otherwise."""
    if hasattr(p, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            return p.data.detach().cpu().clone()
    full = getattr(p, "full_tensor", None)
    if full is not None:
        return full().detach().cpu()
    return p


def is_partitioned(model: torch.nn.Module) -> bool:
    from .integrations.fsdp import is_sharded

    return any(is_sharded(p) for p in model.parameters())


def param_digest(p: torch.Tensor) -> str:
    return tensor_digest(gathered(p))


def snapshot(model: torch.nn.Module, only_frozen: bool = True) -> dict[str, str]:
    """Content hashes of the frozen parameters (and of the unselected rows of fused parameters trained by
    slice), to verify later that none moved. Keys of the latter end in ``@unselected``."""
    out = {n: param_digest(p) for n, p in model.named_parameters() if not (only_frozen and p.requires_grad)}
    rows = getattr(model, "_kappatune_slice_rows", None)
    if only_frozen and rows:
        from .slices import slice_snapshot

        out.update({f"{k}@unselected": v for k, v in slice_snapshot(model, rows).items()})
    return out


def changed(model: torch.nn.Module, snap: dict[str, str]) -> list[str]:
    """Names in ``snap`` whose content differs now."""
    params = dict(model.named_parameters())
    rows = getattr(model, "_kappatune_slice_rows", None) or {}
    now = {}
    if any(k.endswith("@unselected") for k in snap):
        from .slices import slice_snapshot

        now = {f"{k}@unselected": v for k, v in slice_snapshot(model, rows).items()}
    out = []
    for n, d in snap.items():
        if n.endswith("@unselected"):
            if now.get(n) != d:
                out.append(n)
        elif n in params and param_digest(params[n]) != d:
            out.append(n)
    return out
