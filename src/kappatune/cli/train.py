"""kappatune train, kappatune eval."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys

from ..errors import KappaTuneError
from .common import add_command, add_train_options, csv_list, write_json

LORA_TARGETS_HELP = "q_proj,v_proj,gate_proj,up_proj,down_proj"  # = methods.lora.LORA_DEFAULT_TARGETS (no torch)
# the registered methods (kappatune.methods.METHODS; spelled out because --help imports no torch; a test checks)
METHOD_NAMES = ("kappatune", "highest-kappa", "random", "random-same-kind", "median-kappa", "full", "lora",
                "kappatune-lora", "osf", "corda-kpm", "mica", "pissa", "dora")
METHODS_HELP = "training method: " + ", ".join(METHOD_NAMES) + " (docs/methods.md)"


def register(sub) -> None:
    _register_train(sub)
    _register_eval(sub)


def _register_train(sub) -> None:
    p = add_command(
        sub, "train", func=cmd_train, help="fine-tune a causal LM with KappaTune (or a baseline method)",
        description="Fine-tunes a causal language model on your data while keeping what it already knows: with "
                    "the default method only the lowest-kappa tensors within --budget-params train and every "
                    "other tensor stays bit-identical (checked at the end). Baselines (LoRA, full, highest-kappa, "
                    "random) run through the same recipe for fair comparisons. Resumes from the last checkpoint "
                    "when run again; Ctrl-C saves one.",
        example="kappatune train path/to/model --data train.jsonl --budget-params 20M -o out/")
    p.add_argument("model", help="local model folder (config.json + safetensors), a Hub id org/name, or 'smollm2' / 'gemma3' "
                                 "(built-in)")
    p.add_argument("--revision", help="Hub branch, tag or commit (Hub ids only)")
    p.add_argument("--data", required=True, help="training data: .jsonl, .csv or .txt")
    p.add_argument("--output", "-o", required=True, help="output folder (model/, selection.json, logs, checkpoints)")
    p.add_argument("--method", default="kappatune", help=METHODS_HELP)
    add_train_options(p)
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps (overrides epochs)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--scheduler", default="linear", help="any HF scheduler name: linear, cosine, constant, ...")
    p.add_argument("--warmup-ratio", type=float, default=0.0)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--loss-on", default="all", choices=["all", "answer"])
    p.add_argument("--template", default=None, help="prompt template (default 'Tweet: {text}\\nSentiment: {label}'); "
                   "'none' trains on the raw 'text' field")
    p.add_argument("--answer-field", default="label")
    p.add_argument("--save-steps", type=int, default=50)
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (CUDA only)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="activation checkpointing (non-reentrant, so frozen embeddings do not cut the gradient)")
    p.add_argument("--fsdp", help="FSDP under torchrun/accelerate, e.g. 'full_shard auto_wrap' (use_orig_params "
                                  "is turned on: the model is partly frozen)")
    p.add_argument("--fsdp-config", help="FSDP config JSON (TrainingArguments.fsdp_config)")
    p.add_argument("--deepspeed", help="DeepSpeed config JSON (e.g. examples/distributed/ds_zero3.json)")
    p.add_argument("--lora-rank", type=int, help="fixed LoRA rank (default: matched to --budget-params)")
    p.add_argument("--lora-alpha", type=float,
                   help="fixed LoRA alpha at every rank (default: 2 x rank, equal scaling alpha/r; PEFT's own default "
                        "is 8)")
    p.add_argument("--lora-targets", default=LORA_TARGETS_HELP)
    p.add_argument("--lora-count", type=int, help="kappatune-lora: number of lowest-kappa modules (default 20%%)")
    p.add_argument("--monitor-every", type=int, default=0,
                   help="kappa monitor: spectra of the trained tensors every N steps (0: before and after only); "
                        "written to OUT/kappa_monitor.json")
    p.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE", dest="method_options",
                   help="an option of the chosen method's own (repeatable)")
    p.add_argument("--include", action="append", default=[], help="regex on unit names (selective methods)")
    p.add_argument("--exclude", action="append", default=[], help="regex on unit names (selective methods)")
    p.add_argument("--report", help="reuse this scan report instead of scanning the model")
    p.add_argument("--no-progress", action="store_true")


def _key_values(items: list[str]) -> dict:
    out = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not sep or not k.strip():
            raise KappaTuneError(f"--method-option {it!r}: expected KEY=VALUE")
        out[k.strip()] = v
    return out


def train_config(a: argparse.Namespace):
    """The TrainConfig of parsed ``train`` options: every option named like a TrainConfig field is passed
    through; the few that differ in form are converted here (the one place the CLI builds a TrainConfig)."""
    from ..data import DEFAULT_TEMPLATE, parse_template
    from ..train import TrainConfig

    template = parse_template(a.template)
    raw = template == ""
    special = {"template": template or DEFAULT_TEMPLATE, "answer_field": "" if raw else a.answer_field,
               "fsdp": a.fsdp or "", "lora_targets": csv_list(a.lora_targets), "include": tuple(a.include),
               "exclude": tuple(a.exclude), "progress": not a.no_progress,
               "method_options": _key_values(a.method_options)}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    kw = {k: v for k, v in vars(a).items() if k in names and k not in special}
    kw.update({k: v for k, v in special.items() if k in names})
    return TrainConfig(**kw)


def _check_data(a, cfg) -> list[dict]:
    """Read and check the training rows before the (slow) model load."""
    from ..data import PromptTemplate, load_records, parse_template

    rows = load_records(a.data)
    if parse_template(a.template) == "":  # --template none: raw text
        if "text" not in rows[0]:
            raise KappaTuneError(f"{a.data}: no 'text' column")
    else:
        PromptTemplate(cfg.template, cfg.answer_field).check(rows, a.data)
    if os.path.isdir(os.path.join(a.output, "model")) and not os.path.isdir(os.path.join(a.output, "checkpoints")):
        raise KappaTuneError(f"{a.output} already holds a finished model; choose another --output")
    return rows


def cmd_train(a) -> int:
    from ..report import KappaReport
    from ..train import check_engine, load_model, train

    cfg = train_config(a)
    check_engine(cfg)
    rows = _check_data(a, cfg)
    report = KappaReport.load(a.report) if a.report else None
    model, tok = load_model(a.model, revision=a.revision)
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its metrics; stdout is for results
        res = train(model, tok, rows, a.output, cfg, report=report)
    if res is not None:  # None on non-zero ranks of a distributed launch
        write_json(res.__dict__, None)
    return 0


def _register_eval(sub) -> None:
    p = add_command(
        sub, "eval", func=cmd_eval, help="measure forgetting, task accuracy and generalisation gap of a model",
        description="Tells you what fine-tuning cost and gained: perplexity on a control text (and, given the "
                    "base model, the increase = forgetting), label accuracy on a task test set, and the gap "
                    "between task test and train perplexity. A readable table goes to stderr, JSON to stdout "
                    "or --output.",
        example="kappatune eval out/model --control wikipedia --task test.jsonl --baseline path/to/model")
    p.add_argument("model", help="local model folder, a Hub id org/name, or 'smollm2' / 'gemma3' (built-in)")
    p.add_argument("--revision", help="Hub branch, tag or commit of MODEL (Hub ids only)")
    p.add_argument("--control", help="control text: a .txt file, 'wikipedia' or 'news' (built-in samples)")
    p.add_argument("--task", help="task test set (.jsonl/.csv) for label accuracy and test PPL")
    p.add_argument("--train-task", help="task train set: adds the generalisation gap PPL(test) - PPL(train)")
    p.add_argument("--baseline", help="base model folder: adds its PPL and forgetting = PPL(model) - PPL(base)")
    p.add_argument("--template", default=None, help="prompt template (default the tweet template)")
    p.add_argument("--answer-field", default="label")
    p.add_argument("--labels", help="comma-separated label set (default: the labels in --task)")
    p.add_argument("--chunk-len", type=int, default=256)
    p.add_argument("--max-chunks", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--output", "-o", help="write the JSON here (default: stdout)")


def _eval_inputs(a):
    """(control text, test rows, train rows, template, labels), all checked before any model is loaded."""
    from ..data import DEFAULT_TEMPLATE, PromptTemplate, control_text, load_records, parse_template

    if not a.control and not a.task:
        raise KappaTuneError("give --control and/or --task")
    if a.train_task and not a.task:
        raise KappaTuneError("--train-task needs --task")
    tpl = PromptTemplate(parse_template(a.template) or DEFAULT_TEMPLATE, a.answer_field)
    test = load_records(a.task) if a.task else None
    train_rows = load_records(a.train_task) if a.train_task else None
    for rows, path in ((test, a.task), (train_rows, a.train_task)):
        if rows is not None:
            tpl.check(rows, path)
    labels = list(csv_list(a.labels)) or None
    if labels and test is not None:
        unknown = sorted({str(r[tpl.answer_field]) for r in test} - set(labels))
        if unknown:
            raise KappaTuneError(f"label {unknown[0]!r} in {a.task} is not among the labels {labels}")
    return control_text(a.control), test, train_rows, tpl, labels


def cmd_eval(a) -> int:
    from ..evaluate import evaluate
    from ..summary import render_eval
    from ..train import load_model

    control, test, train_rows, tpl, labels = _eval_inputs(a)
    model, tok = load_model(a.model, revision=a.revision)
    base = load_model(a.baseline)[0] if a.baseline else None
    res = evaluate(model, tok, control_text=control, task_test=test, task_train=train_rows, template=tpl,
                   labels=labels, baseline=base, chunk_len=a.chunk_len, max_chunks=a.max_chunks,
                   batch_size=a.batch_size)
    sys.stderr.write(render_eval(res))
    write_json(res, a.output)
    return 0
