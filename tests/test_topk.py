"""The sampler's CUDA top-k (`sampling._top_k_cuda`, ffi/topk_kernels.{h,cu}) and its full
row sort (`sampling._sorted_descending`, ffi/sort_kernels.{h,cu}).

CPU: a NumPy model of the kernels' method (slice maxima, the threshold L, candidates,
their sort) against a stable sort of each row, so the claim the kernels rest on -- every
top-k element passes ``key >= L`` -- is tested on random, tied, clustered, masked and
adversarial rows; the launch arithmetic of the header (slice size, scratch words)
compiled with the host compiler, against the model and against the built library's
export; the dispatch (``cuda=True`` off a GPU raises, ``RESET_JAX_TOP_K``). GPU
(marked): the kernels against ``lax.top_k`` on the same rows, their exact flags against
the model's, and the sampler's tokens with the kernels against the staged top-k's. The sort: its order
(ties, signed zeros, infinities, NaNs) against NumPy on the CPU, its dispatch, and on a GPU
the CUDA sort against ``lax.sort`` bit for bit.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import build_host_program

from reset_jax import sampling as S

gpu = pytest.mark.gpu
CAP = S._TOPK_CUDA_CAP  # rjtopk::kCap (test_sampling_mirrors_the_header_constants)
ROW_WORDS = 4  # rjtopk::kRowWords


# ----------------------------------------------------------------------------
# The method, in NumPy
# ----------------------------------------------------------------------------


def keys(z: np.ndarray) -> np.ndarray:
    """The kernels' order key of float32 values (a total order: -0.0 below +0.0), as uint64."""
    u = np.ascontiguousarray(z, np.float32).view(np.uint32).astype(np.uint64)
    return np.where(u & 0x80000000, ~u & 0xFFFFFFFF, u | 0x80000000)


