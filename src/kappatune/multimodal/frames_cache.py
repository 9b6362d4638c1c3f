"""The frozen encoder's output frames, kept on disk per clip so each clip is encoded once per encoder.

A cache folder holds one sub-folder per encoder and feature setting (``clips-<digest>``: the encoder's
weights, the mel window and the feature extractor's settings), and in it safetensors shards whose tensors are
named by the digest of a clip's *bytes*. Keying on content rather than on a manifest means a manifest that
grows (more renderings of the same sentences), a test set that is a subset of another, or the same WAV under
another path (a hard link, a copied folder) reuses the frames already computed, and only new clips are
encoded; an edited WAV has a new digest and is encoded again. Encoding adds a shard per ``SHARD_CLIPS``
clips, each written under a temporary name and renamed, so an interrupted run keeps its finished shards and
leaves no half-written one.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch

from ..hashing import tensor_hash

SHARD_CLIPS = 1000  # clips per shard (~0.35 GB of Whisper tiny frames at a 14 s window)


def frames_cache_dir() -> str:
    """Where encoder frames are cached: $KAPPATUNE_SPEECH_CACHE_DIR or ~/.cache/kappatune/speech-frames."""
    from ..paths import cache_dir

    return cache_dir("speech-frames", "KAPPATUNE_SPEECH_CACHE_DIR")


def encoder_folder(cache_dir: str, encoder, n_frames: int, extractor) -> str:
    """The sub-folder for this encoder's weights and this feature setting."""
    h = hashlib.sha256()
    for name, t in sorted(encoder.state_dict().items()):
        h.update(f"{name}={tensor_hash(t)}".encode())
    h.update(json.dumps([n_frames, extractor.feature_size, extractor.hop_length]).encode())
    return os.path.join(cache_dir, f"clips-{h.hexdigest()[:20]}")


def clip_digest(path: str) -> str:
    """The digest of a clip file's bytes (a WAV of a few seconds: hashing is far cheaper than encoding)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:32]


def load_cached(folder: str, digests: set[str]) -> dict[str, torch.Tensor]:
    """The frames of every clip in ``digests`` that some shard in ``folder`` holds."""
    from safetensors import safe_open

    found: dict[str, torch.Tensor] = {}
    if not os.path.isdir(folder):
        return found
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".safetensors"):
            continue  # temporary files of a run that was interrupted
        with safe_open(os.path.join(folder, name), framework="pt") as shard:
            for key in set(shard.keys()) & (digests - found.keys()):
                found[key] = shard.get_tensor(key)
    return found


def store(folder: str, frames: dict[str, torch.Tensor]) -> None:
    """Add one shard holding ``frames`` (digest -> frames); nothing is written for an empty dict."""
    from safetensors.torch import save_file

    if not frames:
        return
    os.makedirs(folder, exist_ok=True)
    name = hashlib.sha256("".join(sorted(frames)).encode()).hexdigest()[:16]
    path = os.path.join(folder, f"shard-{name}.safetensors")
    tmp = path + f".{os.getpid()}.tmp"
    try:
        save_file({k: v.contiguous() for k, v in frames.items()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
