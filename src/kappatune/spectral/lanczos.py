"""Lanczos for the largest eigenvalue of a symmetric positive semi-definite operator, and the operators
(numpy vector in, numpy vector out) the CPU routes hand it."""

from __future__ import annotations

import math

import torch

#: Relative residual at which a Lanczos Ritz value is accepted. It bounds the eigenvalue's relative error,
#: so each of sigma_max and sigma_min is within tol / 2 and kappa within ~tol (5e-7: the 1e-6 target with
#: room for the factorisation's own error).
LANCZOS_TOL = 5e-7
#: Lanczos steps before giving up on a poorly separated spectrum (the dense eigensolver takes over).
LANCZOS_MAX_ITER = 64


def lanczos_max(op, p: int, *, tol: float = LANCZOS_TOL, max_iter: int = LANCZOS_MAX_ITER,
                seed: int = 0) -> float | None:
    """Largest eigenvalue of a symmetric positive semi-definite operator of size p (Lanczos with full
    reorthogonalisation, float64, numpy). ``op(x)`` returns A x as a float64 numpy vector (it may reuse one
    output buffer, and must not modify x). None if it did not converge within max_iter steps (caller falls
    back). The Ritz value is accepted once its residual |beta_k * s_k| is below tol * theta: a symmetric
    operator then has an eigenvalue within that distance."""
    import numpy as np

    from scipy.linalg.lapack import dstev

    max_iter = min(p, max(max_iter, p // 4))  # wide, soft-edged spectra (random-like weights) need more
    q_basis = np.empty((max_iter + 1, p))  # (k, p) Lanczos basis
    q = np.random.default_rng(seed).standard_normal(p)
    q_basis[0] = q / math.sqrt(float(q @ q))
    alphas = np.zeros(max_iter)  # T_k: diagonal and off-diagonal
    betas = np.zeros(max_iter)
    sqrt, isfinite = math.sqrt, math.isfinite
    for j in range(max_iter):
        qj = q_basis[j]
        w = op(qj)
        alphas[j] = float(w @ qj)
        # full reorthogonalisation, twice ("twice is enough"): keeps the Ritz values clean
        basis = q_basis[: j + 1]
        w = w - (basis @ w) @ basis
        w -= (basis @ w) @ basis
        b = sqrt(float(w @ w))
        betas[j] = b
        k = j + 1
        # a check (LAPACK dstev on T_k) costs a fraction of a step while k is small: often early, rarer later
        if k >= 6 and (k <= 16 or k % (2 if k <= 32 else 4) == 0 or k == max_iter) or b <= 1e-300:
            evals, evecs, info = dstev(alphas[:k], betas[: k - 1], compute_v=1)
            if info != 0:
                return None
            theta = float(evals[-1])
            if not isfinite(theta):
                return None
            if abs(b * float(evecs[-1, -1])) <= tol * abs(theta) or b <= 1e-300 or k == p:
                return theta
        if b <= 1e-300:
            break
        q_basis[k] = w / b
    return None


def torch_op(f):
    """A numpy-in / numpy-out operator from a torch one (``f`` maps a float64 torch vector to one)."""
    def op(x):
        return f(torch.from_numpy(x)).cpu().numpy()

    return op


def inplace_op(f, mat):
    """A Lanczos operator from an in-place CBLAS routine ``f(mat, x)``: copies x into one reused buffer."""
    import numpy as np

    buf = np.empty(mat.shape[0])

    def op(x):
        buf[:] = x
        f(mat, buf)
        return buf

    return op
