"""The CPU routes of ``spectrum``: one 2-D matrix, float64 whatever its stored dtype, cheapest route first.

* ``lu-lanczos`` (square matrices): LU with partial pivoting of kappatune's own float64 copy (2/3 p^3
  flops); |det| and so the log-volume from U's diagonal; Lanczos for the two extreme eigenvalues of
  M^T M = U^T L^T L U and of its inverse (triangular products and solves; the row permutation cancels).
  No squaring of kappa: the error of sigma_min is ~ eps64 * kappa * growth, and the answer is kept while
  that stays below LU_TRUST (1e-8), else the matrix goes to the QR route.
* ``gram-eigh`` / ``gram-lanczos`` (rectangular): Gram matrix of the short side in float64 (one triangle,
  BLAS ``dsyrk``); small ones get a dense ``eigvalsh``, larger ones Lanczos on G itself for the largest
  eigenvalue, then a Cholesky factor (the log-volume is the log of its diagonal) and Lanczos on G^-1
  through triangular solves. The Gram squares kappa, so the relative error of sigma_min grows like
  eps64 * kappa**2 / 2; we trust it only while kappa <= GRAM_TRUSTED_KAPPA (1e4 -> error ~1e-8).
* ``qr-lanczos``: R of a Householder QR of the matrix (backward stable: error ~ eps64 * kappa), then the
  same Lanczos on R^T R and its inverse; for what the Gram or the LU cannot resolve.
* ``svd``: float64 ``svdvals`` (LAPACK), the last resort and the ``force_exact=True`` route.

Lanczos accepts a Ritz value when its residual is below LANCZOS_TOL (5e-7) of it, which bounds that
eigenvalue's relative error, so kappa is within ~5e-7 plus the factorisation's error. The BLAS and LAPACK
calls go through ctypes (``blas``) to the OpenBLAS inside the scipy / numpy wheels (foreign calls release
the GIL, so scan threads overlap); torch routes are used where that library is missing.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .blas import CBlas, as_float64, buffer, cblas, load_scipy_lapack, trim_buffer
from .figures import EPS64, GRAM_TRUSTED_KAPPA, Spectrum, make_spectrum, nonfinite_spectrum, zero_spectrum
from .gram import full_gram, gram64, gram_tri
from .lanczos import inplace_op, lanczos_max, torch_op

#: Below this short side a dense ``eigvalsh`` of the Gram is cheaper than Lanczos' Python loop.
DENSE_MAX_P = 160
#: The LU route's answer is kept while eps64 * kappa * growth stays below this (its sigma_min error bound up
#: to a modest factor); beyond it the matrix goes through Householder QR, which needs no growth assumption.
LU_TRUST = 1e-8


class Extremes(NamedTuple):
    """What a route found: the extreme singular values, the sum of log2 of all of them, the route's name."""

    s_max: float
    s_min: float
    log2_sum: float
    method: str


def spectrum(w: torch.Tensor, *, input_var: float = 1.0, force_exact: bool = False) -> Spectrum:
    """Spectral figures of a 2-D matrix ``w`` (any float dtype, any device), computed in float64.

    Routes, cheapest first (module docstring): square CPU matrices LU + Lanczos; others the float64 Gram of
    the short side (dense ``eigvalsh`` when small, else Cholesky for the log-volume + Lanczos for the two
    extreme eigenvalues), trusted up to kappa = 1e4; then Householder QR + Lanczos (relative error
    ~eps*kappa); then float64 ``svdvals``. ``force_exact`` uses svdvals only.
    """
    if w.dim() != 2:
        raise ValueError(f"spectrum() needs a 2-D matrix, got shape {tuple(w.shape)}")
    m, n = w.shape
    if min(m, n) == 0:
        raise ValueError(f"spectrum() got an empty matrix of shape {(m, n)}")
    w = w.detach()
    try:
        if force_exact:
            return _exact(w, input_var)
        blas = cblas() if w.device.type == "cpu" and m == n and m > DENSE_MAX_P else None
        if blas is not None and blas.lapack:
            return _square(w, blas, input_var)
        return _rectangular(w, input_var)
    finally:
        trim_buffer()


# ---- the three entry routes --------------------------------------------------------------------------------

def _exact(w: torch.Tensor, input_var: float) -> Spectrum:
    """float64 ``svdvals`` of every singular value (``force_exact``)."""
    m, n = w.shape
    w2 = w.T if m > n else w  # (p, q), p <= q: work on the short side
    a = as_float64(w2)
    fro_sq = float(a.reshape(-1) @ a.reshape(-1))
    if not math.isfinite(fro_sq) and not bool(torch.isfinite(w).all()):
        return nonfinite_spectrum()
    if fro_sq == 0.0:
        return zero_spectrum(m, n, input_var)
    return _svd(a, fro_sq, m, n, input_var)


