"""Pure spectral math on one 2-D matrix: extreme singular values, kappa, and the paper's entropy figures.

Everything is computed in float64 whatever the stored dtype (bf16/fp16/fp32 values upcast exactly).

Routes (the one used is recorded per unit as ``method``):

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
* ``svd``: float64 ``svdvals`` (LAPACK), the last resort and the ``exact=True`` route.

Lanczos accepts a Ritz value when its residual is below LANCZOS_TOL (5e-7) of it, which bounds that
eigenvalue's relative error, so kappa is within ~5e-7 plus the factorisation's error. On CPU the BLAS and
LAPACK calls go through ctypes to the OpenBLAS inside the scipy / numpy wheels (foreign calls release the
GIL, so scan threads overlap); torch routes are used where that library is missing.

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
import threading
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
    method: str  # "lu-lanczos" | "gram-lanczos" | "gram-eigh" | "qr-lanczos" | "qr-svd" | "svd" | "none"


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


#: Below this short side a dense ``eigvalsh`` of the Gram is cheaper than Lanczos' Python loop.
DENSE_MAX_P = 160
#: Relative residual at which a Lanczos Ritz value is accepted. It bounds the eigenvalue's relative error,
#: so each of sigma_max and sigma_min is within tol / 2 and kappa within ~tol (5e-7: the 1e-6 target with
#: room for the factorisation's own error).
LANCZOS_TOL = 5e-7


#: Lanczos steps before giving up on a poorly separated spectrum (the dense eigensolver takes over).
LANCZOS_MAX_ITER = 64


def _lanczos_max(op, p: int, *, tol: float = LANCZOS_TOL, max_iter: int = LANCZOS_MAX_ITER,
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


def _torch_op(f):
    """A numpy-in / numpy-out operator from a torch one (``f`` maps a float64 torch vector to one)."""
    def op(x):
        return f(torch.from_numpy(x)).cpu().numpy()

    return op


def _dense_extremes(g: torch.Tensor) -> tuple[tuple[float, float, float, str] | None, float | None]:
    """``_extremes_gram``'s answer from a dense ``eigvalsh`` of the full symmetric Gram ``g``."""
    lam = torch.linalg.eigvalsh(g)
    lo, hi = float(lam[0]), float(lam[-1])
    if lo <= 0.0 or hi > lo * GRAM_TRUSTED_KAPPA ** 2:
        return None, math.sqrt(max(hi, 0.0))
    return (math.sqrt(hi), math.sqrt(lo), 0.5 * float(torch.log2(lam).sum()), "gram-eigh"), math.sqrt(hi)


def _extremes_gram(g: torch.Tensor) -> tuple[tuple[float, float, float, str] | None, float | None]:
    """((sigma_max, sigma_min, sum log2 sigma, method) or None, sigma_max or None) from the float64 Gram of
    the short side. The first item is None when the Gram cannot resolve the matrix (Cholesky fails, or kappa
    beyond GRAM_TRUSTED_KAPPA); sigma_max (accurate to ~eps relative through the Gram) is still returned
    when it was found, for the QR route to reuse."""
    p = g.shape[0]
    if p <= DENSE_MAX_P:
        return _dense_extremes(g)
    chol, info = torch.linalg.cholesky_ex(g)
    if int(info) != 0:
        return None, None
    log2_sum = float(torch.log2(torch.diagonal(chol)).sum())  # det G = prod diag(L)^2 = prod sigma^2
    hi = _lanczos_max(_torch_op(lambda x: g @ x), p)
    inv_hi = _lanczos_max(_torch_op(lambda x: torch.cholesky_solve(x[:, None], chol)[:, 0]), p) \
        if hi is not None else None
    if hi is None or inv_hi is None or inv_hi <= 0:
        return _dense_extremes(g)  # Lanczos did not converge fast (clustered extremes): the dense solver is exact
    lo = 1.0 / inv_hi
    if hi > lo * GRAM_TRUSTED_KAPPA ** 2:
        return None, math.sqrt(hi)
    return (math.sqrt(hi), math.sqrt(lo), log2_sum, "gram-lanczos"), math.sqrt(hi)


