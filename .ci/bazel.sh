#!/usr/bin/env bash
# Bazel builds the same CUDA FFI library as CMake (WORKSPACE + BUILD.bazel), offline.
set -euo pipefail
if ! command -v nvcc >/dev/null 2>&1 && [ ! -x /usr/local/cuda/bin/nvcc ]; then
  echo "bazel: no nvcc on this machine; skipping the Bazel build"
  exit 0
fi
if ! command -v bazel >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bazel-bootstrap >/dev/null
fi
cuda=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")")")
PYTHON_BIN_PATH=$(command -v python) CUDA_PATH="$cuda" bazel build //:nvfp4_ffi
test -f bazel-bin/reset_jax/_lib/libreset_jax_nvfp4.so
echo "bazel: built bazel-bin/reset_jax/_lib/libreset_jax_nvfp4.so"
bazel shutdown >/dev/null 2>&1 || true
