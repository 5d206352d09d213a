"""The NVFP4 format: E2M1 codes, E4M3 block scales, one FP32 global scale.

The arithmetic below is the NVIDIA Model Optimizer convention (see
``docs/nvfp4.md`` in the shared docs) pinned to the bit. Every backend (XLA,
Pallas, the CUDA kernel) and the PyTorch reference under
``tests/reference/torch_nvfp4.py`` computes exactly this, in float32:

1. Global scale, when not given: ``g = amax / 2688`` (``2688 = 6 * 448``),
   ``amax = max|w|`` over the whole tensor (weights) or over each row
   (activations without ``input_scale``); ``g = 1`` when ``amax == 0``.
2. Per 16-element block ``b`` along the last axis:
   ``s = amax_b / (6 * g)`` (the product ``6 * g`` is rounded first, then the
   quotient), clipped to ``[0, 448]``, cast to ``float8_e4m3fn`` with
   round-to-nearest-even; a cast scale of 0 becomes 1. A block whose ``amax_b``
   is not finite gets a NaN scale (see "Non-finite inputs").
3. ``d = float32(s) * g``; ``code = e2m1(x / d)`` with true division and
   round-to-nearest, ties-to-even, saturating at +-6.
4. The sign bit (bit 3) of a code is the IEEE sign bit of ``x / d``, exactly as
   the ``ml_dtypes.float4_e2m1fn`` cast does: ``-0.0`` and negative values that
   round to zero encode as code 8 (``-0``). Either zero dequantizes to zero.
5. Dequantized value: ``(E2M1_VALUES[code] * float32(s)) * g``. The inner
   product is exact (at most 6 significant bits), so only the multiplication
   by ``g`` rounds; that is also why ``E2M1 * s`` is exact in bf16 and f16.

Every division above is IEEE float32 division (correctly rounded), and JAX
cannot be asked for one: XLA's simplifier rewrites ``a / b`` by a constant or
broadcast ``b`` into ``a * (1/b)`` (two roundings; about a fifth of quotients
then differ in the last bit), and XLA on NVIDIA GPUs divides with the
approximate ``div.full.f32``. So the two scale quotients use ``div_rn`` (float
estimates corrected by exact integer arithmetic) and the codes use
``encode_e2m1_scaled``, which decides each rounding boundary exactly without
dividing. A CUDA kernel gets the same bits
from a plain ``/`` compiled with nvcc's default ``-prec-div=true`` (or
``__fdiv_rn``), never ``__fdividef`` or ``--use_fast_math``.

Packing: element ``2i`` of a row in the low nibble of byte ``i``, ``2i + 1`` in
the high nibble (the checkpoint layout, ``code_order="natural"``). A tensor may
instead hold its codes in the CUDA kernel's MMA word order (``code_order="mma"``,
``to_code_order``): the same bits, permuted inside each 32-bit word of 8 codes so
that the kernel decodes them in fewer instructions. Every backend reads both;
checkpoints are written in the natural order.

Non-finite inputs have no NVFP4 encoding. ``quantize`` raises when its input is
concrete. Under ``jit`` the values cannot be inspected, so the arithmetic makes
them visible instead: a block with a NaN or Inf gets a NaN scale, and a
non-finite computed global scale makes every dequantized value NaN, so the
poison reaches the matmul output rather than being saturated into finite
garbage. Codes of such blocks are unspecified.

Subnormal float32 values are outside the supported range: XLA on CPU flushes
them to zero while IEEE references do not. Results are bit-exact on every
platform when the nonzero inputs are normal float32 and ``g >= 2**-91`` (for a
computed scale: ``max|w| >= 1.1e-24``), which keeps every intermediate normal.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

BLOCK_SIZE = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0

# Code -> value; bit 3 is the sign, so code 8 is -0.0.
E2M1_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=np.float32,
)
E2M1_VALUES.flags.writeable = False

# Midpoints between consecutive E2M1 magnitudes. A tie goes to the neighbour
# with an even code (mantissa bit 0): down at 0.25, 1.25, 2.5, 5 (">"), up at
# 0.75, 1.75, 3.5 (">="). Everything above 5 saturates to code 7 (6.0).
_TIES_DOWN = (0.25, 1.25, 2.5, 5.0)
_TIES_UP = (0.75, 1.75, 3.5)

_FLOAT_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(np.float16), np.dtype(np.float32))
ACTIVATION_MODES = ("bf16", "nvfp4")
CODE_ORDERS = ("natural", "mma")

# The MMA word order: natural bit 4e + b of each little-endian 32-bit word of ``packed``
# (element e of the word's 8 codes, code bit b: 0 mantissa, 1-2 exponent, 3 sign) is bit
# _MMA_ORDER_BIT[e][b] of the word in the MMA order. The CUDA kernel (DecodeMmaOrderx8 in
# ffi/nvfp4_kernels.cuh) then gets each bf16x2 pair (e_j, e_j+4) * 2**-126 from a mask
# (j = 0), one rotate and a mask (j = 1, 2) or a mask, a multiply and a mask (j = 3): 8
# instructions for 8 codes instead of 13. The same table is in ffi/tests/host_util.h.
# The order is an in-memory layout, made when a model is prepared for the kernels; the
# checkpoint writers store natural codes (``natural_packed``), so nothing on disk depends
# on this table. It changed in the eighteenth session (10 instructions before): an
# ``NVFP4Tensor`` converted by an older version must be converted again, not reused.
_MMA_ORDER_BIT = (
    (6, 7, 8, 15),
    (28, 29, 30, 5),
    (25, 26, 27, 2),
    (4, 0, 1, 3),
    (22, 23, 24, 31),
    (12, 13, 14, 21),
    (9, 10, 11, 18),
    (20, 16, 17, 19),
)


def _bit_moves(to_mma: bool) -> tuple[tuple[int, int], ...]:
    """The word permutation as (mask, left shift) pairs: bits that move by the same amount."""
    groups: dict[int, int] = {}
    for e, row in enumerate(_MMA_ORDER_BIT):
        for b, dst in enumerate(row):
            src = 4 * e + b
            frm, to = (src, dst) if to_mma else (dst, src)
            groups[to - frm] = groups.get(to - frm, 0) | (1 << frm)
    return tuple(sorted((mask, shift) for shift, mask in groups.items()))


_TO_MMA_MOVES = _bit_moves(True)
_FROM_MMA_MOVES = _bit_moves(False)


def e2m1_decode_table() -> np.ndarray:
    """The 16 E2M1 values as a writable copy.

    Returns:
      float32 ``[16]``: ``table[code]`` is the value of the 4-bit code.
    """
    return E2M1_VALUES.copy()


# --------------------------------------------------------------------------
# The pytree
# --------------------------------------------------------------------------


@jax.tree_util.register_pytree_with_keys_class
class NVFP4Tensor:
    """An NVFP4-quantized tensor of logical shape ``[..., K]``.

    Leaves (traced under ``jit``):
      packed: uint8 ``[..., K/2]``, two E2M1 codes a byte, element ``2i`` in the
        low nibble.
      scales: float8_e4m3fn ``[..., K/16]``, one scale per 16-element block.
      global_scale: float32. A scalar for weights; per-row ``[..., 1]`` for
        activations quantized without ``input_scale``. It is aligned with the
        leading axes of ``packed`` from the left and padded with size-1 axes, so
        a stack of scalar-scaled tensors (``[L]`` against ``[L, N, K/2]``) also
        dequantizes correctly.

    Static (part of the tree structure): ``dtype``, the dtype ``dequantize``
    returns by default, and ``code_order``: ``"natural"`` (the layout above) or
    ``"mma"`` (each 32-bit word of ``packed`` bit-permuted for the CUDA kernel;
    ``to_code_order``).

    ``shape`` is derived from ``packed`` rather than stored, so it stays right
    when leaves gain or lose leading axes under ``vmap``, ``scan`` or stacking.
    """

    __slots__ = ("code_order", "dtype", "global_scale", "packed", "scales")

    def __init__(
        self,
        packed: Any,
        scales: Any,
        global_scale: Any,
        shape: tuple[int, ...] | None = None,
        dtype: Any = jnp.bfloat16,
        code_order: str = "natural",
    ):
        """Wraps existing leaves (e.g. checkpoint tensors); use ``quantize`` to make new ones.

        Args:
          packed: uint8 ``[..., K/2]``.
          scales: float8_e4m3fn ``[..., K/16]``.
          global_scale: float32 scalar or ``[..., 1]``; a Python number becomes a
            float32 scalar.
          shape: optional logical shape ``[..., K]``; only checked against
            ``packed``, never stored.
          dtype: default dtype of ``dequantize``.
          code_order: ``"natural"`` or ``"mma"``: how ``packed`` holds the codes
            (``to_code_order`` converts).

        Raises:
          ValueError / TypeError: leaves with inconsistent shapes or wrong dtypes, or
            an unknown ``code_order``.
        """
        if isinstance(global_scale, int | float):
            global_scale = np.float32(global_scale)
        if code_order not in CODE_ORDERS:
            raise ValueError(f"code_order={code_order!r}: expected one of {CODE_ORDERS}")
        object.__setattr__(self, "packed", packed)
        object.__setattr__(self, "scales", scales)
        object.__setattr__(self, "global_scale", global_scale)
        object.__setattr__(self, "dtype", np.dtype(dtype))
        object.__setattr__(self, "code_order", code_order)
        self._validate(shape)

    def _validate(self, shape: tuple[int, ...] | None) -> None:
        packed, scales = self.packed, self.scales
        if not (hasattr(packed, "shape") and hasattr(scales, "shape")):
            return  # placeholders from a tree transformation: nothing to check
        if np.dtype(packed.dtype) != np.uint8:
            raise TypeError(f"NVFP4Tensor.packed must be uint8, got {packed.dtype}")
        if np.dtype(scales.dtype) != np.dtype(jnp.float8_e4m3fn):
            raise TypeError(f"NVFP4Tensor.scales must be float8_e4m3fn, got {scales.dtype}")
        if packed.ndim < 1 or packed.shape[-1] % (BLOCK_SIZE // 2):
            raise ValueError(
                f"NVFP4Tensor.packed must have shape [..., K/2] with K a multiple of "
                f"{BLOCK_SIZE}, got {tuple(packed.shape)}"
            )
        logical = (*packed.shape[:-1], 2 * packed.shape[-1])
        want = (*packed.shape[:-1], logical[-1] // BLOCK_SIZE)
        if tuple(scales.shape) != want:
            raise ValueError(
                f"NVFP4Tensor.scales has shape {tuple(scales.shape)}; packed "
                f"{tuple(packed.shape)} needs {want}"
            )
        if shape is not None and tuple(shape) != logical:
            raise ValueError(f"shape={tuple(shape)} does not match packed {tuple(packed.shape)}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("NVFP4Tensor is immutable; build a new one")

    def tree_flatten_with_keys(self):
        keys = jax.tree_util.GetAttrKey
        children = (
            (keys("packed"), self.packed),
            (keys("scales"), self.scales),
            (keys("global_scale"), self.global_scale),
        )
        return children, (self.dtype, self.code_order)

    @classmethod
    def tree_unflatten(cls, aux, children):
        # No validation: JAX rebuilds trees with placeholder leaves.
        obj = object.__new__(cls)
        for name, value in zip(("packed", "scales", "global_scale"), children):
            object.__setattr__(obj, name, value)
        object.__setattr__(obj, "dtype", aux[0])
        object.__setattr__(obj, "code_order", aux[1])
        return obj

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical shape ``[..., K]``."""
        p = self.packed.shape
        return (*p[:-1], 2 * p[-1])

    @property
    def ndim(self) -> int:
        """Logical rank."""
        return len(self.packed.shape)

    @property
    def nbytes(self) -> int:
        """Bytes held by ``packed``, ``scales`` and ``global_scale``."""
        return sum(
            math.prod(np.shape(a)) * np.dtype(a.dtype).itemsize
            for a in (self.packed, self.scales, self.global_scale)
        )

    def __repr__(self) -> str:
        g = np.shape(self.global_scale)
        kind = "scalar" if g == () else f"shape {tuple(g)}"
        order = "" if self.code_order == "natural" else f", code_order={self.code_order!r}"
        return (
            f"NVFP4Tensor(shape={self.shape}, dtype={self.dtype.name}, global_scale={kind}, "
            f"nbytes={self.nbytes}{order})"
        )


