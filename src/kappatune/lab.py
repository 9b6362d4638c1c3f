"""The forgetting lab: methods compared at equal budget, each at its own tuned learning rate, over paired
seeds, with the power to tell them apart (``kappatune compare``).

Protocol (every step resumable: a run is done when its ``result.json`` exists):

1. **Sweep**: every method at every learning rate of its grid, seed 0.
2. **Choose**: per method, the rate with the best *validation* accuracy (task accuracy alone: forgetting
   never chooses, so no method is tuned towards the answer we measure).
3. **Seeds**: seeds 1..N-1 at the chosen rate (seed 0 is the sweep run). Runs with the same seed share the
   data order, so contrasts are paired by seed.
4. **Analyse**: per method mean and 95% interval of every metric; paired contrasts (kappatune -
   random-same-kind, kappatune - lora, kappatune - the best peer, kappatune-lora - lora) with intervals and a
   verdict; the accuracy-vs-forgetting frontier over the sweep.

Metrics per run: test accuracy (label tokens), validation accuracy, forgetting on each control corpus
(perplexity increase over the base model, and the per-token cross-entropy increase), the generalisation gap
PPL(test) - PPL(train), the final training loss, wall time, tokens/s, peak memory, and the kappa monitor's
summary (how much training moved the spectra of the trained tensors).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, field

from ._io import atomic_write_json
from .errors import KappaTuneError
from .frontier import accuracy_levels, bounds_at_accuracy, forgetting_at_accuracy

log = logging.getLogger(__name__)

# learning-rate grids per method family (a method's own entry in LabConfig.lr_grid wins)
DEFAULT_GRIDS = {"selective": (3e-4, 1e-3, 3e-3), "adapter": (3e-4, 1e-3, 3e-3), "full": (1e-5, 3e-5, 1e-4)}
PEERS = ("osf", "corda-kpm", "mica", "pissa", "dora")   # PEFT's forgetting-aware methods and variants
CONTRASTS = (("kappatune", "random-same-kind"), ("kappatune", "lora"), ("kappatune", "<best peer>"),
             ("kappatune-lora", "lora"))
RUN_METRICS = ("accuracy", "val_accuracy", "generalisation_gap", "final_train_loss", "wall_s", "tokens_per_s",
               "peak_rss_mb", "trainable_params", "kappa_dlog10_median")


@dataclass
class LabConfig:
    model: str = field(default="smollm2", metadata={"help": "model folder, Hub id org/name, or 'smollm2' (built-in)"})
    revision: str | None = field(default=None, metadata={"help": "Hub branch, tag or commit of the model (Hub ids)"})
    methods: tuple[str, ...] = field(default=("kappatune", "random-same-kind", "lora", "kappatune-lora"),
                                     metadata={"help": "registered training methods to compare"})
    seeds: int = field(default=5, metadata={"help": "seeds per method at its chosen learning rate (>= 1)"})
    lr_grid: dict = field(default_factory=dict, metadata={
        "help": "learning rates per method or family ('selective', 'adapter', 'full'); default DEFAULT_GRIDS"})
    budget_params: str | int = field(default="2M", metadata={"help": "trainable parameters, every method but full"})
    train: str | None = field(default=None, metadata={"help": "task train file (default: built-in tweets)"})
    test: str | None = field(default=None, metadata={"help": "task test file (default: built-in tweets)"})
    train_size: int = field(default=192, metadata={"help": "built-in tweets: training examples"})
    val_size: int = field(default=150, metadata={"help": "validation examples (taken from the training pool)"})
    test_size: int = field(default=600, metadata={"help": "built-in tweets: test examples (SE ~0.02 at 600)"})
    controls: tuple[str, ...] = field(default=("wikipedia", "news"),
                                      metadata={"help": "control corpora for forgetting: wikipedia, news, files"})
    max_chunks: int = field(default=32, metadata={"help": "chunks per control corpus"})
    chunk_len: int = field(default=256, metadata={"help": "tokens per control chunk"})
    epochs: float = field(default=2.0, metadata={"help": "training epochs (max_steps > 0 overrides)"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps per run (> 0 overrides epochs)"})
    batch_size: int = field(default=8, metadata={"help": "examples per optimizer step"})
    target_loss: float | None = field(default=None, metadata={
        "help": "stop each run once its logged training loss reaches this (matched-performance view)"})
    method_options: dict = field(default_factory=dict, metadata={"help": "{method: {option: value}}"})
    variants: dict = field(default_factory=dict, metadata={
        "help": "{label: {'method': a registered method, TrainConfig field: value, ...}}: a method with other "
                "settings (e.g. a fixed LoRA alpha), run and reported under its own label"})
    contrasts: tuple[str, ...] = field(default=(), metadata={"help": "extra paired contrasts 'a:b' (method labels)"})
    monitor_every: int = field(default=0, metadata={"help": "kappa monitor interval in steps (0: ends only)"})
    template: str | None = field(default=None, metadata={"help": "prompt template (default: the tweet one)"})
    output: str = field(default="runs/compare", metadata={"help": "output folder (resumable)"})
    isolate: bool = field(default=True, metadata={"help": "one subprocess per run (clean peak memory)"})
    progress: bool = False

    def __post_init__(self):
        from .methods import get_method

        self.methods = tuple(self.methods)
        self.controls = tuple(self.controls)
        self.contrasts = tuple(self.contrasts)
        check_variants(self.variants)
        for m in self.methods:
            get_method(base_method(self, m))
        for c in self.contrasts:
            a, _, b = c.partition(":")
            if not b or a not in self.methods or b not in self.methods:
                raise KappaTuneError(f"contrast {c!r}: give 'a:b' with both among the methods compared")
        if self.seeds < 1:
            raise KappaTuneError("seeds must be >= 1")
        for k in ("train_size", "val_size", "test_size", "max_chunks", "chunk_len", "batch_size"):
            if getattr(self, k) <= 0:
                raise KappaTuneError(f"{k} must be positive, got {getattr(self, k)}")
        if not self.controls:
            raise KappaTuneError("give at least one control corpus")
        for m, lrs in self.lr_grid.items():
            if not lrs or any(float(x) <= 0 for x in lrs):
                raise KappaTuneError(f"learning-rate grid of {m!r} must hold positive rates, got {lrs}")

    def grid(self, method: str) -> tuple[float, ...]:
        from .methods import get_method

        base = base_method(self, method)
        fam = get_method(base).family
        grid = self.lr_grid.get(method) or self.lr_grid.get(base) or self.lr_grid.get(fam) or DEFAULT_GRIDS[fam]
        return tuple(float(x) for x in grid)


# settings a variant may not change: they are what the protocol holds equal, or have their own option
FIXED_FOR_VARIANTS = ("method", "seed", "lr", "budget_params", "method_options", "progress")


def check_variants(variants: dict) -> None:
    """Each variant names a registered method and only TrainConfig fields the protocol lets it change."""
    from .methods import METHODS, get_method
    from .train import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for label, settings in variants.items():
        if label in METHODS:
            raise KappaTuneError(f"variant {label!r}: the label is a registered method's name; choose another")
        if not isinstance(settings, dict) or "method" not in settings:
            raise KappaTuneError(f"variant {label!r}: needs the method it varies ({{'method': ...}})")
        get_method(settings["method"])
        for key in settings:
            if key != "method" and (key not in fields or key in FIXED_FOR_VARIANTS):
                raise KappaTuneError(f"variant {label!r}: {key!r} is not a setting a variant can change "
                                     f"(TrainConfig fields except {', '.join(FIXED_FOR_VARIANTS)})")


def base_method(cfg: LabConfig, label: str) -> str:
    """The registered method behind a label (a variant's method, or the label itself)."""
    return cfg.variants[label]["method"] if label in cfg.variants else label


@dataclass(frozen=True)
class RunSpec:
    method: str
    lr: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}-lr{self.lr:g}-seed{self.seed}"


