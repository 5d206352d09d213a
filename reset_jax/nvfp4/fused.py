"""The decoder's residual add and RMSNorm folded into the NVFP4 matmul that follows them.

In a pre-norm decoder layer every projection group (q/k/v, gate/up) reads
``rmsnorm(x + h)``: the residual stream plus the last block's output,
normalized. XLA runs that as its own kernels between two matmuls (a reduction
and an elementwise pass per norm); the CUDA backend does the add and the norm
inside the same custom call as the GEMV (``cuda.add_rms_norm_matmul``).
Elsewhere the same result comes from ``rms_norm`` and ``api.matmul``, which is
also the definition the CUDA path is tested against.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from reset_jax.nvfp4 import api
from reset_jax.nvfp4.format import NVFP4Tensor, check_matmul_args


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last axis (the one RMSNorm formula).

    Normalized in float32, rounded to ``x.dtype``, then scaled by ``weight`` in
    its own dtype (the Hugging Face order).

    Args:
      x: ``[..., D]``.
      weight: ``[D]``.
      eps: added to the mean square.

    Returns:
      ``[..., D]`` in the promotion of ``weight.dtype`` and ``x.dtype``.
    """
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    normed = (x32 * lax.rsqrt(var + eps)).astype(x.dtype)
    return weight * normed


def add_rms_norm_matmul(
    x: jax.Array,
    h: jax.Array,
    norm_weight: jax.Array,
    eps: float,
    q: NVFP4Tensor,
    *,
    implementation: str | Sequence[str] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``r = x + h`` and ``y = rms_norm(r, norm_weight, eps) @ dequantize(q).T`` (W4A16).

    When CUDA is the first backend to try (the default order, or named first)
    and can serve the call (bfloat16 operands and norm weight, M <= 16 rows), the
    add, the norm and the GEMV run in one custom call; otherwise ``r``,
    ``rms_norm`` and ``api.matmul`` in that order, with the same
    ``implementation`` choice. Under ``jax.vmap`` the custom call runs once per
    batch element (the decode loop does not vmap the model).

    Args:
      x: the residual stream ``[..., K]``.
      h: what the previous block adds to it, ``[..., K]``, same dtype.
      norm_weight: ``[K]``.
      eps: the norm's epsilon.
      q: NVFP4 weight, logical ``[N, K]``.
      implementation: as for ``api.matmul``.

    Returns:
      ``(y [..., N], r [..., K])``: ``r`` in ``x.dtype``, ``y`` in the dtype of
      ``rms_norm``'s result (``x.dtype`` when the norm weight has it too).
    """
    check_matmul_args(x, q, activations="bf16", input_scale=None)
    if h.shape != x.shape or h.dtype != x.dtype:
        raise ValueError(f"h {h.shape} {h.dtype} must match x {x.shape} {x.dtype}")
    if norm_weight.shape != (x.shape[-1],):
        raise ValueError(f"norm weight {norm_weight.shape} must be [{x.shape[-1]}]")
    # The fused call stands in for the CUDA backend only, when it is tried first.
    if api.candidates(implementation)[:1] == ("cuda",):
        try:
            from reset_jax.nvfp4 import cuda

            return cuda.add_rms_norm_matmul(x, h, norm_weight, eps, q)
        except (ImportError, NotImplementedError):
            pass  # the composition below says why if no backend serves the matmul
    r = x + h
    y = api.matmul(rms_norm(r, norm_weight, eps), q, implementation=implementation)
    return y, r


__all__ = ["add_rms_norm_matmul", "rms_norm"]
