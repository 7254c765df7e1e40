#!/usr/bin/env bash
# Every GPU check in one time-boxed command, for a short loan of a GPU machine whose image already has
# torch, triton, timm, ninja, pybind11, pytest-benchmark and nvcc (the device tool's machines).
#
#   bash benchmarks/gpu_session.sh [TOTAL_SECONDS]      (default 540)
#
# Phases, most valuable first; each gets at most its own cap and what is left of TOTAL_SECONDS, so the
# command ends in time and whatever finished is kept:
#   1. install (no deps) + build the CUDA extension for this GPU's arch only
#   2. the GPU-marked tests (both kernel backends on CUDA tensors)      -> gpu-tests.{log,xml}
#   3. op benchmarks, headline shapes                                    -> benchmarks/results/ops-*.json|png
#   4. training-step benchmark, ViT-B/16                                 -> benchmarks/results/train-*.json|png
#   5. host dispatch overhead                                            -> dispatch.log
#   6. throughput baselines for the regression tests                     -> benchmarks/baselines/<device>.json
# Logs and results are copied to $OUT (the device tool's return folder) when it is set, else to
# gpu-session/ here. A phase that fails or times out is reported in summary.txt; the next phase still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
TOTAL=${1:-540}
DEST=${OUT:-gpu-session}
mkdir -p "$DEST"
START=$SECONDS
SUMMARY="$DEST/summary.txt"
: > "$SUMMARY"

phase() {  # phase NAME CAP_SECONDS COMMAND...
  local name=$1 cap=$2
  shift 2
  local left=$((TOTAL - (SECONDS - START)))
  local limit=$((cap < left ? cap : left))
  if ((limit < 15)); then
    echo "$name: skipped (no time left)" | tee -a "$SUMMARY"
    return
  fi
  local t0=$SECONDS
  timeout --signal=INT --kill-after=10 "$limit" "$@" > "$DEST/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc in $((SECONDS - t0)) s (limit $limit s)" | tee -a "$SUMMARY"
  tail -n 3 "$DEST/$name.log" | sed 's/^/    /' | tee -a "$SUMMARY"
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  git rev-parse HEAD 2>/dev/null || true
} > "$DEST/device.txt" 2>&1
cat "$DEST/device.txt"

ARCH=$(python -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}')")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$ARCH}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
phase install 90 pip install -q --no-deps --no-build-isolation -e .
phase build 240 env MASKEDSSL_BUILD_CUDA=1 python setup.py -q build_ext --inplace
phase gpu-tests 240 python -m pytest -m gpu -q -rfE -p no:cacheprovider --junitxml="$DEST/gpu-tests.xml"
phase bench-ops 150 python -m benchmarks.bench_ops --quick
phase bench-train 120 python -m benchmarks.bench_train --quick
phase bench-dispatch 30 python -m benchmarks.bench_dispatch --calls 500
phase baselines 90 env MASKEDSSL_BENCH_WRITE_BASELINE=1 python -m pytest -m benchmark -q -p no:cacheprovider \
  --benchmark-enable

mkdir -p "$DEST/results" "$DEST/baselines"
cp benchmarks/results/*.json benchmarks/results/*.png "$DEST/results/" 2>/dev/null
cp benchmarks/baselines/*.json "$DEST/baselines/" 2>/dev/null
echo "total: $((SECONDS - START)) s" | tee -a "$SUMMARY"
