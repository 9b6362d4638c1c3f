"""``dora``: weight-decomposed LoRA (DoRA, PEFT ``use_dora=True``).

Each target weight is split into a magnitude (one scale per output row) and a direction; LoRA updates the
direction and the magnitude vector trains as well. Trainable per module: r * (d_in + d_out) + d_out, so the
budget is matched after paying for the magnitudes: rank = round((budget - sum d_out) / sum(d_in + d_out)).
Merged with ``merge_and_unload`` after training (only the adapted weights change).
"""

from __future__ import annotations

import torch

from .base import Method, Prepared, register
from .lora_variants import RankCost, lora_variant


def dora_cost(m: torch.nn.Linear) -> RankCost:
    return RankCost(m.in_features + m.out_features, m.out_features)  # A, B, and the magnitude vector


def _prepare(model, ctx, cfg) -> Prepared:
    return lora_variant(model, cfg, "dora", dora_cost, use_dora=True)


register(Method("dora", _prepare, "weight-decomposed LoRA (DoRA), rank matched to the budget including the "
                "magnitude vectors", family="adapter"))
