"""How scan time grows with the number and size of matrices, and what that predicts for 7B and 70B models.

    python benchmarks/scan_growth.py            # a few shapes x counts, then a least-squares fit

For each shape (p x q, p <= q) a batch of random matrices with a realistic spread of singular values is
scanned (cache off, default workers). The fit is  seconds = a * sum(p^2 q) + b * sum(p^3) + c * units :
the Gram product, the per-unit cubic work (Cholesky, fallbacks) and a per-unit overhead. The prediction for
a model sums those terms over its real matrix shapes. Random weights: real ones converge at least as fast
(Lanczos) but a larger share of real high-kappa units takes the QR route, so treat it as a lower bound.
"""

from __future__ import annotations

import sys
import time

import torch

# (p, q, count): 10 to 3000 matrices per batch, 64 to 4096 on the short side; one shape at three counts
SHAPES = [(64, 192, 3000), (256, 768, 10), (256, 768, 100), (256, 768, 1000), (512, 1536, 40), (1024, 2816, 10),
          (2048, 2048, 10), (2048, 5632, 6), (4096, 4096, 3), (4096, 11008, 2)]


def model_shapes(name: str) -> list[tuple[int, int, int]]:
    """(p, q, count) with p <= q for each weight matrix kind of a dense Llama-style model."""
    if name == "llama-7b":
        h, i, kv, layers = 4096, 11008, 4096, 32
    elif name == "llama-70b":
        h, i, kv, layers = 8192, 28672, 1024, 80
    else:
        raise ValueError(name)
    mats = [(h, h, 2), (min(kv, h), max(kv, h), 2), (min(h, i), max(h, i), 3)]
    return [(p, q, c * layers) for p, q, c in mats]


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
    x = torch.tensor([[n * p * p * q, n * p ** 3, n] for p, q, n, _ in rows], dtype=torch.float64)
    y = torch.tensor([dt for *_, dt in rows], dtype=torch.float64)
    coef = torch.linalg.lstsq(x, y[:, None]).solution[:, 0].clamp_min(0)
    pred = x @ coef
    err = ((pred - y).abs() / y).max()
    a, b, c = (float(v) for v in coef)
    print(f"fit: seconds = {a:.3e} * sum(p^2 q) + {b:.3e} * sum(p^3) + {c:.3e} * units   "
          f"(worst relative error on the measured points {float(err):.0%})")
    for name in ("llama-7b", "llama-70b"):
        shapes = model_shapes(name)
        sec = sum(a * p * p * q * n + b * p ** 3 * n + c * n for p, q, n in shapes)
        units = sum(n for *_, n in shapes)
        print(f"predicted {name} scan on this machine: {sec / 60:.1f} min for {units} matrices "
              f"(split over N ranks: about {sec / 60:.1f} / N min, the largest matrix being "
              f"{max(a * p * p * q + b * p ** 3 + c for p, q, _ in shapes):.1f} s)")


if __name__ == "__main__":
    main()
