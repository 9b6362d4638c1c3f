"""Paired intervals between train-speech runs on the same test clips and the same control text (issue 15).

The Figure 1 arms (scripts/speech_fig1.sh) are one seed each, so their table alone cannot say which
differences are larger than the test set's own noise. This script re-measures every run's final model clip by
clip and chunk by chunk, and gives each contrast against a reference run a 95% t interval over the units
both share:

- the audio gap (loss of a transcript with another clip's audio minus with its own, nats per token) per
  test clip, paired over clips;
- the control text's negative log-likelihood per token, per 256-token chunk, for each run's LLM and for the
  base LLM: forgetting is the run's minus the base's, paired over chunks.

These intervals are over test items, not over seeds: they say whether the test set resolves a difference
between these trained models, not whether a rerun with another seed would reproduce it. The units are not
fully independent (a clip's audio is also its neighbour's wrong audio; the chunks are consecutive text) and
the contrasts are not corrected for being several: read a verdict near the edge as a hint. The gap here is
the plain mean over clips of each clip's per-token gap; the token-weighted gap (train-speech's figure) is
reported beside it.

  python scripts/speech_paired.py runs/speech-fig1-bridge-chars/*-seed0 --reference lowest-seed0 \
      --test data/speech/probe_test.jsonl --control news --chunks 32 -o docs/results/speech-fig1/paired.json
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys

from kappatune._io import atomic_write_json
from kappatune.data import control_text
from kappatune.errors import KappaTuneError
from kappatune.evaluate import control_chunks, token_nll
from kappatune.models import load_model
from kappatune.multimodal.encoders import encoder_window_s, feature_extractor, load_encoder
from kappatune.multimodal.frames_cache import frames_cache_dir
from kappatune.multimodal.recipe import speech_model_folder
from kappatune.multimodal.speech_train import (audio_use_per_clip, check_clips, encode_clips, load_manifest,
                                               load_speech_model)
from kappatune.stats import mean_interval, paired_contrast, verdict


def chunk_nll(llm, tok, chunks: list[list[int]]) -> list[float]:
    """Mean negative log-likelihood per predicted token of each chunk (all chunks have one length)."""
    sums, counts = token_nll(llm, chunks, chunks, pad_id=tok.eos_token_id or 0, batch_size=4)
    return [float(s) / float(c) for s, c in zip(sums, counts)]


def measure_run(run: str, encoder, fe, n_frames: int, rows: list[dict], chunks: list[list[int]],
                base_vocab: dict) -> dict:
    folder, _ = speech_model_folder(run)
    with contextlib.redirect_stdout(sys.stderr):
        model, tok, _ = load_speech_model(folder, encoder)
    if tok.get_vocab() != base_vocab:  # the chunks are the base tokenizer's ids
        raise KappaTuneError(f"{run}: its LLM's tokenizer differs from the base's (give its own --base)")
    frames = encode_clips(model, fe, rows, n_frames, cache_dir=frames_cache_dir())
    clips = audio_use_per_clip(model, tok, frames, [r["text"] for r in rows])
    clips["gap"] = [w - r for r, w in zip(clips["right"], clips["wrong"])]
    return {"run": run, "clips": clips, "control_nll": chunk_nll(model.llm, tok, chunks)}


def _by_index(values: list[float]) -> dict[int, float]:
    return dict(enumerate(values))


def summarise(runs: dict[str, dict], base_nll: list[float], reference: str) -> dict:
    """Per run: mean clip gap and mean forgetting (nats per token) with intervals; per contrast against the
    reference: the paired interval and its verdict."""
    out: dict = {"runs": {}, "contrasts": {}}
    for name, r in runs.items():
        forgetting = [a - b for a, b in zip(r["control_nll"], base_nll)]
        r["forgetting_nll"] = forgetting
        tokens = r["clips"].get("tokens") or [1] * len(r["clips"]["gap"])
        out["runs"][name] = {"audio_gap": mean_interval(r["clips"]["gap"]).to_dict(),
                             "audio_gap_token_weighted": sum(g * n for g, n in zip(r["clips"]["gap"], tokens))
                             / sum(tokens),
                             "forgetting_nll": mean_interval(forgetting).to_dict(),
                             "dppl_same_chunks": math.exp(sum(r["control_nll"]) / len(base_nll))
                             - math.exp(sum(base_nll) / len(base_nll))}
    ref = runs[reference]
    for name, r in runs.items():
        if name == reference:
            continue
        gap = paired_contrast(_by_index(r["clips"]["gap"]), _by_index(ref["clips"]["gap"]))
        forg = paired_contrast(_by_index(r["forgetting_nll"]), _by_index(ref["forgetting_nll"]))
        out["contrasts"][f"{name} - {reference}"] = {
            "audio_gap": {**gap.to_dict(), "unit": "clip", "verdict": verdict(gap, "clips")},
            "forgetting_nll": {**forg.to_dict(), "unit": "chunk", "verdict": verdict(forg, "chunks")}}
    return out


def _print(summary: dict, n_clips: int, n_chunks: int) -> None:
    print(f"| run | mean per-clip audio gap, nats per token ({n_clips} clips) | token-weighted gap "
          f"| control forgetting, nats per token ({n_chunks} chunks) | dPPL on these chunks |")
    print("|---|---|---|---|---|")
    for name, s in summary["runs"].items():
        g, f = s["audio_gap"], s["forgetting_nll"]
        print(f"| {name} | {g['mean']:+.3f} [{g['low']:+.3f}, {g['high']:+.3f}] | {s['audio_gap_token_weighted']:+.3f} | "
              f"{f['mean']:+.4f} [{f['low']:+.4f}, {f['high']:+.4f}] | {s['dppl_same_chunks']:+.2f} |")
    print("\n95% t intervals over paired test clips and paired control chunks, not over seeds.\n")
    print("| contrast | mean per-clip audio gap | verdict | forgetting (nats per token) | verdict |")
    print("|---|---|---|---|---|")
    for name, c in summary["contrasts"].items():
        g, f = c["audio_gap"], c["forgetting_nll"]
        print(f"| {name} | {g['mean']:+.3f} [{g['low']:+.3f}, {g['high']:+.3f}] | {g['verdict']} | "
              f"{f['mean']:+.4f} [{f['low']:+.4f}, {f['high']:+.4f}] | {f['verdict']} |")


def _arguments() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="train-speech output folders (their model/ is measured)")
    ap.add_argument("--reference", required=True, help="the run every other is contrasted with (folder name)")
    ap.add_argument("--test", required=True, help="test manifest (the same clips for every run)")
    ap.add_argument("--control", default="news", help="control text: news, wikipedia or a file")
    ap.add_argument("--base", default="smollm2", help="the LLM before training (forgetting's zero)")
    ap.add_argument("--chunks", type=int, default=32, help="256-token chunks of the control text (at least 2)")
    ap.add_argument("-o", "--output", required=True)
    return ap.parse_args()


def _checked_inputs(a: argparse.Namespace) -> tuple[list[str], list[dict], str, float | None, str]:
    """Everything that can be refused before a model loads: (run names, test rows, encoder, window, control)."""
    names = [os.path.basename(os.path.normpath(r)) for r in a.runs]
    if len(set(names)) < len(names):
        raise KappaTuneError(f"two runs share a folder name in {names}: results are keyed by it")
    if a.reference not in names:
        raise KappaTuneError(f"--reference {a.reference!r} is not among the runs {names}")
    if a.chunks < 2:
        raise KappaTuneError(f"--chunks must be at least 2 for an interval (got {a.chunks})")
    if os.path.isdir(a.output):
        raise KappaTuneError(f"-o {a.output} is a folder; give a JSON file path")
    rows = load_manifest(a.test)
    if len(rows) < 2:
        raise KappaTuneError(f"{a.test}: {len(rows)} clip(s); the audio gap needs at least 2")
    text = control_text(a.control)
    if not text:
        raise KappaTuneError("--control names no text: forgetting needs one (news, wikipedia or a file)")
    setups = set()
    for run in a.runs:
        _, rec = speech_model_folder(run)
        setups.add((rec.get("encoder") or "whisper-tiny", rec.get("encoder_window_s")))
    if len(setups) > 1:
        raise KappaTuneError(f"the runs were trained on different encoders or windows: {sorted(setups, key=str)}")
    (enc_spec, window), = setups
    check_clips(rows, encoder_window_s(enc_spec, window))
    return names, rows, enc_spec, window, text


def main() -> None:
    a = _arguments()
    try:
        names, rows, enc_spec, window, text = _checked_inputs(a)
        encoder = load_encoder(enc_spec, window)
        fe, n_frames = feature_extractor(encoder)
        with contextlib.redirect_stdout(sys.stderr):
            base, tok = load_model(a.base)
        chunks = control_chunks(tok, text, 256, a.chunks)
        if len(chunks) < 2:
            raise KappaTuneError(f"--control {a.control}: too short for 2 chunks of 256 tokens")
        base_nll = chunk_nll(base, tok, chunks)
        del base
        runs = {}
        for name, run in zip(names, a.runs):
            runs[name] = measure_run(run, encoder, fe, n_frames, rows, chunks, tok.get_vocab())
            print(f"measured {name}", file=sys.stderr)
    except KappaTuneError as e:
        sys.exit(f"speech_paired.py: {e}")
    summary = summarise(runs, base_nll, a.reference)
    _print(summary, len(rows), len(chunks))
    atomic_write_json(a.output, {"test": a.test, "control": a.control, "base": a.base, "chunk_len": 256,
                                 "base_control_nll": base_nll, "per_run": runs, **summary})


if __name__ == "__main__":
    main()
