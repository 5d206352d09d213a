"""The jitted decoding loop: prefill, then ``lax.while_loop`` over decode steps.

Everything a request varies is a traced argument, so a new value never
recompiles: the model parameters (``nnx.split`` state; the graph definition is
static), the sampler (`ReSETConfig` / `FixedTemperature` pytrees), per-row
top-p / top-k / seeds, the stop ids and the new-token limit. What is static is
only shapes: the batch, the prompt bucket P, the cache length T and the output
buffer N. `buckets` picks them so most new requests reuse a compiled loop.

Three jitted entry points share one step function:

* `prefill`: runs the (right-padded) prompts through the model, writes the
  cache, samples each row's first token from its last real position.
* `decode_loop`: ``lax.while_loop`` of `decode_step` until every row is done
  (stop id, new-token limit, full cache, bad logits, or the buffer is full).
  Each iteration runs ``sync_every`` steps in an inner loop of fixed length.
* `decode`: both in one program (no host transfer in between).

`prefill` and `decode`, called with concrete prompt lengths, first run
`check_prompt_lengths` (as `buckets` does): the one check that every prompt
fits the cache, with the error that names the row.

Benchmarks time `prefill` and `decode_loop` separately.

Why ``sync_every``: on a GPU, XLA runs a ``while_loop`` whose trip count it
cannot know by copying the loop condition to the host and waiting for it each
iteration, so the GPU sits idle while the host reads it and launches the next
body. A loop of fixed length needs no such wait (XLA's ``WhileThunk`` with a
known trip count). The outer loop therefore checks for "every row done" once
per ``sync_every`` steps. Steps after the last row finished change no record
(tokens, entropies, temperatures, lengths, step, done, error_step: those writes
are masked by the row's ``done``; only the sampler state and the cache slot
after each finished row's last token are rewritten); at most ``sync_every - 1``
such steps run per call.

Shapes: B batch, P prompt bucket, T cache slots, N output buffer, V vocabulary.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from reset_jax import sampling

__all__ = [
    "DEFAULT_SYNC_EVERY",
    "Buckets",
    "DecodeState",
    "SamplingKnobs",
    "buckets",
    "check_prompt_lengths",
    "decode",
    "decode_loop",
    "decode_step",
    "make_knobs",
    "prefill",
    "trace_counts",
]

# Incremented each time a function below is traced: a test (or a curious user)
# can check that a new request reused the compiled loop.
trace_counts: collections.Counter[str] = collections.Counter()

# Decode steps per host check of the loop condition (see the module docstring).
DEFAULT_SYNC_EVERY = 8
MIN_PROMPT_BUCKET = 16
MIN_NEW_BUCKET = 16
_STOP_IDS_BUCKET = 8


def _pow2_at_least(n: int, minimum: int) -> int:
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class Buckets:
    """Static sizes of one compiled loop.

    Attributes:
      prompt_len: P, the padded prompt length.
      max_new: N, the output buffer (the most new tokens a call can ask for).
      cache_len: T, the KV cache length.
    """

    prompt_len: int
    max_new: int
    cache_len: int


def check_prompt_lengths(
    prompt_lengths: Sequence[int] | np.ndarray, max_new_tokens: Any, cache_len: int
) -> None:
    """The one check that every prompt fits the cache (`buckets`, `prefill` and `decode` run it).

    A row needs at least one prompt token and, after its prompt, a cache slot
    for a new token: ``1 <= prompt_len < cache_len``. (A cache of T slots holds
    prompt + new tokens <= T; a row whose sequence fills the cache finishes
    with reason ``"cache"``.)

    Args:
      prompt_lengths: tokens per row.
      max_new_tokens: the requested new tokens (an int or a 0-d array; read
        only for the error message).
      cache_len: T, the cache length.

    Raises:
      ValueError: naming the first row that does not fit, its prompt length,
        max_new_tokens and the cache length.
    """
    lengths = np.asarray(prompt_lengths).reshape(-1)
    empty = np.flatnonzero(lengths < 1)
    if empty.size:
        raise ValueError(f"prompt {int(empty[0])} is empty: every prompt needs at least one token")
    too_long = np.flatnonzero(lengths >= cache_len)
    if too_long.size:
        row, m = int(too_long[0]), int(np.asarray(max_new_tokens))
        raise ValueError(
            f"prompt {row} has {int(lengths[row])} tokens, which leaves no room for a new token "
            f"in a cache of max_cache_len={cache_len} positions (max_new_tokens={m}); raise "
            f"max_cache_len to at least {int(lengths.max()) + m} (the longest prompt plus "
            "max_new_tokens) or shorten the prompt"
        )


def buckets(
    prompt_lengths: int | Sequence[int],
    max_new_tokens: int,
    max_cache_len: int | None = None,
) -> Buckets:
    """Static sizes for a request, rounded up so similar requests share a compile.

    P and N are powers of two (at least 16). The cache holds every prompt
    token and every new token, T = P + N, unless `max_cache_len` fixes it
    (then P is capped at T, since prefill writes all P slots). A row may fill
    every slot: prompt + new tokens == `max_cache_len` decodes all of them.

    Args:
      prompt_lengths: tokens per row of the batch (an int: one row, or the
        longest prompt).
      max_new_tokens: the requested number of new tokens.
      max_cache_len: an explicit cache length, or None.

    Returns:
      The `Buckets`.

    Raises:
      ValueError: a bad `max_new_tokens`, or a prompt that is empty or leaves
        no room for a new token (see `check_prompt_lengths`).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    lengths = np.asarray(prompt_lengths, np.int64).reshape(-1)
    if lengths.size == 0:
        raise ValueError("no prompts given")
    max_prompt_len = int(lengths.max())
    p = _pow2_at_least(max_prompt_len, MIN_PROMPT_BUCKET)
    n = _pow2_at_least(max_new_tokens, MIN_NEW_BUCKET)
    t = p + n if max_cache_len is None else int(max_cache_len)
    check_prompt_lengths(lengths, max_new_tokens, t)
    return Buckets(min(p, t), n, t)