# --------------------------------------------------------------------------
# Elementwise pieces (public so the kernel backends and tests share them)
# --------------------------------------------------------------------------


def encode_e2m1(v: jax.Array) -> jax.Array:
    """Rounds float32 values to E2M1 codes: nearest, ties to even, saturating at +-6.

    Args:
      v: float32 ``[...]``, already divided by the block's ``d``.

    Returns:
      uint8 ``[...]`` codes in ``0..15``; bit 3 is ``signbit(v)``.
    """
    a = jnp.abs(v)
    u8 = jnp.uint8
    mag = jnp.zeros(a.shape, u8)
    for t in _TIES_DOWN:
        mag = mag + (a > t).astype(u8)
    for t in _TIES_UP:
        mag = mag + (a >= t).astype(u8)
    return mag | (jnp.signbit(v).astype(u8) << 3)


# Each E2M1 midpoint as 2**a + sign * 2**b, so that t * d splits into two exact
# products. The last entry is log2 of half an ulp of t in float32.
_TIE_TERMS = {
    0.25: (-2, 0, 0, -26),
    0.75: (0, -1, -2, -25),
    1.25: (0, 1, -2, -24),
    1.75: (1, -1, -2, -24),
    2.5: (1, 1, -1, -23),
    3.5: (2, -1, -1, -23),
    5.0: (2, 1, 0, -22),
}


