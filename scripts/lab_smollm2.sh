#!/usr/bin/env bash
# The forgetting lab on SmolLM2-135M (issue 14): every method at the 2M budget, a learning-rate sweep per
# family judged on validation accuracy, 5 paired seeds, forgetting on Wikipedia and news (32 x 256 tokens each),
# 600 test tweets. Resumable: rerun the same command and finished runs are kept (runs/lab-smollm2/runs/*/result.json).
# A run is ~6-10 min on 2 cores alone (32 steps: 2-4 min; evaluation ~3.5 min; CorDA's covariance pass adds
# minutes), 10-30 min while other jobs share the cores; the whole protocol is 84 runs, so it spans sessions.
# To get the core comparison first, pass a shorter method list (finished runs are shared):
#   bash scripts/lab_smollm2.sh --methods kappatune,random-same-kind,lora,kappatune-lora,osf,corda-kpm,full
# Afterwards (or at any point): add --analyse-only for the tables and plots of what has finished, and
#   python scripts/collect_lab.py runs/lab-smollm2 docs/results/lab-smollm2 (see its docstring and docs/results.md)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# runs/ is not committed: put the committed finished runs back first, so the lab continues instead of restarting
if [ -d docs/results/lab-smollm2/runs ]; then
  .venv/bin/python scripts/collect_lab.py --restore docs/results/lab-smollm2 runs/lab-smollm2 >&2
fi
exec .venv/bin/kappatune compare smollm2 \
  --methods kappatune,random-same-kind,lora,osf,corda-kpm,kappatune-lora,full,mica,pissa,dora,random,highest-kappa \
  --method-option corda-kpm:corpus=wikipedia --seeds 5 --max-steps 32 --train-size 256 \
  -o runs/lab-smollm2 "$@"
