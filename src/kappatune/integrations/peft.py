"""KappaTune-LoRA (paper section 4.3): LoRA adapters only on the lowest-kappa modules, rank raised so
that the trainable-parameter count matches a budget.

The target list is exact module names in ascending-kappa order (never a set), so the choice is
reproducible.
"""

from __future__ import annotations

import logging
import re

from ..errors import KappaTuneError
from ..report import KappaReport
from ..policies import select

log = logging.getLogger(__name__)


def match_rank(per_rank: int, budget: int) -> int:
    """LoRA rank whose parameter count (rank * per_rank) is closest to the budget (at least 1)."""
    return max(1, int(round(budget / per_rank)))


def kappatune_lora_config(report: KappaReport, *, budget_params: int, count: int | None = None,
                          top_p: float = 0.2, alpha_ratio: float = 2.0, dropout: float = 0.0,
                          fine_match: bool = True):
    """A PEFT ``LoraConfig`` on the ``count`` (or ``top_p``) lowest-kappa Linear-like modules, with the rank
    whose parameter count rank * sum(d_in + d_out) is closest to ``budget_params`` (``fine_match``: one rank more
    on the lowest-kappa modules through ``rank_pattern`` to land closer). Returns (config, info)."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise KappaTuneError("KappaTune-LoRA needs PEFT: pip install 'kappatune[peft]'") from None
    slices = [u for u in report.units if u.is_slice]
    candidates_exclude = [".*@.*"] if slices else None
    if slices:
        log.warning("KappaTune-LoRA: PEFT cannot put an adapter on one expert inside a fused parameter "
                    "(target_parameters adapts every expert of it); the %d expert slices are left out and "
                    "LoRA goes on the lowest-kappa other modules. Train experts with --method kappatune.",
                    len(slices))
    sel = select(report, count=count, top_p=None if count else top_p, exclude=candidates_exclude,
                 groups=None)
    mods = [u for u in sel.units if u.layout in ("linear", "conv1d_hf")]
    if not mods:
        raise KappaTuneError("no Linear module among the lowest-kappa units")
    per_rank = sum(u.shape[0] + u.shape[1] for u in mods)
    names = [u.param[: -len(".weight")] for u in mods]
    r = match_rank(per_rank, budget_params)
    expected = r * per_rank
    rank_pattern = {}
    if fine_match and budget_params > per_rank:
        # Per-module ranks: the floor rank everywhere, then one rank more on modules in kappa order while
        # that brings the count closer to the budget (PEFT rank_pattern). Lands within one module's
        # (d_in + d_out) of the budget instead of within one uniform rank step.
        r = budget_params // per_rank
        expected = r * per_rank
        for u, name in zip(mods, names):
            step = u.shape[0] + u.shape[1]
            if abs(budget_params - (expected + step)) < abs(budget_params - expected):
                rank_pattern[f"^{re.escape(name)}$"] = r + 1
                expected += step
    alpha_pattern = {k: alpha_ratio * v for k, v in rank_pattern.items()}
    cfg = LoraConfig(r=r, lora_alpha=alpha_ratio * r, lora_dropout=dropout, target_modules=names, bias="none",
                     task_type="CAUSAL_LM", rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    info = {"rank": r, "modules": len(names), "target_modules": names, "expected_params": expected,
            "rank_pattern": rank_pattern, "skipped_expert_slices": len(slices)}
    return cfg, info
