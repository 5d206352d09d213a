"""ReSET sampler against the per-request PyTorch reference, and the sampler around it."""

from __future__ import annotations

import functools
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference.torch_reset import TorchReSETRequest, reference_replay, torch_entropy

from reset_jax import sampling as S

NL, DNL = 1, 2  # token ids used as "\n" and ".\n\n" in the synthetic sequences
T_HIGH, T_LOW = 1.0, 0.25


# ----------------------------------------------------------------------------
# Synthetic sequences
# ----------------------------------------------------------------------------


def _tokens(rng: np.random.Generator, length: int, vocab: int) -> np.ndarray:
    """Steps of many lengths (1-3, 4-31, 32-150) separated by every boundary form.

    Inside steps, lone "\\n" tokens appear too (they are not boundaries).
    """
    out: list[int] = []
    ordinary = np.arange(3, vocab)
    while len(out) < length:
        kind = rng.random()
        n = int(
            rng.integers(1, 4)
            if kind < 0.3
            else rng.integers(4, 32)
            if kind < 0.7
            else rng.integers(32, 151)
        )
        body = rng.choice(ordinary, size=n)
        lone = rng.random(n) < 0.05
        body[lone] = NL
        # A lone NL right before the terminator could merge with it; that is
        # fine, it just makes another boundary form.
        out.extend(body.tolist())
        end = rng.random()
        out.extend([DNL] if end < 0.4 else [NL, NL] if end < 0.8 else [NL, NL, NL])
    return np.asarray(out[:length], np.int64)


def _logits(rng: np.random.Generator, length: int, vocab: int) -> np.ndarray:
    """Runs of peaked and flat rows, so step entropies differ from the running mean."""
    scale = np.empty(length, np.float32)
    i = 0
    while i < length:
        n = int(rng.integers(5, 120))
        level = np.exp(rng.uniform(np.log(0.1), np.log(8.0)))
        scale[i : i + n] = level * np.exp(rng.normal(0.0, 0.8, size=min(n, length - i)))
        i += n
    z = rng.standard_normal((length, vocab), dtype=np.float32)
    return z * scale[:, None]


