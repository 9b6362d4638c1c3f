"""Algorithm 2 as a recipe over the HF Trainer: a manifest of (audio, text) -> frozen Whisper encoder -> adaptor
-> LLM with a KappaTune selection (any policy) -> AdamW over the adaptor and the selected LLM tensors; WER/CER
on a test manifest and the LLM's forgetting (perplexity on a general text) during and after training.

Output folder::

  out/model/adaptor.safetensors   the adaptor's weights        (written atomically at the end)
  out/model/adaptor.json          its sizes + the encoder it was trained with
  out/model/llm/                  the LLM's save_pretrained folder + tokenizer
  out/checkpoints/checkpoint-N/   resumable Trainer checkpoints (the same three items + optimizer, scheduler,
                                  RNG and trainer state); rerun the same command to resume
  out/selection.json              the LLM selection
  out/speech_train.json           WER/CER and forgetting over steps, final figures, proof frozen tensors held
"""

from __future__ import annotations

import json
import logging
import os
import time
import wave
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .._io import atomic_write_json
from ..errors import KappaTuneError, TrainingInterrupted
from .ctc import char_targets

log = logging.getLogger(__name__)

ADAPTOR_WEIGHTS = "adaptor.safetensors"
ADAPTOR_CONFIG = "adaptor.json"


def load_manifest(path: str) -> list[dict]:
    from ..data import load_records

    rows = load_records(path)
    for i, r in enumerate(rows):
        if "audio" not in r or "text" not in r:
            raise KappaTuneError(f"{path}: line {i + 1} needs 'audio' and 'text'")
        if not isinstance(r["text"], str) or not r["text"].strip():
            raise KappaTuneError(f"{path}: line {i + 1} has an empty 'text'")
        if not os.path.isabs(r["audio"]):
            r["audio"] = os.path.join(os.path.dirname(os.path.abspath(path)), r["audio"])
        if not os.path.exists(r["audio"]):
            raise KappaTuneError(f"{path}: audio file {r['audio']} does not exist")
    return rows


def _open_wav_16k(path: str) -> wave.Wave_read:
    try:
        w = wave.open(path, "rb")
    except (wave.Error, EOFError) as e:
        raise KappaTuneError(f"{path}: not a readable WAV file ({e})") from None
    if w.getframerate() != 16000 or w.getnchannels() != 1 or w.getsampwidth() != 2:
        w.close()
        raise KappaTuneError(f"{path}: need 16 kHz mono 16-bit WAV (sox in.wav -r 16000 -c 1 -b 16 out.wav)")
    return w


def read_wav_16k(path: str) -> np.ndarray:
    with _open_wav_16k(path) as w:
        try:
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        except (wave.Error, EOFError) as e:
            raise KappaTuneError(f"{path}: not a readable WAV file ({e})") from None
    return pcm.astype(np.float32) / 32768.0


def check_clips(rows: list[dict], window_s: float) -> None:
    """Every clip's header before any work: 16 kHz mono 16-bit, and no longer than the encoder's window (a
    longer clip would be cut silently while its whole transcript stays the target)."""
    for r in rows:
        with _open_wav_16k(r["audio"]) as w:
            seconds = w.getnframes() / 16000
        if seconds > window_s:
            raise KappaTuneError(f"{r['audio']}: {seconds:.1f} s is longer than the encoder's {window_s:g} s "
                                 f"window; split or cut the clip")


def features(paths: list[str], extractor, n_frames: int):
    """Log-mel features padded/cut to n_frames, and each clip's valid feature length."""
    wavs = [read_wav_16k(p) for p in paths]
    out = extractor(wavs, sampling_rate=16000, return_tensors="pt").input_features  # (B, mels, 3000)
    out = out[..., :n_frames]
    if out.shape[-1] < n_frames:
        out = torch.nn.functional.pad(out, (0, n_frames - out.shape[-1]))
    lens = torch.tensor([min(n_frames, int(np.ceil(len(w) / extractor.hop_length))) for w in wavs])
    return out, lens


