#!/bin/bash
# Everything the CUDA kernel needs checked on a GPU machine, in one go:
#   build (CMake through pip, and the standalone checkers with nvcc), the checkers (GEMV
#   and decode attention against float64 references, the PDL layer chain against plain
#   launches, and its per-kernel timeline, the sampler's top-k against a host sort),
#   compute-sanitizer memcheck (all four) + racecheck (GEMV with S1 through bar.sync,
#   attention, top-k, the named-barrier probe) + synccheck (GEMV), the cost of a kernel boundary (boundary_bench), the
#   memory side of a persistent layer (stream_probe), the kernel-variant micro-benchmark, the GPU tests, and benchmarks/kernels.py.
# Usage (repository root, on the GPU machine):  bash ffi/tests/run_gpu_checks.sh [outdir]
# Logs go to outdir (default $OUT or /tmp/nvfp4_gpu_checks); a short summary is printed.
set -u
export PYTHONUNBUFFERED=1 PATH=/usr/local/cuda/bin:$PATH
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
LOG=${1:-${OUT:-/tmp/nvfp4_gpu_checks}}
mkdir -p "$LOG"
cd "$ROOT" || exit 1
PY=${PYTHON:-python3}

echo "== build"
$PY -m pip wheel --no-deps --no-build-isolation -w /tmp/nvfp4_whl . > "$LOG/build.log" 2>&1 || { echo "build failed"; tail "$LOG/build.log"; exit 1; }
mkdir -p reset_jax/_lib
$PY -c "
import glob, zipfile
w = sorted(glob.glob('/tmp/nvfp4_whl/reset_jax-*.whl'))[-1]
z = zipfile.ZipFile(w)
so = [n for n in z.namelist() if n.endswith('libreset_jax_nvfp4.so')][0]
open('reset_jax/_lib/libreset_jax_nvfp4.so', 'wb').write(z.read(so))
print('library from', w)"
nvcc -std=c++17 -O3 -arch=sm_90 -lineinfo -I ffi ffi/tests/nvfp4_check.cu ffi/nvfp4_kernels.cu \
  -o /tmp/nvfp4_check > "$LOG/build_check.log" 2>&1 || { echo "checker build failed"; exit 1; }
# The same checker without the wide kernel's S1 form, so that its M = 1 launches take the
# form that scales the weights (the library's path for scales not 8-byte aligned).
nvcc -std=c++17 -O3 -arch=sm_90 -lineinfo -I ffi -DRESET_JAX_WIDE_S1=0 ffi/tests/nvfp4_check.cu \
  ffi/nvfp4_kernels.cu -o /tmp/nvfp4_check_s0 > "$LOG/build_check_s0.log" 2>&1 || { echo "checker (no S1) build failed"; exit 1; }

# The same checker with S1's finishers reached through bar.sync by every warp instead of
# bar.arrive (RESET_JAX_S1_ARRIVE=0): racecheck reports every arrive -> sync hand-off as a race,
# correct or not (named_barrier_probe below shows it), so racecheck runs on this build. It checks
# the kernels' other shared memory; the S1 ring's reuse it cannot see (every tile is then a
# whole-CTA barrier).
nvcc -std=c++17 -O3 -arch=sm_90 -lineinfo -I ffi -DRESET_JAX_S1_ARRIVE=0 ffi/tests/nvfp4_check.cu \
  ffi/nvfp4_kernels.cu -o /tmp/nvfp4_check_rc > "$LOG/build_check_rc.log" 2>&1 || { echo "checker (racecheck form) build failed"; exit 1; }
nvcc -std=c++17 -O3 -arch=sm_90 -I ffi ffi/tests/named_barrier_probe.cu -o /tmp/named_barrier_probe \
  > "$LOG/build_probe.log" 2>&1 || { echo "named-barrier probe build failed"; exit 1; }
nvcc -std=c++17 -O3 -arch=sm_90 -lineinfo -I ffi ffi/tests/attention_check.cu ffi/attention_kernels.cu \
  -o /tmp/attention_check > "$LOG/build_attention_check.log" 2>&1 || { echo "attention checker build failed"; exit 1; }

nvcc -std=c++17 -O3 -arch=sm_90 -lineinfo -I ffi ffi/tests/layer_check.cu ffi/decoder_layer.cu ffi/nvfp4_kernels.cu \
  ffi/attention_kernels.cu -o /tmp/layer_check > "$LOG/build_layer_check.log" 2>&1 || { echo "layer checker build failed"; exit 1; }

nvcc -std=c++17 -O3 -arch=sm_90 -rdc=true -I ffi -DRJ_TIMELINE ffi/tests/layer_check.cu ffi/decoder_layer.cu \
  ffi/nvfp4_kernels.cu ffi/attention_kernels.cu -o /tmp/layer_timeline > "$LOG/build_layer_timeline.log" 2>&1 || { echo "timeline build failed"; exit 1; }

nvcc -std=c++17 -O3 -arch=sm_90 -lineinfo -I ffi ffi/tests/topk_check.cu ffi/topk_kernels.cu \
  ffi/sort_kernels.cu -o /tmp/topk_check > "$LOG/build_topk_check.log" 2>&1 || { echo "top-k checker build failed"; exit 1; }

nvcc -std=c++17 -O3 -arch=sm_90 -I ffi ffi/tests/boundary_bench.cu -o /tmp/boundary_bench \
  > "$LOG/build_boundary_bench.log" 2>&1 || { echo "boundary bench build failed"; exit 1; }
