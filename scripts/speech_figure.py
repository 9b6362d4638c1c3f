"""WER, audio gap and forgetting over training steps for train-speech runs (the paper's Figure 1 analogue).

    python scripts/speech_figure.py runs/speech-fig1/*-seed* -o docs/img/speech_fig1.png [--examples] [--at-step N]

Prints a markdown table, one row per run (final WER/CER and audio gap on the whole test set, the CTC head's
reading, the LLM's control-perplexity increase, train loss), then one row per arm averaged over its seeds
(runs named ARM-seedN), and with --examples three transcripts per run. Writes a three-panel PNG against
steps: WER and audio gap on the evaluation clips, and the control-perplexity increase. A run folder with a
news_forgetting.json (the older scripts/speech_ablation.sh) also gets that figure in its row.

A run stopped before its end (no speech_train.json) is read from its last checkpoint's trainer_state.json
(or a trainer_state.json copied into the run folder): its row is its last evaluation, on the evaluation
clips only, and is marked "stopped at step N". ``--at-step N`` compares every run at one step instead (its
evaluation at step N, and the mean logged training loss up to N): the fair row when runs stopped at
different steps. ``--tradeoff PNG`` (with --at-step) also plots each run's audio gap against its forgetting
at that step, one colour per selection: for a learning-rate sweep whose runs are named
ARM-lrX (or ARM-alrX for the adaptor's rate), each arm's rates become one line, so arms are compared at
equal forgetting rather than at one shared rate.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import defaultdict


def _read(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _trainer_state(run: str) -> str | None:
    """The run's own trainer_state.json, else that of its latest checkpoint (checkpoints/checkpoint-N)."""
    own = os.path.join(run, "trainer_state.json")
    if os.path.exists(own):
        return own
    ckpts = os.path.join(run, "checkpoints")
    steps = sorted((int(m.group(1)), d) for d in (os.listdir(ckpts) if os.path.isdir(ckpts) else [])
                   if (m := re.fullmatch(r"checkpoint-(\d+)", d)))
    for _, d in reversed(steps):
        path = os.path.join(ckpts, d, "trainer_state.json")
        if os.path.exists(path):
            return path
    return None


def _load_stopped(run: str) -> dict:
    """A run interrupted before its end, from its trainer state: the evaluations it logged, the last as final."""
    state_path = _trainer_state(run)
    if state_path is None:
        raise SystemExit(f"{run}: neither speech_train.json nor a checkpoint's trainer_state.json")
    from kappatune.multimodal.speech_train import eval_history  # what train-speech itself records at its end

    state = _read(state_path)
    history, losses = eval_history(os.path.join(run, "speech_eval_step0.json"), state["log_history"])
    if not history:
        raise SystemExit(f"{run}: stopped before its first evaluation ({state_path})")
    evals = [h for h in state["log_history"] if "wer" in h or "dppl" in h]
    final = evals[-1] if evals else history[0]  # the last evaluation with its transcripts
    sel = os.path.join(run, "selection.json")
    units = _read(sel)["units"] if os.path.exists(sel) else []
    return {"final": final, "history": [{k: v for k, v in h.items() if k != "examples"} for h in history],
            "losses": losses, "train_loss": sum(x["loss"] for x in losses) / len(losses) if losses else None,
            "trainable": {"llm": sum(u["numel"] for u in units), "llm_tensors": len(units)},
            "stopped_at": state["global_step"]}


def _load(run: str) -> dict:
    path = os.path.join(run, "speech_train.json")
    r = _read(path) if os.path.exists(path) else _load_stopped(run)
    r["name"] = os.path.basename(os.path.normpath(run))
    news = os.path.join(run, "news_forgetting.json")
    if os.path.exists(news):
        with open(news, encoding="utf-8") as f:
            r["news_dppl"] = json.load(f)["dppl"]
    return r


def _arm(name: str) -> str:
    """The arm of a run named ARM-seedN (the name itself otherwise)."""
    return re.sub(r"-seed\d+$", "", name)


def _family(name: str) -> str:
    """The selection of a run named ARM[-lrX|-alrX][-seedN], without its learning rate and seed."""
    return re.sub(r"-a?lr[0-9.e+-]+$", "", _arm(name))