# ------------------------------------------------------------------------------------------------ encoder frames
def encode_clips(model, extractor, rows: list[dict], n_frames: int, *, batch_size: int = 8,
                 cache_dir: str | None = None) -> list[torch.Tensor]:
    """The frozen encoder's valid output frames for every clip, computed once.

    With ``cache_dir`` each clip's frames are kept under the digest of its bytes, per encoder and feature
    setting (``frames_cache``): runs that share an encoder (the lowest/highest/random ablation) encode the
    audio once, and a manifest that grows encodes only its new clips."""
    from . import frames_cache

    if not cache_dir:
        return _encode(model, extractor, rows, n_frames, batch_size)
    folder = frames_cache.encoder_folder(cache_dir, model.encoder, n_frames, extractor)
    digests = [frames_cache.clip_digest(r["audio"]) for r in rows]
    found = frames_cache.load_cached(folder, set(digests))
    missing = {d: r for d, r in zip(digests, rows) if d not in found}  # a clip twice is encoded once
    log.info("encoder frames: %d distinct clips from the cache %s, %d to encode", len(found), folder,
             len(missing))
    todo, size = list(missing.items()), frames_cache.SHARD_CLIPS
    for i in range(0, len(todo), size):  # stored shard by shard: an interrupted encoding resumes
        part = dict(todo[i:i + size])
        new = dict(zip(part, _encode(model, extractor, list(part.values()), n_frames, batch_size)))
        frames_cache.store(folder, new)
        found.update(new)
    return [found[d] for d in digests]


def _encode(model, extractor, rows: list[dict], n_frames: int, batch_size: int) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    t0 = time.perf_counter()
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        f, lens = features([r["audio"] for r in chunk], extractor, n_frames)
        out += [x.clone() for x in model.encoder_frames(f, lens)]
    if rows:
        log.info("encoded %d clips with the frozen encoder in %.1f s", len(rows), time.perf_counter() - t0)
    return out


# ------------------------------------------------------------------------------------------------ evaluation
def transcribe_rows(model, tok, frames: list[torch.Tensor], max_new_tokens: int = 48) -> list[str]:
    ids = model.transcribe_frames(frames, tok.bos_token_id, tok.eos_token_id, max_new_tokens=max_new_tokens)
    return [tok.decode(x, skip_special_tokens=True).strip() for x in ids]


def evaluate_frames(model, tok, frames: list[torch.Tensor], refs: list[str], max_new_tokens: int = 48,
                    n_examples: int = 3) -> dict:
    from .model import word_error_rates

    hyps = transcribe_rows(model, tok, frames, max_new_tokens)
    return dict(word_error_rates(refs, hyps), clips=len(refs),
                examples=[{"ref": r, "hyp": h} for r, h in list(zip(refs, hyps))[:n_examples]])


@torch.no_grad()
def head_best_paths(adaptor, frames: list[torch.Tensor], batch_size: int = 16) -> list[list[int]]:
    """The CTC head's best-path symbol ids for each clip's frames, read in eval mode without gradients (the
    adaptor's mode is put back): the one place the head is read over a list of clips."""
    from .adaptor import pad_frames

    was_training = adaptor.training
    adaptor.eval()
    paths: list[list[int]] = []
    try:
        with torch.no_grad():
            for i in range(0, len(frames), batch_size):
                out, out_lens = adaptor(*pad_frames(frames[i:i + batch_size]))
                paths += adaptor.ctc_head.best_paths(out, out_lens)
    finally:
        adaptor.train(was_training)
    return paths


def ctc_reading(adaptor, frames: list[torch.Tensor], refs: list[str], batch_size: int = 16) -> dict:
    """WER and CER of the CTC head's best-path reading of the adaptor's outputs against the normalised
    references: whether the audio's content reaches the vectors the LLM reads, with the LLM out of the loop."""
    from .ctc import char_text
    from .model import word_error_rates

    hyps = [char_text(ids).strip() for ids in head_best_paths(adaptor, frames, batch_size)]
    wanted = [char_text(char_targets(r)) for r in refs]
    scores = word_error_rates(wanted, hyps)
    return {"wer": scores["wer"], "cer": scores["cer"]}


