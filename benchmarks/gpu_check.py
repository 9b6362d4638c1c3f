"""The GPU check: run it as it is on a machine with one CUDA GPU (a few minutes; at most about 10).

    bash benchmarks/gpu_check.sh                                  # SmolLM2-135M (the demo asset, scripts/setup.sh)
    bash benchmarks/gpu_check.sh --model HuggingFaceTB/SmolLM2-135M  # or any model folder / hub id

It measures, on the same GPU:
  1. the scan: kappatune.scan on CUDA against PEFT's find_kappa_target_modules on CUDA (median of alternating
     runs, ratio peer / kappatune), and the worst relative kappa error against a float64 SVD;
  2. a 20-step ``kappatune train`` in bf16 on CUDA, with the frozen-tensor proof (every frozen tensor
     bit-identical after training) and its tokens/s;
  3. peak GPU memory of both.
Every figure is one line ``gpu_check: <figure>: <value>``. Without CUDA it runs the same checks on the CPU
(fp32), labelled so, and prints ``gpu_check: SKIPPED <figure>: <why>`` for what needs a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch


def figure(name: str, value: str) -> None:
    print(f"gpu_check: {name}: {value}", flush=True)


def skipped(name: str, why: str) -> None:
    print(f"gpu_check: SKIPPED {name}: {why}", flush=True)


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def float64_kappas(model) -> dict[str, float]:
    """The exact reference: float64 SVD, on the CPU, of every unit kappatune scans."""
    from kappatune.sources import open_source
    from kappatune.units import plan_units, unit_matrix

    src = open_source(model)
    out = {}
    for unit in plan_units(src.entries(), model_type=src.model_type).units:
        s = torch.linalg.svdvals(unit_matrix(unit, src.load(unit.source)).detach().cpu().double())
        out[unit.name] = float(s[0] / s[-1])
    return out


def scan_check(path: str, device: str, repeat: int) -> None:
    from peft import find_kappa_target_modules
    from transformers import AutoModelForCausalLM

    import kappatune

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    reference = float64_kappas(model)
    model.to(device)
    cuda = device.startswith("cuda")

    def timed(fn) -> tuple[float, object]:
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t, out

    def ours():
        return kappatune.scan(model, cache=False, device=device)

    def peft():
        return find_kappa_target_modules(model, top_p=1.0, show_progress=False)

    ours()  # warm-up: library loading, CUDA context and kernels
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t_ours, t_peft = [], []
    for _ in range(repeat):  # alternating, so that a noisy neighbour hurts both
        t_peft.append(timed(peft)[0])
        t, report = timed(ours)
        t_ours.append(t)
    where = "CUDA" if cuda else "CPU (no CUDA)"
    figure(f"scan on {where}, PEFT find_kappa_target_modules / kappatune.scan (median of {repeat})",
           f"{median(t_peft) / median(t_ours):.2f}x ({median(t_peft):.2f} s / {median(t_ours):.2f} s)")
    by_name = report.by_name()
    worst = max(abs(by_name[n].kappa - k) / k for n, k in reference.items())
    figure(f"scan on {where}, worst relative kappa error vs float64 SVD ({len(reference)} units)", f"{worst:.2e}")
    if cuda:
        figure("scan, peak GPU memory", f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


def train_check(path: str, steps: int, budget: str, cuda: bool, workdir: str) -> int:
    from kappatune.data import demo_tweets

    rows, _ = demo_tweets(max(64, 8 * steps), 0)
    data = os.path.join(workdir, "tweets.jsonl")
    with open(data, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    out = os.path.join(workdir, "train")
    cmd = [sys.executable, "-m", "kappatune", "train", path, "--data", data, "-o", out, "--max-steps", str(steps),
           "--budget-params", budget, "--lr", "1e-3", "--no-progress", *(["--bf16"] if cuda else [])]
    r = subprocess.run(cmd, capture_output=True, text=True)
    where = "CUDA bf16" if cuda else "CPU fp32 (no CUDA)"
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        figure(f"train {steps} steps on {where}", f"FAILED (exit {r.returncode}): {tail}")
        return 1
    with open(os.path.join(out, "train_summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    figure(f"train {steps} steps on {where}, frozen tensors bit-identical",
           f"{summary['frozen_verified']} ({summary['changed_tensors']} trained tensors moved, "
           f"{summary['trainable_params']:,} trainable parameters)")
    loss = summary["train_loss"]  # the mean over the run (the last logged loss needs >= logging_steps steps)
    figure(f"train {steps} steps on {where}, tokens/s", f"{summary['tokens_per_s']:.0f} "
           f"(mean training loss {loss if loss is None else round(loss, 3)}, {summary['wall_s']:.1f} s)")
    if cuda:
        figure("train, peak GPU memory", f"{summary['peak_gpu_mb']:.0f} MiB")
    return 0 if summary["frozen_verified"] else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", help="model folder, hub id, or 'smollm2' (the demo asset)")
    ap.add_argument("--steps", type=int, default=20, help="training steps")
    ap.add_argument("--budget", default="2M", help="trainable parameters of the training check")
    ap.add_argument("--repeat", type=int, default=3, help="alternating scan timings per side")
    a = ap.parse_args(argv)

    from kappatune.data import resolve_model

    cuda = torch.cuda.is_available()
    figure("device", torch.cuda.get_device_name(0) if cuda else "no CUDA device: the CPU runs what it can")
    figure("torch", f"{torch.__version__}, CUDA {torch.version.cuda}")
    path = resolve_model(a.model)
    scan_check(path, "cuda" if cuda else "cpu", a.repeat)
    if not cuda:
        skipped("scan on CUDA and its peak GPU memory", "no CUDA device")
    with tempfile.TemporaryDirectory() as workdir:
        status = train_check(path, a.steps, a.budget, cuda, workdir)
    if not cuda:
        skipped("train in bf16 on CUDA and its peak GPU memory", "no CUDA device")
    return status


if __name__ == "__main__":
    sys.exit(main())
