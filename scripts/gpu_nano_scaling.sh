#!/usr/bin/env bash
# Issue 8: how nano's ShapesEval grows with flow steps when compute is not the limit (one GPU).
# Each run starts from the default run's VAE (copied from $BASE) and trains the flow stage alone
# with nano's recipe; ShapesEval of $NUM held-out prompts follows each run.
#
#   BASE=.cache/gpu_run/vae_base RUNS="500 4000" NUM=400 OUT=out bash scripts/gpu_nano_scaling.sh
#
# BASE is a work directory holding config.json and checkpoints/vae; its config's model.text.path
# names the text encoder folder (the device carries an fp16 copy of MiniLM: the 90 MB fp32 file is
# over the transfer limit; the loader casts it back to fp32).
set -u
BASE=${BASE:-.cache/gpu_run/vae_base}
RUNS=${RUNS:-500 4000}
NUM=${NUM:-400}
BATCH=${BATCH:-32}
OUT=${OUT:-out}
PY=${PY:-python3}
DEADLINE=${DEADLINE:-0}  # seconds from the start; >0: each run's training stops in time for its eval
EVAL_S=${EVAL_S:-100}    # what one eval is given
START=$(date +%s)
TEXT=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['model']['text']['path'])" "$BASE/config.json")
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
for steps in $RUNS; do
  w=runs/scale_${steps}_b${BATCH}
  rm -rf "$w"; mkdir -p "$w/checkpoints"
  cp -r "$BASE/checkpoints/vae" "$w/checkpoints/"; cp "$BASE/config.json" "$w/"
  echo "=== flow $steps x $BATCH $(date -u +%T)"
  limit=100000
  if [ "$DEADLINE" -gt 0 ]; then limit=$((DEADLINE - ($(date +%s) - START) - EVAL_S)); fi
  if [ "$limit" -lt 60 ]; then echo "no time left for $steps steps"; break; fi
  timeout "$limit" $PY train.py --config configs/nano.py --workdir "$w" "stages=('flow',)" final_eval.num=0 \
    model.text.path="$TEXT" train.flow.steps="$steps" train.flow.batch_size="$BATCH" \
    checkpoint_every=2000 2>&1 | tr '\r' '\n' | grep -aE "step/s|s/step|val/loss|rror" | awk "NR%50==1 || /val|rror/" | cut -c1-200 | tail -n 6
  echo "train rc=${PIPESTATUS[0]} (124: stopped at the deadline; the eval reads the last checkpoint)"
  echo "=== eval $(date -u +%T)"
  timeout "$EVAL_S" $PY -m microforge_jax.eval --workdir "$w" --num "$NUM" --edits 0 --out "$OUT/scale_${steps}_b${BATCH}.json" 2>&1 | tail -n 14
  cp "$w/metrics.jsonl" "$OUT/metrics_${steps}_b${BATCH}.jsonl" 2>/dev/null
done
echo "=== done $(date -u +%T)"
