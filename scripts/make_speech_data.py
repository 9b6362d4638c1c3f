"""Make a synthetic speech set: real sentences (the Wikipedia sample) spoken by espeak-ng in several voices,
speeds and pitches, 16 kHz mono WAV, as JSONL manifests (one {"audio": path, "text": sentence, "voice": ...,
"speed": ..., "pitch": ...} per line):

    train.jsonl        the training sentences, each in one voice/speed/pitch drawn from the training voices
                       (with --renderings K, each K times in K different training voices)
    test.jsonl         held-out sentences (never in train), spoken by the training voices
    test_unseen.jsonl  the same held-out sentences in a voice never used for training (--unseen-voice)

    apt-get install -y espeak-ng sox          # Debian packages
    python scripts/make_speech_data.py --out data/speech --n 4000 --test 200

Deterministic for a given --seed; clips already on disk are kept, so an interrupted run continues. Sentences of
4-16 words, ASCII letters, digits and basic punctuation. A voice is an espeak-ng language voice plus a variant
("en-gb+f3"): the variant changes the formants and pitch range, the language voice the accent.
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
from concurrent.futures import ThreadPoolExecutor

TRAIN_VOICES = "en-us+m1,en-us+f2,en-gb+m3,en-gb+f1,en-gb-scotland+m2,en-gb-x-gbclan+f3,en-us+m4,en-gb-x-rp+f4"
UNSEEN_VOICE = "en-029+m7"  # Caribbean accent, a variant used by no training voice


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


def speak(text: str, wav: str, voice: str, speed: int, pitch: int) -> None:
    """espeak-ng to a temporary WAV, sox to 16 kHz mono 16-bit, then renamed: no half-written clip is left."""
    if os.path.exists(wav):
        return
    raw, tmp = wav + ".raw.wav", wav + ".tmp.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", raw, text], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run(["sox", raw, "-r", "16000", "-c", "1", "-b", "16", tmp], check=True)
    os.remove(raw)
    os.replace(tmp, wav)


def plan(texts: list[str], n_test: int, voices: list[str], unseen: str, speeds: list[int], pitches: list[int],
         seed: int, renderings: int = 1) -> dict[str, list[dict]]:
    """Which sentence is spoken how: held-out sentences first, each drawn once for the training voices and once
    in the unseen voice (same speed and pitch, so the voice is the only difference between the two test sets).
    ``renderings`` > 1 speaks each training sentence again in other training voices; those rows come after the
    first renderings, which (like the test sets) are the same as with ``renderings=1``, so a set made before
    keeps its clips and a run on it can be compared with one on the larger set."""
    if not 1 <= renderings <= len(voices):
        raise SystemExit(f"--renderings must be between 1 and the {len(voices)} training voices, got {renderings}")
    rows = _first_renderings(texts, n_test, voices, unseen, speeds, pitches, seed)
    rows["train"] += _extra_renderings(rows["train"], voices, speeds, pitches, seed, renderings)
    return rows


def _first_renderings(texts: list[str], n_test: int, voices: list[str], unseen: str, speeds: list[int],
                      pitches: list[int], seed: int) -> dict[str, list[dict]]:
    rng = random.Random(seed + 1)
    rows: dict[str, list[dict]] = {"train": [], "test": [], "test_unseen": []}
    for i, text in enumerate(texts):
        style = {"voice": rng.choice(voices), "speed": rng.choice(speeds), "pitch": rng.choice(pitches)}
        if i < n_test:
            rows["test"].append(dict(style, text=text, clip=f"test-{i:05d}"))
            rows["test_unseen"].append(dict(style, text=text, voice=unseen, clip=f"unseen-{i:05d}"))
        else:
            rows["train"].append(dict(style, text=text, clip=f"train-{i:05d}"))
    return rows


def _extra_renderings(first: list[dict], voices: list[str], speeds: list[int], pitches: list[int], seed: int,
                      renderings: int) -> list[dict]:
    """Renderings 2..K of each training sentence, from their own random stream (so the first renderings do not
    change), each in a training voice the sentence has not been spoken in yet: a new accent or formant set is
    what the encoder's frames vary most with, more than speed or pitch."""
    rng = random.Random(seed + 2)
    voices_used = {row["clip"]: {row["voice"]} for row in first}
    extra = []
    for k in range(1, renderings):
        for row in first:
            used = voices_used[row["clip"]]
            style = {"voice": rng.choice([v for v in voices if v not in used]), "speed": rng.choice(speeds),
                     "pitch": rng.choice(pitches)}
            used.add(style["voice"])
            extra.append(dict(style, text=row["text"], clip=f"{row['clip']}-r{k}"))
    return extra