# ------------------------------------------------------------------------------------------------ data
def task_data(cfg: LabConfig) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, validation, test) rows; validation comes out of the training pool, never the test set."""
    from .data import demo_tweets, load_records

    if (cfg.train is None) != (cfg.test is None):
        raise KappaTuneError("give both --train and --test, or neither (built-in tweets)")
    if cfg.train is None:
        pool, test = demo_tweets(cfg.train_size + cfg.val_size, cfg.test_size, seed=0)
    else:
        pool, test = load_records(cfg.train), load_records(cfg.test)
    if len(pool) <= cfg.val_size:
        raise KappaTuneError(f"the training pool has {len(pool)} rows, not more than val_size {cfg.val_size}")
    return pool[cfg.val_size:], pool[: cfg.val_size], test


def control_sets(cfg: LabConfig, tokenizer) -> dict[str, list[list[int]]]:
    """{corpus: the first max_chunks chunks}: refused when a corpus is too short for the chunks asked."""
    from .data import control_text
    from .evaluate import control_chunks

    out = {}
    for name in cfg.controls:
        text = control_text(name)
        if text is None:
            raise KappaTuneError(f"control corpus {name!r}: no text")
        chunks = control_chunks(tokenizer, text, cfg.chunk_len, cfg.max_chunks)
        if len(chunks) < cfg.max_chunks:
            raise KappaTuneError(f"control corpus {name!r} has only {len(chunks)} chunks of {cfg.chunk_len} tokens; "
                                 f"ask for fewer (--max-chunks) or shorter chunks")
        out[name] = chunks
    return out


# ------------------------------------------------------------------------------------------------ one run
def method_options_for(cfg: LabConfig, method: str) -> dict:
    """The user's options for ``method``; a method that must keep clear of the evaluation chunks (CorDA's
    calibration) is told where they are unless the user said otherwise."""
    import dataclasses

    from .methods import get_method

    base = base_method(cfg, method)
    opts = dict(cfg.method_options.get(method) or cfg.method_options.get(base) or {})
    options = get_method(base).options
    known = {f.name for f in dataclasses.fields(options)} if options else set()
    for key, value in (("eval_chunks", cfg.max_chunks), ("eval_chunk_len", cfg.chunk_len)):
        if key in known:
            opts.setdefault(key, value)
    return opts


def train_config(cfg: LabConfig, spec: RunSpec):
    from .train import TrainConfig

    settings = dict(epochs=cfg.epochs, max_steps=cfg.max_steps, batch_size=cfg.batch_size, save_steps=10_000,
                    logging_steps=4, monitor_every=cfg.monitor_every,
                    **({"template": cfg.template} if cfg.template else {}))
    settings.update({k: v for k, v in cfg.variants.get(spec.method, {}).items() if k != "method"})
    return TrainConfig(method=base_method(cfg, spec.method), budget_params=cfg.budget_params, lr=spec.lr,
                       seed=spec.seed, progress=cfg.progress, method_options=method_options_for(cfg, spec.method),
                       **settings)


def _template(cfg: LabConfig):
    from .data import PromptTemplate

    return PromptTemplate(cfg.template) if cfg.template else PromptTemplate()


def evaluate_run(model, tok, cfg: LabConfig, data, controls) -> dict:
    """Every per-model figure of the protocol: accuracies, control NLL/PPL per corpus, the generalisation gap."""
    from .evaluate import accuracy_and_perplexity, label_accuracy, perplexity, task_perplexity

    train_rows, val_rows, test_rows = data
    tpl = _template(cfg)
    labels = sorted({str(r[tpl.answer_field]) for r in train_rows})
    test = accuracy_and_perplexity(model, tok, test_rows, tpl, labels)  # one forward for both
    out = {"accuracy": test["accuracy"]["accuracy"],
           "val_accuracy": label_accuracy(model, tok, val_rows, tpl, labels)["accuracy"]}
    for name, chunks in controls.items():
        p = perplexity(model, tok, chunks=chunks)
        out[f"control_ppl[{name}]"], out[f"control_nll[{name}]"] = p["ppl"], p["nll"]
    p_test, p_train = test["ppl"]["ppl"], task_perplexity(model, tok, train_rows, tpl)["ppl"]
    out.update(task_test_ppl=p_test, task_train_ppl=p_train, generalisation_gap=p_test - p_train)
    return out


def run_one(cfg: LabConfig, spec: RunSpec, run_dir: str) -> dict:
    """Train one (method, lr, seed), evaluate it, write run_dir/result.json last (the done marker)."""
    from .models import load_model
    from .report import KappaReport
    from .train import train

    data = task_data(cfg)
    model, tok = load_model(cfg.model, revision=cfg.revision)
    controls = control_sets(cfg, tok)
    report = KappaReport.load(os.path.join(cfg.output, "report.json"))
    cbs = [stop_at_loss(cfg.target_loss)] if cfg.target_loss is not None else []
    tr = train(model, tok, data[0], run_dir, train_config(cfg, spec), report=report, extra_callbacks=cbs)
    # a PEFT model was merged and saved: evaluate exactly what was saved
    final = load_model(os.path.join(run_dir, "model"))[0] if os.path.isdir(os.path.join(run_dir, "adapter")) \
        else model
    ev = evaluate_run(final, tok, cfg, data, controls)
    base = _load_json(os.path.join(cfg.output, "base.json"))
    for name in cfg.controls:
        ev[f"forgetting_dppl[{name}]"] = ev[f"control_ppl[{name}]"] - base[f"control_ppl[{name}]"]
        ev[f"forgetting_dnll[{name}]"] = ev[f"control_nll[{name}]"] - base[f"control_nll[{name}]"]
    mon = tr.info.get("kappa_monitor", {})
    res = dict(asdict(spec), **ev, final_train_loss=tr.final_train_loss, train_loss=tr.train_loss,
               wall_s=tr.wall_s, tokens_per_s=tr.tokens_per_s, peak_rss_mb=tr.peak_rss_mb,
               trainable_params=tr.trainable_params, steps=tr.steps,
               kappa_dlog10_median=mon.get("median_dlog10_kappa"),
               info={k: v for k, v in tr.info.items() if k not in ("config", "target_modules")})
    for d in ("model", "checkpoints", "adapter"):  # large, and not needed once evaluated
        shutil.rmtree(os.path.join(run_dir, d), ignore_errors=True)
    atomic_write_json(os.path.join(run_dir, "result.json"), _finite(res))
    return res


def stop_at_loss(target: float):
    """A Trainer callback that stops once a logged training loss is <= ``target`` (equal-loss comparisons)."""
    from transformers import TrainerCallback

    class StopAtLoss(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs and logs["loss"] <= target:
                control.should_training_stop = True
            return control

    return StopAtLoss()


def _finite(o):
    """JSON without NaN/inf tokens (they become null)."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def _load_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _child(cfg_dict: dict, spec: dict, run_dir: str, q) -> None:  # pragma: no cover - runs in a subprocess
    import sys

    sys.stdout = sys.stderr  # the Trainer prints its metrics; the parent's stdout is for results
    try:
        run_one(LabConfig(**cfg_dict), RunSpec(**spec), run_dir)
        q.put(None)
    except BaseException as e:
        q.put(f"{type(e).__name__}: {' '.join(str(e).split())}")


