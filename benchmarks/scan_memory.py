"""Peak memory of a scan from disk against loading the same model with transformers (each in a fresh process).

    python benchmarks/scan_memory.py --synthetic-gb 1.6     # a sharded Llama-shaped fp32 checkpoint made here
    python benchmarks/scan_memory.py --smollm2              # the real 538 MB SmolLM2 fp32 folder

Prints, in MB: the interpreter + torch + kappatune (+ scipy's BLAS) baseline, the largest tensor in fp32, the scan's peak RSS,
the transformers load's peak RSS, and the ratio (scan peak - baseline) / largest tensor (target <= 3).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time
def hwm():  # peak RSS of this process image (VmHWM restarts at exec; ru_maxrss would carry the parent's)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
mode, path = sys.argv[1], sys.argv[2]
import torch
import kappatune
from kappatune.spectral.blas import cblas, load_scipy_lapack
load_scipy_lapack(); cblas()  # scipy's BLAS/LAPACK libraries, loaded by the first scan: code, counted in the baseline
import xxhash
base = hwm()
t = time.perf_counter()
if mode == "scan":
    rep = kappatune.scan(path, cache=False)
    n = len(rep.units)
elif mode == "load":
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    n = sum(1 for _ in m.parameters())
else:
    n = 0
print(json.dumps({"base_mb": base, "peak_mb": hwm(),
                  "seconds": time.perf_counter() - t, "n": n}))
"""


def run(mode: str, path: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, path], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def synthetic(folder: str, gb: float) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hidden, inter = 2048, 8192
    per_layer = 4 * hidden * hidden + 3 * hidden * inter
    layers = max(1, int(gb * 1e9 / 4 / per_layer))
    cfg = AutoConfig.for_model("llama", vocab_size=1024, hidden_size=hidden, intermediate_size=inter,
                               num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg)
    m.save_pretrained(folder, max_shard_size="400MB")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--synthetic-gb", type=float, default=0.0)
    ap.add_argument("--smollm2", action="store_true")
    ap.add_argument("--_make", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._make:
        synthetic(a._make, a.synthetic_gb)
        return
    paths = []
    tmp = None
    if a.smollm2:
        from kappatune.data import smollm2_fp32

        paths.append(("SmolLM2-135M fp32 folder", smollm2_fp32()))
    if a.synthetic_gb:
        tmp = tempfile.mkdtemp(prefix="kt-mem-")
        # built in a child process, so that this process stays small
        subprocess.run([sys.executable, __file__, "--_make", tmp, "--synthetic-gb", str(a.synthetic_gb)], check=True,
                       capture_output=True)
        paths.append((f"synthetic sharded Llama-shaped fp32 ({a.synthetic_gb} GB)", tmp))
    from safetensors import safe_open

    for label, path in paths:
        files = [os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors")]
        largest = 0
        total = 0
        for f in files:
            with safe_open(f, "pt") as h:
                for k in h.keys():
                    shape = h.get_slice(k).get_shape()
                    n = 1
                    for s in shape:
                        n *= s
                    largest = max(largest, n * 4)
                    total += n * 4
        base = run("base", path)
        sc = run("scan", path)
        ld = run("load", path)
        lg = largest / 2**20
        print(f"{label}: {len(files)} file(s), {total / 2**20:.0f} MB of fp32 weights, largest tensor {lg:.0f} MB")
        print(f"  baseline (python+torch+kappatune+scipy){base['peak_mb']:8.0f} MB")
        print(f"  kappatune.scan peak RSS               {sc['peak_mb']:8.0f} MB  ({sc['seconds']:.1f} s, {sc['n']} units)")
        print(f"  transformers from_pretrained peak RSS {ld['peak_mb']:8.0f} MB  ({ld['seconds']:.1f} s)")
        print(f"  (scan peak - baseline) / largest tensor = {(sc['peak_mb'] - base['peak_mb']) / lg:.2f}  (target <= 3)")
        print(f"  (load peak - baseline) / (scan peak - baseline) = "
              f"{(ld['peak_mb'] - base['peak_mb']) / max(sc['peak_mb'] - base['peak_mb'], 1):.1f}")
    if tmp:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
