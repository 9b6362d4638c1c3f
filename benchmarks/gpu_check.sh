#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): one summary line per figure; runs as it is on one CUDA GPU in a few
# minutes, and on a CPU-only machine runs what it can and says what it skipped. Installs nothing: it uses the
# project's .venv (bash scripts/setup.sh) when there is one, else the python on PATH.
#   bash benchmarks/gpu_check.sh [--model DIR_OR_HUB_ID] [--steps 20] [--budget 2M]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
export TOKENIZERS_PARALLELISM=false
exec "$PY" benchmarks/gpu_check.py "$@"