def execute(cfg: LabConfig, spec: RunSpec) -> dict:
    """The run's result, training it first unless a finished result.json exists (a killed run restarts)."""
    run_dir = os.path.join(cfg.output, "runs", spec.name)
    done = os.path.join(run_dir, "result.json")
    if os.path.exists(done):
        return _load_json(done)
    shutil.rmtree(run_dir, ignore_errors=True)
    log.info("training %s", spec.name)
    if not cfg.isolate:
        return run_one(cfg, spec, run_dir)
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(asdict(cfg), asdict(spec), run_dir, q))
    p.start()
    p.join()
    err = q.get() if not q.empty() else f"exit code {p.exitcode}"
    if err:
        raise KappaTuneError(f"run {spec.name} failed: {err}")
    return _load_json(done)


# ------------------------------------------------------------------------------------------------ protocol
def preflight(cfg: LabConfig):
    """Every input problem as a one-line error before the first run trains: unknown methods and bad method
    options (TrainConfig), control corpora too short, a budget a method cannot meet. Returns what it loaded
    (model, tokenizer, task data, control chunks) for the base-model figures."""
    from .data import resolve_model
    from .models import load_model
    from .scanner import scan

    for m in cfg.methods:
        for lr in cfg.grid(m):
            train_config(cfg, RunSpec(m, lr, 0))
    model, tok = load_model(cfg.model, revision=cfg.revision)
    controls = control_sets(cfg, tok)
    data = task_data(cfg)
    report_path = os.path.join(cfg.output, "report.json")
    if not os.path.exists(report_path):
        scan(resolve_model(cfg.model, cfg.revision), progress=cfg.progress).save(report_path)
    _check_budget(cfg, model, report_path)
    return model, tok, data, controls


