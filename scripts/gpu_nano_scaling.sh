#!/usr/bin/env bash
# How nano's ShapesEval grows with flow steps when compute is not the limit (one GPU).
# Each run starts from the default run's VAE (copied from $BASE) and trains the flow stage alone
# with nano's recipe; ShapesEval of $NUM held-out prompts follows each run, and (CURVE=1) of each of
# its checkpoints as soon as it is written, so one call gives the learning curve.
#
#   BASE=.cache/gpu_run/vae_base RUNS="6000x32 3000x128" PARALLEL=1 CURVE=1 NUM=400 OUT=out \
#     bash scripts/gpu_nano_scaling.sh
#
# RUNS: space-separated STEPS or STEPSxBATCH. PARALLEL=1 trains the runs at the same time (nano's
# steps are launch-bound on a GPU: two processes share it at nearly full speed each).
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
PARALLEL=${PARALLEL:-0}
CURVE=${CURVE:-0}         # 1: evaluate every checkpoint as it appears
CKPT_EVERY=${CKPT_EVERY:-2000}
DEADLINE=${DEADLINE:-0}   # seconds from the start; >0: training stops in time for the last eval
EVAL_S=${EVAL_S:-100}     # what one eval is given
EXTRA=${EXTRA:-}          # more config overrides for every run
START=$(date +%s)
TEXT=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['model']['text']['path'])" "$BASE/config.json")
mkdir -p "$OUT"
# Several JAX processes on one GPU: no process may preallocate most of its memory.
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 XLA_PYTHON_CLIENT_PREALLOCATE=false

eval_dir() {  # eval_dir WORKDIR TAG: ShapesEval of the run's latest flow checkpoint -> $OUT/TAG.json
  timeout "$EVAL_S" $PY -m microforge_jax.eval --workdir "$1" --num "$NUM" --edits 0 --out "$OUT/$2.json" \
    > "$OUT/$2.log" 2>&1
  echo "eval $2 rc=$? $(date -u +%T): $(grep -a 'single' "$OUT/$2.log" | head -n 2 | tr '\n' ' ' | cut -c1-160)"
}

watch_curve() {  # watch_curve WORKDIR TAG PID: evaluate each finished checkpoint of a training run
  local w=$1 tag=$2 pid=$3 done_steps=" " s evals=()
  while :; do
    local alive=0
    kill -0 "$pid" 2>/dev/null && alive=1
    for d in "$w"/checkpoints/flow/*/; do
      s=$(basename "$d")
      [[ "$s" =~ ^[0-9]+$ ]] || continue
      [ "$s" -gt 1 ] || continue  # the trainer's first save (step 1): nothing learned yet
      [ -e "$d/_CHECKPOINT_METADATA" ] || continue
      [[ "$done_steps" == *" $s "* ]] && continue
      done_steps="$done_steps$s "
      local e="${w}_at$s"
      rm -rf "$e"; mkdir -p "$e/checkpoints/flow"
      cp "$w/config.json" "$e/"; cp -r "$w/checkpoints/vae" "$e/checkpoints/"; cp -r "$d" "$e/checkpoints/flow/$s"
      eval_dir "$e" "${tag}_at$s" &
      evals+=($!)
    done
    [ "$alive" = 0 ] && break
    sleep 5
  done
  # Only the evals: a bare `wait` would also reap the training process, whose status train_one reads.
  if [ "${#evals[@]}" -gt 0 ]; then wait "${evals[@]}"; fi
}

train_one() {  # train_one STEPS BATCH
  local steps=$1 batch=$2 w=runs/scale_${1}_b${2} tag=scale_${1}_b${2} limit=100000
  rm -rf "$w"; mkdir -p "$w/checkpoints"
  cp -r "$BASE/checkpoints/vae" "$w/checkpoints/"; cp "$BASE/config.json" "$w/"
  echo "=== flow $steps x $batch $(date -u +%T)"
  if [ "$DEADLINE" -gt 0 ]; then limit=$((DEADLINE - ($(date +%s) - START) - EVAL_S)); fi
  if [ "$limit" -lt 60 ]; then echo "no time left for $steps x $batch"; return; fi
  local every=$((CURVE == 1 ? CKPT_EVERY : steps))
  # shellcheck disable=SC2086
  timeout "$limit" $PY train.py --config configs/nano.py --workdir "$w" "stages=('flow',)" final_eval.num=0 \
    model.text.path="$TEXT" train.flow.steps="$steps" train.flow.batch_size="$batch" \
    checkpoint_every="$every" $EXTRA > "$OUT/train_$tag.log" 2>&1 &
  local pid=$!
  if [ "$CURVE" = 1 ]; then watch_curve "$w" "$tag" "$pid"; fi
  wait "$pid"
  local rc=$?
  tr '\r' '\n' < "$OUT/train_$tag.log" | grep -aE "step/s|s/step|val/loss|rror" | awk "NR%50==1 || /val|rror/" \
    | cut -c1-200 | tail -n 6
  echo "train $tag rc=$rc (124: stopped at the deadline) $(date -u +%T)"
  if [ "$CURVE" != 1 ]; then eval_dir "$w" "$tag"; fi
  cp "$w/metrics.jsonl" "$OUT/metrics_$tag.jsonl" 2>/dev/null
}

for r in $RUNS; do
  steps=${r%x*}; batch=$BATCH
  [[ "$r" == *x* ]] && batch=${r#*x}
  if [ "$PARALLEL" = 1 ]; then train_one "$steps" "$batch" & else train_one "$steps" "$batch"; fi
done
wait
echo "=== done $(date -u +%T)"
