"""Forgetting at equal task accuracy, read off each method's learning-rate sweep.

Each method's chosen rate lands it at a different accuracy, so a contrast at chosen rates compares points of a
trade-off (a gentler rate learns less and forgets less). The sweep traces each method's accuracy-vs-forgetting
curve; interpolating that curve at a shared accuracy asks the question users have: *to learn this much, how
much does each method forget?* Linear interpolation between the two neighbouring rates whose accuracies
bracket the level; where several pairs bracket it (accuracy is not monotone in the rate), the lowest-rate pair
is used, i.e. the gentlest rate that reaches the level. A level a method's sweep never brackets stays None.
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


def value_at_accuracy(runs: list[dict], level: float, metric: str) -> float | None:
    """``metric`` interpolated at accuracy ``level`` along one method's runs (one per learning rate)."""
    ordered = sorted(runs, key=lambda r: r["lr"])
    for a, b in zip(ordered, ordered[1:]):
        lo, hi = sorted((a, b), key=lambda r: r["accuracy"])
        if not lo["accuracy"] <= level <= hi["accuracy"]:
            continue
        if hi["accuracy"] == lo["accuracy"]:  # both at the level exactly: their mean
            return (lo[metric] + hi[metric]) / 2
        t = (level - lo["accuracy"]) / (hi["accuracy"] - lo["accuracy"])
        return lo[metric] + t * (hi[metric] - lo[metric])
    return None


def forgetting_at_accuracy(sweep: list[dict], levels: list[float], controls: list[str]) -> dict:
    """{method: {control: [forgetting (dNLL) at each level, or None]}} from the seed-0 sweep runs."""
    by_method: dict[str, list[dict]] = {}
    for r in sweep:
        by_method.setdefault(r["method"], []).append(r)
    return {m: {c: [value_at_accuracy(runs, lv, f"forgetting_dnll[{c}]") for lv in levels] for c in controls}
            for m, runs in sorted(by_method.items())}
