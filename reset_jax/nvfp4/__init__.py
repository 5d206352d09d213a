"""NVFP4: 4-bit E2M1 values, FP8 E4M3 scales per 16 elements, one FP32 scale per tensor."""

from reset_jax.nvfp4.api import BackendUnavailableError, explain, matmul
from reset_jax.nvfp4.format import (
    E2M1_VALUES,
    NVFP4Tensor,
    dequantize,
    quantize,
    quantize_activations,
)

__all__ = [
    "E2M1_VALUES",
    "BackendUnavailableError",
    "NVFP4Tensor",
    "dequantize",
    "explain",
    "matmul",
    "quantize",
    "quantize_activations",
]
