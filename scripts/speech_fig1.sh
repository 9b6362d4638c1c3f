#!/usr/bin/env bash
# The paper's Figure 1 analogue on the recipe that puts the audio's content into the adaptor (issue 15):
# a character-CTC stage of the adaptor alone on the training clips (14 s encoder window, output norm),
# then, from that one shared starting adaptor, STEPS steps through SmolLM2 with 2M LLM parameters chosen by
# each order (lowest = KappaTune, highest, random, random-same-kind) and the adaptor-only control (budget 0),
# at one LLM learning rate, per seed. Forgetting is measured on the news stories (the transcripts are
# Wikipedia sentences); the audio gap (loss with another clip's audio minus loss with its own) is the
# learning signal beside WER. Needs data/speech (docs/speech.md, "The recipe").
#   bash scripts/speech_fig1.sh [seeds] [steps]     # defaults: "0", 300; ~30 min per arm on 2 cores
#   BRIDGE=chars bash scripts/speech_fig1.sh ...     # every arm reads the CTC head's characters (--adaptor-bridge)
#   STAGE=runs/speech-b2/stage bash scripts/speech_fig1.sh ...   # reuse a finished stage (fingerprint-checked)
#   MANIFEST=data/speech-r3/train.jsonl OUT=runs/speech-fig1-r3 bash scripts/speech_fig1.sh ...   # other data
#   ARMS="highest random-same-kind" STAGE=... bash scripts/speech_fig1.sh ...   # some arms, in this order
#     (without STAGE the stage is trained first, once, into OUT/stage with --ctc-stage-only)
# Resumable: a finished arm (speech_train.json present) is skipped, an interrupted one resumes from its
# checkpoint. The stage is trained once (no LLM step or evaluation) and every arm starts from it.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SEEDS=${1:-0}
STEPS=${2:-300}
EVERY=$(( STEPS / 6 > 0 ? STEPS / 6 : 1 ))
if [ -n "${MANIFEST:-}" ] && [ -z "${OUT:-}" ]; then
  # the default folder holds arms (and a stage) trained on the default manifest: never mix two data sets
  echo "speech_fig1.sh: MANIFEST is set, so set OUT to a folder of its own" >&2; exit 2
fi
OUT=${OUT:-runs/speech-fig1${BRIDGE:+-bridge-$BRIDGE}}
# every setting is given, so the arms do not depend on train-speech's default recipe
COMMON=(smollm2 --manifest "${MANIFEST:-data/speech/train.jsonl}" --test data/speech/probe_test.jsonl --encoder-window 14
        --adaptor-out-norm --ctc-weight 1 --max-steps "$STEPS" --batch-size 8 --lr 5e-4 --adaptor-lr 1e-3
        --warmup-steps 30 --eval-every "$EVERY" --eval-limit 20 --control news --save-steps 50
        --adaptor-bridge "${BRIDGE:-none}")
ARMS=${ARMS:-adaptor-only lowest highest random random-same-kind}
for name in $ARMS; do
  case $name in adaptor-only|lowest|highest|random|random-same-kind) ;;
    *) echo "speech_fig1.sh: unknown arm '$name' in ARMS" >&2; exit 2 ;; esac
done
mkdir -p "$OUT"
arm() {  # arm NAME SEED ARGS...: one train-speech run, skipped when finished
  local dir=$OUT/$1-seed$2
  shift 2
  [ -f "$dir/speech_train.json" ] && return 0
  .venv/bin/kappatune train-speech "${COMMON[@]}" "$@" -o "$dir" > "$dir.json" 2> "$dir.log"
}
if [ -z "${STAGE:-}" ]; then
  STAGE=$OUT/stage
  [ -f "$STAGE/ctc_stage.json" ] || .venv/bin/kappatune train-speech "${COMMON[@]}" --ctc-steps 3000 --ctc-stage-only \
    --seed 0 -o "$STAGE" > "$STAGE.json" 2> "$STAGE.log"
fi
for seed in $SEEDS; do
  for name in $ARMS; do
    if [ "$name" = adaptor-only ]; then
      arm adaptor-only "$seed" --budget-params 0 --ctc-stage-from "$STAGE" --seed "$seed"
    else
      arm "$name" "$seed" --order "$name" --budget-params 2M --ctc-stage-from "$STAGE" --seed "$seed"
    fi
  done
done
