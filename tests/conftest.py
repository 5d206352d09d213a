"""Shared test setup: float64 on CPU for references, the `gpu` marker, and the reference path."""

import os
import sys

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