@torch.no_grad()
def audio_use(model, tok, frames: list[torch.Tensor], refs: list[str], batch_size: int = 8) -> dict:
    """Does the model listen? The teacher-forced loss per text token with each clip's own audio, and with the
    audio of the next clip (texts paired with the wrong audio). Their gap is ~0 while the adaptor only tells
    the LLM "a sentence follows", and grows once the content of the audio is used: a signal long before WER
    falls below 1."""
    if len(frames) < 2:
        return {}
    was_training = model.training
    model.eval()
    ids = [tok(r, add_special_tokens=False)["input_ids"] for r in refs]
    wrong = frames[1:] + frames[:1]
    sums = {"right": 0.0, "wrong": 0.0}
    tokens = sum(len(x) + 1 for x in ids)  # + EOS: every text token and the end are predicted
    try:
        for i in range(0, len(frames), batch_size):
            for key, audio in (("right", frames), ("wrong", wrong)):
                out = model.forward_frames(audio[i:i + batch_size], ids[i:i + batch_size], tok.bos_token_id,
                                           tok.eos_token_id)
                n = sum(len(x) + 1 for x in ids[i:i + batch_size])
                sums[key] += float(out.loss) * n
    finally:
        model.train(was_training)
    right, wrong_loss = sums["right"] / tokens, sums["wrong"] / tokens
    return {"loss_right_audio": right, "loss_wrong_audio": wrong_loss, "audio_gap": wrong_loss - right}


@torch.no_grad()
def audio_use_per_clip(model, tok, frames: list[torch.Tensor], refs: list[str]) -> dict:
    """``audio_use`` clip by clip: each clip's loss per text token with its own audio and with the next clip's,
    and its token count. Paired over the same clips, two runs' gaps then get an interval over clips
    (scripts/speech_paired.py); one clip per forward pass, so no padding enters a clip's loss."""
    if len(frames) < 2:
        return {"right": [], "wrong": [], "tokens": []}
    was_training = model.training
    model.eval()
    ids = [tok(r, add_special_tokens=False)["input_ids"] for r in refs]
    wrong = frames[1:] + frames[:1]
    out = {"right": [], "wrong": [], "tokens": [len(x) + 1 for x in ids]}  # + EOS, as in audio_use
    try:
        for x, own, other in zip(ids, frames, wrong):
            for key, audio in (("right", own), ("wrong", other)):
                out[key].append(float(model.forward_frames([audio], [x], tok.bos_token_id, tok.eos_token_id).loss))
    finally:
        model.train(was_training)
    return out


def evaluate_speech(model, tok, rows, extractor, n_frames: int, max_new_tokens: int = 48, batch_size: int = 8):
    """WER/CER of greedy transcripts of ``rows`` (audio through the frozen encoder)."""
    frames = encode_clips(model, extractor, rows, n_frames, batch_size=batch_size)
    return evaluate_frames(model, tok, frames, [r["text"] for r in rows], max_new_tokens)


