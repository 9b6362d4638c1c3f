"""Make a synthetic speech set: real sentences (the Wikipedia sample) spoken by espeak-ng, 16 kHz mono WAV,
split into train and test manifests (JSONL lines {"audio": path, "text": sentence}).

    apt-get install -y espeak-ng sox          # Debian packages
    python scripts/make_speech_data.py --out data/speech --n 400 --test 80

Deterministic for a given --seed. Sentences of 4-16 words, ASCII letters, digits and basic punctuation.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys


def sentences(n: int, seed: int) -> list[str]:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))
    from kappatune.data import wikipedia_text

    text = wikipedia_text()
    cands = []
    for s in re.split(r"(?<=[.!?])\s+", text.replace("\n", " ")):
        s = " ".join(s.split())
        if 4 <= len(s.split()) <= 16 and re.fullmatch(r"[A-Za-z0-9 ,.'-]+[.!?]?", s):
            cands.append(s)
    cands = sorted(set(cands))
    random.Random(seed).shuffle(cands)
    if len(cands) < n:
        raise SystemExit(f"only {len(cands)} usable sentences, asked for {n}")
    return cands[:n]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="data/speech")
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--test", type=int, default=80)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--voice", default="en-us")
    a = ap.parse_args()
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: apt-get install -y espeak-ng sox")
    wav_dir = os.path.join(a.out, "wav")
    os.makedirs(wav_dir, exist_ok=True)
    rows = []
    for i, s in enumerate(sentences(a.n, a.seed)):
        raw = os.path.join(wav_dir, f"{i:05d}.raw.wav")
        wav = os.path.join(wav_dir, f"{i:05d}.wav")
        if not os.path.exists(wav):
            subprocess.run(["espeak-ng", "-v", a.voice, "-w", raw, s], check=True)
            subprocess.run(["sox", raw, "-r", "16000", "-c", "1", "-b", "16", wav], check=True)
            os.remove(raw)
        rows.append({"audio": os.path.abspath(wav), "text": s})
    test, train = rows[: a.test], rows[a.test:]
    for name, part in (("train", train), ("test", test)):
        tmp = os.path.join(a.out, f".{name}.jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for r in part:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, os.path.join(a.out, f"{name}.jsonl"))
    print(f"{len(train)} train / {len(test)} test utterances in {a.out}")


if __name__ == "__main__":
    main()
