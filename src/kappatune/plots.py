"""PNG figures for compare (the forgetting lab) (matplotlib, imported lazily; install the [plots] extra)."""

from __future__ import annotations

import math
import os
import statistics

from .report import KappaReport, Selection


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_frontier(out: dict, control: str, path: str) -> None:
    """Accuracy against forgetting for every sweep run (one line per method through its learning rates) and
    each method's seeded mean with 95% intervals: the matched-performance view."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.8, 4.8))
    cmap = plt.get_cmap("tab20")
    key = f"forgetting_dnll[{control}]"
    for i, (m, figs) in enumerate(out["per_method"].items()):
        rs = sorted((r for r in out["sweep"] if r["method"] == m), key=lambda r: r["lr"])
        ax.plot([r["accuracy"] for r in rs], [r[key] for r in rs], "-", color=cmap(i), alpha=0.45, lw=1)
        ax.scatter([r["accuracy"] for r in rs], [r[key] for r in rs], color=cmap(i), s=14, alpha=0.6)
        acc, fg = figs["accuracy"], figs[key]
        err = (lambda iv: None if iv.get("low") is None else [[iv["mean"] - iv["low"]], [iv["high"] - iv["mean"]]])
        ax.errorbar(acc["mean"], fg["mean"], xerr=err(acc), yerr=err(fg), fmt="o", color=cmap(i), label=m,
                    capsize=3, ms=6)
    ax.axvline(out["base"]["accuracy"], color="grey", ls=":", lw=1, label="base accuracy")
    ax.set_xlabel("task accuracy (label-token logits)")
    ax.set_ylabel(f"forgetting: per-token CE increase on {control}")
    ax.set_title("frontier over the learning-rate sweep; chosen rate: mean, 95% CI")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_kappa_monitor(monitors: dict[str, dict], path: str) -> None:
    """log10 kappa of every trained tensor before (x) and after (y) training, per method: points above the
    diagonal were carved towards higher kappa."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.6, 5.0))
    cmap = plt.get_cmap("tab20")
    lo, hi = math.inf, -math.inf
    for i, (m, mon) in enumerate(monitors.items()):
        rows = [r for r in mon.get("summary", {}).get("tensors", {}).values()
                if r["kappa_before"] and r["kappa_after"] and r["kappa_before"] > 0 and r["kappa_after"] > 0]
        xs = [math.log10(r["kappa_before"]) for r in rows]
        ys = [math.log10(r["kappa_after"]) for r in rows]
        if xs:
            lo, hi = min(lo, *xs, *ys), max(hi, *xs, *ys)
            ax.scatter(xs, ys, s=10, alpha=0.6, color=cmap(i), label=f"{m} ({len(xs)})")
    if math.isfinite(lo):
        ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls=":")
    ax.set_xlabel("log10 kappa before training")
    ax.set_ylabel("log10 kappa after training")
    ax.set_title("kappa monitor: trained tensors (LoRA: merged weight)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_lab(out: dict, folder: str) -> list[str]:
    """The compare figures: frontier per control corpus, kappa monitor, kappa distribution and heatmap."""
    paths = []
    for c in out["config"]["controls"]:
        paths.append(os.path.join(folder, f"frontier_{_slug(c)}.png"))
        plot_frontier(out, c, paths[-1])
    sels = {}
    for m, lr in out["chosen_lr"].items():
        run = _seed0_run(folder, m, lr)
        if os.path.exists(os.path.join(run, "selection.json")):
            sels[m] = Selection.load(os.path.join(run, "selection.json")).names
    paths.append(os.path.join(folder, "kappa_monitor.png"))
    plot_kappa_monitor(seed0_monitors(out, folder), paths[-1])
    report_path = os.path.join(folder, "report.json")
    if os.path.exists(report_path):
        report = KappaReport.load(report_path)
        paths += [os.path.join(folder, "kappa_distribution.png"), os.path.join(folder, "kappa_heatmap.png")]
        plot_kappa_distribution(report, sels, paths[-2])
        plot_kappa_heatmap(report, paths[-1])
    return paths


def _seed0_run(folder: str, method: str, lr: float) -> str:
    """The folder of a method's run at its chosen rate, seed 0 (the lab's RunSpec naming)."""
    return os.path.join(folder, "runs", f"{method}-lr{lr:g}-seed0")


def seed0_monitors(out: dict, folder: str) -> dict[str, dict]:
    """Each method's kappa monitor at its chosen rate, seed 0: the run's own kappa_monitor.json, or the
    summary scripts/collect_lab.py keeps of it (kappa_monitor_summary.json: all a committed or restored run
    has), in the monitor's layout."""
    import json

    monitors = {}
    for m, lr in out["chosen_lr"].items():
        run = _seed0_run(folder, m, lr)
        for name, wrap in (("kappa_monitor.json", False), ("kappa_monitor_summary.json", True)):
            path = os.path.join(run, name)
            if os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    monitors[m] = {"summary": json.load(f)} if wrap else json.load(f)
                break
    return monitors


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in os.path.basename(name))


def plot_kappa_distribution(report: KappaReport, selections: dict[str, list[str]], path: str) -> None:
    plt = _plt()
    logk = {u.name: math.log10(u.kappa) for u in report.units if u.status == "ok"}
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.hist(list(logk.values()), bins=50, color="lightgrey", edgecolor="grey", label="all units")
    cmap = plt.get_cmap("tab10")
    ymax = ax.get_ylim()[1]
    for i, (label, names) in enumerate(selections.items()):
        xs = [logk[n] for n in names if n in logk]
        ax.plot(xs, [ymax * (0.95 - 0.06 * i)] * len(xs), "|", ms=12, color=cmap(i), label=f"{label} ({len(xs)})")
    ax.set_xlabel("log10 kappa")
    ax.set_ylabel("units")
    ax.set_title("kappa distribution, selected units marked")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_kappa_heatmap(report: KappaReport, path: str) -> None:
    plt = _plt()
    cells: dict[tuple[int, str], list[float]] = {}
    for u in report.units:
        if u.status == "ok" and u.layer is not None:
            cells.setdefault((u.layer, u.kind), []).append(math.log10(u.kappa))
    if not cells:
        return
    layers = sorted({k[0] for k in cells})
    kinds = sorted({k[1] for k in cells})
    import numpy as np

    grid = np.full((len(layers), len(kinds)), np.nan)
    for (l, k), v in cells.items():
        grid[layers.index(l), kinds.index(k)] = statistics.median(v)
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(kinds), 1.5 + 0.22 * len(layers)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), [str(l) for l in layers], fontsize=7)
    ax.set_ylabel("layer")
    ax.set_title("log10 kappa by layer and module (median over experts)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