# ------------------------------------------------------------------------------------------------ training
@dataclass
class SpeechTrainConfig:
    epochs: float = 1.0
    max_steps: int = -1          # > 0 overrides epochs
    lr: float = 1e-4             # the selected LLM tensors
    adaptor_lr: float | None = None  # None: same as lr
    batch_size: int = 4
    grad_accum: int = 1
    weight_decay: float = 0.0
    scheduler: str = "linear"
    warmup_steps: int = 0
    seed: int = 0
    eval_every: int = 0          # steps; 0: only before and after training
    eval_limit: int | None = None  # test clips used for the evaluations during training (None: all)
    max_new_tokens: int = 48
    save_steps: int = 100
    save_total_limit: int = 1
    logging_steps: int = 10
    control_chunks: int = 8      # 256-token chunks of the control text for the forgetting measurement
    ctc_weight: float = 0.0      # auxiliary character CTC loss on the adaptor's outputs (0: the paper's recipe)
    ctc_steps: int = 0           # a first stage of CTC-only adaptor steps, without the LLM (needs ctc_weight > 0)
    ctc_lr: float | None = None  # that stage's learning rate (None: adaptor_lr, else lr)
    ctc_stage_from: str | None = None  # start from the CTC stage another run's folder holds (instead of ctc_steps)
    ctc_stage_only: bool = False  # train the CTC stage, save it for --ctc-stage-from, and stop before the LLM
    progress: bool = False

    def __post_init__(self):
        for k in ("batch_size", "grad_accum", "save_steps", "logging_steps", "max_new_tokens"):
            if getattr(self, k) <= 0:
                raise KappaTuneError(f"{k} must be positive, got {getattr(self, k)}")
        if self.lr <= 0 or (self.adaptor_lr is not None and self.adaptor_lr <= 0):
            raise KappaTuneError("learning rates must be positive")
        if self.eval_every < 0:
            raise KappaTuneError(f"eval_every must be >= 0, got {self.eval_every}")
        if self.ctc_weight < 0:
            raise KappaTuneError(f"ctc_weight must be >= 0, got {self.ctc_weight}")
        if self.ctc_steps < 0 or (self.ctc_steps and self.ctc_weight <= 0):
            raise KappaTuneError(f"ctc_steps must be >= 0 and needs ctc_weight > 0 (the CTC head), got "
                                 f"ctc_steps {self.ctc_steps}, ctc_weight {self.ctc_weight}")
        if self.ctc_lr is not None and self.ctc_lr <= 0:
            raise KappaTuneError("learning rates must be positive")
        if self.ctc_stage_from and (self.ctc_steps or self.ctc_weight <= 0):
            raise KappaTuneError("ctc_stage_from replaces ctc_steps (give one of them) and needs ctc_weight > 0 "
                                 "(the CTC head the stage trained)")
        if self.ctc_stage_only and not self.ctc_steps:
            raise KappaTuneError("ctc_stage_only trains a CTC stage: it needs ctc_steps > 0 (and no ctc_stage_from)")


class _FramesDataset(torch.utils.data.Dataset):
    def __init__(self, frames, text_ids, char_ids=None):
        self.frames, self.text_ids, self.char_ids = frames, text_ids, char_ids

    def __len__(self):
        return len(self.frames)

    def __getitem__(self, i):
        item = {"frames": self.frames[i], "text_ids": self.text_ids[i]}
        if self.char_ids is not None:
            item["char_ids"] = self.char_ids[i]
        return item


def _collate(batch):
    return {k: [b[k] for b in batch] for k in batch[0]}


def _trainer_cls():
    from transformers import Trainer

    class SpeechTrainer(Trainer):
        """The HF Trainer with checkpoints that hold the adaptor (safetensors) and the LLM's save_pretrained
        folder instead of one state dict of the whole wrapper (which would also copy the frozen encoder)."""

        speech_tokenizer = None
        speech_meta: dict = {}

        def _save(self, output_dir=None, state_dict=None):
            output_dir = output_dir or self.args.output_dir
            if not self.args.should_save:
                return
            save_speech_model(self.accelerator.unwrap_model(self.model), self.speech_tokenizer, output_dir,
                              self.speech_meta)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            load_speech_weights(self.accelerator.unwrap_model(model or self.model), resume_from_checkpoint)

    return SpeechTrainer


def adaptor_structure(model) -> dict:
    """What rebuilds a SpeechLLM's adaptor (saved in adaptor.json, and part of a CTC stage's fingerprint)."""
    ad = model.adaptor
    return {"enc_dim": ad.proj.in_features // ad.subsample, "llm_dim": ad.proj.out_features,
            "subsample": ad.subsample, "heads": ad.blocks[0].attn.num_heads if len(ad.blocks) else 1,
            "layers": len(ad.blocks), "frames_per_feature": model.frames_per_feature,
            "out_norm": ad.out_norm is not None}


