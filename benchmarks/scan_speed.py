"""Whole-model scan speed and accuracy against peers measured in the same run, on the same weights.

Peers: PEFT's ``find_kappa_target_modules`` (fp32 ``svdvals`` one matrix at a time), a plain float64
``svdvals`` loop (the exact reference), and the floor: the float64 Gram products alone.

    python benchmarks/scan_speed.py --model smollm2            # real SmolLM2-135M if installed, else its shapes
    python benchmarks/scan_speed.py --model olmoe --layers 2   # OLMoE-1B-7B shapes (64 experts), random bf16

Prints seconds, ratios (peer / kappatune: > 1 means kappatune is faster), the worst relative kappa error
against float64 SVD, and whether the top-K selections agree.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {n} cores, torch {torch.__version__}, threads {torch.get_num_threads()}"


def build(name: str, layers: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    if name == "smollm2":
        try:
            from kappatune.data import smollm2_fp32

            path = smollm2_fp32()
            return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), "SmolLM2-135M (real weights)"
        except Exception as e:  # assets missing: the same shapes with random weights
            print(f"(real SmolLM2 unavailable: {e}; using its shapes with random weights)", file=sys.stderr)
            cfg = AutoConfig.for_model("llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                       num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                       tie_word_embeddings=True)
            return AutoModelForCausalLM.from_config(cfg), "SmolLM2-135M shapes (random weights)"
    if name == "olmoe":
        cfg = AutoConfig.for_model("olmoe", vocab_size=50304, hidden_size=2048, intermediate_size=1024,
                                   num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16,
                                   num_experts=64, num_experts_per_tok=8)
        torch.manual_seed(0)
        with torch.device("cpu"):
            m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        with torch.no_grad():
            for p in m.parameters():
                if p.dim() >= 2:
                    p.normal_(0, 0.02)
        return m, f"OLMoE-1B-7B shapes, {layers} of 16 layers (random bf16 weights)"
    raise SystemExit(f"unknown model {name}")


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "olmoe"])
    ap.add_argument("--layers", type=int, default=2, help="OLMoE layers to build (the real model has 16)")
    ap.add_argument("--skip-svd", action="store_true", help="skip the float64 svdvals loop (slow on big models)")
    ap.add_argument("--device", default="cpu",
                    help="cpu (the CPU routes), or a CUDA device: the model is moved there, PEFT's helper runs there "
                         "and kappatune.scan uses its device route")
    ap.add_argument("--repeat", type=int, default=3,
                    help="kappatune and PEFT runs, alternating (medians are compared; the machine is noisy)")
    a = ap.parse_args()

    import kappatune
    from kappatune.sources import open_source
    from kappatune.units import plan_units, unit_matrix

    model, label = build(a.model, a.layers)
    model.eval()
    on_device = a.device != "cpu"
    if on_device:
        if not a.device.startswith("torch:"):  # torch:cpu: the device route on the CPU (harness check)
            model.to(a.device)
        label += f", kappatune on {a.device}"
    print(f"machine: {machine()}")
    print(f"model: {label}")
    src = open_source(model)
    plan = plan_units(src.entries(), model_type=src.model_type)
    mats = {u.name: unit_matrix(u, src.load(u.source)) for u in plan.units}
    print(f"units: {len(mats)} matrices, {sum(m.numel() for m in mats.values()):,} parameters")

    from peft import find_kappa_target_modules

    def sync():
        if on_device and torch.cuda.is_available():
            torch.cuda.synchronize()

    def ours():
        r = kappatune.scan(model, cache=False, device=a.device)
        sync()
        return r

    def peft():
        r = find_kappa_target_modules(model, top_p=1.0, show_progress=False)
        sync()
        return r

    ours()  # warm-up: library loading, first-touch of buffers, CUDA context
    peft_times, our_times = [], []
    for _ in range(max(1, a.repeat)):
        t, peft_out = timed(peft)
        peft_times.append(t)
        t, rep = timed(ours)
        our_times.append(t)
    t_peft, t_ours = median(peft_times), median(our_times)
    pair = sorted(p / o for p, o in zip(peft_times, our_times))

    def floor():
        for m in mats.values():
            x = m.to(torch.float64)
            x = x.T if x.shape[0] > x.shape[1] else x
            x @ x.T

    t_floor, _ = timed(floor) if not on_device else (float("nan"), None)

    def floor_syrk():
        from concurrent.futures import ThreadPoolExecutor

        from threadpoolctl import threadpool_limits

        from kappatune.scan_executor import resolve_workers
        from kappatune.spectral.gram import gram_tri

        # what the scan's workers do for the Gram (dsyrk: one triangle), as many threads as the scan uses,
        # one BLAS thread each, nothing else: the floor of the Gram route
        with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(resolve_workers(None, len(mats))) as pool:
            list(pool.map(lambda m: gram_tri(m.T if m.shape[0] > m.shape[1] else m), mats.values()))

    if not on_device:
        floor_syrk()
        t_floor_syrk, _ = timed(floor_syrk)
    else:  # the dsyrk floor is a CPU figure
        t_floor_syrk = float("nan")
    ref = None
    t_svd = float("nan")
    if not a.skip_svd:
        def svd_loop():
            out = {}
            for n, m in mats.items():
                x = m.to(torch.float64)
                x = x.T if x.shape[0] > x.shape[1] else x
                s = torch.linalg.svdvals(x)
                out[n] = float(s[0] / s[-1])
            return out

        t_svd, ref = timed(svd_loop)
    by = rep.by_name()
    print()
    print(f"{'method':<44} {'seconds':>9} {'peer/kappatune':>15}")
    print(f"{'kappatune.scan (default, float64-accurate)':<44} {t_ours:>9.2f} {'1.00':>15}")
    print(f"{'PEFT find_kappa_target_modules (fp32)':<44} {t_peft:>9.2f} {t_peft / t_ours:>15.2f}")
    print(f"  (medians of {len(our_times)} alternating runs; per-pair PEFT / kappatune from {pair[0]:.2f} "
          f"to {pair[-1]:.2f}; kappatune {min(our_times):.2f}-{max(our_times):.2f} s)")
    if ref is not None:
        print(f"{'float64 svdvals loop (exact reference)':<44} {t_svd:>9.2f} {t_svd / t_ours:>15.2f}")
    print(f"{'floor: float64 Gram products alone (torch)':<44} {t_floor:>9.2f} {t_floor / t_ours:>15.2f}")
    print(f"{'  the scan workers dsyrk Grams alone':<44} {t_floor_syrk:>9.2f} {t_floor_syrk / t_ours:>15.2f}")
    routes: dict[str, int] = {}
    for u in rep.units:
        routes[u.method] = routes.get(u.method, 0) + 1
    print(f"routes: {routes}")
    if ref is not None:
        errs = [abs(by[n].kappa - k) / k for n, k in ref.items()]
        print(f"worst relative kappa error vs float64 SVD: {max(errs):.2e} (max kappa {max(ref.values()):.3g})")
        k = max(1, len(ref) // 5)
        ours_top = [u.name for u in sorted(rep.units, key=lambda u: (u.kappa, u.name))][:k]
        ref_top = sorted(ref, key=lambda n: (ref[n], n))[:k]
        print(f"top-{k} lowest-kappa selection identical to float64 SVD's: {ours_top == ref_top}")
    peft_mods = [m for m in (peft_out["target_modules"] or []) if m != "lm_head"]
    ours_mods = [u.param[: -len('.weight')] for u in sorted(rep.units, key=lambda u: (u.kappa, u.name))
                 if u.layout == "linear" and not u.is_slice]
    k = max(1, len(ours_mods) // 5)
    print(f"top-{k} nn.Linear order identical to PEFT's: {ours_mods[:k] == peft_mods[:k]}")


if __name__ == "__main__":
    main()
