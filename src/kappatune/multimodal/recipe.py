"""Algorithm 2 end to end, from paths: load the manifests, the frozen encoder and the LLM, choose the LLM's
trainable tensors through the training-method registry, build the adaptor, train (``train_speech``); and the
matching evaluation of a trained run (``evaluate_speech``). The CLI's train-speech / eval-speech call these."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass, field

from ..errors import KappaTuneError
from .speech_train import SpeechTrainConfig


@dataclass
class SpeechRun:
    """What ``kappatune train-speech`` asks for; ``train`` holds the training-loop settings."""

    model: str                                  # causal LM folder, Hub id org/name, or 'smollm2'
    manifest: str                               # training JSONL: 'audio' (16 kHz mono WAV) + 'text'
    output: str
    test: str | None = None                     # test manifest for WER/CER during and after training
    encoder: str = "whisper-tiny"
    encoder_window_s: float | None = None       # cut the encoder to this window (None: its own, 30 s)
    order: str = "lowest"                       # which LLM tensors train (a kappatune.policies order)
    budget_params: int | str = "2M"             # trainable LLM parameters; 0: adaptor only
    adaptor_heads: int | None = None            # default: the LLM's attention heads
    adaptor_layers: int = 2
    adaptor_subsample: int = 4                  # encoder frames concatenated per adaptor output (the paper: 4)
    adaptor_out_norm: bool = False              # RMS-normalise the outputs to the LLM's embedding scale
    adaptor_bridge: str = "none"                # 'chars': the LLM reads the CTC head's characters (bridge.py)
    control: str | None = "wikipedia"           # text for the LLM's forgetting: wikipedia | news | file | none
    frames_cache: str | None = None             # None: the default cache folder; 'none': no cache
    seed: int = 0
    train: SpeechTrainConfig = field(default_factory=SpeechTrainConfig)
    revision: str | None = None                 # Hub branch, tag or commit of ``model`` (Hub ids only)

    def __post_init__(self):
        if self.adaptor_layers < 0:
            raise KappaTuneError(f"adaptor-layers must be >= 0, got {self.adaptor_layers}")
        if self.adaptor_subsample < 1:
            raise KappaTuneError(f"adaptor-subsample must be >= 1, got {self.adaptor_subsample}")
        if self.adaptor_bridge not in ("none", "chars"):
            raise KappaTuneError(f"adaptor-bridge must be 'none' or 'chars', got {self.adaptor_bridge!r}")
        if self.adaptor_bridge == "chars" and self.train.ctc_weight <= 0:
            raise KappaTuneError("adaptor-bridge chars reads the CTC head: give --ctc-weight > 0 (and train the "
                                 "head first: --ctc-steps or --ctc-stage-from)")


def prepare_llm(llm, order: str, budget_params: int, seed: int):
    """Freeze the LLM except the tensors the selective method for ``order`` picks within the budget (nothing
    for a budget of 0); the Selection, or None. Goes through the method registry, like ``kappatune train``."""
    from ..methods import MethodContext, get_method
    from ..methods.selective import method_name
    from ..scanner import scan
    from ..train import TrainConfig

    if not budget_params:
        for p in llm.parameters():
            p.requires_grad_(False)
        return None
    name = method_name(order)
    cfg = TrainConfig(method=name, budget_params=budget_params, seed=seed, progress=False)
    prep = get_method(name).prepare(llm, MethodContext(lambda: scan(llm, distributed=False)), cfg)
    return prep.selection


def run_train_speech(run: SpeechRun) -> dict:
    """Train a speech LLM as ``run`` says and write its output folder; returns speech_train.json's content."""
    import torch

    from ..data import control_text
    from ..models import load_model
    from ..policies import parse_size
    from .bridge import char_token_ids
    from .encoders import encoder_window_s, feature_extractor, load_encoder
    from .model import SpeechLLM
    from .frames_cache import frames_cache_dir
    from .speech_train import check_clips, load_manifest, train_speech

    if os.path.exists(run.output) and not os.path.isdir(run.output):
        raise KappaTuneError(f"--output {run.output} exists and is not a folder")
    train_rows = load_manifest(run.manifest)
    test_rows = load_manifest(run.test) if run.test else []
    budget = 0 if run.train.ctc_stage_only else parse_size(run.budget_params)  # a stage-only run never trains the LLM
    control = control_text(run.control)  # train_speech ignores it for a stage-only run
    check_clips(train_rows + test_rows, encoder_window_s(run.encoder, run.encoder_window_s))
    if run.train.ctc_stage_from:
        from .ctc_stage import require_stage

        require_stage(run.train.ctc_stage_from, {
            "encoder": run.encoder, "encoder_window_s": run.encoder_window_s, "llm": run.model,
            "subsample": run.adaptor_subsample, "layers": run.adaptor_layers, "out_norm": run.adaptor_out_norm,
            **({"heads": run.adaptor_heads} if run.adaptor_heads else {})})
    encoder = load_encoder(run.encoder, run.encoder_window_s)
    fe, n_frames = feature_extractor(encoder)
    llm, tok = load_model(run.model, revision=run.revision)
    sel = prepare_llm(llm, run.order, budget, run.seed)
    torch.manual_seed(run.seed)  # the same adaptor initialisation whatever the selection (ablations compare)
    model = SpeechLLM(encoder, llm, heads=run.adaptor_heads or max(1, llm.config.num_attention_heads),
                      layers=run.adaptor_layers, subsample=run.adaptor_subsample, ctc_weight=run.train.ctc_weight,
                      out_norm=run.adaptor_out_norm,
                      bridge_ids=char_token_ids(tok) if run.adaptor_bridge == "chars" else None)
    os.makedirs(run.output, exist_ok=True)
    if sel is not None:
        sel.save(os.path.join(run.output, "selection.json"))
    cache = None if run.frames_cache == "none" else (run.frames_cache or frames_cache_dir())
    meta = {"encoder": run.encoder, "encoder_window_s": run.encoder_window_s, "llm": run.model,
            "order": run.order if budget else "none", "budget_params": budget}
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its metrics; stdout is for results
        return train_speech(model, tok, fe, train_rows, test_rows, run.output, run.train, n_frames,
                            control_text=control, cache_dir=cache, meta=meta)


