"""Algorithm 1 as a recipe over the HF Trainer: prepare (a registered method) -> train -> prove -> save.

Methods come from ``kappatune.methods`` (one module each; ``METHODS`` lists them): ``kappatune`` (lowest
kappa within the budget), ``highest-kappa``, ``random``, ``random-same-kind``, ``full``, ``lora``,
``kappatune-lora``, and whatever else is registered there.

Output folder::

  out/model/            save_pretrained folder + tokenizer (LoRA merged into the weights), written atomically
  out/adapter/          the LoRA adapter alone (PEFT methods)
  out/selection.json    the selection used (selective methods)
  out/train_log.json    the Trainer's log history
  out/manifest.json     tensors that changed (and proof that every other one is bit-identical)
  out/checkpoints/      resumable Trainer checkpoints (rerun the same command to resume)
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from dataclasses import asdict, dataclass, field

import torch

from ._io import atomic_write_json
from .checkpoints import checkpoint_step, last_good_checkpoint, load_checkpoint_weights, save_folder
from .data import DEFAULT_TEMPLATE, PadCollator, PromptTemplate, tokenize_examples
from .engines import check_engine, dist_initialized, end_dist, main_process, ranks_identical, world_size
from .errors import KappaTuneError, TrainingInterrupted  # noqa: F401  (TrainingInterrupted: public here)
from .freeze import applied_to, forget, gathered, is_partitioned, row_snapshot, snapshot
from .methods import METHODS, MethodContext, Prepared, get_method, method_options
from .methods.lora import LORA_DEFAULT_TARGETS
from .models import load_model  # noqa: F401  (public: kappatune.train.load_model)
from .policies import parse_size
from .report import KappaReport

log = logging.getLogger(__name__)

__all__ = ["TrainConfig", "TrainResult", "train", "METHODS", "load_model", "check_engine", "TrainingInterrupted"]


@dataclass
class TrainConfig:
    """Training settings; CLI options mirror these names."""

    method: str = "kappatune"
    budget_params: int | str | None = "2M"   # trainable parameters for every method that has a budget
    seed: int = 0
    epochs: float = 3.0
    max_steps: int = -1                        # > 0 overrides epochs
    lr: float = 1e-3
    batch_size: int = 8
    grad_accum: int = 1
    weight_decay: float = 0.0
    scheduler: str = "linear"
    warmup_ratio: float = 0.0
    max_length: int = 256
    loss_on: str = "all"                       # all | answer
    template: str = DEFAULT_TEMPLATE
    answer_field: str = "label"
    save_steps: int = 50
    save_total_limit: int = 2
    logging_steps: int = 10
    bf16: bool = False
    gradient_checkpointing: bool = False       # activation checkpointing, safe with frozen embeddings
    fsdp: str = ""                             # TrainingArguments.fsdp, e.g. "full_shard auto_wrap"
    fsdp_config: dict | str | None = None      # dict or JSON path; use_orig_params is forced on (partly frozen)
    deepspeed: str | dict | None = None        # DeepSpeed JSON config (path or dict), e.g. ZeRO-3
    lora_targets: tuple[str, ...] = LORA_DEFAULT_TARGETS
    lora_rank: int | None = None               # None: matched to budget_params
    lora_alpha_ratio: float = 2.0              # alpha = ratio * rank (the paper: r=16, alpha=32)
    lora_alpha: float | None = None            # a fixed alpha at every rank instead (PEFT's default is 8)
    lora_dropout: float = 0.0
    lora_count: int | None = None              # kappatune-lora: how many lowest-kappa modules (None: 20%)
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    method_options: dict = field(default_factory=dict)  # the method's own options (Method.options dataclass)
    monitor_every: int = 0                     # kappa monitor: spectra of trained tensors every N steps (0: ends)
    progress: bool = True

    def __post_init__(self):
        method = get_method(self.method)
        method_options(method, self.method_options)  # validates names and values now, not mid-run
        if self.loss_on not in ("all", "answer"):
            raise KappaTuneError(f"loss_on must be 'all' or 'answer', got {self.loss_on!r}")
        if self.monitor_every < 0:
            raise KappaTuneError(f"monitor_every must be >= 0, got {self.monitor_every}")
        for k in ("batch_size", "grad_accum", "max_length", "save_steps", "logging_steps"):
            if getattr(self, k) <= 0:
                raise KappaTuneError(f"{k} must be positive, got {getattr(self, k)}")
        if self.lr <= 0:
            raise KappaTuneError(f"lr must be positive, got {self.lr}")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise KappaTuneError(f"lora_alpha must be positive, got {self.lora_alpha}")
        if self.budget_params is not None:
            self.budget_params = parse_size(self.budget_params)
        self.lora_targets = tuple(self.lora_targets)


@dataclass
class TrainResult:
    output_dir: str
    method: str
    trainable_params: int
    all_params: int
    steps: int
    train_loss: float | None
    final_train_loss: float | None
    wall_s: float
    tokens_per_s: float
    peak_rss_mb: float
    changed_tensors: int
    frozen_verified: bool
    info: dict = field(default_factory=dict)
    peak_gpu_mb: float | None = None      # torch.cuda.max_memory_allocated over the run (None without CUDA)


def train(model, tokenizer, rows: list[dict], output_dir: str, cfg: TrainConfig, *,
          report: KappaReport | None = None, extra_callbacks=()) -> TrainResult | None:
    """Fine-tune ``model`` on ``rows`` with ``cfg.method``; write the output folder (see module doc)."""
    from transformers import set_seed

    template = PromptTemplate(cfg.template, cfg.answer_field) if cfg.answer_field else None
    if template is not None:
        template.check(rows)
    engine = check_engine(cfg)
    set_seed(cfg.seed)
    os.makedirs(output_dir, exist_ok=True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    group_before = dist_initialized()
    # every tensor hashed once before the method touches the model: the reference of the frozen-tensor proof
    before = snapshot(model, only_frozen=False, slice_rows={})
    prep = _prepare(model, tokenizer, cfg, report, output_dir)
    rows_of_slices = _slice_rows(prep)
    before.update(row_snapshot(prep.model, rows_of_slices))
    examples = tokenize_examples(rows, tokenizer, template, max_length=cfg.max_length, loss_on=cfg.loss_on)
    from .monitor import KappaMonitor

    monitor = KappaMonitor(cfg.monitor_every, os.path.join(output_dir, "kappa_monitor.json"))
    trainer, stopper = _make_trainer(prep, tokenizer, examples, cfg, engine, output_dir,
                                     [monitor, *extra_callbacks])
    out, wall, steps_run = _run(trainer, prep, cfg, os.path.join(output_dir, "checkpoints"))
    history = trainer.state.log_history
    if main_process():
        atomic_write_json(os.path.join(output_dir, "train_log.json"), history)
    if stopper.requested:
        raise TrainingInterrupted(f"interrupted at step {trainer.state.global_step}; checkpoint saved in "
                                  f"{output_dir}/checkpoints; rerun the same command to resume")
    final = _final_model(prep, output_dir)
    after = snapshot(final, only_frozen=False, slice_rows=rows_of_slices)
    moved = _prove_frozen(before, after, prep)
    # ZeRO-3 / FSDP2: gather the full weights (a collective) before rank 0 writes them
    full_state = ({n: gathered(p) for n, p in final.named_parameters()} if is_partitioned(final) else None)
    same_on_ranks = ranks_identical(after)
    if not main_process():
        end_dist(group_before)
        return None

    def write_model(tmp: str) -> None:
        final.save_pretrained(tmp, state_dict=full_state)
        tokenizer.save_pretrained(tmp)

    save_folder(os.path.join(output_dir, "model"), write_model)
    n_tokens = sum(len(e["input_ids"]) for e in examples)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * n_tokens / max(len(examples), 1)  # mean length
    losses = [h["loss"] for h in history if "loss" in h]
    res = TrainResult(output_dir=output_dir, method=cfg.method, trainable_params=prep.summary.trainable_params,
                      all_params=sum(_numel(p) for p in final.parameters()), steps=trainer.state.global_step,
                      train_loss=float(out.training_loss) if out.training_loss is not None else None,
                      final_train_loss=losses[-1] if losses else None, wall_s=wall,
                      tokens_per_s=tokens_per_step * steps_run / max(wall, 1e-9),
                      peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
                      changed_tensors=len(moved), frozen_verified=True,
                      info=dict(prep.info, config=_jsonable(asdict(cfg)),
                                kappa_monitor={k: v for k, v in monitor.summary().items() if k != "tensors"}),
                      peak_gpu_mb=torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None)
    _write_records(output_dir, res, prep, final, moved, len(after), same_on_ranks)
    end_dist(group_before)
    return res


def _prepare(model, tokenizer, cfg: TrainConfig, report: KappaReport | None, output_dir: str) -> Prepared:
    """Run the method's ``prepare`` (scanning the model only if the method asks for the report)."""
    cache: dict = {"report": report}

    def get_report() -> KappaReport:
        if cache["report"] is None:
            from .scanner import scan

            # every rank scans the model itself (deterministic, so the selections agree): a process group
            # made here would clash with the one the Trainer sets up next
            cache["report"] = scan(model, progress=cfg.progress, distributed=False)
        return cache["report"]

    prep = METHODS[cfg.method].prepare(model, MethodContext(get_report, tokenizer), cfg)
    log.info("method %s: %s", cfg.method, prep.summary)
    if (cfg.fsdp or cfg.deepspeed) and prep.selection is not None and prep.selection.has_slices:
        raise KappaTuneError("single experts inside fused MoE tensors (slice selections) are not supported under "
                             "FSDP / DeepSpeed yet: leave them out with --exclude '.*@.*'")
    if prep.selection is not None and main_process():
        prep.selection.save(os.path.join(output_dir, "selection.json"))
    return prep


