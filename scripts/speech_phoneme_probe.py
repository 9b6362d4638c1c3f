"""Is the acoustic side limited by English spelling? A phoneme CTC stage beside the character one (issue 15;
docs/speech.md "Phonemes instead of characters, a wider head, masked frames").

The character CTC stage reads held-out clips at CER ~0.31 and stops improving (docs/speech.md "A four times
longer CTC stage"). espeak-ng made every clip from a phoneme string it computed from the text, so the sounds
map to phonemes without English spelling in between. This probe trains the same adaptor (same encoder,
window, seed, steps and batches as the character stage) with CTC against those phonemes instead, and reads
the test sets back through the head: the phoneme error rate (PER) says how much of the audio's content the
frozen encoder's frames give the adaptor once spelling is out of the way. No LLM is trained.

Phonemes come from ``espeak-ng -q -x --sep=_ -v VOICE TEXT`` with each clip's own voice (manifest field
"voice"), stress marks dropped, words separated by a boundary symbol "|". They are cached in --out.

  python scripts/speech_phoneme_probe.py --train data/speech/train.jsonl --test data/speech/probe_test.jsonl \
      --test data/speech/probe_test_unseen.jsonl --encoder-window 14 --out docs/results/speech-phonemes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time

import torch

from kappatune._io import atomic_write_json
from kappatune.models import load_model
from kappatune.multimodal.ctc import CharCTCHead, char_targets, char_text
from kappatune.multimodal.ctc_stage import ctc_pretrain, mask_frames
from kappatune.multimodal.encoders import encoder_window_s, feature_extractor, load_encoder
from kappatune.multimodal.frames_cache import frames_cache_dir
from kappatune.multimodal.model import SpeechLLM, word_error_rates
from kappatune.multimodal.speech_train import check_clips, encode_clips, head_best_paths, load_manifest

WORD_BOUNDARY = "|"
STRESS_MARKS = "',"


def phonemes_of(espeak_x: str) -> list[str]:
    """The phoneme symbols of espeak-ng's ``-x --sep=_`` output: words split on white space (clauses on new
    lines), phonemes on "_", stress marks dropped, "|" between words."""
    out: list[str] = []
    for word in espeak_x.split():
        symbols = [p.strip(STRESS_MARKS) for p in word.split("_")]
        symbols = [p for p in symbols if p]
        if symbols:
            if out:
                out.append(WORD_BOUNDARY)
            out += symbols
    return out


def char_symbols(text: str) -> list[str]:
    """The character stage's target as symbols, "|" for the space: error rates then count like the PER's."""
    return [WORD_BOUNDARY if c == " " else c for c in char_text(char_targets(text))]


def espeak_phonemes(text: str, voice: str) -> list[str]:
    done = subprocess.run(["espeak-ng", "-q", "-x", "--sep=_", "-v", voice, text], check=True,
                          capture_output=True, text=True)
    return phonemes_of(done.stdout)


def phonemize_rows(rows: list[dict], cache_path: str) -> list[list[str]]:
    """Each row's phonemes in its own voice, through a JSON cache keyed by voice and text (resumable)."""
    cache: dict = {}
    if os.path.exists(cache_path):
        with open(cache_path, encoding="utf-8") as f:
            cache = json.load(f)
    keys = [f"{r['voice']}\t{r['text']}" for r in rows]
    missing = [(k, r) for k, r in zip(keys, rows) if k not in cache]
    for k, r in missing:
        cache[k] = espeak_phonemes(r["text"], r["voice"])
    if missing:
        atomic_write_json(cache_path, cache)
    return [cache[k] for k in keys]


def symbol_error_rate(refs: list[list[str]], hyps: list[list[str]]) -> float:
    """Edit distance over symbols / reference symbols, pooled over clips (jiwer's WER on space-joined
    symbols: no symbol contains a space)."""
    return word_error_rates([" ".join(r) for r in refs], [" ".join(h) for h in hyps])["wer"]


