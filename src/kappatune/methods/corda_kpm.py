"""``corda-kpm``: CorDA in knowledge-preserved mode (PEFT LoRA with ``init_lora_weights="corda"``).

CorDA runs the model on a sample of text, collects each target module's input covariance C, and takes the SVD
of W C. In knowledge-preserved mode (KPM) the adapter starts from the r triplets with the *smallest* singular
values (the directions that matter least for the sampled text) and the rest stays frozen in the residual base
weight, so what the sample exercises is kept. Trainable: A and B, r * (d_in + d_out) per module, matched to the
budget like ``lora`` (capped at min(d_in, d_out)); merged with ``merge_and_unload`` after training.

The covariance sample is a *training* split of a control corpus, never the text that measures forgetting:
kappatune measures forgetting on the first ``max_chunks`` chunks of ``chunk_len`` tokens of a control text
(``kappatune.evaluate.control_chunks``); CorDA's calibration chunks come from the *end* of the corpus, and
``calibration_split`` raises if they would reach into the first ``eval_chunks`` x ``eval_chunk_len`` tokens.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from functools import partial

import torch

from ..data import CONTROL_TEXTS, control_text, leading_special_ids
from ..errors import KappaTuneError
from ..evaluate import control_chunks
from .base import Method, Prepared, method_options, register
from .lora_variants import lora_cost, lora_variant, need_peft

NAME = "corda-kpm"


@dataclass
class CordaKpmOptions:
    corpus: str = field(default="", metadata={
        "help": "covariance corpus (required): 'wikipedia', 'news' or a .txt file; calibration chunks come from "
                "its end, clear of the evaluation chunks at its start"})
    calib_chunks: int = field(default=128, metadata={
        "help": "calibration chunks the covariance is collected from (one forward pass each)"})
    chunk_len: int = field(default=256, metadata={"help": "tokens per calibration chunk"})
    eval_chunks: int = field(default=16, metadata={
        "help": "evaluation chunks at the start of the corpus that calibration must not touch (kappatune's "
                "control perplexity reads the first max_chunks chunks: keep this >= --max-chunks)"})
    eval_chunk_len: int = field(default=256, metadata={
        "help": "tokens per evaluation chunk (keep it >= the --chunk-len forgetting is measured with)"})
    tokenizer: str = field(default="", metadata={
        "help": "tokenizer folder for the corpus (default: the run's tokenizer, else the model's folder)"})
    cache: bool = field(default=True, metadata={
        "help": "keep CorDA's decomposition on disk (keyed by the weights, the calibration chunks, the rank and "
                "the targets), so runs that differ only in learning rate or seed skip the covariance pass"})

    def __post_init__(self):
        self.corpus = (self.corpus or "").strip()
        if not self.corpus:
            raise KappaTuneError(f"{NAME} needs covariance data: pass --method-option corpus=wikipedia|news|FILE.txt")
        if self.corpus in CONTROL_TEXTS:
            if importlib.util.find_spec("gensim") is None:
                raise KappaTuneError(f"{NAME} corpus {self.corpus!r} needs the 'gensim' package: pip install gensim")
        elif not os.path.isfile(self.corpus):
            raise KappaTuneError(f"{NAME} corpus {self.corpus!r}: not 'wikipedia', 'news' or an existing text file")
        for k in ("calib_chunks", "chunk_len", "eval_chunks", "eval_chunk_len"):
            if not isinstance(getattr(self, k), int) or getattr(self, k) < 1:
                raise KappaTuneError(f"{NAME} option {k} must be a positive integer, got {getattr(self, k)!r}")
        if self.chunk_len < 2 or self.eval_chunk_len < 2:
            raise KappaTuneError(f"{NAME}: chunk lengths must be at least 2 tokens")


@dataclass
class CalibrationSplit:
    """Calibration chunks and where they lie in the tokenised corpus: tokens [start, end) for calibration,
    [0, eval_end) for the evaluation chunks; start >= eval_end."""

    chunks: list[list[int]]
    start: int
    end: int
    eval_end: int


def calibration_split(tokenizer, text: str, *, calib_chunks: int, chunk_len: int, eval_chunks: int,
                      eval_chunk_len: int) -> CalibrationSplit:
    """The last ``calib_chunks`` chunks of ``chunk_len`` tokens of ``text``; raises if they would overlap the
    evaluation chunks (``control_chunks(tokenizer, text, eval_chunk_len, eval_chunks)``, the first tokens)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    prefix = leading_special_ids(tokenizer)  # every chunk starts with it (control_chunks); the text follows
    evaluation = [t for chunk in control_chunks(tokenizer, text, eval_chunk_len, eval_chunks)
                  for t in chunk[len(prefix):]]
    eval_end = len(evaluation)
    if ids[:eval_end] != evaluation:
        # control_chunks tokenises a prefix of the text; positions only line up when that agrees with the whole
        raise KappaTuneError(f"{NAME}: cannot locate the evaluation chunks in the tokenised corpus, so calibration "
                             f"cannot be proven disjoint from them; use a .txt corpus that is not the control text")
    body = chunk_len - len(prefix)
    need = calib_chunks * body
    start = len(ids) - need
    if start < eval_end:
        raise KappaTuneError(f"{NAME}: the corpus has {len(ids)} tokens; {calib_chunks} calibration chunks of "
                             f"{chunk_len} from its end would overlap the first {eval_end} (evaluation) tokens: "
                             f"use fewer or shorter calibration chunks or a longer corpus")
    chunks = [prefix + ids[start + i * body: start + (i + 1) * body] for i in range(calib_chunks)]
    return CalibrationSplit(chunks, start, len(ids), eval_end)