def _tri_ops(u_f, lower: bool = False):
    """For the Cholesky-like factor of G in column-major float64 ``u_f`` (upper U with G = U^T U, or lower L
    with G = L L^T when ``lower``; the other triangle is never read): the operators x -> G x and
    x -> G^-1 x (numpy in and out). Through CBLAS ``dtrmv`` / ``dtrsv`` when available (GIL released, one
    triangle read), else torch's matmul and triangular solves."""
    blas = _cblas()
    if blas is None:
        import numpy as np

        u = torch.from_numpy(np.tril(u_f).T.copy() if lower else np.triu(u_f))  # U with G = U^T U

        def inv_t(x):
            y = torch.linalg.solve_triangular(u.T, x[:, None], upper=False)
            return torch.linalg.solve_triangular(u, y, upper=True)[:, 0]

        return _torch_op(lambda x: u.T @ (u @ x)), _torch_op(inv_t)
    return (_inplace_op(lambda m, x: blas.gram_tri(m, x, lower), u_f),
            _inplace_op(lambda m, x: blas.inv_gram(m, x, lower), u_f))


def _inplace_op(f, mat):
    """A Lanczos operator from an in-place CBLAS routine ``f(mat, x)``: copies x into one reused buffer."""
    import numpy as np

    buf = np.empty(mat.shape[0])

    def op(x):
        buf[:] = x
        f(mat, buf)
        return buf

    return op


def _extremes_gram_lean(c_f, lower: bool = False) -> tuple[tuple[float, float, float, str] | None, float | None]:
    """``_extremes_gram`` on the column-major one-triangle Gram of ``_gram_tri`` (its lower triangle filled
    when ``lower``, else its upper), factored in place by LAPACK ``dpotrf``: the Gram and its Cholesky factor
    share one p x p buffer (half the memory of keeping both). The largest eigenvalue is found first, on G
    itself (CBLAS ``dsymv`` reads one triangle: a quarter of the memory traffic of applying the factor twice),
    then G is factored and Lanczos runs on G^-1 through triangular solves. ``c_f`` is overwritten."""
    import numpy as np

    p = c_f.shape[0]

    def full_gram():
        g = torch.from_numpy(c_f).contiguous()  # a torch (64-byte aligned) copy: see _gram_tri
        return g.tril_().add_(g.tril(-1).T) if lower else g.triu_().add_(g.triu(1).T)

    if p <= DENSE_MAX_P:
        return _dense_extremes(full_gram())
    blas = _cblas()
    hi = None
    if blas is not None:
        y = np.empty(p)

        def g_op(x):
            blas.symv(c_f, x, y, lower)
            return y

        hi = _lanczos_max(g_op, p)
        if hi is None:
            return _dense_extremes(full_gram())  # clustered top (rare): the dense solver is exact
    if blas is not None and blas.lapack:
        info = blas.potrf(c_f, lower)  # in place, GIL released; the other triangle is not read
    else:
        from scipy.linalg.lapack import dpotrf

        c_f, info = dpotrf(c_f, lower=int(lower), clean=1, overwrite_a=1)
    if info != 0:
        return None, (math.sqrt(hi) if hi is not None and hi > 0 else None)
    diag = np.diagonal(c_f)
    if float(diag.min()) <= 0.0:
        return None, None
    log2_sum = float(np.log2(diag).sum())  # det G = prod diag^2 = prod sigma^2
    mv, inv = _tri_ops(c_f, lower)
    if hi is None:
        hi = _lanczos_max(mv, p)
    inv_hi = _lanczos_max(inv, p) if hi is not None else None
    if hi is None or inv_hi is None or inv_hi <= 0:
        low = torch.from_numpy(np.tril(c_f) if lower else np.triu(c_f).T)  # rare (clustered extremes):
        return _dense_extremes(low @ low.T)  # the dense solver on G = L L^T
    lo = 1.0 / inv_hi
    if hi > lo * GRAM_TRUSTED_KAPPA ** 2:
        return None, math.sqrt(hi)
    return (math.sqrt(hi), math.sqrt(lo), log2_sum, "gram-lanczos"), math.sqrt(hi)


#: The LU route's answer is kept while eps64 * kappa * growth stays below this (its sigma_min error bound up
#: to a modest factor); beyond it the matrix goes through Householder QR, which needs no growth assumption.
LU_TRUST = 1e-8


