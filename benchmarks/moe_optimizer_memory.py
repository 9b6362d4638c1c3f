"""Optimizer memory for single-expert training: SliceAdamW vs AdamW on the whole fused parameters.

    python benchmarks/moe_optimizer_memory.py --experts 8

One OLMoE-1B-7B-shaped MoE layer (64 experts, hidden 2048, expert width 1024, fp32). The lowest-kappa expert
slices are selected; both optimizers take one step on the same gradient. Prints trainable bytes, AdamW
state bytes of each, their ratio, and checks that unselected slices are bit-identical after SliceAdamW.
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=8, help="number of expert slices to select")
    a = ap.parse_args()
    from transformers import AutoConfig, AutoModelForCausalLM

    import kappatune
    from kappatune.slices import build_optimizer, optimizer_state_bytes

    cfg = AutoConfig.for_model("olmoe", vocab_size=256, hidden_size=2048, intermediate_size=1024,
                               num_hidden_layers=1, num_attention_heads=16, num_key_value_heads=16,
                               num_experts=64, num_experts_per_tok=8)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    rep = kappatune.scan(model, cache=False)
    sel = kappatune.select(rep, count=a.experts, groups=["expert"])
    handle = kappatune.apply(model, sel)
    fused = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in fused]
    grads = [torch.randn_like(p) for p in fused]
    ours = build_optimizer(model, sel, lr=1e-3, weight_decay=0.1)
    for p, g in zip(fused, grads):
        p.grad = g.clone()
    ours.step()
    rows = handle.slice_rows
    params = dict(model.named_parameters())
    intact = True
    for (name, idx), b in zip(rows.items(), before):
        flat_now, flat_b = params[name].detach().reshape(-1, b.shape[-1]), b.reshape(-1, b.shape[-1])
        keep = torch.ones(flat_b.shape[0], dtype=torch.bool)
        keep[idx] = False
        intact &= torch.equal(flat_now[keep], flat_b[keep])
    whole = torch.optim.AdamW([torch.nn.Parameter(b.clone()) for b in before], lr=1e-3, weight_decay=0.1)
    for p, g in zip(whole.param_groups[0]["params"], grads):
        p.grad = g
    whole.step()
    s_ours, s_whole = optimizer_state_bytes(ours), optimizer_state_bytes(whole)
    print(f"selected: {sel.count} expert slices, {sel.total_params:,} parameters "
          f"({sel.total_params * 4 / 2**20:.1f} MB trainable, fp32) in {len(fused)} fused tensors "
          f"of {sum(p.numel() for p in fused):,}")
    print(f"AdamW state, SliceAdamW (selected rows only): {s_ours / 2**20:9.1f} MB")
    print(f"AdamW state, torch AdamW on the fused tensors: {s_whole / 2**20:9.1f} MB")
    print(f"ratio whole / slices: {s_whole / s_ours:.1f}x; state / trainable bytes: "
          f"{s_ours / (sel.total_params * 4):.1f} (two moments)")
    print(f"unselected slices bit-identical after a step with weight decay: {intact}")


if __name__ == "__main__":
    main()