def within_seconds(rows: list[dict], wav_dir: str, max_seconds: float) -> tuple[list[dict], int]:
    """The rows whose clip lasts at most ``max_seconds``, and how many were left out."""
    import wave

    kept = []
    for r in rows:
        with wave.open(os.path.join(wav_dir, r["clip"] + ".wav")) as w:
            if w.getnframes() <= max_seconds * w.getframerate():
                kept.append(r)
    return kept, len(rows) - len(kept)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/speech")
    ap.add_argument("--n", type=int, default=4000, help="sentences in all (train + test)")
    ap.add_argument("--test", type=int, default=200, help="held-out sentences")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--voices", default=TRAIN_VOICES, help="training voices, comma-separated espeak-ng names")
    ap.add_argument("--unseen-voice", default=UNSEEN_VOICE, help="the second test set's voice")
    ap.add_argument("--speeds", default="145,175,205", help="words per minute (espeak-ng -s)")
    ap.add_argument("--pitches", default="35,50,65", help="espeak-ng -p, 0-99")
    ap.add_argument("--renderings", type=int, default=1,
                    help="how many times each training sentence is spoken, each time in another training voice")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="leave training clips longer than this out of train.jsonl (e.g. the encoder window "
                         "train-speech will use: --encoder-window refuses longer clips); test sets are kept whole")
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: apt-get install -y espeak-ng sox")
    voices = [v for v in a.voices.split(",") if v]
    if a.unseen_voice in voices:
        raise SystemExit(f"--unseen-voice {a.unseen_voice} is also a training voice")
    if not 0 < a.test < a.n:
        raise SystemExit(f"--test must be between 1 and --n - 1, got {a.test}")
    if a.max_seconds is not None and a.max_seconds <= 0:
        raise SystemExit(f"--max-seconds must be positive, got {a.max_seconds:g}")
    speeds, pitches = [int(x) for x in a.speeds.split(",")], [int(x) for x in a.pitches.split(",")]
    rows = plan(sentences(a.n, a.seed), a.test, voices, a.unseen_voice, speeds, pitches, a.seed, a.renderings)
    wav_dir = os.path.join(a.out, "wav")
    os.makedirs(wav_dir, exist_ok=True)
    jobs = [(r["text"], os.path.join(wav_dir, r["clip"] + ".wav"), r["voice"], r["speed"], r["pitch"])
            for part in rows.values() for r in part]
    with ThreadPoolExecutor(max_workers=a.workers) as pool:
        list(pool.map(lambda j: speak(*j), jobs))
    if a.max_seconds is not None:
        rows["train"], dropped = within_seconds(rows["train"], wav_dir, a.max_seconds)
        print(f"{dropped} training clips over {a.max_seconds:g} s left out")
    for name, part in rows.items():
        tmp = os.path.join(a.out, f".{name}.jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for r in part:
                wav = os.path.abspath(os.path.join(wav_dir, r["clip"] + ".wav"))
                f.write(json.dumps({"audio": wav, "text": r["text"], "voice": r["voice"], "speed": r["speed"],
                                    "pitch": r["pitch"]}) + "\n")
        os.replace(tmp, os.path.join(a.out, f"{name}.jsonl"))
    print(f"{len(rows['train'])} train / {len(rows['test'])} test / {len(rows['test_unseen'])} unseen-voice "
          f"utterances in {a.out}")


if __name__ == "__main__":
    main()
