"""The batched device route: spectra of many matrices with torch ops on any device (a GPU in practice),
float64 throughout, matrices of the same shape stacked into one batch.

Per shape batch: the float64 Gram of the short side (one batched matmul), a batched dense ``eigvalsh`` of it
(every eigenvalue, so the log-volume too), trusted while kappa <= GRAM_TRUSTED_KAPPA; the others get R of a
batched Householder QR and a batched ``svdvals`` of R (relative error ~ eps * kappa); ``exact`` takes
batched float64 ``svdvals`` of every matrix. Same precision contract as the CPU routes; no Lanczos (its
many small steps suit a GPU badly), so it does more flops than the CPU routes but in large batched kernels.
"""

from __future__ import annotations

import math

import torch

from .figures import GRAM_TRUSTED_KAPPA, Spectrum, make_spectrum, nonfinite_spectrum, zero_spectrum


def spectra_torch(ws: list[torch.Tensor], *, device: str | torch.device, input_var: float = 1.0,
                  exact: bool = False, max_batch_bytes: int = 1 << 30) -> list[Spectrum]:
    """Spectra of several matrices with torch ops on ``device``, batching matrices of the same shape (module
    docstring). A batch holds at most ``max_batch_bytes`` of float64 matrices. Results come back in the order
    of ``ws``."""
    dev = torch.device(device)
    out: list[Spectrum | None] = [None] * len(ws)
    groups: dict[tuple, list[int]] = {}
    for i, w in enumerate(ws):
        if w.dim() != 2 or w.numel() == 0:
            raise ValueError(f"spectra_torch() needs non-empty 2-D matrices, got shape {tuple(w.shape)}")
        groups.setdefault(tuple(w.shape), []).append(i)
    for (m, n), idx in groups.items():
        p = min(m, n)
        step = max(1, max_batch_bytes // (8 * (m * n + 2 * p * p)))
        for k in range(0, len(idx), step):
            chunk = idx[k:k + step]
            a = torch.stack([ws[i].detach().to(dev, torch.float64) for i in chunk])
            if m > n:
                a = a.transpose(1, 2)  # (b, p, q): the short side first
            for i, s in zip(chunk, _spectra_batch(a, m, n, input_var, exact)):
                out[i] = s
    return out  # type: ignore[return-value]


def _spectra_batch(a: torch.Tensor, m: int, n: int, input_var: float, exact: bool = False) -> list[Spectrum]:
    """Spectra of the (b, p, q) float64 batch ``a`` of (m, n) matrices."""
    fro = (a * a).sum(dim=(1, 2))  # (b,)
    finite = torch.isfinite(fro)
    if not bool(finite.all()):
        a = a.clone()
        a[~finite] = 0.0  # their figures are NaN anyway; keep the batched solvers away from NaN / Inf
    if exact:
        s_hi, s_lo, log2_sum = _svd_extremes(a)
        methods = ["svd"] * a.shape[0]
    else:
        s_hi, s_lo, log2_sum, methods = _gram_extremes(a, finite)
    vals = torch.stack([fro, s_hi, s_lo, log2_sum]).cpu().tolist()
    res = []
    for f, sh, sl, lv, method in zip(*vals, methods):
        if not math.isfinite(f):
            res.append(nonfinite_spectrum())
        elif f == 0.0:
            res.append(zero_spectrum(m, n, input_var))
        else:
            res.append(make_spectrum(lv, sh, sl, f, m, n, input_var, method))
    return res


def _svd_extremes(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sigma_max, sigma_min, sum log2 sigma), each (b,), from batched float64 ``svdvals``."""
    sv = torch.linalg.svdvals(a)  # (b, p), descending
    tiny = torch.finfo(torch.float64).tiny
    return sv[:, 0], sv[:, -1], torch.log2(sv.clamp_min(tiny)).sum(dim=1)


def _gram_extremes(a: torch.Tensor, finite: torch.Tensor):
    """Batched Gram + ``eigvalsh``; matrices beyond the Gram's trust are redone through R of a batched QR."""
    b = a.shape[0]
    tiny = torch.finfo(torch.float64).tiny
    lam = torch.linalg.eigvalsh(a @ a.transpose(1, 2))  # (b, p), ascending, float64
    lo, hi = lam[:, 0], lam[:, -1]
    safe = (lo > 0) & (hi <= lo * GRAM_TRUSTED_KAPPA ** 2)
    log2_sum = 0.5 * torch.log2(lam.clamp_min(tiny)).sum(dim=1)
    s_hi, s_lo = hi.clamp_min(0).sqrt(), lo.clamp_min(0).sqrt()
    methods = ["gram-eigh"] * b
    redo = (~safe & finite).nonzero().flatten()
    if len(redo):
        r = torch.linalg.qr(a[redo].transpose(1, 2), mode="r").R  # (r, p, p), a a^T = R^T R
        s_hi[redo], s_lo[redo], log2_sum[redo] = _svd_extremes(r)
        for j in redo.tolist():
            methods[j] = "qr-svd"
    return s_hi, s_lo, log2_sum, methods
