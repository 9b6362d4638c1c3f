"""Statistics for method comparisons: means with 95% intervals over seeds, and paired contrasts.

Runs of two methods with the same seed see the same data order (``data_seed``), so the difference per
seed removes the part of the run-to-run variation the methods share; the interval of the mean difference is
a Student-t interval over those paired differences. A contrast is "separated" when its interval excludes 0.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass


@dataclass
class Interval:
    mean: float
    low: float      # 95% interval; nan when fewer than two values
    high: float
    n: int
    sd: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def to_dict(self) -> dict:
        return asdict(self)


def t_quantile(df: int, level: float = 0.95) -> float:
    """Two-sided Student-t quantile, e.g. 12.706 for df=1 and 2.776 for df=4 at 95%."""
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, df))


def mean_interval(values: list[float], level: float = 0.95) -> Interval:
    """Mean and its t interval (nan bounds for a single value)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(vals)
    if n == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0, float("nan"))
    mean = statistics.fmean(vals)
    if n < 2:
        return Interval(mean, float("nan"), float("nan"), 1, float("nan"))
    sd = statistics.stdev(vals)
    half = t_quantile(n - 1, level) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, sd)


def paired_contrast(a: dict[int, float], b: dict[int, float], level: float = 0.95) -> Interval:
    """Interval of mean(a - b) over the seeds both have (``{seed: value}``)."""
    seeds = sorted(a.keys() & b.keys())
    return mean_interval([a[s] - b[s] for s in seeds], level)


def verdict(iv: Interval, unit: str = "seeds") -> str:
    """``unit`` names what the interval pairs over (seeds in the lab; test clips or text chunks elsewhere)."""
    if iv.n < 2 or math.isnan(iv.low):
        return f"not enough paired {unit}"
    if iv.low > 0 or iv.high < 0:
        return "separated"
    return "not separated at this power"


@dataclass
class Correlation:
    r: float        # Pearson correlation
    low: float      # 95% interval (Fisher z); nan when fewer than four pairs
    high: float
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


def correlation(xs: list[float], ys: list[float], level: float = 0.95) -> Correlation:
    """Pearson r of paired values with its Fisher-z interval (pairs with a missing value are dropped)."""
    from scipy.stats import norm

    pairs = [(float(x), float(y)) for x, y in zip(xs, ys)
             if x is not None and y is not None and math.isfinite(float(x)) and math.isfinite(float(y))]
    n = len(pairs)
    if n < 3:
        return Correlation(float("nan"), float("nan"), float("nan"), n)
    r = statistics.correlation([p[0] for p in pairs], [p[1] for p in pairs])
    if n < 4 or abs(r) >= 1:
        return Correlation(r, float("nan"), float("nan"), n)
    z, half = math.atanh(r), float(norm.ppf(0.5 + level / 2)) / math.sqrt(n - 3)
    return Correlation(r, math.tanh(z - half), math.tanh(z + half), n)
