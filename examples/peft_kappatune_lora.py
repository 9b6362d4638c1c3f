"""KappaTune-LoRA with PEFT: LoRA only on the lowest-kappa modules, rank matched to a parameter budget.

    python examples/peft_kappatune_lora.py --budget 2M --modules 40
"""

import argparse

from peft import get_peft_model

import kappatune
from kappatune.data import smollm2_fp32
from kappatune.integrations.peft import kappatune_lora_config
from kappatune.train import load_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", default="2M")
    ap.add_argument("--modules", type=int, default=40)
    a = ap.parse_args()
    path = smollm2_fp32()
    model, _ = load_model(path)
    report = kappatune.scan(path)
    config, info = kappatune_lora_config(report, budget_params=kappatune.parse_size(a.budget), count=a.modules)
    print(f"rank {info['rank']} on {info['modules']} modules (+1 on {len(info['rank_pattern'])}), "
          f"expected {info['expected_params']:,} parameters; lowest-kappa first: {info['target_modules'][:3]}")
    peft_model = get_peft_model(model, config)
    peft_model.print_trainable_parameters()


if __name__ == "__main__":
    main()
