"""Pallas GPU backend for small-M NVFP4 matmuls (W4A16 and W4A4).

One kernel serves both modes. Each program owns ``BN`` output columns (weight
rows) and one share of K (``split_k``), which it walks in ``BK`` steps: it
loads the packed codes of a ``[BN, BK/2]`` tile as bytes, decodes the low and
high nibbles in registers (shifts and masks into an f16 bit pattern), scales
them by the per-16-element E4M3 block scales (decoded arithmetically from their
bytes), and feeds two tensor-core dots, one per nibble, against the even and
odd K columns of the activation tile, whose M <= 16 rows are padded to 16 (the
weight tile is the dot's M side). The weight global scale (and, for W4A4, the
activation global scale) is applied once at the end; with ``split_k > 1`` each
program writes float32 partial sums that one small XLA reduction adds up. W4A4
activations are quantized by a tiny XLA pre-pass that reuses the format's
quantizer.

Why the Triton lowering of ``pl.pallas_call`` and not Mosaic GPU: the same
``pallas_call`` + ``jax.experimental.pallas.triton.CompilerParams`` code lowers
on jax 0.10 (CI) and 0.11 (the GPU image), runs on sm_80 and newer, and runs in
interpret mode on CPU, so CI tests the kernel's logic. Mosaic GPU is Hopper-only,
its Python API changed substantially between those two releases, and jax 0.11
deprecates ``pl.pallas_call`` for it in favour of ``plgpu.kernel``. jax 0.11 also
deprecates the Pallas Triton backend (a ``DeprecationWarning`` at lowering time);
it still works there, and the CUDA FFI kernel is the long-term fast path, so the
warning is filtered below for this one message only.

Values stay exact until the accumulation: an E2M1 value (2 significant bits)
times an E4M3 scale (4 significant bits) is exact in bf16 and f16, and so is a
W4A4 activation value ``E2M1 * s`` before its global scale.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:  # Absent from jaxlib builds without GPU Pallas support.
    from jax.experimental.pallas import triton as _plt
except ImportError:  # pragma: no cover - depends on the installed jaxlib
    _plt = None

from reset_jax.nvfp4 import format as _format
from reset_jax.nvfp4.format import array_platform as _platform
from reset_jax.nvfp4.format import natural_packed

if TYPE_CHECKING:
    from reset_jax.nvfp4.format import NVFP4Tensor

# jax 0.11 warns once per lowering that the Triton backend is deprecated; the
# choice is deliberate (see the module docstring), so only that message is muted.
warnings.filterwarnings(
    "ignore",
    message=r"The Pallas Triton backend is deprecated",
    category=DeprecationWarning,
)

MAX_M = 16
# tl.dot needs every operand dimension >= 16, so the M rows are padded to 16.
_MP = 16
# Oldest GPU served: bf16 tensor-core dots need sm_80 (Ampere).
_MIN_COMPUTE_CAPABILITY = 8.0
_X_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


class TileConfig(NamedTuple):
    """Static launch configuration of the kernel.

    Attributes:
      block_n: weight rows (output columns) per program; a power of 2 >= 16.
      block_k: K elements per loop step; a power of 2 >= 32 (2 scale blocks).
      num_warps: warps per program (Triton only).
      num_stages: software-pipelining depth of the K loop (Triton only).
      split_k: programs sharing one row tile along K; each writes float32
        partial sums that one small XLA reduction adds up. Gives narrow layers
        (N = 4096) enough programs to cover the GPU.
    """

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1


# --------------------------------------------------------------------------
# Capability checks
# --------------------------------------------------------------------------


def _gpu_device():
    devices = jax.devices("gpu")
    return devices[0]


def _compute_capability(device) -> float | None:
    cc = getattr(device, "compute_capability", None)
    try:
        return float(cc)
    except (TypeError, ValueError):
        return None  # ROCm reports gfx names; treated as unsupported below.


def supports(x: jax.Array, q: NVFP4Tensor, *, activations: str) -> None:
    """Raises ``NotImplementedError(reason)`` when this backend cannot serve the call.

    Args:
      x: activations ``[..., K]``.
      q: the NVFP4 weight, logical shape ``[N, K]``.
      activations: ``"bf16"`` (W4A16) or ``"nvfp4"`` (W4A4).
    """
    if _plt is None:
        raise NotImplementedError("this jaxlib has no Pallas Triton support")
    if activations not in ("bf16", "nvfp4"):
        raise NotImplementedError(f"unknown activations mode {activations!r}")
    if jnp.dtype(x.dtype) not in _X_DTYPES:
        raise NotImplementedError(f"activations of dtype {x.dtype} (wants bf16, f16 or f32)")
    n, k = q.shape
    m = math.prod(x.shape[:-1])
    if m > MAX_M:
        raise NotImplementedError(
            f"M={m} > {MAX_M}: the GEMV kernel is for decode; prefill goes to XLA"
        )
    if m == 0 or n == 0 or k == 0:
        raise NotImplementedError(f"empty problem (M={m}, N={n}, K={k})")
    if k % 16:
        raise NotImplementedError(f"K={k} is not a multiple of the 16-element scale block")
    if x.shape[-1] != k:
        raise NotImplementedError(f"x has K={x.shape[-1]} but the weight has K={k}")
    platform = _platform(x)
    if platform == "cpu":
        return  # Interpret mode: slow but exact, so CI exercises the kernel.
    if platform != "gpu":
        raise NotImplementedError(f"no Pallas GPU kernel for platform {platform!r}")
    cc = _compute_capability(_gpu_device())
    if cc is None:
        raise NotImplementedError("not an NVIDIA GPU (the Triton kernel is only tested on CUDA)")
    if cc < _MIN_COMPUTE_CAPABILITY:
        raise NotImplementedError(
            f"compute capability {cc} < {_MIN_COMPUTE_CAPABILITY} (needs bf16 tensor cores)"
        )


# --------------------------------------------------------------------------
# W4A4: activation quantization pre-pass (tiny; plain XLA)
# --------------------------------------------------------------------------


def _activation_values(x: jax.Array, input_scale) -> tuple[jax.Array, jax.Array]:
    """Quantizes activations to NVFP4 and returns them without their global scale.

    Calls the format's own block quantizer, so codes and scales are bit for bit
    those of ``format.quantize_activations`` (NaN blocks included); it skips
    the nibble packing and decodes codes arithmetically (no table gather, which
    would be a kernel of its own).

    Args:
      x: ``[M, K]`` activations (any float dtype).
      input_scale: float32 scalar global scale, or ``None`` for per-row
        ``max|x| / (6 * 448)`` (1 for an all-zero row).

    Returns:
      ``(v, g)``: ``v [M, K]`` bf16 holding ``E2M1[code] * s`` (exact in bf16),
      and ``g [M]`` float32, the global scale of each row.
    """
    f32 = jnp.float32
    m, k = x.shape
    xf = x.astype(f32)
    if input_scale is None:
        g = _format.global_scale_from_amax(jnp.max(jnp.abs(xf), axis=-1, keepdims=True))  # [M, 1]
    else:
        g = jnp.asarray(input_scale, f32)
    codes, scales = _format.quantize_blocks(xf, g)  # [M, K] uint8, [M, K/16] e4m3
    v = _decode_e2m1(codes.astype(jnp.int32)).reshape(m, k // 16, 16)
    v = v * (scales.astype(f32) * f32(2.0**14))[:, :, None]  # exact: E2M1 * s
    return v.reshape(m, k).astype(jnp.bfloat16), jnp.broadcast_to(g, (m, 1))[:, 0]


# --------------------------------------------------------------------------
# The kernel
# --------------------------------------------------------------------------


def _decode_e4m3(s: jax.Array) -> jax.Array:
    """E4M3 scale bytes (int32 holding 0..255) -> float32 value times 2**14.

    Arithmetic instead of a float8 load/convert, so the kernel lowers on sm_80
    too. The 2**14 cancels the 2**-14 left in the E2M1 decode below.
    """
    v = s & 0x7F  # Scales are non-negative; the sign bit is ignored.
    # Normal: exponent e -> e - 7 + 14 + 127 = e + 134; 3 mantissa bits at 22..20.
    normal = lax.bitcast_convert_type((v << 20) + (134 << 23), jnp.float32)
    # Subnormal (e == 0): m * 2**-9 * 2**14.
    subnormal = v.astype(jnp.float32) * jnp.float32(32.0)
    value = jnp.where(v < 8, subnormal, normal)
    # 0x7F is E4M3's NaN: the format marks blocks that held NaN/Inf with it,
    # and the poison must reach the output.
    return jnp.where(v == 0x7F, jnp.float32(jnp.nan), value)


def _decode_e2m1(p: jax.Array, shift: int = 0) -> jax.Array:
    """The E2M1 code in bits ``shift..shift+3`` of ``p`` (int32) -> float32 value times 2**-14.

    The 3 magnitude bits go to the bottom of an f16 exponent field and the top
    of its mantissa, the sign to bit 15: that f16 is the E2M1 value times
    2**-14 exactly, subnormal 0.5 included (f16 -> f32 conversion keeps
    subnormals, unlike f32 arithmetic under flush-to-zero). Two shifts and one
    and-or per code; the masks make a separate nibble extraction unnecessary.
    """
    bits = ((p << (9 - shift)) & 0x0E00) | ((p << (12 - shift)) & 0x8000)
    return lax.bitcast_convert_type(bits.astype(jnp.uint16), jnp.float16).astype(jnp.float32)


def _kernel(
    x_ref,  # [M, K] x dtype (bf16 activation values for W4A4)
    w_ref,  # [N, K/2] uint8 packed codes
    s_ref,  # [N, K/16] uint8 (E4M3 bits)
    gw_ref,  # [1] f32 weight global scale
    *refs,  # W4A4: gx_ref [M] f32 per-row activation scale; then o_ref [M, N]
    m: int,
    n: int,
    k: int,
    cfg: TileConfig,
    dot_dtype,
    split_x: bool,
):
    if len(refs) == 2:
        gx_ref, o_ref = refs
    else:
        gx_ref, (o_ref,) = None, refs
    bn, bk = cfg.block_n, cfg.block_k
    bkh, bs = bk // 2, bk // 16  # bytes and scale blocks per step
    nb = k // 16
    steps = pl.cdiv(pl.cdiv(nb, bs), cfg.split_k)  # K steps per program
    split = pl.program_id(1)
    n0 = pl.multiple_of(pl.program_id(0) * bn, bn)
    rows = n0 + jnp.arange(bn)  # [BN]
    row_ok = rows < n
    m_ok = jnp.arange(_MP) < m  # [MP]

    def step(i, acc):
        # First scale block of this step; steps past K (last split) are fully masked.
        b0 = (split * steps + i) * bs
        blk_ok = (b0 + jnp.arange(bs)) < nb  # [BS]
        byte_ok = (b0 * 8 + jnp.arange(bkh)) < nb * 8  # [BKh]
        p = _plt.load(
            w_ref.at[pl.ds(n0, bn), pl.ds(b0 * 8, bkh)],
            mask=row_ok[:, None] & byte_ok[None, :],
            other=0,
        ).astype(jnp.int32)  # [BN, BKh]
        s = _plt.load(
            s_ref.at[pl.ds(n0, bn), pl.ds(b0, bs)],
            mask=row_ok[:, None] & blk_ok[None, :],
            other=0,
        ).astype(jnp.int32)  # [BN, BS]
        # Each scale covers 8 consecutive bytes (16 codes) of its row.
        scale = jnp.broadcast_to(_decode_e4m3(s)[:, :, None], (bn, bs, 8)).reshape(bn, bkh)
        # Low nibbles hold K positions 2j, high nibbles 2j + 1. Rather than
        # interleaving the decoded weights (a shuffle of the big tile), split
        # the small activation tile into its even and odd columns and run one
        # dot per nibble. (Gathering x with stride-2 loads measured slower.)
        xv = _plt.load(
            x_ref.at[pl.ds(0, _MP), pl.ds(b0 * 16, bk)],
            mask=m_ok[:, None] & (b0 * 16 + jnp.arange(bk) < k)[None, :],
            other=0,
        )  # [MP, BK]
        x_lo_hi = jnp.unstack(xv.reshape(_MP, bkh, 2), axis=-1)  # 2 x [MP, BKh]
        for shift, xh in zip((0, 4), x_lo_hi, strict=True):
            w = (_decode_e2m1(p, shift) * scale).astype(dot_dtype)  # [BN, BKh]
            parts = [xh.astype(dot_dtype)]
            if split_x:  # f32 x: hi + lo bf16 parts carry ~16 bits of mantissa.
                parts.append((xh - parts[0].astype(jnp.float32)).astype(dot_dtype))
            for xp in parts:
                acc += lax.dot_general(
                    w, xp, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
                )  # [BN, MP]
        return acc

    acc = lax.fori_loop(0, steps, step, jnp.zeros((bn, _MP), jnp.float32))
    # The 2**14 and 2**-14 of the two decodes cancel exactly.
    out = acc * gw_ref[0]
    if gx_ref is not None:
        gx = _plt.load(gx_ref.at[pl.ds(0, _MP)], mask=m_ok, other=0.0)
        out = out * gx[None, :]
    # [S, M, N] float32 partial sums when split along K, else [M, N] in x's dtype.
    # One indexer per access: the Triton lowering rejects chained ``.at``.
    tile = (pl.ds(0, _MP), pl.ds(n0, bn))
    _plt.store(
        o_ref.at[(split, *tile) if cfg.split_k > 1 else tile],
        out.T.astype(o_ref.dtype),
        mask=m_ok[:, None] & row_ok[None, :],
    )


def _num_sms() -> int:
    try:
        return int(getattr(_gpu_device(), "core_count", 132))
    except RuntimeError:
        return 132


def default_config(m: int, n: int, k: int, *, interpret: bool = False) -> TileConfig:
    """Tile sizes for an ``[m, k] x [n, k]^T`` call.

    From sweeps on an H100 (jax 0.11.2, Qwen3-8B shapes, weights rotated past
    L2): 64-row tiles, 128-element K steps pipelined 4 deep, 2 warps, and K
    split so that each program runs about 8 steps (at most 4 splits) did best;
    narrow or short layers get smaller tiles or more splits so that every SM
    has a program.

    Args:
      m: rows of x (unused: M <= 16 all pad to one MMA tile).
      n: weight rows.
      k: reduction length.
      interpret: pick tiles for CPU interpret mode instead (no split).

    Returns:
      A ``TileConfig``.
    """
    del m
    block_k = min(128, max(32, 1 << (k - 1).bit_length()))
    if interpret:
        return TileConfig(block_n=32, block_k=block_k)
    sms = _num_sms()
    steps = pl.cdiv(k // 16, block_k // 16)
    for block_n in (64, 32, 16):
        tiles = pl.cdiv(n, block_n)
        want = min(4, pl.cdiv(steps, 8))
        if tiles * want < sms:
            want = max(want, min(max(1, steps // 2), pl.cdiv(sms, tiles)))
        split = pl.cdiv(steps, pl.cdiv(steps, want))  # no empty splits
        if tiles * split >= sms:
            break
    return TileConfig(block_n=block_n, block_k=block_k, num_warps=2, num_stages=4, split_k=split)


def _check_config(cfg: TileConfig) -> None:
    for name, v, lo in (("block_n", cfg.block_n, 16), ("block_k", cfg.block_k, 32)):
        if v < lo or v & (v - 1):
            raise ValueError(f"{name}={v} must be a power of 2 >= {lo}")
    if cfg.split_k < 1:
        raise ValueError(f"split_k={cfg.split_k} must be >= 1")


@functools.partial(jax.jit, static_argnames=("activations", "config", "interpret"))
def _matmul_2d(x, packed, scales, global_scale, input_scale, *, activations, config, interpret):
    """``x [M, K] @ dequantize(packed, scales, global_scale).T -> [M, N]`` in x's dtype.

    ``packed`` is uint8 ``[N, K/2]``, ``scales`` float8_e4m3fn ``[N, K/16]``,
    ``global_scale`` a float32 scalar; ``input_scale`` as in ``matmul``.
    """
    m, k = x.shape
    n = packed.shape[0]
    out_dtype = x.dtype
    extra = []
    if activations == "nvfp4":
        x, gx = _activation_values(x, input_scale)
        extra.append(gx)
    dot_dtype = jnp.float16 if x.dtype == jnp.float16 else jnp.bfloat16
    kernel = functools.partial(
        _kernel,
        m=m,
        n=n,
        k=k,
        cfg=config,
        dot_dtype=dot_dtype,
        split_x=x.dtype == jnp.float32,
    )
    params = {}
    if not interpret:
        params["compiler_params"] = _plt.CompilerParams(
            num_warps=config.num_warps, num_stages=config.num_stages
        )
    split = config.split_k
    if split > 1:
        out_shape = jax.ShapeDtypeStruct((split, m, n), jnp.float32)
    else:
        out_shape = jax.ShapeDtypeStruct((m, n), out_dtype)
    y = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(pl.cdiv(n, config.block_n), split),
        interpret=interpret,
        name="nvfp4_gemv",
        **params,
    )(
        x,
        packed,
        # Bytes, not float8: older GPUs cannot load or convert E4M3 in Triton.
        lax.bitcast_convert_type(scales, jnp.uint8),
        jnp.asarray(global_scale, jnp.float32).reshape(1),
        *extra,
    )
    return y.sum(axis=0).astype(out_dtype) if split > 1 else y


def matmul_with_config(
    x: jax.Array,
    q: NVFP4Tensor,
    *,
    activations: str = "bf16",
    input_scale: jax.Array | float | None = None,
    config: TileConfig | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """``matmul`` with explicit tiles, for benchmarks and tuning.

    Args:
      x: activations ``[..., K]`` with at most 16 rows in all.
      q: NVFP4 weight of logical shape ``[N, K]``.
      activations: ``"bf16"`` (W4A16) or ``"nvfp4"`` (W4A4).
      input_scale: W4A4 activation global scale (float32 scalar) or ``None``
        for a per-row scale.
      config: tile sizes; ``None`` picks ``default_config``.
      interpret: run in Pallas interpret mode; ``None`` does so on CPU only.

    Returns:
      ``[..., N]`` in ``x.dtype``.
    """
    supports(x, q, activations=activations)
    n, k = q.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)  # [M, K]
    if interpret is None:
        interpret = _platform(x) == "cpu"
    if config is None:
        config = default_config(x2.shape[0], n, k, interpret=interpret)
    _check_config(config)
    if activations == "bf16":
        input_scale = None
    elif input_scale is not None:
        input_scale = jnp.asarray(input_scale, jnp.float32)
    y = _matmul_2d(
        x2,
        natural_packed(q),  # codes in the MMA word order: converted here (an XLA pre-pass)
        q.scales,
        q.global_scale,
        input_scale,
        activations=activations,
        config=config,
        interpret=bool(interpret),
    )
    return y.reshape(*lead, n)


def matmul(
    x: jax.Array,
    q: NVFP4Tensor,
    *,
    activations: str = "bf16",
    input_scale: jax.Array | float | None = None,
) -> jax.Array:
    """``x @ dequantize(q).T`` for M <= 16 rows, float32 accumulation.

    Args:
      x: activations ``[..., K]`` (bf16, f16 or f32); leading axes hold at most
        16 rows in all.
      q: NVFP4 weight of logical shape ``[N, K]``.
      activations: ``"bf16"`` keeps ``x`` (W4A16); ``"nvfp4"`` quantizes it to
        NVFP4 first (W4A4).
      input_scale: W4A4 activation global scale, or ``None`` for per-row.

    Returns:
      ``[..., N]`` in ``x.dtype``.

    Raises:
      NotImplementedError: this backend cannot serve the call (reason given).
    """
    return matmul_with_config(x, q, activations=activations, input_scale=input_scale)


__all__ = ["MAX_M", "TileConfig", "default_config", "matmul", "matmul_with_config", "supports"]
