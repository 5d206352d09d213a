"""`generate`: tokenize, bucket, run the jitted decode loop, detokenize.

The default sampler is the paper's baseline, a fixed temperature of 0.6:
ReSET needs a ``tau0`` (and ``t_low``) calibrated per model, which a library
default cannot know. Build a ReSET sampler for a tokenizer with
`reset_config_for`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from reset_jax import decode as dec
from reset_jax import sampling

__all__ = [
    "DEFAULT_TEMPERATURE",
    "BadLogitsError",
    "GenerationResult",
    "Timing",
    "generate",
    "reset_config_for",
]

DEFAULT_TEMPERATURE = 0.6


@dataclasses.dataclass(frozen=True)
class Timing:
    """Wall-clock account of one `generate` call.

    Attributes:
      prefill_s: the prompt pass and the first token, excluding compilation.
      decode_s: the decode loop (every token after the first), excluding compilation.
      compile_s: tracing and compiling; 0 when the loop was already compiled.
      new_tokens: tokens generated over all rows, stop ids included.
      tokens_per_s: decode-loop throughput over all rows,
        ``(new_tokens - first tokens) / decode_s`` (0 when nothing was decoded).
    """

    prefill_s: float
    decode_s: float
    compile_s: float
    new_tokens: int
    tokens_per_s: float


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """What `generate` returns; every per-row list is trimmed to that row's length.

    Attributes:
      texts: the decoded continuations (special tokens and the stop id dropped).
      token_ids: generated ids per row, a final stop id included.
      entropies: entropy (nats) of the raw logits at each generated token.
      temperatures: the temperature each token was sampled at.
      prompt_lengths: prompt tokens per row, after the chat template.
      finish_reasons: per row ``"stop"`` (a stop id), ``"length"``
        (max_new_tokens) or ``"cache"`` (the KV cache is full).
      timing: `Timing`.
    """

    texts: list[str]
    token_ids: list[list[int]]
    entropies: list[np.ndarray]
    temperatures: list[np.ndarray]
    prompt_lengths: list[int]
    finish_reasons: list[str]
    timing: Timing


class BadLogitsError(FloatingPointError):
    """The model produced NaN, +inf or all -inf logits for some row."""


_BOUNDARY_IDS: dict[int, tuple[Any, tuple[np.ndarray, np.ndarray]]] = {}


def _boundary_ids(tokenizer: Any) -> tuple[np.ndarray, np.ndarray]:
    # Decoding the whole vocabulary takes a moment; keep the answer per
    # tokenizer object (holding a reference so the id cannot be reused).
    hit = _BOUNDARY_IDS.get(id(tokenizer))
    if hit is None or hit[0] is not tokenizer:
        hit = (tokenizer, sampling.step_boundary_ids(tokenizer))
        _BOUNDARY_IDS[id(tokenizer)] = hit
    return hit[1]


def reset_config_for(
    tokenizer: Any, *, t_low: float, tau0: float, t_high: float = 1.0, window: int = 32
) -> sampling.ReSETConfig:
    """A `ReSETConfig` whose step-boundary ids come from `tokenizer`.

    Args:
      tokenizer: a `transformers` tokenizer.
      t_low: temperature for tokens below the threshold.
      tau0: entropy threshold (nats) outside uncertain steps.
      t_high: temperature at or above the threshold.
      window: the sliding window length.

    Returns:
      The config.
    """
    nl, dnl = _boundary_ids(tokenizer)
    return sampling.ReSETConfig.create(
        t_high=t_high, t_low=t_low, tau0=tau0, window=window, nl_ids=nl, dnl_ids=dnl
    )


def _encode(tokenizer: Any, prompt: Any, chat: bool) -> list[int]:
    if not isinstance(prompt, str):
        return [int(t) for t in prompt]  # already token ids
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; pass chat=False for plain text")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        # The template already holds every special token it needs.
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode(prompt))


def _stop_ids(model: Any, tokenizer: Any, stop_ids: Sequence[int] | None) -> list[int]:
    if stop_ids is not None:
        return [int(s) for s in stop_ids]
    ids = list(getattr(model.config, "eos_token_ids", ()) or ())
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and eos not in ids:
        ids.append(int(eos))
    return ids


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    jax.block_until_ready(out)
    return out, time.perf_counter() - t0


def _compile(prefill_args: tuple, loop_args: tuple, max_new: int, sync_every: int) -> float:
    """Compile prefill and the decode loop ahead of the timed calls, side by side.

    The loop is lowered against prefill's output shapes, so both XLA compiles
    (the slow part: the layer loop is unrolled) run at once in two threads. The
    jitted functions then find them in their caches.

    Returns:
      Seconds spent (about 0 when both were compiled before).
    """
    t0 = time.perf_counter()
    lowered_prefill = dec.prefill.lower(*prefill_args, max_new=max_new)
    lowered_loop = dec.decode_loop.lower(
        *loop_args[:2], lowered_prefill.out_info, *loop_args[2:], sync_every=sync_every
    )
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for f in [pool.submit(lowered.compile) for lowered in (lowered_prefill, lowered_loop)]:
            f.result()
    return time.perf_counter() - t0


def generate(
    model: Any,
    tokenizer: Any,
    prompts: str | Sequence[str] | Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 256,
    sampler: sampling.ReSETConfig | sampling.FixedTemperature | None = None,
    top_p: float | Sequence[float] = 0.95,
    top_k: int | Sequence[int] = 0,
    seed: int = 0,
    chat: bool = True,
    max_cache_len: int | None = None,
    stop_ids: Sequence[int] | None = None,
    sync_every: int = dec.DEFAULT_SYNC_EVERY,
) -> GenerationResult:
    """Generate continuations for a batch of prompts in one jitted loop.

    Args:
      model: a `reset_jax.models` causal LM (``forward``, ``logits``, ``init_cache``).
      tokenizer: its `transformers` tokenizer.
      prompts: one string, a list of strings, or a list of token-id lists
        (used as is: no template, no special tokens added).
      max_new_tokens: the most new tokens per row.
      sampler: `sampling.ReSETConfig` (see `reset_config_for`) or
        `sampling.FixedTemperature`; None means ``FixedTemperature(0.6)``, the
        paper's baseline. ``FixedTemperature(0.0)`` is greedy.
      top_p: nucleus mass after the temperature, for all rows or per row.
      top_k: top-k (0 = off), for all rows or per row.
      seed: random seed of the batch.
      chat: wrap each string prompt as a user turn with the tokenizer's chat
        template (and the assistant prefix).
      max_cache_len: KV cache positions (prompt + new tokens); default: enough
        for the longest prompt and `max_new_tokens`, rounded up to a bucket. A
        row stops (reason ``"cache"``) when its prompt and new tokens fill it;
        prompt + `max_new_tokens` == `max_cache_len` decodes every new token.
      stop_ids: ids that end a row; default: the model's EOS ids and the
        tokenizer's EOS id.
      sync_every: decode steps per check of "every row done" (`decode.decode_loop`).

    Returns:
      A `GenerationResult`.

    Raises:
      ValueError: an empty prompt, or a prompt that leaves no room in the
        cache for a new token (the message names the row, its length after
        tokenization and the chat template, max_new_tokens and the cache
        length; `decode.check_prompt_lengths`).
      BadLogitsError: the model produced unusable logits; the message names
        the row and the step.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    encoded = [_encode(tokenizer, p, chat) for p in prompts]
    lengths = [len(e) for e in encoded]  # after tokenization and the chat template
    # Checks every row (empty, or no room in the cache) before anything compiles.
    sizes = dec.buckets(lengths, max_new_tokens, max_cache_len)
    batch = len(encoded)
    ids = np.zeros((batch, sizes.prompt_len), np.int32)
    for row, e in enumerate(encoded):
        ids[row, : len(e)] = e
    if sampler is None:
        sampler = sampling.FixedTemperature.create(DEFAULT_TEMPERATURE)
    knobs = dec.make_knobs(
        batch,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop_ids=_stop_ids(model, tokenizer, stop_ids),
        max_new_tokens=max_new_tokens,
    )

    graphdef, params = nnx.split(model)
    prompt_ids = jax.numpy.asarray(ids)
    prompt_lens = jax.numpy.asarray(np.asarray(lengths, np.int32))
    cache = model.init_cache(batch, sizes.cache_len)
    prefill_args = (graphdef, params, prompt_ids, prompt_lens, cache, sampler, knobs)
    compile_s = _compile(
        prefill_args, (graphdef, params, sampler, knobs), sizes.max_new, sync_every
    )
    # buckets() above checked these lengths against this cache length.
    state, prefill_s = _timed(dec.prefill.unchecked, *prefill_args, max_new=sizes.max_new)
    state, decode_s = _timed(
        dec.decode_loop, graphdef, params, state, sampler, knobs, sync_every=sync_every
    )

    out = jax.device_get(
        {
            "tokens": state.tokens,
            "entropies": state.entropies,
            "temperatures": state.temperatures,
            "lengths": state.lengths,
            "error_step": state.error_step,
        }
    )
    bad_rows = np.flatnonzero(out["error_step"] >= 0)
    if bad_rows.size:
        where = ", ".join(f"row {r} at new token {out['error_step'][r]}" for r in bad_rows[:8])
        raise BadLogitsError(
            f"the model produced unusable logits (NaN, +inf or all -inf): {where}. "
            "Check the checkpoint and dtype (try dtype=float32)."
        )

    stops = {int(s) for s in np.asarray(knobs.stop_ids) if s >= 0}
    texts, token_ids, entropies, temperatures, reasons = [], [], [], [], []
    for row in range(batch):
        n = int(out["lengths"][row])
        toks = [int(t) for t in out["tokens"][row, :n]]
        token_ids.append(toks)
        entropies.append(out["entropies"][row, :n].copy())
        temperatures.append(out["temperatures"][row, :n].copy())
        stopped = n > 0 and toks[-1] in stops
        texts.append(tokenizer.decode(toks[:-1] if stopped else toks, skip_special_tokens=True))
        if stopped:
            reasons.append("stop")
        elif n >= max_new_tokens:
            reasons.append("length")
        else:
            reasons.append("cache")
    new_tokens = int(out["lengths"].sum())
    decoded = new_tokens - int((out["lengths"] > 0).sum())
    timing = Timing(
        prefill_s=prefill_s,
        decode_s=decode_s,
        compile_s=compile_s,
        new_tokens=new_tokens,
        tokens_per_s=decoded / decode_s if decoded and decode_s > 0 else 0.0,
    )
    return GenerationResult(
        texts=texts,
        token_ids=token_ids,
        entropies=entropies,
        temperatures=temperatures,
        prompt_lengths=lengths,
        finish_reasons=reasons,
        timing=timing,
    )
