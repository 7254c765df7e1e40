#!/usr/bin/env bash
# Every GPU check in one time-boxed command, for a short loan of a GPU machine whose image already has
# torch, triton, timm, ninja, pybind11, pytest-benchmark and nvcc (the device tool's machines).
#
#   MASKEDSSL_COMMIT=<sha> bash benchmarks/gpu_session.sh [TOTAL_SECONDS]      (default 540)
#
# (a copy of the tree without .git cannot name its commit: MASKEDSSL_COMMIT goes into every result file)
# Phases, most valuable first; each gets at most its own cap and what is left of TOTAL_SECONDS, so the
# command ends in time and whatever finished is kept:
#   1. install (no deps, no build) + build the CUDA extension for this GPU's arch only
#   2. the GPU-marked tests (both kernel backends on CUDA tensors)      -> gpu-tests.{log,xml}
#   3. op benchmarks, headline shapes (token_gather first)             -> results/ops-*.json|png
#   4. training-step benchmark, ViT-B/16                                 -> results/train-*.json|png
#   5. host dispatch overhead                                            -> bench-dispatch.log
#   6. throughput baselines for the regression tests                     -> baselines/<device>.json
# Logs go to a work folder; at the end summary.txt and one session.tar.gz (logs, results, baselines) are
# written to $OUT (the device tool's return folder, which brings back few files) when it is set, else
# everything stays in gpu-session/ here. A phase that fails or times out is reported in summary.txt; the
# next phase still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
TOTAL=${1:-540}
PY=${PY:-python3}
WORK=gpu-session
rm -rf "$WORK"
mkdir -p "$WORK"
START=$SECONDS
SUMMARY="$WORK/summary.txt"
: > "$SUMMARY"

phase() {  # phase NAME CAP_SECONDS COMMAND...
  local name=$1 cap=$2
  shift 2
  local left=$((TOTAL - 20 - (SECONDS - START)))  # 20 s kept for packing up
  local limit=$((cap < left ? cap : left))
  if ((limit < 15)); then
    echo "$name: skipped (no time left)" | tee -a "$SUMMARY"
    return
  fi
  local t0=$SECONDS
  timeout --signal=INT --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc in $((SECONDS - t0)) s (limit $limit s)" | tee -a "$SUMMARY"
  tail -n 3 "$WORK/$name.log" | sed 's/^/    /' | tee -a "$SUMMARY"
}

export MASKEDSSL_COMMIT=${MASKEDSSL_COMMIT:-$(git rev-parse HEAD 2>/dev/null || true)}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  echo "commit ${MASKEDSSL_COMMIT:-unknown}"
} 2>&1 | tee -a "$SUMMARY"

ARCH=$($PY -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}')")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$ARCH}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# the editable install maps maskedssl.kernels to kernels/ and builds nothing; the next phase builds the
# extension once, in place
phase install 60 env MASKEDSSL_BUILD_CUDA=0 $PY -m pip install -q --no-deps --no-build-isolation -e .
phase build 240 env MASKEDSSL_BUILD_CUDA=1 $PY setup.py -q build_ext --inplace
phase gpu-tests 240 $PY -m pytest -m gpu -q -rfE -p no:cacheprovider --junitxml="$WORK/gpu-tests.xml"
# timed runs: kernel outputs are not NaN-filled first, as the tests do to catch unwritten elements
export MASKEDSSL_POISON_OUTPUTS=0
phase bench-ops 150 $PY -m benchmarks.bench_ops --quick
phase bench-train 120 $PY -m benchmarks.bench_train --quick
phase bench-dispatch 30 $PY -m benchmarks.bench_dispatch --calls 500
phase baselines 90 env MASKEDSSL_BENCH_WRITE_BASELINE=1 $PY -m pytest -m benchmark -q -p no:cacheprovider \
  --benchmark-enable

mkdir -p "$WORK/results" "$WORK/baselines"
cp benchmarks/results/*.json benchmarks/results/*.png "$WORK/results/" 2>/dev/null
cp benchmarks/baselines/*.json "$WORK/baselines/" 2>/dev/null
echo "total: $((SECONDS - START)) s" | tee -a "$SUMMARY"
if [[ -n "${OUT:-}" ]]; then
  cp "$SUMMARY" "$OUT/summary.txt"
  tar -czf "$OUT/session.tar.gz" -C "$WORK" .
fi
