"""Decode steps of whole decoder layers in one custom call, kernels chained with PDL.

A decode step of a pre-norm decoder layer with NVFP4 W4A16 weights is, on the CUDA
backend, six or seven kernels in a row (``ffi/decoder_layer.h``): the residual add +
RMSNorm + q/k/v GEMV, the two decode-attention kernels, the o GEMV, the add + norm +
gate/up GEMV, SwiGLU (inside the gate/up GEMV's epilogue when the weight's rows are
interleaved: ``interleave_gate_up``) and the down GEMV. As separate XLA custom calls each kernel starts only once the
one before it has drained, and each GEMV pays its launch and its first DRAM round trip
in full (``benchmarks/KERNEL_NOTES.md``). ``decode_layers`` runs one or more consecutive
layers in a single custom call whose kernels, on sm_90+, are launched as programmatic
dependents (PDL): a GEMV's CTAs start and load their weights while the previous kernel
finishes, and wait on the device for its output. The kernels and their arithmetic are
those of the separate calls, so the results are those of the per-layer CUDA path up to
SwiGLU (its ``expf`` may differ from XLA's in the last float32 bit) and the first
layer's norm (the fused add + norm kernel sums the squares in another order).

Backends (``implementation``): ``"cuda"`` (the custom call) and ``"xla"`` (the
composition of ``nvfp4.fused.add_rms_norm_matmul``, ``attention.decode_attention_packed``
and ``nvfp4.matmul``, each on XLA: the definition).

Shapes: M rows (batch; one new token each), D model width, F MLP width, Hq / Hkv query /
kv heads, Dh head width, L layers of the stacked cache, T cache slots.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from reset_jax import attention
from reset_jax.nvfp4 import api
from reset_jax.nvfp4.format import NVFP4Tensor
from reset_jax.nvfp4.fused import add_rms_norm_matmul

IMPLEMENTATIONS = ("cuda", "xla")
MAX_M = 16
# Bits of ``pdl_edges`` (decoder_layer.h): which kernel is launched as a dependent of the
# one before it.  None picks the measured default for the row count and shapes.
PDL_ATTENTION, PDL_O, PDL_GATE_UP, PDL_SWIGLU, PDL_DOWN = 1, 2, 4, 8, 16
_BF16 = np.dtype(jnp.bfloat16)


class LayerWeights(NamedTuple):
    """One decoder layer's parameters as ``decode_layers`` takes them.

    Attributes:
      input_norm: ``[D]`` RMSNorm weight ahead of attention.
      qkv: NVFP4 ``[(Hq + 2 Hkv) Dh, D]``: q, k and v projections stacked.
      q_norm, k_norm: ``[Dh]`` per-head RMSNorm weights (Qwen3), or None.
      o: NVFP4 ``[D, Hq Dh]``.
      post_norm: ``[D]`` RMSNorm weight ahead of the MLP.
      gate_up: NVFP4 ``[2F, D]``: gate and up projections stacked.
      down: NVFP4 ``[D, F]``.
    """

    input_norm: jax.Array
    qkv: NVFP4Tensor
    q_norm: jax.Array | None
    k_norm: jax.Array | None
    o: NVFP4Tensor
    post_norm: jax.Array
    gate_up: NVFP4Tensor
    down: NVFP4Tensor


class DecoderLayersUnavailableError(NotImplementedError):
    """No requested implementation could serve the call; the message lists every reason."""


def _check_args(x, h, cos, sin, positions, k_cache, v_cache, layers, first_layer) -> None:
    """Shape checks shared by every backend (ValueError with the shapes)."""
    if x.ndim != 2 or h.shape != x.shape:
        raise ValueError(f"x and h must both be [M, D]; got {x.shape} and {h.shape}")
    if k_cache.ndim != 5 or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache and v_cache must be one [L, M, T, Hkv, Dh] shape; got "
                         f"{k_cache.shape} and {v_cache.shape}")  # fmt: skip
    m, d = x.shape
    n_layers, cb, _, hkv, dh = k_cache.shape
    if cb != m:
        raise ValueError(f"x has {m} rows but the cache {k_cache.shape} holds {cb}")
    if cos.shape != (m, dh // 2) or sin.shape != (m, dh // 2):
        raise ValueError(f"cos and sin must be [M, Dh/2] = [{m}, {dh // 2}]; got {cos.shape}, "
                         f"{sin.shape}")  # fmt: skip
    if positions.shape != (m,):
        raise ValueError(f"positions must be [M] = [{m}], got {positions.shape}")
    if not layers:
        raise ValueError("no layers")
    if not 0 <= first_layer or first_layer + len(layers) > n_layers:
        raise ValueError(f"layers {first_layer}..{first_layer + len(layers) - 1} do not fit the "
                         f"cache's {n_layers} layers")  # fmt: skip
    for i, w in enumerate(layers):
        qkv_n, f2 = w.qkv.shape[0], w.gate_up.shape[0]
        hq = qkv_n // dh - 2 * hkv
        want = {
            "qkv": (w.qkv.shape, (qkv_n, d)),
            "o": (w.o.shape, (d, hq * dh)),
            "gate_up": (w.gate_up.shape, (f2, d)),
            "down": (w.down.shape, (d, f2 // 2)),
            "input_norm": (w.input_norm.shape, (d,)),
            "post_norm": (w.post_norm.shape, (d,)),
        }
        for name, (got, need) in want.items():
            if tuple(got) != need:
                raise ValueError(f"layer {first_layer + i}: {name} is {tuple(got)}, expected "
                                 f"{need} (D = {d}, Dh = {dh}, Hkv = {hkv})")  # fmt: skip
        if qkv_n % dh or hq < 1 or f2 % 2:
            raise ValueError(f"layer {first_layer + i}: qkv {w.qkv.shape} / gate_up "
                             f"{w.gate_up.shape} are not [(Hq + 2 Hkv) Dh, D] / [2F, D]")  # fmt: skip
        if (w.q_norm is None) != (w.k_norm is None) or (w.q_norm is None) != (
            layers[0].q_norm is None
        ):
            raise ValueError("q_norm and k_norm go together, in every layer or none")
        for name, a in (("q_norm", w.q_norm), ("k_norm", w.k_norm)):
            if a is not None and tuple(a.shape) != (dh,):
                raise ValueError(f"layer {first_layer + i}: {name} is {tuple(a.shape)}, "
                                 f"expected ({dh},)")  # fmt: skip


def cuda_unsupported_reason(
    x: jax.Array,
    k_cache: jax.Array,
    layers: Sequence[LayerWeights],
    *,
    h: jax.Array | None = None,
    v_cache: jax.Array | None = None,
) -> str | None:
    """Why the custom call cannot serve these arguments (a message), or None.

    Args:
      x: ``[M, D]`` activations.
      k_cache: ``[L, M, T, Hkv, Dh]``.
      layers: the layers' weights (shapes already checked).
      h, v_cache: the pending MLP output and the value cache (default: like x, k_cache).
    """
    from reset_jax.nvfp4 import cuda

    why = cuda.device_reason(x)
    if why is not None:
        return why
    m, d = x.shape
    hkv, dh = k_cache.shape[3:]
    if not 1 <= m <= MAX_M:
        return f"M = {m} rows; the chained layers serve 1..{MAX_M}"
    orders = {t.code_order for w in layers for t in (w.qkv, w.o, w.gate_up, w.down)}
    if len(orders) > 1:
        return "the weights' codes are in different orders (NVFP4Tensor.code_order); one call takes one"
    h = x if h is None else h
    v_cache = k_cache if v_cache is None else v_cache
    arrays = [x, k_cache, v_cache, h] + [a for w in layers for a in (w.input_norm, w.post_norm, w.q_norm, w.k_norm)
                             if a is not None]  # fmt: skip
    if any(np.dtype(a.dtype) != _BF16 for a in arrays):
        return "activations, cache and norm weights must all be bfloat16"
    for w in layers:
        for t in (w.qkv, w.o, w.gate_up, w.down):
            if np.ndim(t.global_scale) != 0 and np.size(t.global_scale) != 1:
                return "every weight needs one (scalar) global scale"
            if t.shape[1] % 16:
                return f"K = {t.shape[1]} is not a multiple of 16"
    first = layers[0]
    for i, w in enumerate(layers[1:], 1):
        shapes = [t.shape for t in (w.qkv, w.o, w.gate_up, w.down)]
        if shapes != [t.shape for t in (first.qkv, first.o, first.gate_up, first.down)]:
            return (
                f"layer {i} of the call has other widths than the first; one call serves one shape"
            )
    f = first.gate_up.shape[0] // 2
    if d % 16 or f % 16:
        return f"D = {d} and F = {f} must be multiples of 16"
    hq = layers[0].qkv.shape[0] // dh - 2 * hkv
    probe = jnp.zeros((m, hq, dh), jnp.bfloat16)
    kv = jnp.zeros((m, hkv, dh), jnp.bfloat16)
    q_norm = layers[0].q_norm
    return attention.cuda_unsupported_reason(probe, kv, kv, k_cache, q_norm, layers[0].k_norm)


GATE_UP_GROUP = 8  # rows per group of an interleaved gate_up weight (decoder_layer.h)


def interleave_gate_up(w: NVFP4Tensor) -> NVFP4Tensor:
    """Reorders a stacked gate/up weight's rows into alternating groups of 8.

    Rows ``[gate_0 .. gate_{F-1}, up_0 .. up_{F-1}]`` become ``[gate_0..7, up_0..7,
    gate_8..15, up_8..15, ...]``: each 16-row tile of the CUDA GEMV then holds both
    halves of 8 outputs, so the gate+up GEMV applies SwiGLU in its epilogue (one kernel
    fewer per layer; the same bits). Exact (rows move with their block scales). Do it
    once, when the model is built: under ``jit`` it is a copy of the whole weight.

    Args:
      w: NVFP4 ``[2F, D]``, gate rows then up rows, F a multiple of 8.

    Returns:
      NVFP4 ``[2F, D]`` in the interleaved order (``decode_layers(...,
      gate_up_interleaved=True)``; ``deinterleave_gate_up`` undoes it on outputs).

    Raises:
      ValueError: a shape that is not ``[2F, D]`` with F a multiple of 8.
    """
    n = w.shape[0]
    if w.packed.ndim != 2 or n % (2 * GATE_UP_GROUP):
        raise ValueError(f"gate_up must be [2F, D] with F a multiple of {GATE_UP_GROUP}; got "
                         f"{w.shape}")  # fmt: skip
    g = GATE_UP_GROUP

    def perm(a):  # [2F, c] -> [F/g, 2, g, c] (part, group) -> [2F, c]
        return a.reshape(2, n // (2 * g), g, a.shape[-1]).transpose(1, 0, 2, 3).reshape(a.shape)

    return NVFP4Tensor(
        perm(w.packed), perm(w.scales), w.global_scale, dtype=w.dtype, code_order=w.code_order
    )


def deinterleave_gate_up(y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``[..., 2F]`` outputs of an interleaved gate_up weight -> ``(gate, up)``, ``[..., F]`` each."""
    f2 = y.shape[-1]
    g = GATE_UP_GROUP
    y = y.reshape(*y.shape[:-1], f2 // (2 * g), 2, g)
    return y[..., 0, :].reshape(*y.shape[:-3], f2 // 2), y[..., 1, :].reshape(
        *y.shape[:-3], f2 // 2
    )


def _xla(x, h, cos, sin, positions, k_cache, v_cache, layers, first_layer, eps, attn_eps, scale,
         gate_up_interleaved=False):  # fmt: skip
    """The composition of the separate ops, every one on XLA (the definition)."""
    ck, cv = k_cache, v_cache
    for i, w in enumerate(layers):
        y, r = add_rms_norm_matmul(x, h, w.input_norm, eps, w.qkv, implementation="xla")
        hq = w.qkv.shape[0] // k_cache.shape[-1] - 2 * k_cache.shape[3]
        norms = {} if w.q_norm is None else dict(q_norm=w.q_norm, k_norm=w.k_norm)
        att, ck, cv = attention.decode_attention_packed(
            y, hq, cos, sin, positions, ck, cv, first_layer + i, eps=attn_eps, scale=scale,
            implementation="xla", **norms,
        )  # fmt: skip
        o = api.matmul(att, w.o, implementation="xla")
        gu, x = add_rms_norm_matmul(r, o, w.post_norm, eps, w.gate_up, implementation="xla")
        gate, up = deinterleave_gate_up(gu) if gate_up_interleaved else jnp.split(gu, 2, axis=-1)
        act = jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)
        h = api.matmul(act.astype(gate.dtype), w.down, implementation="xla")
    return x, h, ck, cv