def _square(w: torch.Tensor, blas: CBlas, input_var: float) -> Spectrum:
    """A square CPU matrix: the LU route, then Householder QR, then svdvals, each on our own float64 copy."""
    p = w.shape[0]
    a = buffer(w.numel()).view(w.shape)  # always our own copy: it is factored in place
    a.copy_(w)
    flat = a.reshape(-1)
    fro_sq = float(flat @ flat)
    if not math.isfinite(fro_sq):
        return nonfinite_spectrum()
    if fro_sq == 0.0:
        return zero_spectrum(p, p, input_var)
    got, s_max = _extremes_lu(a, blas)
    if got is None:
        a.copy_(w)
        got = _extremes_qr(a, s_max, overwrite=True)
    if got is None:
        a.copy_(w)
        return _svd(a, fro_sq, p, p, input_var)
    return make_spectrum(got.log2_sum, got.s_max, got.s_min, fro_sq, p, p, input_var, got.method)


def _rectangular(w: torch.Tensor, input_var: float) -> Spectrum:
    """The Gram of the short side (trusted up to GRAM_TRUSTED_KAPPA), then Householder QR, then svdvals."""
    m, n = w.shape
    p = min(m, n)
    w2 = w.T if m > n else w  # (p, q), p <= q: work on the short side
    lean = w2.device.type == "cpu" and load_scipy_lapack()
    if lean:
        c_f, lower = gram_tri(w2)  # column-major numpy, one triangle filled
        fro_sq = float(c_f.trace())
    else:
        g = gram64(w2)
        fro_sq = float(torch.trace(g))  # = ||W||_F^2; NaN/Inf anywhere in W makes it non-finite
    if not math.isfinite(fro_sq) and not bool(torch.isfinite(w).all()):
        return nonfinite_spectrum()
    if fro_sq == 0.0:
        return zero_spectrum(m, n, input_var)
    if lean:
        got, s_max_gram = _extremes_gram_lean(c_f, lower)
        del c_f
    else:
        got, s_max_gram = _extremes_gram(g)
        del g
    if got is not None:
        return make_spectrum(got.log2_sum, got.s_max, got.s_min, fro_sq, m, n, input_var, got.method)
    a = as_float64(w2)  # the routes below need the matrix itself in float64
    if p > DENSE_MAX_P:
        # our own float64 copy may be factored in place; the caller's float64 tensor never is
        got = _extremes_qr(a, s_max_gram, overwrite=a.data_ptr() != w2.data_ptr())
        if got is not None:
            return make_spectrum(got.log2_sum, got.s_max, got.s_min, fro_sq, m, n, input_var, got.method)
        a = as_float64(w2)
    return _svd(a, fro_sq, m, n, input_var)


def _svd(a: torch.Tensor, fro_sq: float, m: int, n: int, input_var: float) -> Spectrum:
    s = torch.linalg.svdvals(a)  # descending, float64
    s_max, s_min = float(s[0]), float(s[-1])
    log2_sum = float(torch.sum(torch.log2(s))) if s_min > 0 else -math.inf
    return make_spectrum(log2_sum, s_max, s_min, fro_sq, m, n, input_var, "svd")


# ---- Gram routes -------------------------------------------------------------------------------------------
# Each returns (Extremes or None, sigma_max or None): None when the Gram cannot resolve the matrix (Cholesky
# fails, or kappa beyond GRAM_TRUSTED_KAPPA); sigma_max (accurate to ~eps relative through the Gram) is still
# returned when it was found, for the QR route to reuse.

def _dense_extremes(g: torch.Tensor) -> tuple[Extremes | None, float | None]:
    """From a dense ``eigvalsh`` of the full symmetric Gram ``g``."""
    lam = torch.linalg.eigvalsh(g)
    lo, hi = float(lam[0]), float(lam[-1])
    if lo <= 0.0 or hi > lo * GRAM_TRUSTED_KAPPA ** 2:
        return None, math.sqrt(max(hi, 0.0))
    return Extremes(math.sqrt(hi), math.sqrt(lo), 0.5 * float(torch.log2(lam).sum()), "gram-eigh"), math.sqrt(hi)


def _trusted(hi: float, inv_hi: float, log2_sum: float) -> tuple[Extremes | None, float]:
    """Lanczos' largest eigenvalues of G and G^-1 -> the Gram routes' answer."""
    lo = 1.0 / inv_hi
    if hi > lo * GRAM_TRUSTED_KAPPA ** 2:
        return None, math.sqrt(hi)
    return Extremes(math.sqrt(hi), math.sqrt(lo), log2_sum, "gram-lanczos"), math.sqrt(hi)