def save_speech_model(model, tok, folder: str, meta: dict | None = None, *, keep_aux: bool = True) -> None:
    """Write adaptor.safetensors, adaptor.json and llm/ (save_pretrained + tokenizer) into ``folder``;
    ``keep_aux=False`` leaves out the training-only CTC head (the final model does not need it)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    ad = model.adaptor
    # the head is training-only, unless the LLM reads the audio through it (the character bridge)
    keep_ctc = (keep_aux or model.bridge_ids is not None) and ad.ctc_head is not None
    save_file({k: v.detach().contiguous() for k, v in ad.state_dict().items()
               if keep_ctc or not k.startswith("ctc_head.")}, os.path.join(folder, ADAPTOR_WEIGHTS))
    cfg = {**adaptor_structure(model), "ctc_weight": model.ctc_weight if keep_ctc else 0.0,
           "bridge_ids": model.bridge_ids, **(meta or {})}
    with open(os.path.join(folder, ADAPTOR_CONFIG), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=1)
    model.llm.save_pretrained(os.path.join(folder, "llm"))
    if tok is not None:
        tok.save_pretrained(os.path.join(folder, "llm"))


def load_speech_weights(model, folder: str) -> None:
    """Load a checkpoint's adaptor and LLM weights into an existing SpeechLLM (strict)."""
    from safetensors.torch import load_file

    from ..checkpoints import load_checkpoint_weights

    path = os.path.join(folder, ADAPTOR_WEIGHTS)
    if not os.path.exists(path):
        raise KappaTuneError(f"{folder}: no {ADAPTOR_WEIGHTS} (not a kappatune speech checkpoint)")
    missing, unexpected = model.adaptor.load_state_dict(load_file(path), strict=False)
    if missing or unexpected:
        raise KappaTuneError(f"{path} does not fit this adaptor (missing {missing[:2]}, unexpected {unexpected[:2]})")
    load_checkpoint_weights(model.llm, os.path.join(folder, "llm"))


def load_speech_model(folder: str, encoder):
    """A SpeechLLM and its tokenizer from a folder written by ``save_speech_model`` (a run's ``model/`` or
    one of its checkpoints) and a frozen encoder."""
    from ..models import load_model
    from .model import SpeechLLM

    cfg_path = os.path.join(folder, ADAPTOR_CONFIG)
    if not os.path.exists(cfg_path):
        raise KappaTuneError(f"{folder}: no {ADAPTOR_CONFIG} (give a train-speech run's model/ folder)")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    llm, tok = load_model(os.path.join(folder, "llm"))
    if encoder.config.d_model != cfg["enc_dim"]:
        raise KappaTuneError(f"the encoder's width {encoder.config.d_model} differs from the adaptor's {cfg['enc_dim']}")
    model = SpeechLLM(encoder, llm, subsample=cfg["subsample"], heads=cfg["heads"],
                      layers=cfg["layers"], frames_per_feature=cfg.get("frames_per_feature", 2),
                      ctc_weight=cfg.get("ctc_weight", 0.0), out_norm=cfg.get("out_norm", False),
                      bridge_ids=cfg.get("bridge_ids"))
    from safetensors.torch import load_file

    model.adaptor.load_state_dict(load_file(os.path.join(folder, ADAPTOR_WEIGHTS)))
    model.use_tokenizer_ids(tok)
    model.eval()
    return model, tok, cfg


def _eval_callback(model, tok, test_frames, test_refs, control, base_ppl, cfg: SpeechTrainConfig):
    from transformers import TrainerCallback

    class SpeechEvalCallback(TrainerCallback):
        """Every ``eval_every`` steps: WER/CER on the test clips and the LLM's perplexity on the control text,
        appended to the trainer state's log history (so they survive a resume)."""

        def on_step_end(self, args, state, control_, **kw):
            if not cfg.eval_every or state.global_step % cfg.eval_every or not args.should_save:
                return control_
            rec = measure(model, tok, test_frames, test_refs, control, base_ppl, cfg)
            rec["step"] = state.global_step
            state.log_history.append(rec)
            log.info("step %d: WER %.3f CER %.3f audio gap %.3f nats%s", state.global_step,
                     rec.get("wer", float("nan")), rec.get("cer", float("nan")), rec.get("audio_gap", float("nan")),
                     f" control ppl {rec['control_ppl']:.3f} (+{rec['dppl']:.3f})" if "dppl" in rec else "")
            return control_

    return SpeechEvalCallback()


def measure(model, tok, test_frames, test_refs, control, base_ppl, cfg: SpeechTrainConfig) -> dict:
    from ..evaluate import perplexity

    rec: dict = {}
    if test_frames:
        r = evaluate_frames(model, tok, test_frames, test_refs, cfg.max_new_tokens)
        rec.update(wer=r["wer"], cer=r["cer"], clips=r["clips"], examples=r["examples"])
        rec.update(audio_use(model, tok, test_frames, test_refs))
        if model.adaptor.ctc_head is not None:
            reading = ctc_reading(model.adaptor, test_frames, test_refs)
            rec.update(ctc_cer=reading["cer"], ctc_wer=reading["wer"])
    if control is not None:
        ppl = perplexity(model.llm, tok, chunks=control)["ppl"]
        rec.update(control_ppl=ppl, dppl=ppl - base_ppl)
    return rec


