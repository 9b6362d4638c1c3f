"""The paper's figures of one matrix, from its extreme singular values and the sum of their logs.

Base-2 logarithms, a spherical Gaussian input of variance ``input_var``, p = min(m, n):

* log_volume      = sum_i log2 sigma_i                              (i = 1..p)
* entropy         = p/2 * log2(2 pi e input_var) + log_volume        (eq. 6; for m > n this is the entropy
                                                                      of Y on its p-dimensional support)
* entropy_max     = the same at kappa = 1 and equal Frobenius norm: every sigma_i = sqrt(||W||_F^2 / p)
* entropy_deficit = entropy_max - entropy >= 0                      (Theorem 1; 0 iff kappa = 1)

Pure Python arithmetic: the routes (``cpu``, ``device``) find the singular values, this module turns them
into a ``Spectrum``.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

#: Largest kappa the float64 Gram routes are trusted with (relative error ~ 2.2e-16 * kappa**2 / 2).
GRAM_TRUSTED_KAPPA = 1.0e4
#: float64 machine epsilon (torch.finfo(torch.float64).eps).
EPS64 = sys.float_info.epsilon
LOG2_2PIE = math.log2(2.0 * math.pi * math.e)


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
    method: str  # "lu-lanczos" | "gram-lanczos" | "gram-eigh" | "qr-lanczos" | "qr-svd" | "svd" | "none"


def make_spectrum(log2_sum: float, s_max: float, s_min: float, fro_sq: float, m: int, n: int,
                  input_var: float, method: str) -> Spectrum:
    """The figures of an (m, n) matrix with extreme singular values ``s_max`` / ``s_min``, sum of log2 of all
    its singular values ``log2_sum`` and squared Frobenius norm ``fro_sq``."""
    p = min(m, n)
    # Numerical rank deficiency, the same tolerance numpy.linalg.matrix_rank uses.
    tol = s_max * max(m, n) * EPS64
    const = 0.5 * p * (LOG2_2PIE + math.log2(input_var))
    entropy_max = const + 0.5 * p * math.log2(fro_sq / p) if fro_sq > 0 else -math.inf
    if s_max == 0.0 or s_min <= tol:
        return Spectrum(s_max, s_min, math.inf, -math.inf, -math.inf, entropy_max, math.inf, fro_sq,
                        "singular", method)
    entropy = const + log2_sum
    return Spectrum(s_max, s_min, s_max / s_min, log2_sum, entropy, entropy_max,
                    max(entropy_max - entropy, 0.0), fro_sq, "ok", method)


def zero_spectrum(m: int, n: int, input_var: float) -> Spectrum:
    """The all-zero (m, n) matrix: singular."""
    return make_spectrum(-math.inf, 0.0, 0.0, 0.0, m, n, input_var, "none")


def nonfinite_spectrum() -> Spectrum:
    """A matrix with NaN or Inf entries: every figure undefined."""
    nan = math.nan
    return Spectrum(nan, nan, nan, nan, nan, nan, nan, nan, "nonfinite", "none")


def gaussian_entropy_bits(cov) -> float:
    """Differential entropy (bits) of N(mu, cov), ``cov`` a torch tensor: 1/2 log2((2 pi e)^d det cov).
    Used by tests and docs."""
    import torch

    d = cov.shape[0]
    sign, logdet = torch.linalg.slogdet(cov.to(torch.float64))
    if sign <= 0:
        return -math.inf
    return 0.5 * (d * LOG2_2PIE + float(logdet) / math.log(2.0))
