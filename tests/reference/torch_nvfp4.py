"""PyTorch reference of the NVFP4 convention, written from ``docs/nvfp4.md``.

Deliberately built differently from ``reset_jax.nvfp4.format`` so that the two
cannot share a mistake:

- E2M1 rounding picks the nearest of the eight magnitudes by distance (ties to
  the even code) instead of counting thresholds.
- The E4M3 cast rounds with ``frexp`` and ``torch.round`` (half to even) in
  float64 instead of a dtype cast.

Every step the spec does in float32 (global scale, block scale, ``d``, the
division, the dequantized value) is a float32 torch op here too, so results
compare bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 16
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


@dataclass
class Quantized:
    """What the reference produces for a tensor ``[..., K]``."""

    codes: torch.Tensor  # uint8 [..., K], bit 3 = sign
    packed: torch.Tensor  # uint8 [..., K/2], element 2i in the low nibble
    scales: torch.Tensor  # float32 [..., K/16], values representable in E4M3
    scale_bits: torch.Tensor  # uint8 [..., K/16], the float8_e4m3fn bytes
    global_scale: torch.Tensor  # float32 [] or [..., 1]
    dequantized: torch.Tensor  # float32 [..., K]


def round_e2m1(v: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 code, ties to the even code, saturating at +-6.

    Args:
      v: float32 ``[...]`` (finite).

    Returns:
      uint8 ``[...]``; bit 3 is ``signbit(v)``.
    """
    # Clamping first keeps the float64 distances exact (|v| <= 6 has few bits).
    a = v.abs().to(torch.float64).clamp(max=6.0)
    best = torch.zeros(a.shape, dtype=torch.int64)
    best_dist = (a - E2M1_MAGNITUDES[0]).abs()
    for i, m in enumerate(E2M1_MAGNITUDES[1:], start=1):
        dist = (a - m).abs()
        closer = dist < best_dist
        # A tie can only be between neighbours i-1 and i; keep the even one.
        tie_to_i = (dist == best_dist) & (i % 2 == 0)
        take = closer | tie_to_i
        best = torch.where(take, torch.full_like(best, i), best)
        best_dist = torch.where(take, dist, best_dist)
    sign = torch.signbit(v).to(torch.int64) * 8
    return (best + sign).to(torch.uint8)


def round_e4m3(s: torch.Tensor) -> torch.Tensor:
    """Rounds non-negative float32 values ``<= 448`` to E4M3, nearest even.

    Args:
      s: float32 ``[...]`` in ``[0, 448]``.

    Returns:
      float32 ``[...]`` holding E4M3 values.
    """
    s64 = s.to(torch.float64)
    _, e = torch.frexp(s64)  # s = m * 2**e, m in [0.5, 1)
    # 3 mantissa bits: spacing 2**(e-1-3) for normals, 2**-9 below 2**-6.
    exp = torch.clamp(e - 1, min=-6) - 3
    quantum = torch.pow(torch.tensor(2.0, dtype=torch.float64), exp.to(torch.float64))
    r = torch.round(s64 / quantum) * quantum  # torch.round: half to even
    assert bool((r <= 448).all()), "E4M3 overflow: the input was not clipped"
    return r.to(torch.float32)


def e4m3_bits(values: torch.Tensor) -> torch.Tensor:
    """The float8_e4m3fn bytes of E4M3-representable float32 values."""
    return values.to(torch.float8_e4m3fn).view(torch.uint8)


def global_scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """``amax / 2688`` in float32, 1 where ``amax == 0``."""
    g = amax / torch.tensor(6.0 * 448.0, dtype=torch.float32)
    return torch.where(amax == 0, torch.ones_like(g), g)