@dataclass
class _SpeechData:
    """Everything the training loop and its evaluations read, prepared once before the first step."""

    train_frames: list
    text_ids: list
    test_frames: list
    test_refs: list
    eval_count: int              # the first N test clips are evaluated during training (all at the end)
    control: list | None         # tokenised control chunks for the LLM's perplexity
    base_ppl: float | None
    char_ids: list | None = None  # the transcripts' characters, for the auxiliary CTC loss


def _prepare_data(model, tok, extractor, train_rows, test_rows, cfg: SpeechTrainConfig, n_frames: int,
                  control_text: str | None, cache_dir: str | None) -> _SpeechData:
    from ..evaluate import control_chunks, perplexity

    train_frames = encode_clips(model, extractor, train_rows, n_frames, cache_dir=cache_dir)
    test_frames = encode_clips(model, extractor, test_rows, n_frames, cache_dir=cache_dir) if test_rows else []
    if cfg.ctc_stage_only:  # the LLM is not trained: nothing for it to forget
        control_text = None
    control = control_chunks(tok, control_text, 256, cfg.control_chunks) if control_text else None
    base_ppl = perplexity(model.llm, tok, chunks=control)["ppl"] if control else None
    text_ids = [tok(r["text"], add_special_tokens=False)["input_ids"] for r in train_rows]
    if torch.cuda.is_available():
        model.to("cuda")
        train_frames = [f.to("cuda") for f in train_frames]
        test_frames = [f.to("cuda") for f in test_frames]
    n_eval = min(cfg.eval_limit, len(test_rows)) if cfg.eval_limit else len(test_rows)
    char_ids = [char_targets(r["text"]) for r in train_rows] if cfg.ctc_weight > 0 else None
    return _SpeechData(train_frames, text_ids, test_frames, [r["text"] for r in test_rows], n_eval, control,
                       base_ppl, char_ids)


def _optimizer(model, cfg: SpeechTrainConfig) -> torch.optim.Optimizer:
    """AdamW over the adaptor (its own learning rate) and the selected LLM tensors."""
    llm_params = [p for p in model.llm.parameters() if p.requires_grad]
    groups = [{"params": [p for p in model.adaptor.parameters() if p.requires_grad], "lr": cfg.adaptor_lr or cfg.lr}]
    if llm_params:
        groups.append({"params": llm_params, "lr": cfg.lr})
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _speech_args(cfg: SpeechTrainConfig, ckpt_dir: str):
    from transformers import TrainingArguments

    from ..engines import world_size

    use_cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=ckpt_dir, per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps, learning_rate=cfg.lr, weight_decay=cfg.weight_decay,
        lr_scheduler_type=cfg.scheduler, warmup_steps=cfg.warmup_steps, logging_steps=cfg.logging_steps,
        save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit, seed=cfg.seed, data_seed=cfg.seed,
        report_to=[], use_cpu=not use_cuda, disable_tqdm=not cfg.progress, remove_unused_columns=False,
        dataloader_num_workers=0, dataloader_pin_memory=False,
        ddp_backend=None if use_cuda or world_size() == 1 else "gloo")


def eval_history(start_path: str, log_history: list[dict]) -> tuple[list[dict], list[dict]]:
    """(evaluations over steps, starting with step 0; training losses over steps)."""
    history = []
    if os.path.exists(start_path):
        with open(start_path, encoding="utf-8") as f:
            history.append({"step": 0, **json.load(f)})  # the step-0 record is step 0 whatever it holds
    history += [{k: v for k, v in h.items() if k != "examples"} for h in log_history if "wer" in h or "dppl" in h]
    losses = [{"step": h["step"], "loss": h["loss"]} for h in log_history if "loss" in h]
    return history, losses