def _check_budget(cfg: LabConfig, model, report_path: str) -> None:
    from .methods import get_method
    from .methods.lora import LORA_DEFAULT_TARGETS, lora_modules
    from .methods.selective import order_of, selection_for
    from .policies import parse_size
    from .report import KappaReport

    budget = parse_size(cfg.budget_params)
    report = KappaReport.load(report_path)
    for m in {base_method(cfg, label) for label in cfg.methods}:
        if order_of(m) is not None:
            selection_for(report, order_of(m), budget_params=budget)  # raises with the reason
        elif get_method(m).family == "adapter":
            step = sum(mod.in_features + mod.out_features for _, mod in lora_modules(model, LORA_DEFAULT_TARGETS))
            if budget < step / 2:
                raise KappaTuneError(f"budget of {budget:,} parameters is below half of one LoRA rank step "
                                     f"({step:,}) on this model: {m} cannot meet it")


def base_figures(cfg: LabConfig, loaded=None) -> dict:
    """The base model's figures (base.json), computed once; ``loaded`` is what ``preflight`` returned."""
    path = os.path.join(cfg.output, "base.json")
    if not os.path.exists(path):
        if loaded is None:
            from .models import load_model

            model, tok = load_model(cfg.model, revision=cfg.revision)
            loaded = (model, tok, task_data(cfg), control_sets(cfg, tok))
        model, tok, data, controls = loaded
        atomic_write_json(path, evaluate_run(model, tok, cfg, data, controls))
    return _load_json(path)