def encode_e2m1_scaled(x: jax.Array, d: jax.Array) -> jax.Array:
    """``encode_e2m1(x / d)`` with IEEE float32 division, computed without dividing.

    XLA does not keep ``x / d`` correctly rounded: its simplifier turns a division
    by a broadcast value into a multiplication by the reciprocal (two roundings),
    and on NVIDIA GPUs it emits the approximate ``div.full.f32``. So instead of
    dividing, each E2M1 rounding boundary ``t`` is tested exactly:
    ``fl(|x|/d) > t`` holds iff ``|x| - t*d > h*d`` and ``fl(|x|/d) >= t`` iff
    ``|x| - t*d >= -h*d``, where ``h`` is half a float32 ulp of ``t``. With
    ``t = 2**a +- 2**b`` both products are exact and, whenever the comparison is
    close, both subtractions are exact (Sterbenz); when it is not close, rounding
    cannot flip it. FMA contraction is harmless because every product is exact.

    Args:
      x: float32 ``[...]``.
      d: float32, broadcastable to ``x``, with ``2**-100 <= d < 2**125`` so that
        every product above is a normal float32; ``x``'s nonzero values normal.

    Returns:
      uint8 ``[...]`` codes, identical to ``encode_e2m1(x / d)`` under IEEE division.
    """
    a = jnp.abs(x)
    u8 = jnp.uint8
    f32 = jnp.float32
    mag = jnp.zeros(jnp.broadcast_shapes(x.shape, jnp.shape(d)), u8)
    for t, (ea, sign, eb, eh) in _TIE_TERMS.items():
        r = a - f32(2.0**ea) * d
        if sign:
            r = r - f32(sign * 2.0**eb) * d  # r == |x| - t*d exactly when it matters
        h = f32(2.0**eh) * d
        hit = r > h if t in _TIES_DOWN else r >= -h
        mag = mag + hit.astype(u8)
    return mag | (jnp.signbit(x).astype(u8) << 3)