def _extremes_gram(g: torch.Tensor) -> tuple[Extremes | None, float | None]:
    """The Gram route on a full symmetric torch Gram (off-CPU tensors, or no scipy LAPACK)."""
    p = g.shape[0]
    if p <= DENSE_MAX_P:
        return _dense_extremes(g)
    chol, info = torch.linalg.cholesky_ex(g)
    if int(info) != 0:
        return None, None
    log2_sum = float(torch.log2(torch.diagonal(chol)).sum())  # det G = prod diag(L)^2 = prod sigma^2
    hi = lanczos_max(torch_op(lambda x: g @ x), p)
    inv_hi = lanczos_max(torch_op(lambda x: torch.cholesky_solve(x[:, None], chol)[:, 0]), p) \
        if hi is not None else None
    if hi is None or inv_hi is None or inv_hi <= 0:
        return _dense_extremes(g)  # Lanczos did not converge fast (clustered extremes): the dense solver is exact
    return _trusted(hi, inv_hi, log2_sum)


def _extremes_gram_lean(c_f, lower: bool = False) -> tuple[Extremes | None, float | None]:
    """The Gram route on the column-major one-triangle Gram of ``gram_tri`` (its lower triangle filled when
    ``lower``, else its upper), factored in place by LAPACK ``dpotrf``: the Gram and its Cholesky factor
    share one p x p buffer (half the memory of keeping both). The largest eigenvalue is found first, on G
    itself (CBLAS ``dsymv`` reads one triangle: a quarter of the memory traffic of applying the factor twice),
    then G is factored and Lanczos runs on G^-1 through triangular solves. ``c_f`` is overwritten."""
    import numpy as np

    p = c_f.shape[0]
    if p <= DENSE_MAX_P:
        return _dense_extremes(full_gram(c_f, lower))
    blas = cblas()
    hi = None
    if blas is not None:
        y = np.empty(p)

        def g_op(x):
            blas.symv(c_f, x, y, lower)
            return y

        hi = lanczos_max(g_op, p)
        if hi is None:
            return _dense_extremes(full_gram(c_f, lower))  # clustered top (rare): the dense solver is exact
    c_f, info = _potrf(blas, c_f, lower)
    if info != 0:
        return None, (math.sqrt(hi) if hi is not None and hi > 0 else None)
    diag = np.diagonal(c_f)
    if float(diag.min()) <= 0.0:
        return None, None
    log2_sum = float(np.log2(diag).sum())  # det G = prod diag^2 = prod sigma^2
    mv, inv = _tri_ops(c_f, lower)
    if hi is None:
        hi = lanczos_max(mv, p)
    inv_hi = lanczos_max(inv, p) if hi is not None else None
    if hi is None or inv_hi is None or inv_hi <= 0:
        low = torch.from_numpy(np.tril(c_f) if lower else np.triu(c_f).T)  # rare (clustered extremes):
        return _dense_extremes(low @ low.T)  # the dense solver on G = L L^T
    return _trusted(hi, inv_hi, log2_sum)


def _potrf(blas: CBlas | None, c_f, lower: bool):
    """In-place Cholesky of one triangle: LAPACKE (GIL released) where it passed its self-test, else scipy."""
    if blas is not None and blas.lapack:
        return c_f, blas.potrf(c_f, lower)  # the other triangle is not read
    from scipy.linalg.lapack import dpotrf

    return dpotrf(c_f, lower=int(lower), clean=1, overwrite_a=1)


def _tri_ops(u_f, lower: bool = False):
    """For the Cholesky-like factor of G in column-major float64 ``u_f`` (upper U with G = U^T U, or lower L
    with G = L L^T when ``lower``; the other triangle is never read): the operators x -> G x and
    x -> G^-1 x (numpy in and out). Through CBLAS ``dtrmv`` / ``dtrsv`` when available (GIL released, one
    triangle read), else torch's matmul and triangular solves."""
    blas = cblas()
    if blas is None:
        import numpy as np

        u = torch.from_numpy(np.tril(u_f).T.copy() if lower else np.triu(u_f))  # U with G = U^T U

        def inv_t(x):
            y = torch.linalg.solve_triangular(u.T, x[:, None], upper=False)
            return torch.linalg.solve_triangular(u, y, upper=True)[:, 0]

        return torch_op(lambda x: u.T @ (u @ x)), torch_op(inv_t)
    return (inplace_op(lambda m, x: blas.gram_tri(m, x, lower), u_f),
            inplace_op(lambda m, x: blas.inv_gram(m, x, lower), u_f))


# ---- LU and QR routes --------------------------------------------------------------------------------------