def choose_lrs(cfg: LabConfig, sweep: list[dict]) -> dict[str, float]:
    """Per method, the sweep rate with the best validation accuracy (ties: the smaller rate)."""
    out = {}
    for m in cfg.methods:
        runs = [r for r in sweep if r["method"] == m]
        out[m] = max(runs, key=lambda r: (r["val_accuracy"], -r["lr"]))["lr"]
    return out


def sweep_specs(cfg: LabConfig) -> list[RunSpec]:
    """Seed-0 runs of every method at every rate of its grid, the middle rates first."""
    order = []
    for m in cfg.methods:
        grid = cfg.grid(m)
        mid = len(grid) // 2
        order += [(rank, i, RunSpec(m, lr, 0)) for i, lr in enumerate(grid)
                  for rank in [0 if i == mid else 1 + abs(i - mid)]]
    return [spec for _, _, spec in sorted(order, key=lambda t: (t[0], t[1]))]


def run_lab(cfg: LabConfig) -> dict:
    """The whole protocol (module docstring); returns and writes results.json / results.md."""
    os.makedirs(cfg.output, exist_ok=True)
    base = base_figures(cfg, preflight(cfg))
    # rate-major order: an interrupted sweep has every method at its middle rate first
    sweep = [execute(cfg, spec) for spec in sweep_specs(cfg)]
    chosen = choose_lrs(cfg, sweep)
    atomic_write_json(os.path.join(cfg.output, "chosen_lrs.json"), chosen)
    seeded = [r for r in sweep if r["lr"] == chosen[r["method"]]]
    for seed in range(1, cfg.seeds):
        seeded += [execute(cfg, RunSpec(m, chosen[m], seed)) for m in cfg.methods]
    out = analyse(cfg, base, sweep, seeded, chosen)
    write_outputs(cfg, out)
    return out


def analyse_existing(cfg: LabConfig) -> dict:
    """The analysis of whatever runs have finished (no training): methods whose sweep is complete get their
    rate chosen and their finished seeds counted; ``missing`` names the runs still to do that can be named
    (sweep runs, seeds at chosen rates), ``pending_seeds`` counts the seeds of methods still sweeping."""
    def done(spec: RunSpec) -> dict | None:
        path = os.path.join(cfg.output, "runs", spec.name, "result.json")
        return _load_json(path) if os.path.exists(path) else None

    specs = sweep_specs(cfg)
    sweep = [r for r in map(done, specs) if r is not None]
    complete = [m for m in cfg.methods if all(done(RunSpec(m, lr, 0)) for lr in cfg.grid(m))]
    chosen = choose_lrs(dataclasses.replace(cfg, methods=tuple(complete)), sweep) if complete else {}
    seeded = [r for r in sweep if chosen.get(r["method"]) == r["lr"]]
    seeded += [r for m, lr in chosen.items() for s in range(1, cfg.seeds) if (r := done(RunSpec(m, lr, s)))]
    missing = [x.name for x in specs if done(x) is None]
    missing += [RunSpec(m, lr, s).name for m, lr in chosen.items() for s in range(1, cfg.seeds)
                if done(RunSpec(m, lr, s)) is None]
    sub = dataclasses.replace(cfg, methods=tuple(complete)) if complete else cfg
    out = analyse(sub, base_figures(cfg), sweep, seeded, chosen) if complete else \
        {"config": asdict(cfg), "base": base_figures(cfg), "chosen_lr": {}, "sweep": sweep, "runs": [],
         "per_method": {}, "contrasts": [], "kappa_vs_forgetting": _finite(kappa_vs_forgetting(cfg, sweep))}
    out["missing"] = missing
    # a method still sweeping has seeds to come at a rate not chosen yet: counted, not named
    out["pending_seeds"] = {m: cfg.seeds - 1 for m in cfg.methods if m not in complete and cfg.seeds > 1}
    return out


