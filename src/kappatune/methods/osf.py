"""``osf``: orthogonal subspace fine-tuning (PEFT ``OSFConfig``).

OSF takes the SVD of each target weight, W = U S V^T, freezes the top ``effective_rank`` singular triplets (the
directions that carry what the model already knows) and trains the remaining ones, U_low (d_out x t), S_low (t)
and V_low (t x d_in), with their gradients projected orthogonal to the frozen subspace. With t = min(d_in, d_out)
- effective_rank the trainable count of a module is t * (d_in + d_out + 1), so we choose one trainable rank t for
every module (matched to the budget like LoRA's rank; ``--lora-rank`` sets it directly) and give each module its
own ``effective_rank`` = min(d_in, d_out) - t through ``rank_pattern``. t is capped at min(d_in, d_out) - 1 (PEFT
needs at least one preserved direction).

The targets are ``--lora-targets`` of every layer, like ``lora``. PEFT's ``merge_and_unload`` adds the trained
low-rank part's change (U_low S_low V_low minus its initial value) to each adapted weight and returns the plain
model, so the recipe saves and proves it like any other adapter method.
"""

from __future__ import annotations

import re

from .base import Method, Prepared, register
from .lora import lora_modules, wrap
from .lora_variants import RankCost, checked, need_peft, rank_for_budget


def osf_cost(m) -> RankCost:
    return RankCost(m.in_features + m.out_features + 1, 0, min(m.in_features, m.out_features) - 1)


def _prepare(model, ctx, cfg) -> Prepared:
    peft = need_peft()
    mods = lora_modules(model, cfg.lora_targets)
    t, info = rank_for_budget("osf", cfg, [osf_cost(m) for _, m in mods])
    names = [n for n, _ in mods]
    # one pattern per module (exact name): PEFT takes the first pattern that matches, so none may be a prefix
    preserved = {f"^{re.escape(n)}$": min(m.in_features, m.out_features) - t for n, m in mods}
    ocfg = peft.OSFConfig(target_modules=names, rank_pattern=preserved, task_type="CAUSAL_LM")
    info.update(trainable_rank=t, modules=len(mods), targets=list(cfg.lora_targets),
                effective_rank={"min": min(preserved.values()), "max": max(preserved.values())})
    return checked(wrap(model, ocfg, info), "osf")


register(Method("osf", _prepare, "orthogonal subspace fine-tuning (OSF): train the minor SVD subspace of "
                "--lora-targets, trainable rank matched to the budget", family="adapter"))
