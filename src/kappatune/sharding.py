"""Is a parameter only a shard? (FSDP2 DTensor, FSDP1 flat parameter, DeepSpeed ZeRO-3.) Torch only."""

from __future__ import annotations

import torch


def is_sharded(param: torch.Tensor) -> bool:
    """True for parameters that hold only a shard: FSDP2 DTensors, FSDP1 flat parameters, DeepSpeed ZeRO-3."""
    try:
        from torch.distributed.tensor import DTensor

        if isinstance(param, DTensor):
            return True
    except ImportError:  # pragma: no cover
        pass
    return bool(getattr(param, "_is_flat_param", False) or hasattr(param, "ds_id"))
