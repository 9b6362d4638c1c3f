"""Selection policies: which units to train, given a KappaReport.

A policy is an **order** (which candidate units come first) plus a **size rule** (how many of them to take),
after optional filters (include/exclude regexes matched in full, kinds, groups, a per-kind cap).

Orders live in the ``ORDERS`` registry: a function ``(candidates, ctx) -> ordered candidates`` registered
with a one-line help. ``lowest`` (KappaTune), ``highest`` (the paper's INVERSE ablation), ``random`` (seeded
control), ``random-same-kind`` (seeded control drawn with the same mix of unit kinds as a reference selection
``like``: without it a KappaTune win could just mean "train v_proj"). Ties are broken by name. A new order is
one function plus its ``@register_order(...)`` line; the CLI's ``--order`` choices come from the registry.

Size rules live in ``SIZE_RULES``; exactly one is given: ``count`` (Algorithm 1's K), ``budget_params`` (units
in order while the running total stays within N parameters), ``top_p`` (a fraction of the candidate units, at
least one) or ``threshold`` (kappa <= t for ``lowest``; kappa >= t for ``highest``).

``SelectConfig`` holds one policy, validated on construction; its fields carry the help text the CLI shows.
``select(report, config)`` or ``select(report, count=..., order=...)`` applies it.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .errors import KappaTuneError
from .report import KappaReport, SelectedUnit, Selection, UnitResult


# ------------------------------------------------------------------------------------------------ sizes
def parse_size(s: str | int) -> int:
    """'20M' -> 20_000_000; '1.5k' -> 1500; '300' -> 300."""
    if isinstance(s, int):
        return s
    t = str(s).strip().lower().replace("_", "")
    mult = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000, "b": 1_000_000_000}.get(t[-1:], 1)
    num = t[:-1] if mult != 1 else t
    try:
        val = float(num) * mult
    except ValueError:
        raise KappaTuneError(f"cannot read {s!r} as a size (examples: 20M, 1.5k, 300)") from None
    if val != int(val):
        raise KappaTuneError(f"size {s!r} is not a whole number")
    return int(val)


def _positive_int(what: str) -> Callable[[Any], int]:
    def parse(v) -> int:
        if isinstance(v, str):
            v = parse_size(v)
        if isinstance(v, bool) or int(v) != v or v <= 0:
            raise KappaTuneError(f"{what} must be a positive integer, got {v}")
        return int(v)

    return parse


def _number(what: str, check: Callable[[float], bool] = lambda x: True, want: str = "") -> Callable[[Any], float]:
    def parse(v) -> float:
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise KappaTuneError(f"{what} must be a number, got {v!r}") from None
        if not check(x):
            raise KappaTuneError(f"{what} must be {want}, got {v}")
        return x

    return parse


# ------------------------------------------------------------------------------------------------ orders
@dataclass
class OrderContext:
    """What an order function may use besides the candidates: a seeded RNG, the reference selection
    (``like``) and a list to append notes to (they end up in ``Selection.notes``)."""

    rng: random.Random
    like: Selection | None = None
    notes: list[str] = field(default_factory=list)


OrderFn = Callable[[list[UnitResult], OrderContext], list[UnitResult]]


@dataclass(frozen=True)
class Order:
    name: str
    fn: OrderFn
    help: str
    seeded: bool = False                                     # uses ctx.rng: the seed is part of the policy
    needs_like: bool = False                                 # needs a reference selection (like=)
    keeps: Callable[[float, float], bool] | None = None      # threshold rule keeps(kappa, t); None: no threshold


ORDERS: dict[str, Order] = {}


def register_order(name: str, help: str, *, seeded: bool = False, needs_like: bool = False,
                   keeps: Callable[[float, float], bool] | None = None) -> Callable[[OrderFn], OrderFn]:
    """Decorator: make ``fn(candidates, ctx) -> ordered`` available as ``order=name`` (API and CLI)."""

    def deco(fn: OrderFn) -> OrderFn:
        if name in ORDERS:
            raise ValueError(f"order {name!r} is already registered")
        ORDERS[name] = Order(name, fn, help, seeded=seeded, needs_like=needs_like, keeps=keeps)
        return fn

    return deco


def order_help() -> str:
    """One line per registered order, for --help texts."""
    return "; ".join(f"{o.name}: {o.help}" for o in ORDERS.values())


@register_order("lowest", "lowest kappa first (KappaTune)", keeps=lambda kappa, t: kappa <= t)
def order_lowest(units: list[UnitResult], ctx: OrderContext) -> list[UnitResult]:
    return sorted(units, key=lambda u: (u.kappa, u.name))


@register_order("highest", "highest kappa first (the paper's INVERSE ablation)", keeps=lambda kappa, t: kappa >= t)
def order_highest(units: list[UnitResult], ctx: OrderContext) -> list[UnitResult]:
    return sorted(units, key=lambda u: (-u.kappa, u.name))


@register_order("median", "nearest the candidates' median kappa first, by ratio (a control between the ends)")
def order_median(units: list[UnitResult], ctx: OrderContext) -> list[UnitResult]:
    m = statistics.median(u.kappa for u in units)
    return sorted(units, key=lambda u: (abs(math.log(u.kappa / m)), u.name))


@register_order("random", "seeded random order (a control)", seeded=True)
def order_random(units: list[UnitResult], ctx: OrderContext) -> list[UnitResult]:
    out = sorted(units, key=lambda u: u.name)
    ctx.rng.shuffle(out)
    return out


@register_order("random-same-kind", "seeded random order with the kind mix of a reference selection (like)",
                seeded=True, needs_like=True)
def order_random_same_kind(units: list[UnitResult], ctx: OrderContext) -> list[UnitResult]:
    """Random order whose first len(like) entries repeat the reference's kind mix, layer bands kept close.

    For each reference unit (in its order) draw an unused candidate of the same kind, preferring the same
    layer third of the network; the rest of the candidates follow in random order.
    """
    by_kind: dict[str, list[UnitResult]] = {}
    for u in sorted(units, key=lambda u: u.name):
        by_kind.setdefault(u.kind, []).append(u)
    for v in by_kind.values():
        ctx.rng.shuffle(v)
    layers = [u.layer for u in units if u.layer is not None]
    n_layers = (max(layers) + 1) if layers else 1

    def band(layer):
        return None if layer is None else (3 * layer) // max(n_layers, 1)

    used: set[str] = set()
    head: list[UnitResult] = []
    for ref in ctx.like.units:
        pool = [u for u in by_kind.get(ref.kind, []) if u.name not in used]
        if not pool:
            ctx.notes.append(f"no unused unit of kind {ref.kind!r} left; the kind mix differs from the reference")
            continue
        same_band = [u for u in pool if band(u.layer) == band(ref.layer)]
        pick = (same_band or pool)[0]
        used.add(pick.name)
        head.append(pick)
    tail = [u for u in sorted(units, key=lambda u: u.name) if u.name not in used]
    ctx.rng.shuffle(tail)
    return head + tail


# ------------------------------------------------------------------------------------------------ size rules
@dataclass(frozen=True)
class SizeRule:
    name: str
    help: str
    metavar: str
    parse: Callable[[Any], Any]                                        # API/CLI value -> checked value
    take: Callable[[list[UnitResult], Any, Order], list[UnitResult]]   # (ordered, value, order) -> chosen


def _take_count(ordered: list[UnitResult], count: int, order: Order) -> list[UnitResult]:
    if count > len(ordered):
        raise KappaTuneError(f"count {count} is larger than the {len(ordered)} units available")
    return ordered[:count]


def _take_budget(ordered: list[UnitResult], budget: int, order: Order) -> list[UnitResult]:
    available = sum(u.numel for u in ordered)
    if budget > available:
        raise KappaTuneError(f"budget of {budget:,} parameters is larger than the {available:,} "
                             f"available in {len(ordered)} candidate units")
    chosen, total = [], 0
    for u in ordered:
        if total + u.numel > budget:
            break
        chosen.append(u)
        total += u.numel
    if not chosen:
        raise KappaTuneError(f"budget of {budget:,} parameters is smaller than the first unit in order "
                             f"({ordered[0].name}, {ordered[0].numel:,} parameters)")
    return chosen


def _take_top_p(ordered: list[UnitResult], p: float, order: Order) -> list[UnitResult]:
    return ordered[: max(1, int(len(ordered) * p))]


def _take_threshold(ordered: list[UnitResult], t: float, order: Order) -> list[UnitResult]:
    chosen = [u for u in ordered if order.keeps(u.kappa, t)]
    if not chosen:
        raise KappaTuneError(f"no unit passes the kappa threshold {t}")
    return chosen


SIZE_RULES: dict[str, SizeRule] = {r.name: r for r in (
    SizeRule("count", "the first K units in order (Algorithm 1's K)", "K", _positive_int("count"), _take_count),
    SizeRule("budget_params", "units in order while their total stays within N parameters (20M, 1.5k)", "N",
             _positive_int("budget_params"), _take_budget),
    SizeRule("top_p", "this fraction of the candidate units (at least one)", "P",
             _number("top_p", lambda x: 0 < x <= 1, "in (0, 1]"), _take_top_p),
    SizeRule("threshold", "every unit with kappa <= T (>= T for the highest order)", "T", _number("threshold"),
             _take_threshold),
)}


# ------------------------------------------------------------------------------------------------ config
def _help(text: str, **cli) -> dict:
    return {"help": text, **cli}


@dataclass
class SelectConfig:
    """One selection policy. Exactly one size rule (count, budget_params, top_p, threshold) is given."""

    count: int | str | None = field(default=None, metadata=_help(SIZE_RULES["count"].help))
    budget_params: int | str | None = field(default=None, metadata=_help(SIZE_RULES["budget_params"].help))
    top_p: float | None = field(default=None, metadata=_help(SIZE_RULES["top_p"].help))
    threshold: float | None = field(default=None, metadata=_help(SIZE_RULES["threshold"].help))
    order: str = field(default="lowest", metadata=_help("which units come first"))
    seed: int = field(default=0, metadata=_help("seed of the random orders", type=int))
    include: Sequence[str] = field(default=(), metadata=_help(
        "regex matched in full against unit names (repeatable); only matching units", metavar="RE"))
    exclude: Sequence[str] = field(default=(), metadata=_help(
        "regex matched in full against unit names (repeatable); matching units are left out", metavar="RE"))
    kinds: Sequence[str] = field(default=(), metadata=_help(
        "only units of this kind, e.g. v_proj (repeatable)", flag="--kind", metavar="KIND"))
    groups: Sequence[str] = field(default=(), metadata=_help(
        "only units of this group: attention, mlp, expert, conv, embedding, lm_head, other (repeatable)",
        flag="--group", metavar="GROUP"))
    max_per_kind: int | None = field(default=None, metadata=_help("at most N units of any one kind", type=int,
                                                                 metavar="N"))
    allow_singular: bool = field(default=False, metadata=_help("let units with kappa = inf be selected"))
    like: Selection | None = field(default=None, metadata=_help(
        "reference selection (JSON) for the random-same-kind order", metavar="SEL.json"))

    def __post_init__(self):
        if self.order not in ORDERS:
            raise KappaTuneError(f"unknown order {self.order!r}; choose one of {', '.join(ORDERS)}")
        order = ORDERS[self.order]
        for name in ("include", "exclude", "kinds", "groups"):
            v = getattr(self, name)
            setattr(self, name, (v,) if isinstance(v, str) else tuple(v or ()))
        for p in (*self.include, *self.exclude):
            _compile(p)
        if order.needs_like and self.like is None:
            raise KappaTuneError(f"order {self.order!r} needs a reference selection (like=...)")
        given = [n for n in SIZE_RULES if getattr(self, n) is not None]
        if not given and order.needs_like:
            self.count, given = len(self.like.units), ["count"]  # default: as many units as the reference
        if len(given) != 1:
            raise KappaTuneError(f"give exactly one of {', '.join(SIZE_RULES)}")
        setattr(self, given[0], SIZE_RULES[given[0]].parse(getattr(self, given[0])))
        if self.threshold is not None and order.keeps is None:
            with_t = [o.name for o in ORDERS.values() if o.keeps is not None]
            raise KappaTuneError(f"threshold applies to the {' or '.join(with_t)} order only")
        if self.max_per_kind is not None:
            self.max_per_kind = _positive_int("max_per_kind")(self.max_per_kind)
        if isinstance(self.seed, bool) or int(self.seed) != self.seed:
            raise KappaTuneError(f"seed must be an integer, got {self.seed!r}")

    @property
    def size_rule(self) -> tuple[str, Any]:
        """(name, value) of the one size rule given."""
        return next((n, getattr(self, n)) for n in SIZE_RULES if getattr(self, n) is not None)

    def to_policy(self) -> dict:
        """The ``policy`` record saved with a selection (format kappatune.selection/1)."""
        return {"order": self.order, "count": self.count, "budget_params": self.budget_params, "top_p": self.top_p,
                "threshold": self.threshold, "seed": self.seed if ORDERS[self.order].seeded else None,
                "include": list(self.include), "exclude": list(self.exclude), "kinds": list(self.kinds),
                "groups": list(self.groups), "max_per_kind": self.max_per_kind,
                "allow_singular": self.allow_singular, "like": self.like.policy if self.like is not None else None}


assert set(SIZE_RULES) <= {f.name for f in dataclasses.fields(SelectConfig)}


# ------------------------------------------------------------------------------------------------ select
def select(report: KappaReport, config: SelectConfig | None = None, **kwargs) -> Selection:
    """Choose units from ``report`` by ``config`` or by ``SelectConfig`` keywords (``count=``,
    ``budget_params=``, ``top_p=``, ``threshold=``, ``order=``, ``seed=``, ``include=``, ``exclude=``,
    ``kinds=``, ``groups=``, ``max_per_kind=``, ``like=``, ``allow_singular=``); keywords given with a
    config override its fields."""
    if config is None:
        config = SelectConfig(**kwargs)
    elif kwargs:
        config = dataclasses.replace(config, **kwargs)
    order = ORDERS[config.order]
    ok = {"ok", "singular"} if config.allow_singular else {"ok"}
    candidates = [u for u in report.units if u.status in ok]
    if not candidates:
        raise KappaTuneError("the report has no unit with a finite kappa to select from")
    candidates = _filter(candidates, config)
    if not candidates:
        raise KappaTuneError("the include/exclude/kind filters leave no unit to select")
    ctx = OrderContext(rng=random.Random(config.seed), like=config.like)
    ordered = order.fn(candidates, ctx)
    if config.max_per_kind is not None:
        ordered = _cap_per_kind(ordered, config.max_per_kind)
    rule, value = config.size_rule
    chosen = SIZE_RULES[rule].take(ordered, value, order)
    return Selection(units=[SelectedUnit.from_unit(u) for u in chosen], policy=config.to_policy(),
                     structure_fingerprint=report.structure_fingerprint,
                     content_fingerprint=report.content_fingerprint, scan_options=dict(report.options),
                     total_params=sum(u.numel for u in chosen), count=len(chosen), notes=ctx.notes)


def _compile(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise KappaTuneError(f"pattern {pattern!r} is not a valid regular expression ({e})") from None


def _filter(units: list[UnitResult], cfg: SelectConfig) -> list[UnitResult]:
    inc, exc = [_compile(p) for p in cfg.include], [_compile(p) for p in cfg.exclude]
    for pats, what in ((inc, "include"), (exc, "exclude")):
        for p in pats:  # a pattern that matches nothing is an error, not silence
            if not any(p.fullmatch(u.name) for u in units):
                raise KappaTuneError(f"{what} pattern {p.pattern!r} matches no unit name (names are matched in "
                                     f"full, e.g. {units[0].name!r})")
    for vals, attr in ((cfg.kinds, "kind"), (cfg.groups, "group")):
        for v in vals:
            if not any(getattr(u, attr) == v for u in units):
                have = sorted({getattr(u, attr) for u in units})
                raise KappaTuneError(f"no unit has {attr} {v!r}; the report has: {', '.join(have)}")
    return [u for u in units
            if (not inc or any(p.fullmatch(u.name) for p in inc)) and not any(p.fullmatch(u.name) for p in exc)
            and (not cfg.kinds or u.kind in cfg.kinds) and (not cfg.groups or u.group in cfg.groups)]


def _cap_per_kind(ordered: list[UnitResult], cap: int) -> list[UnitResult]:
    seen: dict[str, int] = {}
    kept = []
    for u in ordered:
        if seen.get(u.kind, 0) < cap:
            kept.append(u)
            seen[u.kind] = seen.get(u.kind, 0) + 1
    return kept
