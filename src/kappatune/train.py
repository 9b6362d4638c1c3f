"""Algorithm 1 as a recipe over the HF Trainer, with one registry of methods at a matched budget.

Methods (``METHODS``):
  kappatune         lowest-kappa units within the parameter budget (Algorithm 1)
  highest-kappa     highest-kappa units within the budget (the paper's INVERSE ablation)
  random            seeded random units within the budget (control)
  random-same-kind  seeded random units with the same kind mix as the kappatune choice (control)
  full              every parameter
  lora              PEFT LoRA on q/v and MLP projections of every layer, rank matched to the budget
  kappatune-lora    registered by kappatune.integrations.peft when available (LoRA on lowest-kappa modules)

Output folder::

  out/model/            save_pretrained folder + tokenizer (LoRA merged into the weights), written atomically
  out/adapter/          the LoRA adapter alone (LoRA methods)
  out/selection.json    the selection used (selective methods)
  out/train_log.json    the Trainer's log history
  out/manifest.json     tensors that changed (and proof that every other one is bit-identical)
  out/checkpoints/      resumable Trainer checkpoints (rerun the same command to resume)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from ._io import atomic_write_json
from .freeze import TrainableSummary, apply, gathered, is_partitioned, param_digest
from .data import DEFAULT_TEMPLATE, PadCollator, PromptTemplate, tokenize_examples
from .errors import KappaTuneError, TrainingInterrupted
from .report import KappaReport, Selection
from .policies import parse_size, select

log = logging.getLogger(__name__)

LORA_DEFAULT_TARGETS = ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj")


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
    lora_dropout: float = 0.0
    lora_count: int | None = None              # kappatune-lora: how many lowest-kappa modules (None: 20%)
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    progress: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise KappaTuneError(f"unknown method {self.method!r}; available: {', '.join(sorted(METHODS))}")
        if self.loss_on not in ("all", "answer"):
            raise KappaTuneError(f"loss_on must be 'all' or 'answer', got {self.loss_on!r}")
        for k in ("batch_size", "grad_accum", "max_length", "save_steps", "logging_steps"):
            if getattr(self, k) <= 0:
                raise KappaTuneError(f"{k} must be positive, got {getattr(self, k)}")
        if self.lr <= 0:
            raise KappaTuneError(f"lr must be positive, got {self.lr}")
        if self.budget_params is not None:
            self.budget_params = parse_size(self.budget_params)
        self.lora_targets = tuple(self.lora_targets)


@dataclass
class Prepared:
    model: torch.nn.Module
    summary: TrainableSummary
    selection: Selection | None = None
    info: dict = field(default_factory=dict)
    is_peft: bool = False


MethodFn = Callable[[torch.nn.Module, Callable[[], KappaReport], TrainConfig], Prepared]
METHODS: dict[str, MethodFn] = {}


def register_method(name: str):
    def deco(fn: MethodFn) -> MethodFn:
        METHODS[name] = fn
        return fn
    return deco


def _select(report: KappaReport, cfg: TrainConfig, order: str, like: Selection | None = None) -> Selection:
    if cfg.budget_params is None:
        raise KappaTuneError(f"method {cfg.method!r} needs budget_params")
    return select(report, budget_params=cfg.budget_params, order=order, seed=cfg.seed, like=like,
                  include=list(cfg.include) or None, exclude=list(cfg.exclude) or None)


def _selective(order: str):
    def fn(model, get_report, cfg):
        rep = get_report()
        like = _select(rep, cfg, "lowest") if order == "random-same-kind" else None
        sel = _select(rep, cfg, order, like)
        return Prepared(model, apply(model, sel), sel, {"order": order})
    return fn


register_method("kappatune")(_selective("lowest"))
register_method("highest-kappa")(_selective("highest"))
register_method("random")(_selective("random"))
register_method("random-same-kind")(_selective("random-same-kind"))


@register_method("full")
def _full(model, get_report, cfg):
    for p in model.parameters():
        p.requires_grad_(True)
    n = sum(p.numel() for p in model.parameters())
    return Prepared(model, TrainableSummary(n, n, [k for k, _ in model.named_parameters()]), None, {})


def lora_modules(model, targets) -> list[tuple[str, torch.nn.Module]]:
    mods = [(n, m) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets]
    if not mods:
        raise KappaTuneError(f"no Linear module named {', '.join(targets)} in this model")
    return mods


def match_rank(per_rank: int, budget: int) -> int:
    """LoRA rank whose parameter count (rank * per_rank) is closest to the budget (at least 1)."""
    return max(1, int(round(budget / per_rank)))


@register_method("lora")
def _lora(model, get_report, cfg):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise KappaTuneError("method 'lora' needs PEFT: pip install 'kappatune[peft]'") from None
    mods = lora_modules(model, cfg.lora_targets)
    per_rank = sum(m.in_features + m.out_features for _, m in mods)
    r = cfg.lora_rank or (match_rank(per_rank, cfg.budget_params) if cfg.budget_params else 16)
    lcfg = LoraConfig(r=r, lora_alpha=cfg.lora_alpha_ratio * r, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_targets), bias="none", task_type="CAUSAL_LM")
    pm = get_peft_model(model, lcfg)
    tr = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    total = sum(p.numel() for p in pm.parameters())
    return Prepared(pm, TrainableSummary(tr, total, [n for n, p in pm.named_parameters() if p.requires_grad]), None,
                    {"rank": r, "alpha": lcfg.lora_alpha, "modules": len(mods)}, is_peft=True)


@register_method("kappatune-lora")
def _kappatune_lora(model, get_report, cfg):
    from .integrations.peft import kappatune_lora_model

    return kappatune_lora_model(model, get_report(), cfg)


# ------------------------------------------------------------------------------------------------
def load_model(path: str, dtype: torch.dtype = torch.float32):
    """A causal LM and its tokenizer from a local folder; ``smollm2`` names the built-in demo model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path == "smollm2":
        from .data import smollm2_fp32

        path = smollm2_fp32()
    if not os.path.isdir(path):
        raise KappaTuneError(f"{path}: not a model folder (expected config.json + safetensors; "
                             f"use 'smollm2' for the built-in SmolLM2-135M)")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise KappaTuneError(f"{path}: no config.json in the model folder")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise KappaTuneError(f"{path}: cannot load a tokenizer ({' '.join(str(e).split())[:200]})") from None
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def _digests(model) -> dict[str, str]:
    return {n: param_digest(p) for n, p in model.named_parameters()}


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def last_good_checkpoint(ckpt_dir: str) -> str | None:
    """The newest checkpoint folder that finished writing (trainer_state.json, weights, optimizer)."""
    if not os.path.isdir(ckpt_dir):
        return None
    cands = []
    for d in os.listdir(ckpt_dir):
        if d.startswith("checkpoint-") and d[len("checkpoint-"):].isdigit():
            p = os.path.join(ckpt_dir, d)
            files = set(os.listdir(p))
            has_w = any(f.endswith(".safetensors") or f.endswith(".bin") for f in files)
            if "trainer_state.json" in files and has_w and "optimizer.pt" in files:
                cands.append((int(d[len("checkpoint-"):]), p))
    return max(cands)[1] if cands else None


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


