#!/usr/bin/env bash
# One prepared validation pass of the CUDA engine on a lent GPU (the device tool's H200), from the repo root:
#
#   bash bench/gpu_validate.sh            # results under $OUT (device tool) or bench/results/gpu_validate/
#
# With the device tool (one call, then give the machine back), from this machine's repo root:
#   mkdir -p .gpudata/benchmarks && cp -r ../shared/data/benchmarks/Set5 ../shared/data/benchmarks/Set14 \
#     .gpudata/benchmarks/ && echo /.gpudata/ >> .git/info/exclude        # once: the PSNR data travels
#   run(command="QUANTSR_CODE_VERSION=<git describe --always --dirty, run here> bash bench/gpu_validate.sh",
#       carry=[".gpudata"], timeout_s=420)
# then copy $OUT's gpu_inference.json to bench/results/ and run `python bench/report.py`.
#
# Installs nothing (the device has no network): it runs the working tree with the machine's python3, which
# must already hold torch (CUDA), cupy, numpy, safetensors, pytest, opencv, pyyaml. Steps, each in its own
# process under a time cap, inside a global budget ($BUDGET seconds, default 420):
#   1 env        versions, device, driver; stops here (rc 0, summary says why) when the cupy backend cannot run
#   2 kernels    NVRTC compile+load of the per-layer kernels, their exactness at real layer sizes vs float64
#                (mma and dp4a, bit agreement), mma.sync issue ceilings, kernel-only timings of the engine's
#                qsr_conv_tc (every tuning candidate) beside cuDNN fp16/TF32  -> kernel_check.txt/.json
#   3 bench      bench/gpu_inference.py (interleaved timings, fp16+graph baseline, engine in both precisions,
#                Set5/Set14 PSNR on cupy and torch when $QUANTSR_DATA/benchmarks or .gpudata/benchmarks
#                exists, kernel profile)                                -> bench.txt, gpu_inference.json
#   4 pytest     the GPU tests (marker gpu), TF32 off in the references  -> pytest_gpu.txt
#   5 sanitizer  compute-sanitizer memcheck on one engine GPU test (skipped when absent or out of time)
#                                                                       -> sanitizer.txt
# BENCH_ARGS adds options to the benchmark (e.g. "--repeat 10").
# summary.txt has one line per step (rc, seconds) and the benchmark's headline: 8 files in all.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu_validate}"
mkdir -p "$OUT"
BUDGET="${BUDGET:-420}"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export PYTHONDONTWRITEBYTECODE=1
export CUPY_CACHE_DIR="${CUPY_CACHE_DIR:-/tmp/quantsr-cupy-cache}"
if [ -z "${QUANTSR_DATA:-}" ] && [ -d .gpudata/benchmarks ]; then
  export QUANTSR_DATA="$PWD/.gpudata"
fi
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

step() {  # step NAME CAP LOGFILE CMD...
  local name=$1 cap=$2 log=$3
  shift 3
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 15 ]; then
    echo "$name: skipped (budget spent: ${SECONDS}s of ${BUDGET}s)" | tee -a "$SUMMARY"
    return 99
  fi
  [ "$cap" -gt "$left" ] && cap=$left
  local t0=$SECONDS
  echo "=== $name (cap ${cap}s): $*" >>"$log"
  timeout -k 5 "$cap" "$@" >>"$log" 2>&1
  local rc=$?
  echo "$name: rc=$rc in $((SECONDS - t0))s (cap ${cap}s)" | tee -a "$SUMMARY"
  return $rc
}

step env 60 "$OUT/env.txt" "$PY" bench/gpu_kernel_check.py env
rc=$?
nvidia-smi >>"$OUT/env.txt" 2>&1
if [ "$rc" -ne 0 ]; then
  echo "stopped: the cupy backend cannot run here (see env.txt)" | tee -a "$SUMMARY"
  exit 0
fi

step kernels 100 "$OUT/kernel_check.txt" "$PY" bench/gpu_kernel_check.py kernels --json "$OUT/kernel_check.json"

PSNR_OPT=""
[ -n "${QUANTSR_DATA:-}" ] && [ -d "$QUANTSR_DATA/benchmarks" ] && PSNR_OPT="--psnr"
step bench 220 "$OUT/bench.txt" "$PY" bench/gpu_inference.py $PSNR_OPT --profile ${BENCH_ARGS:-} \
  --json "$OUT/gpu_inference.json"
grep -h "^speedup_vs_fp16" "$OUT/bench.txt" >>"$SUMMARY" 2>/dev/null

TIMEOUT_OPT=""
"$PY" -c "import pytest_timeout" 2>/dev/null && TIMEOUT_OPT="--timeout=120"
step pytest 90 "$OUT/pytest_gpu.txt" "$PY" -m pytest -m gpu -q -p no:cacheprovider $TIMEOUT_OPT \
  tests/test_kernels.py tests/test_backends.py tests/test_engine_gpu.py

if command -v compute-sanitizer >/dev/null 2>&1; then
  step sanitizer 45 "$OUT/sanitizer.txt" compute-sanitizer --tool memcheck --error-exitcode 9 \
    "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_engine_gpu.py -k "real_sizes and full and wm4w4"
else
  echo "sanitizer: compute-sanitizer not found" | tee -a "$SUMMARY"
fi
echo "total: ${SECONDS}s" | tee -a "$SUMMARY"
exit 0
