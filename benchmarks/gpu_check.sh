#!/usr/bin/env bash
# The first-GPU check, as one command (issue 11, ask 7):
#
#   benchmarks/gpu_check.sh OUTDIR            # on a machine with a GPU and no network (< 8 min on one H200)
#   benchmarks/gpu_check.sh --smoke OUTDIR    # every step on the CPU with tiny sizes (CI runs this)
#
# Steps (each logged to OUTDIR/gpu_check.log; a failing step is recorded and the rest still run):
#   1. environment: GPU name, driver, torch/CUDA versions, git sha          -> OUTDIR/env.txt
#   2. build from source, in place (TORCH_CUDA_ARCH_LIST defaults to 9.0; the incremental ninja
#      build makes this a no-op when the tree is already built)
#   3. `python -m oba_ext.info` (must report cuda_kernels True and, in real mode, a visible GPU)
#   4. the CUDA tests (`pytest -m cuda`; in smoke mode they are collected and skip)
#   5. bench_scoring: resnet50 (224², batch 64) and ViT-B/16 (224², batch 64), float32 and bf16,
#      the gradient as the unit, with the HVP baselines (torch.func jvp(grad), double backward;
#      curvlinops/BackPACK providers when bench_scoring offers them and they are installed).
#      Each provider is timed alternately with the gradient (paired ratios), which doubles the
#      calls per provider: 6 pairs (CUDA-event timing on a dedicated GPU varies little), at most
#      12 s per provider, keep the step within the budget.
#   6. kernel microbenchmarks: channel-reduction GB/s against a device-to-device copy (Linear and
#      Conv layouts), weight-score TFLOP/s, attention kernels vs their O(N²) twins
# CSVs land in OUTDIR (never in benchmarks/results/ directly: a human commits them there with the
# GPU name, torch version and git sha, which env.txt and every CSV row carry).
# Exit status: 0 when every step passed, 1 otherwise (OUTDIR/summary.txt lists each step's status).
#
# Environment: PYTHON (default python3; CI passes .venv/bin/python), MAX_JOBS (default: nproc),
# TORCH_CUDA_ARCH_LIST (default 9.0 in real mode). On the lent GPU machine torch-pruning is not
# installed: carry its wheel (see /work/.library/device/README.md) — the script installs any wheels
# found in ./.whl into /tmp/site first.
set -uo pipefail

smoke=0
out=""
for a in "$@"; do
  case "$a" in
    --smoke) smoke=1 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $a (expected --smoke)" >&2; exit 2 ;;
    *) [[ -z "$out" ]] || { echo "gpu_check.sh: one OUTDIR expected, got '$out' and '$a'" >&2; exit 2; }
       out="$a" ;;
  esac
done
[[ -n "$out" ]] || { echo "usage: benchmarks/gpu_check.sh [--smoke] OUTDIR" >&2; exit 2; }

cd "$(dirname "$0")/.."
mkdir -p "$out"
out="$(cd "$out" && pwd)"
PY="${PYTHON:-python3}"
log="$out/gpu_check.log"
summary="$out/summary.txt"
: >"$log"
: >"$summary"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
failed=0
t_start=$(date +%s)

step() {  # step NAME CMD...: run, log, record status and seconds
  local name="$1"; shift
  local t0=$(date +%s)
  echo "=== [$name] $*" | tee -a "$log"
  "$@" >>"$log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if [[ $rc -eq 0 ]]; then
    echo "ok    $name (${dt}s)" | tee -a "$summary"
  else
    echo "FAIL  $name (rc=$rc, ${dt}s)" | tee -a "$summary"
    failed=1
  fi
  return 0
}

