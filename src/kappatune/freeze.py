"""apply(model, selection): freeze everything, unfreeze exactly the selected parameters, in one pass.

``apply`` returns an ``AppliedSelection``: the trainable summary plus what training needs afterwards (the
selected rows of fused MoE parameters and the gradient hooks that mask the others). The handle is kept in a
registry owned by this module (``applied_to(model)``), never as attributes on the model.

Also: content-hash snapshots of parameters, to prove after training that frozen tensors are bit-identical.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field

import torch

from .errors import KappaTuneError
from .hashing import tensor_hash
from .report import Selection
from .sharding import is_sharded

log = logging.getLogger(__name__)

UNSELECTED = "@unselected"  # snapshot key suffix: the unselected rows of a fused parameter trained by slice


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


@dataclass
class AppliedSelection(TrainableSummary):
    """What ``apply`` did: the summary, and for fused-expert slices the selected rows and the gradient masks.

    ``slice_rows``: {fused parameter name: row indices into p.view(-1, p.shape[-1]) that train}.
    ``hooks``: gradient-mask handles; ``release()`` removes them (a later ``apply`` on the model does it too).
    """

    slice_rows: dict[str, torch.Tensor] = field(default_factory=dict)
    hooks: list = field(default_factory=list, repr=False)

    def release(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []


# model -> its current AppliedSelection; weak keys, so a dropped model drops its entry
_APPLIED: "weakref.WeakKeyDictionary[torch.nn.Module, AppliedSelection]" = weakref.WeakKeyDictionary()


def applied_to(model: torch.nn.Module) -> AppliedSelection | None:
    """The handle of the last ``apply`` on ``model`` that is still in force (None if none, or released)."""
    return _APPLIED.get(model)


def forget(model: torch.nn.Module) -> None:
    """Remove ``model``'s gradient masks and registry entry (e.g. before saving a trained model)."""
    old = _APPLIED.pop(model, None)
    if old is not None:
        old.release()


def check_fingerprint(model: torch.nn.Module, selection: Selection) -> None:
    """Raise if the selection was made for a model with other unit names or shapes."""
    from .sources import model_structure_fingerprint

    fp, specs = model_structure_fingerprint(model, selection.scan_options)
    if fp == selection.structure_fingerprint:
        return
    missing = [u.name for u in selection.units if u.name not in specs]
    detail = f"e.g. selected unit {missing[0]!r} does not exist in it" if missing else \
        "the unit names/shapes differ"
    raise KappaTuneError(f"selection does not match this model (fingerprint {selection.structure_fingerprint} vs "
                         f"{fp}; {detail}); pass check_fingerprint=False / --no-fingerprint-check to override")


def apply(model: torch.nn.Module, selection: Selection, *, check: bool = True) -> AppliedSelection:
    """Set ``requires_grad`` on exactly the selected parameters and nothing else; return the handle.

    Slices of fused MoE parameters (unit names ``param@E...``): the fused parameter becomes trainable as a
    whole, a gradient hook zeroes the rows of unselected slices, and the handle's ``slice_rows`` records the
    selected rows. Train such a model with ``kappatune.slices.build_optimizer`` (``kappatune train`` does):
    a standard AdamW's decoupled weight decay would still move the unselected slices.
    """
    if not isinstance(selection, Selection):
        raise KappaTuneError(f"apply() needs a Selection, got {type(selection).__name__}")
    if check:
        check_fingerprint(model, selection)
    params = dict(model.named_parameters())
    wanted = {u.param for u in selection.units}
    missing = sorted(wanted - params.keys())
    if missing:
        raise KappaTuneError(f"selected parameter {missing[0]!r} is not a parameter of this model "
                             f"({len(missing)} missing)")
    forget(model)  # a previous apply's gradient masks
    rows, hooks = _slice_masks(selection, params)
    trainable, names = 0, []
    for name, p in params.items():  # one pass; tied parameters appear once
        on = name in wanted
        p.requires_grad_(on)
        if on:
            trainable += p.numel() if name not in rows else int(rows[name].numel()) * p.shape[-1]
            names.append(name)
    handle = AppliedSelection(trainable, sum(p.numel() for p in params.values()), names, rows, hooks)
    _APPLIED[model] = handle
    log.info("%s%s", handle, f" ({sum(len(r) for r in rows.values())} rows of {len(rows)} fused expert "
                              f"parameters)" if rows else "")
    return handle


def _slice_masks(selection: Selection, params: dict) -> tuple[dict, list]:
    if not selection.has_slices:
        return {}, []
    from .slices import install_grad_masks, slice_rows

    rows = slice_rows(selection, params)
    return rows, install_grad_masks(params, rows)


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
    return any(is_sharded(p) for p in model.parameters())


def param_digest(p: torch.Tensor) -> str:
    """Content hash of a parameter's full value (gathered first when sharded)."""
    return tensor_hash(gathered(p))


def _rows_of(model: torch.nn.Module, slice_rows: dict | None) -> dict:
    if slice_rows is not None:
        return slice_rows
    handle = applied_to(model)
    return handle.slice_rows if handle is not None else {}


def snapshot(model: torch.nn.Module, only_frozen: bool = True, *, slice_rows: dict | None = None) -> dict[str, str]:
    """Content hashes of the parameters (only the frozen ones by default) and of the unselected rows of fused
    parameters trained by slice (keys ending in ``@unselected``), to verify later that none moved.
    ``slice_rows`` defaults to those of the model's current ``apply``."""
    out = {n: param_digest(p) for n, p in model.named_parameters() if not (only_frozen and p.requires_grad)}
    out.update(row_snapshot(model, _rows_of(model, slice_rows)))
    return out


def row_snapshot(model: torch.nn.Module, slice_rows: dict) -> dict[str, str]:
    """Only the ``@unselected`` entries of ``snapshot``: hashes of the rows outside the selected slices."""
    if not slice_rows:
        return {}
    from .slices import slice_snapshot

    return {f"{k}{UNSELECTED}": v for k, v in slice_snapshot(model, slice_rows).items()}


def changed(model: torch.nn.Module, snap: dict[str, str], *, slice_rows: dict | None = None) -> list[str]:
    """Names in ``snap`` whose content differs now (``@unselected`` keys: rows outside the selected slices)."""
    params = dict(model.named_parameters())
    now = row_snapshot(model, _rows_of(model, slice_rows)) if any(k.endswith(UNSELECTED) for k in snap) else {}
    out = []
    for n, d in snap.items():
        if n.endswith(UNSELECTED):
            if now.get(n) != d:
                out.append(n)
        elif n in params and param_digest(params[n]) != d:
            out.append(n)
    return out