def _extremes_lu(a: torch.Tensor, blas: CBlas) -> tuple[Extremes | None, float | None]:
    """Square matrices: LU with partial pivoting of ``a`` (our own float64 copy, factored in place), then
    Lanczos on M^T M = U^T L^T L U and on its inverse through triangular products and solves (the row
    permutation cancels). 2/3 p^3 flops instead of the Gram's p^3 + Cholesky's p^3 / 3, and no squaring of
    kappa: the error of sigma_min is ~ eps * kappa * growth, so ill-conditioned square matrices need no
    second factorisation. Returns (Extremes or None, sigma_max or None) like the Gram routes; None when
    the factorisation meets an exact zero pivot or the growth factor is too large to trust."""
    import numpy as np

    p = a.shape[0]
    a_f = a.numpy().T  # column-major view of A^T: same singular values, factored in place
    a_max = float(torch.linalg.vector_norm(a, float("inf")))  # max |a_ij|, no p x p temporary
    if blas.getrf(a_f) != 0:
        return None, None  # an exact zero pivot (info > 0): singular to working precision, or a bad argument
    d = np.abs(np.diagonal(a_f))
    if not float(d.min()) > 0.0:
        return None, None
    growth = _max_upper(a_f) / a_max  # max |U| / max |A|
    hi = lanczos_max(inplace_op(blas.gram_lu, a_f), p)
    inv_hi = lanczos_max(inplace_op(blas.inv_gram_lu, a_f), p) if hi is not None else None
    if hi is None or inv_hi is None or not math.isfinite(inv_hi) or inv_hi <= 0:
        return None, None
    s_max, s_min = math.sqrt(hi), math.sqrt(1.0 / inv_hi)
    if EPS64 * (s_max / s_min) * growth > LU_TRUST:
        # sigma_max itself is only off by ~eps * growth (relative): worth reusing unless the growth is wild
        return None, (s_max if EPS64 * growth <= 1e-10 else None)
    return Extremes(s_max, s_min, float(np.log2(d).sum()), "lu-lanczos"), s_max


def _max_upper(a_f, step: int = 256) -> float:
    """max |u_ij| over the upper triangle of a square column-major array, one column block at a time (no
    p x p temporary)."""
    import numpy as np

    u_max = 0.0
    for j in range(0, a_f.shape[0], step):
        u_max = max(u_max, float(np.abs(np.triu(a_f[: j + step, j: j + step], j)).max()))
    return u_max


def _extremes_qr(a: torch.Tensor, s_max: float | None = None, *, overwrite: bool = False) -> Extremes | None:
    """From R of a Householder QR of the tall orientation of the (p, q) matrix ``a``: backward stable, so
    sigma_min keeps a relative error ~ eps * kappa (not eps * kappa^2 as through the Gram). ``s_max`` from
    an earlier route is reused; ``overwrite`` lets a CPU float64 ``a`` be factored in place."""
    import numpy as np

    p = a.shape[0]
    r_f = _qr_r(a, overwrite)  # (p, p) upper, column-major: a a^T = R^T R
    if r_f is None:
        return None
    d = np.abs(np.diagonal(r_f))
    if float(d.min()) == 0.0:
        return None
    log2_sum = float(np.log2(d).sum())
    mv, inv = _tri_ops(r_f)
    hi = s_max ** 2 if s_max else lanczos_max(mv, p)
    inv_hi = lanczos_max(inv, p) if hi is not None else None
    if hi is None or inv_hi is None or not math.isfinite(inv_hi) or inv_hi <= 0:
        return None
    return Extremes(math.sqrt(hi), math.sqrt(1.0 / inv_hi), log2_sum, "qr-lanczos")


def _qr_r(a: torch.Tensor, overwrite: bool):
    """R (column-major numpy, upper) of the QR of ``a.T``, or None if LAPACK reported an error."""
    import numpy as np

    p = a.shape[0]
    if overwrite and a.device.type == "cpu" and a.dtype == torch.float64 and a.is_contiguous() \
            and load_scipy_lapack():
        from scipy.linalg.lapack import dgeqrf

        # a is row-major (p, q): its numpy transpose is the column-major tall (q, p) matrix, factored in place
        # (a blocked factorisation needs a workspace: the default lwork makes LAPACK fall back to unblocked)
        qr, _, _, info = dgeqrf(a.numpy().T, lwork=max(1, 64 * p), overwrite_a=1)
        if info != 0:
            return None
        return np.asfortranarray(np.triu(qr[:p, :p]))  # a a^T = R^T R; a is overwritten
    return np.asfortranarray(torch.linalg.qr(a.T.cpu(), mode="r").R.numpy())
