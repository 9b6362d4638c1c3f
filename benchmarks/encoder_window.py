"""Encoding cost of a shorter Whisper window (train-speech --encoder-window): the frozen encoder at its own
30 s window against the same encoder cut to a shorter one, on the same clips.

    python benchmarks/encoder_window.py --window 14 --clips 16           # whisper-tiny (scripts/setup.sh)
    python benchmarks/encoder_window.py --encoder path/to/whisper --window 10

Clips are 4.5 s of low-level noise (the mean length of the speech data); features are computed once outside
the timing. The two encoders alternate batch by batch so machine noise hits both alike. Prints seconds per
clip of each and the ratio full / short (> 1: the short window is that many times cheaper).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--encoder", default="whisper-tiny")
    ap.add_argument("--window", type=float, default=14.0, help="the short window, seconds")
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=4.5, help="length of each clip")
    a = ap.parse_args()
    from kappatune.multimodal.encoders import feature_extractor, load_encoder

    rng = np.random.default_rng(0)
    wavs = [(0.01 * rng.standard_normal(int(16000 * a.seconds))).astype(np.float32) for _ in range(a.clips)]
    encoders = {"full": load_encoder(a.encoder), "short": load_encoder(a.encoder, a.window)}
    feats = {}
    for name, enc in encoders.items():
        enc.eval()
        fe, n_frames = feature_extractor(enc)
        feats[name] = fe(wavs, sampling_rate=16000, return_tensors="pt").input_features[..., :n_frames]
    spent = {name: 0.0 for name in encoders}
    with torch.no_grad():
        for name, enc in encoders.items():  # warm-up, untimed
            enc(feats[name][:1])
        for i in range(0, a.clips, a.batch):
            for name, enc in encoders.items():
                t0 = time.perf_counter()
                enc(feats[name][i:i + a.batch])
                spent[name] += time.perf_counter() - t0
    full, short = spent["full"] / a.clips, spent["short"] / a.clips
    print(f"encoder_window: full window {full:.3f} s/clip, {a.window:g} s window {short:.3f} s/clip, "
          f"ratio full/short {full / short:.2f} (torch threads {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