def _quantize(x: torch.Tensor, g: torch.Tensor) -> Quantized:
    assert x.dtype == torch.float32 and x.shape[-1] % BLOCK == 0
    assert bool(torch.isfinite(x).all()), "non-finite input has no NVFP4 encoding"
    k = x.shape[-1]
    xb = x.reshape(*x.shape[:-1], k // BLOCK, BLOCK)  # [..., K/16, 16]
    gb = g if g.ndim == 0 else g.unsqueeze(-1)  # [..., 1, 1]
    amax_b = xb.abs().amax(dim=-1, keepdim=True)  # [..., K/16, 1]
    six_g = torch.tensor(6.0, dtype=torch.float32) * gb
    s = (amax_b / six_g).clamp(0.0, 448.0)
    s = round_e4m3(s)
    s = torch.where(s == 0, torch.ones_like(s), s)
    d = s * gb
    codes = round_e2m1(xb / d)  # [..., K/16, 16]
    mags = torch.tensor([*E2M1_MAGNITUDES, *(-m for m in E2M1_MAGNITUDES)], dtype=torch.float32)
    deq = (mags[codes.to(torch.int64)] * s) * gb
    codes = codes.reshape(x.shape)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    scales = s.squeeze(-1)
    return Quantized(
        codes=codes,
        packed=packed,
        scales=scales,
        scale_bits=e4m3_bits(scales),
        global_scale=g,
        dequantized=deq.reshape(x.shape),
    )


def quantize(w: torch.Tensor, global_scale: float | None = None) -> Quantized:
    """Weight quantization: one global scale over the whole tensor.

    Args:
      w: ``[..., K]`` (converted to float32).
      global_scale: float32 scalar, or None for ``max|w| / 2688``.
    """
    w = w.to(torch.float32)
    if global_scale is None:
        g = global_scale_from_amax(w.abs().amax())
    else:
        g = torch.tensor(global_scale, dtype=torch.float32)
    return _quantize(w, g)


def quantize_activations(x: torch.Tensor, input_scale: float | None = None) -> Quantized:
    """W4A4 activation quantization: ``input_scale``, or per-row ``max|x_row| / 2688``.

    Args:
      x: ``[..., K]`` (converted to float32).
      input_scale: float32 scalar or None.
    """
    x = x.to(torch.float32)
    if input_scale is None:
        g = global_scale_from_amax(x.abs().amax(dim=-1, keepdim=True))  # [..., 1]
    else:
        g = torch.tensor(input_scale, dtype=torch.float32)
    return _quantize(x, g)


def dequantize(packed: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor):
    """Decodes checkpoint-layout tensors: ``(E2M1[code] * scale) * global_scale``.

    Args:
      packed: uint8 ``[..., K/2]``.
      scales: ``[..., K/16]`` float32 or float8_e4m3fn.
      global_scale: float32 ``[]`` or ``[..., 1]``.

    Returns:
      float32 ``[..., K]``.
    """
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(*packed.shape[:-1], -1)
    mags = torch.tensor([*E2M1_MAGNITUDES, *(-m for m in E2M1_MAGNITUDES)], dtype=torch.float32)
    v = mags[codes.to(torch.int64)]
    v = v.reshape(*v.shape[:-1], -1, BLOCK)
    g = global_scale.to(torch.float32)
    g = g if g.ndim == 0 else g.unsqueeze(-1)
    return ((v * scales.to(torch.float32).unsqueeze(-1)) * g).reshape(codes.shape)


def matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    *,
    activations: str = "bf16",
    input_scale: float | None = None,
) -> torch.Tensor:
    """Float64 reference of ``x @ dequantize(quantize(w)).T``.

    Args:
      x: ``[..., K]`` activations.
      w: ``[N, K]`` dense weight (quantized here with the default global scale).
      activations: ``"bf16"`` uses ``x`` as given; ``"nvfp4"`` uses its fake quantization.
      input_scale: W4A4 global scale, or None for per-row scales.

    Returns:
      float64 ``[..., N]``.
    """
    wq = quantize(w).dequantized.to(torch.float64)
    if activations == "nvfp4":
        xa = quantize_activations(x, input_scale).dequantized.to(torch.float64)
    else:
        xa = x.to(torch.float64)
    return xa @ wq.T
