"""``pissa``: LoRA initialised from the principal singular directions of each target weight (PiSSA).

PEFT (``init_lora_weights="pissa"``) puts the top-r singular triplets of W into A and B and subtracts them from
the base weight (the *residual*), so the model computes the same function at step 0 but training moves the
principal directions. Trainable: A and B, r * (d_in + d_out) per module, the same count as ``lora``; the rank is
matched to the budget the same way and capped at min(d_in, d_out). After training the adapter is merged back
(``merge_and_unload``), so the saved model is plain; only the adapted weights differ from the original (and they
differ even at step 0 by float round-off of residual + B A), every other tensor is bit-identical.
"""

from __future__ import annotations

from functools import partial

from .base import Method, Prepared, register
from .lora_variants import lora_cost, lora_variant


def _prepare(model, ctx, cfg) -> Prepared:
    return lora_variant(model, cfg, "pissa", partial(lora_cost, svd=True), init_lora_weights="pissa")


register(Method("pissa", _prepare, "LoRA from the principal singular directions (PiSSA, residual base), rank "
                "matched to the budget", family="adapter"))
