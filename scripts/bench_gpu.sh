#!/usr/bin/env bash
# The GPU rows of BENCHMARKS.md in one call (sized for ~6 minutes on one H100; each part in its own
# process under its own time limit, so one slow part cannot take the others with it). Compiles are
# long on a GPU (90 s for small's bf16 train step on an H100), so the parts are ordered by need.
#
#   OUT=bench_gpu bash scripts/bench_gpu.sh      # logs land in $OUT/<part>.log
#
# Needs JAX with CUDA and a CUDA torch in the same Python (python3), plus requirements.txt's
# pure-Python packages (ml_collections); grain is not needed by the benchmark.
set -u
OUT=${OUT:-bench_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
PY=${PY:-python3}

part() {  # part NAME SECONDS ARGS...: one benchmark process, its rows printed as they come, its log kept
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s) $(date -u +%T)"
  timeout "$limit" "$PY" -m microforge_jax.bench "$@" >"$OUT/$name.log" 2>&1
  echo "rc=$? $(date -u +%T)"
  grep -E '^\[|Error' "$OUT/$name.log" | cut -c1-330 | tail -n 30
}

nvidia-smi -L
"$PY" -c "import jax, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, jax.devices())"

# 1. the CPU table's comparison on the GPU: tiny 256 px 4 steps CFG, JAX vs torch (CUDA) eager; one train step.
XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 part compare 170 --parts sampling,train --repeats 5 --torch-compile off
# 2. base 512 px 4-step sampling throughput, then training MFU (bf16), JAX alone on the whole GPU.
part accel 190 --parts accel --repeats 5 --accel-sample base --accel-sample-batch 16 --accel-train base,small --accel-train-batch 32
# Not in the 6-minute call (run when there is time): the scan forms and torch.compile.
if [ "${FULL:-0}" = 1 ]; then
  part bissm 60 --parts bissm --bissm-what scan --bissm-lengths 256,1024,4096 --bissm-forms sequential,chunked,associative --bissm-repeats 5
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 part compile 300 --parts sampling --batches 8 --repeats 5 --torch-compile on --no-profile
  part memory 120 --parts memory --memory-vae-tile 0
fi
