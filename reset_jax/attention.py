"""Attention for the decoder models, and a fused decode-attention op.

``apply_rope`` and ``attend`` are the formulas every model uses (prefill and
decode). ``decode_attention`` is one decode step's attention for one new token
per row — q/k RMSNorm (Qwen3), RoPE, the KV-cache write and grouped-query
attention over the cache — as one call:

* ``"xla"``: the composition of ``rms_norm``, ``apply_rope``, a scatter into the
  cache and ``attend``; exactly what the model runs without the op.
* ``"cuda"``: one XLA FFI custom call (``ffi/attention_kernels.cu``): a split-KV
  kernel (one CTA per 64 cache slots and kv head; the new key and value written
  into the cache in place) and a combine kernel. It replaces the ~12 small XLA
  kernels and two cuBLAS calls a decode layer's attention takes (measured on an
  H100: benchmarks/RESULTS.md; XLA currently runs this call outside its CUDA
  graphs, see benchmarks/KERNEL_NOTES.md). Results match
  the composition up to float32 summation order and the probabilities' bf16
  rounding (the kernel keeps them in float32). bf16 models, head width 64 or
  128, at most 8 query heads per kv head, compute capability 8.0+.

Shapes: B rows, Hq / Hkv query / kv heads, G = Hq // Hkv, D head width, L layers,
T cache slots.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from reset_jax.nvfp4.api import candidates
from reset_jax.nvfp4.fused import rms_norm

IMPLEMENTATIONS = ("cuda", "xla")
DEFAULT_ORDER = IMPLEMENTATIONS  # CUDA where it can serve the call, else the composition
CHUNK = 64  # cache slots per CTA of the CUDA kernel (attention_kernels.h kChunk)
MAX_GROUP = 8  # query heads per kv head the CUDA kernel serves (kMaxGroup)
_BF16 = np.dtype(jnp.bfloat16)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates pairs ``(x[i], x[i + Dh/2])`` (the Hugging Face "rotate_half" layout).

    Args:
      x: ``[B, S, H, Dh]``.
      cos, sin: float32 ``[B, S, Dh/2]``.

    Returns:
      ``[B, S, H, Dh]`` in ``x.dtype``.
    """
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]  # [B, S, H, Dh/2]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    out = jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    return out.astype(x.dtype)


def attend(
    q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, scale: float
) -> jax.Array:
    """Grouped-query attention of new queries over key slots ``0..T-1``.

    Slot ``t`` of row ``b`` is visible to a query at position ``p`` iff ``t <= p``;
    this is the causal mask both for a cache indexed by position and for the
    uncached forward (where slot ``t`` holds token ``t``).

    Args:
      q: ``[B, S, Hq, Dh]``.
      k, v: ``[B, T, Hkv, Dh]``.
      q_positions: ``[B, S]`` int32.
      scale: logit scale, ``Dh ** -0.5``.

    Returns:
      ``[B, S, Hq * Dh]`` in ``q.dtype``.
    """
    b, s, hq, dh = q.shape
    t, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    qg = q.reshape(b, s, hkv, g, dh)  # [B, S, Hkv, G, Dh]; query head h reads kv head h // G
    # The dot reads k in its stored dtype and accumulates in float32, so the
    # cache is never converted as a whole. (A decode-only form that multiplies and
    # reduces over the cache in place, with no dot, measured slower on an H200:
    # +0.06 / +0.40 ms a Qwen3-8B step at B = 1 / 8; benchmarks/RESULTS.md, Q2.)
    scores = jnp.einsum("bskgd,btkd->bkgst", qg, k, preferred_element_type=jnp.float32)
    scores = scores * scale  # [B, Hkv, G, S, T]
    visible = jnp.arange(t, dtype=jnp.int32)[None, None, :] <= q_positions[:, :, None]  # [B, S, T]
    scores = jnp.where(visible[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)  # float32 softmax, then model dtype
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype).reshape(b, s, hq * dh)


def implementation_order(implementation: str | Sequence[str] | None) -> tuple[str, ...]:
    """``implementation`` as the tuple of names to try (``None`` -> ``DEFAULT_ORDER``).

    Raises:
      ValueError: no name, or a name that is not in ``IMPLEMENTATIONS``.
    """
    order = candidates(implementation, DEFAULT_ORDER)
    if not order:
        raise ValueError("implementation= must name at least one of " + str(IMPLEMENTATIONS))
    for name in order:
        if name not in IMPLEMENTATIONS:
            raise ValueError(f"unknown attention implementation {name!r} in {implementation!r}: "
                             f"expected names from {IMPLEMENTATIONS}")  # fmt: skip
    return order


