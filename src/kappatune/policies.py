"""Selection policies: which units to train, given a KappaReport.

Exactly one size rule: ``count`` (Algorithm 1's K), ``budget_params`` (units in order while the running
total stays within N parameters), ``top_p`` (a fraction of the candidate units, at least one) or
``threshold`` (kappa <= t for ``lowest``; kappa >= t for ``highest``).

Orders: ``lowest`` (KappaTune), ``highest`` (the paper's INVERSE ablation), ``random`` (seeded control),
``random-same-kind`` (seeded control drawn with the same mix of unit kinds as a reference selection
``like``: without it a KappaTune win could just mean "train v_proj"). Ties are broken by name.
"""

from __future__ import annotations

import random as _random
import re
from typing import Sequence

from .errors import KappaTuneError
from .report import KappaReport, Selection, UnitResult

ORDERS = ("lowest", "highest", "random", "random-same-kind")


def _compile(patterns: Sequence[str] | None, what: str) -> list[re.Pattern]:
    out = []
    for p in patterns or ():
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise KappaTuneError(f"{what} pattern {p!r} is not a valid regular expression ({e})") from None
    return out


def _filter(units: list[UnitResult], include, exclude, kinds, groups) -> list[UnitResult]:
    inc, exc = _compile(include, "include"), _compile(exclude, "exclude")
    for pats, what in ((inc, "include"), (exc, "exclude")):
        for p in pats:
            if not any(p.fullmatch(u.name) for u in units):
                raise KappaTuneError(f"{what} pattern {p.pattern!r} matches no unit name (names are matched in "
                                     f"full, e.g. {units[0].name!r})")
    for vals, attr in ((kinds, "kind"), (groups, "group")):
        for v in vals or ():
            if not any(getattr(u, attr) == v for u in units):
                have = sorted({getattr(u, attr) for u in units})
                raise KappaTuneError(f"no unit has {attr} {v!r}; the report has: {', '.join(have)}")
    out = []
    for u in units:
        if inc and not any(p.fullmatch(u.name) for p in inc):
            continue
        if any(p.fullmatch(u.name) for p in exc):
            continue
        if kinds and u.kind not in kinds:
            continue
        if groups and u.group not in groups:
            continue
        out.append(u)
    return out


def _parse_count(v, what: str) -> int:
    if isinstance(v, str):
        v = parse_size(v)
    if int(v) != v or v <= 0:
        raise KappaTuneError(f"{what} must be a positive integer, got {v}")
    return int(v)


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


