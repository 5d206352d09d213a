#!/usr/bin/env bash
# One device-machine call: install, GPU tests, kernel table, decode table, decode profile,
# the layer chain's bench.
# Usage on the device (repo root): bash benchmarks/gpu_session.sh
#   env: TESTS ("none" skips the tests), TEST_TIMEOUT (whole run), TEST_CASE_TIMEOUT (one
#   test), TEST_PROCS, TEST_MAXFAIL; KERNELS_ARGS, KERNELS_TIMEOUT; DECODE_ARGS,
#   DECODE_TIMEOUT, DECODE_JSON (file name under $OUT, default decode.json); PROFILE_ARGS,
#   PROFILE_TIMEOUT; SAMPLER_ARGS (benchmarks/sampler_cost.py's arguments), SAMPLER_TIMEOUT;
#   LAYER_BENCH_ARGS (ffi/tests/layer_check bench's arguments; the binary is
#   built with nvcc while the rest runs); ATTENTION_CHECK=1 (ffi/tests/attention_check, the
#   decode attention against a float64 reference at three grids a case, built the same way,
#   run at the end); PIP_EXTRA (extra pip install arguments); TAR_LOGS=1
#   (the logs go into $OUT/logs.tgz, JSON files stay: the device machine returns at most 8
#   files)
#   (a benchmark section runs when its *_ARGS variable is set, even to "").
# Example, the four GPU test files and the Qwen3-8B decode rows:
#   TESTS="tests/test_cuda_ffi.py tests/test_nvfp4_matmul.py tests/test_nvfp4_format.py
#   tests/test_pallas_nvfp4.py" TEST_TIMEOUT=300 DECODE_ARGS="--variants bf16,cuda-w4a16 --batch 1"
#   bash benchmarks/gpu_session.sh
# benchmarks/h100_session.sh is this script with the issue's decode rows, the layer bench and
# the attention checker.
# Writes logs and JSON under $OUT (or ./gpu_out).
set -u
OUT=${OUT:-gpu_out}
L="$OUT"
if [ "${TAR_LOGS:-0}" = 1 ]; then L="$OUT/logs"; fi
mkdir -p "$L"
export PATH=/usr/local/cuda/bin:$PATH PYTHONUNBUFFERED=1
# Decode runs: FFI custom calls recorded into command buffers (CUDA graphs) like every other
# kernel, for every variant alike; autotuning results shared between the benchmark's processes.
DECODE_XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1 --xla_gpu_per_fusion_autotune_cache_dir=/tmp/xla_autotune"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'); $(date -u)"

