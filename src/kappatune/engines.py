"""Distributed training engines for the Trainer recipe: FSDP / DeepSpeed settings checked for a partly
frozen model, and the process-group bookkeeping around a run (barrier, teardown, cross-rank agreement)."""

from __future__ import annotations

import json
import os

import torch

from .errors import KappaTuneError


def main_process() -> bool:
    """Under torchrun / accelerate only rank 0 writes outputs."""
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_engine(cfg) -> dict:
    """Validate the FSDP / DeepSpeed settings of a TrainConfig (before anything is loaded or written); return
    the TrainingArguments keywords they become."""
    engine = engine_args(cfg)
    if cfg.fsdp and not has_accelerator():
        raise KappaTuneError("FSDP through the HF Trainer runs only on GPUs (accelerate silently uses DDP on CPU); "
                             "drop --fsdp here, or use kappatune.integrations.fsdp.shard (FSDP2) in your own loop")
    return engine


def has_accelerator() -> bool:
    acc = getattr(torch, "accelerator", None)
    if acc is not None and hasattr(acc, "current_accelerator"):
        return acc.current_accelerator() is not None
    return torch.cuda.is_available()


def _fsdp_config(cfg) -> dict:
    fc = cfg.fsdp_config
    if isinstance(fc, str):
        try:
            with open(fc, encoding="utf-8") as f:
                fc = json.load(f)
        except (OSError, ValueError) as e:
            raise KappaTuneError(f"--fsdp-config {cfg.fsdp_config}: {e}") from None
    fc = dict(fc or {})
    version = int(fc.get("version", fc.get("fsdp_version", 2)))  # transformers 5 defaults to FSDP2
    if version == 1:
        # FSDP1 flattens each wrapped module's parameters into one FlatParameter, which has a single
        # requires_grad: a module mixing frozen and selected tensors needs use_orig_params=True
        if str(fc.get("use_orig_params", True)).lower() in ("false", "0"):
            raise KappaTuneError("FSDP with a partly frozen model needs use_orig_params=True (FSDP1 flattens a "
                                 "module's frozen and trainable tensors into one parameter); remove "
                                 "use_orig_params=false from the FSDP config or use FSDP2 (version 2)")
        fc["use_orig_params"] = True
    return fc


def engine_args(cfg) -> dict:
    out: dict = {}
    if cfg.fsdp:
        out.update(fsdp=cfg.fsdp, fsdp_config=_fsdp_config(cfg))
    if cfg.deepspeed:
        if cfg.fsdp:
            raise KappaTuneError("choose FSDP or DeepSpeed, not both")
        out["deepspeed"] = cfg.deepspeed
    return out


def dist_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def end_dist(group_before: bool) -> None:
    """Wait for every rank (rank 0 writes the output meanwhile), then tear down the process group the Trainer
    made: a process that exits with a live gloo group aborts ("terminate called without an active exception").
    A group the caller had made before training is left alone."""
    import torch.distributed as dist

    if group_before or not dist_initialized():
        return
    dist.barrier()
    dist.destroy_process_group()


def ranks_identical(digests: dict[str, str]) -> bool | None:
    """Under a distributed launch: whether every rank ends with the same weights (None when not distributed)."""
    import torch.distributed as dist

    if not dist_initialized() or dist.get_world_size() == 1:
        return None
    mine = json.dumps(sorted(digests.items()))
    allv: list = [None] * dist.get_world_size()
    dist.all_gather_object(allv, mine)
    return all(v == allv[0] for v in allv)
