"""Pure spectral math on 2-D matrices: extreme singular values, kappa, and the paper's entropy figures.

Everything is computed in float64 whatever the stored dtype (bf16/fp16/fp32 values upcast exactly).

* ``figures``  the ``Spectrum`` dataclass and the paper's figures from singular values (eq. 6 log-volume and
               Gaussian output entropy, Theorem 1 entropy deficit);
* ``cpu``      ``spectrum(w)``: one matrix on the CPU routes (LU / Gram + Lanczos, Householder QR, svdvals),
               each guarded by the precision contract (kappa within ~1e-6 of float64 SVD);
* ``device``   ``spectra_torch(ws, device=...)``: many matrices batched by shape with torch ops (GPU route);
* ``gram``     the float64 Gram of the short side, one column block at a time;
* ``lanczos``  Lanczos for the largest eigenvalue of a symmetric operator;
* ``blas``     the ctypes CBLAS / LAPACKE binding (GIL released), its self-test, per-thread work buffers.
"""

from .cpu import DENSE_MAX_P, LU_TRUST, spectrum
from .device import spectra_torch
from .figures import GRAM_TRUSTED_KAPPA, Spectrum, gaussian_entropy_bits
from .gram import GRAM_BLOCK_ELEMS, gram64
from .lanczos import LANCZOS_MAX_ITER, LANCZOS_TOL

__all__ = ["DENSE_MAX_P", "GRAM_BLOCK_ELEMS", "GRAM_TRUSTED_KAPPA", "LANCZOS_MAX_ITER", "LANCZOS_TOL", "LU_TRUST",
           "Spectrum", "gaussian_entropy_bits", "gram64", "spectra_torch", "spectrum"]