def scratch_bytes(m: int, d: int, f: int, hq: int, hkv: int, dh: int, t: int) -> int:
    """Bytes of device scratch one custom call needs (from the library, one source of truth)."""
    from reset_jax.nvfp4 import cuda

    lib, reason = cuda._library()
    if lib is None:
        raise NotImplementedError(reason)
    fn = lib.ResetJaxDecoderLayersScratch
    fn.restype = ctypes.c_int64
    fn.argtypes = [ctypes.c_int64] * 7
    return int(fn(m, d, f, hq, hkv, dh, t))


def _cuda(x, h, cos, sin, positions, k_cache, v_cache, layers, first_layer, eps, attn_eps, scale,
          gate_up_interleaved, pdl, pdl_edges, pdl_across):  # fmt: skip
    from reset_jax.nvfp4 import cuda

    cuda.ensure_registered()
    m, d = x.shape
    hkv, dh = k_cache.shape[3:]
    hq = layers[0].qkv.shape[0] // dh - 2 * hkv
    f = layers[0].gate_up.shape[0] // 2
    qk_norm = layers[0].q_norm is not None
    dummy = jnp.zeros((dh,), jnp.bfloat16)  # never read without q/k norms
    operands = []
    for w in layers:
        operands += [w.input_norm]
        operands += [w.qkv.packed, w.qkv.scales, jnp.asarray(w.qkv.global_scale, jnp.float32)]
        operands += [w.q_norm if qk_norm else dummy, w.k_norm if qk_norm else dummy]
        operands += [w.o.packed, w.o.scales, jnp.asarray(w.o.global_scale, jnp.float32)]
        operands += [w.post_norm]
        for t in (w.gate_up, w.down):
            operands += [t.packed, t.scales, jnp.asarray(t.global_scale, jnp.float32)]
    nbytes = scratch_bytes(m, d, f, hq, hkv, dh, k_cache.shape[2])
    ids = jnp.arange(first_layer, first_layer + len(layers), dtype=jnp.int32)
    x_out, h_out, ck, cv, _ = jax.ffi.ffi_call(
        cuda.TARGET_DECODER_LAYERS,
        (
            jax.ShapeDtypeStruct((m, d), jnp.bfloat16),
            jax.ShapeDtypeStruct((m, d), jnp.bfloat16),
            jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
            jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype),
            jax.ShapeDtypeStruct((nbytes,), jnp.uint8),  # intermediates
        ),
        # The caches are written in place (one slot per row and layer).
        input_output_aliases={6: 2, 7: 3},
        vmap_method="sequential",
    )(
        x, h, cos.astype(jnp.float32), sin.astype(jnp.float32), positions.astype(jnp.int32), ids,
        k_cache, v_cache, *operands,
        eps=np.float32(eps), attn_eps=np.float32(attn_eps), scale=np.float32(scale),
        qk_norm=np.bool_(qk_norm), pdl=np.bool_(pdl),
        pdl_edges=np.int32(-1 if pdl_edges is None else pdl_edges),
        pdl_across=np.bool_(pdl_across), gate_up_interleaved=np.bool_(gate_up_interleaved),
        codes_order=cuda.codes_order_attr(layers[0].qkv.code_order),
    )  # fmt: skip
    return x_out, h_out, ck, cv


