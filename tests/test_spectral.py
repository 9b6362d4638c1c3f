import math

import numpy as np
import pytest
import torch

from kappatune.spectral import GRAM_TRUSTED_KAPPA, gaussian_entropy_bits, spectrum
from conftest import np_kappa


def _with_spectrum(m, n, svals, seed=0):
    g = np.random.default_rng(seed)
    u, _ = np.linalg.qr(g.standard_normal((m, m)))
    v, _ = np.linalg.qr(g.standard_normal((n, n)))
    p = min(m, n)
    s = np.zeros((m, n))
    s[np.arange(p), np.arange(p)] = svals
    return u @ s @ v.T


@pytest.mark.parametrize("kappa", [1.0, 10.0, 1e3, 1e6])
@pytest.mark.parametrize("shape", [(40, 40), (24, 60), (60, 24)])
def test_known_kappa(kappa, shape):
    p = min(shape)
    svals = np.geomspace(kappa, 1.0, p) * 0.37
    w = _with_spectrum(*shape, svals)
    s = spectrum(torch.from_numpy(w))
    assert s.status == "ok"
    assert abs(s.kappa - kappa) / kappa < 1e-6
    # and against an independent float64 SVD of the same matrix
    assert abs(s.kappa - np_kappa(w)) / np_kappa(w) < 1e-6
    assert math.isclose(s.log_volume, float(np.sum(np.log2(svals))), rel_tol=1e-9, abs_tol=1e-6)
    route = "gram-eigh" if kappa <= GRAM_TRUSTED_KAPPA else "svd"
    assert s.method == route


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_storage_is_computed_in_float64(dtype):
    w = torch.from_numpy(_with_spectrum(32, 48, np.geomspace(500.0, 1.0, 32))).to(dtype)
    s = spectrum(w)
    ref = np_kappa(w.to(torch.float64).numpy())  # numpy float64 SVD of the very same stored values
    assert abs(s.kappa - ref) / ref < 1e-6


def test_zero_and_rank_deficient_are_singular():
    z = spectrum(torch.zeros(5, 7))
    assert z.status == "singular" and z.kappa == math.inf
    a = torch.randn(10, 3, dtype=torch.float64) @ torch.randn(3, 8, dtype=torch.float64)  # rank 3
    s = spectrum(a)
    assert s.status == "singular" and s.kappa == math.inf and s.log_volume == -math.inf
    assert s.sigma_max > 0


def test_nonfinite():
    w = torch.randn(6, 6)
    w[2, 3] = float("nan")
    s = spectrum(w)
    assert s.status == "nonfinite" and math.isnan(s.kappa)
    w[2, 3] = float("inf")
    assert spectrum(w).status == "nonfinite"


def test_exact_route_matches_gram_route():
    w = torch.randn(30, 50, dtype=torch.float64)
    a, b = spectrum(w), spectrum(w, force_exact=True)
    assert a.method == "gram-eigh" and b.method == "svd"
    assert abs(a.kappa - b.kappa) / b.kappa < 1e-10
    assert abs(a.log_volume - b.log_volume) < 1e-8