# ------------------------------------------------------------------------------------------------ analysis
def metric_names(cfg: LabConfig) -> list[str]:
    forget = [f"forgetting_{k}[{c}]" for c in cfg.controls for k in ("dppl", "dnll")]
    return ["accuracy", "val_accuracy", *forget, *RUN_METRICS[2:]]


def _by_seed(runs: list[dict], method: str, metric: str) -> dict[int, float]:
    return {r["seed"]: r[metric] for r in runs if r["method"] == method and r.get(metric) is not None}


def best_peer(cfg: LabConfig, seeded: list[dict]) -> str | None:
    """The PEFT peer with the least forgetting (mean per-token CE increase on the first control corpus)."""
    from .stats import mean_interval

    key = f"forgetting_dnll[{cfg.controls[0]}]"
    peers = [m for m in cfg.methods if m in PEERS]
    if not peers:
        return None
    return min(peers, key=lambda m: mean_interval(list(_by_seed(seeded, m, key).values())).mean)


def kappa_vs_forgetting(cfg: LabConfig, runs: list[dict]) -> dict:
    """Does the kappa monitor's figure predict forgetting? Over every finished run of a selective method (the
    monitor then follows the trained weights themselves): Pearson r, with its 95% interval, between the mean
    |change of log10 kappa| of the trained tensors and the forgetting (per-token CE increase) on each control
    corpus; and the mean signed change of the median trained tensor (> 0: training raised kappa, "carving")."""
    from .methods import get_method
    from .stats import correlation, mean_interval

    unique = {(r["method"], r["lr"], r["seed"]): r for r in runs}.values()
    chosen = [r for r in unique if get_method(base_method(cfg, r["method"])).family == "selective"
              and r.get("info", {}).get("kappa_monitor", {}).get("mean_abs_dlog10_kappa") is not None]

    def summary(rs: list[dict]) -> dict:
        moved = [r["info"]["kappa_monitor"]["mean_abs_dlog10_kappa"] for r in rs]
        out = {"runs": len(rs),
               "median_dlog10_kappa": mean_interval([r.get("kappa_dlog10_median") for r in rs]).to_dict()}
        for c in cfg.controls:
            out[f"r[{c}]"] = correlation(moved, [r.get(f"forgetting_dnll[{c}]") for r in rs]).to_dict()
        return out

    # pooled over methods the correlation mixes tensor kinds whose kappa moves on different scales (a
    # highest-kappa q_proj's kappa falls about sevenfold at no forgetting), so each method is also read on its own
    methods = sorted({r["method"] for r in chosen})
    return {**summary(chosen), "per_method": {m: summary([r for r in chosen if r["method"] == m]) for m in methods}}


def analyse(cfg: LabConfig, base: dict, sweep: list[dict], seeded: list[dict], chosen: dict) -> dict:
    from .stats import mean_interval, paired_contrast, verdict

    metrics = metric_names(cfg)
    per_method = {m: {k: mean_interval(list(_by_seed(seeded, m, k).values())).to_dict() for k in metrics}
                  for m in cfg.methods}
    peer = best_peer(cfg, seeded)
    contrasts = []
    for a, b in CONTRASTS + tuple(tuple(c.split(":", 1)) for c in cfg.contrasts):
        b = peer if b == "<best peer>" else b
        if b is None or a not in cfg.methods or b not in cfg.methods:
            continue
        for k in ["accuracy", *[f"forgetting_dnll[{c}]" for c in cfg.controls], "generalisation_gap"]:
            iv = paired_contrast(_by_seed(seeded, a, k), _by_seed(seeded, b, k))
            contrasts.append({"a": a, "b": b, "metric": k, **iv.to_dict(), "verdict": verdict(iv)})
    levels = accuracy_levels(base["accuracy"], sweep)
    return _finite({"config": asdict(cfg), "base": base, "chosen_lr": chosen, "best_peer": peer,
                    "per_method": per_method, "contrasts": contrasts, "sweep": sweep, "runs": seeded,
                    "kappa_vs_forgetting": kappa_vs_forgetting(cfg, sweep + seeded),
                    "at_accuracy": {"levels": levels,
                                    "forgetting": forgetting_at_accuracy(sweep, levels, list(cfg.controls)),
                                    "upper_bound": bounds_at_accuracy(sweep, levels, list(cfg.controls))}})


