"""Does a shorter encoder window cost accuracy? (issue 15; docs/speech.md "A shorter encoder window")

For each window: encode the training manifest (through the frames cache) and the test manifests (afresh,
timed) with the frozen Whisper encoder cut to that window, train the adaptor with the character-CTC stage
alone (the same seed, steps and batches for every window), and read each test set back through the CTC head
(character error rate). No LLM is involved, so this isolates what the window does to the encoder's frames.
Writes one JSON per window into --out.

  python scripts/speech_window_probe.py --windows 30,14 --train data/speech/probe_train.jsonl \
      --test data/speech/probe_test.jsonl --test data/speech/probe_test_unseen.jsonl --out docs/results/speech-window
  (add --stage-weights 30=runs/speech-probe/ctc-stage/ctc_stage.safetensors to reuse that probe's stage)
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from kappatune._io import atomic_write_json
from kappatune.models import load_model
from kappatune.multimodal.ctc import char_targets
from kappatune.multimodal.ctc_stage import ctc_pretrain
from kappatune.multimodal.encoders import encoder_window_s, feature_extractor, load_encoder
from kappatune.multimodal.model import SpeechLLM
from kappatune.multimodal.frames_cache import frames_cache_dir
from kappatune.multimodal.speech_train import check_clips, ctc_reading, encode_clips, load_manifest


def probe(window: float, args) -> dict:
    train_rows = load_manifest(args.train)
    tests = {path: load_manifest(path) for path in args.test}
    check_clips(train_rows + [r for rows in tests.values() for r in rows], encoder_window_s(args.encoder, window))
    encoder = load_encoder(args.encoder, window)
    fe, n_frames = feature_extractor(encoder)
    llm, _ = load_model(args.model)
    for p in llm.parameters():
        p.requires_grad_(False)
    torch.manual_seed(args.seed)  # the same adaptor initialisation for every window
    model = SpeechLLM(encoder, llm, heads=llm.config.num_attention_heads, ctc_weight=1.0, out_norm=True)
    train_frames = encode_clips(model, fe, train_rows, n_frames, cache_dir=frames_cache_dir())
    t0 = time.perf_counter()  # the test clips are encoded afresh (no cache): they time the encoder
    test_frames = {path: encode_clips(model, fe, rows, n_frames) for path, rows in tests.items()}
    n_test = sum(len(rows) for rows in tests.values())
    encode_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    reused = args.stage_weights.get(window)
    if reused:  # a CTC stage train-speech already ran with these settings (same seed, init and batches)
        from safetensors.torch import load_file

        model.adaptor.load_state_dict(load_file(reused))
        history = []
    else:
        history = ctc_pretrain(model.adaptor, train_frames, [char_targets(r["text"]) for r in train_rows],
                               steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                               log_every=250)
    model.adaptor.eval()
    cer = {os.path.basename(path): ctc_reading(model.adaptor, frames, [r["text"] for r in tests[path]])["cer"]
           for path, frames in test_frames.items()}
    return {"window_s": window, "encode_s_per_clip": encode_s / n_test, "train_clips": len(train_rows),
            "ctc_steps": args.steps, "lr": args.lr, "batch_size": args.batch_size, "seed": args.seed,
            "ctc_wall_s": None if reused else time.perf_counter() - t0, "ctc_cer": cer, "history": history,
            "stage_weights": reused}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", default="30,14", help="comma-separated windows in seconds")
    ap.add_argument("--train", required=True)
    ap.add_argument("--test", action="append", required=True)
    ap.add_argument("--encoder", default="whisper-tiny")
    ap.add_argument("--model", default="smollm2", help="the LLM (only its width and embedding scale are used)")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stage-weights", action="append", default=[], metavar="SECONDS=PATH",
                    help="for that window, read the adaptor of a train-speech CTC stage (ctc_stage.safetensors) "
                         "trained with the same --steps/--lr/--batch-size/--seed instead of training it again")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    args.stage_weights = {float(k): v for k, v in (x.split("=", 1) for x in args.stage_weights)}
    os.makedirs(args.out, exist_ok=True)
    for w in [float(x) for x in args.windows.split(",")]:
        path = os.path.join(args.out, f"window-{w:g}s.json")
        if os.path.exists(path):  # resumable: a finished window is kept
            continue
        atomic_write_json(path, probe(w, args))
        print(path, flush=True)


if __name__ == "__main__":
    main()
