"""Loading a causal LM and its tokenizer for training and evaluation."""

from __future__ import annotations

import os

import torch

from .errors import KappaTuneError


def load_model(path: str, dtype: torch.dtype = torch.float32):
    """A causal LM and its tokenizer from a local folder; ``smollm2`` names the built-in demo model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .data import resolve_model

    path = resolve_model(path)
    if not os.path.isdir(path):
        raise KappaTuneError(f"{path}: not a model folder (expected config.json + safetensors; "
                             f"use 'smollm2' for the built-in SmolLM2-135M)")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise KappaTuneError(f"{path}: no config.json in the model folder")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise KappaTuneError(f"{path}: cannot load a tokenizer ({' '.join(str(e).split())[:200]})") from None
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok
