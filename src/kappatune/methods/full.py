"""Full fine-tuning: every parameter trains (the reference for how much a method forgets)."""

from __future__ import annotations

from .base import Method, Prepared, register, trainable_summary


def _prepare(model, ctx, cfg) -> Prepared:
    for p in model.parameters():
        p.requires_grad_(True)
    return Prepared(model, trainable_summary(model), None, {}, may_change=None)


register(Method("full", _prepare, "every parameter trains (no budget)", needs_budget=False, family="full"))
