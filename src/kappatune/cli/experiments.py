"""kappatune demo, kappatune compare."""

from __future__ import annotations

import contextlib
import sys

from ..errors import KappaTuneError
from ..lab import DEFAULT_GRIDS, LabConfig
from .common import add_command, add_train_options, csv_list


def register(sub) -> None:
    p = add_command(
        sub, "demo", func=cmd_demo, help="KappaTune next to LoRA on SmolLM2-135M: tweets and Wikipedia, offline",
        description="Shows KappaTune at work in a few minutes on a laptop, offline: fine-tunes SmolLM2-135M on "
                    "tweet sentiment with KappaTune and with LoRA at the same parameter budget, and prints "
                    "task accuracy next to forgetting (perplexity increase on Wikipedia text).",
        example="kappatune demo --methods kappatune,lora --budget-params 2M")
    p.add_argument("--model", default="smollm2", help="'smollm2' (built-in) or a local model folder")
    p.add_argument("--methods", default="kappatune,lora", help="comma-separated training methods")
    p.add_argument("--train-size", type=int, default=192, help="training tweets (balanced classes)")
    p.add_argument("--test-size", type=int, default=90, help="held-out tweets for label accuracy")
    add_train_options(p, demo=True)
    p.add_argument("--max-chunks", type=int, default=8, help="Wikipedia control chunks")
    p.add_argument("--chunk-len", type=int, default=256)
    p.add_argument("--output", "-o", default="runs/demo")
    p.add_argument("--no-progress", action="store_true")

    _register_compare(sub)


def _register_compare(sub) -> None:
    p = add_command(
        sub, "compare", func=cmd_compare,
        help="the forgetting lab: methods at equal budget, tuned learning rates, paired seeds, 95%% intervals",
        description="Answers \"does KappaTune forget less than what I would use instead, on my model?\": every "
                    "method (KappaTune, its random controls, LoRA, and PEFT's OSF, CorDA, MiCA, PiSSA, DoRA, full "
                    "fine-tuning) trains at the same parameter budget; each gets its own learning rate from a "
                    "sweep judged on a validation split by task accuracy alone; then several seeds at that rate, "
                    "paired by seed. Writes per-method means with 95% intervals, paired contrasts with a verdict, "
                    "the accuracy-vs-forgetting frontier and the kappa monitor plots. Finished runs are kept: an "
                    "interrupted compare resumes.",
        example="kappatune compare smollm2 --methods kappatune,random-same-kind,lora,osf --seeds 5 -o runs/lab")
    p.add_argument("model", help="local model folder, a Hub id org/name, or 'smollm2' / 'gemma3' (built-in)")
    p.add_argument("--revision", help=_help("revision"))
    p.add_argument("--methods", default=",".join(LabConfig.methods), help="comma-separated training methods")
    p.add_argument("--seeds", type=int, default=LabConfig.seeds, help=_help("seeds"))
    p.add_argument("--lrs", help="one learning-rate grid for every method, e.g. 3e-4,1e-3,3e-3 (default: per family, "
                                 "see --lr-grid)")
    p.add_argument("--lr-grid", action="append", default=[], metavar="NAME=LR,LR,...",
                   help="grid for one method or family (selective, adapter, full); repeatable; defaults: " +
                        "; ".join(f"{k}={','.join(f'{x:g}' for x in v)}" for k, v in DEFAULT_GRIDS.items()))
    p.add_argument("--lr", type=float, help="a single learning rate for every method (no sweep)")
    p.add_argument("--budget-params", default="2M", help=_help("budget_params"))
    p.add_argument("--train", help=_help("train"))
    p.add_argument("--test", help=_help("test"))
    for name in ("train_size", "val_size", "test_size", "max_chunks", "chunk_len", "batch_size", "max_steps",
                 "monitor_every"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(LabConfig, name), help=_help(name))
    p.add_argument("--epochs", type=float, default=LabConfig.epochs, help=_help("epochs"))
    p.add_argument("--controls", default=",".join(LabConfig.controls), help=_help("controls"))
    p.add_argument("--control", help="a single control corpus (same as --controls NAME)")
    p.add_argument("--target-loss", type=float, help=_help("target_loss"))
    p.add_argument("--method-option", action="append", default=[], metavar="METHOD:KEY=VALUE",
                   help="an option of one method, e.g. corda-kpm:corpus=wikipedia (repeatable)")
    p.add_argument("--variant", action="append", default=[], metavar="LABEL=METHOD[,KEY=VALUE...]",
                   help="a method with other training settings, compared under LABEL (repeatable), e.g. "
                        "kappatune-lora-alpha8=kappatune-lora,lora_alpha=8; KEY: a kappatune train setting "
                        "(lora_alpha, lora_rank, max_steps, ...); then name LABEL in --methods")
    p.add_argument("--contrast", action="append", default=[], metavar="A:B",
                   help="an extra paired contrast A - B between two compared methods or variants (repeatable)")
    p.add_argument("--template", help="prompt template (default the tweet template)")
    p.add_argument("--output", "-o", default="runs/compare")
    p.add_argument("--no-isolate", action="store_true", help="run in this process (peak memory is then cumulative)")
    p.add_argument("--analyse-only", action="store_true",
                   help="train nothing: tables and plots from the runs finished so far (lists what is missing)")