def _fmt(x, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _at_step(r: dict, step: int) -> tuple[dict, float | None]:
    """The run's evaluation at ``step`` and its mean logged training loss up to it."""
    found = [h for h in r["history"] if h.get("step") == step]
    if not found:
        raise SystemExit(f"{r['name']}: no evaluation at step {step} (it has {[h.get('step') for h in r['history']]})")
    losses = [x["loss"] for x in r.get("losses", []) if x["step"] <= step]
    return found[-1], (sum(losses) / len(losses) if losses else None)


def _row(r: dict, step: int | None = None) -> list:
    fin, loss = (r["final"], r["train_loss"]) if step is None else _at_step(r, step)
    return [fin["wer"], fin["cer"], fin.get("audio_gap"), fin.get("ctc_cer"), fin.get("dppl", r.get("news_dppl")),
            loss]


def _label(r: dict, step: int | None) -> str:
    if step is None and r.get("stopped_at") is not None:
        return f"{r['name']} (stopped at step {r['stopped_at']}; last evaluation)"
    return r["name"]


def _tables(runs: list[dict], control: str, step: int | None = None) -> None:
    when = "final" if step is None else f"step {step}"
    cols = [f"{when} WER", f"{when} CER", "audio gap (nats)", "CTC CER", f"{control} dPPL", "train loss"]
    specs = [".3f", ".3f", "+.3f", ".3f", "+.2f", ".3f"]
    print("| run | trainable LLM params | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for r in runs:
        vals = " | ".join(_fmt(v, s) for v, s in zip(_row(r, step), specs))
        print(f"| {_label(r, step)} | {r['trainable']['llm']:,} ({r['trainable']['llm_tensors']} tensors) | {vals} |")
    arms = defaultdict(list)
    for r in runs:
        arms[_arm(r["name"])].append(r)
    if all(len(v) == 1 for v in arms.values()):
        return
    print("\nMean over seeds (per-seed values in the table above):\n")
    print("| arm | seeds | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for arm, rs in arms.items():
        rows = [_row(r, step) for r in rs]
        means = [None if any(v[i] is None for v in rows) else sum(v[i] for v in rows) / len(rows)
                 for i in range(len(cols))]
        print(f"| {arm} | {len(rs)} | " + " | ".join(_fmt(m, s) for m, s in zip(means, specs)) + " |")


def _examples(runs: list[dict]) -> None:
    for r in runs:
        print(f"\n{r['name']}:")
        for ex in r["final"].get("examples", [])[:3]:
            print(f"- ref: {ex['ref']!r}\n  hyp: {ex['hyp']!r}")


def _pyplot():
    """matplotlib's pyplot on the file-only backend (imported here: the tables need no matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot(runs: list[dict], control: str, output: str) -> None:
    plt = _pyplot()
    panels = [("wer", "WER (evaluation clips)", "speech recognition"),
              ("audio_gap", "wrong-audio minus right-audio loss (nats)", "does it listen?"),
              ("dppl", f"{control} perplexity increase", "LLM forgetting")]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    arms = list(dict.fromkeys(_arm(r["name"]) for r in runs))  # one colour per arm, one line style per seed
    for r in runs:
        colour = plt.get_cmap("tab10")(arms.index(_arm(r["name"])) % 10)
        seed = re.search(r"-seed(\d+)$", r["name"])
        style = ["-", "--", ":", "-."][int(seed.group(1)) % 4] if seed else "-"
        for ax, (key, _, _) in zip(axes, panels):
            h = [x for x in r["history"] if x.get(key) is not None]
            ax.plot([x["step"] for x in h], [x[key] for x in h], marker="o", markersize=3, label=r["name"],
                    color=colour, linestyle=style)
    for ax, (_, ylabel, title) in zip(axes, panels):
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(output, dpi=110)


def _tradeoff_points(runs: list[dict], step: int, control: str) -> dict[str, list[tuple[float, float, str]]]:
    """Per selection, its runs' (forgetting, audio gap, rate label) at ``step``, in order of forgetting."""
    families = defaultdict(list)
    for r in runs:
        h, _ = _at_step(r, step)
        if h.get("dppl") is None or h.get("audio_gap") is None:
            raise SystemExit(f"{r['name']}: no audio gap or {control} perplexity at step {step}")
        family = _family(r["name"])
        families[family].append((h["dppl"], h["audio_gap"], r["name"][len(family) + 1:]))
    return {family: sorted(points) for family, points in families.items()}


def _plot_tradeoff(runs: list[dict], control: str, step: int, output: str) -> None:
    """Audio gap against forgetting at one step, one point per run, a line through each selection's rates."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for i, (family, points) in enumerate(_tradeoff_points(runs, step, control).items()):
        colour = plt.get_cmap("tab10")(i % 10)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=colour, label=family)
        for x, y, rate in points:
            ax.annotate(rate, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(f"{control} perplexity increase at step {step}")
    ax.set_ylabel(f"audio gap at step {step} (nats)")
    ax.set_title("listening bought per unit of forgetting")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--control", default="news", help="name of the control text in the table (the runs' --control)")
    ap.add_argument("--examples", action="store_true", help="also print three transcripts per run")
    ap.add_argument("--at-step", type=int, default=None,
                    help="compare the runs at this step's evaluation (for runs stopped at different steps)")
    ap.add_argument("--tradeoff", default=None, metavar="PNG",
                    help="also plot audio gap against forgetting at --at-step, a line per selection across its rates")
    a = ap.parse_args()
    if a.tradeoff and a.at_step is None:
        raise SystemExit("speech_figure.py: --tradeoff needs --at-step (the step at which the runs are compared)")
    runs = [_load(r) for r in a.runs]
    _tables(runs, a.control, a.at_step)
    if a.examples:
        _examples(runs)
    _plot(runs, a.control, a.output)
    if a.tradeoff:
        _plot_tradeoff(runs, a.control, a.at_step, a.tradeoff)


if __name__ == "__main__":
    main()
