"""Training-step throughput and optimizer memory: KappaTune vs PEFT LoRA at a matched trainable budget.

    python benchmarks/train_step.py --budget 2M --steps 6

Same model weights, same batches (random token ids, batch x seq), AdamW, forward + backward + step.
The two methods alternate step by step so machine noise hits both alike. Prints tokens/s of each, the ratio
(KappaTune / LoRA: > 1 means KappaTune is faster), trainable parameters, and AdamW state bytes.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", default="2M")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    a = ap.parse_args()
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from scan_speed import build, machine
    from peft import LoraConfig, get_peft_model

    import kappatune
    from kappatune.policies import parse_size
    from kappatune.slices import optimizer_state_bytes
    from kappatune.integrations.peft import match_rank
    from kappatune.methods.lora import LORA_DEFAULT_TARGETS, lora_modules

    budget = parse_size(a.budget)
    km, label = build("smollm2", 0)
    lm, _ = build("smollm2", 0)
    print(f"machine: {machine()}\nmodel: {label}; batch {a.batch} x {a.seq} tokens; budget {budget:,}")
    sel = kappatune.select(kappatune.scan(km), budget_params=budget)
    kappatune.apply(km, sel)
    mods = lora_modules(lm, LORA_DEFAULT_TARGETS)
    r = match_rank(sum(m.in_features + m.out_features for _, m in mods), budget)
    lm = get_peft_model(lm, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(LORA_DEFAULT_TARGETS)))
    runs = {}
    for name, m in (("kappatune", km), ("lora", lm)):
        m.train()
        params = [p for p in m.parameters() if p.requires_grad]
        runs[name] = {"model": m, "opt": torch.optim.AdamW(params, lr=1e-4), "t": 0.0,
                      "trainable": sum(p.numel() for p in params)}
    g = torch.Generator().manual_seed(0)
    vocab = km.config.vocab_size
    for step in range(a.steps + 1):  # step 0 warms up and is not timed
        ids = torch.randint(0, vocab, (a.batch, a.seq), generator=g)
        for name in (("kappatune", "lora") if step % 2 == 0 else ("lora", "kappatune")):
            rr = runs[name]
            t = time.perf_counter()
            out = rr["model"](input_ids=ids, labels=ids)
            out.loss.backward()
            rr["opt"].step()
            rr["opt"].zero_grad(set_to_none=True)
            if step:
                rr["t"] += time.perf_counter() - t
    tok = a.steps * a.batch * a.seq
    for name, rr in runs.items():
        print(f"{name:<10} trainable {rr['trainable']:>10,}  tokens/s {tok / rr['t']:8.1f}  "
              f"AdamW state {optimizer_state_bytes(rr['opt']) / 2**20:7.1f} MB")
    k, l = runs["kappatune"], runs["lora"]
    print(f"tokens/s ratio kappatune / lora: {l['t'] / k['t']:.2f}  (rank {r} LoRA on {len(mods)} modules; "
          f"KappaTune {sel.count} tensors)")


if __name__ == "__main__":
    main()