def _slice_rows(prep: Prepared) -> dict:
    handle = applied_to(prep.model) if prep.selection is not None else None
    return dict(handle.slice_rows) if handle is not None else {}


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _training_args(cfg: TrainConfig, engine: dict, ckpt_dir: str):
    from transformers import TrainingArguments

    use_cuda = torch.cuda.is_available()
    return TrainingArguments(
        **engine, output_dir=ckpt_dir, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps, weight_decay=cfg.weight_decay, lr_scheduler_type=cfg.scheduler,
        warmup_steps=cfg.warmup_ratio, logging_steps=cfg.logging_steps, save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit, seed=cfg.seed, data_seed=cfg.seed, report_to=[],
        use_cpu=not use_cuda, bf16=cfg.bf16 and use_cuda, disable_tqdm=not cfg.progress,
        remove_unused_columns=False, dataloader_num_workers=0, optim="adamw_torch",
        ddp_backend=None if use_cuda or world_size() == 1 else "gloo")


def _make_trainer(prep: Prepared, tokenizer, examples, cfg: TrainConfig, engine: dict, output_dir: str,
                  extra_callbacks):
    from transformers import Trainer

    from .integrations.trainer import GracefulStopCallback, enable_activation_checkpointing

    args = _training_args(cfg, engine, os.path.join(output_dir, "checkpoints"))
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(prep.model, use_reentrant=False)
    optimizers = (None, None)
    if prep.selection is not None and prep.selection.has_slices:
        from .slices import build_optimizer

        # single experts inside fused tensors: AdamW state and updates for the selected rows only
        optimizers = (build_optimizer(prep.model, prep.selection, lr=cfg.lr, weight_decay=cfg.weight_decay), None)
    stopper = GracefulStopCallback()
    trainer = Trainer(model=prep.model, args=args, train_dataset=_ListDataset(examples),
                      data_collator=PadCollator(tokenizer.pad_token_id or 0),
                      callbacks=[stopper, *extra_callbacks], optimizers=optimizers)
    return trainer, stopper