def slice_size(v: int, c: int) -> int:
    for s in (256, 128, 64):
        if -(-v // s) >= 2 * c:
            return s
    return 32


def model_top_k(row: np.ndarray, c: int) -> tuple[np.ndarray, bool, int]:
    """(indices [c], exact, candidates) of one row by the kernels' method."""
    v = row.shape[0]
    k = keys(row)
    s = slice_size(v, c)
    ns = -(-v // s)
    maxima = np.pad(k, (0, ns * s - v)).reshape(ns, s).max(axis=1)  # padding: key 0
    lo = np.sort(maxima)[::-1][c - 1] if ns >= c else 0
    cand = np.nonzero(k >= lo)[0]
    order = cand[np.lexsort((cand, -k[cand].astype(np.int64)))]  # key desc, index asc
    zeros = row[row == 0]
    both_zeros = np.signbit(zeros).any() and not np.signbit(zeros).all()
    signed_zeros = both_zeros and lo <= 0x80000000  # L at or below +0.0
    exact = len(cand) <= min(CAP, v) and not np.isnan(row).any() and not signed_zeros
    return order[:c], exact, len(cand)


def reference(row: np.ndarray, c: int) -> np.ndarray:
    """lax.top_k's indices: value descending, ties by index (rows without zeros of both
    signs, whose order XLA's GPU top-k does not keep to one rule)."""
    k = keys(row).astype(np.int64)
    return np.argsort(-k, kind="stable")[:c]


def rows(v: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    z = (rng.standard_normal(v) * 7).astype(np.float32)
    if kind == "bf16 ties":
        z = np.asarray(jnp.asarray(z, jnp.bfloat16).astype(jnp.float32))
    elif kind == "integer ties":
        z = np.round(z / 4)
    elif kind == "clustered":
        z[v // 3 : v // 3 + min(100, v // 3)] = 100 + np.arange(min(100, v // 3))
    elif kind == "masked":
        z[:] = -np.inf
        z[rng.integers(0, v, 400)] = rng.integers(0, 1000, 400) / 8
    elif kind in ("zeros on top", "-0.0 on top"):
        z = -1 - np.abs(z)
        both = kind == "zeros on top"
        z[rng.integers(0, v, 300)] = np.where((rng.random(300) < 0.5) & both, 0.0, -0.0)
    elif kind == "+0.0 at the threshold":  # L = +0.0 leaves the -0.0 out; XLA may take one
        z = -1 - np.abs(z)
        for j in range(min(300, v // 256)):
            z[256 * j + 200], z[256 * j + 10] = 0.0, -0.0
    elif kind == "all equal":
        z[:] = 0.5
    elif kind == "one slice holds the top":  # the threshold falls far: overflow, not error
        z[:5000] = 100 + rng.standard_normal(5000)
    return z


EXACT_KINDS = ("random", "bf16 ties", "clustered", "masked", "-0.0 on top")


@pytest.mark.parametrize("v,c", [(151936, 256), (151936, 20), (151936, 1024), (32000, 256),
                                 (49152, 256), (300, 256), (256, 256), (1000003, 256), (17, 5)])  # fmt: skip
@pytest.mark.parametrize("kind", EXACT_KINDS)
def test_method_keeps_every_top_k_element(v, c, kind):
    """Where the method says exact, it is lax.top_k's result; on these rows it says so."""
    rng = np.random.default_rng(v + c)
    if kind in ("masked", "-0.0 on top") and v < 1000:
        pytest.skip("300-400 special values need a longer row")
    row = rows(v, kind, rng)
    got, exact, n = model_top_k(row, c)
    if kind == "masked" and c > 400:  # the k-th value is -inf: every slice passes, too many
        assert not exact and n == v
        return
    assert exact, (kind, n)
    np.testing.assert_array_equal(got, reference(row, c))


def test_method_candidates_and_overflow():
    rng = np.random.default_rng(3)
    # Random rows of the Qwen3 vocabulary keep a few hundred candidates for k = 256.
    counts = [model_top_k(rows(151936, "random", rng), 256)[2] for _ in range(5)]
    assert all(256 <= n <= 600 for n in counts), counts
    # Rows whose values tie or crowd past the cap are reported, never wrong.
    assert not model_top_k(rows(151936, "zeros on top", rng), 256)[1]  # signed zeros: XLA's
    for c in (5, 16, 256):  # L = +0.0 and a -0.0 in the row: inexact, whatever the candidates
        row = rows(151936, "+0.0 at the threshold", rng)
        assert not model_top_k(row, c)[1]
        assert model_top_k(np.where(row == 0, 0.0, row).astype(np.float32), c)[1]  # one sign
    for kind in ("all equal", "one slice holds the top", "integer ties"):
        row = rows(151936, kind, rng)
        got, exact, n = model_top_k(row, 256)
        assert exact == (n <= CAP)
        if exact:
            np.testing.assert_array_equal(got, reference(row, 256))
    assert not model_top_k(rows(151936, "all equal", rng), 256)[1]
    assert not model_top_k(rows(5000, "random", rng), 256)[1]  # < k slices: every value
    row = rows(151936, "random", rng)
    row[77] = np.nan
    assert not model_top_k(row, 256)[1]


# ----------------------------------------------------------------------------
# The header's launch arithmetic, compiled on the CPU
# ----------------------------------------------------------------------------

PROGRAM = r"""
#include <cstdio>
#include "topk_kernels.h"
// Lines "B V C" -> "slice scratch_words".
int main() {
  int b, v, c;
  while (std::scanf("%d %d %d", &b, &v, &c) == 3)
    std::printf("%d %zu\n", rjtopk::TopkSliceSize(v, c), rjtopk::TopkScratchWords(b, v, c));
  return 0;
}
"""
SHAPES = [(1, 151936, 256), (8, 151936, 256), (3, 32000, 256), (2, 49152, 20), (5, 17, 5),
          (1, 1000003, 1024), (7, 300, 256), (70000, 40, 5)]  # fmt: skip


def scratch_words(b: int, v: int, c: int) -> int:
    ns = -(-v // slice_size(v, c))
    head = b * ns + b * ROW_WORDS
    sums = b * -(-ns // 8) * 2  # the collect's CTAs (8 slices each): a float64 sum each
    return head + (head & 1) + b * min(CAP, v) * 2 + sums


@pytest.fixture(scope="module")
def header_rules(tmp_path_factory):
    program = build_host_program(tmp_path_factory.mktemp("topk"), PROGRAM)
    out = program("".join(f"{b} {v} {c}\n" for b, v, c in SHAPES))
    return [tuple(int(x) for x in line.split()) for line in out.splitlines()]


def test_header_matches_the_method(header_rules):
    for (b, v, c), (s, words) in zip(SHAPES, header_rules, strict=True):
        assert s == slice_size(v, c), (b, v, c)
        assert words == scratch_words(b, v, c), (b, v, c)
    assert header_rules[0][0] == 256  # the Qwen3 vocabulary, k = 256: 594 slices of 256


def test_sampling_mirrors_the_header_constants(tmp_path):
    """The limits `sampling._cuda_top_k_reason` applies before it sends a call are the
    kernels' own: the candidates a row holds, the largest k, the narrowest slice."""
    program = build_host_program(
        tmp_path,
        r"""
#include <cstdio>
#include "topk_kernels.h"
int main() {
  std::printf("%d %d %d\n", rjtopk::kCap, rjtopk::kMaxC, rjtopk::TopkSliceSize(1, 1024));
  return 0;
}
""",
    )
    cap, max_c, min_slice = (int(x) for x in program("").split())
    assert (cap, max_c, min_slice) == (
        S._TOPK_CUDA_CAP,
        S._TOPK_CUDA_MAX_K,
        S._TOPK_CUDA_MIN_SLICE,
    )


def test_library_export_matches_the_header(header_rules):
    from reset_jax.nvfp4 import cuda

    if cuda.library_path() is None:
        pytest.skip("the CUDA library is not built (or predates this checkout)")
    got = [cuda.top_k_scratch_words(b, v, c) for b, v, c in SHAPES]
    assert got == [w for _, w in header_rules]


# ----------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------


def test_dispatch(monkeypatch):
    z = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3000)), jnp.float32)
    want = jax.lax.top_k(z, 64)
    if jax.default_backend() != "gpu":
        with pytest.raises(NotImplementedError, match=r"CUDA top-k cannot serve.*'cpu'"):
            S._top_k_candidates(z, 64, cuda=True)
    assert "int32" in S._cuda_top_k_reason((2, 3000), 64, jnp.int32)
    assert "k = 2000" in S._cuda_top_k_reason((2, 3000), 2000)
    assert "nothing to select" in S._cuda_top_k_reason((0, 3000), 64)
    assert "too short" in S._cuda_top_k_reason((2, 32000), 1024)  # 1000 slices of 32
    assert "too short" not in (S._cuda_top_k_reason((2, 4096), 1024) or "")  # 4096 fit
    for choice in ("lax", "staged", "auto"):
        monkeypatch.setenv("RESET_JAX_TOP_K", choice)
        _, i, exact = S._top_k_candidates(z, 64)  # eager: traced anew every call
        assert bool(exact)
        np.testing.assert_array_equal(np.asarray(i), np.asarray(want[1]), err_msg=choice)
    monkeypatch.setenv("RESET_JAX_TOP_K", "fast")
    with pytest.raises(ValueError, match="RESET_JAX_TOP_K"):
        S._top_k_candidates(z, 64)


def test_kernels_branch_is_chosen_by_the_lowering_platform(monkeypatch):
    """Where the default backend is a GPU but the call is lowered for the CPU (a CPU device
    of a GPU host), the CPU gets lax.top_k: here the kernels' branch is a stand-in that would
    give wrong indices, and the CPU must not run it."""
    monkeypatch.setattr(S, "_cuda_top_k_reason", lambda *a: None)

    def stand_in(z, c):
        b = z.shape[0]
        return jnp.zeros((b, c), z.dtype), jnp.zeros((b, c), jnp.int32), jnp.ones((b,), bool)

    monkeypatch.setattr(S, "_top_k_cuda", stand_in)
    x = np.random.default_rng(1).standard_normal((2, 3000)).astype(np.float32)
    with jax.default_device(jax.devices("cpu")[0]):
        _, i, exact = jax.jit(lambda z: S._top_k_candidates(z, 64))(jnp.asarray(x))
    assert bool(exact)
    np.testing.assert_array_equal(np.asarray(i), np.argsort(-x, axis=-1, kind="stable")[:, :64])


# ----------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------


@gpu
def test_cuda_top_k_is_lax_top_k():
    rng = np.random.default_rng(5)
    cases = {}
    for kind in (*EXACT_KINDS, "integer ties", "all equal", "one slice holds the top",
                 "zeros on top"):  # fmt: skip
        cases[kind] = (np.stack([rows(151936, kind, rng) for _ in range(3)]), 256)
    nan = np.stack([rows(151936, "random", rng) for _ in range(3)])
    nan[1, 77] = np.nan
    cases["NaN in row 1"] = (nan, 256)
    for v, c in ((32000, 256), (49152, 20), (300, 256), (1000003, 1024), (17, 5), (5000, 256)):
        cases[f"V {v} k {c}"] = (np.stack([rows(v, "random", rng) for _ in range(2)]), c)
    # One row and k <= 16, where XLA orders -0.0 and +0.0 as equal (and k = 256 at B > 1,
    # where it puts +0.0 first): the kernels must not vouch for either.
    for b, c in ((1, 5), (1, 16), (1, 256), (3, 16), (3, 256)):
        zeros = np.stack([rows(151936, "+0.0 at the threshold", rng) for _ in range(b)])
        cases[f"+0.0 at the threshold B {b} k {c}"] = (zeros, c)
        cases[f"zeros on top B {b} k {c}"] = (
            np.stack([rows(151936, "zeros on top", rng) for _ in range(b)]),
            c,
        )
        cases[f"random B {b} k {c}"] = (
            np.stack([rows(151936, "random", rng) for _ in range(b)]),
            c,
        )
    cand = jax.jit(functools.partial(S._top_k_candidates, cuda=True), static_argnums=1)
    per_row = jax.jit(S._top_k_cuda, static_argnums=1)
    exact_rows = 0
    for name, (x, c) in cases.items():
        want_v, want_i = jax.lax.top_k(jnp.asarray(x), c)
        v, i, exact = per_row(jnp.asarray(x), c)
        model = [model_top_k(r, c)[1] for r in x]
        np.testing.assert_array_equal(np.asarray(exact), model, err_msg=name)
        for r in np.nonzero(model)[0]:
            np.testing.assert_array_equal(np.asarray(i[r]), np.asarray(want_i[r]), err_msg=name)
            np.testing.assert_array_equal(  # bit for bit: the signs of zeros too
                np.asarray(v[r]).view(np.int32), np.asarray(want_v[r]).view(np.int32), err_msg=name
            )
            exact_rows += 1
        if S._cuda_top_k_reason(x.shape, c) is None:
            assert bool(cand(jnp.asarray(x), c)[2]) == all(model), name
        else:  # a row too short for its k: the sampler does not send it (every row overflows)
            assert not any(model) and "too short" in S._cuda_top_k_reason(x.shape, c), name
        # With its fallback the sampler's top-k is lax.top_k on every row.
        _, got_i = S._top_k_rows(jnp.asarray(x), c)
        np.testing.assert_array_equal(np.asarray(got_i), np.asarray(want_i), err_msg=name)
    assert exact_rows >= 30
    # bf16 values come back as bf16, the same as lax.top_k's.
    zb = jnp.asarray(cases["random"][0], jnp.bfloat16)
    for got, want in zip(S._top_k_rows(zb, 256), jax.lax.top_k(zb, 256), strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    # Rows outside `rows` do not make the result inexact.
    x = jnp.asarray(cases["NaN in row 1"][0])
    assert not bool(cand(x, 256)[2])
    assert bool(cand(x, 256, rows=jnp.asarray([True, False, True]))[2])


@gpu
def test_sampler_tokens_with_cuda_top_k_are_the_staged_ones(monkeypatch):
    """`sample` draws the same tokens whichever exact top-k gives its candidates: the CUDA
    kernels, which also divide by the temperatures and sum the logsumexp inside them
    (`_scaled_top_k`), or XLA's staged top-k over z with XLA's logsumexp. (The two
    logsumexps may differ in the last bit; these rows' kept sets are not that close to a
    top-p boundary.)"""
    rng = np.random.default_rng(12)
    logits = (rng.standard_normal((8, 151936)) * 6).astype(np.float32)
    logits[5, 1000:1200] = 30.0  # ties at the top
    t = np.array([0.0, 0.7, 0.7, 1.0, 0.7, 1.0, 0.6, 0.5], np.float32)
    top_p = np.array([1.0, 1.0, 0.9, 1.0, 0.5, 0.95, 0.95, 0.99], np.float32)
    top_k = np.array([0, 0, 0, 5, 40, 20, 20, 300], np.int32)

    def tokens(choice):  # RESET_JAX_TOP_K is read when the sampler is traced
        monkeypatch.setenv("RESET_JAX_TOP_K", choice)
        fn = jax.jit(
            lambda key, x: S._sample.__wrapped__(key, x, t, top_p, top_k, max_candidates=256)
        )
        return [np.asarray(fn(jax.random.key(seed), logits)) for seed in range(6)]

    kernels, staged = tokens("cuda"), tokens("staged")
    for got, want in zip(kernels, staged, strict=True):
        np.testing.assert_array_equal(got, want)


@gpu
def test_cuda_scaled_top_k_is_xla():
    """`_top_k_cuda_scaled`: the top-k of x / t (values bit for bit, as XLA divides) and
    its logsumexp, against XLA on the same rows."""
    rng = np.random.default_rng(21)
    x = (rng.standard_normal((8, 151936)) * 7).astype(np.float32)
    x[3, :200] = -np.inf  # masked tokens
    t = np.array([1.0, 0.6, 0.1, 1.3, 0.05, 0.6, 0.95, 2.0], np.float32)
    # Per-row counts (the sampler's hot rows at c = 384; 512 takes 512 sort threads): each
    # row's first counts[b], the rest -inf / 0, as the XLA form masks them.
    counts = jnp.asarray([384, 256, 1, 383, 256, 384, 300, 256], jnp.int32)
    for c, n in ((256, None), (1024, None), (384, counts), (512, counts + 128)):
        call = jax.jit(S._top_k_cuda_scaled, static_argnums=2)
        vals, idx, exact, log_norm = call(x, t, c) if n is None else call(x, t, c, n)
        z = jnp.asarray(x) / jnp.asarray(t)[:, None]
        want_v, want_i = S._mask_past_counts(*jax.lax.top_k(z, c), n)
        assert np.asarray(exact).all()
        np.testing.assert_array_equal(np.asarray(idx), np.asarray(want_i))
        np.testing.assert_array_equal(
            np.asarray(vals).view(np.uint32), np.asarray(want_v).view(np.uint32)
        )
        np.testing.assert_allclose(
            np.asarray(log_norm), np.asarray(jax.nn.logsumexp(z, axis=-1)), rtol=2e-7, atol=1e-6
        )
    # bf16 logits are divided as float32, as `_sample`'s XLA form does.
    xb = jnp.asarray(x, jnp.bfloat16)
    _, idx, _, log_norm = S._top_k_cuda_scaled(xb, jnp.asarray(t), 256)
    zb = xb / jnp.asarray(t)[:, None]
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(jax.lax.top_k(zb, 256)[1]))
    np.testing.assert_allclose(
        np.asarray(log_norm), np.asarray(jax.nn.logsumexp(zb, axis=-1)), rtol=2e-7, atol=1e-6
    )


def test_scaled_top_k_without_the_kernels(monkeypatch):
    """Off a GPU (or with ``RESET_JAX_TOP_K`` naming an XLA form) `_scaled_top_k` is the
    top-k of z = x / t and XLA's logsumexp of z; where the default backend is a GPU but the
    call is lowered for the CPU, the CPU takes that form, not the kernels' (a stand-in that
    would give wrong values here)."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 3000)).astype(np.float32) * 5
    t = np.array([1.0, 0.5, 0.7], np.float32)
    cpu = jax.devices("cpu")[0]

    def check(out, counts=None):
        # XLA's own quotient on the CPU: it divides by a broadcast as a multiply by the
        # reciprocal (not NumPy's bits).
        with jax.default_device(cpu):
            z = jnp.asarray(x) / jnp.asarray(t)[:, None]
            want_v, want_i = jax.lax.top_k(z, 64)
            want_ln = np.asarray(jax.nn.logsumexp(z, axis=-1))
        if counts is not None:  # past each row's count: -inf, index 0
            past = np.arange(64)[None, :] >= np.asarray(counts)[:, None]
            want_v = np.where(past, -np.inf, want_v)
            want_i = np.where(past, 0, want_i)
            assert past.any() and not past.all()
        vals, idx, exact, log_norm = (np.asarray(a) for a in out)
        assert bool(exact)
        np.testing.assert_array_equal(idx, np.asarray(want_i))
        np.testing.assert_array_equal(vals, np.asarray(want_v))
        np.testing.assert_allclose(log_norm, want_ln, rtol=1e-6)

    counts = jnp.asarray([64, 10, 1], jnp.int32)
    with jax.default_device(cpu):
        check(S._scaled_top_k(jnp.asarray(x), jnp.asarray(t), 64))
        check(S._scaled_top_k(jnp.asarray(x), jnp.asarray(t), 64, counts=counts), counts)
    monkeypatch.setattr(S, "_cuda_top_k_reason", lambda *a: None)

    def stand_in(x, t, c, counts=None):
        b = x.shape[0]
        zeros = jnp.zeros((b, c), jnp.int32)
        return x[:, :c], zeros, jnp.ones((b,), bool), jnp.zeros((b,), jnp.float32)

    monkeypatch.setattr(S, "_top_k_cuda_scaled", stand_in)
    monkeypatch.setattr(S, "_top_k_cuda", lambda z, c: stand_in(z, None, c)[:3])
    with jax.default_device(jax.devices("cpu")[0]):
        check(jax.jit(lambda x, t: S._scaled_top_k(x, t, 64))(jnp.asarray(x), jnp.asarray(t)))
    monkeypatch.setenv("RESET_JAX_TOP_K", "lax")
    with jax.default_device(cpu):
        check(S._scaled_top_k(jnp.asarray(x), jnp.asarray(t), 64))


# ----------------------------------------------------------------------------
# The full row sort
# ----------------------------------------------------------------------------


def _bits(v) -> np.ndarray:
    """Every value's bits, signed zeros too, but any NaN as one NaN: XLA's GPU sort writes
    NaNs back as 0x7fffffff, the CUDA sort and XLA's CPU sort keep the row's own."""
    v = np.asarray(v)
    return np.where(np.isnan(v), np.uint32(0x7FC00000), v.view(np.uint32))


def sort_reference(x: np.ndarray) -> np.ndarray:
    """Indices of each row by value, largest first, ties in index order, -0.0 equal to +0.0,
    NaNs last (any sign or payload)."""
    rank = np.where(np.isnan(x), -1, keys(np.where(x == 0, np.float32(0), x)).astype(np.int64))
    return np.argsort(-rank, axis=-1, kind="stable")


def special_rows(b: int, v: int, rng: np.random.Generator) -> np.ndarray:
    """Rows of quarter-integers (many ties, +0.0 among them) with -0.0, +-inf and NaNs of
    both signs and several payloads scattered in."""
    x = (np.round(rng.standard_normal((b, v)) * 8) / 4).astype(np.float32)
    flat = x.reshape(-1)
    at = rng.integers(0, flat.size, max(8, flat.size // 40))
    kind = rng.integers(0, 5, at.size)
    nan_bits = (0x7FC00000 | rng.integers(0, 1 << 16, at.size)).astype(np.uint32)
    nan_bits |= (rng.integers(0, 2, at.size).astype(np.uint32) << 31).astype(np.uint32)
    nans = nan_bits.view(np.float32)
    flat[at] = np.select(
        [kind == 0, kind == 1, kind == 2, kind == 3], [-0.0, np.inf, -np.inf, 0.0], nans
    )
    return x


def test_sorted_descending_order():
    """The contract both sorts meet (here lax.sort's): values descending, ties in index
    order, -0.0 equal to +0.0, NaNs last, every value's bits kept."""
    rng = np.random.default_rng(3)
    for x in (special_rows(3, 5000, rng), rng.standard_normal((2, 700)).astype(np.float32)):
        want = sort_reference(x)
        for fn in (S._sorted_descending, jax.jit(S._sorted_descending)):
            vals, idx = fn(jnp.asarray(x))
            np.testing.assert_array_equal(np.asarray(idx), want)
            np.testing.assert_array_equal(  # bit for bit, signed zeros too; NaNs as NaNs
                _bits(vals), _bits(np.take_along_axis(x, want, axis=-1))
            )


def test_sort_dispatch(monkeypatch):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 300)), jnp.float32)
    want = sort_reference(np.asarray(x))
    assert "int32" in S._cuda_sort_reason((2, 300), jnp.int32)
    assert "2**31" in S._cuda_sort_reason((2**16, 2**15))
    assert "2**31" in S._cuda_sort_reason((0, 300))
    assert "not [B, V]" in S._cuda_sort_reason((2, 3, 4))
    if jax.default_backend() != "gpu":
        with pytest.raises(NotImplementedError, match=r"CUDA row sort cannot serve.*'cpu'"):
            S._sorted_descending(x, cuda=True)
        monkeypatch.setenv("RESET_JAX_SORT", "cuda")
        with pytest.raises(NotImplementedError, match="CUDA row sort"):
            S._sorted_descending(x)
    for choice in ("xla", "auto"):
        monkeypatch.setenv("RESET_JAX_SORT", choice)
        np.testing.assert_array_equal(np.asarray(S._sorted_descending(x)[1]), want)
    monkeypatch.setenv("RESET_JAX_SORT", "cub")
    with pytest.raises(ValueError, match="RESET_JAX_SORT"):
        S._sorted_descending(x)


def test_sort_kernels_branch_is_chosen_by_the_lowering_platform(monkeypatch):
    """A GPU host's CPU device gets lax.sort: the kernels' branch is a stand-in giving wrong
    indices here, and the CPU must not run it."""
    monkeypatch.setattr(S, "_cuda_sort_reason", lambda *a: None)
    monkeypatch.setattr(S, "_sort_rows_cuda", lambda z: (z, jnp.zeros(z.shape, jnp.int32)))
    x = np.random.default_rng(1).standard_normal((2, 3000)).astype(np.float32)
    with jax.default_device(jax.devices("cpu")[0]):
        _, idx = jax.jit(S._sorted_descending)(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(idx), sort_reference(x))


def test_library_sort_scratch_query():
    """The library's scratch count: cub's size query needs a CUDA device, so without one it
    fails with a clear error, never a made-up size."""
    from reset_jax.nvfp4 import cuda

    if cuda.library_path() is None:
        pytest.skip("the CUDA library is not built (or predates this checkout)")
    with pytest.raises(ValueError, match="cannot serve"):
        cuda.sort_scratch_bytes(2**16, 2**15)
    n = 8 * 151936
    try:
        got = cuda.sort_scratch_bytes(8, 151936)
    except ValueError as e:  # no CUDA device for cub's query (JAX may still see a GPU off)
        assert "query failed" in str(e)
        assert jax.default_backend() != "gpu"
        return
    assert 20 * n <= got < 40 * n  # keys twice (16 B), one set of values (4 B), cub's storage


@gpu
def test_cuda_sort_is_lax_sort():
    rng = np.random.default_rng(9)
    cases = {
        "random B 1": (rng.standard_normal((1, 151936)) * 7).astype(np.float32),
        "random B 8": (rng.standard_normal((8, 151936)) * 3).astype(np.float32),
        "specials B 5": special_rows(5, 151936, rng),
        "V 17": rng.standard_normal((3, 17)).astype(np.float32),
        "70000 rows": rng.standard_normal((70000, 40)).astype(np.float32),
    }
    cases["bf16 ties B 3"] = np.asarray(
        jnp.asarray(cases["random B 8"][:3], jnp.bfloat16).astype(jnp.float32)
    )
    kernels = jax.jit(functools.partial(S._sorted_descending, cuda=True))
    xla = jax.jit(functools.partial(S._sorted_descending, cuda=False))

    for name, x in cases.items():
        vals, idx = kernels(jnp.asarray(x))
        want_v, want_i = xla(jnp.asarray(x))
        np.testing.assert_array_equal(np.asarray(idx), np.asarray(want_i), err_msg=name)
        np.testing.assert_array_equal(_bits(vals), _bits(want_v), err_msg=name)
        np.testing.assert_array_equal(  # the CUDA sort's values are z's own, NaN bits too
            np.asarray(vals).view(np.uint32),
            np.take_along_axis(x, np.asarray(idx), axis=-1).view(np.uint32),
            err_msg=name,
        )
        if x.shape[0] <= 8:
            np.testing.assert_array_equal(np.asarray(idx), sort_reference(x), err_msg=name)
    zb = jnp.asarray(cases["random B 8"], jnp.bfloat16)
    got, want = kernels(zb), xla(zb)
    assert got[0].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
