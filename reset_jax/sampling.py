"""ReSET step-aware temperature, the fixed-temperature baseline, and the sampler.

The rule is specified in ``shared/docs/reset-algorithm.md``; this module follows
it decision for decision. Everything that runs per token is pure ``jnp``/``lax``
over a batch of rows, so it runs inside the jitted decode loop with no Python
per token. (On a GPU, XLA reads back the index of the one ``lax.switch`` `sample`
has there, which picks the draws a batch needs besides the filtered one and the exact
fallback; the ReSET rule itself has none.)

Protocol (what the decode loop calls; both rules implement it)::

    state = init_state(rule, batch_size)
    state, temperature, entropy = step(rule, state, logits)  # [B, V] -> [B], [B]
    token = sample(key, logits, temperature, top_p=..., top_k=...)
    state = observe(rule, state, token)

``step`` applies the step-boundary check from the tokens seen so far, measures
the entropy of the raw logits, decides the temperature, and only then records
the entropy. ``observe`` records the token that was generated.

Numerics. The reference keeps Python (double) means over float32 entropies.
Here every sum of entropies is a float-float (TwoSum-compensated) pair, so each
mean is within one float32 rounding of the reference's, and the entropy's own
reductions over the vocabulary are compensated too (XLA:CPU sums a fused row
sequentially, which is off by ~1e-4 nats at V = 32k). The structural tie of the
rule (``H_step == H_bar`` while the window holds every entropy so far, or while
the step spans the whole sequence) is kept bitwise by construction, see
``ReSETConfig._decide``.

Cost. Both rules measure the entropy (the decode loop records it), so every
pass over the ``[B, V]`` logits is shared with the fixed temperature. What ReSET
adds is per-row arithmetic on a few ``[B]`` numbers, written to compile into
a handful of small fused kernels: the state is packed into one int32 array
(``ReSETState``, the float32 sums as their bits), and the boundary membership tests and the window
sum are unrolled into elementwise code (for id arrays and windows up to 64;
longer ones use one reduction). ``tests/test_sampler_cost.py`` pins this in the
compiled HLO: no extra op on a ``V``-sized array, no extra reduction or sort.

Bad logits (a row with a NaN, a ``+inf``, or no finite value) never yield a
token: ``step`` returns NaN entropy and NaN temperature for that row, leaves the
row's statistics untouched and sets the sticky ``state.bad[row]``; ``sample``
returns ``INVALID_TOKEN`` (-1) for that row. The decode loop should mark such a
row finished (``token < 0`` or ``state.bad``), feed the model a pad token instead
of -1, keep -1 in the recorded tokens, and have the host raise after the loop:
``reset_jax.generate`` raises ``BadLogitsError`` from ``DecodeState.error_step``;
``check_tokens`` does the same for tokens recorded by other loops.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

GREEDY_TEMPERATURE = 1e-6
"""A temperature at or below this means greedy decoding (argmax)."""

INVALID_TOKEN = -1
"""What ``sample`` returns for a row whose logits or temperature are unusable."""

HOT_TEMPERATURE = 0.9
"""`sample`'s default ``hot_temperature``: filtered rows at or above it draw from the
``hot_candidates`` best tokens, not the ``max_candidates`` best. ReSET's ``t_high`` (1.0) is
above it; the reasoning models' usual fixed temperatures (0.6-0.7), ReSET's ``t_low`` and 0.8
are below. On the default model's GSM8K steps (benchmarks/RESULTS.md AD5, AG2, AG5) every
nucleus wider than 256 tokens came at ``t_high``; at a fixed T = 1.0, 4.4 % of rows keep more
than 256 and 2.2 % more than 512 (a batch of 8: 30 % and 16 %); at T = 0.8, 0.28 % and 0.06 %,
too few to pay for the wider first candidates."""

ENTROPY_FLOOR = 1e-10
"""Probabilities are clamped to this inside the log, as in the reference."""

# Id arrays are padded to a multiple of this (at least) so that tokenizers with
# slightly different numbers of newline ids share one compiled decode loop.
_ID_BUCKET = 8
_PAD_ID = -1
_FSUM_CHUNK = 128
# The per-row ReSET bookkeeping is written as elementwise [B] arithmetic, so
# that XLA fuses it into a couple of loop kernels instead of one small
# reduction kernel per membership test or window sum (each costs a launch,
# 2-4 us on a GPU even inside a CUDA graph). Id arrays up to this length and
# windows up to this length are unrolled; longer ones fall back to one reduction.
_UNROLL_IDS = 64
_UNROLL_WINDOW = 64


# ----------------------------------------------------------------------------
# Small numerical helpers
# ----------------------------------------------------------------------------


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Knuth's TwoSum: ``s = fl(a + b)`` and the exact rounding error ``e``."""
    s = a + b
    b_virtual = s - a
    e = (a - (s - b_virtual)) + (b - b_virtual)
    return s, e


