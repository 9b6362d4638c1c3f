"""Pure spectral math on one 2-D matrix: extreme singular values, kappa, and the paper's entropy figures.

Everything is computed in float64 whatever the stored dtype (bf16/fp16/fp32 values upcast exactly).

Routes (the one used is recorded per unit as ``method``):

* ``gram-eigh``: Gram matrix of the short side in float64, then ``eigvalsh``. The Gram squares kappa,
  so the relative error of sigma_min grows like eps64 * kappa**2 / 2; we trust it only while
  kappa <= GRAM_TRUSTED_KAPPA (1e4 -> error ~1e-8).
* ``svd``: float64 ``svdvals`` of the matrix (exact LAPACK route), used for everything the Gram route
  cannot resolve (kappa above the trust limit, a non-positive smallest eigenvalue).

Entropy figures follow the paper (eq. 6, Theorem 1) with base-2 logarithms and a spherical Gaussian
input of variance ``input_var``:

* log_volume     = sum_i log2 sigma_i                              (i = 1..p, p = min(m, n))
* entropy        = p/2 * log2(2 pi e input_var) + log_volume        (eq. 6; for m > n this is the entropy
                                                                      of Y on its p-dimensional support)
* entropy_max    = the same at kappa = 1 and equal Frobenius norm: every sigma_i = sqrt(||W||_F^2 / p)
* entropy_deficit = entropy_max - entropy >= 0                      (Theorem 1; 0 iff kappa = 1)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: Largest kappa the float64 Gram route is trusted with (relative error ~ 2.2e-16 * kappa**2 / 2).
GRAM_TRUSTED_KAPPA = 1.0e4
_EPS64 = torch.finfo(torch.float64).eps
_LOG2_2PIE = math.log2(2.0 * math.pi * math.e)


@dataclass(frozen=True)
class Spectrum:
    """Spectral figures of one matrix. Non-finite values are real floats (inf / nan)."""

    sigma_max: float
    sigma_min: float
    kappa: float
    log_volume: float
    entropy: float
    entropy_max: float
    entropy_deficit: float
    frobenius_sq: float
    status: str  # "ok" | "singular" | "nonfinite"
    method: str  # "gram-eigh" | "svd" | "none"


def _figures(sv_log2_sum: float, s_max: float, s_min: float, fro_sq: float, p: int, m: int, n: int,
             input_var: float, method: str) -> Spectrum:
    # Numerical rank deficiency, the same tolerance numpy.linalg.matrix_rank uses.
    tol = s_max * max(m, n) * _EPS64
    const = 0.5 * p * (_LOG2_2PIE + math.log2(input_var))
    entropy_max = const + 0.5 * p * math.log2(fro_sq / p) if fro_sq > 0 else -math.inf
    if s_max == 0.0 or s_min <= tol:
        return Spectrum(s_max, s_min, math.inf, -math.inf, -math.inf, entropy_max, math.inf, fro_sq,
                        "singular", method)
    entropy = const + sv_log2_sum
    return Spectrum(s_max, s_min, s_max / s_min, sv_log2_sum, entropy, entropy_max,
                    max(entropy_max - entropy, 0.0), fro_sq, "ok", method)


def spectrum(w: torch.Tensor, *, input_var: float = 1.0, force_exact: bool = False) -> Spectrum:
    """Spectral figures of a 2-D matrix ``w`` (any float dtype, any device), computed in float64."""
    if w.dim() != 2:
        raise ValueError(f"spectrum() needs a 2-D matrix, got shape {tuple(w.shape)}")
    m, n = w.shape
    p = min(m, n)
    if p == 0:
        raise ValueError(f"spectrum() got an empty matrix of shape {(m, n)}")
    a = w.detach().to(torch.float64)
    if not bool(torch.isfinite(a).all()):
        nan = math.nan
        return Spectrum(nan, nan, nan, nan, nan, nan, nan, nan, "nonfinite", "none")
    # Work on the short side: (p, p) Gram, and svdvals of the wide orientation is 2-3x slower in torch.
    if m > n:
        a = a.T  # (p, q) with p <= q
    fro_sq = float(torch.sum(a * a))
    if not force_exact:
        g = a @ a.T  # (p, p), symmetric positive semi-definite
        lam = torch.linalg.eigvalsh(g)  # ascending
        lam_min, lam_max = float(lam[0]), float(lam[-1])
        if lam_max == 0.0:
            return _figures(-math.inf, 0.0, 0.0, fro_sq, p, m, n, input_var, "gram-eigh")
        if lam_min > 0.0 and lam_max <= lam_min * GRAM_TRUSTED_KAPPA**2:
            log2_sum = 0.5 * float(torch.sum(torch.log2(lam)))
            return _figures(log2_sum, math.sqrt(lam_max), math.sqrt(lam_min), fro_sq, p, m, n, input_var,
                            "gram-eigh")
    s = torch.linalg.svdvals(a)  # descending, float64
    s_max, s_min = float(s[0]), float(s[-1])
    log2_sum = float(torch.sum(torch.log2(s))) if s_min > 0 else -math.inf
    return _figures(log2_sum, s_max, s_min, fro_sq, p, m, n, input_var, "svd")


def log_volume_max(fro_sq: float, p: int) -> float:
    """Largest sum of log2 singular values of a rank-p matrix with squared Frobenius norm ``fro_sq``."""
    return 0.5 * p * math.log2(fro_sq / p)


def gaussian_entropy_bits(cov: torch.Tensor) -> float:
    """Differential entropy (bits) of N(mu, cov): 1/2 log2((2 pi e)^d det cov). Used by tests and docs."""
    d = cov.shape[0]
    sign, logdet = torch.linalg.slogdet(cov.to(torch.float64))
    if sign <= 0:
        return -math.inf
    return 0.5 * (d * _LOG2_2PIE + float(logdet) / math.log(2.0))