def _run(trainer, prep: Prepared, cfg: TrainConfig, ckpt_dir: str):
    """Train (resuming from the last complete checkpoint); returns (Trainer output, wall s, steps run here)."""
    resume = last_good_checkpoint(ckpt_dir)
    if resume:
        log.info("resuming from %s", resume)
        if not prep.is_peft and not cfg.deepspeed:  # DeepSpeed restores its own (partitioned) checkpoint
            load_checkpoint_weights(prep.model, resume)
    t0 = time.perf_counter()
    out = trainer.train(resume_from_checkpoint=resume)
    wall = time.perf_counter() - t0
    return out, wall, trainer.state.global_step - checkpoint_step(resume)


def _final_model(prep: Prepared, output_dir: str):
    """The plain model to save: a PEFT adapter saved on its own and merged in; gradient masks removed."""
    final = prep.model
    if prep.is_peft:
        if main_process():
            save_folder(os.path.join(output_dir, "adapter"), final.save_pretrained)
        final = final.merge_and_unload()
    forget(final)  # slice gradient masks
    for p in final.parameters():
        p.requires_grad_(True)  # a saved model should not carry our freezing
    return final


def _prove_frozen(before: dict[str, str], after: dict[str, str], prep: Prepared) -> list[str]:
    """The parameters that changed; raise if any of them (or an unselected expert row) was not allowed to."""
    moved = [n for n, d in before.items() if after.get(n) != d]
    unexpected = [n for n in moved if prep.may_change is not None and n not in prep.may_change]
    if unexpected:
        raise KappaTuneError(f"{len(unexpected)} frozen tensor(s) changed during training (the method does not "
                             f"train them), e.g. {unexpected[0]}")
    return [n for n in moved if not n.endswith("@unselected")]


def _write_records(output_dir: str, res: TrainResult, prep: Prepared, final, moved: list[str], n_tensors: int,
                   same_on_ranks: bool | None) -> None:
    params = dict(final.named_parameters())
    atomic_write_json(os.path.join(output_dir, "manifest.json"), {
        "method": res.method, "changed": [{"name": n, "numel": _numel(params[n])} for n in moved],
        "unchanged_count": n_tensors - len(moved), "frozen_verified": res.frozen_verified,
        "trainable": prep.summary.to_dict(), "world_size": world_size(), "ranks_identical": same_on_ranks})
    atomic_write_json(os.path.join(output_dir, "train_summary.json"), _jsonable(asdict(res)))


def _numel(p) -> int:
    return int(getattr(p, "ds_numel", None) or p.numel())  # ZeRO-3 partitions report 0 elements


def _jsonable(o):
    return json.loads(json.dumps(o, default=str))
