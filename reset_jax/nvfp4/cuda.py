"""CUDA FFI backend: the hand-written small-M NVFP4 kernel behind an XLA custom call.

The kernel (``ffi/``) computes ``y[M, N] = x[M, K] . dequant(W)[N, K]^T`` for
decode-sized ``M <= 16`` with bf16 activations and output and float32
accumulation, in two modes:

* W4A16 (``activations="bf16"``): one kernel launch.
* W4A4 (``activations="nvfp4"``): a small quantizer kernel first writes the
  NVFP4 activations ``E2M1[code] * s`` (exact in bf16) and their global scales,
  bit for bit as ``format.quantize_activations`` (per-row scales when
  ``input_scale`` is None), then the same GEMV runs on them. The two scratch
  buffers are extra results of the custom call, so the handler never allocates.

The shared library ``libreset_jax_nvfp4.so`` is built by CMake when ``pip
install`` finds ``nvcc`` and ships in ``reset_jax/_lib/`` (a Bazel build,
``bazel build //:nvfp4_ffi``, is picked up with ``use_library``). It is
located and its two handlers registered once, lazily, on the first call that
this backend serves; ``supports`` says why it cannot serve a call (library
missing, no CUDA GPU, compute capability below 8.0, M > 16, non-bf16 ``x``).

Batching: ``jax.vmap`` over ``x`` alone folds the batch into M (chunks of at
most 16 rows, one launch each), which is what a batch of decode steps wants; a
batched weight or input scale falls back to a sequential ``lax.map``.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import math
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from reset_jax.nvfp4.format import ACTIVATION_MODES, BLOCK_SIZE, CODE_ORDERS, NVFP4Tensor
from reset_jax.nvfp4.format import array_platform as _platform

MAX_M = 16
LIBRARY_NAME = "libreset_jax_nvfp4.so"
TARGET_W4A16 = "reset_jax_nvfp4_w4a16"
TARGET_W4A4 = "reset_jax_nvfp4_w4a4"
TARGET_ADD_NORM_W4A16 = "reset_jax_nvfp4_add_norm_w4a16"
TARGET_DECODE_ATTENTION = "reset_jax_decode_attention"  # reset_jax.attention
TARGET_DECODER_LAYERS = "reset_jax_decoder_layers"  # reset_jax.decoder_layers
TARGET_TOPK = "reset_jax_top_k"  # reset_jax.sampling
TARGET_TOPK_SCALED = "reset_jax_top_k_scaled"  # reset_jax.sampling
TARGET_TOPK_SCALED_COUNTS = "reset_jax_top_k_scaled_counts"  # reset_jax.sampling
TARGET_SORT_ROWS = "reset_jax_sort_rows"  # reset_jax.sampling
# bf16 mma.sync and cp/ld cache hints need Ampere; sm_80 machine code ships.
_MIN_COMPUTE_CAPABILITY = 8.0
_BF16 = np.dtype(jnp.bfloat16)

_register_lock = threading.Lock()
_registered = False
_explicit_path: Path | None = None


# --------------------------------------------------------------------------
# Finding and registering the library
# --------------------------------------------------------------------------


def use_library(path: str | Path) -> None:
    """Uses the library at ``path`` (e.g. ``bazel-bin/reset_jax/_lib/...``) instead of searching.

    Call it before the first CUDA matmul; the handlers are registered only once.

    Raises:
      RuntimeError: the handlers are already registered from a library.
    """
    global _explicit_path
    if _registered:
        raise RuntimeError("the NVFP4 CUDA handlers are already registered; call use_library first")
    _explicit_path = Path(path).resolve()
    _library.cache_clear()


def _candidate_paths() -> list[Path]:
    """Where the built library may be: next to this package, or in the installed files."""
    if _explicit_path is not None:
        return [_explicit_path]
    paths = [Path(__file__).resolve().parent.parent / "_lib" / LIBRARY_NAME]
    try:
        dist = importlib.metadata.distribution("reset-jax")
    except importlib.metadata.PackageNotFoundError:
        return paths
    # Editable installs keep the sources in the checkout and the built library in
    # site-packages; the distribution's file list points at it.
    for f in dist.files or []:
        if f.name == LIBRARY_NAME:
            paths.append(Path(dist.locate_file(f)).resolve())
    return paths


# The FFI targets and the library's handler symbols for them.
_HANDLERS = (
    (TARGET_W4A16, "ResetJaxNvfp4W4A16"),
    (TARGET_W4A4, "ResetJaxNvfp4W4A4"),
    (TARGET_ADD_NORM_W4A16, "ResetJaxNvfp4AddNormW4A16"),
    (TARGET_DECODE_ATTENTION, "ResetJaxDecodeAttention"),
    (TARGET_DECODER_LAYERS, "ResetJaxDecoderLayers"),
    (TARGET_TOPK, "ResetJaxTopK"),
    (TARGET_TOPK_SCALED, "ResetJaxTopKScaled"),
    (TARGET_TOPK_SCALED_COUNTS, "ResetJaxTopKScaledCounts"),
    (TARGET_SORT_ROWS, "ResetJaxSortRows"),
)
# Every symbol this package looks up in the library: the handlers and the ctypes helpers.
_SYMBOLS = (
    *(sym for _, sym in _HANDLERS),
    "ResetJaxTopKScratchWords",
    "ResetJaxSortScratchBytes",
    "ResetJaxDecoderLayersScratch",
)


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str]:
    """The loaded library, or ``(None, reason)``. A library without every symbol this
    package uses (built from an older checkout) counts as absent, so that every CUDA path
    falls back with that reason instead of failing when it is traced."""
    tried = []
    for path in _candidate_paths():
        if path in tried:
            continue
        tried.append(path)
        if not path.is_file():
            continue
        try:
            lib = ctypes.cdll.LoadLibrary(str(path))
        except OSError as e:
            return None, f"the CUDA library {path} does not load: {e}"
        missing = [sym for sym in _SYMBOLS if not hasattr(lib, sym)]
        if missing:
            return None, (
                f"the CUDA library {path} predates this reset-jax (no {', '.join(missing)}); "
                "rebuild it: pip install --no-build-isolation -e ."
            )
        return lib, ""
    return None, (
        f"the CUDA library {LIBRARY_NAME} is not built (pip install builds it when nvcc is "
        f"present); looked in {', '.join(str(p) for p in tried)}"
    )


def library_path() -> Path | None:
    """Path of the loadable library, or None."""
    lib, _ = _library()
    return Path(lib._name) if lib is not None else None


def _register() -> None:
    global _registered
    if _registered:
        return
    with _register_lock:
        if _registered:
            return
        lib, reason = _library()
        if lib is None:
            raise NotImplementedError(reason)
        for name, symbol in _HANDLERS:
            jax.ffi.register_ffi_target(
                name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="CUDA"
            )
        _registered = True


# --------------------------------------------------------------------------
# Capability checks
# --------------------------------------------------------------------------


def _compute_capability() -> float | None:
    try:
        device = jax.devices("gpu")[0]
    except RuntimeError:
        return None
    try:
        return float(getattr(device, "compute_capability", None))
    except (TypeError, ValueError):
        return None  # ROCm reports gfx names


def device_reason(x: jax.Array) -> str | None:
    """Why the library's kernels cannot run on ``x``'s device (a message), or None.

    Checks the platform (a CUDA GPU), the compute capability (8.0 or newer) and
    that the built library loads; shape checks are each kernel's own.
    """
    platform = _platform(x)
    if platform != "gpu":
        return f"not on a CUDA GPU (platform {platform!r})"
    return gpu_reason()


def gpu_reason() -> str | None:
    """Why the library's kernels cannot run on this process's first GPU (a message), or None.

    `device_reason` without an array: for code traced under ``jit`` on the default backend.
    """
    cc = _compute_capability()
    if cc is None:
        return "not an NVIDIA GPU"
    if cc < _MIN_COMPUTE_CAPABILITY:
        return f"compute capability {cc} < {_MIN_COMPUTE_CAPABILITY} (needs sm_80: bf16 mma.sync)"
    lib, reason = _library()
    return reason if lib is None else None


def top_k_scratch_words(b: int, v: int, k: int) -> int:
    """Elements of the CUDA top-k's uint32 scratch result for ``z [b, v]`` and ``k``.

    The library's own count (``rjtopk::TopkScratchWords``, through ctypes), so the layout
    has one definition.

    Raises:
      NotImplementedError: the library is not built or does not load.
    """
    lib, reason = _library()
    if lib is None:
        raise NotImplementedError(reason)
    fn = lib.ResetJaxTopKScratchWords
    fn.restype = ctypes.c_size_t
    fn.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int)
    return int(fn(b, v, k))


def sort_scratch_bytes(b: int, v: int) -> int:
    """Bytes of the CUDA row sort's uint8 scratch result for ``z [b, v]``.

    The library's own count (``rjsort::SortScratchBytes``, through ctypes): cub's
    temporary storage for this GPU's architecture plus the sort's key and value buffers.

    Raises:
      NotImplementedError: the library is not built or does not load.
      ValueError: the shape cannot be served (empty, or more than 2**31 - 1 elements),
        or cub's size query failed on this GPU.
    """
    lib, reason = _library()
    if lib is None:
        raise NotImplementedError(reason)
    fn = lib.ResetJaxSortScratchBytes
    fn.restype = ctypes.c_size_t
    fn.argtypes = (ctypes.c_int, ctypes.c_int)
    if not (1 <= b and 1 <= v and b * v < 2**31):
        raise ValueError(f"the CUDA row sort cannot serve z [{b}, {v}]: 1 to 2**31 - 1 elements")
    n = int(fn(b, v))
    if n == 0:
        raise ValueError(f"the CUDA row sort's scratch size query failed for z [{b}, {v}]")
    return n


def ensure_registered() -> None:
    """Registers every FFI target of the library with JAX (once).

    Raises:
      NotImplementedError: the library is not built or does not load.
    """
    _register()


def supports(x: jax.Array, q: NVFP4Tensor, *, activations: str) -> None:
    """Raises ``NotImplementedError(reason)`` when the CUDA kernel cannot serve the call.

    Args:
      x: activations ``[..., K]``.
      q: the NVFP4 weight, logical shape ``[N, K]``, scalar global scale.
      activations: ``"bf16"`` (W4A16) or ``"nvfp4"`` (W4A4).
    """
    if activations not in ACTIVATION_MODES:
        raise NotImplementedError(f"unknown activations mode {activations!r}")
    if np.dtype(x.dtype) != _BF16:
        raise NotImplementedError(
            f"x is {np.dtype(x.dtype).name}; the CUDA kernel reads bfloat16 activations"
        )
    n, k = q.shape
    m = math.prod(x.shape[:-1])
    if m > MAX_M:
        raise NotImplementedError(
            f"M={m} > {MAX_M}: the GEMV kernel is for decode; prefill goes to XLA"
        )
    if m == 0 or n == 0:
        raise NotImplementedError(f"empty problem (M={m}, N={n})")
    if k % BLOCK_SIZE:
        raise NotImplementedError(f"K={k} is not a multiple of {BLOCK_SIZE}")
    if n >= 2**30 or k >= 2**30:
        raise NotImplementedError(f"N={n}, K={k}: the kernel indexes with 32-bit ints")
    why = device_reason(x)
    if why is not None:
        raise NotImplementedError(why)


# --------------------------------------------------------------------------
# The custom calls (unbatched: x [M <= 16, K])
# --------------------------------------------------------------------------


def codes_order_attr(code_order: str) -> np.int32:
    """The custom calls' ``codes_order`` attribute for ``NVFP4Tensor.code_order``.

    (``nvfp4::GemvArgs::codes_order``: 0 natural, 1 MMA word order; the matmul handlers
    and the decoder-layers handler all take it.)
    """
    return np.int32(CODE_ORDERS.index(code_order))


def _call_w4a16(x, packed, scales, gscale, *, code_order):
    m, n = x.shape[0], packed.shape[0]
    # vmap never reaches this ffi_call (custom_vmap below handles batching);
    # "sequential" is the safe fallback should it ever be batched directly.
    return jax.ffi.ffi_call(
        TARGET_W4A16, jax.ShapeDtypeStruct((m, n), jnp.bfloat16), vmap_method="sequential"
    )(x, packed, scales, gscale, codes_order=codes_order_attr(code_order))


def _call_w4a4(x, packed, scales, gscale, input_scale, *, per_row, code_order):
    (m, k), n = x.shape, packed.shape[0]
    y, _, _ = jax.ffi.ffi_call(
        TARGET_W4A4,
        (
            jax.ShapeDtypeStruct((m, n), jnp.bfloat16),
            jax.ShapeDtypeStruct((m, k), jnp.bfloat16),  # scratch: E2M1[code] * s
            jax.ShapeDtypeStruct((m,), jnp.float32),  # scratch: activation global scales
        ),
        vmap_method="sequential",
    )(x, packed, scales, gscale, input_scale, per_row_scale=np.bool_(per_row),
      codes_order=codes_order_attr(code_order))  # fmt: skip
    return y


def _rows_in_chunks(call, x, *weights):
    """Runs ``call`` on ``x [R, K]`` in launches of at most MAX_M rows."""
    r = x.shape[0]
    if r <= MAX_M:
        return call(x, *weights)
    parts = [call(x[i : i + MAX_M], *weights) for i in range(0, r, MAX_M)]
    return jnp.concatenate(parts, axis=0)


def _batched(call, axis_size, in_batched, x, *rest):
    """custom_vmap rule: fold a batch of ``x`` into M; map sequentially otherwise."""
    x_b, *rest_b = in_batched
    if not any(rest_b):
        xs = x if x_b else jnp.broadcast_to(x, (axis_size, *x.shape))
        b, m, k = xs.shape
        y = _rows_in_chunks(call, xs.reshape(b * m, k), *rest)  # [B*M, N]
        return y.reshape(b, m, -1), True
    batched = tuple(a for a, isb in zip((x, *rest), in_batched) if isb)

    def one(sl):
        it = iter(sl)
        args = [next(it) if isb else a for a, isb in zip((x, *rest), in_batched)]
        return call(*args)

    return lax.map(one, batched), True


def _make_w4a16(code_order: str):
    @jax.custom_batching.custom_vmap
    def f(x, packed, scales, gscale):
        return _call_w4a16(x, packed, scales, gscale, code_order=code_order)

    @f.def_vmap
    def f_vmap(axis_size, in_batched, x, packed, scales, gscale):
        return _batched(f, axis_size, in_batched, x, packed, scales, gscale)

    return f


def _make_w4a4(per_row: bool, code_order: str):
    @jax.custom_batching.custom_vmap
    def f(x, packed, scales, gscale, input_scale):
        return _call_w4a4(
            x, packed, scales, gscale, input_scale, per_row=per_row, code_order=code_order
        )

    @f.def_vmap
    def f_vmap(axis_size, in_batched, x, packed, scales, gscale, input_scale):
        return _batched(f, axis_size, in_batched, x, packed, scales, gscale, input_scale)

    return f


# One custom_vmap'd function per (mode, code order): the order is static.
_W4A16 = {o: _make_w4a16(o) for o in CODE_ORDERS}
_W4A4_GIVEN = {o: _make_w4a4(False, o) for o in CODE_ORDERS}
_W4A4_ROWS = {o: _make_w4a4(True, o) for o in CODE_ORDERS}


def matmul(
    x: jax.Array,
    q: NVFP4Tensor,
    *,
    activations: str,
    input_scale: jax.Array | float | None,
) -> jax.Array:
    """``x @ dequantize(q).T`` with float32 accumulation on the CUDA kernel.

    Args:
      x: ``[..., K]`` bfloat16; leading axes are flattened into M <= 16 rows.
      q: logical ``[N, K]``, scalar global scale.
      activations: ``"bf16"`` (W4A16) or ``"nvfp4"`` (W4A4).
      input_scale: float32 scalar for W4A4; None uses per-row scales.

    Returns:
      ``[..., N]`` bfloat16.

    Raises:
      NotImplementedError: the kernel cannot serve this call (see ``supports``).
    """
    supports(x, q, activations=activations)
    _register()
    lead, k = x.shape[:-1], x.shape[-1]
    n = q.shape[0]
    x2 = x.reshape(-1, k)  # [M, K]
    gscale = jnp.asarray(q.global_scale, jnp.float32)
    order = q.code_order
    if activations == "bf16":
        y = _W4A16[order](x2, q.packed, q.scales, gscale)
    elif input_scale is None:
        y = _W4A4_ROWS[order](x2, q.packed, q.scales, gscale, jnp.float32(1))
    else:
        scale = jnp.asarray(input_scale, jnp.float32)
        y = _W4A4_GIVEN[order](x2, q.packed, q.scales, gscale, scale)
    return y.reshape(*lead, n)


def add_rms_norm_matmul(
    x: jax.Array, h: jax.Array, norm_weight: jax.Array, eps: float, q: NVFP4Tensor
) -> tuple[jax.Array, jax.Array]:
    """The decoder's residual add and RMSNorm fused ahead of the W4A16 GEMV, in one call.

    ``r = bf16(x + h)``; ``y = (w * bf16(r * rsqrt(mean(r^2) + eps))) @ dequantize(q).T``
    (``reset_jax.nvfp4.fused.add_rms_norm_matmul`` is the reference; the sum of
    squares runs in a different order, so ``y`` may differ from it in the last bits).

    Args:
      x, h: bfloat16 ``[..., K]`` (leading axes flattened into M <= 16 rows).
      norm_weight: bfloat16 ``[K]``.
      eps: the norm's epsilon.
      q: the NVFP4 weight, logical ``[N, K]``.

    Returns:
      ``(y [..., N], r [..., K])``, both bfloat16.

    Raises:
      NotImplementedError: the kernel cannot serve this call (``supports``, or a
        norm weight / residual that is not bfloat16 of the right shape).
    """
    supports(x, q, activations="bf16")
    k = x.shape[-1]
    if h.shape != x.shape or np.dtype(h.dtype) != _BF16:
        raise NotImplementedError(f"h {h.shape} {h.dtype} must be bfloat16 shaped like x {x.shape}")
    if norm_weight.shape != (k,) or np.dtype(norm_weight.dtype) != _BF16:
        raise NotImplementedError(
            f"norm weight {norm_weight.shape} {norm_weight.dtype}: the kernel takes bfloat16 [{k}]"
        )
    _register()
    lead, n = x.shape[:-1], q.shape[0]
    x2, h2 = x.reshape(-1, k), h.reshape(-1, k)
    m = x2.shape[0]
    y, r, _ = jax.ffi.ffi_call(
        TARGET_ADD_NORM_W4A16,
        (
            jax.ShapeDtypeStruct((m, n), jnp.bfloat16),
            jax.ShapeDtypeStruct((m, k), jnp.bfloat16),
            jax.ShapeDtypeStruct((m, k), jnp.bfloat16),  # scratch: the normalized rows
        ),
        vmap_method="sequential",
    )(x2, h2, norm_weight, q.packed, q.scales, jnp.asarray(q.global_scale, jnp.float32),
      eps=np.float32(eps), codes_order=codes_order_attr(q.code_order))  # fmt: skip
    return y.reshape(*lead, n), r.reshape(*lead, k)


__all__ = [
    "LIBRARY_NAME",
    "MAX_M",
    "add_rms_norm_matmul",
    "library_path",
    "matmul",
    "supports",
    "use_library",
]
