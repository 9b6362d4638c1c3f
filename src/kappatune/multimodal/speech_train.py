"""Algorithm 2 as a recipe: a manifest of (audio, text) -> frozen Whisper encoder -> adaptor -> LLM with a
KappaTune selection (any policy) -> AdamW over the adaptor and the selected LLM tensors; WER/CER on a test
manifest. Checkpoints hold the adaptor's state (safetensors) and the LLM's ``save_pretrained`` folder."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
import wave
from dataclasses import dataclass

import numpy as np
import torch

from .._io import atomic_write_json
from ..errors import KappaTuneError

log = logging.getLogger(__name__)


def load_manifest(path: str) -> list[dict]:
    from ..data import load_records

    rows = load_records(path)
    for i, r in enumerate(rows):
        if "audio" not in r or "text" not in r:
            raise KappaTuneError(f"{path}: line {i + 1} needs 'audio' and 'text'")
        if not os.path.isabs(r["audio"]):
            r["audio"] = os.path.join(os.path.dirname(os.path.abspath(path)), r["audio"])
        if not os.path.exists(r["audio"]):
            raise KappaTuneError(f"{path}: audio file {r['audio']} does not exist")
    return rows


def read_wav_16k(path: str) -> np.ndarray:
    with wave.open(path, "rb") as w:
        if w.getframerate() != 16000 or w.getnchannels() != 1 or w.getsampwidth() != 2:
            raise KappaTuneError(f"{path}: need 16 kHz mono 16-bit WAV (sox in.wav -r 16000 -c 1 -b 16 out.wav)")
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    return pcm.astype(np.float32) / 32768.0


def features(paths: list[str], extractor, n_frames: int):
    """Log-mel features padded/cut to n_frames, and each clip's valid feature length."""
    wavs = [read_wav_16k(p) for p in paths]
    out = extractor(wavs, sampling_rate=16000, return_tensors="pt").input_features  # (B, mels, 3000)
    out = out[..., :n_frames]
    if out.shape[-1] < n_frames:
        out = torch.nn.functional.pad(out, (0, n_frames - out.shape[-1]))
    lens = torch.tensor([min(n_frames, int(np.ceil(len(w) / extractor.hop_length))) for w in wavs])
    return out, lens


@dataclass
class SpeechTrainConfig:
    epochs: float = 1.0
    lr: float = 1e-4
    batch_size: int = 4
    weight_decay: float = 0.0
    seed: int = 0
    eval_every: int = 0          # steps; 0: only at the end
    max_new_tokens: int = 48


def evaluate_speech(model, tok, rows, extractor, n_frames: int, max_new_tokens: int = 48, batch_size: int = 4):
    from .model import word_error_rates

    refs, hyps = [], []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        f, l = features([r["audio"] for r in chunk], extractor, n_frames)
        ids = model.transcribe(f, l, tok.bos_token_id, tok.eos_token_id, max_new_tokens=max_new_tokens)
        hyps += [tok.decode(x, skip_special_tokens=True).strip() for x in ids]
        refs += [r["text"] for r in chunk]
    return dict(word_error_rates(refs, hyps), examples=[{"ref": r, "hyp": h} for r, h in list(zip(refs, hyps))[:3]])


def train_speech(model, tok, extractor, train_rows, test_rows, out_dir: str, cfg: SpeechTrainConfig,
                 n_frames: int) -> dict:
    """Train ``model`` (a SpeechLLM whose LLM already has a selection applied) and write ``out_dir``."""
    from ..freeze import changed, snapshot

    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    frozen = snapshot(model, only_frozen=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = max(1, int(len(train_rows) * cfg.epochs / cfg.batch_size))
    # The encoder is frozen: run it once per clip and train the adaptor + LLM on cached frames.
    cache = []
    for i in range(0, len(train_rows), cfg.batch_size):
        chunk = train_rows[i:i + cfg.batch_size]
        f, l = features([r["audio"] for r in chunk], extractor, n_frames)
        cache += model.encoder_frames(f, l)
    log.info("encoded %d training clips once (frozen encoder)", len(cache))
    history = []
    t0 = time.perf_counter()
    order = list(range(len(train_rows)))
    for step in range(1, steps + 1):
        if (step - 1) * cfg.batch_size % len(order) < cfg.batch_size:
            rng.shuffle(order)
        start = ((step - 1) * cfg.batch_size) % len(order)
        idx = [order[(start + k) % len(order)] for k in range(cfg.batch_size)]
        text_ids = [tok(train_rows[k]["text"], add_special_tokens=False)["input_ids"] for k in idx]
        model.adaptor.train()
        model.llm.train()
        loss = model.forward_frames([cache[k] for k in idx], text_ids, tok.bos_token_id, tok.eos_token_id).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        rec = {"step": step, "loss": loss.item()}
        if cfg.eval_every and step % cfg.eval_every == 0 and test_rows:
            rec.update({k: v for k, v in evaluate_speech(model, tok, test_rows, extractor, n_frames,
                                                         cfg.max_new_tokens).items() if k in ("wer", "cer")})
        history.append(rec)
        log.info("step %d/%d loss %.4f%s", step, steps, rec["loss"],
                 f" WER {rec['wer']:.3f}" if "wer" in rec else "")
    final = evaluate_speech(model, tok, test_rows, extractor, n_frames, cfg.max_new_tokens) if test_rows else {}
    moved = changed(model, frozen)
    if moved:
        raise KappaTuneError(f"{len(moved)} frozen tensor(s) changed during training, e.g. {moved[0]}")
    _save(model, tok, out_dir)
    res = {"steps": steps, "wall_s": time.perf_counter() - t0, "history": history, "final": final,
           "frozen_verified": True}
    atomic_write_json(os.path.join(out_dir, "speech_train.json"), res)
    return res


def _save(model, tok, out_dir: str) -> None:
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, ".ckpt-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: v.detach().contiguous() for k, v in model.adaptor.state_dict().items()},
              os.path.join(tmp, "adaptor.safetensors"))
    cfg = {"enc_dim": model.adaptor.proj.in_features // model.adaptor.subsample,
           "llm_dim": model.adaptor.proj.out_features, "subsample": model.adaptor.subsample,
           "heads": model.adaptor.blocks[0].attn.num_heads if len(model.adaptor.blocks) else 1,
           "layers": len(model.adaptor.blocks)}
    with open(os.path.join(tmp, "adaptor.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f)
    model.llm.save_pretrained(os.path.join(tmp, "llm"))
    tok.save_pretrained(os.path.join(tmp, "llm"))
    final = os.path.join(out_dir, "checkpoint")
    shutil.rmtree(final + ".old", ignore_errors=True)
    if os.path.exists(final):
        os.replace(final, final + ".old")
    os.replace(tmp, final)
    shutil.rmtree(final + ".old", ignore_errors=True)
