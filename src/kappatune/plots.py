"""PNG figures for compare (matplotlib, imported lazily; install the [plots] extra)."""

from __future__ import annotations

import json
import math
import os
import statistics


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_forgetting_vs_accuracy(out: dict, path: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    methods = [a["method"] for a in out["aggregate"]]
    cmap = plt.get_cmap("tab10")
    for i, m in enumerate(methods):
        rs = [r for r in out["runs"] if r["method"] == m]
        ax.scatter([r["accuracy"] for r in rs], [r["forgetting_dppl"] for r in rs], color=cmap(i), alpha=0.35, s=18)
        a = next(x for x in out["aggregate"] if x["method"] == m)
        ax.errorbar(a["accuracy_mean"], a["forgetting_dppl_mean"], xerr=a["accuracy_std"],
                    yerr=a["forgetting_dppl_std"], fmt="o", color=cmap(i), label=m, capsize=3)
    ax.axvline(out["base"]["accuracy"], color="grey", ls=":", lw=1, label="base accuracy")
    ax.set_xlabel("task accuracy (label-token logits)")
    ax.set_ylabel("forgetting: control PPL - base PPL")
    ax.set_title("forgetting against task accuracy (mean ± std over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_kappa_distribution(report: dict, selections: dict[str, list[str]], path: str) -> None:
    plt = _plt()
    units = [u for u in report["units"] if u["status"] == "ok"]
    logk = {u["name"]: math.log10(float(u["kappa"])) for u in units}
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


def plot_kappa_heatmap(report: dict, path: str) -> None:
    plt = _plt()
    cells: dict[tuple[int, str], list[float]] = {}
    for u in report["units"]:
        if u["status"] == "ok" and u.get("layer") is not None:
            cells.setdefault((u["layer"], u["kind"]), []).append(math.log10(float(u["kappa"])))
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


def plot_compare(out: dict, report_path: str, folder: str) -> list[str]:
    with open(report_path, encoding="utf-8") as f:
        report = json.load(f)
    sels = {}
    for m in ("kappatune", "highest-kappa", "random-same-kind", "random"):
        p = os.path.join(folder, "runs", f"{m}-seed0", "selection.json")
        if os.path.exists(p):
            with open(p, encoding="utf-8") as f:
                sels[m] = [u["name"] for u in json.load(f)["units"]]
    paths = [os.path.join(folder, n) for n in ("forgetting_vs_accuracy.png", "kappa_distribution.png",
                                               "kappa_heatmap.png")]
    plot_forgetting_vs_accuracy(out, paths[0])
    plot_kappa_distribution(report, sels, paths[1])
    plot_kappa_heatmap(report, paths[2])
    return paths
