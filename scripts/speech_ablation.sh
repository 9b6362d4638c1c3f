#!/usr/bin/env bash
# The Algorithm 2 ablation of docs/speech.md: lowest- vs highest-kappa vs random LLM tensors at the same
# budget, same data, same seed; then the figure and table.  Needs data/speech (scripts/make_speech_data.py).
#   bash scripts/speech_ablation.sh [steps]        # 240 steps: ~25 min per run on 2 CPU cores
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-240}
for order in lowest highest random; do
  .venv/bin/kappatune train-speech smollm2 --manifest data/speech/train.jsonl --test data/speech/test.jsonl \
    --order "$order" --budget-params 2M --max-steps "$STEPS" --batch-size 8 --lr 2e-4 --adaptor-lr 1e-3 \
    --warmup-steps 20 --eval-every 40 --eval-limit 30 --save-steps 80 --recipe paper -o "runs/speech-$order" \
    > "runs/speech-$order.json" 2> "runs/speech-$order.log"
  # forgetting on a text that does not overlap the (Wikipedia-made) speech data: gensim's news stories
  .venv/bin/kappatune eval-speech "runs/speech-$order" --manifest data/speech/test.jsonl --limit 1 \
    --control news --base smollm2 > "runs/speech-$order/news_forgetting.json" 2>> "runs/speech-$order.log"
done
.venv/bin/python scripts/speech_figure.py runs/speech-lowest runs/speech-highest runs/speech-random \
  -o docs/img/speech_ablation.png
