#!/usr/bin/env bash
# The paper's Table 2 setting on SmolLM2-135M, as its reference script sets it up, then controlled (issue 14):
#   1. as it is: KappaTune-LoRA and LoRA both at PEFT's default alpha 8 (so scaling alpha/r is 8/r: the
#      KappaTune-LoRA adapters, of a much larger rank at the same budget, take updates several times smaller),
#      one shared learning rate 2e-4, and KappaTune-LoRA trained 3.5x as many steps (35 vs 10 epochs);
#   2. equal scaling: the same, with alpha = 2r for both (kappatune's default);
#   3. learning rate swept, equal steps: the main lab's kappatune-lora vs lora (scripts/lab_smollm2.sh).
# Same data, budget, evaluation and output folder as scripts/lab_smollm2.sh (base figures and scan shared).
# What is shrunk: LoRA trains STEPS steps (default 16, the main lab's 32 halved) and KappaTune-LoRA 3.5x that,
# to fit the 2-core budget. Resumable like every compare run.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# runs/ is not committed: put the committed finished runs back first, so the lab continues instead of restarting
if [ -d docs/results/lab-smollm2/runs ]; then
  .venv/bin/python scripts/collect_lab.py --restore docs/results/lab-smollm2 runs/lab-smollm2 >&2
fi
STEPS=${STEPS:-16}
LONG=$(( STEPS * 7 / 2 ))
exec .venv/bin/kappatune compare smollm2 \
  --methods kt-lora-paper,lora-paper,kt-lora-paper-eq,lora-paper-eq \
  --variant "kt-lora-paper=kappatune-lora,lora_alpha=8,max_steps=$LONG" \
  --variant "lora-paper=lora,lora_alpha=8,max_steps=$STEPS" \
  --variant "kt-lora-paper-eq=kappatune-lora,max_steps=$LONG" \
  --variant "lora-paper-eq=lora,max_steps=$STEPS" \
  --contrast kt-lora-paper:lora-paper --contrast kt-lora-paper-eq:lora-paper-eq \
  --lr 2e-4 --seeds 3 --max-steps 32 --train-size 256 -o runs/lab-smollm2 "$@"