@pytest.mark.parametrize("shape", [(4, 6), (5, 5)])
def test_eq6_matches_monte_carlo_entropy(shape):
    """h(Y) from eq. 6 vs the Gaussian entropy of the sample covariance of Y = W X, X ~ N(0, s^2 I)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(*shape, generator=g, dtype=torch.float64)
    var = 2.5
    x = torch.randn(400_000, shape[1], generator=g, dtype=torch.float64) * math.sqrt(var)
    y = x @ w.T
    h_mc = gaussian_entropy_bits(torch.cov(y.T))
    h_eq6 = spectrum(w, input_var=var).entropy
    assert abs(h_mc - h_eq6) < 0.02, (h_mc, h_eq6)
    # a wrong formula (e.g. natural log) would be far off
    assert abs(h_eq6 * math.log(2) - h_mc) > 0.2


def test_theorem1_kappa_one_maximises_entropy_at_equal_frobenius_norm():
    n = 8
    g = np.random.default_rng(3)
    fro = 5.0
    iso = _with_spectrum(n, n, np.full(n, fro / math.sqrt(n)))
    s_iso = spectrum(torch.from_numpy(iso))
    assert s_iso.kappa == pytest.approx(1.0, rel=1e-9)
    assert s_iso.entropy_deficit == pytest.approx(0.0, abs=1e-9)
    assert s_iso.entropy == pytest.approx(s_iso.entropy_max, abs=1e-9)
    for k in range(20):
        w = g.standard_normal((n, n))
        w *= fro / np.linalg.norm(w)
        s = spectrum(torch.from_numpy(w))
        assert s.entropy < s_iso.entropy
        assert s.entropy_max == pytest.approx(s_iso.entropy_max, abs=1e-9)
        assert s.entropy_deficit == pytest.approx(s_iso.entropy - s.entropy, abs=1e-9)
        assert s.entropy_deficit > 0


def test_deficit_grows_with_kappa_at_fixed_norm():
    n = 6
    defs = []
    for kappa in (1.0, 3.0, 30.0, 300.0):
        sv = np.geomspace(kappa, 1, n)
        sv *= 4.0 / np.linalg.norm(sv)
        defs.append(spectrum(torch.from_numpy(_with_spectrum(n, n, sv))).entropy_deficit)
    assert defs == sorted(defs) and defs[0] == pytest.approx(0, abs=1e-9)


def test_rejects_non_matrix():
    with pytest.raises(ValueError):
        spectrum(torch.randn(3, 3, 3))


@pytest.mark.parametrize("kappa", [1.0, 1.5, 10.0, 1e3, 1e5, 1e6])
@pytest.mark.parametrize("shape", [(200, 200), (180, 420), (420, 180)])
def test_large_routes_match_float64_svd(kappa, shape):
    """The Lanczos routes (p > DENSE_MAX_P) against numpy float64 SVD, including clustered extremes."""
    p = min(shape)
    g = np.random.default_rng(7)
    svals = np.sort(np.exp(g.uniform(0, np.log(kappa), p)))[::-1].copy()
    svals[0], svals[-1] = kappa, 1.0
    svals[1:4] = kappa * (1 - 1e-7 * np.arange(1, 4))  # near-multiple largest values
    svals[-4:-1] = 1.0 + 1e-7 * np.arange(3, 0, -1)     # near-multiple smallest values
    w = _with_spectrum(*shape, np.sort(svals)[::-1] * 0.01, seed=int(kappa) % 97)
    s = spectrum(torch.from_numpy(w))
    ref = np_kappa(w)
    assert abs(s.kappa - ref) / ref < 1e-6, (s.method, s.kappa, ref)
    ref_lv = float(np.sum(np.log2(np.linalg.svd(w, compute_uv=False))))
    assert s.log_volume == pytest.approx(ref_lv, abs=1e-6 * max(1.0, abs(ref_lv)))
    if shape[0] == shape[1]:  # square: LU with partial pivoting at any kappa (svd when Lanczos stalls)
        assert s.method in ("lu-lanczos", "svd")
        assert s.method == "lu-lanczos" or kappa < 2
    elif kappa <= 1e3:
        assert s.method in ("gram-lanczos", "gram-eigh")
    else:
        assert s.method in ("qr-lanczos", "svd")


@pytest.mark.parametrize("shape", [(256, 256), (192, 576), (576, 192), (300, 1200)])
def test_random_gaussian_large(shape):
    """Marchenko-Pastur spectra: a soft lower edge with close eigenvalues, the hard case for Lanczos."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=torch.float32)
    s = spectrum(w)
    ref = np_kappa(w.double().numpy())
    assert abs(s.kappa - ref) / ref < 1e-6, (s.method, s.kappa, ref)


