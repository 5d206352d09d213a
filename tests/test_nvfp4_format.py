"""NVFP4 format: bit-exact against the PyTorch reference and ml_dtypes casts.

Every comparison is on bits (codes, packed bytes, E4M3 bytes, float32 words),
never with a tolerance. Inputs stay in the normal float32 range: XLA on CPU
flushes subnormals, IEEE references do not (see ``format``'s docstring).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax import lax
from reference import torch_nvfp4 as ref

from reset_jax.nvfp4 import format as fmt
from reset_jax.nvfp4 import xla

F32 = np.float32
E4M3 = ml_dtypes.float8_e4m3fn
E2M1 = ml_dtypes.float4_e2m1fn
E2M1_TIES = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
# Where each tie goes under round-half-to-even (the neighbour with an even code).
E2M1_TIE_CODES = {0.25: 0, 0.75: 2, 1.25: 2, 1.75: 4, 2.5: 4, 3.5: 6, 5.0: 6}
SHAPE = (4, 64)  # one shape for the property tests: one compilation

PROPERTY = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


unpack = jax.jit(fmt.unpack_codes)


def bits(a) -> np.ndarray:
    """Raw bytes/words of an array, so that -0.0 != 0.0 and NaN == NaN."""
    a = np.asarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def mldtypes_codes_and_scales(x: np.ndarray, g: np.ndarray):
    """The spec in NumPy float32 with ml_dtypes doing both casts.

    Returns (codes uint8 [..., K], E4M3 bytes [..., K/16]).
    """
    x = x.astype(F32)
    g = np.asarray(g, F32)
    gb = g if g.ndim == 0 else g[..., None]
    xb = x.reshape(*x.shape[:-1], -1, 16)
    amax_b = np.abs(xb).max(axis=-1, keepdims=True)
    s = np.clip(amax_b / (F32(6) * gb), F32(0), F32(448)).astype(E4M3).astype(F32)
    s = np.where(s == 0, F32(1), s).astype(F32)
    codes = (xb / (s * gb)).astype(E2M1).view(np.uint8).reshape(x.shape)
    return codes, s[..., 0].astype(E4M3).view(np.uint8)


def assert_bit_exact(x: np.ndarray, global_scale=None, *, activations=False):
    """quantize / quantize_activations == torch reference == ml_dtypes, bit for bit."""
    x32 = np.asarray(x, F32)
    if activations:
        q = fmt.quantize_activations(x, global_scale)
        r = ref.quantize_activations(torch.from_numpy(x32), global_scale)
    else:
        q = fmt.quantize(x, global_scale)
        r = ref.quantize(torch.from_numpy(x32), global_scale)
    codes = np.asarray(unpack(q.packed))
    np.testing.assert_array_equal(bits(q.global_scale), bits(r.global_scale.numpy()))
    np.testing.assert_array_equal(bits(q.scales), r.scale_bits.numpy())
    np.testing.assert_array_equal(codes, r.codes.numpy())
    np.testing.assert_array_equal(np.asarray(q.packed), r.packed.numpy())
    deq = fmt.dequantize(q, jnp.float32)
    np.testing.assert_array_equal(bits(deq), bits(r.dequantized.numpy()))
    ml_codes, ml_scales = mldtypes_codes_and_scales(x32, r.global_scale.numpy())
    np.testing.assert_array_equal(codes, ml_codes)
    np.testing.assert_array_equal(bits(q.scales), ml_scales)
    return q


def _nudge(v: float, steps: int) -> F32:
    """``v`` moved ``steps`` float32 ulps (negative: towards -inf)."""
    x = F32(v)
    direction = F32(np.inf) if steps > 0 else F32(-np.inf)
    for _ in range(abs(steps)):
        x = np.nextafter(x, direction)
    return x


# E4M3 values >= 0 (bytes 0..126) and the midpoints between neighbours.
E4M3_VALUES = np.arange(127, dtype=np.uint8).view(E4M3).astype(np.float64)
E4M3_MIDPOINTS = (E4M3_VALUES[:-1] + E4M3_VALUES[1:]) / 2


# --------------------------------------------------------------------------
# Elementwise casts
# --------------------------------------------------------------------------


def test_e2m1_rounding_at_every_boundary():
    vals = []
    for t in (*E2M1_TIES, *fmt.E2M1_VALUES[:8].tolist(), 6.0, 7.0, 1e30):
        vals += [_nudge(t, k) for k in (-2, -1, 0, 1, 2) if t > 0]
    vals += [0.0, F32(np.finfo(F32).tiny)]
    v = np.array(vals, F32)
    v = np.concatenate([v, -v])
    got = np.asarray(jax.jit(fmt.encode_e2m1)(v))
    np.testing.assert_array_equal(got, v.astype(E2M1).view(np.uint8))
    np.testing.assert_array_equal(got, ref.round_e2m1(torch.from_numpy(v)).numpy())
    for t, code in E2M1_TIE_CODES.items():
        assert got[list(v).index(F32(t))] == code, t


def test_e2m1_negative_zero_convention():
    # The sign bit is signbit(x / d), as in the ml_dtypes cast: -0.0 and small
    # negatives encode as code 8; both decode to zero.
    v = np.array([-0.0, -0.1, 0.0, 0.1], F32)
    np.testing.assert_array_equal(np.asarray(jax.jit(fmt.encode_e2m1)(v)), [8, 8, 0, 0])
    assert fmt.E2M1_VALUES[8] == 0


def test_e4m3_scale_cast_at_every_tie():
    # global_scale = 1, so s = amax_b / 6: one block per target scale, with the
    # target at an exact E4M3 midpoint, next to it, or past 448 (clipped).
    targets = []
    for m in E4M3_MIDPOINTS:
        six_m = 6 * m  # exact: at most 7 significant bits
        targets += [_nudge(six_m, k) for k in (-1, 0, 1)]
    targets += [6 * v for v in (448.0, 460.0, 464.0, 465.0, 480.0, 1e4, 1e30)]
    targets += [_nudge(6 * 464.0, 1)]
    w = np.zeros((len(targets), 16), F32)
    w[:, 3] = targets
    w[:, 7] = -np.array(targets, F32) / 3
    q = assert_bit_exact(w, 1.0)
    s = np.asarray(q.scales).astype(F32)
    assert not np.isnan(s).any()
    np.testing.assert_array_equal(s[-8:], 448.0)  # saturated, never NaN
    # Exact midpoints go to the neighbour with the even mantissa.
    mid = s[1 : 3 * len(E4M3_MIDPOINTS) : 3]
    assert (np.asarray(mid.astype(E4M3)).view(np.uint8)[1:] % 2 == 0).all()


def test_division_free_encoding_equals_ieee_division():
    # XLA would turn x / d into x * (1/d) (and divides approximately on GPUs), so
    # the codes are computed without dividing; they must equal fl(x / d) rounded.
    rng = np.random.default_rng(5)
    n = 100_000
    d = (np.exp2(rng.integers(-20, 21, n)) * rng.uniform(1, 2, n)).astype(F32)
    near = (rng.choice(E2M1_TIES, n) * d).astype(F32)
    near = (near.view(np.int32) + rng.integers(-3, 4, n).astype(np.int32)).view(F32)
    wide = (rng.standard_normal(n) * np.exp2(rng.uniform(-12, 12, n))).astype(F32)
    x = np.concatenate([near, wide]) * rng.choice(np.array([-1, 1], F32), 2 * n)
    d = np.concatenate([d, d])
    got = np.asarray(jax.jit(fmt.encode_e2m1_scaled)(x, d))
    np.testing.assert_array_equal(got, (x / d).astype(E2M1).view(np.uint8))


def _division_operands(seed: int, n: int, exp_range: int, k_bits: int, ulps: int):
    """Random positive float32 ``a, b``; half of ``a`` within ``ulps`` of ``b * k`` (k an
    integer below ``2**k_bits``): quotients next to exact ones, the hardest to round."""
    rng = np.random.default_rng(seed)
    e = (-exp_range, exp_range + 1)
    a = (np.exp2(rng.integers(*e, n)) * rng.uniform(1, 2, n)).astype(F32)
    b = (np.exp2(rng.integers(*e, n)) * rng.uniform(1, 2, n)).astype(F32)
    k = rng.integers(1, 2**k_bits, n).astype(F32)
    near = rng.integers(-ulps, ulps + 1, n // 2, dtype=np.int32)
    a[: n // 2] = ((b * k)[: n // 2].view(np.int32) + near).view(F32)
    return a, b


def test_div_rn_is_correctly_rounded():
    a, b = _division_operands(6, 100_000, 60, 20, 1)
    a[:10] = 0
    got = np.asarray(jax.jit(fmt.div_rn)(a, b))
    np.testing.assert_array_equal(bits(got), bits(a / b))
    np.testing.assert_array_equal(bits(fmt.div_rn(F32(3.0), F32(2688.0))), bits(F32(3) / F32(2688)))


def test_div_rn_corrects_quotient_estimates_off_by_one(monkeypatch):
    """div_rn estimates each 12-bit digit with a float32 division, which on a GPU is
    approximate; an estimate one unit off either way must still give the IEEE quotient."""
    a, b = _division_operands(7, 200_000, 40, 24, 2)
    floor = jnp.floor

    def off_by_one(x):  # +1 or -1 (never below 0), chosen by a low bit of the estimate
        y = floor(x)
        flip = (lax.bitcast_convert_type(x, jnp.uint32) >> 3) & 1
        return jnp.maximum(y + jnp.where(flip == 1, 1.0, -1.0).astype(y.dtype), 0)

    monkeypatch.setattr(jnp, "floor", off_by_one)
    got = np.asarray(jax.jit(lambda u, v: fmt.div_rn(u, v))(a, b))  # a fresh trace
    np.testing.assert_array_equal(bits(got), bits(a / b))


# --------------------------------------------------------------------------
# Whole-tensor properties
# --------------------------------------------------------------------------


@st.composite
def tie_blocks(draw):
    """A [4, 64] tensor and a power-of-two global scale, rich in exact ties.

    With ``g = 2**a`` and a block whose largest element is ``6 * g * S`` the
    block scale is exactly ``S``; elements ``t * S * g`` then sit exactly on
    E2M1 boundaries (all these products have at most 7 significant bits).
    """
    a = draw(st.integers(-30, 30))
    g = F32(2.0**a)
    rows = []
    for _ in range(SHAPE[0] * SHAPE[1] // 16):
        kind = draw(st.sampled_from(["e2m1", "e4m3", "saturate", "zero", "random"]))
        if kind == "zero":
            rows.append(np.zeros(16, F32))
            continue
        if kind == "e2m1":
            scale = draw(st.sampled_from(E4M3_VALUES[1:].tolist()))
        elif kind == "e4m3":
            scale = draw(st.sampled_from(E4M3_MIDPOINTS.tolist()))
        elif kind == "saturate":
            scale = draw(st.sampled_from([460.0, 464.0, 465.0, 480.0, 1e3, 1e6]))
        else:
            scale = draw(st.floats(2.0**-20, 448.0, width=32))
        d = F32(scale) * g
        picks = draw(
            st.lists(
                st.sampled_from([*E2M1_TIES, *fmt.E2M1_VALUES[:8].tolist()]),
                min_size=15,
                max_size=15,
            )
        )
        nudges = draw(st.lists(st.integers(-1, 1), min_size=15, max_size=15))
        signs = draw(st.lists(st.booleans(), min_size=15, max_size=15))
        body = [
            # Zero is never nudged: its neighbours are subnormal.
            _nudge(F32(t) * d, k if t else 0) * (-1 if neg else 1)
            for t, k, neg in zip(picks, nudges, signs)
        ]
        block = np.array([F32(6) * d, *body], F32)
        rows.append(draw(st.permutations(block.tolist())))
    x = np.array(rows, F32).reshape(SHAPE)
    return x, g


@PROPERTY
@given(tie_blocks())
def test_ties_and_saturation_bit_exact(case):
    x, g = case
    q = assert_bit_exact(x, g)
    assert not np.isnan(np.asarray(q.scales).astype(F32)).any()
    deq = np.asarray(fmt.dequantize(q, jnp.float32))
    assert np.isfinite(deq).all()
    # Saturation: nothing dequantizes beyond 6 * 448 * g.
    assert np.abs(deq).max() <= 6 * 448 * g


@st.composite
def wide_range(draw):
    """A [4, 64] tensor whose blocks span up to 2**80 in magnitude, some all zero.

    The smallest possible max|x| is 2**-76, inside the exact range (``g >= 2**-91``).
    """
    base = draw(st.integers(-30, 60))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    mant = rng.uniform(1, 2, SHAPE)
    block_exp = rng.integers(-40, 41, (SHAPE[0], SHAPE[1] // 16, 1))
    elem_exp = block_exp + rng.integers(-6, 1, (SHAPE[0], SHAPE[1] // 16, 16))
    x = mant * np.exp2(base + elem_exp.reshape(SHAPE)) * rng.choice([-1, 1], SHAPE)
    x = x.astype(F32)
    zero = rng.random((SHAPE[0], SHAPE[1] // 16)) < 0.15
    x.reshape(SHAPE[0], -1, 16)[zero] = 0
    return x


@PROPERTY
@given(wide_range())
def test_wide_dynamic_range_bit_exact(x):
    assert_bit_exact(x)


@PROPERTY
@given(wide_range(), st.sampled_from([None, "given"]))
def test_activations_bit_exact(x, mode):
    input_scale = None if mode is None else F32(np.abs(x).max() / 2688 * 0.7)
    q = assert_bit_exact(x, input_scale, activations=True)
    expected = (SHAPE[0], 1) if mode is None else ()
    assert np.shape(q.global_scale) == expected
    fq = fmt.fake_quantize_activations(x, input_scale)
    np.testing.assert_array_equal(bits(fq), bits(fmt.dequantize(q, jnp.float32)))


def test_all_zero_blocks_use_scale_one():
    w = np.zeros((3, 48), F32)
    w[1, 16:32] = np.linspace(-2, 3, 16)
    q = assert_bit_exact(w)
    s = np.asarray(q.scales).astype(F32)
    assert s[0].tolist() == [1, 1, 1] and s[1, 0] == 1 and s[1, 2] == 1
    zeros = fmt.quantize(np.zeros((2, 32), F32))
    assert float(zeros.global_scale) == 1.0
    assert (bits(zeros.scales) == 0x38).all() and (np.asarray(zeros.packed) == 0).all()
    # -0.0 keeps its sign bit (code 8), and still dequantizes to zero.
    negzero = fmt.quantize(np.full((1, 16), -0.0, F32))
    assert (np.asarray(negzero.packed) == 0x88).all()
    assert (np.asarray(fmt.dequantize(negzero, jnp.float32)) == 0).all()


def test_bf16_and_f16_inputs_quantize_their_float32_values():
    x = np.random.default_rng(0).normal(size=(3, 32)).astype(F32)
    for dt in (jnp.bfloat16, jnp.float16):
        xd = jnp.asarray(x, dt)
        q = assert_bit_exact(np.asarray(xd, F32))
        qd = fmt.quantize(xd)
        assert qd.dtype == np.dtype(dt)
        for a, b in zip(jax.tree.leaves(qd), jax.tree.leaves(q)):
            np.testing.assert_array_equal(bits(a), bits(b))
        assert fmt.dequantize(qd).dtype == np.dtype(dt)


def test_packing_order_low_nibble_first():
    # g = 1 and a block max of 6 give d = 1, so codes are the E2M1 codes of w.
    vals = fmt.E2M1_VALUES[[1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 0, 7]]
    q = fmt.quantize(vals.reshape(1, 16), 1.0)
    assert np.asarray(q.packed)[0].tolist() == [0x21, 0x43, 0x65, 0x97, 0xBA, 0xDC, 0xFE, 0x70]
    np.testing.assert_array_equal(np.asarray(fmt.dequantize(q, jnp.float32))[0], vals)
    codes = np.random.default_rng(1).integers(0, 16, (5, 32), dtype=np.uint8)
    packed = np.asarray(jax.jit(fmt.pack_codes)(codes))
    np.testing.assert_array_equal(packed & 0xF, codes[:, 0::2])
    np.testing.assert_array_equal(packed >> 4, codes[:, 1::2])
    np.testing.assert_array_equal(np.asarray(unpack(packed)), codes)


def test_reference_dequantize_of_stored_tensors():
    # The checkpoint path: decode packed/scales/global as stored.
    w = np.random.default_rng(2).normal(size=(6, 64)).astype(F32)
    q = fmt.quantize(w)
    d = ref.dequantize(
        torch.from_numpy(np.array(q.packed)),
        torch.from_numpy(np.asarray(q.scales).astype(F32)),
        torch.tensor(np.asarray(q.global_scale)),
    )
    np.testing.assert_array_equal(bits(fmt.dequantize(q, jnp.float32)), bits(d.numpy()))


# --------------------------------------------------------------------------
# Transformations and the pytree
# --------------------------------------------------------------------------


def test_quantize_under_jit_matches_eager():
    w = np.random.default_rng(3).normal(size=(2, 3, 32)).astype(F32)
    for gs in (None, F32(0.01)):
        eager = fmt.quantize(w, gs)
        traced = jax.jit(fmt.quantize)(w, gs)
        for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(traced)):
            np.testing.assert_array_equal(bits(a), bits(b))
        assert traced.shape == (2, 3, 32)


def test_non_finite_under_jit_poisons_instead_of_saturating():
    w = np.ones((2, 32), F32)
    w[0, 3] = np.nan
    w[1, 20] = np.inf
    given = fmt.dequantize(jax.jit(fmt.quantize)(w, F32(0.01)), jnp.float32)
    nan_blocks = np.isnan(np.asarray(given)).reshape(2, 2, 16).all(-1)
    assert nan_blocks.tolist() == [[True, False], [False, True]]
    computed = fmt.dequantize(jax.jit(fmt.quantize)(w), jnp.float32)
    assert np.isnan(np.asarray(computed)).all()


def test_pytree_through_jit_vmap_scan_and_nnx():
    rng = np.random.default_rng(4)
    ws = rng.normal(size=(3, 8, 32)).astype(F32)
    layers = [fmt.quantize(w) for w in ws]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *layers)
    assert stacked.shape == (3, 8, 32) and np.shape(stacked.global_scale) == (3,)
    np.testing.assert_array_equal(
        bits(fmt.dequantize(stacked, jnp.float32)),
        bits(np.stack([np.asarray(fmt.dequantize(q, jnp.float32)) for q in layers])),
    )
    x = jnp.asarray(rng.normal(size=(2, 32)), jnp.float32)

    def body(h, q):
        assert q.shape == (8, 32)
        return h, xla.matmul(h, q, activations="bf16", input_scale=None)

    _, ys = jax.jit(lambda x, s: jax.lax.scan(body, x, s))(x, stacked)
    loop = [xla.matmul(x, q, activations="bf16", input_scale=None) for q in layers]
    np.testing.assert_array_equal(bits(ys), bits(jnp.stack(loop)))
    by_vmap = jax.vmap(fmt.quantize)(ws)
    for a, b in zip(jax.tree.leaves(by_vmap), jax.tree.leaves(stacked)):
        np.testing.assert_array_equal(bits(a), bits(b))
    assert jax.tree.structure(by_vmap) == jax.tree.structure(stacked)

    class Linear(nnx.Module):
        def __init__(self, q):
            self.w = nnx.data(q)

        def __call__(self, h):
            return xla.matmul(h, self.w, activations="bf16", input_scale=None)

    m = Linear(layers[0])
    graph, state = nnx.split(m)
    y = nnx.jit(lambda m, h: m(h))(nnx.merge(graph, state), x)
    np.testing.assert_array_equal(bits(y), bits(loop[0]))


def test_tensor_properties_and_constructor():
    q = fmt.quantize(jnp.ones((4, 32), jnp.bfloat16))
    assert q.shape == (4, 32) and q.ndim == 2 and q.dtype == np.dtype(jnp.bfloat16)
    assert q.nbytes == 4 * 16 + 4 * 2 + 4
    assert "Array" not in repr(q) and "(4, 32)" in repr(q)
    same = fmt.NVFP4Tensor(q.packed, q.scales, q.global_scale, shape=(4, 32))
    np.testing.assert_array_equal(np.asarray(fmt.dequantize(same)), np.ones((4, 32)))
    with pytest.raises(AttributeError):
        q.packed = q.packed
    with pytest.raises(ValueError, match="does not match"):
        fmt.NVFP4Tensor(q.packed, q.scales, q.global_scale, shape=(4, 64))
    with pytest.raises(ValueError, match="scales has shape"):
        fmt.NVFP4Tensor(q.packed, q.scales[:, :1], q.global_scale)
    with pytest.raises(TypeError, match="uint8"):
        fmt.NVFP4Tensor(q.packed.astype(jnp.int32), q.scales, q.global_scale)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        fmt.NVFP4Tensor(q.packed, q.scales.astype(jnp.float32), q.global_scale)


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------

_GOOD = np.ones((2, 32), F32)


@pytest.mark.parametrize(
    ("w", "gs", "err", "match"),
    [
        (np.ones((2, 24), F32), None, ValueError, r"K=24 must be a positive multiple of 16"),
        (np.ones((2, 0), F32), None, ValueError, r"K=0"),
        (np.float32(1), None, ValueError, "rank >= 1"),
        (np.ones((2, 32), np.int32), None, TypeError, "floating.*int32"),
        (np.ones((2, 32), bool), None, TypeError, "floating.*bool"),
        (np.ones((2, 32), np.complex64), None, TypeError, "floating"),
        (np.where(np.eye(2, 32) > 0, np.nan, 1).astype(F32), None, ValueError, "2 non-finite"),
        (np.full((2, 32), np.inf, F32), None, ValueError, "non-finite"),
        (_GOOD, 0.0, ValueError, "finite and > 0"),
        (_GOOD, -1.0, ValueError, "finite and > 0"),
        (_GOOD, float("nan"), ValueError, "finite and > 0"),
        (_GOOD, float("inf"), ValueError, "finite and > 0"),
        (_GOOD, 1e-46, ValueError, "finite and > 0"),  # 0 as float32
        (_GOOD, np.ones(2, F32), ValueError, "must be a scalar"),
    ],
)
def test_bad_input_errors(w, gs, err, match):
    with pytest.raises(err, match=match):
        fmt.quantize(w, gs)
    if gs is None:
        with pytest.raises(err, match=match):
            fmt.quantize_activations(w)
    else:
        with pytest.raises(err, match=match):
            fmt.quantize_activations(w, gs)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_non_finite_jax_arrays_are_counted_on_device(dtype):
    """A jax.Array is checked where it lives (no host copy); the error counts the bad values."""
    w = jnp.ones((4, 64), dtype).at[1, 3].set(jnp.nan).at[2, 5].set(-jnp.inf).at[3, 0].set(jnp.inf)
    with pytest.raises(ValueError, match=r"shape \(4, 64\) has 3 non-finite"):
        fmt.quantize(w)
    with pytest.raises(ValueError, match="3 non-finite"):
        fmt.quantize_activations(w)
    q = fmt.quantize(jnp.ones((4, 64), dtype))  # finite: no error
    assert q.shape == (4, 64)


def test_matmul_argument_errors():
    q = fmt.quantize(np.ones((8, 32), F32))
    x = jnp.ones((3, 32), jnp.bfloat16)
    check = fmt.check_matmul_args
    check(x, q, activations="bf16", input_scale=None)
    check(x, q, activations="nvfp4", input_scale=0.5)
    with pytest.raises(TypeError, match="NVFP4Tensor"):
        check(x, np.ones((8, 32)), activations="bf16", input_scale=None)
    with pytest.raises(ValueError, match=r"expected \[\.\.\., 32\]"):
        check(jnp.ones((3, 16)), q, activations="bf16", input_scale=None)
    with pytest.raises(TypeError, match=r"bfloat16, float16 or float32.*int32"):
        check(jnp.ones((3, 32), jnp.int32), q, activations="bf16", input_scale=None)
    with pytest.raises(ValueError, match=r"logical shape \[N, K\]"):
        check(x, fmt.quantize(np.ones((2, 8, 32), F32)), activations="bf16", input_scale=None)
    with pytest.raises(ValueError, match="activations='fp8'"):
        check(x, q, activations="fp8", input_scale=None)
    with pytest.raises(ValueError, match="only to activations='nvfp4'"):
        check(x, q, activations="bf16", input_scale=0.5)
    with pytest.raises(ValueError, match="finite and > 0"):
        check(x, q, activations="nvfp4", input_scale=-1.0)
    with pytest.raises(TypeError, match="NVFP4Tensor"):
        fmt.dequantize(np.ones((2, 16)))


def test_round_to_e4m3_matches_ml_dtypes_everywhere():
    # Every float32 bit pattern in [2**-12, 448] at a stride, plus 0 and the ties.
    lo, hi = F32(2.0**-12).view(np.uint32), F32(448).view(np.uint32)
    s = np.arange(lo, hi + 1, 61, dtype=np.uint32).view(F32)
    s = np.concatenate([s, [0, 448], E4M3_MIDPOINTS.astype(F32)])
    got = np.asarray(jax.jit(fmt.round_to_e4m3)(s))
    np.testing.assert_array_equal(bits(got), bits(s.astype(E4M3).astype(F32)))


# --------------------------------------------------------------------------
# The MMA word order (code_order="mma")
# --------------------------------------------------------------------------


def _kernel_mma_decode():
    """DecodeMmaOrderx8 of ffi/nvfp4_kernels.cuh, emulated from its source text.

    The rotate amounts, masks and multipliers are read from the kernel, so this test
    fails if the kernel's decode and the format's bit table ever disagree.
    """
    import pathlib
    import re

    src = (pathlib.Path(__file__).parents[1] / "ffi" / "nvfp4_kernels.cuh").read_text()
    body = src[src.index("void DecodeMmaOrderx8(") :]
    body = body[: body.index("\n}")]
    mask = np.uint32(0x81C081C0)
    # Each output: an optional pre-mask and multiply, or a rotate, then the pair mask.
    forms = re.findall(r"o\[(\d)\] = (.*);", body)
    assert [int(j) for j, _ in forms] == [0, 1, 2, 3], body
    u32 = np.uint32

    def one(expr, w):
        assert expr.endswith(f"& 0x{int(mask):X}u"), expr
        head = expr[: -len(f" & 0x{int(mask):X}u")]
        if head == "q":
            return w & mask
        if m := re.fullmatch(r"__funnelshift_l\(q, q, (\d+)\)", head):
            r = u32(int(m.group(1)))
            return ((w << r) | (w >> (u32(32) - r))) & mask
        if m := re.fullmatch(r"\(\(q & (0x[0-9A-Fa-f]+)u\) \* (\d+)u\)", head):
            return ((w & u32(int(m.group(1), 16))) * u32(int(m.group(2)))) & mask
        raise AssertionError(f"an output form this test does not know: {expr}")

    def decode(w):
        w = w.astype(u32)
        return [one(expr, w) for _, expr in forms]

    return decode


def _words(packed: np.ndarray) -> np.ndarray:
    return packed.reshape(-1, 4).astype(np.uint32) @ (
        np.uint32(1) << np.arange(0, 32, 8, dtype=np.uint32)
    )


def test_mma_order_table_is_a_permutation_matching_the_kernel_and_the_checkers():
    bits = [b for row in fmt._MMA_ORDER_BIT for b in row]
    assert sorted(bits) == list(range(32))
    import pathlib
    import re

    host = (pathlib.Path(__file__).parents[1] / "ffi" / "tests" / "host_util.h").read_text()
    table = host[host.index("kMmaOrderBit[8][4] = ") :]
    table = table[: table.index(";")]
    assert [int(v) for v in re.findall(r"\d+", table)[2:]] == bits


def test_mma_order_words_decode_to_the_e2m1_values_in_the_kernel():
    """Every code of every position of a word: the kernel's MMA-order decode of the
    converted word gives bf16 pairs equal to E2M1 value * 2**-126, i.e. exactly what its
    natural-order decode gives (and the MMA's inputs do not change)."""
    rng = np.random.default_rng(5)
    codes = rng.integers(0, 16, (4096, 8), dtype=np.uint8)
    codes[:16] = np.arange(16, dtype=np.uint8)[:, None]  # every code in every position
    packed = np.asarray(fmt.pack_codes(jnp.asarray(codes)))  # [4096, 4]
    words = _words(np.asarray(fmt._permute_words(jnp.asarray(packed), fmt._TO_MMA_MOVES)))
    out = _kernel_mma_decode()(words)  # 4 x [4096] uint32: (e_j, e_j+4) as bf16x2
    for j in range(4):
        for half, e in ((0, j), (1, j + 4)):
            b16 = (out[j] >> np.uint32(16 * half)) & np.uint32(0xFFFF)
            got = (b16.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)
            want = fmt.E2M1_VALUES[codes[:, e]].astype(np.float64) * 2.0**-126
            np.testing.assert_array_equal(got, want, err_msg=f"output {j} half {half}")


def test_code_order_round_trip_and_values():
    w = jnp.asarray(np.random.default_rng(9).standard_normal((24, 96)), jnp.float32)
    q = fmt.quantize(w)
    qm = fmt.to_code_order(q, "mma")
    assert q.code_order == "natural" and qm.code_order == "mma" and "code_order='mma'" in repr(qm)
    assert fmt.to_code_order(qm, "mma") is qm
    assert not np.array_equal(np.asarray(qm.packed), np.asarray(q.packed))
    back = fmt.to_code_order(qm, "natural")
    np.testing.assert_array_equal(np.asarray(back.packed), np.asarray(q.packed))
    np.testing.assert_array_equal(np.asarray(fmt.natural_packed(qm)), np.asarray(q.packed))
    # The direct read of MMA-order codes (what dequantize_blocks uses), every code value in
    # every position of a word, and under jit.
    codes = np.asarray(fmt.unpack_codes(q.packed))
    assert all(len(set(codes[:, e::8].ravel())) == 16 for e in range(8))
    np.testing.assert_array_equal(np.asarray(jax.jit(fmt.code_values)(qm)), codes)
    np.testing.assert_array_equal(np.asarray(fmt.code_values(q)), codes)
    np.testing.assert_array_equal(np.asarray(fmt.dequantize(qm, jnp.float32)),
                                  np.asarray(fmt.dequantize(q, jnp.float32)))  # fmt: skip
    # The order is static tree structure: it survives jit and tree maps.
    assert jax.jit(lambda t: t)(qm).code_order == "mma"
    assert jax.tree.map(lambda a: a, qm).code_order == "mma"
    assert jax.tree.structure(qm) != jax.tree.structure(q)
    with pytest.raises(ValueError, match="code_order='bogus'"):
        fmt.NVFP4Tensor(q.packed, q.scales, q.global_scale, code_order="bogus")
    with pytest.raises(ValueError, match="order='x'"):
        fmt.to_code_order(q, "x")


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("activations", ["bf16", "nvfp4"])
def test_mma_order_matmul_same_bits_on_cpu_backends(impl, activations):
    from reset_jax.nvfp4 import api

    rng = np.random.default_rng(11)
    q = fmt.quantize(jnp.asarray(rng.standard_normal((40, 128)), jnp.float32))
    x = jnp.asarray(rng.standard_normal((3, 128)), jnp.bfloat16)

    def mm(q):
        return api.matmul(x, q, activations=activations, implementation=impl)

    np.testing.assert_array_equal(
        np.asarray(mm(fmt.to_code_order(q, "mma")), np.float32), np.asarray(mm(q), np.float32)
    )


def _prmt_bytes(sel: int) -> list[int]:
    """PTX ``prmt.b32 d, lo, hi, sel`` (default mode): the byte of ``{hi, lo}`` (0..7) that
    each of d's four bytes takes."""
    return [(sel >> (4 * i)) & 7 for i in range(4)]


def test_s1_scale_bytes_match_the_mma_columns_in_the_kernel():
    """The wide kernel's S1 form (ffi/nvfp4_kernels.cuh) applies block scales to D columns:
    each lane's PRMT selectors, read from the kernel source, must pick for every D value it
    holds the scale of exactly the block that column sums (16-row tiles and K pairs).

    m16n8k16: lane (g, t) holds D columns 2t and 2t + 1; lane t' feeds K from its own code
    word w, block 4t' + w // 2 of the item (the scale byte of that offset). 16-row tiles:
    column n sums block 4 (n & 3) + 2P + (n >> 2) of word half P, and the lane loaded the
    item's scale bytes 8 (t & 1) .. + 7. K pairs: columns 0..3 item 2q, 4..7 item 2q + 1,
    word pair j; the lane loaded bytes 8t .. 8t + 7 of the pair's 32.
    """
    import pathlib
    import re

    src = (pathlib.Path(__file__).parents[1] / "ffi" / "nvfp4_kernels.cuh").read_text()
    m = re.search(r"sel = \(t >> 1\) \? (0x[0-9A-Fa-f]+)u : (0x[0-9A-Fa-f]+)u;", src)
    assert m, "S1 selector not found in the kernel source"
    sel_hi, sel_lo = int(m.group(1), 16), int(m.group(2), 16)
    kp = re.findall(r"q(?:01|23) = Prmt\(b\.s0, b\.s0h, (0x[0-9A-Fa-f]+)u\)", src)
    assert len(kp) == 2, "K-pair selectors not found in the kernel source"
    kp01, kp23 = (int(v, 16) for v in kp)
    for t in range(4):
        # 16-row tiles: q bytes (P0 e0, P0 e1, P1 e0, P1 e1), each a byte of the 8 loaded.
        got = [8 * (t & 1) + b for b in _prmt_bytes(sel_hi if t >> 1 else sel_lo)]
        for p in range(2):
            for e in range(2):
                n = 2 * t + e
                assert got[2 * p + e] == 4 * (n & 3) + 2 * p + (n >> 2), (t, p, e)
        # K pairs: for word pair j, (e0, e1) from q01 (j = 0, 1) or q23 (j = 2, 3).
        for j in range(4):
            sel = kp01 if j < 2 else kp23
            pair = _prmt_bytes(sel)[2 * (j & 1) : 2 * (j & 1) + 2]
            for e in range(2):
                n = 2 * t + e  # lanes t < 2: item 2q; t >= 2: item 2q + 1 (columns 4..7)
                want = 16 * (n >> 2) + 4 * (n & 3) + j
                assert 8 * t + pair[e] == want, (t, j, e)
