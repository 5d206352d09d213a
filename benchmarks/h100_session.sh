#!/usr/bin/env bash
# Issue 5's measurement on the issue's card, in one device call (~5-7 minutes; on an H200 230 s
# before the attention checker was added, which runs ~50 s):
# install, the Qwen3-8B decode table (BF16 `bf16-fattn` against the NVFP4 chain, batch 1 and
# 8, two repeats), the layer chain's bench (8B and 32B layers at M = 1 and 8, position
# ~640) and the attention checker (ffi/tests/attention_check), both built with nvcc while the
# rest runs; of pytest the sampler's and the decode loop's tests (tests/test_topk.py: the CUDA
# top-k against lax.top_k; tests/test_sampling.py, tests/test_decode.py: they carry no `gpu`
# marker; ~2 minutes; on an H200 in AE2-AE3: 54 passed of their top-k and sampler tests); the sampler's
# cost on each path and ReSET's at the default model's real rates (sampler_cost.py --paths
# --rates, ~1 minute). It is gpu_session.sh with these settings.
# Usage on the device machine (repo root): bash benchmarks/h100_session.sh
# Writes $OUT/decode_8b_<card>.json and $OUT/logs.tgz, and prints the tables.
set -u
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
tag=$(echo "$card" | tr '[:upper:]' '[:lower:]' | grep -o 'h100\|h200\|b200\|a100' | head -1)
echo "card: $card"
TESTS="tests/test_topk.py tests/test_sampling.py tests/test_decode.py" TEST_TIMEOUT=240 \
  PIP_EXTRA="--config-settings=cmake.define.CMAKE_CUDA_ARCHITECTURES=90-real" \
  DECODE_ARGS="--models qwen3-8b --variants bf16-fattn,cuda-w4a16-chain-model --batch 1,8 --repeats 2" \
  DECODE_TIMEOUT=420 DECODE_JSON="decode_8b_${tag:-gpu}.json" \
  SAMPLER_ARGS="--batch 1,8 --rounds 9 --paths --rates benchmarks/data/nucleus_widths_smollm2_AG5_cpu.json" \
  LAYER_BENCH_ARGS="20 -1 640" ATTENTION_CHECK=1 TAR_LOGS=1 \
  exec bash "$(dirname "$0")/gpu_session.sh"
