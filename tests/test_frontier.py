"""Forgetting at equal accuracy: known answers for the interpolation along a learning-rate sweep."""

import pytest

from kappatune.frontier import (accuracy_levels, bound_at_accuracy, bounds_at_accuracy, forgetting_at_accuracy,
                                value_at_accuracy)


def _run(method, lr, acc, wiki, news=0.0):
    return {"method": method, "lr": lr, "accuracy": acc, "forgetting_dnll[wikipedia]": wiki,
            "forgetting_dnll[news]": news}


def test_linear_interpolation_between_the_bracketing_rates():
    runs = [_run("m", 1e-3, 0.40, 0.00), _run("m", 3e-3, 0.60, 0.20), _run("m", 3e-4, 0.30, -0.05)]
    assert value_at_accuracy(runs, 0.50, "forgetting_dnll[wikipedia]") == pytest.approx(0.10)
    assert value_at_accuracy(runs, 0.35, "forgetting_dnll[wikipedia]") == pytest.approx(-0.025)
    assert value_at_accuracy(runs, 0.60, "forgetting_dnll[wikipedia]") == pytest.approx(0.20)


def test_a_level_outside_the_sweep_is_none():
    runs = [_run("m", 1e-3, 0.40, 0.0), _run("m", 3e-3, 0.60, 0.2)]
    assert value_at_accuracy(runs, 0.65, "forgetting_dnll[wikipedia]") is None
    assert value_at_accuracy(runs, 0.35, "forgetting_dnll[wikipedia]") is None
    assert value_at_accuracy(runs[:1], 0.40, "forgetting_dnll[wikipedia]") is None  # one rate: no curve


def test_non_monotone_sweep_uses_the_gentlest_rate_reaching_the_level():
    # accuracy rises then falls with the rate: 0.55 is bracketed by (1e-3, 3e-3) and by (3e-3, 1e-2)
    runs = [_run("m", 1e-3, 0.50, 0.10), _run("m", 3e-3, 0.60, 0.30), _run("m", 1e-2, 0.50, 0.90)]
    assert value_at_accuracy(runs, 0.55, "forgetting_dnll[wikipedia]") == pytest.approx(0.20)


def test_levels_lie_strictly_above_base_and_within_the_best_run():
    sweep = [_run("a", 1e-3, 0.47, 0.0), _run("b", 1e-3, 0.561, 0.0)]
    assert accuracy_levels(0.368, sweep) == pytest.approx([0.40, 0.45, 0.50, 0.55])
    assert accuracy_levels(0.40, sweep) == pytest.approx([0.45, 0.50, 0.55])  # the base level itself is out
    assert accuracy_levels(0.4, []) == []


def test_forgetting_at_accuracy_per_method_and_control():
    sweep = [_run("a", 1e-3, 0.40, 0.0, 0.1), _run("a", 3e-3, 0.60, 0.2, 0.3), _run("b", 1e-3, 0.45, 0.5)]
    out = forgetting_at_accuracy(sweep, [0.5], ["wikipedia", "news"])
    assert out["a"]["wikipedia"] == pytest.approx([0.1]) and out["a"]["news"] == pytest.approx([0.2])
    assert out["b"] == {"wikipedia": [None], "news": [None]}


def test_the_falling_branch_past_the_best_rate_is_never_read():
    # the gentlest rate already passes 0.50; only the falling pair (1e-3 -> 3e-3) brackets it, and reading it
    # would claim +0.78 of forgetting where a gentler rate reaches 0.50 with at most +0.057 (PiSSA's sweep)
    runs = [_run("p", 3e-4, 0.528, 0.057), _run("p", 1e-3, 0.610, 0.237), _run("p", 3e-3, 0.473, 0.914)]
    assert value_at_accuracy(runs, 0.50, "forgetting_dnll[wikipedia]") is None
    assert bound_at_accuracy(runs, 0.50, "forgetting_dnll[wikipedia]") == pytest.approx(0.057)
    assert value_at_accuracy(runs, 0.60, "forgetting_dnll[wikipedia]") == pytest.approx(
        0.057 + (0.60 - 0.528) / (0.610 - 0.528) * (0.237 - 0.057))
    assert bound_at_accuracy(runs, 0.60, "forgetting_dnll[wikipedia]") is None  # bracketed: a value, no bound
    assert bound_at_accuracy(runs, 0.528, "forgetting_dnll[wikipedia]") is None  # reached exactly: not a bound


def test_bounds_per_method_and_control():
    sweep = [_run("a", 3e-4, 0.55, 0.01, 0.02), _run("a", 1e-3, 0.60, 0.1, 0.2), _run("b", 1e-3, 0.45, 0.5)]
    out = bounds_at_accuracy(sweep, [0.5, 0.58], ["wikipedia", "news"])
    assert out["a"] == {"wikipedia": [0.01, None], "news": [0.02, None]}
    assert out["b"] == {"wikipedia": [None, None], "news": [None, None]}