def test_large_rank_deficient_is_singular():
    a = torch.randn(300, 40, dtype=torch.float64) @ torch.randn(40, 250, dtype=torch.float64)
    s = spectrum(a)
    assert s.status == "singular" and s.kappa == math.inf


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kappa", [10.0, 1e6])
@pytest.mark.parametrize("wide", [True, False])
def test_spectrum_never_modifies_its_input(dtype, kappa, wide):
    """The Gram is factored in place and the QR route may factor its float64 copy in place: never the
    caller's tensor (a float64 input is used without a copy on the Gram route)."""
    g = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(450, 200, generator=g, dtype=torch.float64))
    a = ((u * torch.logspace(0, -math.log10(kappa), 200, dtype=torch.float64)) @ v.T).to(dtype)
    a = a if wide else a.T.contiguous()
    before = a.clone()
    sp = spectrum(a)
    assert torch.equal(a, before)
    ref = np.linalg.svd(before.double().numpy(), compute_uv=False)
    assert sp.kappa == pytest.approx(ref[0] / ref[-1], rel=1e-6)


@pytest.mark.parametrize("shape", [(7, 3000), (300, 300), (120, 5000)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_gram64_matches_float64_product(shape, dtype):
    from kappatune.spectral import gram64

    a = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref = a.double() @ a.double().T
    for use_syrk in (True, False):
        g = gram64(a, use_syrk=use_syrk)
        assert torch.equal(g, g.T) or not use_syrk
        torch.testing.assert_close(g, ref, rtol=1e-12, atol=1e-9)
    strided = torch.randn(80, 900, generator=torch.Generator().manual_seed(2))[:, ::3]
    torch.testing.assert_close(gram64(strided), strided.double() @ strided.double().T, rtol=1e-12, atol=1e-9)


def test_square_lu_growth_guard_sends_to_qr():
    """Wilkinson's matrix makes partial pivoting's growth factor 2^(n-1): the LU route's error bound is then
    worthless, its guard must refuse it, and the QR route must still give the exact kappa."""
    from kappatune.spectral.blas import cblas

    if cblas() is None or not cblas().lapack:
        pytest.skip("no CBLAS/LAPACKE in this environment: the LU route is not used")
    n = 200
    w = np.eye(n) - np.tril(np.ones((n, n)), -1)
    w[:, -1] = 1.0
    a = w.T.copy()  # the route factors the transpose of what it is given (same singular values)
    s = spectrum(torch.from_numpy(a))
    ref = np_kappa(a)
    assert s.method in ("qr-lanczos", "svd")
    assert abs(s.kappa - ref) / ref < 1e-6
    # the same matrix with its columns shuffled pivots harmlessly and stays on the LU route
    b = a[:, np.random.default_rng(0).permutation(n)] + 0.5 * np.random.default_rng(1).standard_normal((n, n))
    sb = spectrum(torch.from_numpy(b))
    assert sb.method == "lu-lanczos"
    assert abs(sb.kappa - np_kappa(b)) / np_kappa(b) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_square_route_never_modifies_input_and_flags_singular(dtype):
    g = torch.Generator().manual_seed(5)
    a = torch.randn(220, 220, generator=g, dtype=torch.float64).to(dtype)
    before = a.clone()
    s = spectrum(a)
    assert torch.equal(a, before) and s.method == "lu-lanczos"
    ref = np.linalg.svd(before.double().numpy(), compute_uv=False)
    assert s.kappa == pytest.approx(ref[0] / ref[-1], rel=1e-6)
    assert s.log_volume == pytest.approx(float(np.log2(ref).sum()), abs=1e-6 * float(np.abs(np.log2(ref)).sum()))
    low_rank = (torch.randn(220, 30, generator=g, dtype=torch.float64) @ torch.randn(30, 220, generator=g,
                                                                                      dtype=torch.float64))
    sl = spectrum(low_rank)
    assert sl.status == "singular" and sl.kappa == math.inf
