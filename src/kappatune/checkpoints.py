"""Resumable training state on disk: finding the last complete checkpoint, loading its weights, and
swapping a finished output folder into place atomically."""

from __future__ import annotations

import os
import shutil

from .errors import KappaTuneError


def last_good_checkpoint(ckpt_dir: str) -> str | None:
    """The newest checkpoint folder that finished writing (trainer_state.json, weights, optimizer)."""
    if not os.path.isdir(ckpt_dir):
        return None
    cands = []
    for d in os.listdir(ckpt_dir):
        if d.startswith("checkpoint-") and d[len("checkpoint-"):].isdigit():
            p = os.path.join(ckpt_dir, d)
            files = set(os.listdir(p))
            has_w = any(f.endswith(".safetensors") or f.endswith(".bin") for f in files)
            if "trainer_state.json" in files and has_w and "optimizer.pt" in files:
                cands.append((int(d[len("checkpoint-"):]), p))
    return max(cands)[1] if cands else None


def checkpoint_step(path: str | None) -> int:
    """The optimizer step a ``checkpoint-N`` folder was saved at (0 for None)."""
    return int(path.rsplit("-", 1)[-1]) if path else 0


def load_checkpoint_weights(model, folder: str) -> None:
    """Load a Trainer checkpoint's weights through ``from_pretrained``, which converts the checkpoint's
    unfused MoE experts back into the fused in-memory parameters. (The Trainer's own resume loads the raw
    state dict and, in transformers 5.x, silently leaves fused experts at their initial values.)"""
    ck = type(model).from_pretrained(folder, dtype=next(model.parameters()).dtype)
    missing, _ = model.load_state_dict(ck.state_dict(), strict=False)
    if missing:
        raise KappaTuneError(f"checkpoint {folder} lacks {len(missing)} weights, e.g. {missing[0]}")
    del ck


def replace_dir(src: str, dst: str) -> None:
    """Move a fully written folder ``src`` to ``dst``, replacing what was there (no half-written ``dst``)."""
    old = dst + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(dst):
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def save_folder(dst: str, write) -> None:
    """Write a folder through ``write(tmp_path)`` into a temporary sibling, then swap it into ``dst``."""
    tmp = os.path.join(os.path.dirname(dst) or ".", "." + os.path.basename(dst) + "-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    replace_dir(tmp, dst)