def train(model, tokenizer, rows: list[dict], output_dir: str, cfg: TrainConfig, *,
          report: KappaReport | None = None, extra_callbacks=()) -> TrainResult | None:
    """Fine-tune ``model`` on ``rows`` with ``cfg.method``; write the output folder (see module doc)."""
    from transformers import Trainer, TrainingArguments, set_seed

    from .integrations.trainer import FrozenTensorsCallback, GracefulStopCallback

    template = PromptTemplate(cfg.template, cfg.answer_field) if cfg.answer_field else None
    if template is not None:
        template.check(rows)
    engine = check_engine(cfg)
    set_seed(cfg.seed)
    os.makedirs(output_dir, exist_ok=True)
    ckpt_dir = os.path.join(output_dir, "checkpoints")

    def get_report():
        nonlocal report
        if report is None:
            from .scanner import scan

            # every rank scans the model itself (deterministic, so the selections agree): a process group
            # made here would clash with the one the Trainer sets up next
            report = scan(model, progress=cfg.progress, distributed=False)
        return report

    before = _digests(model)
    prep = METHODS[cfg.method](model, get_report, cfg)
    log.info("method %s: %s", cfg.method, prep.summary)
    if (cfg.fsdp or cfg.deepspeed) and prep.selection is not None and prep.selection.has_slices:
        raise KappaTuneError("single experts inside fused MoE tensors (slice selections) are not supported under "
                             "FSDP / DeepSpeed yet: leave them out with --exclude '.*@.*'")
    main_process = int(os.environ.get("RANK", "0")) == 0  # under torchrun / accelerate only rank 0 writes
    group_before = _dist_initialized()
    if prep.selection is not None and main_process:
        prep.selection.save(os.path.join(output_dir, "selection.json"))
    examples = tokenize_examples(rows, tokenizer, template, max_length=cfg.max_length, loss_on=cfg.loss_on)
    n_tokens = sum(len(e["input_ids"]) for e in examples)
    use_cuda = torch.cuda.is_available()
    args = TrainingArguments(**engine,
        output_dir=ckpt_dir, per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr, num_train_epochs=cfg.epochs, max_steps=cfg.max_steps, weight_decay=cfg.weight_decay,
        lr_scheduler_type=cfg.scheduler, warmup_steps=cfg.warmup_ratio, logging_steps=cfg.logging_steps,
        save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit, seed=cfg.seed, data_seed=cfg.seed,
        report_to=[], use_cpu=not use_cuda, bf16=cfg.bf16 and use_cuda, disable_tqdm=not cfg.progress,
        remove_unused_columns=False, dataloader_num_workers=0, optim="adamw_torch",
        ddp_backend=None if use_cuda or int(os.environ.get("WORLD_SIZE", "1")) == 1 else "gloo",
    )
    if cfg.gradient_checkpointing:
        from .integrations.trainer import enable_activation_checkpointing

        enable_activation_checkpointing(prep.model, use_reentrant=False)
    guard, stopper = FrozenTensorsCallback(), GracefulStopCallback()
    optimizers = (None, None)
    if prep.selection is not None and prep.selection.has_slices:
        from .slices import build_optimizer

        # single experts inside fused tensors: AdamW state and updates for the selected rows only
        optimizers = (build_optimizer(prep.model, prep.selection, lr=cfg.lr, weight_decay=cfg.weight_decay), None)
    trainer = Trainer(model=prep.model, args=args, train_dataset=_ListDataset(examples),
                      data_collator=PadCollator(tokenizer.pad_token_id or 0),
                      callbacks=[guard, stopper, *extra_callbacks], optimizers=optimizers)
    resume = last_good_checkpoint(ckpt_dir)
    if resume:
        log.info("resuming from %s", resume)
        if not prep.is_peft and not cfg.deepspeed:  # DeepSpeed restores its own (partitioned) checkpoint
            _load_checkpoint_weights(prep.model, resume)
    import resource

    t0 = time.perf_counter()
    out = trainer.train(resume_from_checkpoint=resume)
    wall = time.perf_counter() - t0
    steps = trainer.state.global_step
    steps_run = steps - _ckpt_step(resume)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * n_tokens / max(len(examples), 1)  # mean length
    history = trainer.state.log_history
    if main_process:
        atomic_write_json(os.path.join(output_dir, "train_log.json"), history)
    losses = [h["loss"] for h in history if "loss" in h]
    if stopper.requested:
        raise TrainingInterrupted(f"interrupted at step {steps}; checkpoint saved in {ckpt_dir}; rerun the same "
                                  f"command to resume")
    # ---- final model: merged (LoRA) plain model, written atomically ----
    final = prep.model
    if prep.is_peft:
        if main_process:
            adapter_tmp = os.path.join(output_dir, ".adapter-tmp")
            shutil.rmtree(adapter_tmp, ignore_errors=True)
            final.save_pretrained(adapter_tmp)
            _replace_dir(adapter_tmp, os.path.join(output_dir, "adapter"))
        final = final.merge_and_unload()
    for h in getattr(final, "_kappatune_hooks", []):  # slice gradient masks
        h.remove()
    final._kappatune_hooks, final._kappatune_slice_rows = [], {}
    for p in final.parameters():
        p.requires_grad_(True)  # a saved model should not carry our freezing
    after = _digests(final)
    params = dict(final.named_parameters())
    changed = []
    for n, d in after.items():
        if before.get(n) != d:
            changed.append({"name": n, "numel": _numel(params[n])})
    selected = set(prep.summary.trainable_names) if not prep.is_peft else None
    unexpected = [c["name"] for c in changed if selected is not None and c["name"] not in selected]
    if unexpected:
        raise KappaTuneError(f"tensor {unexpected[0]} changed but was not selected")
    ranks_identical = _ranks_identical(after)
    # ZeRO-3 / FSDP2: gather the full weights (a collective) before rank 0 writes them
    full_state = ({n: gathered(p) for n, p in final.named_parameters()} if is_partitioned(final) else None)
    if not main_process:
        _end_dist(group_before)
        return None
    model_tmp = os.path.join(output_dir, ".model-tmp")
    shutil.rmtree(model_tmp, ignore_errors=True)
    final.save_pretrained(model_tmp, state_dict=full_state)
    tokenizer.save_pretrained(model_tmp)
    _replace_dir(model_tmp, os.path.join(output_dir, "model"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    res = TrainResult(output_dir=output_dir, method=cfg.method, trainable_params=prep.summary.trainable_params,
                      all_params=sum(_numel(p) for p in final.parameters()), steps=steps,
                      train_loss=float(out.training_loss) if out.training_loss is not None else None,
                      final_train_loss=losses[-1] if losses else None, wall_s=wall,
                      tokens_per_s=tokens_per_step * steps_run / max(wall, 1e-9),
                      peak_rss_mb=peak, changed_tensors=len(changed), frozen_verified=bool(guard.verified),
                      info=dict(prep.info, config=_jsonable(asdict(cfg))))
    atomic_write_json(os.path.join(output_dir, "manifest.json"), {
        "method": cfg.method, "changed": changed, "unchanged_count": len(after) - len(changed),
        "frozen_verified": bool(guard.verified), "trainable": prep.summary.to_dict(),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")), "ranks_identical": ranks_identical})
    atomic_write_json(os.path.join(output_dir, "train_summary.json"), _jsonable(asdict(res)))
    _end_dist(group_before)
    return res


def _numel(p) -> int:
    return int(getattr(p, "ds_numel", None) or p.numel())  # ZeRO-3 partitions report 0 elements


def check_engine(cfg: TrainConfig) -> dict:
    """Validate the FSDP / DeepSpeed settings (before anything is loaded or written); the TrainingArguments
    keywords they become."""
    engine = _engine_args(cfg)
    if cfg.fsdp and not _has_accelerator():
        raise KappaTuneError("FSDP through the HF Trainer runs only on GPUs (accelerate silently uses DDP on CPU); "
                             "drop --fsdp here, or use kappatune.integrations.fsdp.shard (FSDP2) in your own loop")
    return engine


def _has_accelerator() -> bool:
    acc = getattr(torch, "accelerator", None)
    if acc is not None and hasattr(acc, "current_accelerator"):
        return acc.current_accelerator() is not None
    return torch.cuda.is_available()


def _engine_args(cfg: TrainConfig) -> dict:
    """FSDP / DeepSpeed settings for TrainingArguments, checked for a partly frozen model."""
    out: dict = {}
    if cfg.fsdp:
        fc = cfg.fsdp_config
        if isinstance(fc, str):
            try:
                with open(fc, encoding="utf-8") as f:
                    fc = json.load(f)
            except (OSError, ValueError) as e:
                raise KappaTuneError(f"--fsdp-config {cfg.fsdp_config}: {e}") from None
        fc = dict(fc or {})
        version = int(fc.get("version", fc.get("fsdp_version", 2)))  # transformers 5 defaults to FSDP2
        if version == 1:
            # FSDP1 flattens each wrapped module's parameters into one FlatParameter, which has a single
            # requires_grad: a module mixing frozen and selected tensors needs use_orig_params=True
            if str(fc.get("use_orig_params", True)).lower() in ("false", "0"):
                raise KappaTuneError("FSDP with a partly frozen model needs use_orig_params=True (FSDP1 flattens a "
                                     "module's frozen and trainable tensors into one parameter); remove "
                                     "use_orig_params=false from the FSDP config or use FSDP2 (version 2)")
            fc["use_orig_params"] = True
        out.update(fsdp=cfg.fsdp, fsdp_config=fc)
    if cfg.deepspeed:
        if cfg.fsdp:
            raise KappaTuneError("choose FSDP or DeepSpeed, not both")
        out["deepspeed"] = cfg.deepspeed
    return out


def _dist_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _end_dist(group_before: bool) -> None:
    """Wait for every rank (rank 0 writes the output meanwhile), then tear down the process group the Trainer
    made: a process that exits with a live gloo group aborts ("terminate called without an active exception").
    A group the caller had made before train() is left alone."""
    import torch.distributed as dist

    if group_before or not _dist_initialized():
        return
    dist.barrier()
    dist.destroy_process_group()


def _ranks_identical(digests: dict[str, str]) -> bool | None:
    """Under a distributed launch: whether every rank ends with the same weights (None when not distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    mine = json.dumps(sorted(digests.items()))
    allv: list = [None] * dist.get_world_size()
    dist.all_gather_object(allv, mine)
    return all(v == allv[0] for v in allv)


def _load_checkpoint_weights(model, folder: str) -> None:
    """Load a Trainer checkpoint's weights through ``from_pretrained``, which converts the checkpoint's
    unfused MoE experts back into the fused in-memory parameters. (The Trainer's own resume loads the raw
    state dict and, in transformers 5.x, silently leaves fused experts at their initial values.)"""
    ck = type(model).from_pretrained(folder, dtype=next(model.parameters()).dtype)
    missing, unexpected = model.load_state_dict(ck.state_dict(), strict=False)
    if missing:
        raise KappaTuneError(f"checkpoint {folder} lacks {len(missing)} weights, e.g. {missing[0]}")
    del ck


def _ckpt_step(path: str | None) -> int:
    return int(path.rsplit("-", 1)[-1]) if path else 0


def _replace_dir(src: str, dst: str) -> None:
    old = dst + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(dst):
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def _jsonable(o):
    return json.loads(json.dumps(o, default=str))
