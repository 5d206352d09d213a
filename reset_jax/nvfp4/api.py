"""The one NVFP4 matmul entry point and its backend chooser.

Backends live in sibling modules (``cuda``, ``pallas``, ``xla``); each exposes
``matmul(x, q, *, activations, input_scale) -> y`` and raises
``NotImplementedError`` with a reason when it cannot serve a call (library not
built, no GPU, M too large, unsupported shape). The choice is made at trace
time from those capability checks and the explicit ``implementation=``
argument, never from environment variables.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import jax

from reset_jax.nvfp4.format import NVFP4Tensor, check_matmul_args

BACKENDS = ("cuda", "pallas", "xla")
DEFAULT_ORDER = BACKENDS


class BackendUnavailableError(NotImplementedError):
    """No requested backend could serve the call; the message lists every reason."""


def _backend(name: str):
    if name not in BACKENDS:
        raise ValueError(
            f"unknown NVFP4 matmul implementation {name!r}; expected one of {BACKENDS}"
        )
    return importlib.import_module(f"reset_jax.nvfp4.{name}")


def candidates(
    implementation: str | Sequence[str] | None, default: tuple[str, ...] = DEFAULT_ORDER
) -> tuple[str, ...]:
    """The backends to try, in order: ``None`` -> ``default``; a name -> that one alone."""
    if implementation is None:
        return default
    if isinstance(implementation, str):
        return (implementation,)
    return tuple(implementation)


def matmul(
    x: jax.Array,
    q: NVFP4Tensor,
    *,
    activations: str = "bf16",
    input_scale: jax.Array | float | None = None,
    implementation: str | Sequence[str] | None = None,
) -> jax.Array:
    """``x @ dequantize(q).T`` with float32 accumulation (W4A16 or W4A4).

    Args:
      x: activations ``[..., K]`` (bf16, f16 or f32). Leading axes are flattened
        into ``M`` rows.
      q: an ``NVFP4Tensor`` of logical shape ``[N, K]``.
      activations: ``"bf16"`` keeps ``x`` as it is (W4A16); ``"nvfp4"`` quantizes
        ``x`` to NVFP4 first (W4A4) with ``input_scale`` as its global scale.
      input_scale: float32 scalar global scale for the activations (W4A4 only);
        ``None`` uses a per-row ``max|x| / (6*448)``.
      implementation: ``None`` tries ``cuda -> pallas -> xla``; a name or a
        sequence of names restricts and orders the candidates.

    Returns:
      ``[..., N]`` in ``x.dtype``.

    Raises:
      BackendUnavailableError: no candidate could serve the call (all reasons listed).
      ValueError / TypeError: bad shapes or dtypes.
    """
    check_matmul_args(x, q, activations=activations, input_scale=input_scale)
    order = candidates(implementation)
    if not order:
        raise ValueError("implementation= must name at least one backend")
    reasons = []
    for name in order:
        try:
            backend = _backend(name)
        except ImportError as e:  # a backend whose own imports fail is a refusal, not a crash
            reasons.append(f"{name}: could not import its module ({e})")
            continue
        try:
            return backend.matmul(x, q, activations=activations, input_scale=input_scale)
        except NotImplementedError as e:
            reasons.append(f"{name}: {e}")
    raise BackendUnavailableError(
        "no NVFP4 matmul backend could serve this call:\n  " + "\n  ".join(reasons)
    )


def explain(
    x: jax.Array,
    q: NVFP4Tensor,
    *,
    activations: str = "bf16",
    implementation: str | Sequence[str] | None = None,
) -> list[tuple[str, str | None]]:
    """For each candidate backend, ``(name, None)`` if it would serve the call, else ``(name, reason)``.

    Uses each backend's ``supports(x, q, activations)`` check (no computation).
    """
    out = []
    for name in candidates(implementation):
        try:
            _backend(name).supports(x, q, activations=activations)
            out.append((name, None))
        except ImportError as e:
            out.append((name, f"could not import its module ({e})"))
        except NotImplementedError as e:
            out.append((name, str(e)))
    return out
