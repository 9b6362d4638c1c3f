"""Run under torchrun (2 CPU processes, gloo) by test_engines.py: FSDP2 training of a KappaTune selection."""

import gc
import json
import sys

import torch
import torch.distributed as dist

import kappatune
import kappatune.hashing
import kappatune.integrations.fsdp
from conftest import make_lm
from kappatune.errors import KappaTuneError
from kappatune.integrations.fsdp import full_state_dict, shard


def batch(rank: int) -> torch.Tensor:
    return torch.randint(3, 60, (2, 10), generator=torch.Generator().manual_seed(100 + rank))


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, _ = make_lm("llama")
    sel = kappatune.select(kappatune.scan(model, cache=False, distributed=False), count=3)
    kappatune.apply(model, sel)
    shard(model)
    try:
        kappatune.scan(model, cache=False, distributed=False)
        refused = False
    except KappaTuneError as e:
        refused = "sharded" in str(e)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids = batch(rank)
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    state = full_state_dict(model)
    digests = json.dumps({k: kappatune.hashing.tensor_hash(v) for k, v in sorted(state.items())})
    allv = [None] * dist.get_world_size()
    dist.all_gather_object(allv, digests)
    if rank == 0:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, out + ".safetensors")
        with open(out + ".json", "w") as f:
            json.dump({"selected": sel.names, "ranks_identical": all(v == allv[0] for v in allv),
                       "scan_refused": refused, "units": kappatune.integrations.fsdp.sharded_units(model)}, f)
    dist.barrier()
    # The sharded model and its optimizer hold the FSDP mesh's process group; left alive past
    # destroy_process_group they are torn down at interpreter exit, where gloo's threads abort the process
    # ("terminate called without an active exception") in about one launch in four under load.
    del model, opt
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
