"""The float64 Gram matrix ``a @ a.T`` of the short side, accumulated one upcast column block at a time
(never a full float64 copy of ``a``): the costliest step of the rectangular CPU route."""

from __future__ import annotations

import torch

from .blas import buffer, cblas, load_scipy_lapack

#: Float64 elements per column block when accumulating the Gram (16 MB): memory stays near the Gram itself.
GRAM_BLOCK_ELEMS = 1 << 21


def _block_cols(p: int, q: int) -> int:
    return max(1, min(q, max(256, GRAM_BLOCK_ELEMS // p)))


def gram64(a: torch.Tensor, *, use_syrk: bool = True) -> torch.Tensor:
    """float64 ``a @ a.T`` of a (p, q) matrix of any float dtype, both triangles filled, upcast one column
    block at a time into a reused buffer. On CPU the products go through BLAS ``dsyrk``, which computes one
    triangle only (half the flops of ``addmm``); the other triangle is mirrored at the end."""
    p, q = a.shape
    if use_syrk and a.device.type == "cpu" and load_scipy_lapack():
        c_f, lower = gram_tri(a)
        return full_gram(c_f, lower)
    g = torch.zeros(p, p, dtype=torch.float64, device=a.device)
    if a.dtype == torch.float64 or a.device.type != "cpu":
        a64 = a.to(torch.float64)
        return g.addmm_(a64, a64.T)
    blk = _block_cols(p, q)
    for j in range(0, q, blk):
        c = a[:, j:j + blk]
        b = buffer(c.numel()).view(c.shape)
        b.copy_(c)
        g.addmm_(b, b.T)
    return g


def full_gram(c_f, lower: bool) -> torch.Tensor:
    """The symmetric torch matrix from a one-triangle column-major Gram (``gram_tri``'s output): a torch
    (64-byte aligned) copy with the filled triangle mirrored."""
    g = torch.from_numpy(c_f).contiguous()
    return g.tril_().add_(g.tril(-1).T) if lower else g.triu_().add_(g.triu(1).T)


def gram_tri(a: torch.Tensor):
    """float64 Gram ``a @ a.T`` as a column-major numpy array with one triangle filled, and whether it is the
    lower one (LAPACK ``dpotrf`` reads only that triangle and factors it in place). Column blocks of ``a``
    are upcast into a reused buffer and accumulated by CBLAS ``dsyrk`` into the lower triangle (half the flops
    of a product; GIL released). Without CBLAS each block's product is split into row blocks and only the
    upper block triangle is computed by torch matmuls (2-4 row blocks skip 25-37% of the flops)."""
    p, q = a.shape
    blas = cblas()
    # 64-byte aligned (torch's allocator; numpy only guarantees 16): BLAS kernels may take different,
    # differently rounded paths for differently aligned arrays, and a scan must give the same bits every time.
    # dsyrk's first block overwrites (beta = 0), so no zero fill is needed then.
    c_f = (torch.empty if blas is not None else torch.zeros)(p, p, dtype=torch.float64).numpy().T
    t = torch.from_numpy(c_f.T)  # C-contiguous view: t[i, j] = c_f[j, i]; c_f's upper = t's lower
    nb = 4 if p >= 512 else (2 if p >= 256 else 1)
    edges = [p * i // nb for i in range(nb + 1)]
    blk = _block_cols(p, q)
    for j in range(0, q, blk):
        c = a[:, j:j + blk]
        if a.dtype == torch.float64 and c.is_contiguous():
            b = c
        else:
            b = buffer(c.numel()).view(c.shape)
            b.copy_(c)
        if blas is not None:
            blas.syrk(b.numpy(), c_f, beta=0.0 if j == 0 else 1.0, lower=True)
            continue
        for bi in range(nb):
            ri = slice(edges[bi], edges[bi + 1])
            for bj in range(bi + 1):
                rj = slice(edges[bj], edges[bj + 1])
                t[ri, rj].addmm_(b[ri], b[rj].T)  # lower block triangle of t = upper of c_f
    return c_f, blas is not None
