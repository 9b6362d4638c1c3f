"""WER and forgetting over training steps for train-speech runs (the paper's Figure 1 analogue).

    python scripts/speech_figure.py runs/speech-lowest runs/speech-highest runs/speech-random -o fig.png

Prints a markdown table (final WER/CER on the whole test set, forgetting dPPL, train loss) and writes a
two-panel PNG: WER on the evaluation clips and the LLM's control-perplexity increase against steps.
"""

from __future__ import annotations

import argparse
import json
import os


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("-o", "--output", required=True)
    a = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    print("| LLM tensors | trainable LLM params | final WER | final CER | Wikipedia dPPL (base) | news dPPL (base) "
          "| train loss |")
    print("|---|---|---|---|---|---|---|")
    for run in a.runs:
        with open(os.path.join(run, "speech_train.json"), encoding="utf-8") as f:
            r = json.load(f)
        order = r["meta"].get("order", os.path.basename(run))
        h = [x for x in r["history"] if "wer" in x]
        ax1.plot([x["step"] for x in h], [x["wer"] for x in h], marker="o", label=order)
        d = [x for x in r["history"] if "dppl" in x]
        ax2.plot([x["step"] for x in d], [x["dppl"] for x in d], marker="o", label=order)
        fin = r["final"]
        news = "n/a"
        npath = os.path.join(run, "news_forgetting.json")
        if os.path.exists(npath):
            with open(npath, encoding="utf-8") as f:
                nd = json.load(f)
            news = f"{nd['dppl']:+.3f} ({nd['base_control_ppl']:.2f})"
        print(f"| {order} | {r['trainable']['llm']:,} ({r['trainable']['llm_tensors']} tensors) | "
              f"{fin['wer']:.3f} | {fin['cer']:.3f} | {fin.get('dppl', float('nan')):+.3f} "
              f"({r['base_control_ppl']:.2f}) | {news} | {r['train_loss']:.3f} |")
    ax1.set_xlabel("training step")
    ax1.set_ylabel("WER (evaluation clips)")
    ax1.set_title("speech recognition")
    ax2.set_xlabel("training step")
    ax2.set_ylabel("control PPL increase")
    ax2.set_title("LLM perplexity change (Wikipedia sample)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(a.output, dpi=110)


if __name__ == "__main__":
    main()