def _fmt_iv(iv: dict, fmt: str) -> str:
    if iv.get("mean") is None:
        return ""
    if iv.get("low") is None:
        return fmt.format(iv["mean"])
    return f"{fmt.format(iv['mean'])} [{fmt.format(iv['low'])}, {fmt.format(iv['high'])}]"


def _partial_line(missing: list[str], pending_seeds: dict[str, int]) -> str:
    """How much of the protocol is still to run: the named runs (sweep runs, and seeds at chosen rates) plus
    the seeds of methods whose rate is not chosen yet."""
    n = len(missing) + sum(pending_seeds.values())
    parts = [f"e.g. {', '.join(missing[:3])}"] if missing else []
    if pending_seeds:
        methods = "1 method whose sweep is" if len(pending_seeds) == 1 else \
            f"{len(pending_seeds)} methods whose sweep is"
        parts.append(f"{sum(pending_seeds.values())} of them the seeds of {methods} not complete")
    return (f"**Partial**: {n} runs of the protocol are not done yet ({'; '.join(parts)}); the figures below "
            "use the finished ones.")


def markdown(out: dict) -> str:
    cfg = out["config"]
    ctrl = cfg["controls"]
    cols = [("accuracy", "{:.3f}")] + [(f"forgetting_dnll[{c}]", "{:+.4f}") for c in ctrl] + \
        [(f"forgetting_dppl[{c}]", "{:+.3f}") for c in ctrl] + \
        [("generalisation_gap", "{:+.2f}"), ("final_train_loss", "{:.3f}"), ("trainable_params", "{:,.0f}"),
         ("kappa_dlog10_median", "{:+.4f}")]
    base = out["base"]
    partial = [_partial_line(out.get("missing", []), out.get("pending_seeds", {})), ""] \
        if out.get("missing") or out.get("pending_seeds") else []
    head = partial + [f"base model: accuracy {base['accuracy']:.3f}; " +
                      "; ".join(f"{c} PPL {base[f'control_ppl[{c}]']:.2f}" for c in ctrl), ""]
    if not out["per_method"]:
        return "\n".join(head + ["No method has finished its learning-rate sweep yet: no chosen rate, no seeds, "
                                 "no contrast."] + monitor_lines(out) + sweep_table(out)) + "\n"
    lines = head + [
             "Per method at its chosen learning rate (mean [95% interval] over seeds):", "",
             "| method | lr | n | " + " | ".join(c for c, _ in cols) + " |", "|---|---|---|" + "---|" * len(cols)]
    for m, figs in out["per_method"].items():
        cells = [_fmt_iv(figs[c], f) for c, f in cols]
        lines.append(f"| {m} | {out['chosen_lr'][m]:g} | {figs['accuracy']['n']} | " + " | ".join(cells) + " |")
    variants = cfg.get("variants") or {}
    if variants:
        lines += ["", "Variants: " + "; ".join(
            f"{label} = {v['method']} with " + ", ".join(f"{k}={x}" for k, x in v.items() if k != "method")
            for label, v in variants.items())]
    lines += ["", "Paired contrasts (a - b, same seeds; 95% interval):", "",
              "| a | b | metric | n | mean [95% interval] | verdict |", "|---|---|---|---|---|---|"]
    for c in out["contrasts"]:
        lines.append(f"| {c['a']} | {c['b']} | {c['metric']} | {c['n']} | {_fmt_iv(c, '{:+.4f}')} | {c['verdict']} |")
    return "\n".join(lines + monitor_lines(out) + equal_accuracy_table(out) + sweep_table(out)) + "\n"


