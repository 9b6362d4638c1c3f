"""KappaTune with your own HF Trainer: scan, select a budget, freeze, train, prove the frozen tensors did not move.

    python examples/hf_trainer.py --steps 4          # SmolLM2-135M from the demo assets (scripts/setup.sh)
"""

import argparse

import torch
from transformers import Trainer, TrainingArguments

import kappatune
from kappatune.data import PadCollator, PromptTemplate, demo_tweets, smollm2_fp32, tokenize_examples
from kappatune.integrations.trainer import FrozenTensorsCallback, prepare
from kappatune.train import load_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--budget", default="2M")
    ap.add_argument("--output", default="runs/example-trainer")
    a = ap.parse_args()

    path = smollm2_fp32()
    model, tok = load_model(path)
    report = kappatune.scan(path)                                    # from disk, cached
    selection = kappatune.select(report, budget_params=a.budget)      # lowest kappa first
    print(prepare(model, selection))                                 # trainable params: ... || all params: ...

    train_rows, _ = demo_tweets(64, 0)
    examples = tokenize_examples(train_rows, tok, PromptTemplate(), loss_on="answer")
    guard = FrozenTensorsCallback()
    args = TrainingArguments(output_dir=a.output, max_steps=a.steps, per_device_train_batch_size=8,
                             learning_rate=1e-3, logging_steps=5, report_to=[], save_strategy="no",
                             use_cpu=not torch.cuda.is_available(), remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=PadCollator(tok.pad_token_id),
                      callbacks=[guard])
    trainer.train()
    print(f"frozen tensors bit-identical: {guard.verified}")


if __name__ == "__main__":
    main()