def select(report: KappaReport, *, count: int | None = None, budget_params: int | str | None = None,
           top_p: float | None = None, threshold: float | None = None, order: str = "lowest", seed: int = 0,
           include: Sequence[str] | None = None, exclude: Sequence[str] | None = None,
           kinds: Sequence[str] | None = None, groups: Sequence[str] | None = None,
           max_per_kind: int | None = None, like: Selection | None = None,
           allow_singular: bool = False) -> Selection:
    """Choose units from ``report`` (see the module docstring for the rules)."""
    sizes = [x is not None for x in (count, budget_params, top_p, threshold)]
    if order == "random-same-kind" and like is not None and not any(sizes):
        count = len(like.units)  # default: as many units as the reference
        sizes = [True]
    if sum(sizes) != 1:
        raise KappaTuneError("give exactly one of count, budget_params, top_p, threshold")
    if order not in ORDERS:
        raise KappaTuneError(f"unknown order {order!r}; choose one of {', '.join(ORDERS)}")
    ok = {"ok", "singular"} if allow_singular else {"ok"}
    candidates = [u for u in report.units if u.status in ok]
    if not candidates:
        raise KappaTuneError("the report has no unit with a finite kappa to select from")
    candidates = _filter(candidates, include, exclude, kinds, groups)
    if not candidates:
        raise KappaTuneError("the include/exclude/kind filters leave no unit to select")
    rng = _random.Random(seed)
    notes: list[str] = []
    if order == "lowest":
        ordered = sorted(candidates, key=lambda u: (u.kappa, u.name))
    elif order == "highest":
        ordered = sorted(candidates, key=lambda u: (-u.kappa, u.name))
    elif order == "random":
        ordered = sorted(candidates, key=lambda u: u.name)
        rng.shuffle(ordered)
    else:
        if like is None:
            raise KappaTuneError("order 'random-same-kind' needs a reference selection (like=...)")
        ordered = _same_kind_order(candidates, like, rng, notes)
    if max_per_kind is not None:
        seen: dict[str, int] = {}
        kept = []
        for u in ordered:
            if seen.get(u.kind, 0) < max_per_kind:
                kept.append(u)
                seen[u.kind] = seen.get(u.kind, 0) + 1
        ordered = kept

    total_available = sum(u.numel for u in ordered)
    if count is not None:
        count = _parse_count(count, "count")
        if count > len(ordered):
            raise KappaTuneError(f"count {count} is larger than the {len(ordered)} units available")
        chosen = ordered[:count]
    elif budget_params is not None:
        budget = _parse_count(budget_params, "budget_params")
        if budget > total_available:
            raise KappaTuneError(f"budget of {budget:,} parameters is larger than the {total_available:,} "
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
    elif top_p is not None:
        if not 0 < top_p <= 1:
            raise KappaTuneError(f"top_p must be in (0, 1], got {top_p}")
        chosen = ordered[: max(1, int(len(ordered) * top_p))]
    else:
        if order == "lowest":
            chosen = [u for u in ordered if u.kappa <= threshold]
        elif order == "highest":
            chosen = [u for u in ordered if u.kappa >= threshold]
        else:
            raise KappaTuneError("threshold applies to the lowest or highest order only")
        if not chosen:
            raise KappaTuneError(f"no unit passes the kappa threshold {threshold}")
    policy = {"order": order, "count": count, "budget_params": budget_params, "top_p": top_p,
              "threshold": threshold, "seed": seed if order.startswith("random") else None,
              "include": list(include or []), "exclude": list(exclude or []), "kinds": list(kinds or []),
              "groups": list(groups or []), "max_per_kind": max_per_kind, "allow_singular": allow_singular,
              "like": like.policy if like is not None else None}
    units = [{"name": u.name, "param": u.param, "kind": u.kind, "group": u.group, "layer": u.layer,
              "layout": u.layout, "kappa": u.kappa, "numel": u.numel, "shape": list(u.shape),
              "expert": u.expert, "half": u.half, "param_rows": list(u.param_rows) if u.param_rows else None}
             for u in chosen]
    return Selection(units=units, policy=policy, structure_fingerprint=report.structure_fingerprint,
                     content_fingerprint=report.content_fingerprint, scan_options=dict(report.options),
                     total_params=sum(u.numel for u in chosen), count=len(chosen), notes=notes)


def _same_kind_order(candidates: list[UnitResult], like: Selection, rng: _random.Random,
                     notes: list[str]) -> list[UnitResult]:
    """Random order whose first len(like) entries repeat the reference's kind mix, layer bands kept close.

    For each reference unit (in its order) draw an unused candidate of the same kind, preferring the same
    layer third of the network; the rest of the candidates follow in random order.
    """
    by_kind: dict[str, list[UnitResult]] = {}
    for u in sorted(candidates, key=lambda u: u.name):
        by_kind.setdefault(u.kind, []).append(u)
    for v in by_kind.values():
        rng.shuffle(v)
    layers = [u.layer for u in candidates if u.layer is not None]
    n_layers = (max(layers) + 1) if layers else 1

    def band(layer):
        return None if layer is None else (3 * layer) // max(n_layers, 1)

    used: set[str] = set()
    head: list[UnitResult] = []
    for ref in like.units:
        pool = [u for u in by_kind.get(ref["kind"], []) if u.name not in used]
        if not pool:
            notes.append(f"no unused unit of kind {ref['kind']!r} left; the kind mix differs from the reference")
            continue
        same_band = [u for u in pool if band(u.layer) == band(ref.get("layer"))]
        pick = (same_band or pool)[0]
        used.add(pick.name)
        head.append(pick)
    tail = [u for u in sorted(candidates, key=lambda u: u.name) if u.name not in used]
    rng.shuffle(tail)
    return head + tail