def equal_accuracy_table(out: dict) -> list[str]:
    """Forgetting at shared accuracies, interpolated along each method's sweep (frontier.py says how)."""
    view = out.get("at_accuracy") or {}
    levels, rows = view.get("levels") or [], view.get("forgetting") or {}
    bounds = view.get("upper_bound") or {}
    if not levels or not rows:
        return []
    lines = []
    for c in out["config"]["controls"]:
        lines += ["", f"Forgetting (dNLL, {c}) at equal test accuracy, interpolated along the rising part of each "
                      "method's seed-0 sweep (blank: never reached; <= x: the gentlest rate already passed that "
                      "accuracy with forgetting x; one seed, no interval):", "",
                  "| method | " + " | ".join(f"acc {lv:.2f}" for lv in levels) + " |", "|---|" + "---|" * len(levels)]
        for m, per_control in rows.items():
            bound = bounds.get(m, {}).get(c) or [None] * len(levels)
            cells = [_at_accuracy_cell(v, b) for v, b in zip(per_control[c], bound)]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def _at_accuracy_cell(value: float | None, bound: float | None) -> str:
    if value is not None:
        return f"{value:+.3f}"
    return "" if bound is None else f"<= {bound:+.3f}"


def monitor_lines(out: dict) -> list[str]:
    kvf = out.get("kappa_vs_forgetting")
    if not kvf or kvf["runs"] < 3:
        return []
    med = kvf["median_dlog10_kappa"]
    controls = out["config"]["controls"]
    cells = [f"{c}: r = {_fmt_r(kvf[f'r[{c}]'])}" for c in controls]
    lines = ["", f"Kappa monitor over {kvf['runs']} selective runs: the median trained tensor's log10 kappa moved by "
                 f"{_fmt_iv(med, '{:+.4f}')} (> 0: training raised kappa); mean |change| against forgetting (dNLL), "
                 + "; ".join(cells) + "."]
    per = kvf.get("per_method") or {}
    if len(per) > 1:
        lines += ["", "Per method (its sweep and seeds; r needs 3 runs):", "",
                  "| method | runs | median change of log10 kappa | " + " | ".join(f"r, {c}" for c in controls) + " |",
                  "|---|---|---|" + "---|" * len(controls)]
        for m, k in per.items():
            lines.append(f"| {m} | {k['runs']} | {_fmt_iv(k['median_dlog10_kappa'], '{:+.4f}')} | "
                         + " | ".join(_fmt_r(k[f'r[{c}]']) for c in controls) + " |")
    return lines


def _fmt_r(c: dict) -> str:
    def missing(x) -> bool:
        return x is None or (isinstance(x, float) and math.isnan(x))

    if missing(c.get("r")):
        return "n/a"
    iv = " (no interval below 4 runs)" if missing(c.get("low")) else f" [{c['low']:+.2f}, {c['high']:+.2f}]"
    return f"{c['r']:+.2f}{iv} (n = {c['n']})"


def sweep_table(out: dict) -> list[str]:
    """Every finished sweep run (seed 0 at each rate of the grid): single runs, so no interval; the rows the
    learning rate is chosen from (val accuracy) and the frontier is drawn from."""
    ctrl = out["config"]["controls"]
    if not out.get("sweep"):
        return []
    lines = ["", "Every finished sweep run (seed 0; single runs, no interval):", "",
             "| method | lr | accuracy | val accuracy | " + " | ".join(f"dNLL {c}" for c in ctrl) +
             " | gap | final train loss | trainable | kappa dlog10 (median) |",
             "|---|---|---|---|" + "---|" * len(ctrl) + "---|---|---|---|"]
    for r in sorted(out["sweep"], key=lambda r: (r["method"], r["lr"])):
        cells = [f"{r['accuracy']:.3f}", f"{r['val_accuracy']:.3f}",
                 *(f"{r[f'forgetting_dnll[{c}]']:+.4f}" for c in ctrl), f"{r['generalisation_gap']:+.2f}",
                 "" if r.get("final_train_loss") is None else f"{r['final_train_loss']:.3f}",
                 f"{r['trainable_params']:,}",
                 "" if r.get("kappa_dlog10_median") is None else f"{r['kappa_dlog10_median']:+.4f}"]
        lines.append(f"| {r['method']} | {r['lr']:g} | " + " | ".join(cells) + " |")
    return lines


def write_outputs(cfg: LabConfig, out: dict) -> None:
    from ._io import atomic_write_text

    atomic_write_json(os.path.join(cfg.output, "results.json"), out)
    atomic_write_text(os.path.join(cfg.output, "results.md"), markdown(out))
    if not out["per_method"]:
        return
    try:
        from .plots import plot_lab

        plot_lab(out, cfg.output)
    except ImportError as e:
        log.warning("plots skipped (%s): pip install 'kappatune[plots]'", e)