def stage_fingerprint(model, meta: dict | None) -> dict:
    """What a CTC stage's weights depend on besides the data: loading a stage elsewhere is refused on any
    difference. A scaled embedding (Gemma's sqrt(hidden)) sets the output norm's target, so its factor is part
    of it; a plain embedding (factor 1) adds no key, so the stages saved before the factor was recorded still
    load where they are valid, and a scaled-embedding stage from then is refused."""
    from .model import embedding_scale

    fingerprint = {**adaptor_structure(model),
                   **{k: (meta or {}).get(k) for k in ("encoder", "encoder_window_s", "llm")}}
    scale = embedding_scale(model.llm)
    if abs(scale - 1.0) > 1e-4:
        fingerprint["embedding_scale"] = round(scale, 4)
    return fingerprint


def _ctc_stage(model, data, out_dir: str, cfg: SpeechTrainConfig, meta: dict | None, resume) -> dict | None:
    """The CTC stage's record, after training it here (``ctc_steps``) or loading another run's
    (``ctc_stage_from``) into the adaptor; a resumed run's checkpoint already holds the adaptor, so only the
    record is read then."""
    from .ctc_stage import STAGE_LOG_EVERY, load_ctc_stage, run_ctc_stage, stage_record

    if not cfg.ctc_steps and not cfg.ctc_stage_from:
        return None
    fingerprint = stage_fingerprint(model, meta)
    if cfg.ctc_stage_from:
        if resume:
            return dict(stage_record(cfg.ctc_stage_from) or {}, source=cfg.ctc_stage_from)
        return dict(load_ctc_stage(model.adaptor, cfg.ctc_stage_from, fingerprint), source=cfg.ctc_stage_from)
    if resume:
        return stage_record(out_dir)
    def heldout_reading() -> dict:
        reading = ctc_reading(model.adaptor, data.test_frames, data.test_refs)
        return {"heldout_ctc_cer": reading["cer"], "heldout_ctc_wer": reading["wer"],
                "heldout_clips": len(data.test_frames)}

    # the stage's curve on every held-out clip (cheap without the LLM): about 20 points, on logged steps
    every = max(1, round(cfg.ctc_steps / 20 / STAGE_LOG_EVERY)) * STAGE_LOG_EVERY
    return run_ctc_stage(model.adaptor, data.train_frames, data.char_ids, out_dir, steps=cfg.ctc_steps,
                         lr=cfg.ctc_lr or cfg.adaptor_lr or cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed,
                         fingerprint=fingerprint, probe=heldout_reading if data.test_frames else None,
                         probe_every=every)


def _moved_tensors(model, before: dict, trainable: set[str]) -> list[str]:
    """The tensors training changed, after checking that each was trainable (frozen weights never move)."""
    from ..freeze import snapshot

    after = snapshot(model, only_frozen=False, slice_rows={})
    moved = sorted(n for n in after if after[n] != before[n])
    stray = [n for n in moved if n not in trainable]
    if stray:
        raise KappaTuneError(f"tensor {stray[0]} changed but was not trainable")
    return moved


def _stage_only_result(model, before: dict, trainable: set[str], out_dir: str, stage: dict, cfg, meta) -> dict:
    """``--ctc-stage-only``: the stage is saved (ctc_stage.*, what --ctc-stage-from reads); no LLM step, no
    LLM evaluation and no model/ folder, since the LLM has never read the adaptor."""
    moved = _moved_tensors(model, before, trainable)
    if any(n.startswith("llm.") for n in moved):
        raise KappaTuneError("the LLM changed during a CTC stage")
    res = {"stage_only": True, "steps": 0, "wall_s": stage.get("wall_s"), "changed_tensors": len(moved),
           "frozen_verified": True, "config": asdict(cfg), "meta": meta or {}, "ctc_stage": stage}
    res = json.loads(json.dumps(res, default=str))
    atomic_write_json(os.path.join(out_dir, "speech_train.json"), res)
    return res


