"""What the PEFT adapter methods besides plain LoRA share: the rank that meets ``TrainConfig.budget_params``
given how a method counts its trainable parameters, and the LoRA-variant wrap (``pissa``, ``mica``, ``dora``,
``corda-kpm``; ``osf`` uses the rank matching only).

Every method here states its trainable count as ``rank * per_rank + fixed`` (summed over the target modules),
picks the rank whose count is closest to the budget (``match_rank``, as ``lora`` does), and, after PEFT has
built the model, compares that prediction with what PEFT actually made trainable (``info["expected_params"]``
and ``info["trainable_params"]``; a mismatch is logged, it means the accounting below is out of date).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import KappaTuneError
from ..integrations.peft import match_rank
from .base import Prepared
from .lora import lora_alpha, lora_modules, wrap

log = logging.getLogger(__name__)

DEFAULT_RANK = 16  # without a budget or --lora-rank (the same default as ``lora``)


@dataclass(frozen=True)
class RankCost:
    """Trainable parameters of one target module at rank r: ``r * per_rank + fixed``; ``max_rank``: the largest
    rank the method can give this module (SVD-based inits cannot exceed min(d_in, d_out))."""

    per_rank: int
    fixed: int = 0
    max_rank: int | None = None


def need_peft():
    try:
        import peft
    except ImportError:
        raise KappaTuneError("PEFT adapter methods need PEFT: pip install 'kappatune[peft]'") from None
    return peft


def rank_for_budget(method: str, cfg, costs: list[RankCost]) -> tuple[int, dict]:
    """The rank for ``costs`` (one per target module): ``cfg.lora_rank`` when set, else the rank whose count is
    closest to ``cfg.budget_params`` (16 without a budget), lowered to the largest rank every module allows.
    Returns (rank, info with the accounting)."""
    per_rank = sum(c.per_rank for c in costs)
    fixed = sum(c.fixed for c in costs)
    caps = [c.max_rank for c in costs if c.max_rank is not None]
    cap = min(caps) if caps else None
    if cap is not None and cap < 1:
        raise KappaTuneError(f"{method}: a target module is too small for even rank 1")
    if cfg.lora_rank:
        r = int(cfg.lora_rank)
        if cap is not None and r > cap:
            raise KappaTuneError(f"{method}: --lora-rank {r} is above {cap}, the largest rank its target modules "
                                 f"allow (min(d_in, d_out) of the smallest one)")
    elif cfg.budget_params:
        # closest rank to the budget once the rank-independent parameters (DoRA magnitudes) are paid for
        r = match_rank(per_rank, max(int(cfg.budget_params) - fixed, 1))
    else:
        r = DEFAULT_RANK
    info = {"rank": r, "rank_step_params": per_rank, "fixed_params": fixed, "budget_params": cfg.budget_params}
    if cap is not None and r > cap:
        log.warning("%s: the budget asks for rank %d but the smallest target module allows %d; using %d "
                    "(%d trainable parameters instead of ~%s)", method, r, cap, cap, cap * per_rank + fixed,
                    cfg.budget_params)
        info["rank_capped_from"] = r
        r = info["rank"] = cap
    info["expected_params"] = r * per_rank + fixed
    return r, info


def checked(prep: Prepared, method: str) -> Prepared:
    """Log when PEFT made a different number of parameters trainable than the method's accounting predicted."""
    got, want = prep.summary.trainable_params, prep.info.get("expected_params")
    if want is not None and got != want:
        log.warning("%s: PEFT made %d parameters trainable, the budget accounting predicted %d", method, got, want)
    return prep


def lora_variant(model, cfg, method: str, cost: Callable[[torch.nn.Linear], RankCost], *,
                 before_wrap: Callable[[torch.nn.Module, object], dict] | None = None, **lora_kwargs) -> Prepared:
    """A PEFT LoRA variant on ``cfg.lora_targets`` of every layer, its rank matched to the budget.

    ``cost``: the RankCost of one target module; ``lora_kwargs``: the variant's LoraConfig fields
    (``init_lora_weights``, ``use_dora``, ``corda_config``, ...); ``before_wrap(model, lora_config)``: work that
    must happen on the base model before PEFT wraps it (CorDA's covariance pass), returning facts for ``info``.
    """
    peft = need_peft()
    mods = lora_modules(model, cfg.lora_targets)
    r, info = rank_for_budget(method, cfg, [cost(m) for _, m in mods])
    lcfg = peft.LoraConfig(r=r, lora_alpha=lora_alpha(cfg, r), lora_dropout=cfg.lora_dropout,
                           target_modules=list(cfg.lora_targets), bias="none", task_type="CAUSAL_LM", **lora_kwargs)
    info.update(alpha=lcfg.lora_alpha, modules=len(mods), targets=list(cfg.lora_targets))
    if before_wrap is not None:
        info.update(before_wrap(model, lcfg) or {})
    return checked(wrap(model, lcfg, info), method)


def lora_cost(m: torch.nn.Linear, *, svd: bool = False) -> RankCost:
    """Plain LoRA accounting: A (r x d_in) and B (d_out x r) both train; SVD-based inits cap r at min(d_in, d_out)."""
    return RankCost(m.in_features + m.out_features, 0, min(m.in_features, m.out_features) if svd else None)