def div_rn(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a / b`` correctly rounded (IEEE round-to-nearest-even), by integer division.

    XLA rewrites divisions by broadcast or constant values into multiplications
    by a reciprocal, and divides approximately on NVIDIA GPUs; the scales must
    round exactly as the spec's true division, so they use this instead. Only
    the range NVFP4 needs is handled: zero or subnormal ``a`` gives 0, a result
    below the normal range gives 0, one above it gives ``+inf``; non-finite
    operands give unspecified values (callers mask them).

    The 24-bit quotient of the significands comes in two 12-bit digits. Each
    digit is estimated with a float32 division, whose error (a few ulps at
    most, reciprocal or approximate division included) moves the estimate by
    far less than one unit, so the floor is off by at most one; the exact
    remainder, computed in uint32 arithmetic modulo ``2**32`` (its true value
    lies in ``(-2**24, 2**25)``), says which way and corrects it. The last
    remainder decides the rounding. Two digits instead of 24 serial steps keep
    the program small: every W4A4 linear quantizes its activations with it.

    Args:
      a: float32 ``[...]``, ``>= 0``.
      b: float32, ``> 0`` and normal, broadcastable to ``a``.

    Returns:
      float32 ``[...]``.
    """
    u32 = jnp.uint32
    f32 = jnp.float32
    a, b = jnp.broadcast_arrays(jnp.asarray(a, f32), jnp.asarray(b, f32))
    ua = lax.bitcast_convert_type(a, u32)
    ub = lax.bitcast_convert_type(b, u32)
    ea = ((ua >> 23) & 0xFF).astype(jnp.int32)
    eb = ((ub >> 23) & 0xFF).astype(jnp.int32)
    ma = (ua & 0x7FFFFF) | 0x800000  # 24-bit significands
    mb = (ub & 0x7FFFFF) | 0x800000
    # Normalise so that the quotient of significands lies in [1, 2).
    low = ma < mb
    r = jnp.where(low, ma << 1, ma)  # < 2**25, exact in float32 (even when >= 2**24)
    e = ea - eb - low.astype(jnp.int32) + 127  # biased exponent of the result
    mbf = mb.astype(f32)

    def digit(rem, bits):
        """floor(rem * 2**bits / mb) and its remainder, for 0 <= rem < 2 mb."""
        est = jnp.floor(rem.astype(f32) / mbf * f32(2**bits)).astype(u32)
        left = (rem << bits) - est * mb  # exact modulo 2**32
        under = lax.bitcast_convert_type(left, jnp.int32) < 0
        est = jnp.where(under, est - 1, est)
        left = jnp.where(under, left + mb, left)
        over = left >= mb
        return jnp.where(over, est + 1, est), jnp.where(over, left - mb, left)

    q1, r1 = digit(r, 11)  # the integer bit and 11 fraction bits: [2**11, 2**12)
    q2, r2 = digit(r1, 12)  # 12 more fraction bits
    q = (q1 << 12) | q2  # floor of the quotient's 24-bit significand
    twice = r2 << 1  # < 2**25
    q = q + ((twice > mb) | ((twice == mb) & ((q & 1) == 1))).astype(u32)
    carry = q >> 24  # rounding overflowed to 2.0
    q = q >> carry
    e = e + carry.astype(jnp.int32)
    bits = (e.astype(u32) << 23) | (q & 0x7FFFFF)
    out = lax.bitcast_convert_type(bits, jnp.float32)
    out = jnp.where(e >= 255, jnp.float32(jnp.inf), out)
    return jnp.where((e <= 0) | (ea == 0), jnp.float32(0), out)


def pack_codes(codes: jax.Array) -> jax.Array:
    """Packs codes two a byte, element ``2i`` in the low nibble.

    Args:
      codes: uint8 ``[..., K]`` with values ``0..15``, K even.

    Returns:
      uint8 ``[..., K/2]``.
    """
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_codes(packed: jax.Array) -> jax.Array:
    """Inverse of ``pack_codes``.

    Args:
      packed: uint8 ``[..., K/2]``.

    Returns:
      uint8 ``[..., K]``.
    """
    pair = jnp.stack([packed & 0xF, packed >> 4], axis=-1)  # [..., K/2, 2]
    return pair.reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def code_values(q: NVFP4Tensor) -> jax.Array:
    """The 4-bit codes of ``q`` in element order, whatever its ``code_order``.

    Natural codes are ``unpack_codes(q.packed)``. MMA-order codes are read bit by bit from
    the bytes of their word (``_MMA_ORDER_BIT``), elementwise, so XLA fuses the read into
    whatever consumes the codes (``dequantize_blocks``): no separate pass over the weights
    that writes them back as bytes, as ``natural_packed`` makes. (Rebuilding the natural
    word first costs more in a fusion: every code of the word recomputes it.)

    Args:
      q: logical ``[..., K]``.

    Returns:
      uint8 ``[..., K]``, values ``0..15``.
    """
    if q.code_order == "natural":
        return unpack_codes(jnp.asarray(q.packed))
    packed = jnp.asarray(q.packed)
    lead, half_k = packed.shape[:-1], packed.shape[-1]
    w = packed.reshape(*lead, half_k // 4, 4)  # the little-endian bytes of each word
    one = jnp.uint8(1)
    elems = []
    for row in _MMA_ORDER_BIT:  # element e of the word's 8 codes
        c = jnp.zeros(w.shape[:-1], jnp.uint8)
        for b, dst in enumerate(row):
            c = c | (((w[..., dst // 8] >> jnp.uint8(dst % 8)) & one) << jnp.uint8(b))
        elems.append(c)
    return jnp.stack(elems, axis=-1).reshape(*lead, 2 * half_k)


@functools.partial(jax.jit, static_argnums=1)
def _permute_words(packed: jax.Array, moves: tuple[tuple[int, int], ...]) -> jax.Array:
    """Applies a bit permutation (``_bit_moves``) to every 32-bit word of ``packed [..., K/2]``.

    Jitted, so the conversion is one elementwise pass with no word-sized temporaries.
    (The ~1.1 GB of extra peak GPU memory once seen with ``fuse_decoder`` came from its
    conversions queueing up across layers, not from these temporaries; ``fuse_decoder``
    now waits for each layer's.)
    """
    u32 = jnp.uint32
    b = packed.reshape(*packed.shape[:-1], packed.shape[-1] // 4, 4).astype(u32)
    w = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)  # little-endian
    out = jnp.zeros_like(w)
    for mask, shift in moves:
        m = w & u32(mask)
        out = out | (m << u32(shift) if shift >= 0 else m >> u32(-shift))
    parts = [(out >> u32(8 * i)) & u32(0xFF) for i in range(4)]
    return jnp.stack(parts, axis=-1).astype(jnp.uint8).reshape(packed.shape)


def to_code_order(q: NVFP4Tensor, order: str) -> NVFP4Tensor:
    """``q`` with its codes in ``order`` (``"natural"`` or ``"mma"``); the same values.

    The MMA word order is what the CUDA kernel decodes fastest (``NVFP4Tensor``;
    ``fuse_decoder`` converts the chained layers' weights once). Exact and reversible:
    only bits inside each 32-bit word of 8 codes move; scales and global scale are shared.

    Args:
      q: logical ``[..., K]`` (K is a multiple of 16, so every row is whole words).
      order: the order wanted.

    Returns:
      ``q`` itself when it is already in ``order``, else a new ``NVFP4Tensor``.

    Raises:
      ValueError: an unknown ``order``.
    """
    if order not in CODE_ORDERS:
        raise ValueError(f"order={order!r}: expected one of {CODE_ORDERS}")
    if q.code_order == order:
        return q
    moves = _TO_MMA_MOVES if order == "mma" else _FROM_MMA_MOVES
    return NVFP4Tensor(
        _permute_words(jnp.asarray(q.packed), moves),
        q.scales,
        q.global_scale,
        dtype=q.dtype,
        code_order=order,
    )


def natural_packed(q: NVFP4Tensor) -> jax.Array:
    """``q.packed`` in the natural order (the checkpoint layout), uint8 ``[..., K/2]``."""
    return q.packed if q.code_order == "natural" else to_code_order(q, "natural").packed


def global_scale_from_amax(amax: jax.Array) -> jax.Array:
    """``amax / (6 * 448)``, or 1 where ``amax == 0``.

    Args:
      amax: float32 ``[...]``, non-negative.

    Returns:
      float32 ``[...]``.
    """
    amax = jnp.asarray(amax, jnp.float32)
    g = div_rn(amax, jnp.float32(E2M1_MAX * E4M3_MAX))
    g = jnp.where(amax == 0, jnp.float32(1), g)
    # Keep NaN/Inf visible (div_rn does not propagate them).
    return jnp.where(jnp.isfinite(amax), g, amax)


def round_to_e4m3(s: jax.Array) -> jax.Array:
    """Rounds float32 values in ``[0, 448]`` to the E4M3 grid, nearest even, staying in float32.

    A ``float32 -> float8_e4m3fn -> float32`` round trip cannot be used: with
    XLA's default ``xla_allow_excess_precision`` the GPU compiler deletes such
    convert pairs, so the value would silently stay unrounded. Here the value
    is scaled by a power of two so that the E4M3 spacing becomes 1, rounded
    half to even, and scaled back; all three steps are exact.

    Args:
      s: float32 ``[...]`` in ``[0, 448]``, zero or normal.

    Returns:
      float32 ``[...]``, each an E4M3 value (so casting it to float8_e4m3fn is exact).
    """
    f32 = jnp.float32
    e = (lax.bitcast_convert_type(s, jnp.uint32) >> 23).astype(jnp.int32) - 127
    # Spacing 2**(e-3) for E4M3 normals (e >= -6), 2**-9 for its subnormals.
    qe = jnp.maximum(e, -6) - 3
    up = lax.bitcast_convert_type(((127 - qe) << 23).astype(jnp.uint32), f32)  # 2**-qe
    down = lax.bitcast_convert_type(((127 + qe) << 23).astype(jnp.uint32), f32)  # 2**qe
    return lax.round(s * up, lax.RoundingMethod.TO_NEAREST_EVEN) * down


def quantize_blocks(x: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Block scales and codes for float32 ``x`` under global scale ``g``.

    Args:
      x: float32 ``[..., K]``, K a multiple of 16.
      g: float32 global scale, broadcastable to ``[..., 1]`` (scalar or per row).

    Returns:
      ``(codes, scales)``: uint8 ``[..., K]`` and float8_e4m3fn ``[..., K/16]``.
    """
    f32 = jnp.float32
    k = x.shape[-1]
    xb = x.reshape(*x.shape[:-1], k // BLOCK_SIZE, BLOCK_SIZE)  # [..., K/16, 16]
    g = jnp.asarray(g, f32)
    if g.ndim:
        g = g[..., None]  # [..., 1] -> [..., 1, 1] against the block axis
    amax_b = jnp.max(jnp.abs(xb), axis=-1, keepdims=True)  # [..., K/16, 1]
    six_g = f32(E2M1_MAX) * g
    s = round_to_e4m3(jnp.clip(div_rn(amax_b, six_g), 0, f32(E4M3_MAX)))
    s = jnp.where(s == 0, f32(1), s)
    # NaN poisons the block (see the module docstring); a finite clip would hide it.
    s = jnp.where(jnp.isfinite(amax_b) & jnp.isfinite(six_g), s, f32(jnp.nan))
    codes = encode_e2m1_scaled(xb, s * g)
    return codes.reshape(x.shape), s[..., 0].astype(jnp.float8_e4m3fn)


def dequantize_blocks(q: NVFP4Tensor) -> jax.Array:
    """``E2M1_VALUES[code] * block_scale`` without the global scale.

    Every value is exact in float32, bf16 and f16 (at most 6 significant bits,
    magnitudes in ``[2**-10, 2688]``), so backends may feed it to a bf16 dot.

    Args:
      q: logical shape ``[..., K]``.

    Returns:
      float32 ``[..., K]``.
    """
    codes = code_values(q)  # [..., K]
    k = codes.shape[-1]
    v = jnp.asarray(E2M1_VALUES)[codes].reshape(*codes.shape[:-1], k // BLOCK_SIZE, BLOCK_SIZE)
    v = v * q.scales.astype(jnp.float32)[..., None]
    return v.reshape(codes.shape)


def _global_scale_for(q: NVFP4Tensor) -> jax.Array:
    """``q.global_scale`` as float32, padded with size-1 axes to broadcast against ``[..., K]``."""
    g = jnp.asarray(q.global_scale, jnp.float32)
    return g.reshape(g.shape + (1,) * (q.packed.ndim - g.ndim))


# --------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_float_input(x: Any, what: str) -> np.dtype:
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        raise TypeError(f"{what} must be an array, got {type(x).__name__}")
    dtype = np.dtype(x.dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{what} must be a floating array (bfloat16, float16 or float32), got dtype "
            f"{dtype} with shape {tuple(x.shape)}"
        )
    if x.ndim < 1:
        raise ValueError(f"{what} must have rank >= 1 (K is the last axis), got a scalar")
    k = x.shape[-1]
    if k == 0 or k % BLOCK_SIZE:
        raise ValueError(
            f"{what} has shape {tuple(x.shape)}: the last axis K={k} must be a positive "
            f"multiple of {BLOCK_SIZE}"
        )
    return dtype


@jax.jit
def _any_nonfinite(x: jax.Array) -> jax.Array:
    return jnp.any(~jnp.isfinite(x))


def _check_finite(x: Any, what: str) -> None:
    if not _is_concrete(x):
        return
    # A jax.Array is tested where it lives and only a bool reaches the host (a host copy of
    # every weight made building a random Qwen3-32B on a GPU take minutes); the values are
    # copied only to count them for the error.
    if isinstance(x, jax.Array) and not bool(_any_nonfinite(x)):
        return
    a = np.asarray(x, dtype=np.float32)
    bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
    if bad:
        raise ValueError(
            f"{what} with shape {tuple(a.shape)} has {bad} non-finite value(s); "
            "NaN and Inf have no NVFP4 encoding"
        )


def _check_scale(scale: Any, what: str) -> jax.Array:
    scale = jnp.asarray(scale) if not hasattr(scale, "dtype") else scale
    if not jnp.issubdtype(scale.dtype, jnp.floating) and not jnp.issubdtype(
        scale.dtype, jnp.integer
    ):
        raise TypeError(f"{what} must be a real number, got dtype {scale.dtype}")
    if np.ndim(scale) != 0:
        raise ValueError(f"{what} must be a scalar, got shape {tuple(np.shape(scale))}")
    if _is_concrete(scale):
        v = float(np.asarray(scale, np.float32))
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{what} must be finite and > 0 (as float32), got {v!r}")
    return jnp.asarray(scale, jnp.float32)


def _default_dtype(dtype: np.dtype) -> np.dtype:
    return dtype if dtype in _FLOAT_DTYPES else np.dtype(np.float32)


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


@jax.jit
def _quantize_weight(w: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    g = global_scale_from_amax(jnp.max(jnp.abs(w), initial=0.0))
    codes, scales = quantize_blocks(w, g)
    return pack_codes(codes), scales, g


@jax.jit
def _quantize_given(x: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    codes, scales = quantize_blocks(x, g)
    return pack_codes(codes), scales


@jax.jit
def _quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    g = global_scale_from_amax(jnp.max(jnp.abs(x), axis=-1, keepdims=True))  # [..., 1]
    codes, scales = quantize_blocks(x, g)
    return pack_codes(codes), scales, g


def quantize(w: jax.Array, global_scale: jax.Array | float | None = None) -> NVFP4Tensor:
    """Quantizes a weight to NVFP4 along its last axis.

    Args:
      w: ``[..., K]``, K a positive multiple of 16, any floating dtype (converted
        to float32 first). Concrete inputs must be finite; under ``jit`` a
        non-finite input yields NaN blocks (see the module docstring).
      global_scale: float32 scalar, finite and > 0. ``None`` uses
        ``max|w| / (6*448)`` over the whole tensor (1 for an all-zero tensor).

    Returns:
      ``NVFP4Tensor`` of logical shape ``w.shape``, scalar global scale, and
      ``dtype`` = ``w.dtype`` (float32 for other floating dtypes).

    Raises:
      TypeError: ``w`` not a floating array, or ``global_scale`` not a real number.
      ValueError: rank 0, K not a positive multiple of 16, non-finite values, or
        a non-scalar, non-positive or non-finite ``global_scale``.
    """
    if not hasattr(w, "dtype"):
        w = np.asarray(w)
    dtype = _check_float_input(w, "quantize(w)")
    _check_finite(w, "quantize(w)")
    w32 = jnp.asarray(w, jnp.float32)
    if global_scale is None:
        packed, scales, g = _quantize_weight(w32)
    else:
        g = _check_scale(global_scale, "quantize(global_scale=)")
        packed, scales = _quantize_given(w32, g)
    return NVFP4Tensor(packed, scales, g, dtype=_default_dtype(dtype))


def quantize_activations(x: jax.Array, input_scale: jax.Array | float | None = None) -> NVFP4Tensor:
    """Quantizes activations for W4A4: 16-element blocks along K.

    Args:
      x: ``[..., K]`` bf16, f16 or f32 (converted to float32 first).
      input_scale: float32 scalar global scale (the checkpoint's ``input_scale``).
        ``None`` uses a per-row ``max|x_row| / (6*448)`` (1 for an all-zero row).

    Returns:
      ``NVFP4Tensor`` of logical shape ``x.shape``; ``global_scale`` is a scalar
      when ``input_scale`` is given, else float32 ``[..., 1]``.

    Raises:
      Same as ``quantize``. Finiteness is checked only for concrete inputs.
    """
    if not hasattr(x, "dtype"):
        x = np.asarray(x)
    dtype = _check_float_input(x, "quantize_activations(x)")
    _check_finite(x, "quantize_activations(x)")
    x32 = jnp.asarray(x, jnp.float32)
    if input_scale is None:
        packed, scales, g = _quantize_rows(x32)
    else:
        g = _check_scale(input_scale, "quantize_activations(input_scale=)")
        packed, scales = _quantize_given(x32, g)
    return NVFP4Tensor(packed, scales, g, dtype=_default_dtype(dtype))


def dequantize(q: NVFP4Tensor, dtype: Any = None) -> jax.Array:
    """Decodes an ``NVFP4Tensor``: ``(E2M1[code] * scale) * global_scale`` in float32.

    Args:
      q: logical shape ``[..., K]``.
      dtype: result dtype; ``None`` uses ``q.dtype``. The cast is the last step.

    Returns:
      ``[..., K]`` in ``dtype``.
    """
    if not isinstance(q, NVFP4Tensor):
        raise TypeError(f"dequantize expects an NVFP4Tensor, got {type(q).__name__}")
    return _dequantize(q, np.dtype(q.dtype if dtype is None else dtype))


@functools.partial(jax.jit, static_argnames="dtype")
def _dequantize(q: NVFP4Tensor, dtype: np.dtype) -> jax.Array:
    return (dequantize_blocks(q) * _global_scale_for(q)).astype(dtype)


def fake_quantize_activations(
    x: jax.Array, input_scale: jax.Array | float | None = None
) -> jax.Array:
    """``dequantize(quantize_activations(x, input_scale), float32)``.

    Args:
      x: ``[..., K]`` bf16, f16 or f32.
      input_scale: as in ``quantize_activations``.

    Returns:
      float32 ``[..., K]``: the activations a W4A4 matmul multiplies.
    """
    return dequantize(quantize_activations(x, input_scale), jnp.float32)


def array_platform(x) -> str:
    """The platform (``"cpu"``, ``"gpu"``, ...) ``x`` lives on, for backend capability checks.

    Tracers carry no device, so under ``jit`` this is the default backend's platform.
    """
    if isinstance(x, jax.Array):
        try:
            return next(iter(x.devices())).platform
        except Exception:  # tracers and deleted arrays have no device
            pass
    return jax.default_backend()


def check_matmul_args(
    x: jax.Array,
    q: NVFP4Tensor,
    *,
    activations: str,
    input_scale: jax.Array | float | None,
) -> None:
    """Validates the arguments of ``nvfp4.matmul`` (shapes and dtypes only; no data).

    Args:
      x: ``[..., K]`` bf16, f16 or f32.
      q: ``NVFP4Tensor`` of logical shape ``[N, K]`` with a scalar global scale.
      activations: ``"bf16"`` (W4A16) or ``"nvfp4"`` (W4A4).
      input_scale: scalar, finite and > 0 when concrete; only with ``"nvfp4"``.

    Raises:
      TypeError: wrong types or dtypes.
      ValueError: wrong ranks, mismatched K, unknown ``activations``, an
        ``input_scale`` with ``"bf16"``, or a bad ``input_scale`` value.
    """
    if not isinstance(q, NVFP4Tensor):
        raise TypeError(f"nvfp4.matmul: q must be an NVFP4Tensor, got {type(q).__name__}")
    if q.packed.ndim != 2:
        raise ValueError(
            f"nvfp4.matmul: q must have logical shape [N, K], got {q.shape} (rank {q.ndim})"
        )
    if np.ndim(q.global_scale) != 0:
        raise ValueError(
            "nvfp4.matmul: q.global_scale must be a scalar, got shape "
            f"{tuple(np.shape(q.global_scale))}"
        )
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        raise TypeError(f"nvfp4.matmul: x must be an array, got {type(x).__name__}")
    if np.dtype(x.dtype) not in _FLOAT_DTYPES:
        raise TypeError(
            f"nvfp4.matmul: x must be bfloat16, float16 or float32, got {x.dtype} "
            f"with shape {tuple(x.shape)}"
        )
    k = q.shape[-1]
    if x.ndim < 1 or x.shape[-1] != k:
        raise ValueError(
            f"nvfp4.matmul: x has shape {tuple(x.shape)}; expected [..., {k}] to match q {q.shape}"
        )
    if activations not in ACTIVATION_MODES:
        raise ValueError(
            f"nvfp4.matmul: activations={activations!r}; expected one of {ACTIVATION_MODES}"
        )
    if input_scale is not None:
        if activations != "nvfp4":
            raise ValueError(
                "nvfp4.matmul: input_scale applies only to activations='nvfp4' (W4A4); "
                "pass None with activations='bf16'"
            )
        _check_scale(input_scale, "nvfp4.matmul(input_scale=)")
