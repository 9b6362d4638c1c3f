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

    Slices of fused MoE parameters (unit names ``param@E...``) are refused: ``requires_grad`` cannot pick one
    expert, and silently widening the choice to the whole fused parameter would train what was not chosen.
    """
    if not isinstance(selection, Selection):
        raise KappaTuneError(f"apply() needs a Selection, got {type(selection).__name__}")
    if selection.has_slices:
        sl = [u["name"] for u in selection.units if u.get("expert") is not None]
        raise KappaTuneError(
            f"the selection holds {len(sl)} slice(s) of fused expert parameters (e.g. {sl[0]}); training one "
            f"expert inside a fused tensor is not supported yet and kappatune will not widen it to the whole "
            f"parameter. Exclude experts when selecting (exclude=['.*@.*'])")
    if check:
        check_fingerprint(model, selection)
    params = dict(model.named_parameters())
    wanted = {u["param"] for u in selection.units}
    missing = sorted(wanted - params.keys())
    if missing:
        raise KappaTuneError(f"selected parameter {missing[0]!r} is not a parameter of this model "
                             f"({len(missing)} missing)")
    trainable = 0
    names = []
    for name, p in params.items():  # one pass; tied parameters appear once
        on = name in wanted
        p.requires_grad_(on)
        if on:
            trainable += p.numel()
            names.append(name)
    total = sum(p.numel() for p in params.values())
    summary = TrainableSummary(trainable, total, names)
    log.info("%s", summary)
    return summary


def tensor_digest(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu()
    h = hashlib.blake2b(digest_size=16)
    h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def snapshot(model: torch.nn.Module, only_frozen: bool = True) -> dict[str, str]:
    """Content hashes of the (frozen) parameters and buffers, to verify later that none moved."""
    out = {n: tensor_digest(p) for n, p in model.named_parameters() if not (only_frozen and p.requires_grad)}
    return out


def changed(model: torch.nn.Module, snap: dict[str, str]) -> list[str]:
    """Names in ``snap`` whose content differs now."""
    params = dict(model.named_parameters())
    return [n for n, d in snap.items() if n in params and tensor_digest(params[n]) != d]
