#!/usr/bin/env bash
# Issue 5's measurement on the issue's card, in one device call (~6 minutes on an H100):
# install, the Qwen3-8B decode table (BF16 `bf16-fattn` against the NVFP4 chain, batch 1 and
# 8, two repeats), and the layer chain's bench (8B and 32B layers at M = 1 and 8, position
# ~640), built with nvcc while the decode runs. The logs go into one tarball, since the
# device returns at most 8 files.
# Usage on the device machine (repo root): bash benchmarks/h100_session.sh
# Writes $OUT/decode_8b_<card>.json, $OUT/logs.tgz and prints the tables.
set -u
OUT=${OUT:-gpu_out}
L="$OUT/logs"
mkdir -p "$L"
export PATH=/usr/local/cuda/bin:$PATH PYTHONUNBUFFERED=1
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
tag=$(echo "$card" | tr 'A-Z' 'a-z' | grep -o 'h100\|h200\|b200\|a100' | head -1)
echo "card: $card; commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'); $(date -u)"

stamp "install"
python3 -m pip install -q --no-build-isolation --no-deps \
  --config-settings=cmake.define.CMAKE_CUDA_ARCHITECTURES=90-real -e . > "$L/install.log" 2>&1 \
  || { tail -30 "$L/install.log"; exit 1; }

stamp "layer_check build (background)"
(nvcc -std=c++17 -O3 -arch=sm_90 -I ffi ffi/tests/layer_check.cu ffi/decoder_layer.cu \
  ffi/nvfp4_kernels.cu ffi/attention_kernels.cu -o /tmp/layer_check > "$L/build.log" 2>&1; \
  echo "build rc=$?" >> "$L/build.log") &

stamp "decode"
FL="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1 --xla_gpu_per_fusion_autotune_cache_dir=/tmp/xla_autotune"
XLA_FLAGS="$FL" python3 benchmarks/decode.py --models qwen3-8b \
  --variants bf16-fattn,cuda-w4a16-chain-model --batch 1,8 --repeats 2 \
  --json "$OUT/decode_8b_${tag:-gpu}.json" > "$L/decode.log" 2>&1
echo "decode rc=$?"
grep "^|" "$L/decode.log" | tail -6

wait
stamp "layer bench"
tail -1 "$L/build.log"
if [ -x /tmp/layer_check ]; then
  RJ_CODES_ORDER=1 /tmp/layer_check bench 20 -1 640 > "$L/bench.log" 2>&1
  echo "bench rc=$?"
  grep " all \|shape" "$L/bench.log"
fi
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$L"
stamp "done"