nvcc -std=c++17 -O3 -arch=sm_90 -I ffi ffi/tests/stream_probe.cu -o /tmp/stream_probe \
  > "$LOG/build_stream_probe.log" 2>&1 || { echo "stream probe build failed"; exit 1; }

echo "== layer chain";  /tmp/layer_check check > "$LOG/layer.log" 2>&1; echo "rc=$?"; tail -1 "$LOG/layer.log"
echo "== layer memcheck";  compute-sanitizer --tool memcheck /tmp/layer_check check quick > "$LOG/layer_memcheck.log" 2>&1; echo "rc=$?"; tail -1 "$LOG/layer_memcheck.log"
echo "== layer timeline"; /tmp/layer_timeline timeline > "$LOG/layer_timeline.log" 2>&1; echo "rc=$?"; grep "us per layer" "$LOG/layer_timeline.log" | grep -v "^sum"
echo "== attention";  /tmp/attention_check > "$LOG/attention.log" 2>&1; echo "rc=$?"; grep -E "FAIL|check:" "$LOG/attention.log" | tail -5
echo "== attention memcheck";  compute-sanitizer --tool memcheck /tmp/attention_check quick > "$LOG/attention_memcheck.log" 2>&1; echo "rc=$?"; tail -1 "$LOG/attention_memcheck.log"
echo "== attention racecheck"; compute-sanitizer --tool racecheck /tmp/attention_check quick > "$LOG/attention_racecheck.log" 2>&1; echo "rc=$?"; tail -1 "$LOG/attention_racecheck.log"
echo "== top-k";      /tmp/topk_check > "$LOG/topk.log" 2>&1; echo "rc=$?"; grep -E "FAIL|check:|time" "$LOG/topk.log" | tail -5
for tool in memcheck racecheck; do
  echo "== top-k $tool"; compute-sanitizer --tool $tool /tmp/topk_check quick > "$LOG/topk_$tool.log" 2>&1; echo "rc=$?"; tail -1 "$LOG/topk_$tool.log"
done
echo "== checker";    /tmp/nvfp4_check check > "$LOG/check.log" 2>&1; echo "rc=$?"; grep -E "FAIL|check:" "$LOG/check.log" | tail -5
echo "== checker without S1"; /tmp/nvfp4_check_s0 check quick > "$LOG/check_s0.log" 2>&1; echo "rc=$?"; grep -E "FAIL|check:" "$LOG/check_s0.log" | tail -3
echo "== memcheck";   compute-sanitizer --tool memcheck /tmp/nvfp4_check check quick > "$LOG/memcheck.log" 2>&1; echo "rc=$?"; tail -1 "$LOG/memcheck.log"
echo "== racecheck (S1 through bar.sync)";  compute-sanitizer --tool racecheck /tmp/nvfp4_check_rc check quick > "$LOG/racecheck.log" 2>&1; echo "rc=$?"; tail -1 "$LOG/racecheck.log"
# What racecheck says of a correct arrive -> sync hand-off (arrive: hazards reported, sums exact:
# the tool's limit), of the same through bar.sync (none) and of a real race (none: hazards).
for m in arrive sync none; do
  echo "== racecheck probe $m"; compute-sanitizer --tool racecheck /tmp/named_barrier_probe $m > "$LOG/probe_$m.log" 2>&1
  echo "rc=$?"; grep -E "named_barrier_probe|RACECHECK SUMMARY" "$LOG/probe_$m.log"
done
# The S1 tile sums' named barriers (bar.arrive / bar.sync, WideGemvKernel's finish_s1).
echo "== synccheck";  compute-sanitizer --tool synccheck /tmp/nvfp4_check check quick > "$LOG/synccheck.log" 2>&1; echo "rc=$?"; tail -1 "$LOG/synccheck.log"
# (their persistent grids spin until every CTA is resident: a timeout names a GPU shared
# with another process)
echo "== boundary";   timeout 300 /tmp/boundary_bench 32 20 > "$LOG/boundary.log" 2>&1; echo "rc=$?"; tail -n +2 "$LOG/boundary.log"
echo "== stream";     timeout 120 /tmp/stream_probe 36 5000 "$LOG/stream_trace.txt" > "$LOG/stream_probe.log" 2>&1; echo "rc=$?"; tail -n +2 "$LOG/stream_probe.log"
echo "== stream gemv"; timeout 120 /tmp/stream_probe gemv 36 5000 > "$LOG/stream_gemv.log" 2>&1; echo "rc=$?"; tail -n +2 "$LOG/stream_gemv.log"
echo "== variants";   /tmp/nvfp4_check bench 12 > "$LOG/harness_bench.log" 2>&1; echo "rc=$?"
echo "== pytest";     PYTHONPATH=$ROOT $PY -m pytest -q -p no:cacheprovider tests/test_cuda_ffi.py tests/test_nvfp4_matmul.py tests/test_decode_attention.py tests/test_decoder_layers.py tests/test_topk.py > "$LOG/pytest.log" 2>&1; echo "rc=$?"; tail -3 "$LOG/pytest.log"
echo "== benchmark";  PYTHONPATH=$ROOT $PY benchmarks/kernels.py --m 1,2,4,8,16 --m-other 1,8 --out "$LOG/kernels.json" > "$LOG/kernels.log" 2>&1; echo "rc=$?"
grep -A400 "^shape" "$LOG/kernels.log"
