import math

import pytest

from kappatune.stats import mean_interval, paired_contrast, t_quantile, verdict


def test_t_quantiles_known_values():
    # textbook two-sided 95% values
    assert t_quantile(1) == pytest.approx(12.7062, abs=1e-3)
    assert t_quantile(4) == pytest.approx(2.7764, abs=1e-3)
    assert t_quantile(30) == pytest.approx(2.0423, abs=1e-3)


def test_mean_interval_by_hand():
    iv = mean_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    # mean 3, sd sqrt(2.5), half-width 2.7764 * sqrt(2.5) / sqrt(5)
    half = 2.776445 * math.sqrt(2.5) / math.sqrt(5)
    assert (iv.mean, iv.n) == (3.0, 5)
    assert iv.low == pytest.approx(3 - half, abs=1e-4) and iv.high == pytest.approx(3 + half, abs=1e-4)
    one = mean_interval([7.0])
    assert one.mean == 7.0 and math.isnan(one.low) and verdict(one) == "not enough paired seeds"
    assert verdict(one, "clips") == "not enough paired clips"  # what the interval pairs over is named


def test_pairing_removes_shared_seed_noise():
    """Two methods whose runs share a large per-seed effect: unpaired intervals overlap, the paired
    difference (always +0.1) is separated."""
    seed_effect = {0: 0.0, 1: 0.5, 2: -0.4, 3: 0.9, 4: -0.7}
    a = {s: 1.0 + e + 0.1 for s, e in seed_effect.items()}
    b = {s: 1.0 + e + (0.001 * s) for s, e in seed_effect.items()}
    ia, ib = mean_interval(list(a.values())), mean_interval(list(b.values()))
    assert ia.low < ib.high  # unpaired: overlapping
    d = paired_contrast(a, b)
    assert verdict(d) == "separated" and d.low > 0
    # only the common seeds are paired
    assert paired_contrast({0: 1.0, 1: 2.0, 9: 5.0}, {0: 0.0, 1: 1.0}).n == 2


def test_verdict_when_interval_covers_zero():
    assert verdict(paired_contrast({0: 1.0, 1: -1.0, 2: 0.5}, {0: 0.0, 1: 0.0, 2: 0.0})) == \
        "not separated at this power"


def test_correlation_known_answer_and_fisher_interval():
    from kappatune.stats import correlation

    c = correlation([1, 2, 3, 4, 5, 6], [2, 4, 5, 4, 5, 7])
    assert c.r == pytest.approx(0.878310, abs=1e-6) and c.n == 6
    # Fisher z: tanh(atanh(r) -+ 1.959964 / sqrt(3))
    assert (c.low, c.high) == (pytest.approx(0.232414, abs=1e-5), pytest.approx(0.986612, abs=1e-5))
    assert math.isnan(correlation([1, 2, 3], [3, 1, 2]).low)          # too few pairs for an interval
    assert correlation([1, 2, None, 4], [1, 2, 3, None]).n == 2       # pairs with a gap are dropped
