"""Shared test setup: float64 on CPU for references, the `gpu` marker, the reference path, and
host builds of the CUDA headers' launch arithmetic."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# PyTorch references under tests/reference are imported as `reference.*`.
sys.path.insert(0, os.path.dirname(__file__))

# On a GPU, XLA's GEMM autotuner compiles and times candidate kernels for every
# new dot shape; the GPU tests check results over many small shapes, not speed,
# so they skip it (set before JAX starts its backend; an explicit setting wins).
if "xla_gpu_autotune_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0"
    ).strip()

import jax

jax.config.update("jax_enable_x64", False)


def _has_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


HAS_GPU = _has_gpu()


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


FFI_DIR = Path(__file__).resolve().parents[1] / "ffi"
CUDA_INCLUDE = Path("/usr/local/cuda/include")


def build_host_program(directory: Path, source: str):
    """Compiles ``source`` (C++17 that includes headers under ``ffi/``) with the host compiler
    and returns ``run(text) -> stdout``, the program fed ``text`` on stdin. Skips the test
    without a host compiler or the CUDA headers."""
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None or not (CUDA_INCLUDE / "cuda_runtime_api.h").exists():
        pytest.skip("needs a host C++ compiler and the CUDA headers")
    (directory / "program.cc").write_text(source)
    exe = directory / "program"
    subprocess.run([cxx, "-std=c++17", "-O1", f"-I{FFI_DIR}", f"-I{CUDA_INCLUDE}",
                    str(directory / "program.cc"), "-o", str(exe)], check=True)  # fmt: skip

    def run(text: str) -> str:
        return subprocess.run(
            [str(exe)], input=text, capture_output=True, text=True, check=True
        ).stdout

    return run
