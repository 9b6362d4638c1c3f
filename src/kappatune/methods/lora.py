"""LoRA methods at a matched budget: ``lora`` (PEFT LoRA on the usual projections of every layer) and
``kappatune-lora`` (the paper's section 4.3: LoRA only on the lowest-kappa modules).

Both are PEFT wrappers: after training the adapter is merged (``merge_and_unload``), and the recipe proves that
only the weights of adapted modules moved.
"""

from __future__ import annotations

import torch

from ..errors import KappaTuneError
from ..integrations.peft import kappatune_lora_config, match_rank
from .base import Method, Prepared, register, trainable_summary

LORA_DEFAULT_TARGETS = ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj")


def lora_modules(model, targets) -> list[tuple[str, torch.nn.Module]]:
    """The Linear modules whose last name component is one of ``targets``, in model order."""
    mods = [(n, m) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets]
    if not mods:
        raise KappaTuneError(f"no Linear module named {', '.join(targets)} in this model")
    return mods


def adapted_weights(peft_model) -> set[str]:
    """Names, in the merged model, of the weights PEFT adapters sit on (the only tensors merging changes)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    prefix = "base_model.model."
    out = set()
    for n, m in peft_model.named_modules():
        if isinstance(m, BaseTunerLayer):
            # nested wrappers (several fused MoE parameters of one module) sit at ...base_layer.base_layer
            base = n[len(prefix):] if n.startswith(prefix) else n
            base = ".".join(p for p in base.split(".") if p != "base_layer")
            out.add(f"{base}.{getattr(m, 'parameter_name', None) or 'weight'}")
    return out


def wrap(model, lora_config, info: dict) -> Prepared:
    """``get_peft_model`` + the Prepared a PEFT method returns (trainable summary, what may change)."""
    from peft import get_peft_model

    pm = get_peft_model(model, lora_config)
    summary = trainable_summary(pm)
    info = dict(info, trainable_params=summary.trainable_params)
    return Prepared(pm, summary, None, info, is_peft=True, may_change=adapted_weights(pm))


def _peft():
    try:
        import peft
    except ImportError:
        raise KappaTuneError("LoRA methods need PEFT: pip install 'kappatune[peft]'") from None
    return peft


def lora_alpha(cfg, rank: int) -> float:
    """The LoRA alpha at ``rank``: the fixed ``cfg.lora_alpha`` if set, else ``lora_alpha_ratio * rank`` (equal
    scaling alpha / r at every rank, so two placements at different ranks take updates of the same scale)."""
    return float(cfg.lora_alpha) if cfg.lora_alpha is not None else cfg.lora_alpha_ratio * rank


def _lora(model, ctx, cfg) -> Prepared:
    peft = _peft()
    mods = lora_modules(model, cfg.lora_targets)
    per_rank = sum(m.in_features + m.out_features for _, m in mods)
    r = cfg.lora_rank or (match_rank(per_rank, cfg.budget_params) if cfg.budget_params else 16)
    lcfg = peft.LoraConfig(r=r, lora_alpha=lora_alpha(cfg, r), lora_dropout=cfg.lora_dropout,
                           target_modules=list(cfg.lora_targets), bias="none", task_type="CAUSAL_LM")
    return wrap(model, lcfg, {"rank": r, "alpha": lcfg.lora_alpha, "modules": len(mods)})


def _kappatune_lora(model, ctx, cfg) -> Prepared:
    _peft()
    if cfg.budget_params is None:
        raise KappaTuneError("kappatune-lora needs budget_params")
    lcfg, info = kappatune_lora_config(ctx.report(), budget_params=cfg.budget_params, count=cfg.lora_count,
                                       alpha_ratio=cfg.lora_alpha_ratio, dropout=cfg.lora_dropout)
    if cfg.lora_rank:
        lcfg.r, lcfg.lora_alpha = cfg.lora_rank, lora_alpha(cfg, cfg.lora_rank)
        info["rank"] = cfg.lora_rank
    if cfg.lora_alpha is not None:  # one alpha everywhere, the modules with one rank more included
        lcfg.lora_alpha = float(cfg.lora_alpha)
        lcfg.alpha_pattern = {k: float(cfg.lora_alpha) for k in lcfg.rank_pattern}
    info["alpha"] = lcfg.lora_alpha
    return wrap(model, lcfg, info)


register(Method("lora", _lora, "PEFT LoRA on --lora-targets of every layer, rank matched to the budget",
                family="adapter"))
register(Method("kappatune-lora", _kappatune_lora, "LoRA only on the lowest-kappa modules (paper section "
                "4.3), rank matched to the budget", family="adapter"))
