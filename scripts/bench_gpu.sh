#!/usr/bin/env bash
# The GPU rows of BENCHMARKS.md in one call (sized for ~6 minutes on one H100; each part in its own
# process under its own time limit, so one slow part cannot take the others with it). Compiles are
# long on a GPU (90 s for small's bf16 train step on an H100), so the parts are ordered by need.
#
#   OUT=bench_gpu bash scripts/bench_gpu.sh      # logs land in $OUT/<part>.log
#   FULL parts: PARTS="compare accel bissm compile memory"
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
  grep -E '^\[|Error' "$OUT/$name.log" | cut -c1-330 | tail -n "${TAIL:-30}"
}

nvidia-smi -L
"$PY" -c "import jax, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, jax.devices())"

# PARTS picks the parts, in order (default: compare accel). The Pallas kernel's check and timings:
#   PARTS="pallas accel_scan bissm_pallas" OUT=$OUT bash scripts/bench_gpu.sh
PARTS=${PARTS:-compare accel}
for p in $PARTS; do
  case $p in
    # the CPU table's comparison on the GPU: tiny 256 px 4 steps CFG, JAX vs torch (CUDA) eager; one train step.
    compare) XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 part compare 170 --parts sampling,train --repeats 5 --torch-compile off ;;
    # base 512 px 4-step sampling throughput, then training MFU (bf16), JAX alone on the whole GPU.
    accel) part accel 190 --parts accel --repeats 5 --accel-sample base --accel-sample-batch 16 --accel-train base,small --accel-train-batch 32 ;;
    # the fused Pallas scan: agreement with the sequential form, then timings against associative.
    pallas)
      echo "=== pallas_check (limit 120s) $(date -u +%T)"
      timeout 120 "$PY" scripts/pallas_check.py >"$OUT/pallas_check.log" 2>&1
      echo "rc=$? $(date -u +%T)"
      tail -n 40 "$OUT/pallas_check.log" | cut -c1-300 ;;
    # base sampling images/s, then small's MFU with the associative and the Pallas scan side by side.
    accel_scan) part accel_scan 300 --parts accel --repeats 5 --accel-sample base --accel-sample-batch 16 --accel-train small --accel-train-batch 32 --accel-scan associative,pallas ;;
    # the MFU rows alone (small, Pallas scan first), then base sampling alone: for a short call.
    mfu_scan) part mfu_scan 170 --parts accel --repeats 5 --accel-sample "" --accel-train small --accel-train-batch 32 --accel-scan pallas,associative ;;
    # MFU with the Pallas scan at two batches for small and base, each step's device time by XLA op.
    mfu_profile) part mfu_profile 330 --parts accel --repeats 5 --accel-sample "" --accel-train small,base --accel-train-batch 32,128 --accel-scan pallas --accel-profile ;;
    # the same profile for one batch, with the optimized HLO kept (to name the fusions).
    profile_b32) part profile_b32 240 --parts accel --repeats 5 --accel-sample "" --accel-train small,base --accel-train-batch 32 --accel-scan pallas --accel-profile --accel-hlo-dir "$OUT/hlo" ;;
    sample_base) part sample_base 90 --parts accel --repeats 5 --accel-sample base --accel-sample-batch 16 --accel-train "" ;;
    bissm_pallas) part bissm_pallas 90 --parts bissm --bissm-what scan --bissm-lengths 256,1024,4096 --bissm-forms associative,pallas --bissm-repeats 5 ;;
    # slower extras: the scan forms, torch.compile, memory.
    bissm) part bissm 60 --parts bissm --bissm-what scan --bissm-lengths 256,1024,4096 --bissm-forms sequential,chunked,associative --bissm-repeats 5 ;;
    compile) XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 part compile 300 --parts sampling --batches 8 --repeats 5 --torch-compile on --no-profile ;;
    memory) part memory 120 --parts memory --memory-vae-tile 0 ;;
    *) echo "unknown part $p" ;;
  esac
done
