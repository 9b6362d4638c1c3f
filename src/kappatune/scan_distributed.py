"""A scan split across the ranks of a torchrun / accelerate launch: every rank scans its share of the source
tensors, then every rank gets every result, so the report is the same on all ranks."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .report import UnitResult


@dataclass(frozen=True)
class Ranks:
    """This process's place in the scan: rank, world size, and whether the scan created the process group
    (then it also destroys it)."""

    rank: int = 0
    world: int = 1
    owns_group: bool = False


def join(enabled: bool = True) -> Ranks:
    """Join a torchrun/accelerate launch: an initialised torch.distributed group, or WORLD_SIZE > 1 in the
    environment (gloo on CPU, NCCL on CUDA). A single process (or ``enabled=False``) is rank 0 of 1."""
    if not enabled:
        return Ranks()
    import torch.distributed as dist

    if not dist.is_available():
        return Ranks()
    if dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in os.environ:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return Ranks(dist.get_rank(), dist.get_world_size(), owns_group=True)
    return Ranks()


def leave(ranks: Ranks) -> None:
    """Destroy the process group if the scan created it."""
    if ranks.owns_group:
        import torch.distributed as dist

        dist.destroy_process_group()


def shard(keys: list[str], cost: dict[str, int], ranks: Ranks) -> list[str]:
    """This rank's share of the source tensors: greedy balance of the estimated work (largest first),
    deterministic so that every rank computes the same partition."""
    if ranks.world == 1:
        return list(keys)
    loads = [0] * ranks.world
    owner: dict[str, int] = {}
    for k in sorted(keys, key=lambda k: (-cost[k], k)):
        r = loads.index(min(loads))
        owner[k] = r
        loads[r] += cost[k]
    return [k for k in keys if owner[k] == ranks.rank]


def gather(results: dict[str, UnitResult], hits: int, ranks: Ranks) -> tuple[dict[str, UnitResult], int]:
    """Every rank's results and cache hits, on every rank (a collective: all ranks call it)."""
    if ranks.world == 1:
        return results, hits
    import torch.distributed as dist

    gathered: list = [None] * ranks.world
    dist.all_gather_object(gathered, ([r.to_dict() for r in results.values()], hits))
    results, hits = {}, 0
    for part, h in gathered:
        hits += h
        for d in part:
            r = UnitResult.from_dict(d)
            results[r.name] = r
    return results, hits
