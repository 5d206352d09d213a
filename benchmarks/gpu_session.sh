#!/usr/bin/env bash
# One device-machine call: install, GPU tests, kernel table, decode table.
# Usage on the device (repo root): bash benchmarks/gpu_session.sh   (carry: .whl)
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
# The GPU suite is compile-bound (minutes sequentially): with pytest-xdist carried
# in .whl (pytest_xdist + execnet wheels) it runs 8 processes, each allocating
# GPU memory on demand. -rfE names every failure in the summary.
XDIST=""
if python3 -c "import xdist" 2>/dev/null; then XDIST="-n ${TEST_PROCS:-8}"; fi
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -rfE --tb=line \
  -p no:cacheprovider $XDIST ${TESTS:-tests/test_cuda_ffi.py tests/test_nvfp4_matmul.py} \
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
stamp "done"
[ -f "$OUT/kernels.log" ] && tail -45 "$OUT/kernels.log"
[ -f "$OUT/decode.log" ] && grep -v '^{' "$OUT/decode.log" | tail -30
