"""Pure-XLA NVFP4 matmul: serves every valid call, any M (decode and prefill).

The block-scaled E2M1 values ``E2M1[code] * s`` are exact in bf16 and f16 (see
``format.dequantize_blocks``), so the weight is decoded once to the activation
dtype and multiplied with a single ``dot_general`` accumulating in float32; the
global scales, which would not be exact in bf16, multiply the float32 result.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from reset_jax.nvfp4.format import (
    NVFP4Tensor,
    dequantize_blocks,
    quantize_activations,
)

# Contract the last axis of x [M, K] with the last axis of w [N, K].
_NT = (((1,), (1,)), ((), ()))


def supports(x: jax.Array, q: NVFP4Tensor, *, activations: str) -> None:
    """Never refuses: every call that passes ``check_matmul_args`` is served.

    Args:
      x: ``[..., K]``.
      q: logical ``[N, K]``.
      activations: ``"bf16"`` or ``"nvfp4"``.
    """
    del x, q, activations


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    # HIGHEST keeps f32 operands out of TF32 / bf16 passes on GPU; it is a no-op
    # for bf16 and f16 operands.
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, _NT, precision=precision, preferred_element_type=jnp.float32)


def matmul(
    x: jax.Array,
    q: NVFP4Tensor,
    *,
    activations: str,
    input_scale: jax.Array | float | None,
) -> jax.Array:
    """``x @ dequantize(q).T`` with float32 accumulation.

    Args:
      x: ``[..., K]`` bf16, f16 or f32; leading axes are flattened into M rows.
      q: logical ``[N, K]``, scalar global scale.
      activations: ``"bf16"`` (W4A16) or ``"nvfp4"`` (W4A4: ``x`` is quantized
        per 16-element block with ``input_scale``, or per-row scales when None).
      input_scale: float32 scalar for W4A4, else None.

    Returns:
      ``[..., N]`` in ``x.dtype``.
    """
    lead, k = x.shape[:-1], x.shape[-1]
    n = q.packed.shape[0]
    x2 = x.reshape(-1, k)  # [M, K]
    w = dequantize_blocks(q)  # [N, K] float32, exact in bf16/f16
    g_w = jnp.asarray(q.global_scale, jnp.float32)
    if activations == "bf16":
        # f16 keeps its own dtype: converting it to bf16 would round x.
        wd = jnp.float32 if x.dtype == jnp.float32 else x.dtype
        y = _dot(x2, w.astype(wd)) * g_w  # [M, N]
    else:
        xq = quantize_activations(x2, input_scale)
        # Both block-scaled operands are exact in bf16 whatever x.dtype is.
        xb = dequantize_blocks(xq).astype(jnp.bfloat16)  # [M, K]
        g_x = jnp.asarray(xq.global_scale, jnp.float32)  # [] or [M, 1]
        y = _dot(xb, w.astype(jnp.bfloat16)) * (g_x * g_w)
    return y.astype(x.dtype).reshape(*lead, n)


__all__ = ["matmul", "supports"]