def _help(name: str) -> str:
    import dataclasses

    return next(f.metadata.get("help", "") for f in dataclasses.fields(LabConfig) if f.name == name)


def cmd_demo(a) -> int:
    from ..experiments import DemoConfig, markdown_table, run_demo

    cfg = DemoConfig(model=a.model, methods=csv_list(a.methods), train_size=a.train_size, test_size=a.test_size,
                     epochs=a.epochs, lr=a.lr, batch_size=a.batch_size, budget_params=a.budget_params,
                     chunk_len=a.chunk_len, max_chunks=a.max_chunks, seed=a.seed, output=a.output,
                     progress=not a.no_progress)
    with contextlib.redirect_stdout(sys.stderr):
        res = run_demo(cfg)
    sys.stdout.write(markdown_table(res["table"]))
    sys.stdout.write(f"\n({res['wall_s']:.0f} s in all; results in {a.output}/results.json)\n")
    return 0


def _lr_grid(a) -> dict:
    grid = {}
    if a.lrs:
        grid.update({fam: _floats(a.lrs) for fam in DEFAULT_GRIDS})
    for item in a.lr_grid:
        name, sep, vals = item.partition("=")
        if not sep:
            raise KappaTuneError(f"--lr-grid {item!r}: expected NAME=LR,LR,...")
        grid[name.strip()] = _floats(vals)
    if a.lr is not None:
        grid = {fam: (a.lr,) for fam in DEFAULT_GRIDS}
    return grid


def _floats(s: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in csv_list(s))
    except ValueError:
        raise KappaTuneError(f"cannot read {s!r} as comma-separated learning rates") from None


def _method_options(items: list[str]) -> dict:
    out: dict = {}
    for item in items:
        method, sep, kv = item.partition(":")
        key, sep2, value = kv.partition("=")
        if not (sep and sep2 and key):
            raise KappaTuneError(f"--method-option {item!r}: expected METHOD:KEY=VALUE")
        out.setdefault(method, {})[key] = value
    return out


def _variants(items: list[str]) -> dict:
    """--variant LABEL=METHOD,KEY=VALUE,... -> {label: {'method': METHOD, KEY: value}} (numbers read as JSON)."""
    import json

    out: dict = {}
    for item in items:
        label, sep, rest = item.partition("=")
        method, *pairs = csv_list(rest) if sep else [""]
        if not (label.strip() and method):
            raise KappaTuneError(f"--variant {item!r}: expected LABEL=METHOD[,KEY=VALUE...]")
        settings = {"method": method}
        for pair in pairs:
            key, sep2, value = pair.partition("=")
            if not (sep2 and key):
                raise KappaTuneError(f"--variant {item!r}: {pair!r} is not KEY=VALUE")
            try:
                settings[key.strip()] = json.loads(value)
            except ValueError:
                settings[key.strip()] = value
        out[label.strip()] = settings
    return out


def cmd_compare(a) -> int:
    from ..data import parse_template
    from ..lab import LabConfig, analyse_existing, markdown, run_lab, write_outputs

    cfg = LabConfig(model=a.model, revision=a.revision, methods=csv_list(a.methods), seeds=a.seeds, lr_grid=_lr_grid(a),
                    budget_params=a.budget_params, train=a.train, test=a.test, train_size=a.train_size,
                    val_size=a.val_size, test_size=a.test_size,
                    controls=(a.control,) if a.control else csv_list(a.controls), max_chunks=a.max_chunks,
                    chunk_len=a.chunk_len, epochs=a.epochs, max_steps=a.max_steps, batch_size=a.batch_size,
                    target_loss=a.target_loss, method_options=_method_options(a.method_option),
                    monitor_every=a.monitor_every, template=parse_template(a.template) or None, output=a.output,
                    isolate=not a.no_isolate, variants=_variants(a.variant), contrasts=tuple(a.contrast))
    with contextlib.redirect_stdout(sys.stderr):
        if a.analyse_only:
            out = analyse_existing(cfg)
            write_outputs(cfg, out)
        else:
            out = run_lab(cfg)
    sys.stdout.write(markdown(out))
    return 0
