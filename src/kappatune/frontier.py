"""Forgetting at equal task accuracy, read off each method's learning-rate sweep.

Each method's chosen rate lands it at a different accuracy, so a contrast at chosen rates compares points of a
trade-off (a gentler rate learns less and forgets less). The sweep traces each method's accuracy-vs-forgetting
curve; interpolating that curve at a shared accuracy asks the question users have: *to learn this much, how
much does each method forget?* Linear interpolation between the two neighbouring rates whose accuracies
bracket the level, on the rising branch of the sweep only (from the gentlest rate up to the rate of best
accuracy): past the best rate accuracy falls while forgetting keeps growing, so a level met again there is
met with less forgetting by a gentler rate. A level the rising branch never brackets stays None. When even
the gentlest rate already exceeds the level, ``bound_at_accuracy`` gives that run's forgetting as an upper
bound (the rate that would just reach the level lies below the sweep; forgetting grew with the rate in every
sweep measured so far, docs/results.md).
"""

from __future__ import annotations

import math


def accuracy_levels(base_accuracy: float, sweep: list[dict], step: float = 0.05) -> list[float]:
    """Multiples of ``step`` strictly above the base model's accuracy and at most the best sweep accuracy."""
    if not sweep:
        return []
    top = max(r["accuracy"] for r in sweep)
    first = math.floor(base_accuracy / step + 1e-9) + 1
    return [round(k * step, 10) for k in range(first, math.floor(top / step + 1e-9) + 1)]


def rising_branch(runs: list[dict]) -> list[dict]:
    """One method's runs by learning rate, from the gentlest up to the first of best accuracy."""
    ordered = sorted(runs, key=lambda r: r["lr"])
    if not ordered:
        return []
    best = max(range(len(ordered)), key=lambda k: (ordered[k]["accuracy"], -k))
    return ordered[:best + 1]


def value_at_accuracy(runs: list[dict], level: float, metric: str) -> float | None:
    """``metric`` interpolated at accuracy ``level`` along one method's runs (one per learning rate)."""
    ordered = rising_branch(runs)
    for a, b in zip(ordered, ordered[1:]):
        lo, hi = sorted((a, b), key=lambda r: r["accuracy"])
        if not lo["accuracy"] <= level <= hi["accuracy"]:
            continue
        if hi["accuracy"] == lo["accuracy"]:  # both at the level exactly: their mean
            return (lo[metric] + hi[metric]) / 2
        t = (level - lo["accuracy"]) / (hi["accuracy"] - lo["accuracy"])
        return lo[metric] + t * (hi[metric] - lo[metric])
    return None


def bound_at_accuracy(runs: list[dict], level: float, metric: str) -> float | None:
    """The gentlest rate's ``metric`` when that run already exceeds accuracy ``level`` (an upper bound on the
    forgetting needed to reach the level, see the module docstring); None otherwise."""
    ordered = rising_branch(runs)
    if not ordered or ordered[0]["accuracy"] <= level:
        return None
    return ordered[0][metric]


def _per_method(sweep: list[dict], levels: list[float], controls: list[str], reader) -> dict:
    by_method: dict[str, list[dict]] = {}
    for r in sweep:
        by_method.setdefault(r["method"], []).append(r)
    return {m: {c: [reader(runs, lv, f"forgetting_dnll[{c}]") for lv in levels] for c in controls}
            for m, runs in sorted(by_method.items())}


def forgetting_at_accuracy(sweep: list[dict], levels: list[float], controls: list[str]) -> dict:
    """{method: {control: [forgetting (dNLL) at each level, or None]}} from the seed-0 sweep runs."""
    return _per_method(sweep, levels, controls, value_at_accuracy)


def bounds_at_accuracy(sweep: list[dict], levels: list[float], controls: list[str]) -> dict:
    """{method: {control: [upper bound or None at each level]}}, beside ``forgetting_at_accuracy``."""
    return _per_method(sweep, levels, controls, bound_at_accuracy)