def _tokenizer(model, opts: CordaKpmOptions, run_tokenizer=None):
    if run_tokenizer is not None and not opts.tokenizer:
        return run_tokenizer
    path = opts.tokenizer or getattr(model.config, "_name_or_path", "") or ""
    if not path:
        raise KappaTuneError(f"{NAME} needs the model's tokenizer to read its corpus and this model has no folder "
                             f"(config._name_or_path): pass --method-option tokenizer=FOLDER")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise KappaTuneError(f"{NAME}: cannot load a tokenizer from {path!r} "
                             f"({' '.join(str(e).split())[:160]}); pass --method-option tokenizer=FOLDER") from None


def _preprocess_corda():
    """PEFT's ``preprocess_corda`` (its module needs the ``attrs`` package, which PEFT does not declare)."""
    try:
        from peft.tuners.lora.corda import preprocess_corda
    except ModuleNotFoundError as e:
        if e.name != "attr":
            raise
        raise KappaTuneError(f"{NAME} needs the attrs package (PEFT's CorDA code imports it): pip install attrs") from None
    return preprocess_corda


def _covariance(model, lora_config, opts: CordaKpmOptions, run_tokenizer=None) -> dict:
    """CorDA's covariance pass over the calibration chunks (PEFT ``preprocess_corda``), before PEFT wraps."""
    preprocess_corda = _preprocess_corda()
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and opts.chunk_len > max_pos:
        raise KappaTuneError(f"{NAME}: chunk_len {opts.chunk_len} is longer than the model's context ({max_pos})")
    tok = _tokenizer(model, opts, run_tokenizer)
    split = calibration_split(tok, control_text(opts.corpus), calib_chunks=opts.calib_chunks,
                              chunk_len=opts.chunk_len, eval_chunks=opts.eval_chunks,
                              eval_chunk_len=opts.eval_chunk_len)
    vocab = model.get_input_embeddings().num_embeddings
    if max(max(c) for c in split.chunks) >= vocab:
        raise KappaTuneError(f"{NAME}: the tokenizer yields ids beyond the model's {vocab} embeddings; "
                             f"pass the model's own tokenizer (--method-option tokenizer=FOLDER)")
    device = next(model.parameters()).device

    def run_model():
        # one chunk per forward pass: PEFT's covariance hook expects a batch of one sequence
        for chunk in split.chunks:
            model(input_ids=torch.tensor([chunk], device=device), use_cache=False)

    cached = _decomposition_file(model, lora_config, split) if opts.cache else None
    hit = cached is not None and os.path.exists(cached)
    if cached is not None:  # PEFT writes the file itself: into a temporary name, renamed once complete
        lora_config.corda_config.cache_file = cached if hit else f"{cached}.{os.getpid()}.tmp"
    preprocess_corda(model, lora_config, run_model=run_model)
    if cached is not None and not hit:
        os.replace(lora_config.corda_config.cache_file, cached)
    return {"corda": {"mode": "kpm", "corpus": opts.corpus, "calib_chunks": len(split.chunks),
                      "chunk_len": opts.chunk_len, "calib_tokens": [split.start, split.end],
                      "reserved_eval_tokens": split.eval_end, "decomposition_cached": hit}}


def _decomposition_file(model, lora_config, split) -> str:
    """Where CorDA's decomposition for exactly this input is kept: a digest of every weight, the calibration
    chunks, the rank, the target modules and PEFT's version (PEFT loads it with torch.load, weights only)."""
    import hashlib
    import json

    import peft

    from ..freeze import snapshot
    from ..paths import cache_dir

    key = json.dumps({"weights": sorted(snapshot(model, only_frozen=False).items()),
                      "chunks": hashlib.sha256(json.dumps(split.chunks).encode()).hexdigest(),
                      "r": lora_config.r, "rank_pattern": lora_config.rank_pattern,
                      "targets": sorted(lora_config.target_modules), "method": lora_config.corda_config.corda_method,
                      "peft": peft.__version__})
    folder = cache_dir("corda", "KAPPATUNE_CORDA_CACHE")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, hashlib.sha256(key.encode()).hexdigest()[:24] + ".pt")


def _prepare(model, ctx, cfg) -> Prepared:
    need_peft()
    from peft.tuners.lora.config import CordaConfig

    opts = method_options(METHOD, cfg.method_options)
    return lora_variant(model, cfg, NAME, partial(lora_cost, svd=True),
                        before_wrap=lambda m, lcfg: _covariance(m, lcfg, opts, ctx.tokenizer),
                        init_lora_weights="corda", corda_config=CordaConfig(corda_method="kpm"))


METHOD = register(Method(NAME, _prepare, "CorDA knowledge-preserved LoRA: covariance from a control corpus' end, "
                         "rank matched to the budget", options=CordaKpmOptions, family="adapter"))
