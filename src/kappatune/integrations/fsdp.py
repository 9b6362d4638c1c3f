"""KappaTune selections under PyTorch FSDP, for your own training loop (the HF Trainer route is
``kappatune train --fsdp ...`` / ``TrainConfig.fsdp``, which runs through accelerate on GPUs).

    import kappatune
    from kappatune.integrations.fsdp import shard, full_state_dict

    sel = kappatune.select(kappatune.scan(model), budget_params="50M")   # scan BEFORE sharding
    kappatune.apply(model, sel)
    shard(model)                                   # FSDP2: one unit per decoder layer + the root
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ...
    state = full_state_dict(model)                 # collective: every rank calls it; full tensors on CPU
    del model, opt                                 # before destroy_process_group (see below)
    gc.collect(); dist.destroy_process_group()

FSDP2 (``torch.distributed.fsdp.fully_shard``) shards every parameter on its own and keeps its
``requires_grad``, so a layer can mix frozen and selected tensors: frozen ones get no gradient, no
reduce-scatter and no optimizer state. FSDP1 instead flattens a wrapped module's parameters into one
FlatParameter with a single ``requires_grad``; there a partly frozen model needs ``use_orig_params=True``
(``kappatune train --fsdp`` sets it and refuses a config that turns it off).

FSDP2 also runs on CPU with the gloo backend (tested here with 2 processes); FSDP1 needs an accelerator.

Release the sharded model and its optimizer before ``destroy_process_group``: they hold the device mesh's
process group, and when that is torn down only at interpreter exit the gloo backend can abort the finished
process ("terminate called without an active exception"; measured on CPU: 6 of 23 launches under load
aborted that way, none of 28 after ``del model, opt; gc.collect()``).
"""

from __future__ import annotations

import torch

from ..errors import KappaTuneError
from ..sharding import is_sharded  # noqa: F401 - re-exported: kappatune.integrations.fsdp.is_sharded


def _layer_classes(model) -> tuple[type, ...]:
    names = set(getattr(model, "_no_split_modules", None) or [])
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    return tuple(classes)


def shard(model: torch.nn.Module, *, mesh=None, layer_classes: tuple[type, ...] | None = None,
          reshard_after_forward: bool = True) -> torch.nn.Module:
    """Apply FSDP2 ``fully_shard`` to each decoder layer (``model._no_split_modules`` or ``layer_classes``)
    and to the root. Call after ``kappatune.apply`` and before building the optimizer; needs an initialised
    process group. Single experts inside fused MoE tensors (slice selections) are refused: their gradient
    masks live on the unsharded parameters."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise KappaTuneError("FSDP needs a process group: launch with torchrun / accelerate launch")
    from ..freeze import applied_to

    handle = applied_to(model)
    if handle is not None and handle.slice_rows:
        raise KappaTuneError("this selection trains single experts inside fused MoE tensors; under FSDP leave "
                             "them out (select(..., exclude=['.*@.*']))")
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        dev = "cuda" if torch.cuda.is_available() else "cpu"
        mesh = init_device_mesh(dev, (dist.get_world_size(),))
    classes = layer_classes or _layer_classes(model)
    if not classes:
        raise KappaTuneError(f"{type(model).__name__}: no decoder layer class to shard (pass layer_classes=...)")
    for m in [m for m in model.modules() if isinstance(m, classes)]:
        fully_shard(m, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


def sharded_units(model: torch.nn.Module) -> int:
    """How many sub-modules (the root excluded) ``shard`` made FSDP units of."""
    from torch.distributed.fsdp import FSDPModule

    return sum(isinstance(m, FSDPModule) for m in model.modules() if m is not model)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer as a full CPU tensor (a collective: call it on every rank)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, t in model.state_dict().items():
        if isinstance(t, DTensor):
            t = t.full_tensor()
        out[name] = t.detach().cpu().clone()
    return out