class AttentionUnavailableError(NotImplementedError):
    """No requested implementation could serve the call; the message lists every reason."""


def _check_args(q, k, v, cos, sin, positions, k_cache, v_cache, q_norm, k_norm) -> None:
    if q.ndim != 3:
        raise ValueError(f"q must be [B, Hq, D], got shape {q.shape}")
    b, hq, d = q.shape
    if k_cache.ndim != 5:
        raise ValueError(f"k_cache must be [L, B, T, Hkv, D], got shape {k_cache.shape}")
    _, cb, _, hkv, cd = k_cache.shape
    if (cb, cd) != (b, d):
        raise ValueError(f"k_cache {k_cache.shape} does not match q {q.shape} (B and D)")
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"v_cache {v_cache.shape} {v_cache.dtype} must match k_cache "
                         f"{k_cache.shape} {k_cache.dtype}")  # fmt: skip
    for name, x in (("k", k), ("v", v)):
        if x.shape != (b, hkv, d):
            raise ValueError(f"{name} must be [B, Hkv, D] = {(b, hkv, d)}, got {x.shape}")
    if hkv < 1 or hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} kv heads")
    if d % 2:
        raise ValueError(f"head width {d} must be even for RoPE")
    for name, x in (("cos", cos), ("sin", sin)):
        if x.shape != (b, d // 2):
            raise ValueError(f"{name} must be [B, D/2] = {(b, d // 2)}, got {x.shape}")
    if positions.shape != (b,) or not jnp.issubdtype(positions.dtype, jnp.integer):
        raise ValueError(f"positions must be integer [B] = [{b}], got {positions.shape} "
                         f"{positions.dtype}")  # fmt: skip
    if (q_norm is None) != (k_norm is None):
        raise ValueError("q_norm and k_norm go together (both or neither)")
    if q_norm is not None and (q_norm.shape != (d,) or k_norm.shape != (d,)):
        raise ValueError(f"q_norm and k_norm must be [D] = [{d}], got {q_norm.shape}, "
                         f"{k_norm.shape}")  # fmt: skip


def _static_layer(layer, n_layers: int):
    """A Python-int layer index checked and made non-negative; a traced one as it is."""
    if isinstance(layer, (int, np.integer)):
        if not -n_layers <= layer < n_layers:
            raise ValueError(f"layer {layer} is out of range for a cache of {n_layers} layers")
        return int(layer) % n_layers
    return layer


def cuda_unsupported_reason(q, k, v, k_cache, q_norm=None, k_norm=None) -> str | None:
    """Why the CUDA kernel cannot serve these operands (a message), or None.

    Args:
      q: ``[B, Hq, D]``; k, v: ``[B, Hkv, D]``; k_cache: ``[L, B, T, Hkv, D]``;
      q_norm, k_norm: ``[D]`` or None.
    """
    from reset_jax.nvfp4 import cuda

    named = (("q", q), ("k", k), ("v", v), ("the cache", k_cache), ("q_norm", q_norm),
             ("k_norm", k_norm))  # fmt: skip
    for name, x in named:
        if x is not None and np.dtype(x.dtype) != _BF16:
            return f"{name} is {np.dtype(x.dtype).name}; the kernel reads bfloat16"
    b, hq, d = q.shape
    hkv = k.shape[1]
    if 0 in q.shape or 0 in k_cache.shape:
        return f"empty shape (q {q.shape}, cache {k_cache.shape})"
    if b > 65535:
        return f"B = {b} rows: the kernel's grid allows 65535"
    chunks = math.ceil(k_cache.shape[2] / CHUNK)  # the partial kernel's grid over the cache
    if chunks > 65535:
        return f"{chunks} cache chunks of {CHUNK} slots: the kernel's grid allows 65535"
    if d not in (64, 128):
        return f"head width {d}; the kernel serves 64 and 128"
    if hq // hkv > MAX_GROUP:
        return f"{hq // hkv} query heads per kv head; the kernel serves up to {MAX_GROUP}"
    if k_cache.size >= 2**40 or max(k_cache.shape) >= 2**31:
        return f"cache {k_cache.shape} too large for the kernel's indexing"
    return cuda.device_reason(q)


def _xla(q, k, v, cos, sin, positions, k_cache, v_cache, layer, q_norm, k_norm, eps, scale):
    if q_norm is not None:
        q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
    q = apply_rope(q[:, None], cos[:, None], sin[:, None])  # [B, 1, Hq, D]
    k = apply_rope(k[:, None], cos[:, None], sin[:, None])[:, 0]  # [B, Hkv, D]
    rows = jnp.arange(q.shape[0], dtype=jnp.int32)
    ck = k_cache.at[layer, rows, positions].set(k.astype(k_cache.dtype))
    cv = v_cache.at[layer, rows, positions].set(v.astype(v_cache.dtype))
    out = attend(q, ck[layer], cv[layer], positions[:, None], scale)  # [B, 1, Hq * D]
    return out[:, 0], ck, cv


def _cuda(qkv, hq, cos, sin, positions, k_cache, v_cache, layer, q_norm, k_norm, eps, scale):
    """The custom call on the packed projections ``qkv [B, (Hq + 2 Hkv) D]``."""
    from reset_jax.nvfp4 import cuda

    cuda.ensure_registered()
    b = qkv.shape[0]
    t, hkv, d = k_cache.shape[2:]
    chunks = math.ceil(t / CHUNK)
    has_norm = q_norm is not None
    if not has_norm:  # never read; the handler's signature takes them
        q_norm = k_norm = jnp.zeros((d,), jnp.bfloat16)
    # One packed operand: slices of the projection as separate operands made XLA wrap
    # the call in a dynamic-slice fusion, which its command buffers leave out.
    # The caches are aliased to results: the kernel writes slot `positions` in place.
    # (Read-only caches plus an XLA scatter measured 0.2 ms/token slower on an H100:
    # the scatter adds two kernels per layer; benchmarks/RESULTS.md.)
    out, ck, cv, _ = jax.ffi.ffi_call(
        cuda.TARGET_DECODE_ATTENTION,
        (
            jax.ShapeDtypeStruct((b, hq, d), jnp.bfloat16),
            jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
            jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype),
            # scratch: (P.V, max, sum) per query head of each chunk, or of each looping CTA
            # (at most one a chunk; ffi/attention_kernels.h)
            jax.ShapeDtypeStruct((b, hkv, chunks, hq // hkv, d + 2), jnp.float32),
        ),
        input_output_aliases={7: 1, 8: 2},
        vmap_method="sequential",
    )(
        qkv, q_norm, k_norm,
        cos.astype(jnp.float32), sin.astype(jnp.float32),
        positions.astype(jnp.int32), jnp.asarray(layer, jnp.int32).reshape(()),
        k_cache, v_cache,
        scale=np.float32(scale), eps=np.float32(eps), qk_norm=np.bool_(has_norm),
    )  # fmt: skip
    return out.reshape(b, hq * d), ck, cv


def _run(q, k, v, qkv, cos, sin, positions, k_cache, v_cache, layer, q_norm, k_norm, eps, scale,
         implementation):  # fmt: skip
    """Checks, defaults and backend choice shared by ``decode_attention`` and its packed form.

    ``qkv``: the packed ``[B, (Hq + 2 Hkv) D]`` projection the CUDA call reads, or
    None to pack ``q``, ``k``, ``v`` for it. Runs the first implementation in the
    order that can serve the call.
    """
    _check_args(q, k, v, cos, sin, positions, k_cache, v_cache, q_norm, k_norm)
    layer = _static_layer(layer, k_cache.shape[0])
    if scale is None:
        scale = q.shape[-1] ** -0.5
    rest = (cos, sin, positions, k_cache, v_cache, layer, q_norm, k_norm, eps, scale)
    reasons = []
    for name in implementation_order(implementation):
        if name == "xla":
            return _xla(q, k, v, *rest)
        why = cuda_unsupported_reason(q, k, v, k_cache, q_norm, k_norm)
        if why is None:
            if qkv is None:
                b = q.shape[0]
                qkv = jnp.concatenate([q.reshape(b, -1), k.reshape(b, -1), v.reshape(b, -1)], -1)
            return _cuda(qkv, q.shape[1], *rest)
        reasons.append(f"cuda: {why}")
    raise AttentionUnavailableError(
        "no decode-attention implementation could serve this call:\n  " + "\n  ".join(reasons)
    )


def decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    positions: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    layer: int | jax.Array,
    *,
    q_norm: jax.Array | None = None,
    k_norm: jax.Array | None = None,
    eps: float = 1e-6,
    scale: float | None = None,
    implementation: str | Sequence[str] | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One decode step's attention: norm, RoPE, cache write and attention of one token per row.

    Row ``b``'s new key and value go to slot ``positions[b]`` of layer ``layer``;
    its queries attend to slots ``0..positions[b]``. Positions must lie in
    ``[0, T)`` (the decode loop checks that a prompt plus its new tokens fit);
    outside it the implementations differ and the result is undefined. A traced
    ``layer`` counts from the end when negative, like XLA indexing; past the ends
    the CUDA kernel clamps it and XLA's scatter drops the write.

    Args:
      q: ``[B, Hq, D]`` query projections (before norm and RoPE).
      k, v: ``[B, Hkv, D]`` key / value projections (k before norm and RoPE).
      cos, sin: float32 ``[B, D/2]`` (``rope_tables`` at each row's position).
      positions: int32 ``[B]``.
      k_cache, v_cache: ``[L, B, T, Hkv, D]``; donate them to the jitted caller so
        the write happens in place.
      layer: the layer's index into the caches (a Python int or an int32 scalar).
      q_norm, k_norm: ``[D]`` RMSNorm weights applied per head before RoPE (Qwen3),
        or None.
      eps: the norms' epsilon.
      scale: logit scale; default ``D ** -0.5``.
      implementation: ``None`` tries ``cuda -> xla``; a name or a sequence of names
        restricts and orders the candidates.

    Returns:
      ``(out [B, Hq * D] in q.dtype, k_cache, v_cache)``.

    Raises:
      AttentionUnavailableError: no candidate could serve the call (all reasons listed).
      ValueError: shapes that do not fit together.
    """
    return _run(q, k, v, None, cos, sin, positions, k_cache, v_cache, layer, q_norm, k_norm, eps,
                scale, implementation)  # fmt: skip


def decode_attention_packed(
    qkv: jax.Array,
    num_heads: int,
    cos: jax.Array,
    sin: jax.Array,
    positions: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    layer: int | jax.Array,
    *,
    q_norm: jax.Array | None = None,
    k_norm: jax.Array | None = None,
    eps: float = 1e-6,
    scale: float | None = None,
    implementation: str | Sequence[str] | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``decode_attention`` on the packed projections, as a fused q/k/v matmul returns them.

    Args:
      qkv: ``[B, (Hq + 2 Hkv) D]``: the q, k and v projections side by side (Hkv
        and D from the cache).
      num_heads: Hq.
      Everything else as ``decode_attention``.

    Returns:
      ``(out [B, Hq * D], k_cache, v_cache)``.
    """
    if qkv.ndim != 2 or k_cache.ndim != 5:
        raise ValueError(f"qkv must be [B, (Hq + 2 Hkv) D] and k_cache [L, B, T, Hkv, D]; got "
                         f"{qkv.shape} and {k_cache.shape}")  # fmt: skip
    if not isinstance(num_heads, (int, np.integer)) or num_heads < 1:
        raise ValueError(f"num_heads (Hq) must be a positive int, got {num_heads!r}")
    hkv, d = k_cache.shape[3:]
    b, width = qkv.shape
    if b != k_cache.shape[1]:
        raise ValueError(f"qkv has {b} rows but the cache {k_cache.shape} holds "
                         f"{k_cache.shape[1]} (k_cache is [L, B, T, Hkv, D])")  # fmt: skip
    if width != (num_heads + 2 * hkv) * d:
        raise ValueError(f"qkv {qkv.shape} is not [B, (Hq + 2 Hkv) D] = [{b}, "
                         f"{(num_heads + 2 * hkv) * d}] for Hq = {num_heads}, Hkv = {hkv}, "
                         f"D = {d}")  # fmt: skip
    q = qkv[:, : num_heads * d].reshape(b, num_heads, d)
    k = qkv[:, num_heads * d : (num_heads + hkv) * d].reshape(b, hkv, d)
    v = qkv[:, (num_heads + hkv) * d :].reshape(b, hkv, d)
    return _run(q, k, v, qkv, cos, sin, positions, k_cache, v_cache, layer, q_norm, k_norm, eps,
                scale, implementation)  # fmt: skip
