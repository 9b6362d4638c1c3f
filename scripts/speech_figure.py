"""WER, audio gap and forgetting over training steps for train-speech runs (the paper's Figure 1 analogue).

    python scripts/speech_figure.py runs/speech-fig1/*-seed* -o docs/img/speech_fig1.png [--examples]

Prints a markdown table, one row per run (final WER/CER and audio gap on the whole test set, the CTC head's
reading, the LLM's control-perplexity increase, train loss), then one row per arm averaged over its seeds
(runs named ARM-seedN), and with --examples three transcripts per run. Writes a three-panel PNG against
steps: WER and audio gap on the evaluation clips, and the control-perplexity increase. A run folder with a
news_forgetting.json (the older scripts/speech_ablation.sh) also gets that figure in its row.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import defaultdict


def _load(run: str) -> dict:
    with open(os.path.join(run, "speech_train.json"), encoding="utf-8") as f:
        r = json.load(f)
    r["name"] = os.path.basename(os.path.normpath(run))
    news = os.path.join(run, "news_forgetting.json")
    if os.path.exists(news):
        with open(news, encoding="utf-8") as f:
            r["news_dppl"] = json.load(f)["dppl"]
    return r


def _fmt(x, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _row(r: dict) -> list:
    fin = r["final"]
    return [fin["wer"], fin["cer"], fin.get("audio_gap"), fin.get("ctc_cer"), fin.get("dppl", r.get("news_dppl")),
            r["train_loss"]]


def _tables(runs: list[dict], control: str) -> None:
    cols = ["final WER", "final CER", "audio gap (nats)", "CTC CER", f"{control} dPPL", "train loss"]
    specs = [".3f", ".3f", "+.3f", ".3f", "+.2f", ".3f"]
    print("| run | trainable LLM params | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for r in runs:
        vals = " | ".join(_fmt(v, s) for v, s in zip(_row(r), specs))
        print(f"| {r['name']} | {r['trainable']['llm']:,} ({r['trainable']['llm_tensors']} tensors) | {vals} |")
    arms = defaultdict(list)
    for r in runs:
        arms[re.sub(r"-seed\d+$", "", r["name"])].append(r)
    if all(len(v) == 1 for v in arms.values()):
        return
    print("\nMean over seeds (per-seed values in the table above):\n")
    print("| arm | seeds | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for arm, rs in arms.items():
        rows = [_row(r) for r in rs]
        means = [None if any(v[i] is None for v in rows) else sum(v[i] for v in rows) / len(rows)
                 for i in range(len(cols))]
        print(f"| {arm} | {len(rs)} | " + " | ".join(_fmt(m, s) for m, s in zip(means, specs)) + " |")


def _examples(runs: list[dict]) -> None:
    for r in runs:
        print(f"\n{r['name']}:")
        for ex in r["final"].get("examples", [])[:3]:
            print(f"- ref: {ex['ref']!r}\n  hyp: {ex['hyp']!r}")


def _plot(runs: list[dict], control: str, output: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("wer", "WER (evaluation clips)", "speech recognition"),
              ("audio_gap", "wrong-audio minus right-audio loss (nats)", "does it listen?"),
              ("dppl", f"{control} perplexity increase", "LLM forgetting")]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for r in runs:
        for ax, (key, _, _) in zip(axes, panels):
            h = [x for x in r["history"] if x.get(key) is not None]
            ax.plot([x["step"] for x in h], [x[key] for x in h], marker="o", markersize=3, label=r["name"])
    for ax, (_, ylabel, title) in zip(axes, panels):
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(output, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--control", default="news", help="name of the control text in the table (the runs' --control)")
    ap.add_argument("--examples", action="store_true", help="also print three transcripts per run")
    a = ap.parse_args()
    runs = [_load(r) for r in a.runs]
    _tables(runs, a.control)
    if a.examples:
        _examples(runs)
    _plot(runs, a.control, a.output)


if __name__ == "__main__":
    main()
