"""An optional first stage for the adaptor alone (``--ctc-steps``): character CTC on its outputs, no LLM.

Why: with the LLM's loss only, the adaptor first learns a style prefix ("a sentence follows") and takes
thousands of steps to carry the audio's content (issue 15's measurements). The CTC loss asks for the content
directly, and a step without the LLM's forward and backward costs a small fraction of a full step, so many
such steps fit before the LLM is involved. The stage's result is written next to the run (``ctc_stage.*``)
so a rerun of the same command skips it, and other runs can start from it (``--ctc-stage-from``: the arms of an
ablation then share one starting adaptor, and the stage is paid once). The record holds a fingerprint of what
the stage's weights depend on (the adaptor's structure, the encoder and its window, the LLM whose embedding
scale the output norm starts at), so a stage is never loaded into a run it does not fit.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Callable

import torch

from .._io import atomic_write_json
from ..errors import KappaTuneError
from .adaptor import pad_frames

log = logging.getLogger(__name__)

STAGE_WEIGHTS = "ctc_stage.safetensors"
STAGE_RECORD = "ctc_stage.json"
STAGE_LOG_EVERY = 50  # steps between logged losses (and the grid a probe runs on)


def ctc_pretrain(adaptor, frames: list[torch.Tensor], char_ids: list[list[int]], *, steps: int, lr: float,
                 batch_size: int, seed: int, log_every: int = STAGE_LOG_EVERY,
                 probe: Callable[[], dict] | None = None,
                 probe_every: int = 0,
                 augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None) -> list[dict]:
    """``steps`` AdamW steps of the adaptor (and its CTC head) on the CTC loss alone, batches drawn with a
    seeded generator, linear warmup over the first tenth then linear decay; returns the logged losses.

    ``probe`` (e.g. the head's reading of held-out clips, ``speech_train.ctc_reading``) is called every
    ``probe_every`` steps (a multiple of ``log_every``) and at the last step, its figures (and its time,
    ``probe_s``) added to that step's entry: the stage's learning curve on data it does not train on. It runs
    with the RNG state forked and the adaptor put back in training mode after it, so probing cannot change
    the trained weights.

    ``augment`` (e.g. ``mask_frames``) returns a training copy of one clip's frames, drawing from the stage's
    generator; the cached frames themselves are never changed."""
    if adaptor.ctc_head is None:
        raise ValueError("the adaptor has no CTC head")
    if probe is not None and (probe_every <= 0 or probe_every % log_every):
        raise ValueError(f"probe_every ({probe_every}) must be a positive multiple of log_every ({log_every})")
    params = [p for p in adaptor.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
    gen = torch.Generator().manual_seed(seed)
    was_training = adaptor.training
    adaptor.train()
    history, running = [], 0.0
    try:
        for step in range(1, steps + 1):
            idx = torch.randint(len(frames), (batch_size,), generator=gen).tolist()
            clips = [frames[i] if augment is None else augment(frames[i], gen) for i in idx]
            out, out_lens = adaptor(*pad_frames(clips))
            loss = adaptor.ctc_head.loss(out, out_lens, [char_ids[i] for i in idx])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            running += float(loss.detach())
            if step % log_every == 0 or step == steps:
                n = log_every if step % log_every == 0 else step % log_every
                entry = {"step": step, "ctc_loss": running / n}
                probed = _run_probe(probe, adaptor) if probe is not None and (
                    step % probe_every == 0 or step == steps) else {}
                history.append({**entry, **probed})
                shown = "".join(f", {k.replace('_', ' ')} {v:.3f}" for k, v in probed.items()
                                if isinstance(v, float) and k != "probe_s")
                log.info("CTC stage step %d/%d: loss %.3f%s", step, steps, running / n, shown)
                running = 0.0
    finally:
        adaptor.train(was_training)
    return history


def mask_frames(frames: torch.Tensor, gen: torch.Generator, *, time_masks_per_s: float = 1.0,
                max_time: int = 10, channel_masks: int = 2, max_channels: int = 40,
                frames_per_s: float = 50.0) -> torch.Tensor:
    """A masked copy of one clip's (T, dim) encoder frames, SpecAugment's idea applied after the frozen encoder:
    spans of up to ``max_time`` frames (``time_masks_per_s`` per second of audio) and ``channel_masks`` bands
    of up to ``max_channels`` channels set to zero. Why: a long CTC stage memorises its clips (docs/speech.md)
    and the frames are cached, so masking them is the cheap way to vary the data. Drawn from the stage's own
    generator, the masks shift the batch draws that follow: a masked stage sees other batches of the same
    clips, not the unmasked stage's batches."""
    out = frames.clone()
    t, dim = out.shape
    n_time = int(round(time_masks_per_s * t / frames_per_s))
    for _ in range(n_time):
        width = int(torch.randint(0, max_time + 1, (1,), generator=gen))
        start = int(torch.randint(0, max(1, t - width + 1), (1,), generator=gen))
        out[start:start + width] = 0
    for _ in range(channel_masks):
        width = int(torch.randint(0, max_channels + 1, (1,), generator=gen))
        start = int(torch.randint(0, max(1, dim - width + 1), (1,), generator=gen))
        out[:, start:start + width] = 0
    return out


def _run_probe(probe: Callable[[], dict], adaptor) -> dict:
    """``probe()``'s figures and its time; the RNG state and the adaptor's training mode are restored, so the
    steps after it draw and behave as if it had not run."""
    t0 = time.perf_counter()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        figures = probe()
    adaptor.train()
    return {**figures, "probe_s": time.perf_counter() - t0}


def stage_record(out_dir: str) -> dict | None:
    path = os.path.join(out_dir, STAGE_RECORD)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def require_stage(folder: str, expected: dict | None = None) -> dict:
    """The record of the finished stage in ``folder``, checked against the ``expected`` fingerprint entries
    (only the keys given: what is known before the models load, so a wrong --ctc-stage-from fails at once);
    a one-line KappaTuneError naming the first difference."""
    record = stage_record(folder) if os.path.isdir(folder) else None
    if record is None or not os.path.exists(os.path.join(folder, STAGE_WEIGHTS)):
        raise KappaTuneError(f"{folder}: no finished CTC stage ({STAGE_RECORD} and {STAGE_WEIGHTS}); run "
                             f"train-speech there with --ctc-steps first")
    _check_fingerprint(folder, record.get("fingerprint", {}), expected or {})
    return record


def _check_fingerprint(folder: str, saved: dict, expected: dict) -> None:
    for key in sorted(expected):
        if saved.get(key) != expected[key]:
            raise KappaTuneError(f"the CTC stage in {folder} was trained with {key}={saved.get(key)!r}, this run "
                                 f"has {key}={expected[key]!r}")


def load_ctc_stage(adaptor, folder: str, fingerprint: dict) -> dict:
    """Load the stage saved in ``folder`` into ``adaptor`` after checking that it was trained for this run's
    adaptor, encoder and LLM (every key of either fingerprint); returns its record."""
    from safetensors.torch import load_file

    record = require_stage(folder)
    saved = record.get("fingerprint", {})
    _check_fingerprint(folder, saved, {k: fingerprint.get(k) for k in set(saved) | set(fingerprint)})
    adaptor.load_state_dict(load_file(os.path.join(folder, STAGE_WEIGHTS)))
    return record


def run_ctc_stage(adaptor, frames, char_ids, out_dir: str, *, steps: int, lr: float, batch_size: int,
                  seed: int, fingerprint: dict | None = None, probe: Callable[[], dict] | None = None,
                  probe_every: int = 0) -> dict:
    """The stage once per output folder: trained and saved, or the saved result loaded into ``adaptor``
    (``probe``: as in ``ctc_pretrain``)."""
    from safetensors.torch import save_file

    fingerprint = fingerprint or {}
    if stage_record(out_dir) is not None:
        return load_ctc_stage(adaptor, out_dir, fingerprint)
    t0 = time.perf_counter()
    history = ctc_pretrain(adaptor, frames, char_ids, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                           probe=probe, probe_every=probe_every)
    res = {"steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed, "clips": len(frames),
           "wall_s": time.perf_counter() - t0, "fingerprint": fingerprint, "history": history}
    weights = os.path.join(out_dir, STAGE_WEIGHTS)
    tmp = weights + ".tmp"
    save_file({k: v.detach().contiguous() for k, v in adaptor.state_dict().items()}, tmp)
    os.replace(tmp, weights)
    atomic_write_json(os.path.join(out_dir, STAGE_RECORD), res)  # written last: the stage's done marker
    return res
