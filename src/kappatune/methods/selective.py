"""Selective methods (Algorithm 1 and its controls): train whole tensors chosen from the kappa report.

One method per selection order of ``kappatune.policies`` (a new order registered there becomes a training
method here without touching this file): ``kappatune`` = lowest kappa, ``highest-kappa`` (the paper's
INVERSE ablation), ``random``, ``random-same-kind`` (random with the kappatune choice's kind mix), and any
other order ``X`` as ``X-kappa``.
"""

from __future__ import annotations

from ..errors import KappaTuneError
from ..freeze import apply
from ..policies import ORDERS, select
from ..report import KappaReport, Selection
from .base import Method, Prepared, register

# method name -> order; orders not listed here are registered as "<order>-kappa"
NAMED_ORDERS = {"lowest": "kappatune", "highest": "highest-kappa", "random": "random",
                "random-same-kind": "random-same-kind"}


def selection_for(report: KappaReport, order: str, *, budget_params: int, seed: int = 0,
                  include=(), exclude=()) -> Selection:
    """The units one selective method trains: ``order`` within ``budget_params`` (random-same-kind draws the
    kind mix of the lowest-kappa choice at the same budget)."""
    kw = dict(budget_params=budget_params, seed=seed, include=list(include) or None,
              exclude=list(exclude) or None)
    like = select(report, order="lowest", **kw) if order == "random-same-kind" else None
    return select(report, order=order, like=like, **kw)


def method_name(order: str) -> str:
    return NAMED_ORDERS.get(order, f"{order}-kappa")


def order_of(method: str) -> str | None:
    """The selection order a selective method trains by (None for other methods)."""
    return next((o for o in ORDERS if method_name(o) == method), None)


def _prepare_for(order: str):
    def prepare(model, ctx, cfg) -> Prepared:
        if cfg.budget_params is None:
            raise KappaTuneError(f"method {cfg.method!r} needs budget_params")
        sel = selection_for(ctx.report(), order, budget_params=cfg.budget_params, seed=cfg.seed,
                            include=cfg.include, exclude=cfg.exclude)
        handle = apply(model, sel)
        return Prepared(model, handle, sel, {"order": order}, may_change=set(handle.trainable_names))
    return prepare


for _order in ORDERS:
    register(Method(method_name(_order), _prepare_for(_order), f"whole tensors in {_order!r} kappa order "
                    f"within the parameter budget"))
