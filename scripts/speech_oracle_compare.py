"""Compare oracle-probe arms at their last evaluation, with paired intervals over the held-out sentences (issue
15; docs/speech.md "An oracle for the LLM's side").

Every arm of scripts/speech_oracle_probe.py evaluates the same sentences in the same order, so two arms'
outputs pair sentence by sentence. For each arm that kept its outputs (``hyps``) the WER difference against
the reference arm gets a t interval over sentences: the per-sentence word errors (substitutions, deletions,
insertions, scored exactly as eval-speech scores) differenced, averaged, and divided by the mean reference
length, so the interval is on the pooled WER. Arms without outputs are listed without an interval.

  python scripts/speech_oracle_compare.py --test data/speech/probe_test.jsonl --reference lowest-seed1 \
      lowest-seed0=docs/results/speech-oracle/cer-0.json lowest-seed1=docs/results/speech-oracle/lowest-seed1/cer-0.json ...
"""

from __future__ import annotations

import argparse
import json

from kappatune._io import atomic_write_json
from kappatune.stats import mean_interval, verdict


def sentence_errors(refs: list[str], hyps: list[str]) -> list[int]:
    """Word edits (S + D + I) per sentence, jiwer's default words (case and punctuation count)."""
    import jiwer

    out = []
    for ref, hyp in zip(refs, hyps, strict=True):
        if not hyp.strip():  # nothing written: every reference word is deleted
            out.append(len(ref.split()))
            continue
        m = jiwer.process_words(ref, hyp)
        out.append(m.substitutions + m.deletions + m.insertions)
    return out


def wer_contrast(refs: list[str], hyps_a: list[str], hyps_b: list[str]) -> dict:
    """Pooled WER of a minus b with a t interval over sentences."""
    words = sum(len(r.split()) for r in refs) / len(refs)
    diffs = [(a - b) / words for a, b in zip(sentence_errors(refs, hyps_a), sentence_errors(refs, hyps_b))]
    iv = mean_interval(diffs)
    return {"wer_diff": iv.mean, "low": iv.low, "high": iv.high, "sentences": iv.n,
            "verdict": verdict(iv, "sentences")}


def trained(arm: dict) -> str:
    """What an arm trains, for the table: its tensor count, or a peer method's name and rank."""
    if arm.get("method") and arm.get("selected") is None:
        info = arm.get("method_info") or {}
        return f"{arm['method']} r{info['rank']}" if "rank" in info else arm["method"]
    n = len(arm["selected"])
    return f"{n} tensor" if n == 1 else f"{n} tensors"


def last_eval(path: str) -> tuple[dict, dict]:
    with open(path, encoding="utf-8") as f:
        arm = json.load(f)
    return arm, arm["evals"][-1]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("arms", nargs="+", metavar="NAME=FILE", help="an arm's name and its oracle-probe JSON")
    ap.add_argument("--test", required=True, help="the held-out manifest the arms evaluated")
    ap.add_argument("--reference", required=True, help="the arm every other is paired against")
    ap.add_argument("-o", "--out", help="also write the comparison as JSON")
    args = ap.parse_args(argv)
    arms = dict(a.split("=", 1) for a in args.arms)
    if args.reference not in arms:
        raise SystemExit(f"--reference {args.reference} is not one of the arms ({', '.join(arms)})")
    with open(args.test, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    ref_hyps = last_eval(arms[args.reference])[1].get("hyps")
    rows = []
    print("| arm | trains | WER | gap, nats | news dPPL | WER minus the reference [95% CI over sentences] |")
    print("|---|---|---|---|---|---|")
    for name, path in arms.items():
        arm, ev = last_eval(path)
        row = {"arm": name, "file": path, "order": arm["order"], "method": arm.get("method"), "seed": arm["seed"],
               "lr": arm["lr"], "trained": trained(arm),
               "selected": arm["selected"], "step": ev["step"], "clips": ev["clips"], "wer": ev["wer"],
               "gap": ev["gap"], "dppl": ev["dppl"]}
        if name != args.reference and ref_hyps and ev.get("hyps"):
            row["vs_reference"] = wer_contrast(texts[:ev["clips"]], ev["hyps"], ref_hyps)
        rows.append(row)
        c = row.get("vs_reference")
        shown = f"{c['wer_diff']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]: {c['verdict']}" if c else ""
        print(f"| {name} | {row['trained']} | {ev['wer']:.3f} | {ev['gap']:.2f} | {ev['dppl']:+.1f} | {shown} |")
    if args.out:
        atomic_write_json(args.out, {"reference": args.reference, "test": args.test, "arms": rows})


if __name__ == "__main__":
    main()
