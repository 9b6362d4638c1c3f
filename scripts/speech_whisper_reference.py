"""What the frozen encoder's own decoder reads (issue 15; docs/speech.md "What the frozen encoder supports")

Algorithm 2 freezes Whisper tiny.en's encoder and asks an adaptor plus an LLM to read its frames. Whisper's own
decoder was trained for exactly that on 680k hours: its WER on our clips is what those frames support when
read by a decoder built for them, so it is the reference the speech recipe's WER is judged against (not a
target it must beat: that decoder saw far more speech than 4,000 espeak clips). Greedy decoding through
CTranslate2 (the same tiny.en weights train-speech encodes with), English, no timestamps, 30 s windows.
Writes one JSON per manifest: WER/CER on the exact strings as eval-speech scores them (case and punctuation
count), WER/CER after the CTC stage's normalisation (lower case, no punctuation: comparable with a run's
ctc_cer), plain WER per voice, and three example transcripts.

  python scripts/speech_whisper_reference.py --test data/speech/probe_test.jsonl \
      --test data/speech/probe_test_unseen.jsonl --out docs/results/speech-reference
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from kappatune._io import atomic_write_json
from kappatune.multimodal.ctc import char_targets, char_text
from kappatune.multimodal.encoders import encoder_folder
from kappatune.multimodal.model import word_error_rates
from kappatune.multimodal.speech_train import load_manifest, read_wav_16k


def _plain(text: str) -> str:
    """The CTC stage's normalisation (lower case, no punctuation), so plain CER compares with its ctc_cer."""
    return char_text(char_targets(text))


def _by_voice(rows: list[dict], hyps: list[str]) -> dict:
    """Plain WER per espeak-ng voice (the manifest's "voice"), to see whether one voice carries the errors."""
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row.get("voice", "?"), []).append(i)
    return {voice: {"clips": len(idx), "wer_plain": word_error_rates([_plain(rows[i]["text"]) for i in idx],
                                                                     [_plain(hyps[i]) for i in idx])["wer"]}
            for voice, idx in sorted(groups.items())}


def transcribe(model, tokenizer, extractor, paths: list[str], batch_size: int) -> list[str]:
    import ctranslate2

    # a multilingual model (base) is told the language and the task; an English-only one (tiny.en) is not
    names = ["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]
    prompt = [tokenizer.token_to_id(n) for n in (names if model.is_multilingual else names[::3])]
    texts = []
    for i in range(0, len(paths), batch_size):
        audio = [read_wav_16k(p) for p in paths[i:i + batch_size]]
        mel = extractor(audio, sampling_rate=16000, return_tensors="np").input_features.astype(np.float32)
        results = model.generate(ctranslate2.StorageView.from_array(mel), [prompt] * len(audio),
                                 beam_size=1, max_length=128)
        texts += [tokenizer.decode(r.sequences_ids[0]).strip() for r in results]
    return texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--test", action="append", required=True, help="a manifest (repeatable)")
    ap.add_argument("--encoder", default="whisper-tiny",
                    help="a CTranslate2 Whisper folder (model.bin, tokenizer.json), or whisper-tiny")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import ctranslate2
    from tokenizers import Tokenizer
    from transformers import WhisperFeatureExtractor

    folder = encoder_folder(args.encoder)
    model = ctranslate2.models.Whisper(folder, device="cpu", compute_type="float32", intra_threads=2)
    tokenizer = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    extractor = WhisperFeatureExtractor(feature_size=model.n_mels)
    os.makedirs(args.out, exist_ok=True)
    for manifest in args.test:
        rows = load_manifest(manifest)
        t0 = time.perf_counter()
        hyps = transcribe(model, tokenizer, extractor, [r["audio"] for r in rows], args.batch_size)
        refs = [r["text"] for r in rows]
        name = os.path.splitext(os.path.basename(manifest))[0]
        record = {"manifest": name, "clips": len(rows), "decoder": f"{args.encoder} (CTranslate2, greedy)",
                  **word_error_rates(refs, hyps),
                  **{f"{k}_plain": v for k, v in word_error_rates([_plain(r) for r in refs],
                                                                  [_plain(h) for h in hyps]).items()},
                  "by_voice": _by_voice(rows, hyps), "s_per_clip": (time.perf_counter() - t0) / len(rows),
                  "examples": [{"ref": r, "hyp": h} for r, h in zip(refs[:3], hyps[:3])]}
        tag = os.path.basename(os.path.normpath(args.encoder))
        atomic_write_json(os.path.join(args.out, f"{tag}-{name}.json"), record)
        print(f"{tag} {name}: WER {record['wer']:.3f} CER {record['cer']:.3f}", flush=True)


if __name__ == "__main__":
    main()
