"""How scan time grows with the number and size of matrices, and what that predicts for 7B and 70B models.

    python benchmarks/scan_growth.py            # a few shapes x counts, then a least-squares fit

For each shape (p x q, p <= q) a batch of random matrices with a spread of singular values is scanned
(cache off, default workers). The model follows the routes (docs/speed.md):

    seconds = a * sum_rect(p^2 q) + b * sum_rect(p^3) + c * sum_square(p^3) + d * sum(p^2) + e * units + f

the Gram (dsyrk) and Cholesky of rectangular matrices, the LU of square ones, Lanczos (a few dozen
products with a p x p factor per unit), a per-unit overhead and a per-scan one; non-negative least squares
on relative errors. Its leave-one-out error on the measured batches is printed, then a check against real
scans (SmolLM2-135M's real weights when installed, one OLMoE-shaped random layer), then predictions for
model shapes (summing the terms over their matrices). Random weights: Lanczos converges slower on their soft spectral edges than on
trained weights, while a share of trained rectangular units with kappa > 1e4 takes the QR route (~2x a
Gram unit): treat predictions as rough.
"""

from __future__ import annotations

import sys
import time

import torch

# (p, q, count): 2 to 3000 matrices per batch, 64 to 4096 on the short side, aspect ratios 1 to 16 (square ones
# take the LU route; varied q / p keeps the Gram's p^2 q apart from the Cholesky's p^3 in the fit); one shape
# at three counts
SHAPES = [(64, 192, 3000), (256, 768, 10), (256, 768, 100), (256, 768, 1000), (256, 4096, 60), (512, 512, 100),
          (512, 1536, 40), (1024, 2048, 24), (1024, 2816, 10), (1024, 8192, 6), (1536, 1536, 10),
          (2048, 2048, 10), (2048, 5632, 6), (4096, 4096, 3), (4096, 11008, 2)]


MODELS = ("smollm2-135m", "llama-2-7b", "llama-2-70b", "olmoe-1b-7b", "mixtral-8x7b")


def model_shapes(name: str) -> list[tuple[int, int, int]]:
    """(p, q, count) with p <= q for each weight matrix kind of a Llama-style model (MoE: per expert)."""
    h, i, kv, layers, experts = {
        "smollm2-135m": (576, 1536, 192, 30, 1), "llama-2-7b": (4096, 11008, 4096, 32, 1),
        "llama-2-70b": (8192, 28672, 1024, 80, 1), "olmoe-1b-7b": (2048, 1024, 2048, 16, 64),
        "mixtral-8x7b": (4096, 14336, 1024, 32, 8)}[name]
    mats = [(h, h, 2), (min(kv, h), max(kv, h), 2), (min(h, i), max(h, i), 3 * experts)]
    return [(p, q, c * layers) for p, q, c in mats]


def features(shapes) -> list[float]:
    """The model's terms summed over (p, q, count) triples."""
    f = [0.0] * 5 + [1.0]
    for p, q, n in shapes:
        if p == q:
            f[2] += n * p ** 3
        else:
            f[0] += n * p * p * q
            f[1] += n * p ** 3
        f[3] += n * p * p
        f[4] += n
    return f


def main() -> None:
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from scan_speed import machine

    import kappatune

    print(f"machine: {machine()}")
    rows = []
    g = torch.Generator().manual_seed(0)
    for p, q, n in SHAPES:
        mods = torch.nn.ModuleDict()
        torch.manual_seed(p * 7 + n)
        for k in range(n):
            lin = torch.nn.Linear(q, p, bias=False)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(p, q, generator=g) * torch.rand(q, generator=g))
            mods[f"m{k}"] = lin
        t = time.perf_counter()
        kappatune.scan(mods, cache=False)
        dt = time.perf_counter() - t
        rows.append((p, q, n, dt))
        print(f"{n:3d} x ({p} x {q}): {dt:7.2f} s  ({dt / n:.3f} s per matrix)")
    import numpy as np
    from scipy.optimize import nnls

    x = np.array([features([(p, q, n)]) for p, q, n, _ in rows])
    y = np.array([dt for *_, dt in rows])

    def fit(idx):  # NNLS on relative errors, columns scaled to comparable magnitudes
        w = (x[idx] / y[idx, None]) / scale
        return nnls(w, np.ones(len(idx)))[0] / scale

    scale = x.max(axis=0)
    coef = fit(list(range(len(rows))))
    err = np.abs(x @ coef - y) / y
    loo = []
    for k in range(len(rows)):  # leave-one-out: refit without batch k, predict it
        ck = fit([j for j in range(len(rows)) if j != k])
        loo.append(abs(float(x[k] @ ck) - y[k]) / y[k])
    names = ("sum_rect(p^2 q)", "sum_rect(p^3)", "sum_square(p^3)", "sum(p^2)", "units", "1")
    print("fit: seconds = " + " + ".join(f"{c:.3e} * {n}" for c, n in zip(coef, names)))
    print(f"relative error on the measured batches: worst {err.max():.0%}, median {np.median(err):.0%}; "
          f"leave-one-out: worst {max(loo):.0%}, median {np.median(loo):.0%}")
    # check against real scans that were not fitted
    from scan_speed import build

    checks = []
    try:
        from kappatune.data import smollm2_fp32

        from transformers import AutoModelForCausalLM

        checks.append(("SmolLM2-135M, real weights", "smollm2-135m", 1,
                       AutoModelForCausalLM.from_pretrained(smollm2_fp32(), dtype=torch.float32)))
    except Exception as e:  # assets missing
        print(f"(SmolLM2 check skipped: {e})")
    checks.append(("OLMoE-1B-7B shapes, 1 layer, random bf16", "olmoe-1b-7b", 1 / 16, build("olmoe", 1)[0]))
    for label, name, frac, model in checks:
        kappatune.scan(model, cache=False)  # warm-up
        t = time.perf_counter()
        kappatune.scan(model, cache=False)
        dt = time.perf_counter() - t
        shapes = [(p, q, round(n * frac)) for p, q, n in model_shapes(name)]
        pred = float(np.array(features(shapes)) @ coef)
        print(f"check {label}: measured {dt:.2f} s, predicted {pred:.2f} s ({pred / dt:.2f}x)")
    for name in MODELS:
        shapes = model_shapes(name)
        sec = float(np.array(features(shapes)) @ coef)
        units = sum(n for *_, n in shapes)
        largest = max(float(np.array(features([(p, q, 1)])) @ coef) for p, q, _ in shapes)
        print(f"predicted {name} scan on this machine: {sec / 60:.1f} min for {units} matrices "
              f"(split over N ranks: about {sec / 60:.1f} / N min, the largest matrix {largest:.1f} s)")


if __name__ == "__main__":
    main()