def speech_model_folder(spec: str) -> tuple[str, dict]:
    """(model folder, its adaptor.json: the encoder and window recorded with it) of a train-speech output
    folder or checkpoint."""
    from .speech_train import ADAPTOR_CONFIG

    folder = os.path.join(spec, "model") if os.path.isdir(os.path.join(spec, "model")) else spec
    if not os.path.exists(os.path.join(folder, ADAPTOR_CONFIG)):
        raise KappaTuneError(f"{spec}: no {ADAPTOR_CONFIG} (give a train-speech output folder or checkpoint)")
    with open(os.path.join(folder, ADAPTOR_CONFIG), encoding="utf-8") as f:
        return folder, json.load(f)


def evaluate_speech(run_folder: str, manifest: str, *, encoder: str | None = None, control: str | None = None,
                    base: str | None = None, control_chunks: int = 8, limit: int | None = None,
                    max_new_tokens: int = 48) -> tuple[dict, list[dict]]:
    """WER/CER of a trained speech model on ``manifest`` (+ the LLM's forgetting on ``control``, against
    ``base``); returns (figures, transcripts)."""
    from ..data import control_text
    from ..evaluate import control_forgetting
    from ..models import load_model
    from .encoders import encoder_window_s, feature_extractor, load_encoder
    from .model import word_error_rates
    from .speech_train import check_clips, encode_clips, load_manifest, load_speech_model, transcribe_rows

    folder, recorded = speech_model_folder(run_folder)
    rows = load_manifest(manifest)[:limit] if limit else load_manifest(manifest)
    if not rows:
        raise KappaTuneError(f"{manifest}: no clips")
    enc_spec = encoder or recorded.get("encoder") or "whisper-tiny"
    window = recorded.get("encoder_window_s")  # the adaptor was trained on frames of this window
    text = control_text(control)
    check_clips(rows, encoder_window_s(enc_spec, window))
    enc = load_encoder(enc_spec, window)
    fe, n_frames = feature_extractor(enc)
    with contextlib.redirect_stdout(sys.stderr):
        model, tok, _ = load_speech_model(folder, enc)
        hyps = transcribe_rows(model, tok, encode_clips(model, fe, rows, n_frames), max_new_tokens)
    res = dict(word_error_rates([r["text"] for r in rows], hyps), clips=len(rows), model=folder, encoder=enc_spec)
    if text:
        base_model = load_model(base)[0] if base else None
        res.update(control_forgetting(model.llm, tok, text, base=base_model, max_chunks=control_chunks))
    transcripts = [{"audio": r["audio"], "ref": r["text"], "hyp": h} for r, h in zip(rows, hyps)]
    return res, transcripts
