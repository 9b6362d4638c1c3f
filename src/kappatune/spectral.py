"""Pure spectral math on one 2-D matrix: extreme singular values, kappa, and the paper's entropy figures.

Everything is computed in float64 whatever the stored dtype (bf16/fp16/fp32 values upcast exactly).

Routes (the one used is recorded per unit as ``method``):

* ``gram-eigh`` / ``gram-lanczos``: Gram matrix of the short side in float64; small ones get a dense
  ``eigvalsh``, larger ones a Cholesky factor (the log-volume is the log of its diagonal) and Lanczos for
  the two extreme eigenvalues (of G, and of G^-1 through Cholesky solves): only those two are needed.
  The Gram squares kappa, so the relative error of sigma_min grows like eps64 * kappa**2 / 2; we trust it
  only while kappa <= GRAM_TRUSTED_KAPPA (1e4 -> error ~1e-8).
* ``qr-lanczos``: R of a Householder QR of the matrix (backward stable: error ~ eps64 * kappa), then the
  same Lanczos on R^T R and its inverse; for what the Gram cannot resolve.
* ``svd``: float64 ``svdvals`` (LAPACK), the last resort and the ``exact=True`` route.

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


#: Below this short side a dense ``eigvalsh`` of the Gram is cheaper than Lanczos' Python loop.
DENSE_MAX_P = 160
#: Relative residual at which a Lanczos Ritz value is accepted (bounds the eigenvalue's relative error).
LANCZOS_TOL = 1e-7


#: Lanczos steps before giving up on a poorly separated spectrum (the dense eigensolver takes over).
LANCZOS_MAX_ITER = 64


def _lanczos_max(matvec, p: int, *, tol: float = LANCZOS_TOL, max_iter: int = LANCZOS_MAX_ITER,
                 seed: int = 0) -> float | None:
    """Largest eigenvalue of a symmetric positive semi-definite operator of size p (Lanczos, full
    reorthogonalisation, float64). None if it did not converge within max_iter steps (caller falls back)."""
    max_iter = min(p, max(max_iter, p // 4))  # wide, soft-edged spectra (random-like weights) need more
    g = torch.Generator().manual_seed(seed)
    Q = torch.empty(max_iter + 1, p, dtype=torch.float64)  # (k, p) Lanczos basis
    q = torch.randn(p, generator=g, dtype=torch.float64)
    Q[0] = q / q.norm()
    alphas: list[float] = []
    betas: list[float] = []
    theta = None
    for j in range(max_iter):
        w = matvec(Q[j])
        a = float(w @ Q[j])
        # full reorthogonalisation, twice ("twice is enough"): keeps the Ritz values clean
        basis = Q[: j + 1]
        w = w - basis.T @ (basis @ w)
        w = w - basis.T @ (basis @ w)
        b = float(w.norm())
        alphas.append(a)
        betas.append(b)
        k = j + 1
        if k >= 8 and (k % (4 if k <= 32 else 8) == 0 or k == max_iter) or b <= 1e-300:
            t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
            if k > 1:
                off = torch.tensor(betas[:-1], dtype=torch.float64)
                t = t + torch.diag(off, 1) + torch.diag(off, -1)
            evals, evecs = torch.linalg.eigh(t)
            theta = float(evals[-1])
            resid = abs(b * float(evecs[-1, -1]))
            if not math.isfinite(theta):
                return None
            if resid <= tol * abs(theta) or b <= 1e-300 or k == p:
                return theta
        if b <= 1e-300:
            break
        Q[k] = w / b
    return None


def _extremes_gram(g: torch.Tensor) -> tuple[tuple[float, float, float, str] | None, float | None]:
    """((sigma_max, sigma_min, sum log2 sigma, method) or None, sigma_max or None) from the float64 Gram of
    the short side. The first item is None when the Gram cannot resolve the matrix (Cholesky fails, or kappa
    beyond GRAM_TRUSTED_KAPPA); sigma_max (accurate to ~eps relative through the Gram) is still returned
    when it was found, for the QR route to reuse."""
    p = g.shape[0]

    def dense():
        lam = torch.linalg.eigvalsh(g)
        lo, hi = float(lam[0]), float(lam[-1])
        if lo <= 0.0 or hi > lo * GRAM_TRUSTED_KAPPA ** 2:
            return None, math.sqrt(max(hi, 0.0))
        return (math.sqrt(hi), math.sqrt(lo), 0.5 * float(torch.log2(lam).sum()), "gram-eigh"), math.sqrt(hi)

    if p <= DENSE_MAX_P:
        return dense()
    chol, info = torch.linalg.cholesky_ex(g)
    if int(info) != 0:
        return None, None
    log2_sum = float(torch.log2(torch.diagonal(chol)).sum())  # det G = prod diag(L)^2 = prod sigma^2
    hi = _lanczos_max(lambda x: g @ x, p)
    inv_hi = _lanczos_max(lambda x: torch.cholesky_solve(x[:, None], chol)[:, 0], p) if hi is not None else None
    if hi is None or inv_hi is None or inv_hi <= 0:
        return dense()  # Lanczos did not converge fast (clustered extremes): the dense solver is exact
    lo = 1.0 / inv_hi
    if hi > lo * GRAM_TRUSTED_KAPPA ** 2:
        return None, math.sqrt(hi)
    return (math.sqrt(hi), math.sqrt(lo), log2_sum, "gram-lanczos"), math.sqrt(hi)


def _tri_ops(u_f):
    """For an upper triangular column-major U: x -> U^T U x and x -> (U^T U)^-1 x through BLAS level 2
    (``dtrmv`` / ``dtrsv``: triangular, so half the work of a dense product, and a few times faster per call
    than torch's ``cholesky_solve`` at these sizes)."""
    if not TRI_BLAS2:
        u = torch.from_numpy(u_f)

        def mv_t(x):
            return u.T @ (u @ x)

        def inv_t(x):
            y = torch.linalg.solve_triangular(u.T, x[:, None], upper=False)
            return torch.linalg.solve_triangular(u, y, upper=True)[:, 0]

        return mv_t, inv_t
    from scipy.linalg.blas import dtrmv, dtrsv

    def mv(x):
        return torch.from_numpy(dtrmv(u_f, dtrmv(u_f, x.numpy(), trans=0), trans=1))

    def inv(x):
        return torch.from_numpy(dtrsv(u_f, dtrsv(u_f, x.numpy(), trans=1), trans=0))

    return mv, inv


def _extremes_gram_lean(c_f) -> tuple[tuple[float, float, float, str] | None, float | None]:
    """``_extremes_gram`` on the column-major upper-triangle Gram of ``_gram_upper``, factored in place by
    LAPACK ``dpotrf``: the Gram and its Cholesky factor share one p x p buffer (half the memory of keeping
    both), and Lanczos applies G as U^T (U x). ``c_f`` is overwritten."""
    import numpy as np

    p = c_f.shape[0]
    if p <= DENSE_MAX_P:
        g = torch.from_numpy(c_f).contiguous()  # a torch (64-byte aligned) copy: see _gram_upper
        return _extremes_gram(g.triu_().add_(g.triu(1).T))
    from scipy.linalg.lapack import dpotrf

    u_f, info = dpotrf(c_f, lower=0, clean=1, overwrite_a=1)  # G = U^T U, U upper, strict lower zeroed
    if info != 0:
        return None, None
    low = torch.from_numpy(u_f.T)  # C-contiguous view: L = U^T, lower triangular
    diag = torch.diagonal(low)
    if float(diag.min()) <= 0.0:
        return None, None
    log2_sum = float(torch.log2(diag).sum())
    mv, inv = _tri_ops(u_f)
    hi = _lanczos_max(mv, p)
    inv_hi = _lanczos_max(inv, p) if hi is not None else None
    if hi is None or inv_hi is None or inv_hi <= 0:
        return _extremes_gram(low @ low.T)  # rare (clustered extremes): dense solver on G = L L^T
    lo = 1.0 / inv_hi
    if hi > lo * GRAM_TRUSTED_KAPPA ** 2:
        return None, math.sqrt(hi)
    return (math.sqrt(hi), math.sqrt(lo), log2_sum, "gram-lanczos"), math.sqrt(hi)


def _extremes_qr(a: torch.Tensor, s_max: float | None = None, *,
                 overwrite: bool = False) -> tuple[float, float, float, str] | None:
    """Same from R of a Householder QR of the tall orientation: backward stable, so sigma_min keeps a
    relative error ~ eps * kappa (not eps * kappa^2 as through the Gram)."""
    p = a.shape[0]
    if overwrite and a.device.type == "cpu" and a.dtype == torch.float64 and a.is_contiguous() \
            and _syrk() is not None:
        from scipy.linalg.lapack import dgeqrf

        # a is row-major (p, q): its numpy transpose is the column-major tall (q, p) matrix, factored in place
        # (a blocked factorisation needs a workspace: the default lwork makes LAPACK fall back to unblocked)
        qr, _, _, info = dgeqrf(a.numpy().T, lwork=max(1, 64 * p), overwrite_a=1)
        if info != 0:
            return None
        import numpy as np

        r_f = np.asfortranarray(np.triu(qr[:p, :p]))  # a a^T = R^T R; a is overwritten
        r = torch.from_numpy(r_f)
        mv, inv = _tri_ops(r_f)
    else:
        r = torch.linalg.qr(a.T, mode="r").R  # (p, p) upper triangular, a a^T = R^T R

        def mv(x):
            return r.T @ (r @ x)

        def inv(x):
            y = torch.linalg.solve_triangular(r.T, x[:, None], upper=False)
            return torch.linalg.solve_triangular(r, y, upper=True)[:, 0]
    d = torch.diagonal(r).abs()
    if float(d.min()) == 0.0:
        return None
    log2_sum = float(torch.log2(d).sum())
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


def _syrk():
    """scipy's BLAS ``dsyrk`` (symmetric rank-k update: half the flops of a general product), or None."""
    global _SYRK
    if _SYRK is None:
        try:
            from scipy.linalg.blas import dsyrk

            _SYRK = dsyrk
        except ImportError:  # pragma: no cover - scipy is a dependency
            _SYRK = False
    return _SYRK or None


_SYRK = None
#: Accumulate the Gram with scipy's dsyrk (half the flops, but the wrapper holds the GIL, so scan threads
#: serialise) instead of block-triangle torch matmuls (GIL released). Set by the benchmark to compare.
GRAM_SYRK = False
#: Accumulate the Gram with cblas_dsyrk through ctypes (half the flops, GIL released) when available. Off by
#: default: with two scan threads calling it at once, results differed in the last bit from run to run
#: (seen under torchrun, 1 unit in 35 in 2 of 3 runs), and a scan must give the same bits every time.
GRAM_CBLAS = False
#: Lanczos operators through scipy's dtrmv/dtrsv (fast per call, but the wrapper holds the GIL) instead of
#: torch's matmul / solve_triangular.
TRI_BLAS2 = False


def gram64(a: torch.Tensor, *, use_syrk: bool = True) -> torch.Tensor:
    """float64 ``a @ a.T`` of a (p, q) matrix of any float dtype, upcast one column block at a time into a
    reused buffer (never a full float64 copy of ``a``). On CPU the products go through BLAS ``dsyrk``, which
    computes one triangle only (half the flops of ``addmm``); the other triangle is mirrored at the end."""
    p, q = a.shape
    syrk = _syrk() if use_syrk and a.device.type == "cpu" else None
    if syrk is None:
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
    import numpy as np

    g = torch.from_numpy(_gram_upper(a, syrk if GRAM_SYRK else None)).contiguous()
    return g.triu_().add_(g.triu(1).T)  # upper triangle filled: mirror it


def _cblas_syrk():
    """``cblas_dsyrk`` of the OpenBLAS that ships inside the numpy / scipy wheels, called through ctypes
    (a foreign call releases the GIL, unlike scipy's f2py wrapper, so scan threads overlap), as a function
    ``acc(b, c_f)`` adding ``b @ b.T`` of a C-contiguous float64 (p, k) array into the upper triangle of the
    column-major (p, p) array ``c_f``. None when no such library is found (the torch route is used)."""
    global _CBLAS
    if _CBLAS is not None:
        return _CBLAS or None
    _CBLAS = False
    import ctypes
    import glob
    import os

    import numpy as np

    cands = []
    for mod, sym, itype in (("numpy", "scipy_cblas_dsyrk64_", ctypes.c_int64),
                            ("scipy", "scipy_cblas_dsyrk", ctypes.c_int)):
        try:
            pkg = __import__(mod)
        except ImportError:
            continue
        libdir = os.path.dirname(pkg.__file__) + ".libs"
        cands += [(f, sym, itype) for f in sorted(glob.glob(os.path.join(libdir, "libscipy_openblas*.so*")))]
    for path, sym, itype in cands:
        try:
            fn = getattr(ctypes.CDLL(path), sym)
        except (OSError, AttributeError):
            continue
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, itype, itype, ctypes.c_double, ctypes.c_void_p,
                       itype, ctypes.c_double, ctypes.c_void_p, itype]
        fn.restype = None

        def acc(b, c_f, fn=fn):
            p, k = b.shape
            # row-major A = b (p x k): C = A A^T; C is c_f read row-major, whose "lower" is c_f's upper
            fn(101, 122, 111, p, k, 1.0, b.ctypes.data, k, 1.0, c_f.ctypes.data, p)

        # check it on a small case before trusting it
        x = np.arange(12, dtype=np.float64).reshape(3, 4) / 7.0
        c = np.zeros((3, 3), order="F")
        acc(np.ascontiguousarray(x), c)
        if np.allclose(np.triu(c), np.triu(x @ x.T), rtol=1e-14, atol=0) and not np.tril(c, -1).any():
            _CBLAS = acc
            break
    return _CBLAS or None