@struct.dataclass
class SamplingKnobs:
    """Per-request settings, all traced.

    Attributes:
      top_p: ``[B]`` float32 nucleus mass (1 = off).
      top_k: ``[B]`` int32 (0 = off).
      seed: ``[]`` uint32; step t draws with ``fold_in(key(seed), t)``.
      stop_ids: ``[S]`` int32 ids that end a row (padded with -1).
      max_new_tokens: ``[]`` int32 limit, at most the buffer size N.
    """

    top_p: jax.Array
    top_k: jax.Array
    seed: jax.Array
    stop_ids: jax.Array
    max_new_tokens: jax.Array


def make_knobs(
    batch: int,
    *,
    top_p: float | Any = 1.0,
    top_k: int | Any = 0,
    seed: int = 0,
    stop_ids: Any = (),
    max_new_tokens: int,
) -> SamplingKnobs:
    """Build `SamplingKnobs`, broadcasting scalars to the batch.

    Args:
      batch: B.
      top_p, top_k: a scalar for every row or a sequence of B values.
      seed: the random seed of the whole batch.
      stop_ids: ids that end a row; padded to a multiple of 8 with -1 so a
        different count rarely changes the shape.
      max_new_tokens: the new-token limit.

    Returns:
      The knobs as device arrays.
    """
    raw = np.asarray(stop_ids).reshape(-1)
    if raw.size and (not np.issubdtype(raw.dtype, np.integer) or (raw < 0).any()):
        raise ValueError(f"stop_ids must be non-negative integer token ids, got {raw.tolist()}")
    stops = sorted({int(s) for s in raw})
    width = max(_STOP_IDS_BUCKET, -(-len(stops) // _STOP_IDS_BUCKET) * _STOP_IDS_BUCKET)
    stop_arr = np.full((width,), -1, np.int32)
    stop_arr[: len(stops)] = stops

    def rows(x, dtype):
        x = np.asarray(x, dtype)
        if x.ndim == 0:
            x = np.full((batch,), x, dtype)
        if x.shape != (batch,):
            raise ValueError(f"expected a scalar or {batch} values, got shape {x.shape}")
        return x

    top_p_rows, top_k_rows = rows(top_p, np.float32), rows(top_k, np.int32)
    if not (np.isfinite(top_p_rows).all() and (top_p_rows >= 0).all() and (top_p_rows <= 1).all()):
        raise ValueError(f"top_p must be in [0, 1], got {top_p_rows.tolist()}")
    if (top_k_rows < 0).any():
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k_rows.tolist()}")
    return SamplingKnobs(
        top_p=jnp.asarray(top_p_rows),
        top_k=jnp.asarray(top_k_rows),
        seed=jnp.asarray(int(seed) % (1 << 32), jnp.uint32),
        stop_ids=jnp.asarray(stop_arr),
        max_new_tokens=jnp.asarray(max_new_tokens, jnp.int32),
    )


@struct.dataclass
class DecodeState:
    """Everything the loop carries; the host reads it once, at the end.

    Attributes:
      step: ``[]`` int32, decode steps taken while some row was active (the
        next column of the output buffers; steps after every row finished do
        not count).
      done: ``[B]`` bool: the row hit a stop id, its limit, a full cache or a
        full output buffer, or its logits were unusable.
      last_token: ``[B]`` int32, the newest token, fed to the next step.
      positions: ``[B]`` int32, the cache slot `last_token` is written to.
      prompt_lens: ``[B]`` int32.
      cache: the model's ``KVCache`` ``[L, B, T, Hkv, Dh]``.
      rng: the batch's PRNG key.
      sampler_state: the sampler's per-row state.
      tokens: ``[B, N]`` int32 generated ids (-1 past a row's length).
      entropies: ``[B, N]`` float32 entropy (nats) of the raw logits of each token.
      temperatures: ``[B, N]`` float32 temperature each token was sampled at.
      lengths: ``[B]`` int32 tokens generated per row (stop ids included).
      error_step: ``[B]`` int32, the step whose logits were NaN, +inf or all -inf
        (the row stopped there), or -1.
    """

    step: jax.Array
    done: jax.Array
    last_token: jax.Array
    positions: jax.Array
    prompt_lens: jax.Array
    cache: Any
    rng: jax.Array
    sampler_state: Any
    tokens: jax.Array
    entropies: jax.Array
    temperatures: jax.Array
    lengths: jax.Array
    error_step: jax.Array


def _advance(
    state: DecodeState, logits: jax.Array, sampler: Any, knobs: SamplingKnobs
) -> DecodeState:
    """Choose temperatures, sample, record, and update `done` for one token per row.

    Args:
      state: the state before this token; `state.step` is its column.
      logits: ``[B, V]`` float32 raw logits at each row's newest position.
      sampler: the sampler rule pytree.
      knobs: per-request settings.

    Returns:
      The state with the token appended to every active row.
    """
    sampler_state, temperature, entropy = sampling.step(sampler, state.sampler_state, logits)
    # One key per step for the whole batch: `sample` draws every row at once
    # (vmapping it per row would turn its lax.switch / lax.conds into always-taken selects).
    key = jax.random.fold_in(state.rng, state.step)
    token = sampling.sample(key, logits, temperature, top_p=knobs.top_p, top_k=knobs.top_k)
    sampler_state = sampling.observe(sampler, sampler_state, token)

    active = ~state.done
    bad = token < 0  # the sampler's mark for NaN / all -inf logits
    ok = active & ~bad
    n = state.tokens.shape[1]
    # Each active row writes its value at column `step` (below N: the buffer-full rule
    # below ends a row at the last column); a finished row's index is N, out of range, so
    # its write is dropped. One scatter a buffer, which reads nothing back (a masked
    # column write was a read and a write: two kernels a buffer on a GPU).
    rows = jnp.arange(state.tokens.shape[0])
    col = jnp.where(active, state.step, n)

    def put(buf, value):
        return buf.at[rows, col].set(
            value, mode="drop", unique_indices=True, indices_are_sorted=True
        )

    lengths = state.lengths + ok.astype(jnp.int32)
    # -1 pads the stop ids (and marks a bad token): never a match.
    is_stop = jnp.any((token[:, None] == knobs.stop_ids[None, :]) & (knobs.stop_ids >= 0), axis=-1)
    cache_len = state.cache.max_len
    finished = (
        bad
        | is_stop
        | (lengths >= knobs.max_new_tokens)
        # The sequence (prompt + new tokens) now fills the cache.
        | (state.prompt_lens + lengths >= cache_len)
        # The output buffer is full.
        | (state.step + 1 >= n)
    )
    return state.replace(
        step=state.step + jnp.any(active).astype(jnp.int32),
        done=state.done | (active & finished),
        last_token=jnp.where(ok, token, state.last_token),
        positions=state.positions + ok.astype(jnp.int32),
        sampler_state=sampler_state,
        tokens=put(state.tokens, jnp.where(bad, -1, token)),
        entropies=put(state.entropies, entropy),
        temperatures=put(state.temperatures, temperature),
        lengths=lengths,
        error_step=jnp.where(active & bad, state.step, state.error_step),
    )


def _prefill(graphdef, params, prompt_ids, prompt_lens, cache, sampler, knobs, max_new):
    model = nnx.merge(graphdef, params)
    b, p = prompt_ids.shape
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    hidden, cache = model.forward(prompt_ids, positions, cache)  # [B, P, D]
    # lm_head only at each row's last real token: [B, D] -> [B, V], not [B, P, V].
    last = jnp.take_along_axis(hidden, (prompt_lens - 1)[:, None, None], axis=1)[:, 0]
    logits = model.logits(last)

    state = DecodeState(
        step=jnp.zeros((), jnp.int32),
        done=jnp.zeros((b,), bool),
        last_token=jnp.zeros((b,), jnp.int32),
        # The first sampled token will sit right after the prompt.
        positions=prompt_lens.astype(jnp.int32) - 1,
        prompt_lens=prompt_lens.astype(jnp.int32),
        cache=cache,
        rng=jax.random.key(knobs.seed),
        sampler_state=sampling.init_state(sampler, b),
        tokens=jnp.full((b, max_new), -1, jnp.int32),
        entropies=jnp.zeros((b, max_new), jnp.float32),
        temperatures=jnp.zeros((b, max_new), jnp.float32),
        lengths=jnp.zeros((b,), jnp.int32),
        error_step=jnp.full((b,), -1, jnp.int32),
    )
    return _advance(state, logits, sampler, knobs)


def decode_step(graphdef, params, state: DecodeState, sampler, knobs: SamplingKnobs) -> DecodeState:
    """One decode step (traceable): feed `last_token`, sample the next one.

    Args:
      graphdef: the model's ``nnx`` graph definition.
      params: the model's ``nnx`` state.
      state: the loop state.
      sampler: the sampler rule pytree.
      knobs: per-request settings.

    Returns:
      The next state.
    """
    model = nnx.merge(graphdef, params)
    cache_len = state.cache.max_len
    # A finished row may point past the cache; its write lands on its own
    # (unused) last slot instead.
    pos = jnp.minimum(state.positions, cache_len - 1)[:, None]  # [B, 1]
    hidden, cache = model.forward(state.last_token[:, None], pos, state.cache)  # [B, 1, D]
    logits = model.logits(hidden[:, 0])  # [B, V] float32
    return _advance(state.replace(cache=cache), logits, sampler, knobs)


def _check_sync_every(sync_every: int) -> None:
    if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1:
        raise ValueError(f"sync_every must be an int >= 1, got {sync_every!r}")


def _loop(graphdef, params, state, sampler, knobs, sync_every):
    _check_sync_every(sync_every)
    n = state.tokens.shape[1]

    def cond(s):
        return (s.step < n) & ~jnp.all(s.done)

    def step(s):
        return decode_step(graphdef, params, s, sampler, knobs)

    def body(s):
        if sync_every == 1:
            return step(s)
        # Static bounds: a loop of known trip count, which XLA runs without reading
        # anything back to the host.
        return jax.lax.fori_loop(0, sync_every, lambda _, s: step(s), s)

    return jax.lax.while_loop(cond, body, state)


def _checks_prompts(jitted):
    """`jitted` (`prefill` or `decode`), first running `check_prompt_lengths` on
    concrete prompt lengths; ``.lower`` and the rest of the jit API pass through.

    Under an outer trace the lengths are not known, and the check is the caller's.
    ``entry.unchecked`` is ``jitted`` itself, for a caller that has already run
    the check on the same lengths and cache (``generate``, through ``buckets``):
    it skips reading device-resident lengths back to the host.
    """

    @functools.wraps(jitted, updated=())
    def entry(graphdef, params, prompt_ids, prompt_lens, cache, sampler, knobs, *, max_new, **kw):
        try:
            lens = np.asarray(prompt_lens)
        except jax.errors.TracerArrayConversionError:  # under an outer jit: the caller checks
            lens = None
        if lens is not None:
            check_prompt_lengths(lens, knobs.max_new_tokens, cache.max_len)
        return jitted(
            graphdef, params, prompt_ids, prompt_lens, cache, sampler, knobs, max_new=max_new, **kw
        )

    for name in ("lower", "trace", "eval_shape", "clear_cache"):
        if hasattr(jitted, name):
            setattr(entry, name, getattr(jitted, name))
    entry.unchecked = jitted
    return entry


@_checks_prompts
@functools.partial(jax.jit, static_argnames=("graphdef", "max_new"), donate_argnames=("cache",))
def prefill(graphdef, params, prompt_ids, prompt_lens, cache, sampler, knobs, *, max_new):
    """Prefill the cache and sample each row's first token.

    Args:
      graphdef: the model's ``nnx`` graph definition (static).
      params: the model's ``nnx`` state (traced).
      prompt_ids: ``[B, P]`` int32, right-padded.
      prompt_lens: ``[B]`` int32, each in ``1..P`` and below T.
      cache: an empty ``KVCache`` with ``T >= P`` (donated).
      sampler: `ReSETConfig` or `FixedTemperature` (traced).
      knobs: `SamplingKnobs` (traced).
      max_new: N, the output buffer size (static).

    Returns:
      The `DecodeState` after one token per row.

    Raises:
      ValueError: a prompt that is empty or does not fit the cache
        (`check_prompt_lengths`; only when called with concrete prompt lengths,
        not under an outer ``jit``; ``prefill.lower`` checks nothing).
    """
    trace_counts["prefill"] += 1
    return _prefill(graphdef, params, prompt_ids, prompt_lens, cache, sampler, knobs, max_new)


@functools.partial(jax.jit, static_argnames=("graphdef", "sync_every"), donate_argnames=("state",))
def decode_loop(graphdef, params, state, sampler, knobs, *, sync_every=DEFAULT_SYNC_EVERY):
    """Run decode steps until every row is done or the buffer is full.

    Args:
      graphdef: the model's ``nnx`` graph definition (static).
      params: the model's ``nnx`` state (traced).
      state: the `DecodeState` from `prefill` (donated: its cache is updated in place).
      sampler: the same sampler passed to `prefill`.
      knobs: the same knobs passed to `prefill`.
      sync_every: decode steps between two checks of "every row done" (static;
        1 checks after every step). Larger values save the GPU's wait for the
        host per step and may run up to ``sync_every - 1`` steps that change
        nothing after the last row finished.

    Returns:
      The final `DecodeState`. Its records (``tokens``, ``entropies``,
      ``temperatures``, ``lengths``, ``step``, ``done``, ``error_step``) are
      the same for every ``sync_every``; the sampler state and the cache slot
      after each finished row's last token may differ.

    Raises:
      ValueError: ``sync_every`` is not an int >= 1.
    """
    trace_counts["decode_loop"] += 1
    return _loop(graphdef, params, state, sampler, knobs, sync_every)


@_checks_prompts
@functools.partial(
    jax.jit, static_argnames=("graphdef", "max_new", "sync_every"), donate_argnames=("cache",)
)
def decode(
    graphdef,
    params,
    prompt_ids,
    prompt_lens,
    cache,
    sampler,
    knobs,
    *,
    max_new,
    sync_every=DEFAULT_SYNC_EVERY,
):
    """Prefill and decode in one program, returning the final `DecodeState`.

    Takes the arguments of `prefill` (and raises its `ValueError`) and
    `decode_loop`'s ``sync_every``.
    """
    trace_counts["decode"] += 1
    state = _prefill(graphdef, params, prompt_ids, prompt_lens, cache, sampler, knobs, max_new)
    return _loop(graphdef, params, state, sampler, knobs, sync_every)