def _acc_add(hi: jax.Array, lo: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Adds ``x`` to the float-float sum ``hi + lo`` and renormalises.

    After renormalisation ``hi`` is ``fl(hi + lo)``, i.e. the float32 rounding of
    a sum carried to about 48 bits, so ``hi / n`` is the mean to within one
    float32 rounding of the reference's double-precision mean.
    """
    s, e = _two_sum(hi, x)
    return _two_sum(s, lo + e)


def _fsum(x: jax.Array, axis: int = -1) -> jax.Array:
    """Compensated (float-float) sum over ``axis``, rounded once to float32.

    A plain float32 reduction is only as good as the order the backend picks;
    XLA:CPU sums a fused row sequentially, which at V = 32k leaves errors near
    1e-4 nats in the entropy. Reducing ``(hi, lo)`` pairs with TwoSum makes the
    result accurate to about one float32 rounding whatever the order.

    Args:
      x: ``[..., n, ...]`` float32.
      axis: the axis to sum.

    Returns:
      ``x`` without ``axis``, float32.
    """
    axis = axis % x.ndim
    n = x.shape[axis]
    if n > _FSUM_CHUNK:
        # Compensating every element costs about 10x a plain reduction on CPU.
        # Plain sums of short chunks are accurate enough (error <= 128 ulps,
        # typically ~10) and leave a 128x shorter axis for the compensated pass.
        x = jnp.moveaxis(x, axis, -1)
        pad = (-n) % _FSUM_CHUNK
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
        x = jnp.sum(x.reshape(*x.shape[:-1], -1, _FSUM_CHUNK), axis=-1)
        axis = x.ndim - 1

    def combine(a, b):
        s, e = _two_sum(a[0], b[0])
        return s, a[1] + b[1] + e

    zero = jnp.zeros((), x.dtype)
    hi, lo = jax.lax.reduce((x, jnp.zeros_like(x)), (zero, zero), combine, (axis,))
    return hi + lo


@jax.jit
def token_entropy(logits: jax.Array) -> jax.Array:
    """Entropy in nats of ``softmax(logits)``, as the reference computes it.

    ``H = -sum(p * log(max(p, 1e-10)))`` with ``p = softmax(logits)`` in float32.
    The clamp is part of the rule (it changes H measurably at large vocabularies),
    so this does not use the algebraically equal ``logsumexp`` form.

    Args:
      logits: ``[..., V]`` raw logits (any float dtype; computed in float32).

    Returns:
      ``[...]`` float32. NaN exactly for rows with a NaN, a ``+inf`` or no finite
      value (every such row makes ``exp(z - max)`` NaN somewhere), finite otherwise.
    """
    z = jnp.asarray(logits, jnp.float32)
    m = jnp.max(z, axis=-1, keepdims=True)
    e = jnp.exp(z - m)
    p = e / _fsum(e)[..., None]
    return -_fsum(p * jnp.log(jnp.maximum(p, ENTROPY_FLOOR)))


def logits_valid(logits: jax.Array) -> jax.Array:
    """Whether each row can be sampled: no NaN, no ``+inf``, at least one finite value.

    ``-inf`` entries (masked tokens) are fine.

    Args:
      logits: ``[..., V]``.

    Returns:
      ``[...]`` bool.
    """
    z = jnp.asarray(logits)
    # NaN fails both comparisons, +inf fails both, -inf and finite values pass.
    no_bad = jnp.all((z < jnp.inf) | (z == -jnp.inf), axis=-1)
    return no_bad & jnp.any(z > -jnp.inf, axis=-1)


def _rows(x: Any, batch: int, dtype: Any) -> jax.Array:
    """Broadcasts a scalar or ``[B]`` knob to ``[B]``."""
    return jnp.broadcast_to(jnp.asarray(x, dtype), (batch,))


def _member(tokens: jax.Array, ids: jax.Array) -> jax.Array:
    """``tokens[b] in ids`` for ``[B]`` tokens and a padded 1-D id array.

    Negative ids (the -1 padding) never match, and neither do negative tokens
    (``last_token`` is -1 before any token), so ``tokens >= 0`` is the only guard
    needed. Short id arrays are compared one id at a time (elementwise, fuses with
    the rest of the rule); long ones use one ``any`` reduction.
    """
    k = ids.shape[0]
    if k == 0:
        return jnp.zeros(tokens.shape, bool)
    if k <= _UNROLL_IDS:
        hit = tokens == ids[0]
        for j in range(1, k):
            hit = hit | (tokens == ids[j])
    else:
        hit = jnp.any(tokens[:, None] == ids[None, :], axis=-1)
    return hit & (tokens >= 0)


def _boundary(
    n: jax.Array, last: jax.Array, prev: jax.Array, nl_ids: jax.Array, dnl_ids: jax.Array
) -> jax.Array:
    """Item 1 of the rule: the generated tokens so far end in a dnl id or in two nl ids.

    Args:
      n: ``[B]`` int32 tokens generated so far (prompt excluded).
      last: ``[B]`` int32 the last one (-1 before any).
      prev: ``[B]`` int32 the one before it (-1 before any).
      nl_ids: ``[K1]`` padded ids of ``"\\n"``.
      dnl_ids: ``[K2]`` padded ids containing ``"\\n\\n"``.

    Returns:
      ``[B]`` bool.
    """
    if max(nl_ids.shape[0], dnl_ids.shape[0]) > _UNROLL_IDS:
        # Long id lists: the three membership tests as one reduction over [B, 3, K].
        k = max(nl_ids.shape[0], dnl_ids.shape[0])

        def pad(ids):
            return jnp.pad(ids, (0, k - ids.shape[0]), constant_values=_PAD_ID)

        ids = jnp.stack([pad(nl_ids), pad(nl_ids), pad(dnl_ids)])  # [3, K]
        toks = jnp.stack([last, prev, last], axis=-1)  # [B, 3]
        hit = jnp.any(toks[:, :, None] == ids[None], axis=-1) & (toks >= 0)
        last_nl, prev_nl, last_dnl = hit[:, 0], hit[:, 1], hit[:, 2]
    else:
        last_nl = _member(last, nl_ids)
        prev_nl = _member(prev, nl_ids)
        last_dnl = _member(last, dnl_ids)
    return ((n >= 1) & last_dnl) | ((n >= 2) & last_nl & prev_nl)


def _ring_sum(ring: jax.Array) -> jax.Array:
    """``_fsum(ring, axis=-1)`` for the ``[B, W]`` window, as elementwise arithmetic.

    The same float-float sum in index order (TwoSum of the running high part,
    the rounding errors added up in the low part, one final rounding), written
    out column by column so that it fuses with the rule's other ``[B]`` work
    instead of being a reduction kernel of its own. It equals ``_fsum``'s
    sequential reduction bit for bit (``tests/test_sampling.py`` checks it).
    """
    w = ring.shape[-1]
    if w > _UNROLL_WINDOW:
        return _fsum(ring)
    hi, lo = ring[:, 0], jnp.zeros_like(ring[:, 0])
    for j in range(1, w):
        hi, e = _two_sum(hi, ring[:, j])
        lo = lo + e
    return hi + lo


def _select_rows(keep_new: jax.Array, new: Any, old: Any) -> Any:
    """Per-row ``where`` over two state pytrees whose leaves lead with ``[B]``."""

    def pick(n, o):
        mask = keep_new.reshape(keep_new.shape + (1,) * (n.ndim - 1))
        return jnp.where(mask, n, o)

    return jax.tree_util.tree_map(pick, new, old)


def _pad_ids(ids: Any, name: str) -> jax.Array:
    if isinstance(ids, jax.core.Tracer):
        return jnp.asarray(ids, jnp.int32)
    arr = np.asarray(ids if not isinstance(ids, (set, frozenset)) else sorted(ids))
    if arr.size == 0:
        arr = np.zeros((0,), np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D sequence of integer token ids, got {arr!r}")
    if (arr < 0).any():
        raise ValueError(f"{name} must hold non-negative token ids, got {arr.tolist()}")
    if arr.max(initial=0) > np.iinfo(np.int32).max:
        raise ValueError(f"{name} holds an id that does not fit int32")
    width = max(_ID_BUCKET, 1 << max(arr.size - 1, 0).bit_length())
    out = np.full((width,), _PAD_ID, np.int32)
    out[: arr.size] = np.unique(arr)
    return jnp.asarray(out)


def _knob(x: Any, name: str) -> jax.Array:
    if isinstance(x, jax.core.Tracer):
        return jnp.asarray(x, jnp.float32)
    arr = np.asarray(x, np.float32)
    if arr.ndim > 1:
        raise ValueError(f"{name} must be a scalar or a per-row [B] array, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite, got {arr}")
    return jnp.asarray(arr)


# ----------------------------------------------------------------------------
# States
# ----------------------------------------------------------------------------


# Column layout of the packed ReSET state (``ReSETState.data``, int32): the float32 bits of
# total_hi, total_lo, step_hi, step_lo and the W ring slots, then the integer columns.
_SUM_COLS = 4
_COUNT, _STEP_COUNT, _LAST, _PREV, _NUM_GENERATED, _BAD = range(6)
_INT_COLS = 6


def _f32_bits(x: jax.Array) -> jax.Array:
    """float32 -> its int32 bits (exact, both ways)."""
    return jax.lax.bitcast_convert_type(x, jnp.int32)


@struct.dataclass
class ReSETState:
    """Per-row ReSET state, packed into one int32 array that leads with the batch axis ``B``.

    One array, so that inside the decode loop a step rewrites one small buffer (one fused
    kernel for ``step``, one for ``observe``, and one loop-carry copy) rather than one a
    field; the float32 statistics are stored as their bits (``lax.bitcast_convert_type``,
    exact). Read the fields through the properties below.

    Attributes:
      data: ``[B, 4 + W + 6]`` int32: the bits of ``total_hi``, ``total_lo``, ``step_hi``,
        ``step_lo`` and the ``W`` ring slots, then ``count``, ``step_count``,
        ``last_token``, ``prev_token``, ``num_generated`` and ``bad`` (0 or 1).

    Properties (views of ``data``):
      window: the ring's length ``W`` (static).
      stats: ``[B, 4 + W]`` float32, the four sums then the ring.
      counts: ``[B, 5]`` int32, ``count`` to ``num_generated``.
      ring: ``[B, W]`` float32, entropy number ``i`` of the row lives in slot ``i % W``.
      total_hi: ``[B]`` float32, float-float sum of every recorded entropy (high part).
      total_lo: ``[B]`` float32, its low part.
      step_hi: ``[B]`` float32, float-float sum of the current step's entropies.
      step_lo: ``[B]`` float32, its low part.
      count: ``[B]`` int32, entropies recorded (positions decided) so far.
      step_count: ``[B]`` int32, entropies in the current step.
      last_token: ``[B]`` int32, the last generated token (-1 before any).
      prev_token: ``[B]`` int32, the one before it (-1 before any).
      num_generated: ``[B]`` int32, tokens observed so far (prompt excluded).
      bad: ``[B]`` bool, sticky: the row has seen unusable logits.
    """

    data: jax.Array

    @property
    def window(self) -> int:
        return self.data.shape[-1] - _SUM_COLS - _INT_COLS

    def _int(self, col: int) -> jax.Array:
        return self.data[..., _SUM_COLS + self.window + col]

    @property
    def stats(self) -> jax.Array:
        return jax.lax.bitcast_convert_type(self.data[..., : _SUM_COLS + self.window], jnp.float32)

    @property
    def counts(self) -> jax.Array:
        return self.data[..., _SUM_COLS + self.window : _SUM_COLS + self.window + _BAD]

    @property
    def ring(self) -> jax.Array:
        return self.stats[..., _SUM_COLS:]

    @property
    def total_hi(self) -> jax.Array:
        return self.stats[..., 0]

    @property
    def total_lo(self) -> jax.Array:
        return self.stats[..., 1]

    @property
    def step_hi(self) -> jax.Array:
        return self.stats[..., 2]

    @property
    def step_lo(self) -> jax.Array:
        return self.stats[..., 3]

    @property
    def count(self) -> jax.Array:
        return self._int(_COUNT)

    @property
    def step_count(self) -> jax.Array:
        return self._int(_STEP_COUNT)

    @property
    def last_token(self) -> jax.Array:
        return self._int(_LAST)

    @property
    def prev_token(self) -> jax.Array:
        return self._int(_PREV)

    @property
    def num_generated(self) -> jax.Array:
        return self._int(_NUM_GENERATED)

    @property
    def bad(self) -> jax.Array:
        return self._int(_BAD) != 0

    def with_columns(self, cols: dict[int, jax.Array]) -> ReSETState:
        """A state with column ``c`` of ``data`` replaced by ``cols[c]`` (``[B]`` int32), the
        others kept: elementwise selects, which XLA fuses into one kernel."""
        col = jnp.arange(self.data.shape[-1], dtype=jnp.int32)
        data = self.data
        for c, v in cols.items():
            data = jnp.where(col == c, v[..., None], data)
        return self.replace(data=data)


@struct.dataclass
class FixedState:
    """Per-row state of the fixed-temperature rule.

    Attributes:
      num_generated: ``[B]`` int32, tokens observed so far.
      bad: ``[B]`` bool, sticky: the row has seen unusable logits.
    """

    num_generated: jax.Array
    bad: jax.Array


class StepInfo(NamedTuple):
    """Diagnostics of one ReSET decision, each ``[B]``."""

    boundary: jax.Array  # bool: the step was emptied before this position
    h_step: jax.Array  # float32: the step-entropy estimate
    h_bar: jax.Array  # float32: the running mean used for the comparison
    uncertain: jax.Array  # bool: h_step > h_bar


# ----------------------------------------------------------------------------
# Rules
# ----------------------------------------------------------------------------


@struct.dataclass
class ReSETConfig:
    """ReSET hyperparameters. Numeric knobs and id arrays are traced leaves.

    A new ``t_high``/``t_low``/``tau0`` value (scalar or per-row ``[B]``) or new
    contents of the id arrays never recompile; only ``window`` (static), a change
    from scalar to ``[B]`` knobs, or an id array growing past its padded bucket
    does. Build it with ``ReSETConfig.create`` from Python values.

    Attributes:
      t_high: float32 ``[]`` or ``[B]``, temperature for high-entropy tokens.
      t_low: float32 ``[]`` or ``[B]``, temperature for the others.
      tau0: float32 ``[]`` or ``[B]``, entropy threshold outside uncertain steps.
      nl_ids: int32 ``[K1]`` ids that decode to exactly ``"\\n"`` (-1 pads).
      dnl_ids: int32 ``[K2]`` ids whose text contains ``"\\n\\n"`` (-1 pads).
      window: static int ``w``, the sliding window length (paper: 32).
    """

    t_high: jax.Array
    t_low: jax.Array
    tau0: jax.Array
    nl_ids: jax.Array
    dnl_ids: jax.Array
    window: int = struct.field(pytree_node=False, default=32)

    @classmethod
    def create(
        cls,
        *,
        t_low: float | Sequence[float] | jax.Array,
        tau0: float | Sequence[float] | jax.Array,
        t_high: float | Sequence[float] | jax.Array = 1.0,
        window: int = 32,
        nl_ids: Iterable[int] | jax.Array = (),
        dnl_ids: Iterable[int] | jax.Array = (),
    ) -> ReSETConfig:
        """Builds a config from Python floats/lists (or arrays), checking them.

        Args:
          t_low: temperature below the threshold, scalar or per-row ``[B]``.
          tau0: entropy threshold in nats, scalar or ``[B]`` (see ``calibrate_tau0``).
          t_high: temperature at or above the threshold, scalar or ``[B]``.
          window: sliding-window length ``w >= 1``.
          nl_ids: token ids decoding to exactly ``"\\n"`` (see ``step_boundary_ids``).
          dnl_ids: token ids whose text contains ``"\\n\\n"``.

        Returns:
          The config; id arrays padded with -1 to a power of two (at least 8).
        """
        if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
            raise ValueError(f"window must be a positive int, got {window!r}")
        return cls(
            t_high=_knob(t_high, "t_high"),
            t_low=_knob(t_low, "t_low"),
            tau0=_knob(tau0, "tau0"),
            nl_ids=_pad_ids(nl_ids, "nl_ids"),
            dnl_ids=_pad_ids(dnl_ids, "dnl_ids"),
            window=int(window),
        )

    def init_state(self, batch_size: int) -> ReSETState:
        """Fresh state for ``batch_size`` rows (see ``init_state``)."""
        b, w = batch_size, self.window
        # Sums and ring 0.0 (bits 0); count, step_count, num_generated and bad 0;
        # last_token and prev_token -1.
        ints = jnp.array([0, 0, -1, -1, 0, 0], jnp.int32)
        row = jnp.concatenate([jnp.zeros((_SUM_COLS + w,), jnp.int32), ints])
        return ReSETState(data=jnp.broadcast_to(row, (b, _SUM_COLS + w + _INT_COLS)))

    def step_with_info(
        self, state: ReSETState, logits: jax.Array
    ) -> tuple[ReSETState, jax.Array, jax.Array, StepInfo]:
        """``step`` plus the decision's diagnostics (see ``StepInfo``)."""
        h = token_entropy(logits)  # [B]
        valid = ~jnp.isnan(h)
        new_state, temperature, info = self._decide(state, jnp.where(valid, h, 0.0))
        bad_col = _SUM_COLS + self.window + _BAD
        new_state = _select_rows(valid, new_state, state).with_columns(
            {bad_col: (state.bad | ~valid).astype(jnp.int32)}
        )
        temperature = jnp.where(valid, temperature, jnp.nan)
        return new_state, temperature, h, info

    def step(self, state: ReSETState, logits: jax.Array) -> tuple[ReSETState, jax.Array, jax.Array]:
        """See the module-level ``step``."""
        new_state, temperature, h, _ = self.step_with_info(state, logits)
        return new_state, temperature, h

    def _decide(self, state: ReSETState, h: jax.Array) -> tuple[ReSETState, jax.Array, StepInfo]:
        """The ReSET rule, items 1-7 of the algorithm doc, for ``[B]`` entropies ``h``.

        This is the only place the rule is written down.
        """
        w = self.window
        b = h.shape[0]
        t_high = _rows(self.t_high, b, jnp.float32)
        t_low = _rows(self.t_low, b, jnp.float32)
        tau0 = _rows(self.tau0, b, jnp.float32)

        # 1. Boundary from the generated tokens only (num_generated excludes the prompt).
        boundary = _boundary(
            state.num_generated, state.last_token, state.prev_token, self.nl_ids, self.dnl_ids
        )
        step_hi = jnp.where(boundary, 0.0, state.step_hi)
        step_lo = jnp.where(boundary, 0.0, state.step_lo)
        step_count = jnp.where(boundary, 0, state.step_count)

        count = state.count
        none_yet = count == 0
        mean_all = state.total_hi / jnp.maximum(count, 1).astype(jnp.float32)

        # 3. The window mean. While count <= w the window holds every entropy so
        # far, and the reference's mean(window) and H_bar are the same double sum
        # in the same order, hence equal: the step is never uncertain there. Two
        # separately rounded float32 sums would break that tie at random, so
        # that case reuses the very same running mean as H_bar (bitwise equal).
        # It is <= and not <: at count == w the window is still every entropy.
        # Once the ring has wrapped, its float-float sum is rounded once, which
        # matches the reference's double mean to one float32 rounding.
        window_mean = jnp.where(count <= w, mean_all, _ring_sum(state.ring) / jnp.float32(w))
        # When the step spans the whole sequence (no boundary yet) its sum went
        # through exactly the same float-float updates as the total, so
        # mean(step) and H_bar tie bitwise there too, as they do in the reference.
        step_mean = step_hi / jnp.maximum(step_count, 1).astype(jnp.float32)
        h_step = jnp.where(step_count < w, window_mean, step_mean)
        h_step = jnp.where(none_yet, h, h_step)
        # 4. The first token has no earlier entropy: H_bar falls back to H_step.
        h_bar = jnp.where(none_yet, h_step, mean_all)
        # 5. Strict, so the exact ties above are never uncertain.
        uncertain = h_step > h_bar
        # 6. Note >=: an entropy equal to the threshold takes t_high.
        tau = jnp.where(uncertain, h_step, tau0)
        temperature = jnp.where(h >= tau, t_high, t_low)

        # 7. Only now record h.
        total_hi, total_lo = _acc_add(state.total_hi, state.total_lo, h)
        step_hi, step_lo = _acc_add(step_hi, step_lo, h)
        c0 = _SUM_COLS + w
        new_state = state.with_columns(
            {
                0: _f32_bits(total_hi),
                1: _f32_bits(total_lo),
                2: _f32_bits(step_hi),
                3: _f32_bits(step_lo),
                c0 + _COUNT: count + 1,
                c0 + _STEP_COUNT: step_count + 1,
            }
        )
        # h into ring slot count % w (column _SUM_COLS + slot).
        col = jnp.arange(c0 + _INT_COLS, dtype=jnp.int32)[None, :]
        ring_col = (_SUM_COLS + count % w)[:, None]
        new_state = new_state.replace(
            data=jnp.where(col == ring_col, _f32_bits(h)[:, None], new_state.data)
        )
        return new_state, temperature, StepInfo(boundary, h_step, h_bar, uncertain)

    def observe(self, state: ReSETState, token: jax.Array) -> ReSETState:
        """See the module-level ``observe``."""
        token = jnp.asarray(token, jnp.int32)
        c0 = _SUM_COLS + self.window
        return state.with_columns(
            {
                c0 + _LAST: token,
                c0 + _PREV: state.last_token,
                c0 + _NUM_GENERATED: state.num_generated + 1,
            }
        )


@struct.dataclass
class FixedTemperature:
    """The baseline: one temperature for every token (paper: 0.6).

    Attributes:
      temperature: float32 ``[]`` or ``[B]`` (traced); ``<= 1e-6`` means greedy.
    """

    temperature: jax.Array

    @classmethod
    def create(cls, temperature: float | Sequence[float] | jax.Array = 0.6) -> FixedTemperature:
        """Builds the rule from a Python float/list (or array), checking it."""
        return cls(temperature=_knob(temperature, "temperature"))

    def init_state(self, batch_size: int) -> FixedState:
        """Fresh state for ``batch_size`` rows (see ``init_state``)."""
        return FixedState(
            num_generated=jnp.zeros((batch_size,), jnp.int32),
            bad=jnp.zeros((batch_size,), bool),
        )

    def step(self, state: FixedState, logits: jax.Array) -> tuple[FixedState, jax.Array, jax.Array]:
        """See the module-level ``step``."""
        h = token_entropy(logits)
        valid = ~jnp.isnan(h)
        temperature = _rows(self.temperature, h.shape[0], jnp.float32)
        temperature = jnp.where(valid, temperature, jnp.nan)
        return state.replace(bad=state.bad | ~valid), temperature, h

    def observe(self, state: FixedState, token: jax.Array) -> FixedState:
        """See the module-level ``observe``."""
        del token
        return state.replace(num_generated=state.num_generated + 1)


Rule = ReSETConfig | FixedTemperature
State = ReSETState | FixedState


# ----------------------------------------------------------------------------
# The protocol
# ----------------------------------------------------------------------------


# The protocol functions are jitted so that eager callers (tests, notebooks,
# replay tools) get compiled, cached code; inside the decode loop's jit they
# simply inline.
@functools.partial(jax.jit, static_argnames=("batch_size",))
def init_state(rule: Rule, batch_size: int) -> State:
    """A fresh per-row state for ``rule``.

    Args:
      rule: ``ReSETConfig`` or ``FixedTemperature``.
      batch_size: number of rows ``B`` (static).

    Returns:
      A state pytree whose leaves lead with ``[B]``; O(window) memory per row.
    """
    return rule.init_state(batch_size)


@jax.jit
def step(rule: Rule, state: State, logits: jax.Array) -> tuple[State, jax.Array, jax.Array]:
    """Decides this position's temperatures and records its entropies.

    Pure ``jnp``/``lax``: works under ``jit``, ``vmap``, ``lax.scan`` and
    ``lax.while_loop``. Call ``observe`` with the sampled tokens before the next
    ``step``; the step boundary is read from the tokens observed so far.

    Args:
      rule: ``ReSETConfig`` or ``FixedTemperature``.
      state: from ``init_state`` / the previous ``observe``.
      logits: ``[B, V]`` raw logits (before any temperature); used in float32.

    Returns:
      ``(state, temperature, entropy)``: temperature ``[B]`` float32 and entropy
      ``[B]`` float32 (nats). For a row with unusable logits (a NaN, a ``+inf``,
      or no finite value) both are NaN, the row's statistics are left as they
      were and ``state.bad`` is set for it.
    """
    return rule.step(state, logits)


@jax.jit
def observe(rule: Rule, state: State, token: jax.Array) -> State:
    """Records the token just generated at each row.

    Args:
      rule: ``ReSETConfig`` or ``FixedTemperature``.
      state: the state ``step`` returned for this position.
      token: ``[B]`` int32 generated tokens.

    Returns:
      The updated state.
    """
    return rule.observe(state, token)


@functools.partial(jax.jit, static_argnames=("return_info",))
def _replay(rule, logits, tokens, return_info):
    # logits [T, B, V], tokens [T, B]
    state = init_state(rule, logits.shape[1])

    def body(state, xs):
        z, tok = xs
        if return_info:
            state, temperature, h, info = rule.step_with_info(state, z)
        else:
            state, temperature, h = step(rule, state, z)
            info = None
        return observe(rule, state, tok), (temperature, h, info)

    _, out = jax.lax.scan(body, state, (logits, tokens))
    return out


def replay(
    rule: Rule, logits: jax.Array, tokens: jax.Array, *, return_info: bool = False
) -> tuple[jax.Array, jax.Array] | tuple[jax.Array, jax.Array, StepInfo]:
    """Runs ``step``/``observe`` over recorded sequences with ``lax.scan``.

    ``tokens[..., t]`` is the token generated at position ``t``; the decision at
    ``t`` sees the boundary from ``tokens[..., :t]``.

    Args:
      rule: ``ReSETConfig`` or ``FixedTemperature`` (knobs scalar, or ``[B]`` for
        batched input).
      logits: ``[T, V]`` for one sequence, or ``[B, T, V]`` for ``B`` sequences.
      tokens: ``[T]`` or ``[B, T]`` int.
      return_info: also return ``StepInfo`` (``ReSETConfig`` only), each ``[T]``
        or ``[B, T]``.

    Returns:
      ``(temperatures, entropies)`` shaped like ``tokens`` (float32), plus the
      ``StepInfo`` when asked for.
    """
    logits = jnp.asarray(logits)
    tokens = jnp.asarray(tokens, jnp.int32)
    if logits.ndim not in (2, 3) or tokens.shape != logits.shape[:-1]:
        raise ValueError(
            f"replay wants logits [T, V] with tokens [T], or [B, T, V] with [B, T]; "
            f"got {logits.shape} and {tokens.shape}"
        )
    if return_info and not isinstance(rule, ReSETConfig):
        raise TypeError("return_info=True needs a ReSETConfig")
    batched = logits.ndim == 3
    if not batched:
        logits, tokens = logits[None], tokens[None]
    temperature, h, info = _replay(
        rule, jnp.swapaxes(logits, 0, 1), jnp.swapaxes(tokens, 0, 1), return_info
    )

    def unstack(x):
        x = jnp.swapaxes(x, 0, 1)  # [B, T]
        return x if batched else x[0]

    out = (unstack(temperature), unstack(h))
    if return_info:
        return (*out, StepInfo(*(unstack(x) for x in info)))
    return out


# ----------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------


def _cuda_sort_reason(shape: tuple[int, ...], dtype: Any = jnp.float32) -> str | None:
    """Why the CUDA row sort cannot serve a traced ``[B, V]`` sort of ``dtype`` (a
    message), or None."""
    if len(shape) != 2:
        return f"z {shape} is not [B, V]"
    b, v = shape
    if (why := _cuda_dtype_reason(dtype)) is not None:
        return why
    if b < 1 or v < 1 or b * v >= 2**31:
        return f"z {shape}: the sort serves 1 to 2**31 - 1 elements"
    if jax.default_backend() != "gpu":
        return f"the default backend is {jax.default_backend()!r}, not a CUDA GPU"
    from reset_jax.nvfp4 import cuda

    return cuda.gpu_reason()


def _sorted_descending(z: jax.Array, *, cuda: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """Full descending sort of ``[B, V]`` rows: equal values in index order, -0.0 equal
    to +0.0, NaNs last (as ``lax.sort`` compares them).

    On a GPU with the CUDA library, by default, one radix sort of every row at once
    (``ffi/sort_kernels.h``, cub's onesweep on ``row | value`` keys); XLA sorts
    ``[8, 151936]`` with a bitonic network of 28 kernels (~370 us a call on an H200,
    RESULTS.md AF1). Elsewhere ``lax.sort``. Both give the same indices and values
    (bit for bit, but for NaN payloads: XLA's GPU sort writes every NaN back as one NaN).

    Args:
      z: ``[B, V]`` float32, bfloat16 or float16 (the CUDA sort; any float for
        ``lax.sort``).
      cuda: use the CUDA sort (True: raise ``NotImplementedError`` if it cannot serve),
        not (False), or None: where it can serve, unless the environment variable
        ``RESET_JAX_SORT`` (``auto``, ``cuda`` or ``xla``, read when the call is traced)
        says otherwise.

    Returns:
      ``(values [B, V] of z's dtype, indices [B, V] int32)``.
    """
    if cuda is None and (choice := _env_method("RESET_JAX_SORT", ("cuda", "xla"))) != "auto":
        cuda = choice == "cuda"
    why = _cuda_sort_reason(z.shape, z.dtype)
    if cuda and why is not None:
        raise NotImplementedError(f"the CUDA row sort cannot serve this call: {why}")

    def with_xla(z):
        iota = jax.lax.broadcasted_iota(jnp.int32, z.shape, z.ndim - 1)
        neg, idx = jax.lax.sort((-z, iota), dimension=z.ndim - 1, num_keys=1, is_stable=True)
        return -neg, idx

    if cuda is False or why is not None:
        return with_xla(z)
    # The call may be placed on a CPU device of a GPU host: picked when lowered.
    return jax.lax.platform_dependent(z, cuda=_sort_rows_cuda, default=with_xla)


def _sort_rows_cuda(z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`_sorted_descending` through the CUDA sort (``ffi/sort_kernels.h``).

    Args:
      z: ``[B, V]`` float32, bfloat16 or float16, ``B * V < 2**31``.

    Returns:
      ``(values [B, V] of z's dtype, indices [B, V] int32)``.
    """
    from reset_jax.nvfp4 import cuda

    cuda.ensure_registered()
    b, v = z.shape
    vals, idx, _ = jax.ffi.ffi_call(
        cuda.TARGET_SORT_ROWS,
        (
            jax.ShapeDtypeStruct((b, v), jnp.float32),
            jax.ShapeDtypeStruct((b, v), jnp.int32),
            jax.ShapeDtypeStruct((cuda.sort_scratch_bytes(b, v),), jnp.uint8),  # scratch
        ),
        vmap_method="sequential",
    )(z.astype(jnp.float32))
    return vals.astype(z.dtype), idx


# Staged top-k (see _top_k_candidates).
_TOPK_CHUNK = 128
_TOPK_PER_CHUNK = 16
_TOPK_MAX_STAGES = 2


# The CUDA top-k (ffi/topk_kernels.h) serves k up to this; a row holds up to this many
# candidates, and slices are at least this wide.
_TOPK_CUDA_MAX_K = 1024
_TOPK_CUDA_CAP = 4096
_TOPK_CUDA_MIN_SLICE = 32


def _cuda_dtype_reason(dtype: Any) -> str | None:
    """Why the sampler's CUDA kernels (top-k, row sort) cannot take values of ``dtype``, or
    None: they order float32, which holds bfloat16 and float16 values exactly."""
    if np.dtype(dtype) in (np.dtype(jnp.float32), np.dtype(jnp.bfloat16), np.dtype(jnp.float16)):
        return None
    return f"{np.dtype(dtype).name} values (the kernels order float32, exact for bf16 and f16)"


def _cuda_top_k_reason(shape: tuple[int, int], c: int, dtype: Any = jnp.float32) -> str | None:
    """Why the CUDA top-k kernels cannot serve a traced ``[B, V]`` call of ``dtype`` for
    ``c`` (a message), or None."""
    b, v = shape
    if (why := _cuda_dtype_reason(dtype)) is not None:
        return why
    if c > _TOPK_CUDA_MAX_K:
        return f"k = {c} > {_TOPK_CUDA_MAX_K}, the most the CUDA top-k serves"
    if b == 0 or c < 1 or c > v:
        return f"z {shape}, k = {c}: nothing to select"
    if v > _TOPK_CUDA_CAP and -(-v // _TOPK_CUDA_MIN_SLICE) < 2 * c:
        # Too few slices for a threshold well below the k-th value: most of each row would
        # pass it and overflow the candidates, every call.
        return f"V = {v} is too short a row for k = {c} (fewer than 2k slices of 32)"
    if jax.default_backend() != "gpu":
        return f"the default backend is {jax.default_backend()!r}, not a CUDA GPU"
    from reset_jax.nvfp4 import cuda

    return cuda.gpu_reason()


def _top_k_cuda(z: jax.Array, c: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``lax.top_k(z, c)`` through the CUDA kernels, row by row exact or not.

    Args:
      z: ``[B, V]`` float32, bfloat16 or float16.
      c: static, ``1 <= c <= min(V, 1024)``.

    Returns:
      ``(values [B, c] of z's dtype, indices [B, c] int32, exact [B] bool)``; a row is
      exact (equal to ``lax.top_k``'s values, indices and tie order) unless it holds a
      NaN, zeros of both signs that can reach its top, or more than 4096 values at or
      above the kernels' threshold (ffi/topk_kernels.h).
    """
    from reset_jax.nvfp4 import cuda

    cuda.ensure_registered()
    b, v = z.shape
    vals, idx, exact, _ = jax.ffi.ffi_call(
        cuda.TARGET_TOPK,
        (
            jax.ShapeDtypeStruct((b, c), jnp.float32),
            jax.ShapeDtypeStruct((b, c), jnp.int32),
            jax.ShapeDtypeStruct((b,), jnp.int32),
            jax.ShapeDtypeStruct((cuda.top_k_scratch_words(b, v, c),), jnp.uint32),  # scratch
        ),
        vmap_method="sequential",
    )(z.astype(jnp.float32), k=np.int64(c))
    return vals.astype(z.dtype), idx, exact != 0


def _top_k_cuda_scaled(
    x: jax.Array, t: jax.Array, c: int, counts: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """`_top_k_cuda` of ``z = x / t[:, None]`` and ``jax.nn.logsumexp(z, axis=-1)``, with
    z computed inside the kernels (never written out).

    Args:
      x: ``[B, V]`` float32, bfloat16 or float16 (used in float32).
      t: ``[B]`` float32 divisors.
      c: static, as for `_top_k_cuda`.
      counts: optional ``[B]`` int32 in ``[1, c]``: row ``b`` selects and sorts only its
        ``counts[b]`` best (`_mask_past_counts` for the rest); exactness is about those.

    Returns:
      ``(values [B, c] float32, indices [B, c] int32, exact [B] bool, log_norm [B]
      float32)``: the values are z's, divided as XLA's GPU code divides (PTX
      ``div.full.f32``, not the IEEE quotient: ``ffi/order_key.cuh``), exactness as
      `_top_k_cuda`'s; ``log_norm`` is each row's logsumexp of z (exp summed in float32 over
      a lane's few values, then in float64, so it can differ from XLA's in the last bit).
    """
    from reset_jax.nvfp4 import cuda

    cuda.ensure_registered()
    b, v = x.shape
    args = [x.astype(jnp.float32), t.astype(jnp.float32)]
    if counts is not None:
        args.append(counts.astype(jnp.int32))
    vals, idx, exact, log_norm, _ = jax.ffi.ffi_call(
        cuda.TARGET_TOPK_SCALED if counts is None else cuda.TARGET_TOPK_SCALED_COUNTS,
        (
            jax.ShapeDtypeStruct((b, c), jnp.float32),
            jax.ShapeDtypeStruct((b, c), jnp.int32),
            jax.ShapeDtypeStruct((b,), jnp.int32),
            jax.ShapeDtypeStruct((b,), jnp.float32),
            jax.ShapeDtypeStruct((cuda.top_k_scratch_words(b, v, c),), jnp.uint32),  # scratch
        ),
        vmap_method="sequential",
    )(*args, k=np.int64(c))
    return vals, idx, exact != 0, log_norm


def _mask_past_counts(
    vals: jax.Array, idx: jax.Array, counts: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """Top-k results ``vals``/``idx`` ``[B, C]`` with each row's entries from rank
    ``counts[b]`` on set to ``-inf`` / 0 (what the CUDA top-k writes there); unchanged where
    ``counts`` is None."""
    if counts is None:
        return vals, idx
    past = jnp.arange(vals.shape[-1])[None, :] >= counts[:, None]
    return jnp.where(past, -jnp.inf, vals), jnp.where(past, 0, idx)


def _scaled_top_k(
    x: jax.Array,
    t: jax.Array,
    c: int,
    *,
    rows: jax.Array | None = None,
    counts: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """`_top_k_candidates` of ``z = x / t[:, None]``, and ``jax.nn.logsumexp(z, axis=-1)``.

    Where the CUDA top-k serves (as `_top_k_candidates` decides, ``RESET_JAX_TOP_K``
    included), one call does both from ``x`` and ``t`` (`_top_k_cuda_scaled`): z is not
    written out and its logsumexp costs no reductions of its own (4 kernels and a
    ``[B, V]`` division less a decode step). Elsewhere z is computed and both run in XLA.

    Args:
      x: ``[B, V]`` float logits.
      t: ``[B]`` float32 divisors (the temperatures, 1 for greedy rows).
      c: static, ``1 <= c <= V``.
      rows: as for `_top_k_candidates`.
      counts: optional ``[B]`` int32 in ``[1, c]``: row ``b`` needs only its ``counts[b]``
        best; its entries from that rank on are ``-inf`` with index 0 (`_mask_past_counts`),
        and the CUDA kernels select and sort fewer for it.

    Returns:
      ``(values [B, c], indices [B, c] int32, exact, log_norm [B])``: the first three as
      `_top_k_candidates` returns them for z (then masked past ``counts``), ``exact`` a
      bool scalar.
    """

    def with_xla(x, t):
        z = x / t[:, None]
        vals, idx, exact = _top_k_candidates(z, c, rows=rows)
        vals, idx = _mask_past_counts(vals, idx, counts)
        return vals, idx, exact, jax.nn.logsumexp(z, axis=-1)

    cuda, _ = _top_k_env_choice()  # False: staged or lax, asked for
    if cuda is False or _cuda_top_k_reason(x.shape, c, x.dtype) is not None:
        return with_xla(x, t)  # where "cuda" was asked for, _top_k_candidates raises why not

    def kernels(x, t):
        vals, idx, row_exact, log_norm = _top_k_cuda_scaled(x, t, c, counts)
        return vals, idx, jnp.all(row_exact if rows is None else row_exact | ~rows), log_norm

    # A CPU device of a GPU host gets the XLA form: picked when the call is lowered.
    return jax.lax.platform_dependent(x, t, cuda=kernels, default=with_xla)


def _env_method(name: str, methods: tuple[str, ...]) -> str:
    """The method the environment variable ``name`` names when a call is traced: ``auto``
    (also where it is unset) or one of ``methods`` (for comparisons of the sampler's
    kernels with XLA's forms).

    Raises:
      ValueError: any other value.
    """
    choice = os.environ.get(name, "auto")
    if choice != "auto" and choice not in methods:
        names = ", ".join(("auto", *methods[:-1]))
        raise ValueError(f"{name}={choice!r}: expected {names} or {methods[-1]}")
    return choice


def _top_k_env_choice() -> tuple[bool | None, bool | None]:
    """``(cuda, staged)`` as the environment variable ``RESET_JAX_TOP_K`` sets them when the
    call is traced: ``auto`` (or unset) leaves both None; ``cuda``, ``staged`` or ``lax``
    picks that one method.

    Raises:
      ValueError: any other value.
    """
    choice = _env_method("RESET_JAX_TOP_K", ("cuda", "staged", "lax"))
    if choice == "auto":
        return None, None
    return choice == "cuda", choice == "staged"


def _top_k_candidates(
    z: jax.Array,
    c: int,
    *,
    rows: jax.Array | None = None,
    staged: bool | None = None,
    max_stages: int = _TOPK_MAX_STAGES,
    cuda: bool | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``lax.top_k(z, c)`` for ``[B, V]`` rows, cheaply, and whether that is exact.

    On a GPU with the CUDA library, by default, four small kernels do it
    (`_top_k_cuda`): 12 us a decode step at B = 1 and 22 at B = 8 (V = 151,936,
    c = 256, H200), against the stages' 36 and 81 (`benchmarks/sampler_cost.py
    --pieces`, above the loop's floor; RESULTS.md run AB2). ``exact`` is false only
    for a row with a NaN, zeros of both signs near its top or a pathological run of
    ties. Without the library (or with ``staged`` given) the stages below run.

    On a GPU, XLA runs ``lax.top_k`` over a large vocabulary as a full sort of every
    row: a bitonic sort at B > 1 (0.37 ms per decode step at B = 8, V = 151,936 on an
    H100), cub's radix sort for one row (~0.06 ms in six launches outside the CUDA
    graphs). Here each stage cuts the rows into 128-wide chunks and keeps each
    chunk's 16 best (XLA's small top-k kernel), up to ``max_stages`` times while a
    stage still shrinks the rows at least fourfold and leaves enough candidates
    (V = 151,936: 18,992, then 2,384), and ``lax.top_k`` runs over what is left.
    Equal values keep index order through every stage (a chunk's top-k keeps them
    so, and chunks are in index order), so the result is ``lax.top_k``'s -- values,
    indices and tie order -- whenever every chunk's 16th best is below the row's
    c-th best value: then nothing a chunk dropped could be in the top ``c``. ``exact`` says whether that
    holds for every row in ``rows`` (other rows may come back inexact); it is false
    where a row's values cluster in one chunk, a chunk's 16th best ties the c-th
    value, the row has fewer than ``c`` finite values, or a NaN. The caller then
    falls back to ``lax.top_k`` (`_top_k_rows`, and `sample` before its full sort).

    On the CPU, XLA's small batched top-k is slow, so ``lax.top_k`` runs directly
    there (``exact`` true) unless ``staged`` says otherwise.

    Args:
      z: ``[B, V]`` float.
      c: ``1 <= c <= V``.
      rows: ``[B]`` bool, the rows whose result is used; None: all rows.
      staged: force the stages on (True) or off (False); None: on for a GPU backend.
      max_stages: most chunking stages.
      cuda: use the CUDA kernels (True: raise ``NotImplementedError`` if they cannot
        serve), not (False), or None: when ``staged`` is None and they can serve.
        With both None, the environment variable ``RESET_JAX_TOP_K`` (``auto``,
        ``cuda``, ``staged`` or ``lax``: one method everywhere, for comparisons) is
        read when the call is traced.

    Returns:
      ``(values [B, c], indices [B, c] int32, exact)``, ``exact`` a bool scalar.
    """
    b, v = z.shape
    if cuda is None and staged is None:
        cuda, staged = _top_k_env_choice()
    if cuda is None:
        cuda = staged is None and _cuda_top_k_reason(z.shape, c, z.dtype) is None
    elif cuda and (why := _cuda_top_k_reason(z.shape, c, z.dtype)) is not None:
        raise NotImplementedError(f"the CUDA top-k cannot serve this call: {why}")
    if cuda:

        def kernels(z):
            vals, idx, row_exact = _top_k_cuda(z, c)
            return vals, idx, jnp.all(row_exact if rows is None else row_exact | ~rows)

        def elsewhere(z):  # a CPU device of a GPU host: lax.top_k, as on a CPU backend
            return _top_k_candidates(z, c, staged=False, cuda=False)

        # The default backend says GPU, but the call may be placed on another device: the
        # branch is picked when the computation is lowered for its platform.
        return jax.lax.platform_dependent(z, cuda=kernels, default=elsewhere)
    chunk, per = _TOPK_CHUNK, _TOPK_PER_CHUNK
    if staged is None:
        staged = jax.default_backend() == "gpu"  # z is a tracer here: no device
    cand, cidx, lasts = z, None, []
    for stage in range(max_stages if staged else 0):
        w = cand.shape[1]
        n = -(-w // chunk)
        # A later stage must leave 4c candidates: at 2c (V = 32,000: 4,000 -> 512) random
        # rows came out inexact a third of the time (CPU count, tenth-session review).
        if n * per < (2 if stage == 0 else 4) * c or w < 4 * n * per:
            break
        # Padding (-inf, indices >= V) sits after every real value of its row, so it is
        # never chosen while V >= c real values tie or beat it.
        pad = ((0, 0), (0, n * chunk - w))
        cv, ci = jax.lax.top_k(
            jnp.pad(cand, pad, constant_values=-jnp.inf).reshape(b, n, chunk), per
        )
        pos = (ci + (jnp.arange(n, dtype=jnp.int32) * chunk)[None, :, None]).reshape(b, n * per)
        if cidx is not None:
            pos = jnp.take_along_axis(jnp.pad(cidx, pad, constant_values=v), pos, axis=-1)
        lasts.append(cv[:, :, -1])
        cand, cidx = cv.reshape(b, n * per), pos
    vals, pos = jax.lax.top_k(cand, c)
    if cidx is None:
        return vals, pos, jnp.asarray(True)
    idx = jnp.take_along_axis(cidx, pos, axis=-1)
    # Exact iff every chunk's last kept value is below the c-th value (a dropped
    # value equal to it could precede a kept one in index order); NaN: inexact.
    row_exact = ~jnp.any(jnp.isnan(vals), axis=-1)
    for last in lasts:
        row_exact &= jnp.all(last < vals[:, -1:], axis=-1)
    exact = jnp.all(row_exact if rows is None else row_exact | ~rows)
    return vals, idx, exact


def _top_k_rows(
    z: jax.Array, c: int, *, rows: jax.Array | None = None, staged: bool | None = None
) -> tuple[jax.Array, jax.Array]:
    """``lax.top_k(z, c)``, exactly: `_top_k_candidates`, falling back to ``lax.top_k``
    under ``lax.cond`` where it is not exact (that step then pays both).

    Args and the first two results as for `_top_k_candidates`.
    """
    vals, idx, exact = _top_k_candidates(z, c, rows=rows, staged=staged)
    return jax.lax.cond(exact, lambda: (vals, idx), lambda: tuple(jax.lax.top_k(z, c)))


def _sample_candidates(key, vals, idx, k_eff, top_p, log_norm_all, vocab, counts=None):
    """Top-k then top-p over descending candidates ``vals``/``idx`` ``[B, C]``, of which
    row ``b`` has its first ``counts[b]`` (``[B]``; None: all ``C``).

    Returns the sampled token ``[B]`` and whether the candidates hold the whole
    kept set ``[B]`` (always true when ``C == V``). Where they do, the token depends
    only on the key and the row's kept set, not on ``counts``: the noise is drawn for
    ``[B, C]`` either way.
    """
    c = vals.shape[-1]
    rank = jnp.arange(c)[None, :]
    have = jnp.full_like(k_eff, c) if counts is None else counts
    in_k = (rank < k_eff[:, None]) & (rank < have[:, None])
    masked = jnp.where(in_k, vals, -jnp.inf)
    # Top-p is measured on the distribution renormalised over the top-k set
    # (the Hugging Face / vLLM order). With top-k off, that set is the full
    # vocabulary, whose normaliser the candidates alone do not give.
    log_norm = jnp.where(k_eff <= have, jax.nn.logsumexp(masked, axis=-1), log_norm_all)
    probs = jnp.exp(masked - log_norm[:, None])
    cum = jnp.cumsum(probs, axis=-1)
    before = jnp.concatenate([jnp.zeros_like(cum[:, :1]), cum[:, :-1]], axis=-1)
    nucleus_on = top_p < 1.0
    # The top token is always kept, so top_p <= 0 still samples.
    keep = in_k & ((before < top_p[:, None]) | (rank == 0) | ~nucleus_on[:, None])
    choice = jax.random.categorical(key, jnp.where(keep, vals, -jnp.inf), axis=-1)
    token = jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0]
    fits = (k_eff <= have) | ((k_eff >= vocab) & nucleus_on & (cum[:, -1] >= top_p))
    return token, fits


def sample(
    key: jax.Array,
    logits: jax.Array,
    temperature: jax.Array | float,
    *,
    top_p: jax.Array | float = 1.0,
    top_k: jax.Array | int = 0,
    max_candidates: int = 256,
    wide_candidates: int = 1024,
    hot_candidates: int = 384,
    hot_temperature: float = HOT_TEMPERATURE,
) -> jax.Array:
    """Draws one token per row: ``logits / T``, then top-k, then top-p.

    Rows with ``T <= 1e-6`` take the argmax of the raw logits (deterministic).
    Top-k keeps exactly ``k`` tokens (ties by lower id); ``k <= 0`` or ``k >= V``
    is off. Top-p keeps the smallest prefix of the probability-sorted tokens
    (renormalised over the top-k set) whose mass reaches ``top_p``, always the
    top token; ``top_p >= 1`` is off. All parameters may differ per row.

    Cost: rows with both filters off draw from the full vocabulary with no sort.
    Filtered rows look at the ``max_candidates`` best tokens, those at or above
    ``hot_temperature`` at the ``hot_candidates`` best (``lax.top_k``; on a GPU
    the CUDA top-k kernels, or stages where the library is missing, falling back to
    ``lax.top_k`` where either is not exact);
    where some row's kept set may reach beyond them (a large ``k``, or a nucleus
    wider than the candidates) the batch draws from the ``wide_candidates`` best
    instead, and only past those from a full sort, so the result is always exact,
    and the same on every backend for one key. (A nucleus wider than 256 is not
    rare: 2.95 % of the default model's ReSET steps on GSM8K, 12.9 % of those at
    ``t_high``, none at a fixed T = 0.6; 7.5 % of the ``t_high`` ones wider than 384,
    0.20 % of all wider than 1024. On a GPU a full sort of the rows costs far more than a
    step's sampling.) Hot rows' 384 candidates took ReSET's step at batch 8 from 99.1 to
    93.6 us of sampling at those rates (the wide draw on 11.3 % of batches, not 19.7 %), the
    fixed rule's unchanged (RESULTS.md AG5, AG6). A ``top_k`` of at most
    ``max_candidates`` keeps every kept set within the candidates: no wide draw and no full
    sort, at the price of cutting the widest nuclei. Every row draws from
    ``[B, max(max_candidates, hot_candidates)]`` candidates, each row from its own count of
    them, so one key gives a row the same token whichever count it had. On a GPU the filtered draw
    always runs and one ``lax.switch`` (one index read back per call) adds what the batch
    needs besides: the plain draw, the argmax, or the fallbacks (which read back one more
    index, more where a top-k was not exact). On the CPU each draw runs only where some
    row needs it.

    Args:
      key: PRNG key.
      logits: ``[B, V]`` raw logits.
      temperature: ``[B]`` or scalar float32.
      top_p: ``[B]`` or scalar.
      top_k: ``[B]`` or scalar int.
      max_candidates: static size of the candidate set for filtered rows.
      wide_candidates: static size of the second candidate set, for batches where
        some row's kept set is wider than its first (none where not above the first).
      hot_candidates: static size of the first candidate set of rows at or above
        ``hot_temperature`` (hotter rows keep wider nuclei); at most ``max_candidates``
        turns this off. 384: a hot row's CUDA top-k then sorts ~460 candidates, as few
        words (512) as a 256-candidate row's ~290; 512 hot candidates sorted 1024 words,
        +6.4 us a call at B = 8, and broke even (benchmarks/RESULTS.md AG3).
      hot_temperature: static float, see `HOT_TEMPERATURE`.

    Returns:
      ``[B]`` int32 tokens; ``INVALID_TOKEN`` (-1) for a row whose logits hold a
      NaN or ``+inf`` or no finite value, or whose temperature is NaN or
      infinite. No token is ever drawn from such a row.

    Raises:
      ValueError: ``max_candidates``, ``wide_candidates`` or ``hot_candidates`` not a
        positive int, or ``hot_temperature`` not a finite number.
    """
    logits = jnp.asarray(logits, jnp.float32)
    b = logits.shape[0]
    for name, n in (
        ("max_candidates", max_candidates),
        ("wide_candidates", wide_candidates),
        ("hot_candidates", hot_candidates),
    ):
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}")
    number = (int, float, np.integer, np.floating)
    if (
        isinstance(hot_temperature, bool)
        or not isinstance(hot_temperature, number)
        or not np.isfinite(hot_temperature)
    ):
        raise ValueError(f"hot_temperature must be a finite number, got {hot_temperature!r}")
    # Fixed dtypes and shapes here, so that Python scalars and arrays, weak
    # types or not, all share one compiled sampler per (B, V).
    return _sample(
        key,
        logits,
        _rows(temperature, b, jnp.float32),
        _rows(top_p, b, jnp.float32),
        _rows(top_k, b, jnp.int32),
        max_candidates=int(max_candidates),
        wide_candidates=int(wide_candidates),
        hot_candidates=int(hot_candidates),
        hot_temperature=float(hot_temperature),
    )


@functools.partial(
    jax.jit,
    static_argnames=(
        "max_candidates",
        "wide_candidates",
        "hot_candidates",
        "hot_temperature",
        "branchless",
    ),
)
def _sample(
    key,
    logits,
    t,
    top_p,
    top_k,
    *,
    max_candidates,
    wide_candidates=1024,
    hot_candidates=384,
    hot_temperature=HOT_TEMPERATURE,
    branchless=None,
):
    b, vocab = logits.shape
    valid = logits_valid(logits) & jnp.isfinite(t)
    greedy = t <= GREEDY_TEMPERATURE
    t_eff = jnp.where(greedy, 1.0, t)

    def scaled():
        """z = logits / t (1 for greedy rows), ``[B, V]`` float: computed inside each branch
        that needs it. On a GPU the candidates' path does not (`_scaled_top_k`), so a step
        that takes it never writes z out."""
        return logits / t_eff[:, None]

    k_eff = jnp.where((top_k <= 0) | (top_k >= vocab), vocab, top_k)
    plain = (k_eff >= vocab) & (top_p >= 1.0)
    drawn = valid & ~greedy
    need = drawn & ~plain
    key_plain, key_filtered = jax.random.split(key)
    zero = jnp.zeros((b,), jnp.int32)
    c_cold = min(max_candidates, vocab)
    c = max(c_cold, min(hot_candidates, vocab))  # the first candidates' width
    c_wide = min(wide_candidates, vocab)
    # Each row's own count of the first candidates: hot rows (only rows that draw filtered,
    # and not those whose top-k fits c_cold anyway) take c, the others c_cold; None where
    # the two are one. A row's token does not depend on its count where its kept set fits.
    counts = None
    if c > c_cold:
        hot = need & (t >= hot_temperature) & (k_eff > c_cold)
        counts = jnp.where(hot, c, c_cold).astype(jnp.int32)

    def draw_plain():
        return jax.random.categorical(key_plain, scaled(), axis=-1).astype(jnp.int32)

    def argmax():
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw_from(vals, idx, log_norm_all, counts=None):  # (token, whether each row fits)
        return _sample_candidates(
            key_filtered, vals, idx, k_eff, top_p, log_norm_all, vocab, counts
        )

    def full_sort(log_norm_all):  # the filtered draw from every token, sorted
        return draw_from(*_sorted_descending(scaled()), log_norm_all)[0]

    def all_fit(fits):  # every row that needs a filtered draw
        return jnp.all(fits | ~need)

    def draw_candidates():
        """The filtered draw from the top-c candidates, and whether it is exact for every
        row that needs it (no fallback)."""
        vals, idx, exact, log_norm_all = _scaled_top_k(logits, t_eff, c, rows=need, counts=counts)
        token, fits = draw_from(vals, idx, log_norm_all, counts)
        return token, exact & all_fit(fits), exact, log_norm_all

    def draw_exactly(exact, log_norm_all):
        """The filtered draw where `draw_candidates` was not exact: ``lax.top_k``'s
        candidates where the fast top-k was not; where a kept set reaches past them, the
        same from the ``c_wide`` best; past those, a full sort. The tokens the CPU form
        gives."""
        z = scaled()

        def draw_or(vals, idx, past, counts=None):
            """The draw from candidates ``vals``/``idx`` (a row from its first
            ``counts``), or ``past()`` where some kept set is wider than them."""
            tok, fits = draw_from(vals, idx, log_norm_all, counts)
            return jax.lax.cond(all_fit(fits), lambda: tok, past)

        sort = functools.partial(full_sort, log_norm_all)
        if c_wide <= c:
            wide = sort
        else:

            def wide():
                vals, idx, fast_exact, _ = _scaled_top_k(logits, t_eff, c_wide, rows=need)
                return jax.lax.cond(
                    fast_exact,
                    lambda: draw_or(vals, idx, sort),
                    lambda: draw_or(*jax.lax.top_k(z, c_wide), sort),
                )

        # Where the first candidates' top-k was exact, their draw did not fit: some kept
        # set is wider than them. Where it was not, lax.top_k's candidates first.
        return jax.lax.cond(exact, wide, lambda: draw_or(*jax.lax.top_k(z, c), wide, counts=counts))

    if branchless is None:
        branchless = jax.default_backend() == "gpu"
    if branchless:
        # On a GPU every lax.cond reads its predicate back to the host each token (~16 us
        # of idle GPU a step at B = 1, ~19 at B = 8, H200, RESULTS.md AC1), more than the
        # draws cost. So the candidates' draw runs for every batch, and one lax.switch,
        # whose index is the one value read back, runs what else the batch needs: the
        # plain draw over V (rows with both filters off), the argmax (greedy rows), or,
        # where the candidates did not hold every kept set, the exact fallback. Top-p
        # batches: -3 us a step at B = 1, -6 at B = 8 (RESULTS.md AC3); plain ones +1 / +4.
        token, ok, exact, log_norm_all = draw_candidates()

        # Which of the other draws the batch needs: 2 * (a plain row) + (a greedy row).
        mix = 2 * jnp.any(drawn & plain).astype(jnp.int32) + jnp.any(greedy).astype(jnp.int32)

        def branch(filtered, with_plain, with_greedy):
            def run():
                return (
                    draw_plain() if with_plain else zero,
                    filtered().astype(jnp.int32),
                    argmax() if with_greedy else zero,
                )

            return run

        def mixes(filtered):  # the four branches of one filtered draw, in `mix` order
            return [branch(filtered, p, g) for p in (False, True) for g in (False, True)]

        def fallback():
            """The exact fallback, behind one more readback, not draw_exactly's three nested
            conds, where the first candidates were exact and the wide ones are too (the
            common case): the wide candidates' draw where it holds every kept set (with
            only the other draws the batch needs), else the full sort. The same tokens:
            draw_exactly's wide draw and full sort are these. The sorts' branches run both
            other draws, so that each compiles once (GPU compile time, AD4)."""
            if c_wide <= c:
                return branch(lambda: draw_exactly(exact, log_norm_all), True, True)()
            vals, idx, wide_exact, _ = _scaled_top_k(logits, t_eff, c_wide, rows=need)
            tok_wide, fits = draw_from(vals, idx, log_norm_all)
            inner = [
                *mixes(lambda: tok_wide),
                branch(lambda: full_sort(log_norm_all), True, True),
                branch(lambda: draw_exactly(exact, log_norm_all), True, True),
            ]
            which = jnp.where(exact & wide_exact, jnp.where(all_fit(fits), mix, 4), 5)
            return jax.lax.switch(which, inner)

        branches = [*mixes(lambda: token), fallback]
        index = jnp.where(ok, mix, len(branches) - 1)
        tok_plain, tok_filtered, tok_greedy = jax.lax.switch(index, branches)
    else:
        # On the CPU the draws over V are the expensive part: skip what no row uses.

        def draw_filtered():
            tok, ok, exact, log_norm_all = draw_candidates()
            # The branch behind the predicate runs only where the candidates fell short.
            return jax.lax.cond(ok, lambda: tok, lambda: draw_exactly(exact, log_norm_all))

        tok_plain = jax.lax.cond(jnp.any(drawn & plain), draw_plain, lambda: zero)
        tok_filtered = jax.lax.cond(jnp.any(need), draw_filtered, lambda: zero)
        tok_greedy = argmax()
    token = jnp.where(
        greedy, tok_greedy, jnp.where(plain, tok_plain, tok_filtered.astype(jnp.int32))
    )
    return jnp.where(valid, token, INVALID_TOKEN).astype(jnp.int32)


def check_tokens(tokens: Any) -> None:
    """Host-side check after decoding: raises if any row hit unusable logits.

    Args:
      tokens: ``[..., T]`` generated tokens (NumPy or JAX), as the decode loop
        recorded them (``INVALID_TOKEN`` where ``sample`` refused).

    Raises:
      FloatingPointError: naming the first offending (row, position) pairs.
    """
    arr = np.asarray(tokens)
    bad = np.argwhere(arr == INVALID_TOKEN)
    if bad.size:
        shown = ", ".join(str(tuple(int(i) for i in row)) for row in bad[:8])
        raise FloatingPointError(
            f"the model produced unusable logits (NaN, +inf or all -inf) at {len(bad)} "
            f"position(s), first at (row, position): {shown}"
        )


# ----------------------------------------------------------------------------
# Host-side helpers
# ----------------------------------------------------------------------------


def step_boundary_ids(tokenizer: Any) -> tuple[np.ndarray, np.ndarray]:
    """Finds the step-boundary token ids of a Hugging Face tokenizer.

    Every id is decoded on its own (special tokens included, no clean-up).

    Args:
      tokenizer: a ``transformers`` tokenizer (``len(tokenizer)`` ids).

    Returns:
      ``(nl_ids, dnl_ids)``, sorted int32 arrays: ids whose text is exactly
      ``"\\n"``, and ids whose text contains ``"\\n\\n"``.
    """
    n = len(tokenizer)
    texts = tokenizer.batch_decode(
        [[i] for i in range(n)], skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    nl = [i for i, s in enumerate(texts) if s == "\n"]
    dnl = [i for i, s in enumerate(texts) if "\n\n" in s]
    return np.asarray(nl, np.int32), np.asarray(dnl, np.int32)


def calibrate_tau0(entropies: Any, percentile: float = 80) -> float:
    """The ``percentile``-th percentile of pooled token entropies (paper: 80).

    Args:
      entropies: one array of any shape, or a sequence of arrays (e.g. one per
        decoded problem), of token entropies in nats.
      percentile: in ``[0, 100]``; linear interpolation between order statistics.

    Returns:
      ``tau0`` as a Python float.

    Raises:
      ValueError: no entropies, a non-finite entropy, or a bad percentile.
    """
    if isinstance(entropies, (list, tuple)):
        parts = [np.asarray(e, np.float64).ravel() for e in entropies]
        pooled = np.concatenate(parts) if parts else np.zeros((0,))
    else:
        pooled = np.asarray(entropies, np.float64).ravel()
    if pooled.size == 0:
        raise ValueError("calibrate_tau0 needs at least one entropy; got none")
    if not np.isfinite(pooled).all():
        raise ValueError(
            f"calibrate_tau0 needs finite entropies; {int((~np.isfinite(pooled)).sum())} "
            "are NaN or infinite (rows with bad logits must be dropped first)"
        )
    if not 0 <= percentile <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    return float(np.percentile(pooled, percentile))
