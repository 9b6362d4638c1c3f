"""Named settings for Algorithm 2 (``train-speech --recipe``): the paper's plain recipe, and the one measured
to make the LLM use the audio (docs/speech.md, "Making it listen").

A recipe only fills what the user did not set: an explicit option always wins. The library's dataclasses
(``SpeechRun``, ``SpeechTrainConfig``) keep the paper's values as their defaults; ``recipe_settings`` gives
the other recipe's values to pass to them."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import KappaTuneError


@dataclass(frozen=True)
class SpeechRecipe:
    lr: float                     # the selected LLM tensors
    adaptor_lr: float | None      # None: the LLM's rate
    batch_size: int
    warmup_steps: int
    ctc_weight: float             # auxiliary character CTC loss on the adaptor's outputs
    ctc_steps: int                # CTC-only adaptor steps before the LLM is involved
    adaptor_out_norm: bool        # outputs at the LLM's token-embedding scale
    adaptor_bridge: str           # 'chars': the LLM reads the CTC head's characters as its own embeddings


RECIPES: dict[str, SpeechRecipe] = {
    # section 4.4 as written: the adaptor's outputs go straight into the LLM, one loss
    "paper": SpeechRecipe(lr=1e-4, adaptor_lr=None, batch_size=4, warmup_steps=0, ctc_weight=0.0, ctc_steps=0,
                          adaptor_out_norm=False, adaptor_bridge="none"),
    # a CTC stage puts the audio's content into the adaptor (7 min on 2 cores), then the LLM reads it through
    # the character bridge: the only configuration measured so far whose LLM uses the audio (right-vs-wrong
    # audio gap 0.94 nats after 900 steps; 0.03 without the bridge from the same stage, ~0.06 for the paper's
    # recipe), forgetting a third as much at 300 steps; it does not transcribe yet (WER 1.07 after 900 steps)
    "listen": SpeechRecipe(lr=5e-4, adaptor_lr=1e-3, batch_size=8, warmup_steps=30, ctc_weight=1.0,
                           ctc_steps=3000, adaptor_out_norm=True, adaptor_bridge="chars"),
}
DEFAULT_RECIPE = "listen"


def recipe_settings(name: str, *, ctc_stage_from: str | None = None, **explicit) -> dict:
    """The recipe's settings with every ``explicit`` value that is not None put over them. A run that starts
    from another run's CTC stage (``ctc_stage_from``) trains no stage of its own unless told to."""
    if name not in RECIPES:
        raise KappaTuneError(f"unknown speech recipe {name!r}; choose from {', '.join(RECIPES)}")
    unknown = set(explicit) - set(asdict(RECIPES[name]))
    if unknown:
        raise KappaTuneError(f"not a recipe setting: {sorted(unknown)[0]}")
    out = asdict(RECIPES[name])
    if ctc_stage_from:
        out["ctc_steps"] = 0
    out.update({k: v for k, v in explicit.items() if v is not None})
    return out
