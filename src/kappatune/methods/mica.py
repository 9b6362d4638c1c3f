"""``mica``: LoRA on the minor singular directions of each target weight (MiCA).

PEFT (``init_lora_weights="mica"``) sets B to the r left singular vectors of W with the smallest singular values
and *freezes* it; A starts at zero and is the only thing that trains, so the update B A lives in the span of W's
minor output directions and the base weight is not modified at init. Trainable: A alone, r * d_in per module, so
at the same budget MiCA gets a higher rank than ``lora`` (rank step = the sum of d_in over the targets). The rank
is capped at min(d_in, d_out) (there are no more singular vectors). Merged with ``merge_and_unload`` after training.
"""

from __future__ import annotations

import torch

from .base import Method, Prepared, register
from .lora_variants import RankCost, lora_variant


def mica_cost(m: torch.nn.Linear) -> RankCost:
    return RankCost(m.in_features, 0, min(m.in_features, m.out_features))  # only A (r x d_in) trains


def _prepare(model, ctx, cfg) -> Prepared:
    return lora_variant(model, cfg, "mica", mica_cost, init_lora_weights="mica")


register(Method("mica", _prepare, "LoRA on the minor singular directions (MiCA: B frozen, A trains), rank "
                "matched to the budget", family="adapter"))
