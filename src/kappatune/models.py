"""Loading a causal LM and its tokenizer for training and evaluation."""

from __future__ import annotations

import os

import torch

from .errors import KappaTuneError


def load_model(path: str, dtype: torch.dtype = torch.float32, *, revision: str | None = None):
    """A causal LM and its tokenizer from a local folder, a Hub id ``org/name`` (at ``revision``), or
    ``smollm2`` (the built-in demo model). Weights load from safetensors only: a pickle is never loaded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .data import resolve_model

    path = resolve_model(path, revision)
    if not os.path.isdir(path):
        raise KappaTuneError(f"{path}: not a model folder (expected config.json + safetensors; "
                             f"a Hub id org/name, or 'smollm2' for the built-in SmolLM2-135M)")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise KappaTuneError(f"{path}: no config.json in the model folder")
    if not any(f.endswith(".safetensors") for f in os.listdir(path)):
        raise KappaTuneError(f"{path}: no safetensors weights in the model folder (kappatune never loads pickled "
                             f".bin/.pt weights)")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise KappaTuneError(f"{path}: cannot load a tokenizer ({' '.join(str(e).split())[:200]})") from None
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok
