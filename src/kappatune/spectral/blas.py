"""ctypes binding to the double-precision CBLAS / LAPACKE of the OpenBLAS inside the scipy / numpy wheels,
its self-test, and the per-thread float64 work buffers the CPU routes copy matrices into.

A foreign call through ctypes releases the GIL (scipy's f2py wrappers do not), so scan threads overlap.
``cblas()`` finds the library once (locked: scan threads may ask together), checks every routine on a small
case and returns None where that fails; the CPU routes then fall back to torch / scipy.
"""

from __future__ import annotations

import threading

import torch


class CBlas:
    """Double-precision CBLAS routines called through ctypes. Arrays are column-major (Fortran-ordered) numpy
    arrays; vectors contiguous float64. ``lapack`` says whether LAPACKE's in-place factorisations work."""

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


# ---- finding the library ---------------------------------------------------------------------------------

_CBLAS: CBlas | bool | None = None  # None: not looked for yet; False: none usable
_CBLAS_LOCK = threading.Lock()
_SCIPY: bool | None = None


def cblas() -> CBlas | None:
    """The bundled OpenBLAS's CBLAS, checked on a small case, or None (torch routes are used then)."""
    global _CBLAS
    if _CBLAS is not None:
        return _CBLAS or None
    with _CBLAS_LOCK:  # scan threads may get here together: one searches, the others wait for its answer
        if _CBLAS is None:
            _CBLAS = _find_cblas()
    return _CBLAS or None


def load_scipy_lapack() -> bool:
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


def _candidates() -> list[tuple[str, str, object]]:
    """(library path, symbol suffix, BLAS integer type) of the OpenBLAS builds inside the scipy / numpy wheels."""
    import ctypes
    import glob
    import os

    cands = []
    for mod, suffix, itype in (("scipy", "", ctypes.c_int), ("numpy", "64_", ctypes.c_int64)):
        try:
            pkg = __import__(mod)
        except ImportError:
            continue
        libdir = os.path.dirname(pkg.__file__) + ".libs"
        cands += [(f, suffix, itype) for f in sorted(glob.glob(os.path.join(libdir, "libscipy_openblas*.so*")))]
    return cands


def _find_cblas() -> CBlas | bool:
    import ctypes

    for path, suffix, itype in _candidates():
        try:
            blas = CBlas(ctypes.CDLL(path), "scipy_", suffix, itype)
        except (OSError, AttributeError):
            continue
        if _self_test(blas):
            return blas
    return False


def _self_test(blas: CBlas) -> bool:
    """Check every routine, both triangles, on a small case before trusting the library. A failing BLAS
    routine rejects the library; a failing LAPACKE one only turns ``blas.lapack`` off."""
    import numpy as np

    x = np.arange(12, dtype=np.float64).reshape(3, 4) / 7.0 + np.eye(3, 4)
    g = x @ x.T
    v = np.array([1.0, -2.0, 0.5])
    for lower, tri in ((True, np.tril), (False, np.triu)):
        c, y = np.zeros((3, 3), order="F"), np.empty(3)
        blas.syrk(np.ascontiguousarray(x), c, lower=lower)
        blas.symv(c, v, y, lower)
        if not (np.allclose(tri(c), tri(g), rtol=1e-14, atol=0) and not (c - tri(c)).any()
                and np.allclose(y, g @ v, rtol=1e-13)):
            return False
        f = np.linalg.cholesky(g)  # lower L, G = L L^T
        f = np.asfortranarray(f if lower else f.T)
        z, z2 = v.copy(), v.copy()
        blas.inv_gram(f, z, lower)
        blas.gram_tri(f, z2, lower)
        if not (np.allclose(g @ z, v, rtol=1e-10, atol=1e-12) and np.allclose(z2, g @ v, rtol=1e-12)):
            return False
        if blas.lapack:
            gf = np.asfortranarray(g.copy())
            blas.lapack = blas.potrf(gf, lower) == 0 and np.allclose(tri(gf), f, rtol=1e-12, atol=1e-14)
    if blas.lapack:
        blas.lapack = _lu_ok(blas, np.asfortranarray(x[:, :3] + 2 * np.eye(3)), v)
    return True


def _lu_ok(blas: CBlas, m, v) -> bool:
    import numpy as np

    lu = m.copy(order="F")
    z3, z4 = v.copy(), v.copy()
    if blas.getrf(lu) != 0:
        return False
    blas.gram_lu(lu, z3)
    blas.inv_gram_lu(lu, z4)
    return bool(np.allclose(z3, m.T @ m @ v, rtol=1e-12) and np.allclose(m.T @ m @ z4, v, rtol=1e-10, atol=1e-12))


# ---- per-thread float64 work buffers ---------------------------------------------------------------------

_tls = threading.local()
#: A per-thread float64 buffer larger than this is released after use (big matrices on the QR / SVD routes
#: would otherwise keep a float64 copy of the largest one alive per worker for the rest of the scan).
KEEP_BUFFER_ELEMS = 1 << 23


def buffer(n: int) -> torch.Tensor:
    """This thread's reused float64 buffer, at least ``n`` elements (its first ``n`` returned). Fresh
    allocations of matrix size page-fault on every call and cost ~10x the copy into a reused one."""
    buf = getattr(_tls, "buf", None)
    if buf is None or buf.numel() < n:
        buf = torch.empty(n, dtype=torch.float64)
        _tls.buf = buf
    return buf[:n]


def trim_buffer() -> None:
    """Release this thread's buffer if it grew beyond KEEP_BUFFER_ELEMS."""
    buf = getattr(_tls, "buf", None)
    if buf is not None and buf.numel() > KEEP_BUFFER_ELEMS:
        _tls.buf = None


def as_float64(w: torch.Tensor) -> torch.Tensor:
    """``w`` in float64: itself if it already is, else a copy in this thread's buffer (CPU) that must not
    outlive the next call, or a fresh copy (other devices)."""
    if w.dtype == torch.float64:
        return w
    if w.device.type != "cpu":
        return w.to(torch.float64)
    out = buffer(w.numel()).view(w.shape)
    out.copy_(w)
    return out