stamp "install"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
# PIP_EXTRA is split into words on purpose (several pip arguments).
# shellcheck disable=SC2086
python3 -m pip install -q --no-build-isolation --no-deps -e . ${PIP_EXTRA:-} > "$L/install.log" 2>&1 || { tail -30 "$L/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$L/gpu.txt"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"

# Builds a checker with nvcc in the background while the rest runs (collected by `wait`):
# build_checker BINARY LOG SOURCES...; LOG ends with "build rc=N".
build_checker() {
  local bin=$1 log=$2
  shift 2
  stamp "$(basename "$bin") build (background)"
  (nvcc -std=c++17 -O3 -arch=sm_90 -I ffi "$@" -o "$bin" > "$log" 2>&1; echo "build rc=$?" >> "$log") &
}
ATTN_CHECK=/tmp/attention_check
if [ "${ATTENTION_CHECK:-0}" = 1 ]; then
  build_checker "$ATTN_CHECK" "$L/attention_build.log" ffi/tests/attention_check.cu ffi/attention_kernels.cu
fi
LAYER_CHECK=/tmp/layer_check
if [ -n "${LAYER_BENCH_ARGS+x}" ]; then
  build_checker "$LAYER_CHECK" "$L/layer_build.log" ffi/tests/layer_check.cu ffi/decoder_layer.cu \
    ffi/nvfp4_kernels.cu ffi/attention_kernels.cu
fi

if [ "${TESTS:-}" != none ]; then
  stamp "GPU tests"
  # The GPU suite is compile-bound (minutes sequentially): with pytest-xdist (on the
  # device image; or carried in .whl) it runs 8 processes, each allocating GPU memory
  # on demand. -rfE names every failure in the summary; --maxfail ends the run early
  # enough for the summary to fit the time box, and pytest-timeout (also on the
  # image) names a test that hangs.
  XDIST=""
  if python3 -c "import xdist" 2>/dev/null; then XDIST="-n ${TEST_PROCS:-8}"; fi
  TEST_TIMEOUT=${TEST_TIMEOUT:-150}
  TIMEOUT_OPT=""
  # A hanging test is named when pytest-timeout stops it well inside the box; the box
  # itself interrupts pytest with SIGINT, so the summary of what ran is still printed.
  if python3 -c "import pytest_timeout" 2>/dev/null; then
    TIMEOUT_OPT="--timeout=${TEST_CASE_TIMEOUT:-$(( TEST_TIMEOUT * 2 / 3 ))}"
  fi
  # shellcheck disable=SC2086
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout -s INT -k 30 "$TEST_TIMEOUT" python3 -m pytest -q -rfE --tb=short \
    -p no:cacheprovider $XDIST $TIMEOUT_OPT --maxfail="${TEST_MAXFAIL:-6}" \
    ${TESTS:-tests/test_cuda_ffi.py tests/test_nvfp4_matmul.py} \
    > "$L/pytest.log" 2>&1; echo "pytest rc=$?"; grep -E "^(FAILED|ERROR)|passed|failed" "$L/pytest.log" | tail -12
fi

# shellcheck disable=SC2086
if [ -n "${KERNELS_ARGS+x}" ]; then
  stamp "kernel benchmark"
  timeout "${KERNELS_TIMEOUT:-120}" python3 benchmarks/kernels.py $KERNELS_ARGS --out "$OUT/kernels.json" > "$L/kernels.log" 2>&1
  echo "kernels rc=$?"
fi

# shellcheck disable=SC2086
if [ -n "${DECODE_ARGS+x}" ]; then
  stamp "decode benchmark"
  XLA_FLAGS="$DECODE_XLA_FLAGS" timeout "${DECODE_TIMEOUT:-300}" python3 benchmarks/decode.py $DECODE_ARGS \
    --json "$OUT/${DECODE_JSON:-decode.json}" > "$L/decode.log" 2>&1
  echo "decode rc=$?"
fi
# shellcheck disable=SC2086
if [ -n "${PROFILE_ARGS+x}" ]; then
  stamp "decode profile"
  XLA_FLAGS="$DECODE_XLA_FLAGS" timeout "${PROFILE_TIMEOUT:-150}" python3 benchmarks/profile_decode.py $PROFILE_ARGS --json "$OUT/profile.json" > "$L/profile.log" 2>&1
  echo "profile rc=$?"
fi
# shellcheck disable=SC2086
if [ -n "${SAMPLER_ARGS+x}" ]; then
  stamp "sampler cost"
  XLA_FLAGS="$DECODE_XLA_FLAGS" timeout "${SAMPLER_TIMEOUT:-120}" python3 benchmarks/sampler_cost.py $SAMPLER_ARGS --json "$OUT/sampler_cost.json" > "$L/sampler_cost.log" 2>&1
  echo "sampler cost rc=$?"
fi

# shellcheck disable=SC2086
if [ -n "${LAYER_BENCH_ARGS+x}" ]; then
  wait
  stamp "layer bench"
  tail -1 "$L/layer_build.log"
  if [ -x "$LAYER_CHECK" ]; then
    RJ_CODES_ORDER=1 timeout 120 "$LAYER_CHECK" bench $LAYER_BENCH_ARGS > "$L/layer_bench.log" 2>&1
    echo "layer bench rc=$?"
  fi
fi
if [ "${ATTENTION_CHECK:-0}" = 1 ]; then
  wait
  stamp "attention_check"
  tail -1 "$L/attention_build.log"
  if [ -x "$ATTN_CHECK" ]; then
    timeout 150 "$ATTN_CHECK" > "$L/attention_check.log" 2>&1
    echo "attention_check rc=$?"
    grep "^FAIL" "$L/attention_check.log" | head -5
    tail -1 "$L/attention_check.log"
  fi
fi
stamp "done"
[ -f "$L/kernels.log" ] && tail -45 "$L/kernels.log"
[ -f "$L/decode.log" ] && grep -v '^{' "$L/decode.log" | tail -30
[ -f "$L/sampler_cost.log" ] && grep "^|\|^rates" "$L/sampler_cost.log" | tail -24
[ -f "$L/profile.log" ] && grep -v "^[IWE][0-9]" "$L/profile.log" | tail -30
[ -f "$L/layer_bench.log" ] && grep " all \|shape" "$L/layer_bench.log"
if [ "${TAR_LOGS:-0}" = 1 ]; then tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$L"; fi