def decode_layers(
    x: jax.Array,
    h: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    positions: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    layers: Sequence[LayerWeights],
    first_layer: int = 0,
    *,
    eps: float,
    attn_eps: float | None = None,
    scale: float | None = None,
    gate_up_interleaved: bool = False,
    pdl: bool = True,
    pdl_edges: int | None = None,
    pdl_across: bool = True,
    implementation: str | Sequence[str] | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One decode step (one new token per row) through consecutive decoder layers.

    Layer ``i`` computes, with ``r = x + h``::

        x' = r + o_proj(attention(rmsnorm(r) @ qkv))
        h' = down(silu(gate) * up),  (gate, up) = rmsnorm(x') @ gate_up

    and hands ``(x', h')`` to the next; ``h`` is the previous layer's MLP output, not
    yet added (zeros before the first layer), and the caller adds the last ``h'``.
    Each layer writes its new key and value to slot ``positions[m]`` of cache layer
    ``first_layer + i``.

    Args:
      x: ``[M, D]`` residual stream.
      h: ``[M, D]`` pending MLP output (zeros for the model's first layer).
      cos, sin: float32 ``[M, Dh/2]`` RoPE tables at each row's position.
      positions: int32 ``[M]``, each in ``[0, T)``.
      k_cache, v_cache: ``[L, M, T, Hkv, Dh]``; donate them to the jitted caller so the
        writes happen in place.
      layers: ``LayerWeights`` of consecutive layers.
      first_layer: the cache layer of ``layers[0]``.
      eps: the input / post-attention norms' epsilon.
      attn_eps: the q/k norms' epsilon (default ``eps``).
      scale: attention logit scale (default ``Dh ** -0.5``).
      gate_up_interleaved: every layer's ``gate_up`` has its rows in alternating groups
        of 8 (``interleave_gate_up``): the CUDA gate+up GEMV then applies SwiGLU in its
        epilogue (one kernel fewer per layer). The result is the same either way.
      pdl: launch the CUDA kernels as programmatic dependents (sm_90+; no effect on
        the result).
      pdl_edges: which kernels (``PDL_*`` bits); None: the measured default.
      pdl_across: also each layer's first kernel after the previous layer's last.
      implementation: ``None`` tries ``cuda -> xla``; a name or a sequence restricts
        and orders the candidates (``"xla"``: the composition of the separate ops, all
        on XLA).

    Returns:
      ``(x' [M, D], h' [M, D], k_cache, v_cache)`` of the last layer.

    Raises:
      DecoderLayersUnavailableError: no candidate could serve the call (all reasons).
      ValueError: shapes that do not fit together, or an unknown implementation.
    """
    layers = list(layers)
    _check_args(x, h, cos, sin, positions, k_cache, v_cache, layers, first_layer)
    if gate_up_interleaved and layers[0].gate_up.shape[0] % (2 * GATE_UP_GROUP):
        raise ValueError(f"gate_up_interleaved needs F a multiple of {GATE_UP_GROUP}; gate_up is "
                         f"{layers[0].gate_up.shape}")  # fmt: skip
    dh = k_cache.shape[-1]
    attn_eps = eps if attn_eps is None else attn_eps
    scale = dh**-0.5 if scale is None else scale
    order = api.candidates(implementation, IMPLEMENTATIONS)
    if not order or any(name not in IMPLEMENTATIONS for name in order):
        raise ValueError(
            f"implementation={implementation!r}: expected names from {IMPLEMENTATIONS}"
        )
    args = (x, h, cos, sin, positions, k_cache, v_cache, layers, first_layer, eps, attn_eps, scale,
            bool(gate_up_interleaved))  # fmt: skip
    reasons = []
    for name in order:
        if name == "xla":
            return _xla(*args)
        why = cuda_unsupported_reason(x, k_cache, layers, h=h, v_cache=v_cache)
        if why is None:
            return _cuda(*args, pdl, pdl_edges, pdl_across)
        reasons.append(f"cuda: {why}")
    raise DecoderLayersUnavailableError(
        "no decoder-layers implementation could serve this call:\n  " + "\n  ".join(reasons)
    )


__all__ = [
    "GATE_UP_GROUP",
    "IMPLEMENTATIONS",
    "DecoderLayersUnavailableError",
    "LayerWeights",
    "cuda_unsupported_reason",
    "decode_layers",
    "deinterleave_gate_up",
    "interleave_gate_up",
    "scratch_bytes",
]