def _extremes_lu(a: torch.Tensor, blas) -> tuple[tuple[float, float, float, str] | None, float | None]:
    """Square matrices: LU with partial pivoting of ``a`` (our own float64 copy, factored in place), then
    Lanczos on M^T M = U^T L^T L U and on its inverse through triangular products and solves (the row
    permutation cancels). 2/3 p^3 flops instead of the Gram's p^3 + Cholesky's p^3 / 3, and no squaring of
    kappa: the error of sigma_min is ~ eps * kappa * growth, so ill-conditioned square matrices need no
    second factorisation. Returns (figures or None, sigma_max or None) like ``_extremes_gram``; None when
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
    # growth factor max |U| / max |A|, over the upper triangle one column block at a time (no p x p temporary)
    u_max, step = 0.0, 256
    for j in range(0, p, step):
        u_max = max(u_max, float(np.abs(np.triu(a_f[: j + step, j: j + step], j)).max()))
    hi = _lanczos_max(_inplace_op(blas.gram_lu, a_f), p)
    inv_hi = _lanczos_max(_inplace_op(blas.inv_gram_lu, a_f), p) if hi is not None else None
    if hi is None or inv_hi is None or not math.isfinite(inv_hi) or inv_hi <= 0:
        return None, None
    s_max, s_min = math.sqrt(hi), math.sqrt(1.0 / inv_hi)
    growth = u_max / a_max
    if _EPS64 * (s_max / s_min) * growth > LU_TRUST:
        # sigma_max itself is only off by ~eps * growth (relative): worth reusing unless the growth is wild
        return None, (s_max if _EPS64 * growth <= 1e-10 else None)
    return (s_max, s_min, float(np.log2(d).sum()), "lu-lanczos"), s_max


def _extremes_qr(a: torch.Tensor, s_max: float | None = None, *,
                 overwrite: bool = False) -> tuple[float, float, float, str] | None:
    """Same from R of a Householder QR of the tall orientation: backward stable, so sigma_min keeps a
    relative error ~ eps * kappa (not eps * kappa^2 as through the Gram)."""
    import numpy as np

    p = a.shape[0]
    if overwrite and a.device.type == "cpu" and a.dtype == torch.float64 and a.is_contiguous() \
            and _scipy_lapack():
        from scipy.linalg.lapack import dgeqrf

        # a is row-major (p, q): its numpy transpose is the column-major tall (q, p) matrix, factored in place
        # (a blocked factorisation needs a workspace: the default lwork makes LAPACK fall back to unblocked)
        qr, _, _, info = dgeqrf(a.numpy().T, lwork=max(1, 64 * p), overwrite_a=1)
        if info != 0:
            return None
        r_f = np.asfortranarray(np.triu(qr[:p, :p]))  # a a^T = R^T R; a is overwritten
    else:
        r_f = np.asfortranarray(torch.linalg.qr(a.T.cpu(), mode="r").R.numpy())  # (p, p) upper, a a^T = R^T R
    d = np.abs(np.diagonal(r_f))
    if float(d.min()) == 0.0:
        return None
    log2_sum = float(np.log2(d).sum())
    mv, inv = _tri_ops(r_f)
    hi = s_max ** 2 if s_max else _lanczos_max(mv, p)
    inv_hi = _lanczos_max(inv, p) if hi is not None else None
    if hi is None or inv_hi is None or not math.isfinite(inv_hi) or inv_hi <= 0:
        return None
    return math.sqrt(hi), math.sqrt(1.0 / inv_hi), log2_sum, "qr-lanczos"


_tls = threading.local()
#: Float64 elements per column block when accumulating the Gram (16 MB): memory stays near the Gram itself.
GRAM_BLOCK_ELEMS = 1 << 21


def _buffer(n: int) -> torch.Tensor:
    buf = getattr(_tls, "buf", None)
    if buf is None or buf.numel() < n:
        buf = torch.empty(n, dtype=torch.float64)
        _tls.buf = buf
    return buf[:n]


#: A per-thread float64 buffer larger than this is released after use (big matrices on the QR / SVD routes
#: would otherwise keep a float64 copy of the largest one alive per worker for the rest of the scan).
KEEP_BUFFER_ELEMS = 1 << 23


def _trim_buffer() -> None:
    buf = getattr(_tls, "buf", None)
    if buf is not None and buf.numel() > KEEP_BUFFER_ELEMS:
        _tls.buf = None


def _scipy_lapack() -> bool:
    """Whether scipy's LAPACK wrappers import (loading scipy's OpenBLAS, so threadpoolctl can limit it): the
    in-place factorisations of the Gram and QR routes use them where LAPACKE is not found."""
    global _SCIPY
    if _SCIPY is None:
        try:
            import scipy.linalg.lapack  # noqa: F401

            _SCIPY = True
        except ImportError:  # pragma: no cover - scipy is a dependency
            _SCIPY = False
    return _SCIPY


_SCIPY: bool | None = None
#: Accumulate the Gram with cblas_dsyrk through ctypes (half the flops, GIL released) when available. The
#: last-bit run-to-run differences once blamed on it came from an unlocked lazy initialisation: a second scan
#: thread saw the half-built state, took the torch route for its first unit and rounded differently.
GRAM_CBLAS = True


def gram64(a: torch.Tensor, *, use_syrk: bool = True) -> torch.Tensor:
    """float64 ``a @ a.T`` of a (p, q) matrix of any float dtype, upcast one column block at a time into a
    reused buffer (never a full float64 copy of ``a``). On CPU the products go through BLAS ``dsyrk``, which
    computes one triangle only (half the flops of ``addmm``); the other triangle is mirrored at the end."""
    p, q = a.shape
    if not (use_syrk and a.device.type == "cpu" and _scipy_lapack()):
        g = torch.zeros(p, p, dtype=torch.float64, device=a.device)
        if a.dtype == torch.float64 or a.device.type != "cpu":
            a64 = a.to(torch.float64)
            return g.addmm_(a64, a64.T)
        blk = max(1, min(q, max(256, GRAM_BLOCK_ELEMS // p)))
        for j in range(0, q, blk):
            c = a[:, j:j + blk]
            b = _buffer(c.numel()).view(c.shape)
            b.copy_(c)
            g.addmm_(b, b.T)
        return g
    c_f, lower = _gram_tri(a)
    g = torch.from_numpy(c_f).contiguous()
    return g.tril_().add_(g.tril(-1).T) if lower else g.triu_().add_(g.triu(1).T)  # mirror the filled one


class _CBlas:
    """Double-precision CBLAS routines of the OpenBLAS that ships inside the numpy / scipy wheels, called
    through ctypes: a foreign call releases the GIL (scipy's f2py wrappers do not), so scan threads overlap.
    Arrays are column-major (Fortran-ordered) numpy arrays; vectors contiguous float64."""

    COL, UPPER, LOWER, NOTRANS, TRANS, NONUNIT, UNIT = 102, 121, 122, 111, 112, 131, 132

    def __init__(self, lib, prefix: str, suffix: str, itype) -> None:
        import ctypes

        def fn(name, *args, restype=None):
            f = getattr(lib, name)
            f.argtypes = list(args)
            f.restype = restype
            return f

        i, d, v, c = ctypes.c_int, ctypes.c_double, ctypes.c_void_p, ctypes.c_char
        blas = f"{prefix}cblas_d{{}}{suffix}".format
        self._syrk = fn(blas("syrk"), i, i, i, itype, itype, d, v, itype, d, v, itype)
        self._symv = fn(blas("symv"), i, i, itype, d, v, itype, v, itype, d, v, itype)
        self._trsv = fn(blas("trsv"), i, i, i, i, itype, v, itype, v, itype)
        self._trmv = fn(blas("trmv"), i, i, i, i, itype, v, itype, v, itype)
        self.itype = itype
        # LAPACKE's _work entry points (no NaN pre-scan of the matrix, no hidden allocation): present in
        # scipy's OpenBLAS; without them the scipy (f2py, GIL-holding) wrappers are used instead
        try:
            lapacke = f"{prefix}LAPACKE_d{{}}_work{suffix}".format
            self._potrf = fn(lapacke("potrf"), i, c, itype, v, itype, restype=itype)
            self._getrf = fn(lapacke("getrf"), i, itype, itype, v, itype, v, restype=itype)
            self.lapack = True
        except AttributeError:
            self.lapack = False

    def syrk(self, b, c_f, beta: float = 1.0, lower: bool = True) -> None:
        """One triangle of column-major ``c_f`` (p, p) = beta * itself + ``b @ b.T``, ``b`` a C-contiguous
        (p, k) array (beta = 0 ignores what ``c_f`` held)."""
        p, k = b.shape
        # b row-major (p, k) is the column-major (k, p) matrix b^T: C += (b^T)^T (b^T) = b b^T
        self._syrk(self.COL, self.LOWER if lower else self.UPPER, self.TRANS, p, k, 1.0, b.ctypes.data, k, beta,
                   c_f.ctypes.data, p)

    def symv(self, c_f, x, y, lower: bool = True) -> None:
        """``y = G x`` for the symmetric G whose lower (or upper) triangle column-major ``c_f`` holds."""
        p = c_f.shape[0]
        self._symv(self.COL, self.LOWER if lower else self.UPPER, p, 1.0, c_f.ctypes.data, p, x.ctypes.data, 1,
                   0.0, y.ctypes.data, 1)

    def inv_gram(self, t_f, x, lower: bool = True) -> None:
        """``x = G^-1 x`` in place, G = L L^T (lower) or U^T U (upper) with the factor in column-major
        ``t_f``: two triangular solves."""
        p, ptr, t = t_f.shape[0], t_f.ctypes.data, self._trsv
        if lower:
            t(self.COL, self.LOWER, self.NOTRANS, self.NONUNIT, p, ptr, p, x.ctypes.data, 1)
            t(self.COL, self.LOWER, self.TRANS, self.NONUNIT, p, ptr, p, x.ctypes.data, 1)
        else:
            t(self.COL, self.UPPER, self.TRANS, self.NONUNIT, p, ptr, p, x.ctypes.data, 1)
            t(self.COL, self.UPPER, self.NOTRANS, self.NONUNIT, p, ptr, p, x.ctypes.data, 1)

    def gram_tri(self, t_f, x, lower: bool = True) -> None:
        """``x = G x`` in place from G's triangular factor (as in ``inv_gram``; reads one triangle)."""
        p, ptr, t = t_f.shape[0], t_f.ctypes.data, self._trmv
        if lower:
            t(self.COL, self.LOWER, self.TRANS, self.NONUNIT, p, ptr, p, x.ctypes.data, 1)
            t(self.COL, self.LOWER, self.NOTRANS, self.NONUNIT, p, ptr, p, x.ctypes.data, 1)
        else:
            t(self.COL, self.UPPER, self.NOTRANS, self.NONUNIT, p, ptr, p, x.ctypes.data, 1)
            t(self.COL, self.UPPER, self.TRANS, self.NONUNIT, p, ptr, p, x.ctypes.data, 1)

    def gram_lu(self, lu_f, x) -> None:
        """``x = U^T L^T L U x`` in place, L (unit lower) and U (upper) packed in column-major ``lu_f``
        as LAPACK ``getrf`` leaves them: for M = P L U this is M^T M (the row permutation cancels)."""
        p, ptr, t = lu_f.shape[0], lu_f.ctypes.data, self._trmv
        t(self.COL, self.UPPER, self.NOTRANS, self.NONUNIT, p, ptr, p, x.ctypes.data, 1)
        t(self.COL, self.LOWER, self.NOTRANS, self.UNIT, p, ptr, p, x.ctypes.data, 1)
        t(self.COL, self.LOWER, self.TRANS, self.UNIT, p, ptr, p, x.ctypes.data, 1)
        t(self.COL, self.UPPER, self.TRANS, self.NONUNIT, p, ptr, p, x.ctypes.data, 1)

    def inv_gram_lu(self, lu_f, x) -> None:
        """``x = (M^T M)^-1 x = U^-1 L^-1 L^-T U^-T x`` in place (see ``gram_lu``): four triangular solves."""
        p, ptr, t = lu_f.shape[0], lu_f.ctypes.data, self._trsv
        t(self.COL, self.UPPER, self.TRANS, self.NONUNIT, p, ptr, p, x.ctypes.data, 1)
        t(self.COL, self.LOWER, self.TRANS, self.UNIT, p, ptr, p, x.ctypes.data, 1)
        t(self.COL, self.LOWER, self.NOTRANS, self.UNIT, p, ptr, p, x.ctypes.data, 1)
        t(self.COL, self.UPPER, self.NOTRANS, self.NONUNIT, p, ptr, p, x.ctypes.data, 1)

    def potrf(self, c_f, lower: bool = True) -> int:
        """In-place Cholesky of the lower (G = L L^T) or upper (G = U^T U) triangle of column-major ``c_f``
        (LAPACK info; the other triangle is left as it was). The lower one is 5-25% faster in OpenBLAS."""
        p = c_f.shape[0]
        return int(self._potrf(self.COL, b"L" if lower else b"U", p, c_f.ctypes.data, p))

    def getrf(self, a_f) -> int:
        """In-place LU with partial pivoting of the square column-major ``a_f`` (LAPACK info)."""
        import ctypes

        import numpy as np

        p = a_f.shape[0]
        ipiv = np.empty(p, dtype=np.int64 if self.itype is ctypes.c_int64 else np.int32)
        return int(self._getrf(self.COL, p, p, a_f.ctypes.data, p, ipiv.ctypes.data))


def _cblas() -> _CBlas | None:
    """The bundled OpenBLAS's CBLAS (``_CBlas``), checked on a small case, or None (torch routes are used)."""
    global _CBLAS
    if _CBLAS is not None:
        return _CBLAS or None
    with _CBLAS_LOCK:  # scan threads may get here together: one searches, the others wait for its answer
        if _CBLAS is None:
            _CBLAS = _find_cblas()
    return _CBLAS or None


def _find_cblas():
    import ctypes
    import glob
    import os

    import numpy as np

    cands = []
    for mod, suffix, itype in (("scipy", "", ctypes.c_int), ("numpy", "64_", ctypes.c_int64)):
        try:
            pkg = __import__(mod)
        except ImportError:
            continue
        libdir = os.path.dirname(pkg.__file__) + ".libs"
        cands += [(f, suffix, itype) for f in sorted(glob.glob(os.path.join(libdir, "libscipy_openblas*.so*")))]
    for path, suffix, itype in cands:
        try:
            blas = _CBlas(ctypes.CDLL(path), "scipy_", suffix, itype)
        except (OSError, AttributeError):
            continue
        # check every routine, both triangles, on a small case before trusting the library
        x = np.arange(12, dtype=np.float64).reshape(3, 4) / 7.0 + np.eye(3, 4)
        g = x @ x.T
        v = np.array([1.0, -2.0, 0.5])
        ok = True
        for lower, tri in ((True, np.tril), (False, np.triu)):
            c, y = np.zeros((3, 3), order="F"), np.empty(3)
            blas.syrk(np.ascontiguousarray(x), c, lower=lower)
            blas.symv(c, v, y, lower)
            ok = ok and np.allclose(tri(c), tri(g), rtol=1e-14, atol=0) and not (c - tri(c)).any() \
                and np.allclose(y, g @ v, rtol=1e-13)
            f = np.linalg.cholesky(g)  # lower L, G = L L^T
            f = np.asfortranarray(f if lower else f.T)
            z, z2 = v.copy(), v.copy()
            blas.inv_gram(f, z, lower)
            blas.gram_tri(f, z2, lower)
            ok = ok and np.allclose(g @ z, v, rtol=1e-10, atol=1e-12) and np.allclose(z2, g @ v, rtol=1e-12)
            if ok and blas.lapack:
                gf = np.asfortranarray(g.copy())
                blas.lapack = blas.potrf(gf, lower) == 0 and np.allclose(tri(gf), f, rtol=1e-12, atol=1e-14)
        if ok and blas.lapack:
            m = np.asfortranarray(x[:, :3] + 2 * np.eye(3))
            lu = m.copy(order="F")
            z3, z4 = v.copy(), v.copy()
            if blas.getrf(lu) != 0:
                blas.lapack = False
            else:
                blas.gram_lu(lu, z3)
                blas.inv_gram_lu(lu, z4)
                blas.lapack = np.allclose(z3, m.T @ m @ v, rtol=1e-12) \
                    and np.allclose(m.T @ m @ z4, v, rtol=1e-10, atol=1e-12)
        if ok:
            return blas
    return False


_CBLAS = None
_CBLAS_LOCK = threading.Lock()


def _gram_tri(a: torch.Tensor):
    """float64 Gram ``a @ a.T`` as a column-major numpy array with one triangle filled, and whether it is the
    lower one (LAPACK ``dpotrf`` reads only that triangle and factors it in place). Column blocks of ``a``
    are upcast into a reused buffer and accumulated by CBLAS ``dsyrk`` into the lower triangle (half the flops
    of a product; GIL released). Without CBLAS (or with ``GRAM_CBLAS`` off) each block's product is split
    into row blocks and only the upper block triangle is computed by torch matmuls (2-4 row blocks skip
    25-37% of the flops)."""
    p, q = a.shape
    cblas = _cblas() if GRAM_CBLAS else None
    # 64-byte aligned (torch's allocator; numpy only guarantees 16): BLAS kernels may take different,
    # differently rounded paths for differently aligned arrays, and a scan must give the same bits every time.
    # dsyrk's first block overwrites (beta = 0), so no zero fill is needed then.
    c_f = (torch.empty if cblas is not None else torch.zeros)(p, p, dtype=torch.float64).numpy().T
    t = torch.from_numpy(c_f.T)  # C-contiguous view: t[i, j] = c_f[j, i]; c_f's upper = t's lower
    nb = 4 if p >= 512 else (2 if p >= 256 else 1)
    edges = [p * i // nb for i in range(nb + 1)]
    blk = max(1, min(q, max(256, GRAM_BLOCK_ELEMS // p)))
    for j in range(0, q, blk):
        c = a[:, j:j + blk]
        if a.dtype == torch.float64 and c.is_contiguous():
            b = c
        else:
            b = _buffer(c.numel()).view(c.shape)
            b.copy_(c)
        if cblas is not None:
            cblas.syrk(b.numpy(), c_f, beta=0.0 if j == 0 else 1.0, lower=True)
            continue
        for bi in range(nb):
            ri = slice(edges[bi], edges[bi + 1])
            for bj in range(bi + 1):
                rj = slice(edges[bj], edges[bj + 1])
                t[ri, rj].addmm_(b[ri], b[rj].T)  # lower block triangle of t = upper of c_f
    return c_f, cblas is not None


def _as_float64(w: torch.Tensor) -> torch.Tensor:
    """A float64 copy of ``w`` in a per-thread buffer that is reused between calls (fresh allocations of
    this size page-fault on every call and cost ~10x the copy). The result must not outlive the next call."""
    if w.dtype == torch.float64:
        return w
    if w.device.type != "cpu":
        return w.to(torch.float64)
    out = _buffer(w.numel()).view(w.shape)
    out.copy_(w)
    return out


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
    p = min(m, n)
    if p == 0:
        raise ValueError(f"spectrum() got an empty matrix of shape {(m, n)}")
    w = w.detach()
    w2 = w.T if m > n else w  # (p, q), p <= q: work on the short side
    blas = _cblas() if w.device.type == "cpu" and not force_exact and m == n and p > DENSE_MAX_P else None
    if blas is not None and blas.lapack:
        try:
            return _spectrum_square(w, blas, input_var)
        finally:
            _trim_buffer()
    if force_exact:
        g = None
        a = _as_float64(w2)
        fro_sq = float(a.reshape(-1) @ a.reshape(-1))
    else:
        if w2.device.type == "cpu" and _scipy_lapack():
            g = _gram_tri(w2)  # (column-major numpy, lower?): one triangle filled
            fro_sq = float(g[0].trace())
        else:
            g = gram64(w2)
            fro_sq = float(torch.trace(g))  # = ||W||_F^2; NaN/Inf anywhere in W makes it non-finite
    if not math.isfinite(fro_sq) and not bool(torch.isfinite(w).all()):
        nan = math.nan
        return Spectrum(nan, nan, nan, nan, nan, nan, nan, nan, "nonfinite", "none")
    if fro_sq == 0.0:
        return _figures(-math.inf, 0.0, 0.0, 0.0, p, m, n, input_var, "none")
    s_max_gram = None
    if not force_exact:
        got, s_max_gram = _extremes_gram(g) if torch.is_tensor(g) else _extremes_gram_lean(*g)
        if got is not None:
            s_max, s_min, log2_sum, method = got
            return _figures(log2_sum, s_max, s_min, fro_sq, p, m, n, input_var, method)
    del g
    if not force_exact:
        a = _as_float64(w2)  # the routes below need the matrix itself in float64
    try:
        if not force_exact and p > DENSE_MAX_P:
            # our own float64 copy may be factored in place; the caller's float64 tensor never is
            got = _extremes_qr(a, s_max_gram, overwrite=a.data_ptr() != w2.data_ptr())
            if got is not None:
                s_max, s_min, log2_sum, method = got
                return _figures(log2_sum, s_max, s_min, fro_sq, p, m, n, input_var, method)
            a = _as_float64(w2)
        s = torch.linalg.svdvals(a)  # descending, float64
    finally:
        _trim_buffer()
    s_max, s_min = float(s[0]), float(s[-1])
    log2_sum = float(torch.sum(torch.log2(s))) if s_min > 0 else -math.inf
    return _figures(log2_sum, s_max, s_min, fro_sq, p, m, n, input_var, "svd")


def _spectrum_square(w: torch.Tensor, blas, input_var: float) -> Spectrum:
    """``spectrum`` of a square CPU matrix: the LU route, then Householder QR, then svdvals."""
    p = w.shape[0]
    a = _buffer(w.numel()).view(w.shape)  # always our own copy: it is factored in place
    a.copy_(w)
    flat = a.reshape(-1)
    fro_sq = float(flat @ flat)
    if not math.isfinite(fro_sq):
        nan = math.nan
        return Spectrum(nan, nan, nan, nan, nan, nan, nan, nan, "nonfinite", "none")
    if fro_sq == 0.0:
        return _figures(-math.inf, 0.0, 0.0, 0.0, p, p, p, input_var, "none")
    got, s_max = _extremes_lu(a, blas)
    if got is None:
        a.copy_(w)
        got = _extremes_qr(a, s_max, overwrite=True)
    if got is None:
        a.copy_(w)
        s = torch.linalg.svdvals(a)
        s_hi, s_lo = float(s[0]), float(s[-1])
        log2_sum = float(torch.sum(torch.log2(s))) if s_lo > 0 else -math.inf
        return _figures(log2_sum, s_hi, s_lo, fro_sq, p, p, p, input_var, "svd")
    return _figures(got[2], got[0], got[1], fro_sq, p, p, p, input_var, got[3])


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


def spectra_torch(ws: list[torch.Tensor], *, device: str | torch.device, input_var: float = 1.0,
                  exact: bool = False, max_batch_bytes: int = 1 << 30) -> list[Spectrum]:
    """Spectra of several matrices with torch ops on ``device`` (the GPU route; it runs on any device),
    float64 throughout, batching matrices of the same shape.

    Per shape batch: the float64 Gram of the short side (one batched matmul), a batched dense ``eigvalsh``
    of it (every eigenvalue, so the log-volume too), trusted while kappa <= GRAM_TRUSTED_KAPPA; the others
    get R of a batched Householder QR and a batched ``svdvals`` of R (relative error ~ eps * kappa);
    ``exact`` takes batched float64 ``svdvals`` of every matrix. Same
    precision contract as ``spectrum``; no Lanczos (its many small steps suit a GPU badly), so it does more
    flops than the CPU routes but in large batched kernels. A batch holds at most ``max_batch_bytes`` of
    float64 matrices. Results come back in the order of ``ws``."""
    dev = torch.device(device)
    out: list[Spectrum | None] = [None] * len(ws)
    groups: dict[tuple, list[int]] = {}
    for i, w in enumerate(ws):
        if w.dim() != 2 or w.numel() == 0:
            raise ValueError(f"spectra_torch() needs non-empty 2-D matrices, got shape {tuple(w.shape)}")
        groups.setdefault(tuple(w.shape), []).append(i)
    for (m, n), idx in groups.items():
        p = min(m, n)
        per = 8 * (m * n + 2 * p * p)
        step = max(1, max_batch_bytes // per)
        for k in range(0, len(idx), step):
            chunk = idx[k:k + step]
            a = torch.stack([ws[i].detach().to(dev, torch.float64) for i in chunk])
            if m > n:
                a = a.transpose(1, 2)  # (b, p, q): the short side first
            for i, s in zip(chunk, _spectra_batch(a, m, n, input_var, exact)):
                out[i] = s
    return out  # type: ignore[return-value]


def _spectra_batch(a: torch.Tensor, m: int, n: int, input_var: float, exact: bool = False) -> list[Spectrum]:
    b, p, _ = a.shape
    tiny = torch.finfo(torch.float64).tiny
    fro = (a * a).sum(dim=(1, 2))
    finite = torch.isfinite(fro)
    if not bool(finite.all()):
        a = a.clone()
        a[~finite] = 0.0  # their figures are NaN anyway; keep the batched solvers away from NaN / Inf
    if exact:
        sv = torch.linalg.svdvals(a)  # descending
        s_hi, s_lo = sv[:, 0], sv[:, -1]
        log2_sum = torch.log2(sv.clamp_min(tiny)).sum(dim=1)
        methods = ["svd"] * b
    else:
        g = a @ a.transpose(1, 2)
        lam = torch.linalg.eigvalsh(g)  # ascending, float64
        lo, hi = lam[:, 0], lam[:, -1]
        safe = (lo > 0) & (hi <= lo * GRAM_TRUSTED_KAPPA ** 2)
        log2_sum = 0.5 * torch.log2(lam.clamp_min(tiny)).sum(dim=1)
        s_hi, s_lo = hi.clamp_min(0).sqrt(), lo.clamp_min(0).sqrt()
        methods = ["gram-eigh"] * b
        redo = (~safe & finite).nonzero().flatten()
        if len(redo):
            r = torch.linalg.qr(a[redo].transpose(1, 2), mode="r").R  # (r, p, p), a a^T = R^T R
            sv = torch.linalg.svdvals(r)  # descending
            s_hi[redo], s_lo[redo] = sv[:, 0], sv[:, -1]
            log2_sum[redo] = torch.log2(sv.clamp_min(tiny)).sum(dim=1)
            for j in redo.tolist():
                methods[j] = "qr-svd"
    vals = torch.stack([fro, s_hi, s_lo, log2_sum]).cpu().tolist()
    res = []
    for j in range(b):
        f, sh, sl, lv = (vals[r][j] for r in range(4))
        if not math.isfinite(f):
            nan = math.nan
            res.append(Spectrum(nan, nan, nan, nan, nan, nan, nan, nan, "nonfinite", "none"))
        elif f == 0.0:
            res.append(_figures(-math.inf, 0.0, 0.0, 0.0, p, m, n, input_var, "none"))
        else:
            res.append(_figures(lv, sh, sl, f, p, m, n, input_var, methods[j]))
    return res
