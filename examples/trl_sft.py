"""KappaTune with TRL's SFTTrainer: the two ways in, each with the frozen-tensor proof.

    python examples/trl_sft.py --steps 20                      # Algorithm 1: only the lowest-kappa tensors train
    python examples/trl_sft.py --lora --steps 20               # KappaTune-LoRA through SFTTrainer's peft_config
    python examples/trl_sft.py --model HuggingFaceTB/SmolLM2-135M --steps 20   # any folder or hub id

Algorithm 1 freezes the model before SFTTrainer sees it (``prepare``); the Trainer then builds its optimizer from
the trainable tensors only. A MoE selection that trains some experts of a fused expert tensor also needs the
slice optimizer (``build_optimizer``), handed to SFTTrainer through ``optimizers=``. KappaTune-LoRA is a plain
``LoraConfig`` whose target modules are the lowest-kappa ones, so SFTTrainer wraps the model itself.
``FrozenTensorsCallback`` hashes every frozen tensor when training starts and raises at the end if one moved.
"""

from __future__ import annotations

import argparse

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

import kappatune
from kappatune.data import PromptTemplate, demo_tweets, resolve_model
from kappatune.integrations.peft import kappatune_lora_config
from kappatune.integrations.trainer import FrozenTensorsCallback, prepare
from kappatune.models import load_model
from kappatune.slices import build_optimizer


def tweet_dataset(n: int) -> Dataset:
    """The built-in labelled tweets as TRL's prompt-completion rows (the loss falls on the completion only)."""
    template = PromptTemplate()
    rows, _ = demo_tweets(n, 0)
    out = []
    for r in rows:
        # "...Sentiment:" + " positive": the space belongs to the answer's first token, so the prompt's tokens are
        # a prefix of prompt + completion's (TRL checks that)
        prompt = template.prompt(r)
        stripped = prompt.rstrip(" ")
        out.append({"prompt": stripped, "completion": prompt[len(stripped):] + template.answer(r)})
    return Dataset.from_list(out)


def sft_config(output: str, steps: int, lr: float) -> SFTConfig:
    # TRL defaults to bf16 and activation checkpointing: both are meant for GPUs (a CPU without bf16 units gains
    # nothing from either), so they are on with CUDA only; checkpointing non-reentrant, because with frozen
    # embeddings reentrant checkpointing would silently cut the selected tensors' gradients.
    cuda = torch.cuda.is_available()
    return SFTConfig(output_dir=output, max_steps=steps, per_device_train_batch_size=8, learning_rate=lr,
                     logging_steps=5, report_to="none", save_strategy="no", max_length=256, use_cpu=not cuda,
                     bf16=cuda, gradient_checkpointing=cuda, gradient_checkpointing_kwargs={"use_reentrant": False},
                     # TRL's default loss computes the LM head in checkpointed chunks to save GPU memory; on a CPU
                     # the plain token cross-entropy (as kappatune train) is simpler and no slower
                     loss_type=None if cuda else "nll")


def sft_with_selection(model, tokenizer, report, data, *, budget: str, args: SFTConfig) -> SFTTrainer:
    """Algorithm 1: train only the lowest-kappa tensors within ``budget`` parameters."""
    selection = kappatune.select(report, budget_params=budget)
    applied = prepare(model, selection)
    print(applied)  # trainable params: ... || all params: ... (PEFT's format)
    # fused MoE experts train by rows: only the slice optimizer leaves the unselected experts' rows untouched
    optimizers = (build_optimizer(model, selection, lr=args.learning_rate), None) if applied.slice_rows else (None, None)
    return SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                      callbacks=[FrozenTensorsCallback()], optimizers=optimizers)


def sft_with_kappatune_lora(model, tokenizer, report, data, *, budget: str, args: SFTConfig) -> SFTTrainer:
    """KappaTune-LoRA: LoRA on the lowest-kappa modules only, rank matched to ``budget``; SFTTrainer wraps."""
    lora_config, info = kappatune_lora_config(report, budget_params=kappatune.parse_size(budget))
    print(f"LoRA rank {info['rank']} on {info['modules']} lowest-kappa modules, "
          f"{info['expected_params']:,} parameters expected")
    return SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                      peft_config=lora_config, callbacks=[FrozenTensorsCallback()])


def guard_of(trainer: SFTTrainer) -> FrozenTensorsCallback:
    return next(c for c in trainer.callback_handler.callbacks if isinstance(c, FrozenTensorsCallback))


def main(argv: list[str] | None = None) -> SFTTrainer:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", help="a model folder, a hub id, or 'smollm2' (the demo asset)")
    ap.add_argument("--lora", action="store_true", help="KappaTune-LoRA instead of training tensors directly")
    ap.add_argument("--budget", default="2M", help="trainable parameters")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--examples", type=int, default=128, help="training tweets")
    ap.add_argument("--output", default="runs/example-trl")
    a = ap.parse_args(argv)

    path = resolve_model(a.model)
    model, tokenizer = load_model(path)
    report = kappatune.scan(path)                                     # cached next to the model
    build = sft_with_kappatune_lora if a.lora else sft_with_selection
    trainer = build(model, tokenizer, report, tweet_dataset(a.examples), budget=a.budget,
                    args=sft_config(a.output, a.steps, a.lr))
    trainer.train()                                                   # raises if a frozen tensor moved
    print(f"frozen tensors bit-identical: {guard_of(trainer).verified}")
    return trainer


if __name__ == "__main__":
    main()