def train_speech(model, tok, extractor, train_rows, test_rows, out_dir: str, cfg: SpeechTrainConfig,
                 n_frames: int, *, control_text: str | None = None, cache_dir: str | None = None,
                 meta: dict | None = None) -> dict:
    """Train ``model`` (a SpeechLLM whose LLM already has a selection applied) and write ``out_dir``."""
    from transformers import set_seed

    from ..checkpoints import last_good_checkpoint, save_folder
    from ..freeze import applied_to, snapshot
    from ..integrations.trainer import GracefulStopCallback

    if not train_rows:
        raise KappaTuneError("the training manifest is empty")
    handle = applied_to(model.llm)
    if handle is not None and handle.slice_rows:
        raise KappaTuneError("train-speech does not train single experts inside fused MoE tensors yet; "
                             "select whole tensors (kappatune select --no-slices) for a MoE LLM")
    if (cfg.ctc_weight > 0) != (model.adaptor.ctc_head is not None) or model.ctc_weight != cfg.ctc_weight:
        raise KappaTuneError(f"ctc_weight {cfg.ctc_weight} differs from the model's ({model.ctc_weight}): build the "
                             f"SpeechLLM with ctc_weight={cfg.ctc_weight}")
    set_seed(cfg.seed)
    model.use_tokenizer_ids(tok)
    if model.bos_id is None or model.eos_id is None:
        raise KappaTuneError("the tokenizer needs BOS and EOS tokens")
    os.makedirs(out_dir, exist_ok=True)
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    before = snapshot(model, only_frozen=False, slice_rows={})  # the frozen-tensor proof's reference
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    data = _prepare_data(model, tok, extractor, train_rows, test_rows, cfg, n_frames, control_text, cache_dir)
    args = _speech_args(cfg, ckpt_dir)
    resume = last_good_checkpoint(ckpt_dir)
    sub_frames, sub_refs = data.test_frames[: data.eval_count], data.test_refs[: data.eval_count]
    stage = _ctc_stage(model, data, out_dir, cfg, meta, resume)
    if cfg.ctc_stage_only:
        return _stage_only_result(model, before, trainable, out_dir, stage, cfg, meta)
    start_path = os.path.join(out_dir, "speech_eval_step0.json")
    if not resume:
        rec0 = dict(measure(model, tok, sub_frames, sub_refs, data.control, data.base_ppl, cfg), step=0)
        atomic_write_json(start_path, rec0)
    stopper = GracefulStopCallback()
    evaluator = _eval_callback(model, tok, sub_frames, sub_refs, data.control, data.base_ppl, cfg)
    trainer = _trainer_cls()(model=model, args=args, train_dataset=_FramesDataset(data.train_frames, data.text_ids, data.char_ids),
                             data_collator=_collate, optimizers=(_optimizer(model, cfg), None),
                             callbacks=[stopper, evaluator])
    trainer.speech_tokenizer = tok
    trainer.speech_meta = dict(meta or {})
    if resume:
        log.info("resuming from %s", resume)
    t0 = time.perf_counter()
    out = trainer.train(resume_from_checkpoint=resume)
    wall = time.perf_counter() - t0
    if stopper.requested:
        raise TrainingInterrupted(f"interrupted at step {trainer.state.global_step}; checkpoint saved in "
                                  f"{ckpt_dir}; rerun the same command to resume")
    moved = _moved_tensors(model, before, trainable)
    final = measure(model, tok, data.test_frames, data.test_refs, data.control, data.base_ppl, cfg)
    history, losses = eval_history(start_path, trainer.state.log_history)
    if not args.should_save:
        return {}
    save_folder(os.path.join(out_dir, "model"), lambda tmp: save_speech_model(model, tok, tmp, meta, keep_aux=False))
    n_llm = sum(p.numel() for p in model.llm.parameters() if p.requires_grad)
    res = {"steps": trainer.state.global_step, "wall_s": wall,
           "train_loss": float(out.training_loss) if out.training_loss is not None else None,
           "trainable": {"adaptor": sum(p.numel() for p in model.adaptor.parameters() if p.requires_grad),
                         "llm": n_llm, "llm_tensors": sum(p.requires_grad for p in model.llm.parameters())},
           "changed_tensors": len(moved), "frozen_verified": True,
           "base_control_ppl": data.base_ppl, "final": final, "history": history, "losses": losses,
           "config": asdict(cfg), "meta": meta or {},
           "ctc_stage": stage}
    res = json.loads(json.dumps(res, default=str))
    atomic_write_json(os.path.join(out_dir, "speech_train.json"), res)
    return res
