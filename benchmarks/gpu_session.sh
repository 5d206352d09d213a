#!/usr/bin/env bash
# One device-machine call: install, GPU tests, kernel table, decode table, decode profile.
# Usage on the device (repo root): bash benchmarks/gpu_session.sh
#   env: TESTS, TEST_TIMEOUT (whole run), TEST_CASE_TIMEOUT (one test), TEST_PROCS,
#   TEST_MAXFAIL; KERNELS_ARGS, KERNELS_TIMEOUT; DECODE_ARGS, DECODE_TIMEOUT;
#   PROFILE_ARGS, PROFILE_TIMEOUT; PIP_EXTRA (extra pip install arguments)
#   (a benchmark section runs when its *_ARGS variable is set, even to "").
# Example, the four GPU test files and the Qwen3-8B decode rows:
#   TESTS="tests/test_cuda_ffi.py tests/test_nvfp4_matmul.py tests/test_nvfp4_format.py
#   tests/test_pallas_nvfp4.py" TEST_TIMEOUT=300 DECODE_ARGS="--variants bf16,cuda-w4a16 --batch 1"
#   bash benchmarks/gpu_session.sh
# Writes logs and JSON under $OUT (or ./gpu_out).
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# Decode runs: FFI custom calls recorded into command buffers (CUDA graphs) like every other
# kernel, for every variant alike; autotuning results shared between the benchmark's processes.
DECODE_XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1 --xla_gpu_per_fusion_autotune_cache_dir=/tmp/xla_autotune"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

stamp "install"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-build-isolation --no-deps -e . ${PIP_EXTRA:-} > "$OUT/install.log" 2>&1 || { tail -30 "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"

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
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout -s INT -k 30 $TEST_TIMEOUT python3 -m pytest -q -rfE --tb=short \
  -p no:cacheprovider $XDIST $TIMEOUT_OPT --maxfail=${TEST_MAXFAIL:-6} \
  ${TESTS:-tests/test_cuda_ffi.py tests/test_nvfp4_matmul.py} \
  > "$OUT/pytest.log" 2>&1; echo "pytest rc=$?"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest.log" | tail -12

if [ -n "${KERNELS_ARGS+x}" ]; then
  stamp "kernel benchmark"
  timeout ${KERNELS_TIMEOUT:-120} python3 benchmarks/kernels.py $KERNELS_ARGS --out "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1
  echo "kernels rc=$?"
fi

if [ -n "${DECODE_ARGS+x}" ]; then
  stamp "decode benchmark"
  XLA_FLAGS="$DECODE_XLA_FLAGS" timeout ${DECODE_TIMEOUT:-300} python3 benchmarks/decode.py $DECODE_ARGS --json "$OUT/decode.json" > "$OUT/decode.log" 2>&1
  echo "decode rc=$?"
fi
if [ -n "${PROFILE_ARGS+x}" ]; then
  stamp "decode profile"
  XLA_FLAGS="$DECODE_XLA_FLAGS" timeout ${PROFILE_TIMEOUT:-150} python3 benchmarks/profile_decode.py $PROFILE_ARGS --json "$OUT/profile.json" > "$OUT/profile.log" 2>&1
  echo "profile rc=$?"
fi
stamp "done"
[ -f "$OUT/kernels.log" ] && tail -45 "$OUT/kernels.log"
[ -f "$OUT/decode.log" ] && grep -v '^{' "$OUT/decode.log" | tail -30
[ -f "$OUT/profile.log" ] && grep -v "^[IWE][0-9]" "$OUT/profile.log" | tail -30