def reading_scores(adaptor, frames, refs: list[list[str]], symbols: list[str]) -> dict:
    hyps = [[symbols[c - 1] for c in ids] for ids in head_best_paths(adaptor, frames)]
    no_bounds = [[s for s in h if s != WORD_BOUNDARY] for h in hyps]
    ref_no_bounds = [[s for s in r if s != WORD_BOUNDARY] for r in refs]
    return {"per": symbol_error_rate(refs, hyps), "per_no_boundaries": symbol_error_rate(ref_no_bounds, no_bounds),
            "hyps": [" ".join(h) for h in hyps[:5]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", required=True)
    ap.add_argument("--test", action="append", required=True)
    ap.add_argument("--encoder", default="whisper-tiny")
    ap.add_argument("--encoder-window", type=float, default=14.0)
    ap.add_argument("--model", default="smollm2", help="the LLM (only its width and embedding scale are used)")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--probe-every", type=int, default=600)
    ap.add_argument("--target", choices=("phonemes", "chars"), default="phonemes",
                    help="what the CTC head reads: espeak-ng phonemes, or the character stage's own alphabet")
    ap.add_argument("--head-hidden", type=int, default=0,
                    help="a GELU layer of this width in the CTC head (0: the linear head of the character stage)")
    ap.add_argument("--mask-frames", action="store_true",
                    help="train on masked copies of the frames (ctc_stage.mask_frames: time spans and channel bands)")
    ap.add_argument("--phoneme-cache", default=os.path.join(os.path.expanduser("~"), ".cache", "kappatune",
                                                               "espeak-phonemes.json"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--weights-dir", help="also save the trained adaptor and head here")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    name = f"{args.target}-hidden{args.head_hidden}{'-masked' if args.mask_frames else ''}-seed{args.seed}"
    result_path = os.path.join(args.out, name + ".json")
    if os.path.exists(result_path):
        print(result_path, "exists")
        return
    train_rows = load_manifest(args.train)
    tests = {path: load_manifest(path) for path in args.test}
    check_clips(train_rows + [r for rows in tests.values() for r in rows],
                encoder_window_s(args.encoder, args.encoder_window))
    if args.target == "phonemes":
        os.makedirs(os.path.dirname(args.phoneme_cache), exist_ok=True)
        train_ph = phonemize_rows(train_rows, args.phoneme_cache)
        test_ph = {p: phonemize_rows(rows, args.phoneme_cache) for p, rows in tests.items()}
    else:  # the character stage's targets, spaces as the word boundary
        train_ph = [char_symbols(r["text"]) for r in train_rows]
        test_ph = {p: [char_symbols(r["text"]) for r in rows] for p, rows in tests.items()}
    symbols = sorted({s for ph in train_ph for s in ph})
    ids = {s: i + 1 for i, s in enumerate(symbols)}

    encoder = load_encoder(args.encoder, args.encoder_window)
    fe, n_frames = feature_extractor(encoder)
    llm, _ = load_model(args.model)
    for p in llm.parameters():
        p.requires_grad_(False)
    torch.manual_seed(args.seed)  # the character stage's initialisation, then the head is replaced
    model = SpeechLLM(encoder, llm, heads=llm.config.num_attention_heads, ctc_weight=1.0, out_norm=True)
    ad = model.adaptor
    ad.ctc_head = CharCTCHead(llm.config.hidden_size, ad.subsample, vocab=len(symbols) + 1,
                              hidden=args.head_hidden)
    cache_dir = frames_cache_dir()
    train_frames = encode_clips(model, fe, train_rows, n_frames, cache_dir=cache_dir)
    test_frames = {p: encode_clips(model, fe, rows, n_frames, cache_dir=cache_dir) for p, rows in tests.items()}
    first = args.test[0]

    def probe() -> dict:
        return {k: v for k, v in reading_scores(ad, test_frames[first], test_ph[first], symbols).items()
                if k != "hyps"}

    t0 = time.perf_counter()
    history = ctc_pretrain(ad, train_frames, [[ids[s] for s in ph] for ph in train_ph], steps=args.steps,
                           lr=args.lr, batch_size=args.batch_size, seed=args.seed, log_every=50,
                           probe=probe, probe_every=args.probe_every,
                           augment=mask_frames if args.mask_frames else None)
    wall = time.perf_counter() - t0
    readings = {os.path.basename(p): {**reading_scores(ad, fr, test_ph[p], symbols),
                                      "refs": [" ".join(r) for r in test_ph[p][:5]]}
                for p, fr in test_frames.items()}
    atomic_write_json(result_path, {
        "target": args.target, "head_hidden": args.head_hidden, "mask_frames": args.mask_frames,
        "steps": args.steps, "lr": args.lr, "batch_size": args.batch_size, "seed": args.seed,
        "encoder": args.encoder, "encoder_window_s": args.encoder_window, "train_clips": len(train_rows),
        "symbols": symbols, "ctc_wall_s": wall, "readings": readings, "history": history})
    if args.weights_dir:  # the trained adaptor and head, for later readings (kept out of the results folder)
        from safetensors.torch import save_file

        os.makedirs(args.weights_dir, exist_ok=True)
        save_file({k: v.contiguous() for k, v in ad.state_dict().items()},
                  os.path.join(args.weights_dir, name + ".safetensors"))
    print(result_path, json.dumps({k: {m: v[m] for m in ("per", "per_no_boundaries")}
                                   for k, v in readings.items()}))


if __name__ == "__main__":
    main()