if [[ -d .whl ]] && ls .whl/*.whl >/dev/null 2>&1; then
  step wheels "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

if [[ $smoke -eq 1 ]]; then
  dev=cpu
  note="smoke (CPU, tiny sizes): not a measurement"
else
  dev=cuda
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
  note="gpu_check"
fi

# 1. environment
{
  echo "date: $(date -u +%FT%TZ)"
  echo "git_sha: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
  echo "mode: $([[ $smoke -eq 1 ]] && echo smoke || echo real)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c 'import torch, sys; print("python:", sys.version.split()[0]); print("torch:", torch.__version__, "cuda:", torch.version.cuda); print("gpu:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")'
} >"$out/env.txt" 2>&1
cat "$out/env.txt" | tee -a "$log"

# 2. build, 3. what was built
step build "$PY" setup.py build_ext --inplace
if [[ $smoke -eq 1 ]]; then
  step info "$PY" -c 'from oba_ext import info; d = info.collect(); print(d); assert d["cpu_kernels"], d'
else
  step info "$PY" -c 'from oba_ext import info; d = info.collect(); print(d); assert d["cuda_kernels"] and d["gpu_visible"], d'
fi

# 4. CUDA tests (JUnit XML kept for the record)
step cuda_tests "$PY" -m pytest -q -p no:cacheprovider -m cuda -rf --junitxml="$out/cuda_tests.xml" tests

# 5. end-to-end scoring vs one gradient, with the HVP baselines
if [[ $smoke -eq 1 ]]; then
  S=(--device cpu --models tiny_cnn --image 8 --batch 2 --rep 1 --warmup 0 --no-memory)
  V=(--device cpu --models vit_b_16 --vit-image 8 --vit-patch 4 --batch 2 --rep 1 --warmup 0 --no-memory
     --providers oba[out,in] exact[out,in] jvp_grad:exact)
  dtypes=(float32 bfloat16)
else
  S=(--device cuda --models resnet50 --image 224 --batch 64 --rep 6 --warmup 2 --max-seconds 12)
  V=(--device cuda --models vit_b_16 --vit-image 224 --vit-patch 16 --batch 64 --rep 6 --warmup 2 --max-seconds 12)
  dtypes=(float32 bfloat16)
fi
for dt in "${dtypes[@]}"; do
  step "scoring_cnn_$dt" "$PY" -m benchmarks.bench_scoring "${S[@]}" --dtype "$dt" --csv "$out/scoring.csv" --note "$note"
  step "scoring_vit_$dt" "$PY" -m benchmarks.bench_scoring "${V[@]}" --dtype "$dt" --csv "$out/scoring.csv" --note "$note"
done

# 6. kernel microbenchmarks (channel reduction vs D2D copy bandwidth, weight scores, attention)
if [[ $smoke -eq 1 ]]; then
  L=(--device cpu --reduce-shapes 16x8 --weight-shapes 16x8x8 --rep 1 --warmup 0 --no-memory)
  C=(--device cpu --reduce-shapes 2x4x5x5 --layouts nchw --weight-shapes 2x4x5x5x4 --rep 1 --warmup 0 --no-memory)
  A=(--device cpu --n 7 --batch 1 --heads 2 --head-dim 8 --rep 1 --warmup 0 --no-memory --no-plot)
else
  L=(--device cuda --rep 50 --reduce-shapes 16384x4096 64x197x768 32x1024x1024 --weight-shapes 16384x4096x4096 8192x768x3072)
  C=(--device cuda --rep 50 --reduce-shapes 256x64x56x56 256x256x56x56 128x512x28x28 --weight-shapes 128x64x56x56x64 128x256x14x14x256)
  A=(--device cuda --n 197 1024 4096 --rep 10 --max-seconds 20 --no-plot)
fi
step bench_linear_float32 "$PY" -m benchmarks.bench_linear "${L[@]}" --dtype float32 --csv "$out/linear.csv" --note "$note"
step bench_linear_bfloat16 "$PY" -m benchmarks.bench_linear "${L[@]}" --dtype bfloat16 --csv "$out/linear.csv" --note "$note"
step bench_conv "$PY" -m benchmarks.bench_conv "${C[@]}" --csv "$out/conv.csv" --note "$note"
step bench_attention "$PY" -m benchmarks.bench_attention "${A[@]}" --csv "$out/attention.csv" --note "$note"

echo "total: $(( $(date +%s) - t_start ))s" | tee -a "$summary"
exit $failed