@functools.lru_cache(maxsize=4)
def _sequence(vocab: int, length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return _logits(rng, length, vocab), _tokens(rng, length, vocab)


def _tau0_for(logits: np.ndarray) -> float:
    """A float32-exact tau0 near the 60th entropy percentile (both sides occur)."""
    h = np.asarray(S.token_entropy(logits[:400]))
    return float(np.float32(np.percentile(h, 60)))


def _step_lengths(decisions) -> list[int]:
    lengths, n = [], 0
    for d in decisions:
        if d.boundary:
            lengths.append(n)
            n = 0
        n += 1
    return [*lengths, n]


# ----------------------------------------------------------------------------
# Decision-for-decision comparison
# ----------------------------------------------------------------------------


def _assert_same_decisions(decisions, temperature, entropy, info, window, t_high, t_low):
    """Every decision equal to the reference's, near-ties to float32 entropy noise aside.

    The reference measures entropy with torch's float32 reductions, which at
    V = 32k are off by up to ~7e-6 relative (our compensated sums are ~3e-7).
    A comparison whose reference margin is within that noise is decided by
    rounding, not by the rule, so it is excluded; the tolerance is twice the
    largest entropy gap seen on the sequence plus one float32 rounding, and the
    number excluded is returned (expected ~0). Exact ties (margin 0.0, the
    window/H_bar tie) are never excluded: they must match exactly.
    """
    temperature = np.asarray(temperature)
    entropy = np.asarray(entropy)
    ref_h = np.array([d.entropy for d in decisions])
    scale = np.maximum(1.0, np.abs(ref_h))
    gap = np.abs(entropy - ref_h)
    assert np.all(gap <= 2e-5 * scale), f"entropy gap {np.max(gap / scale):.3g} relative"
    eps_h = float(gap.max())

    def near(a, b):
        tol = 2 * eps_h + 2.0**-22 * max(1.0, abs(a), abs(b))
        return 0.0 < abs(a - b) <= tol

    excluded = np.array([near(d.h_step, d.h_bar) or near(d.entropy, d.tau) for d in decisions])
    ref_t = np.array([d.temperature for d in decisions], np.float32)
    ref_u = np.array([d.uncertain for d in decisions])
    ref_b = np.array([d.boundary for d in decisions])
    keep = ~excluded
    np.testing.assert_array_equal(np.asarray(info.boundary), ref_b)
    bad_u = np.flatnonzero((np.asarray(info.uncertain) != ref_u) & keep)
    bad_t = np.flatnonzero((temperature != ref_t) & keep)
    assert bad_u.size == 0, f"uncertain differs at positions {bad_u[:10]}"
    assert bad_t.size == 0, f"temperature differs at positions {bad_t[:10]}"
    # The estimates themselves agree to the entropy noise.
    ref_step = np.array([d.h_step for d in decisions])
    ref_bar = np.array([d.h_bar for d in decisions])
    np.testing.assert_allclose(np.asarray(info.h_step), ref_step, rtol=2e-5, atol=2 * eps_h + 1e-7)
    np.testing.assert_allclose(np.asarray(info.h_bar), ref_bar, rtol=2e-5, atol=2 * eps_h + 1e-7)

    # The sequence exercised everything: both temperatures in both branches.
    assert ref_u.any() and (~ref_u).any()
    for branch in (ref_u, ~ref_u):
        assert (ref_t[branch] == np.float32(t_high)).any()
        assert (ref_t[branch] == np.float32(t_low)).any()
    # Uncertain decisions came both from mean(step) and from mean(window).
    from_step = np.array([d.from_step for d in decisions])
    assert (ref_u & from_step).any() and (ref_u & ~from_step).any()
    assert len(_step_lengths(decisions)) > 20
    assert excluded.sum() <= max(2, len(decisions) // 500)
    return int(excluded.sum())


@pytest.mark.parametrize(
    "vocab, window, length",
    [
        (7, 1, 6000),
        (7, 4, 6000),
        (7, 32, 6000),
        (1000, 1, 2000),
        (1000, 4, 2000),
        (1000, 32, 2000),
        (32000, 4, 600),
        (32000, 32, 600),
    ],
)
def test_replay_matches_reference(vocab, window, length):
    logits, tokens = _sequence(vocab, length, seed=vocab)
    tau0 = _tau0_for(logits)
    cfg = dict(t_high=T_HIGH, t_low=T_LOW, tau0=tau0, window=window, nl_ids=[NL], dnl_ids=[DNL])
    decisions = reference_replay(torch.from_numpy(logits), tokens.tolist(), **cfg)
    temperature, entropy, info = S.replay(
        S.ReSETConfig.create(**cfg), logits, tokens, return_info=True
    )
    n = _assert_same_decisions(decisions, temperature, entropy, info, window, T_HIGH, T_LOW)
    print(f"V={vocab} w={window}: {n} of {length} near-ties excluded")


def test_batched_rows_with_own_knobs_match_reference():
    """Four different sequences in one [B, V] step per position, per-row knobs."""
    b, length, vocab, window = 4, 2000, 1000, 8
    rng = np.random.default_rng(7)
    logits = np.stack([_logits(rng, length, vocab) for _ in range(b)])
    tokens = np.stack([_tokens(rng, length, vocab) for _ in range(b)])
    t_high = [1.0, 0.9, 1.2, 0.7]
    t_low = [0.1, 0.3, 0.0, 0.5]
    tau0 = [float(np.float32(v)) for v in (5.5, 6.0, 6.3, 4.0)]
    rule = S.ReSETConfig.create(
        t_high=t_high, t_low=t_low, tau0=tau0, window=window, nl_ids=[NL], dnl_ids=[DNL]
    )
    temperature, entropy, info = S.replay(rule, logits, tokens, return_info=True)
    assert temperature.shape == (b, length)
    for r in range(b):
        decisions = reference_replay(
            torch.from_numpy(logits[r]),
            tokens[r].tolist(),
            t_high=t_high[r],
            t_low=t_low[r],
            tau0=tau0[r],
            window=window,
            nl_ids=[NL],
            dnl_ids=[DNL],
        )
        row_info = S.StepInfo(*(x[r] for x in info))
        n = _assert_same_decisions(
            decisions, temperature[r], entropy[r], row_info, window, t_high[r], t_low[r]
        )
        print(f"batched row {r}: {n} of {length} near-ties excluded")


def test_decode_loop_protocol_under_while_loop():
    """step -> sample -> observe inside a jitted lax.while_loop, checked token by token."""
    b, length, vocab, window = 3, 300, 12, 4
    rng = np.random.default_rng(3)
    logits = np.stack([_logits(rng, length, vocab) for _ in range(b)], axis=1)  # [T, B, V]
    logits[:, :, NL] += 2.5  # newlines get sampled often, so boundaries happen
    logits[:, :, DNL] += 1.0
    rule = S.ReSETConfig.create(t_low=0.3, tau0=1.2, window=window, nl_ids=[NL], dnl_ids=[DNL])

    @jax.jit
    def decode(rule, logits, key):
        def body(carry):
            t, state, key, toks, temps = carry
            key, sub = jax.random.split(key)
            state, temp, _ = S.step(rule, state, logits[t])
            tok = S.sample(sub, logits[t], temp, top_p=0.95)
            state = S.observe(rule, state, tok)
            return t + 1, state, key, toks.at[t].set(tok), temps.at[t].set(temp)

        init = (
            0,
            S.init_state(rule, b),
            key,
            jnp.zeros((length, b), jnp.int32),
            jnp.zeros((length, b), jnp.float32),
        )
        return jax.lax.while_loop(lambda c: c[0] < length, body, init)[3:]

    toks, temps = decode(rule, jnp.asarray(logits), jax.random.key(0))
    toks, temps = np.asarray(toks), np.asarray(temps)
    assert ((toks >= 0) & (toks < vocab)).all()
    for r in range(b):
        decisions = reference_replay(
            torch.from_numpy(logits[:, r]),
            toks[:, r].tolist(),
            t_high=1.0,
            t_low=0.3,
            tau0=1.2,
            window=window,
            nl_ids=[NL],
            dnl_ids=[DNL],
        )
        assert sum(d.boundary for d in decisions) > 10
        ref_t = np.array([d.temperature for d in decisions], np.float32)
        assert (ref_t == temps[:, r]).all()


@settings(max_examples=25, deadline=None)
@given(
    window=st.sampled_from([1, 3]),
    tokens=st.lists(st.sampled_from([NL, DNL, 3, 4]), min_size=48, max_size=48),
    scales=st.lists(st.sampled_from([0.05, 0.5, 1.0, 2.0, 6.0]), min_size=48, max_size=48),
    seed=st.integers(0, 2**16),
)
def test_short_sequences_property(window, tokens, scales, seed):
    """Arbitrary boundary patterns (nl runs, dnl runs, at the very start) on short sequences."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((48, 5), dtype=np.float32) * np.float32(scales)[:, None]
    cfg = dict(t_high=1.0, t_low=0.2, tau0=0.75, window=window, nl_ids=[NL], dnl_ids=[DNL])
    decisions = reference_replay(torch.from_numpy(logits), tokens, **cfg)
    temperature, entropy, info = S.replay(
        S.ReSETConfig.create(**cfg), logits, np.asarray(tokens), return_info=True
    )
    np.testing.assert_array_equal(info.boundary, [d.boundary for d in decisions])
    ref_h = np.array([d.entropy for d in decisions])
    eps_h = float(np.abs(np.asarray(entropy) - ref_h).max())
    for t, d in enumerate(decisions):
        tol = 2 * eps_h + 2.0**-22 * max(1.0, abs(d.h_step), abs(d.h_bar), abs(d.tau))
        if 0 < abs(d.h_step - d.h_bar) <= tol or abs(d.entropy - d.tau) <= tol:
            continue
        assert bool(info.uncertain[t]) == d.uncertain, t
        assert float(temperature[t]) == np.float32(d.temperature), t


# ----------------------------------------------------------------------------
# The rule's corner cases
# ----------------------------------------------------------------------------


def test_first_token_rule():
    """First token: H_step = H_bar = H, never uncertain, T = t_high iff H >= tau0."""
    rng = np.random.default_rng(11)
    b = 64
    logits = rng.standard_normal((b, 50), dtype=np.float32) * rng.uniform(0.1, 6, (b, 1)).astype(
        np.float32
    )
    tau0 = rng.uniform(0.5, 3.5, b).astype(np.float32)
    rule = S.ReSETConfig.create(t_low=0.1, tau0=tau0, window=32, nl_ids=[NL], dnl_ids=[DNL])
    state, temperature, h, info = jax.jit(lambda r, z: r.step_with_info(S.init_state(r, b), z))(
        rule, logits
    )
    h = np.asarray(h)
    np.testing.assert_array_equal(info.h_step, h)
    np.testing.assert_array_equal(info.h_bar, h)
    assert not np.asarray(info.uncertain).any()
    np.testing.assert_array_equal(temperature, np.where(h >= tau0, 1.0, 0.1).astype(np.float32))
    assert 0 < (h >= tau0).sum() < b
    for r in range(b):
        req = TorchReSETRequest.create(
            t_high=1.0, t_low=0.1, tau0=float(tau0[r]), window=32, nl_ids=[NL], dnl_ids=[DNL]
        )
        assert np.float32(req.decide(torch.from_numpy(logits[r])).temperature) == temperature[r]
    assert (np.asarray(state.count) == 1).all()


def test_threshold_tie_takes_t_high():
    """H exactly equal to the threshold takes t_high (>=), for tau0 and for H_step."""
    rng = np.random.default_rng(5)
    z = rng.standard_normal((1, 40), dtype=np.float32)
    # H from the very program that decides (tau0 is an input of it): a separately
    # compiled token_entropy may differ in the last bit on a GPU.
    first = jax.jit(lambda rule: S.step(rule, S.init_state(rule, 1), z)[1:])
    h = np.asarray(first(S.ReSETConfig.create(t_low=0.1, tau0=0.0, window=4))[1])[0]

    def first_temperature(tau0):
        return float(first(S.ReSETConfig.create(t_low=0.1, tau0=tau0, window=4))[0][0])

    assert first_temperature(float(h)) == 1.0
    assert first_temperature(float(np.nextafter(h, np.float32(np.inf)))) == np.float32(0.1)
    assert first_temperature(float(np.nextafter(h, np.float32(-np.inf)))) == 1.0

    # Uncertain branch, tau = H_step = H exactly: window 1, a dnl ends step one,
    # position 2 repeats position 1's logits, so H == mean(step) == H_1 bitwise.
    low = rng.standard_normal(40, dtype=np.float32) * 4.0  # peaked: low entropy first
    high = rng.standard_normal(40, dtype=np.float32) * 0.3  # flat: higher entropy
    logits = np.stack([low, high, high])
    tokens = np.array([DNL, 3, 3])
    cfg = dict(t_high=1.0, t_low=0.1, tau0=1e6, window=1, nl_ids=[NL], dnl_ids=[DNL])
    temperature, entropy, info = S.replay(
        S.ReSETConfig.create(**cfg), logits, tokens, return_info=True
    )
    assert bool(info.uncertain[2])
    assert float(info.h_step[2]) == float(entropy[2])
    assert float(temperature[2]) == 1.0
    ref = reference_replay(torch.from_numpy(logits), tokens.tolist(), **cfg)
    assert ref[2].uncertain and ref[2].h_step == ref[2].entropy and ref[2].temperature == 1.0


def _naive_float32_means(h: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """What a port with two separately rounded float32 sums would compute at each t.

    Returns ``(mean(window), H_bar)`` before position t, the window summed
    pairwise from the ring buffer, H_bar from a sequential running sum.
    """
    ring_mean = np.full(len(h), np.nan, np.float32)
    run_mean = np.full(len(h), np.nan, np.float32)
    total = np.float32(0)
    for t in range(1, len(h)):
        total = np.float32(total + h[t - 1])
        run_mean[t] = total / np.float32(t)
        win = h[max(0, t - window) : t]
        ring_mean[t] = np.sum(win, dtype=np.float32) / np.float32(len(win))
    return ring_mean, run_mean


def test_window_and_hbar_tie_is_exact():
    """While count <= w (and while no boundary ever happened) H_step == H_bar bitwise.

    tau0 is huge, so the non-uncertain branch always gives t_low; a port whose
    two means round differently would call some of these positions uncertain
    and give t_high wherever H >= H_step. The sequences are chosen so that the
    naive float32 means do differ, with H >= H_step, at many positions.
    """
    b, length, window = 64, 80, 32
    rng = np.random.default_rng(2)
    scale = np.exp(rng.uniform(np.log(0.05), np.log(5.0), (b, length, 1))).astype(np.float32)
    logits = rng.standard_normal((b, length, 300), dtype=np.float32) * scale
    cfg = dict(t_high=1.0, t_low=0.1, tau0=1e6, window=window, nl_ids=[NL], dnl_ids=[DNL])
    tokens = np.full((b, length), 3)  # no boundary at all
    rule = S.ReSETConfig.create(**cfg)
    temperature, entropy, info = S.replay(rule, logits, tokens, return_info=True)

    h = np.asarray(entropy)
    flips = 0
    for r in range(b):
        ring_mean, run_mean = _naive_float32_means(h[r], window)
        flips += int(((ring_mean > run_mean) & (h[r] >= ring_mean))[: window + 1].sum())
    assert flips > 20, "the sequences do not exercise the tie"

    # No boundary: the step spans the sequence, so the tie holds at every position.
    np.testing.assert_array_equal(info.h_step, info.h_bar)
    assert not np.asarray(info.uncertain).any()
    assert (np.asarray(temperature) == np.float32(0.1)).all()
    for r in range(4):
        decisions = reference_replay(torch.from_numpy(logits[r]), tokens[r].tolist(), **cfg)
        assert all(d.h_step == d.h_bar and not d.uncertain for d in decisions)

    # With boundaries the tie holds while count <= w, and then ends.
    tokens = np.tile(np.where(np.arange(length) % 5 == 4, DNL, 3), (b, 1))
    temperature, _, info = S.replay(rule, logits, tokens, return_info=True)
    head = slice(0, window + 1)
    np.testing.assert_array_equal(info.h_step[:, head], info.h_bar[:, head])
    assert (np.asarray(temperature)[:, head] == np.float32(0.1)).all()
    assert np.asarray(info.uncertain)[:, window + 1 :].any()


def test_boundaries_need_generated_tokens_and_empty_ids():
    rule = S.ReSETConfig.create(t_low=0.1, tau0=1.0, window=4, nl_ids=[NL], dnl_ids=[DNL])
    z = np.zeros((6, 9), np.float32)
    _, _, info = S.replay(rule, z, np.array([NL, NL, 3, DNL, 3, NL]), return_info=True)
    # Position 1 sees one nl only; position 2 sees two; position 4 follows a dnl.
    np.testing.assert_array_equal(info.boundary, [False, False, True, False, True, False])
    # nl nl nl: boundaries at every position after the second.
    _, _, info = S.replay(rule, z, np.array([NL] * 6), return_info=True)
    np.testing.assert_array_equal(info.boundary, [False, False, True, True, True, True])
    no_ids = S.ReSETConfig.create(t_low=0.1, tau0=1.0, window=4)
    _, _, info = S.replay(no_ids, z, np.array([NL, NL, DNL, DNL, 3, 3]), return_info=True)
    assert not np.asarray(info.boundary).any()


def test_window_sum_is_the_compensated_sum():
    """The unrolled (elementwise) window sum is ``_fsum``'s reduction, bit for bit on CPU.

    Both are the float-float sum in index order with one final rounding; it is
    also within one float32 ulp of the exact sum.
    """
    rng = np.random.default_rng(8)
    cpu = jax.devices("cpu")[0]
    for w in (1, 2, 5, 32, 64):
        scale = rng.choice(np.float32([1e-3, 1.0, 12.0]), (4000, 1))
        ring = (rng.random((4000, w), dtype=np.float32) ** 3 * scale).astype(np.float32)
        with jax.default_device(cpu):
            got = np.asarray(jax.jit(S._ring_sum)(ring))
            want = np.asarray(jax.jit(S._fsum)(ring))
        np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))
        exact = np.array([math.fsum(row) for row in ring.astype(np.float64)])
        assert np.all(np.abs(got - exact) <= np.spacing(np.abs(exact).astype(np.float32)))


@pytest.mark.parametrize("window", [4, 32])
def test_unrolled_and_reduction_paths_decide_identically(monkeypatch, window):
    """Short id lists and windows run as elementwise code, long ones as reductions.

    Forcing the reduction paths (as for > 64 ids or a window > 64) must not change
    a single bit of any output or of the state.
    """
    logits, tokens = _sequence(1000, 2000, seed=1000)
    # Extra ids that do occur among the ordinary tokens of the sequence.
    nl, dnl = [NL, 40, 41], [DNL, 50]
    rule = S.ReSETConfig.create(
        t_low=T_LOW, tau0=_tau0_for(logits), window=window, nl_ids=nl, dnl_ids=dnl
    )

    def run():
        # The rule's methods, not the jitted protocol functions, so that each call
        # traces afresh with the current module constants.
        def body(state, xs):
            z, tok = xs
            state, temperature, h, info = rule.step_with_info(state, z[None])
            return rule.observe(state, tok[None]), (temperature, h, info)

        scan = jax.jit(lambda z, t: jax.lax.scan(body, rule.init_state(1), (z, t)))
        # On CPU: a GPU's reduction order could round the reduced window sum differently.
        with jax.default_device(jax.devices("cpu")[0]):
            return jax.device_get(scan(logits, tokens.astype(np.int32)))

    unrolled = run()
    monkeypatch.setattr(S, "_UNROLL_IDS", 0)
    monkeypatch.setattr(S, "_UNROLL_WINDOW", 0)
    reduced = run()
    for a, b in zip(jax.tree.leaves(unrolled), jax.tree.leaves(reduced), strict=True):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
    state, (temperature, _, info) = unrolled
    assert np.asarray(info.boundary).sum() > 20 and np.asarray(info.uncertain).any()
    assert set(np.unique(temperature).tolist()) == {T_HIGH, T_LOW}
    assert (np.isin(tokens, [40, 41, 50])).any()
    # The packed state reads back through its named views.
    assert state.count.tolist() == state.num_generated.tolist() == [len(tokens)]
    assert state.last_token.tolist() == [tokens[-1]] and state.prev_token.tolist() == [tokens[-2]]
    assert state.ring.shape == (1, window) and state.stats.shape == (1, 4 + window)


def test_vmap_and_jit_agree_with_eager():
    rule = S.ReSETConfig.create(t_low=0.1, tau0=1.0, window=3, nl_ids=[NL], dnl_ids=[DNL])
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 4, 3, 11), dtype=np.float32)  # [G, T, B, V]
    tokens = rng.integers(0, 4, (2, 4, 3))

    def run(logits, tokens):
        state = S.init_state(rule, logits.shape[1])
        temps = []
        for t in range(logits.shape[0]):
            state, temp, _ = S.step(rule, state, logits[t])
            state = S.observe(rule, state, tokens[t])
            temps.append(temp)
        return jnp.stack(temps)

    one = jax.jit(run)
    separate = np.stack([one(logits[g], tokens[g]) for g in range(2)])
    np.testing.assert_array_equal(jax.jit(jax.vmap(run))(logits, tokens), separate)


def test_knob_changes_never_retrace():
    traces = 0

    @jax.jit
    def one(rule, state, logits, token):
        nonlocal traces
        traces += 1
        state, temp, h = S.step(rule, state, logits)
        return S.observe(rule, state, token), temp, h

    logits = jnp.asarray(np.random.default_rng(0).standard_normal((2, 20), dtype=np.float32))
    token = jnp.array([NL, 5])
    temps = set()
    for t_high, t_low, tau0, nl, dnl in [
        (1.0, 0.1, 0.5, [1], [2]),
        (0.8, 0.3, 2.5, [4, 7], [2, 9, 11]),
        (1.2, 0.0, 1.0, [], [3]),
        (1.0, 0.2, 9.0, [5], []),
    ]:
        rule = S.ReSETConfig.create(
            t_high=t_high, t_low=t_low, tau0=tau0, window=8, nl_ids=nl, dnl_ids=dnl
        )
        _, temp, _ = one(rule, S.init_state(rule, 2), logits, token)
        temps.add(tuple(np.asarray(temp).tolist()))
    assert traces == 1
    assert len(temps) > 1  # the new values did take effect

    fixed_traces = 0

    @jax.jit
    def fixed(rule, state, logits):
        nonlocal fixed_traces
        fixed_traces += 1
        return S.step(rule, state, logits)[1]

    for t in (0.6, 1.0, 0.0):
        rule = S.FixedTemperature.create(t)
        np.testing.assert_array_equal(
            fixed(rule, S.init_state(rule, 2), logits), np.float32([t, t])
        )
    assert fixed_traces == 1


def test_config_checks():
    with pytest.raises(ValueError, match="window"):
        S.ReSETConfig.create(t_low=0.1, tau0=1.0, window=0)
    with pytest.raises(ValueError, match="non-negative"):
        S.ReSETConfig.create(t_low=0.1, tau0=1.0, nl_ids=[-3])
    with pytest.raises(ValueError, match="tau0"):
        S.ReSETConfig.create(t_low=0.1, tau0=float("nan"))
    rule = S.ReSETConfig.create(t_low=0.1, tau0=1.0, nl_ids=list(range(9)), dnl_ids=[])
    assert rule.nl_ids.shape == (16,) and rule.dnl_ids.shape == (8,)


def test_fixed_temperature_protocol():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((3, 30), dtype=np.float32)
    rule = S.FixedTemperature.create([0.6, 0.0, 1.0])
    state = S.init_state(rule, 3)
    state, temp, h = S.step(rule, state, logits)
    np.testing.assert_array_equal(temp, np.float32([0.6, 0.0, 1.0]))
    np.testing.assert_allclose(h, [torch_entropy(torch.from_numpy(r)) for r in logits], rtol=1e-6)
    state = S.observe(rule, state, jnp.array([1, 2, 3]))
    assert (np.asarray(state.num_generated) == 1).all()
    temp, h = S.replay(S.FixedTemperature(0.6), logits, np.array([1, 2, 3]))
    np.testing.assert_array_equal(temp, np.float32([0.6] * 3))


# ----------------------------------------------------------------------------
# Bad logits
# ----------------------------------------------------------------------------


def _bad_batch():
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((6, 10), dtype=np.float32)
    logits[1, 3] = np.nan
    logits[2, :] = -np.inf
    logits[3, 7] = np.inf
    logits[4, :8] = -np.inf  # masked tokens are fine
    logits[5, 0] = np.nan
    logits[5, 1:] = -np.inf
    return logits, np.array([True, False, False, False, True, False])


@pytest.mark.parametrize(
    "rule",
    [
        S.ReSETConfig.create(t_low=0.1, tau0=1.0, window=2, nl_ids=[NL], dnl_ids=[DNL]),
        S.FixedTemperature.create(0.7),
    ],
)
def test_bad_logits_in_step(rule):
    logits, ok = _bad_batch()
    good = np.random.default_rng(0).standard_normal((6, 10), dtype=np.float32)
    state = S.init_state(rule, 6)
    state = S.observe(rule, S.step(rule, state, good)[0], jnp.arange(6))
    new, temp, h = S.step(rule, state, logits)
    temp, h = np.asarray(temp), np.asarray(h)
    assert np.isfinite(h[ok]).all() and np.isnan(h[~ok]).all()
    assert np.isfinite(temp[ok]).all() and np.isnan(temp[~ok]).all()
    np.testing.assert_array_equal(new.bad, ~ok)

    # A bad row's statistics are untouched (stay finite); good rows move on as usual.
    def fields(st):  # everything but the sticky flag
        if isinstance(st, S.ReSETState):
            return {"stats": st.stats, "counts": st.counts}
        return {"num_generated": st.num_generated}

    for name, old_f in fields(state).items():
        old_f, new_f = np.asarray(old_f), np.asarray(fields(new)[name])
        assert np.isfinite(new_f.astype(np.float64)).all(), name
        np.testing.assert_array_equal(new_f[~ok], old_f[~ok], err_msg=name)
    alone, temp_ok, _ = S.step(rule, jax.tree.map(lambda x: x[ok], state), logits[ok])
    np.testing.assert_array_equal(temp_ok, temp[ok])
    for a, n in zip(jax.tree.leaves(alone), jax.tree.leaves(new)):
        if a.dtype != jnp.bool_:
            np.testing.assert_array_equal(a, np.asarray(n)[ok])


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("top_p, top_k", [(1.0, 0), (0.9, 0), (1.0, 3)])
def test_bad_logits_in_sample(temperature, top_p, top_k):
    logits, ok = _bad_batch()
    tok = np.asarray(S.sample(jax.random.key(0), logits, temperature, top_p=top_p, top_k=top_k))
    assert (tok[~ok] == S.INVALID_TOKEN).all()
    assert ((tok[ok] >= 0) & (tok[ok] < 10)).all()
    assert tok[4] >= 8  # never a masked token
    with pytest.raises(FloatingPointError, match=r"\(1, 0\)"):
        S.check_tokens(tok[:, None])
    S.check_tokens(tok[ok][:, None])


def test_nan_or_inf_temperature_gives_no_token():
    logits = np.zeros((3, 5), np.float32)
    tok = S.sample(jax.random.key(0), logits, jnp.array([np.nan, np.inf, 1.0]))
    np.testing.assert_array_equal(np.asarray(tok)[:2], [-1, -1])
    assert 0 <= int(tok[2]) < 5


# ----------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------


def test_greedy_and_top_k_1_and_tiny_top_p_are_argmax():
    rng = np.random.default_rng(8)
    logits = rng.standard_normal((32, 500), dtype=np.float32)
    best = logits.argmax(-1)
    key = jax.random.key(1)
    for temperature in (0.0, 1e-6, -1.0):
        np.testing.assert_array_equal(S.sample(key, logits, temperature), best)
    np.testing.assert_array_equal(S.sample(key, logits, 1.0, top_k=1), best)
    np.testing.assert_array_equal(S.sample(key, logits, 1.0, top_p=1e-6), best)
    np.testing.assert_array_equal(S.sample(key, logits, 1.0, top_p=0.0), best)
    np.testing.assert_array_equal(S.sample(key, logits * 0, 0.0), np.zeros(32))  # first of ties


def _empirical(tokens: np.ndarray, rows: slice, vocab: int) -> np.ndarray:
    return np.bincount(tokens[rows], minlength=vocab) / len(tokens[rows])


def _expected(z, temperature, top_k=0, top_p=1.0):
    """The kept set and its renormalised probabilities, from the definition."""
    z = np.asarray(z, np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    keep = np.zeros(len(z), bool)
    keep[order[: top_k if top_k > 0 else len(z)]] = True
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    if top_p < 1.0:
        before = np.cumsum(p[order]) - p[order]
        nucleus = np.zeros(len(z), bool)
        nucleus[order[(before < top_p) | (np.arange(len(z)) == 0)]] = True
        p = np.where(nucleus, p, 0.0)
        p /= p.sum()
    return p


def test_distribution_per_row_parameters():
    """One call, rows with different T/top-k/top-p, frequencies within 5 sigma."""
    z = np.array([2.0, 1.5, 1.0, 0.2, -0.5, -1.0, -3.0], np.float32)
    settings_ = [  # (T, top_k, top_p)
        (0.7, 0, 1.0),
        (1.3, 0, 1.0),
        (1.0, 3, 1.0),
        (1.0, 0, 0.8),
        (0.9, 5, 0.7),
        (2.0, 0, 0.95),
    ]
    n = 20000
    rows = len(settings_) * n
    t = np.repeat([s[0] for s in settings_], n).astype(np.float32)
    k = np.repeat([s[1] for s in settings_], n).astype(np.int32)
    p = np.repeat([s[2] for s in settings_], n).astype(np.float32)
    tok = np.asarray(
        jax.jit(S.sample)(jax.random.key(42), np.tile(z, (rows, 1)), t, top_p=p, top_k=k)
    )
    for i, (temperature, top_k, top_p) in enumerate(settings_):
        want = _expected(z, temperature, top_k, top_p)
        got = _empirical(tok, slice(i * n, (i + 1) * n), len(z))
        sigma = np.sqrt(want * (1 - want) / n)
        assert np.all(np.abs(got - want) <= 5 * sigma + 1e-12), (settings_[i], got, want)
        assert np.all(got[want == 0] == 0)


def test_candidate_path_and_full_sort_agree():
    """The capped lax.top_k path, the wider candidates and the full-sort fallback give the
    same distribution. (These rows are hot, T = 1: ``hot_candidates=cap`` keeps their first
    candidates at ``cap``.)"""
    rng = np.random.default_rng(9)
    z = rng.standard_normal(60).astype(np.float32) * 0.5
    n = 20000
    x = np.tile(z, (n, 1))
    want = _expected(z, 1.0, 0, 0.5)
    assert 8 < (want > 0).sum() <= 32  # the nucleus is wider than 8 candidates, not 32
    # (8, 8): the full sort; (8, 32): the wider candidates; (60, 60): the first ones fit.
    for cap, wide in ((8, 8), (8, 32), (60, 60)):
        tok = np.asarray(
            S.sample(
                jax.random.key(cap + wide),
                x,
                1.0,
                top_p=0.5,
                max_candidates=cap,
                wide_candidates=wide,
                hot_candidates=cap,
            )
        )
        got = np.bincount(tok, minlength=60) / n
        assert np.all(got[want == 0] == 0)
        sigma = np.sqrt(want * (1 - want) / n)
        assert np.all(np.abs(got - want) <= 5 * sigma + 1e-12), (cap, wide)
    # top-k above the cap falls back too (to the wider candidates, or past them to the
    # full sort), and stays exact.
    for wide in (8, 32):
        tok = np.asarray(
            S.sample(
                jax.random.key(3),
                x,
                1.0,
                top_k=20,
                max_candidates=8,
                wide_candidates=wide,
                hot_candidates=8,
            )
        )
        assert set(np.unique(tok)) <= set(np.argsort(-z)[:20].tolist())
        assert len(np.unique(tok)) == 20


def test_sample_rejects_bad_candidate_counts():
    """The static candidate counts must be positive ints (a max_candidates of 0 failed deep
    inside the draw as an argmax of an empty sequence, 2.5 as a shape error; a
    wide_candidates of 2.5 silently turned the wide draw off)."""
    x = jnp.zeros((1, 100), jnp.float32).at[0, 3].set(1.0)
    bad = (0, -3, 2.5, True, np.bool_(True), "8")
    names = ("max_candidates", "wide_candidates", "hot_candidates")
    for kw in [{name: n} for name in names for n in bad]:
        with pytest.raises(ValueError, match=f"{next(iter(kw))} must be a positive int"):
            S.sample(jax.random.key(0), x, 1.0, top_p=0.9, **kw)
    assert int(S.sample(jax.random.key(0), x, 1.0, top_p=0.9, max_candidates=np.int64(8))[0]) >= 0
    for t in (float("nan"), float("inf"), "0.9", None, True):
        with pytest.raises(ValueError, match="hot_temperature must be a finite number"):
            S.sample(jax.random.key(0), x, 1.0, top_p=0.9, hot_temperature=t)


def test_wide_candidates_before_a_full_sort():
    """A batch whose kept sets do not fit the first candidates draws from the
    ``wide_candidates`` best, the same draw as from ``lax.top_k``'s; only a kept set wider
    than those too takes the full sort, the draw over every token in order."""
    rng = np.random.default_rng(5)
    v = 5000
    x = jnp.asarray(rng.standard_normal((2, v)).astype(np.float32) * 2.0)
    t = jnp.ones(2)
    key = jax.random.key(7)
    _, key_filtered = jax.random.split(key)

    def by_hand(vals, idx, top_p):  # the draw of `_sample` from given descending candidates
        k_eff = jnp.full((2,), v, jnp.int32)
        lse = jax.nn.logsumexp(x, axis=-1)
        return S._sample_candidates(key_filtered, vals, idx, k_eff, top_p, lse, v)

    # Nuclei of these rows: ~2 tokens at top-p 0.05, 111-144 at 0.5, 609-687 at 0.8,
    # 1153-1259 at 0.9.
    cases = ((0.5, 1024, 1024), (0.8, 256, v), (0.9, 1024, v), (0.05, 1024, 64))
    for top_p, wide, want_from in cases:
        p = jnp.full((2,), top_p, jnp.float32)
        # (These rows are at T = 1, hot: hot_candidates = 64 keeps their first candidates
        # at 64, as a cold row's.)
        got = S.sample(
            key, x, t, top_p=p, max_candidates=64, wide_candidates=wide, hot_candidates=64
        )
        if want_from == v:
            want, fits = by_hand(*S._sorted_descending(x), p)
        else:
            want, fits = by_hand(*jax.lax.top_k(x, want_from), p)
        assert bool(jnp.all(fits)), (top_p, wide)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=f"{top_p}")
        # ... and the batch's kept sets really needed that width: not the narrower one.
        narrower = {1024: 64, v: wide, 64: None}[want_from]
        if narrower is not None:
            assert not bool(jnp.all(by_hand(*jax.lax.top_k(x, narrower), p)[1]))


def test_hot_rows_draw_from_their_own_count():
    """Filtered rows at or above ``hot_temperature`` look at the ``hot_candidates`` best
    tokens first, the others at ``max_candidates``: a hot row whose nucleus fits its count
    takes no fallback, a cold row as wide takes the wide draw (for the batch). All rows
    share one ``[B, hot_candidates]`` draw, so a row's token does not depend on its count."""
    rng = np.random.default_rng(5)
    v = 5000
    x = jnp.asarray(rng.standard_normal((2, v)).astype(np.float32) * 2.0)
    key = jax.random.key(7)
    _, key_filtered = jax.random.split(key)

    def by_hand(t, c, top_p, counts=None, top_k=v):  # `_sample`'s draw from z's c best
        z = jax.jit(lambda x, t: x / t[:, None])(x, t)
        lse = jax.nn.logsumexp(z, axis=-1)
        vals, idx = jax.lax.top_k(z, c)
        k_eff = jnp.broadcast_to(jnp.asarray(top_k, jnp.int32), (2,))
        return S._sample_candidates(key_filtered, vals, idx, k_eff, top_p, lse, v, counts)

    def sample(t, top_p, top_k=0, hot=256):
        return S.sample(
            key,
            x,
            t,
            top_p=top_p,
            top_k=top_k,
            max_candidates=64,
            wide_candidates=1024,
            hot_candidates=hot,
        )

    hot = jnp.array([1.0, 1.0], jnp.float32)
    mixed = jnp.array([1.0, 0.85], jnp.float32)  # row 1 below the hot temperature (0.9)
    # Nuclei at top-p 0.5: 144 and 111 tokens at T = 1, past 64, within 256.
    p = jnp.full((2,), 0.5, jnp.float32)
    want, fits = by_hand(hot, 256, p)
    assert bool(jnp.all(fits)) and not bool(jnp.all(by_hand(hot, 64, p)[1]))
    np.testing.assert_array_equal(np.asarray(sample(hot, p)), np.asarray(want))
    # Narrow nuclei (3 and 1 tokens): each row from its own count, the same tokens as
    # with no counts.
    p = jnp.full((2,), 0.05, jnp.float32)
    want, fits = by_hand(mixed, 256, p, counts=jnp.array([256, 64], jnp.int32))
    assert bool(jnp.all(fits))
    np.testing.assert_array_equal(np.asarray(sample(mixed, p)), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(want), np.asarray(by_hand(mixed, 256, p)[0]))
    # Row 0 (hot) keeps 144 of its 256, row 1 (cold) 89 at top-p 0.6: past its 64, so the
    # batch draws from the 1024 best.
    p = jnp.array([0.5, 0.6], jnp.float32)
    counts = jnp.array([256, 64], jnp.int32)
    assert not bool(jnp.all(by_hand(mixed, 256, p, counts=counts)[1]))
    want, fits = by_hand(mixed, 1024, p)
    assert bool(jnp.all(fits))
    np.testing.assert_array_equal(np.asarray(sample(mixed, p)), np.asarray(want))
    # The same with the hot count off: both rows past their 64, the wide draw.
    p = jnp.full((2,), 0.5, jnp.float32)
    want, fits = by_hand(hot, 1024, p)
    assert bool(jnp.all(fits)) and not bool(jnp.all(by_hand(hot, 64, p)[1]))
    np.testing.assert_array_equal(np.asarray(sample(hot, p, hot=64)), np.asarray(want))
    # A top-k between the cold and hot counts: the hot row draws from its 256, the cold
    # row's 100 > 64 does not fit (its entries past 64 are not candidates): the wide draw.
    p = jnp.ones((2,), jnp.float32)
    top_k = jnp.array([100, 100], jnp.int32)
    counts = jnp.array([256, 64], jnp.int32)
    _, fits = by_hand(mixed, 256, p, counts=counts, top_k=top_k)
    np.testing.assert_array_equal(np.asarray(fits), [True, False])
    want, fits = by_hand(mixed, 1024, p, top_k=top_k)
    assert bool(jnp.all(fits))
    got = sample(mixed, p, top_k=top_k)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_staged_top_k_is_lax_top_k():
    """The staged top-k (on by default on a GPU) returns exactly what lax.top_k does:
    values, indices and tie order, on its fast path (one and two stages) and through
    its fallbacks (clustered values, NaN), and with padded chunks."""
    rng = np.random.default_rng(4)
    z = jnp.asarray(rng.standard_normal((4, 151936)) * 7, jnp.float32)
    cases = {
        "random": (z, 256),
        "bf16 ties": (z.astype(jnp.bfloat16).astype(jnp.float32), 256),
        "integer ties": (jnp.round(z / 4), 256),
        "clustered (fallback)": (z.at[:, 1000:1100].set(100.0 + jnp.arange(100.0)), 256),
        "signed zeros": (jnp.zeros((3, 151936)).at[:, ::3].set(-0.0), 256),
        "mostly -inf": (jnp.full((3, 20000), -jnp.inf).at[:, 5].set(1.0), 256),
        "NaN (fallback)": (z.at[2, 77].set(jnp.nan), 256),
        "padded chunks": (jnp.asarray(rng.standard_normal((3, 150001)), jnp.float32), 200),
        "one row": (z[:1], 256),
    }
    f = jax.jit(functools.partial(S._top_k_rows, staged=True), static_argnums=1)
    for name, (x, c) in cases.items():
        got_v, got_i = f(x, c)
        want_v, want_i = jax.lax.top_k(x, c)
        np.testing.assert_array_equal(np.asarray(got_i), np.asarray(want_i), err_msg=name)
        np.testing.assert_array_equal(np.asarray(got_v), np.asarray(want_v), err_msg=name)
    # A genuine bf16 input (not rounded and cast back).
    zb = z.astype(jnp.bfloat16)
    for got, want in zip(f(zb, 256), jax.lax.top_k(zb, 256)):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    # The fast path itself (no fallback) is exact on the random and tie cases, with one
    # stage and with two (151,936 -> 18,992 -> 2,384 candidates), and says so; a
    # clustered row or a NaN makes it say it is not.
    cand = jax.jit(S._top_k_candidates, static_argnums=1, static_argnames=("staged", "max_stages"))
    for stages in (1, 2):
        for name in ("random", "bf16 ties", "integer ties", "one row"):
            x, c = cases[name]
            v, i, exact = cand(x, c, staged=True, max_stages=stages)
            assert bool(exact), (name, stages)
            want_v, want_i = jax.lax.top_k(x, c)
            np.testing.assert_array_equal(np.asarray(i), np.asarray(want_i))
            np.testing.assert_array_equal(np.asarray(v), np.asarray(want_v))
        for name in ("clustered (fallback)", "NaN (fallback)"):
            x, c = cases[name]
            assert not bool(cand(x, c, staged=True, max_stages=stages)[2]), (name, stages)
    # A second stage that drops what the first kept: 3 values of 50 in each of the 8
    # first-stage chunks that make up one second-stage chunk (24 > 16 kept there).
    x = z[:1]
    for k in range(80, 88):
        x = x.at[0, k * 128 : k * 128 + 3].set(50.0)
    assert bool(cand(x, 256, staged=True, max_stages=1)[2])
    assert not bool(cand(x, 256, staged=True, max_stages=2)[2])
    np.testing.assert_array_equal(np.asarray(f(x, 256)[1]), np.asarray(jax.lax.top_k(x, 256)[1]))
    # Off (the CPU default) it is lax.top_k and always exact.
    v, i, exact = cand(z, 256, staged=False)
    assert bool(exact) and np.array_equal(np.asarray(i), np.asarray(jax.lax.top_k(z, 256)[1]))
    # Rows whose result is not used do not force the fallback: with the clustered
    # row 1 excluded, rows 0, 2 and 3 still come out exact.
    zc = z.at[1, 1000:1100].set(100.0 + jnp.arange(100.0))
    rows = jnp.asarray([True, False, True, True])
    got_v, got_i = S._top_k_rows(zc, 256, rows=rows, staged=True)
    want_v, want_i = jax.lax.top_k(zc, 256)
    keep = np.asarray(rows)
    np.testing.assert_array_equal(np.asarray(got_i)[keep], np.asarray(want_i)[keep])
    assert not np.array_equal(np.asarray(got_i)[1], np.asarray(want_i)[1])  # row 1 inexact
    # ... and with every row in use the clustered row forces the exact fallback.
    np.testing.assert_array_equal(
        np.asarray(S._top_k_rows(zc, 256, rows=jnp.ones(4, bool), staged=True)[1]),
        np.asarray(want_i),
    )


def test_branchless_sampler_draws_the_same_tokens():
    """The GPU form of the sampler (the filtered draw always, one lax.switch adding the
    plain draw, the argmax or the fallbacks; staged top-k) gives the very tokens of the CPU
    form (a lax.cond per draw, lax.top_k),
    for every kind of row: greedy, plain, top-p, top-k, bad logits, kept sets wider than
    the candidates (the wide candidates) and than those too (the full sort), values
    clustered in one chunk (the staged top-k is
    not exact: lax.top_k's candidates), and batches where no row needs one of the draws."""
    rng = np.random.default_rng(11)
    v = 20000
    logits = (rng.standard_normal((9, v)) * 6).astype(np.float32)
    logits[5] = rng.standard_normal(v).astype(np.float32) * 0.01  # flat: nucleus > 256
    logits[6, 3] = np.nan
    # 46 equal best values, 30 of them in one 128-wide chunk (the staged top-k keeps 16
    # there): its candidates still hold top_p = 0.6 of the mass, but not the right tokens.
    logits[8, 640:670] = 40.0
    logits[8, 1280:1296] = 40.0
    # Row 9: a nucleus of ~310 tokens at T = 1 and top-p 0.42, a hot row: past 256, within
    # its 384 first candidates. Row 10: the same logits at T = 0.89 and top-p 0.5, below the
    # hot temperature: ~280 tokens, wider than the 256 candidates, not the 1024 wide ones.
    row9 = rng.standard_normal((1, v)).astype(np.float32) * 2.0
    logits = np.concatenate([logits, row9, row9])
    t = np.array([0.0, 0.7, 0.7, 1.0, 0.7, 1.0, 0.7, 0.5, 1.0, 1.0, 0.89], np.float32)
    top_p = np.array([1.0, 1.0, 0.9, 1.0, 0.5, 0.95, 0.9, 0.99, 0.6, 0.42, 0.5], np.float32)
    top_k = np.array([0, 0, 0, 5, 40, 0, 0, 300, 0, 0, 0], np.int32)
    run = jax.jit(S._sample, static_argnames=("max_candidates", "branchless"))
    mixes = {
        "all kinds": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
        # Kept sets wider than the candidates but within the 1024 wide ones (a top-k of
        # 300, a nucleus of ~290): no full sort.
        "wide candidates": [1, 2, 7, 9, 10],
        "wide candidates, clustered": [7, 8, 10],
        "wide candidates and greedy": [0, 7, 10],
        "a hot row within its candidates": [2, 3, 9],
        "wide candidates, plain and greedy": [0, 1, 7],
        "full sort, plain and greedy": [0, 1, 5],
        "candidates suffice": [0, 1, 2, 3, 4, 6],  # the fast path, no fallback
        "clustered": [2, 8],  # the staged top-k is not exact, the candidates suffice
        "no filtered row": [0, 1, 6],
        "no plain row": [2, 3, 4, 5, 7],
        # One of each branch of the GPU form's lax.switch (no fallback):
        "filtered only": [2, 3, 4, 6],
        "greedy and filtered": [0, 2, 4],
        "plain and filtered": [1, 2, 3],
        "plain, greedy and filtered": [0, 1, 3],
        "greedy only": [0, 6],
        "plain only": [1],
    }
    staged = jax.jit(
        lambda *a, **k: _with_staged_top_k(S._sample.__wrapped__, *a, **k),
        static_argnames=("max_candidates", "branchless"),
    )
    for name, rows in mixes.items():
        # Every mix padded to 10 rows with its own rows again (the same kinds of row, so
        # the same branches): one shape, so each form compiles once (~150 s on a GPU
        # otherwise).
        rows = (rows * 10)[:10]
        x, args = logits[rows], (t[rows], top_p[rows], top_k[rows])
        for seed in range(8):
            key = jax.random.key(seed)
            want = np.asarray(run(key, x, *args, max_candidates=256, branchless=False))
            for form in (run, staged):
                got = form(key, x, *args, max_candidates=256, branchless=True)
                np.testing.assert_array_equal(np.asarray(got), want, err_msg=name)
    # The staged top-k really is inexact on the clustered row and exact elsewhere.
    cand = functools.partial(S._top_k_candidates, staged=True)
    assert not bool(cand(jnp.asarray(logits[[8]]), 384)[2])
    assert bool(cand(jnp.asarray(logits[[1, 2, 3, 4]]), 384)[2])


def _top_p_args(b: int, v: int) -> tuple:
    """`_sample`'s arguments for a [b, v] batch of top-p 0.9 rows at T = 1."""
    return (
        jax.random.key(0),
        jnp.zeros((b, v)),
        jnp.ones(b),
        jnp.full(b, 0.9),
        jnp.zeros(b, jnp.int32),
    )


def test_branchless_sampler_reads_back_one_index():
    """The GPU form of the sampler has one conditional per call (XLA reads its index
    back to the host, ~16 us of idle GPU a step), a five-way switch: the filtered draw
    alone, with the argmax, with the plain draw, with both, or the exact fallback."""
    args = _top_p_args(2, 5000)
    for branchless, want in ((True, 1), (False, 2)):
        text = S._sample.lower(*args, max_candidates=256, branchless=branchless).as_text()
        top = [ln for ln in text.splitlines() if "stablehlo.case" in ln]
        # The lowered text nests each branch's ops inside the case's regions; count the
        # cases at the sampler's own level by their indentation.
        depth = min(len(ln) - len(ln.lstrip()) for ln in top)
        outer = [ln for ln in top if len(ln) - len(ln.lstrip()) == depth]
        assert len(outer) == want, (branchless, top)
    compiled = S._sample.lower(*args, max_candidates=256, branchless=True).compile().as_text()
    entry = compiled[compiled.index("ENTRY") :]
    entry = entry[: entry.index("\n}\n")]
    (cond,) = [ln for ln in entry.splitlines() if " conditional(" in ln]
    assert cond.count("branch_computations={") == 1
    assert len(re.search(r"branch_computations=\{([^}]*)\}", cond).group(1).split(",")) == 5


def _sub_jaxprs(eqn):
    """The jaxprs inside an equation's parameters (pjit bodies, cond branches, ...)."""
    for v in eqn.params.values():
        for sub in v if isinstance(v, (tuple, list)) else (v,):
            sub = getattr(sub, "jaxpr", sub)
            if hasattr(sub, "eqns"):
                yield sub


def _conds(jaxpr, *, nested: bool) -> list:
    """The ``cond`` equations of ``jaxpr`` that choose at run time, each a readback on a GPU
    (through pjit and other sub-jaxprs; inside other conds' branches too where ``nested``).
    A ``lax.platform_dependent`` cond (``branches_platforms`` set: the CUDA top-k or sort
    against its XLA form) is chosen when lowering, not counted; its branches are searched."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "cond" and not eqn.params.get("branches_platforms"):
            out.append(eqn)
            if not nested:
                continue
        for sub in _sub_jaxprs(eqn):
            out += _conds(sub, nested=nested)
    return out


def _eqns(jaxpr) -> list:
    """Every equation of ``jaxpr`` and of all its sub-jaxprs."""
    out = []
    for eqn in jaxpr.eqns:
        out.append(eqn)
        for sub in _sub_jaxprs(eqn):
            out += _eqns(sub)
    return out


def _prims(jaxpr) -> set:
    """The primitives' names in ``jaxpr`` and all its sub-jaxprs."""
    return {eqn.primitive.name for eqn in _eqns(jaxpr)}


@pytest.mark.parametrize("kernels", [False, True], ids=["xla", "cuda-forms"])
def test_branchless_fallback_reaches_the_wide_draw_behind_one_more_readback(kernels, monkeypatch):
    """On a GPU each conditional reads a value back (~16 us). The common fallbacks (a kept
    set wider than the 256 candidates: within the 1024 wide ones, or past them) take their
    token behind the switch and one more conditional, whose branches for them hold none:
    not the three nested conds of the exact fallback. The wide draw runs the plain draw
    and the argmax only where the batch needs them. ``cuda-forms``: traced as on a GPU with
    the library, the CUDA top-k and row sort behind their ``platform_dependent`` (stand-ins
    here: only the structure is read)."""
    if kernels:
        monkeypatch.setattr(S, "_cuda_top_k_reason", lambda *a: None)
        monkeypatch.setattr(S, "_cuda_sort_reason", lambda *a: None)
        monkeypatch.setattr(S, "_sort_rows_cuda", lambda z: (z, jnp.zeros(z.shape, jnp.int32)))

        def top_k(z, c):
            b = z.shape[0]
            return z[:, :c], jnp.zeros((b, c), jnp.int32), jnp.ones((b,), bool)

        monkeypatch.setattr(S, "_top_k_cuda", top_k)
        monkeypatch.setattr(
            S,
            "_top_k_cuda_scaled",
            lambda x, t, c, counts=None: (*top_k(x, c), jnp.zeros(x.shape[:1])),
        )
    args = _top_p_args(2, 5000)
    # Unjitted, so that the stand-ins are traced (not _sample's cached trace).
    fn = functools.partial(S._sample.__wrapped__, max_candidates=256, branchless=True)
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    if kernels:  # (on a GPU host the real CUDA forms give them in both variants)
        assert any(e.params.get("branches_platforms") for e in _eqns(jaxpr))
    (switch,) = _conds(jaxpr, nested=False)
    *first, fallback = switch.params["branches"]
    assert len(first) == 4 and all(not _conds(br.jaxpr, nested=True) for br in first)
    (inner,) = _conds(fallback.jaxpr, nested=False)
    # The wide draw with each mix of the other draws, the full sort, draw_exactly.
    inside = [len(_conds(br.jaxpr, nested=True)) for br in inner.params["branches"]]
    assert inside[:5] == [0] * 5 and inside[5] >= 3, inside
    # The wide draw's first branch (no plain row, no greedy row) runs neither other draw.
    assert not {"argmax", "random_bits"} & _prims(inner.params["branches"][0].jaxpr)
    assert {"argmax", "random_bits"} <= _prims(inner.params["branches"][3].jaxpr)
    # Its sorts compile once each (GPU compile time): the full sort of the common
    # fallback, and draw_exactly's own (four, in its nested conds).
    assert jax.jit(fn).lower(*args).as_text().count("stablehlo.sort") <= 5


def test_branchless_fallback_when_one_top_k_is_not_exact():
    """The fallback's wide draw is taken only where both the first and the wide top-k were
    exact; where either was not (the staged top-k on clustered values), the GPU form takes
    draw_exactly, as the CPU form does. Two batches at 64 / 128 candidates: the first top-k
    inexact and the wide one exact, and the reverse."""
    rng = np.random.default_rng(3)
    # First inexact, wide exact: 20 equal best values in the first 128-wide chunk (a stage
    # keeps 16 a chunk), top-p 0.5.
    x_a = rng.standard_normal((2, 1000)).astype(np.float32)
    x_a[:, :20] = 5.0
    a = (x_a, np.ones(2, np.float32), np.full(2, 0.5, np.float32), np.zeros(2, np.int32))
    # First exact, wide inexact: 64 best values spread over the chunks, 40 next-best ones
    # in the first chunk, top-k 100.
    x_b = np.full((2, 3000), -20.0, np.float32)
    spread = np.concatenate([np.arange(133, 3000, 128)[:22] + o for o in (0, 1, 2)])[:64]
    x_b[:, spread] = 2.0
    x_b[:, :40] = 1.9
    b = (x_b, np.ones(2, np.float32), np.ones(2, np.float32), np.full(2, 100, np.int32))
    cand = functools.partial(S._top_k_candidates, staged=True)
    assert not bool(cand(jnp.asarray(x_a), 64)[2]) and bool(cand(jnp.asarray(x_a), 128)[2])
    assert bool(cand(jnp.asarray(x_b), 64)[2]) and not bool(cand(jnp.asarray(x_b), 128)[2])
    static = ("max_candidates", "wide_candidates", "hot_candidates", "branchless")
    cpu = jax.jit(S._sample, static_argnames=static)
    gpu = jax.jit(
        lambda *a, **k: _with_staged_top_k(S._sample.__wrapped__, *a, **k), static_argnames=static
    )
    for args in (a, b):
        for seed in range(12):
            key = jax.random.key(seed)
            # (T = 1: hot rows; hot_candidates=64 keeps their first candidates at 64.)
            sizes = dict(max_candidates=64, wide_candidates=128, hot_candidates=64)
            want = np.asarray(cpu(key, *args, **sizes, branchless=False))
            np.testing.assert_array_equal(
                np.asarray(gpu(key, *args, **sizes, branchless=True)), want
            )


def _with_staged_top_k(fn, *args, **kwargs):
    """Calls ``fn`` (traced) with the sampler's top-k forced to its staged form, as on a GPU
    without the CUDA library: `sampling._top_k_candidates` staged, and ``RESET_JAX_TOP_K``
    set to ``staged`` so that `sampling._scaled_top_k` takes its XLA form (on a GPU host
    with the library it would take the exact kernels, and the inexact paths go untested)."""
    orig, env = S._top_k_candidates, os.environ.get("RESET_JAX_TOP_K")
    S._top_k_candidates = functools.partial(orig, staged=True)
    os.environ["RESET_JAX_TOP_K"] = "staged"
    try:
        return fn(*args, **kwargs)
    finally:
        S._top_k_candidates = orig
        if env is None:
            del os.environ["RESET_JAX_TOP_K"]
        else:
            os.environ["RESET_JAX_TOP_K"] = env


def test_plain_rows_draw_from_the_whole_vocabulary():
    z = np.zeros((50000, 3), np.float32)
    z[:, 2] = -30.0  # p ~ 5e-14: must still be representable, never truncated
    z[:, 1] = np.log(0.25 / 0.75)
    tok = np.asarray(S.sample(jax.random.key(5), z, 1.0))
    got = np.bincount(tok, minlength=3) / len(tok)
    assert abs(got[1] - 0.25) < 5 * np.sqrt(0.25 * 0.75 / len(tok))


# ----------------------------------------------------------------------------
# Host-side helpers
# ----------------------------------------------------------------------------


def _byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    # "Ċ" is the byte-level symbol for "\n", "Ġ" for a space.
    merges = [("Ċ", "Ċ"), (".", "ĊĊ"), ("ĊĊ", "Ċ"), ("Ġ", "Ċ"), ("a", "b")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok)
    hf.add_special_tokens({"eos_token": "<|im_end|>"})
    hf.add_tokens(["\n\n\n\n", "\n"])  # an added "\n" duplicate counts too
    return hf, vocab


def test_step_boundary_ids():
    hf, vocab = _byte_level_tokenizer()
    nl, dnl = S.step_boundary_ids(hf)
    added_nl = hf.convert_tokens_to_ids("\n")
    added_dnl = hf.convert_tokens_to_ids("\n\n\n\n")
    assert nl.dtype == np.int32 and dnl.dtype == np.int32
    assert sorted(nl.tolist()) == sorted([vocab["Ċ"], added_nl])
    assert sorted(dnl.tolist()) == sorted([vocab["ĊĊ"], vocab[".ĊĊ"], vocab["ĊĊĊ"], added_dnl])
    assert vocab["ĠĊ"] not in nl  # " \n" is not exactly a newline
    # And they work as config ids.
    S.ReSETConfig.create(t_low=0.1, tau0=0.5, nl_ids=nl, dnl_ids=dnl)


def test_calibrate_tau0():
    rng = np.random.default_rng(0)
    parts = [rng.exponential(size=n).astype(np.float32) for n in (10, 300, 57)]
    pooled = np.concatenate(parts).astype(np.float64)
    assert S.calibrate_tau0(parts) == pytest.approx(np.percentile(pooled, 80), rel=0, abs=0)
    assert S.calibrate_tau0(jnp.asarray(pooled), percentile=50) == float(np.median(pooled))
    assert isinstance(S.calibrate_tau0(parts), float)
    with pytest.raises(ValueError, match="at least one"):
        S.calibrate_tau0([])
    with pytest.raises(ValueError, match="at least one"):
        S.calibrate_tau0(np.zeros((0,)))
    with pytest.raises(ValueError, match="finite"):
        S.calibrate_tau0([np.array([0.1, np.nan])])


def test_entropy_is_accurate():
    """Compensated sums: within ~1e-6 relative of float64 at a Qwen-sized vocabulary."""
    rng = np.random.default_rng(6)
    z = rng.standard_normal((4, 151936), dtype=np.float32) * np.float32([[0.3], [1], [3], [9]])
    z64 = z.astype(np.float64)
    p = np.exp(z64 - z64.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = -(p * np.log(np.maximum(p, 1e-10))).sum(-1)
    np.testing.assert_allclose(jax.jit(S.token_entropy)(z), want, rtol=2e-6, atol=1e-6)