_CBLAS = None


def _gram_upper(a: torch.Tensor, syrk=None):
    """float64 Gram ``a @ a.T`` as a column-major numpy array whose upper triangle is filled (LAPACK
    ``dpotrf(lower=0)`` reads only that triangle and factors it in place). Column blocks of ``a`` are upcast
    into a reused buffer; each block's product is split into row blocks and only the block triangle is
    computed (torch matmuls, which release the GIL so scan threads overlap; 2-4 row blocks skip 25-37% of
    the flops). ``syrk`` (scipy's ``dsyrk``, half the flops but holding the GIL) is used when given."""
    import numpy as np

    p, q = a.shape
    # 64-byte aligned (torch's allocator; numpy only guarantees 16): BLAS kernels may take different,
    # differently rounded paths for differently aligned arrays, and a scan must give the same bits every time
    c_f = torch.zeros(p, p, dtype=torch.float64).numpy().T  # column-major view of a C-contiguous array
    cblas = _cblas_syrk() if syrk is None and GRAM_CBLAS else None
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
            cblas(b.numpy(), c_f)  # half the flops, GIL released
            continue
        if syrk is not None:
            # b is (p, k) row-major = the column-major (k, p) matrix b^T: trans=1 gives b b^T
            c_f = syrk(1.0, b.numpy().T, beta=1.0, c=c_f, trans=1, lower=0, overwrite_c=1)
            continue
        for bi in range(nb):
            ri = slice(edges[bi], edges[bi + 1])
            for bj in range(bi + 1):
                rj = slice(edges[bj], edges[bj + 1])
                t[ri, rj].addmm_(b[ri], b[rj].T)  # lower block triangle of t = upper of c_f
    return c_f


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

    Routes, cheapest first: float64 Gram of the short side (dense ``eigvalsh`` when small, else Cholesky for
    the log-volume + Lanczos for the two extreme eigenvalues), trusted up to kappa = 1e4; then Householder
    QR + Lanczos (relative error ~eps*kappa); then float64 ``svdvals``. ``force_exact`` uses svdvals only.
    """
    if w.dim() != 2:
        raise ValueError(f"spectrum() needs a 2-D matrix, got shape {tuple(w.shape)}")
    m, n = w.shape
    p = min(m, n)
    if p == 0:
        raise ValueError(f"spectrum() got an empty matrix of shape {(m, n)}")
    w = w.detach()
    w2 = w.T if m > n else w  # (p, q), p <= q: work on the short side
    if force_exact:
        g = None
        a = _as_float64(w2)
        fro_sq = float(a.reshape(-1) @ a.reshape(-1))
    else:
        syrk = _syrk() if w2.device.type == "cpu" else None
        if syrk is not None:
            g = _gram_upper(w2, syrk if GRAM_SYRK else None)  # column-major numpy, upper triangle
            fro_sq = float(g.trace())
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
        got, s_max_gram = _extremes_gram(g) if torch.is_tensor(g) else _extremes_gram_lean(g)
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
