"""The Pallas NVFP4 backend beyond the shared backend test.

On CPU the kernel runs in Pallas interpret mode, so these tests check its
logic: tiling (odd N, K not a multiple of the K step, split K), the in-kernel
E2M1 / E4M3 decodes, the W4A4 activation pre-pass (bit for bit against the
format), capability refusals, and ``jit`` / ``vmap`` / ``scan``. The same
tests run the compiled Triton kernel when a GPU is present.
"""

from __future__ import annotations

import types
import zlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from reset_jax.nvfp4 import api, pallas
from reset_jax.nvfp4 import format as fmt

REL_TOL = 5e-3
ON_CPU = jax.default_backend() == "cpu"
TC = pallas.TileConfig


def _rng(*key) -> np.random.Generator:
    """A fresh generator per test case (different for every parameter set)."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _weight(rng: np.random.Generator, n: int, k: int) -> fmt.NVFP4Tensor:
    # Per-row magnitudes spread over 2**-6..2**6 so block scales cover much of E4M3.
    w = rng.standard_normal((n, k)) * np.exp2(rng.uniform(-6, 6, (n, 1)))
    return fmt.quantize(jnp.asarray(w, jnp.float32))


def _reference(x, q, activations, input_scale) -> np.ndarray:
    """float64 ``x_used @ dequantize(q).T``; ``x_used`` is the W4A4-quantized x."""
    k = q.shape[-1]
    x2 = jnp.asarray(x).reshape(-1, k)
    if activations == "nvfp4":
        qa = fmt.quantize_activations(x2, input_scale)
        xs = np.asarray(fmt.dequantize_blocks(qa), np.float64)
        xs = xs * np.asarray(qa.global_scale, np.float64).reshape(-1, 1)
    else:
        xs = np.asarray(x2.astype(jnp.float32), np.float64)
    w = np.asarray(fmt.dequantize_blocks(q), np.float64) * float(q.global_scale)
    return (xs @ w.T).reshape(*np.shape(x)[:-1], q.shape[0])


def _rel_err(y, r) -> float:
    y = np.asarray(jnp.asarray(y).astype(jnp.float32), np.float64)
    return float(np.linalg.norm(y - r) / np.linalg.norm(r))


def _check(y, x, q, activations, input_scale):
    assert y.shape == (*x.shape[:-1], q.shape[0])
    assert y.dtype == x.dtype
    y = np.asarray(jnp.asarray(y).astype(jnp.float32))
    # Interpret mode starts outputs as NaN-like garbage and Triton as whatever
    # memory held: every element must have been written with a finite value.
    assert np.isfinite(y).all()
    err = _rel_err(y, _reference(x, q, activations, input_scale))
    assert err <= REL_TOL, err


# --------------------------------------------------------------------------
# Correctness against float64
# --------------------------------------------------------------------------

# (N, K): odd N; K = 16 * odd, including SmolLM2's 576 (2.25 K steps of 256),
# 272 (a K step of 64 or 128 does not divide it), and K smaller than one step.
SHAPES = [(37, 576), (33, 272), (65, 48), (17, 16)]


@pytest.mark.parametrize("activations", ["bf16", "nvfp4"])
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", [1, 3, 8, 16])
def test_matches_float64_reference(m, n, k, activations):
    rng = _rng(m, n, k, activations)
    q = _weight(rng, n, k)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    # W4A4 alternates between the per-row and the calibrated global scale.
    input_scale = None if activations == "bf16" or m % 2 else jnp.float32(3.0 / 2688)
    y = pallas.matmul(x, q, activations=activations, input_scale=input_scale)
    _check(y, x, q, activations, input_scale)


@pytest.mark.parametrize("activations", ["bf16", "nvfp4"])
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.float32])
def test_other_activation_dtypes(dtype, activations):
    rng = _rng(str(dtype), activations)
    q = _weight(rng, 45, 208)
    x = jnp.asarray(rng.standard_normal((5, 208)), dtype)
    y = pallas.matmul(x, q, activations=activations, input_scale=None)
    _check(y, x, q, activations, None)
    if dtype == jnp.float32 and activations == "bf16":
        # The hi + lo bf16 split of f32 activations keeps ~16 mantissa bits.
        assert _rel_err(y, _reference(x, q, activations, None)) < 1e-4


@pytest.mark.parametrize(
    "config",
    [
        TC(block_n=16, block_k=64, split_k=3),  # split K, last split partly past K
        TC(block_n=64, block_k=128, split_k=2),  # one row tile, N < block_n
        TC(block_n=16, block_k=32, split_k=16),  # more splits than K steps
        TC(block_n=32, block_k=512),  # one K step longer than K
    ],
    ids=str,
)
def test_tile_configs(config):
    """The GPU tilings (split K, masked tails) compute the same function."""
    rng = _rng(tuple(config))
    m, n, k = 6, 83, 576
    q = _weight(rng, n, k)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    for activations, scale in (("bf16", None), ("nvfp4", jnp.float32(0.004))):
        y = pallas.matmul_with_config(
            x, q, activations=activations, input_scale=scale, config=config, interpret=ON_CPU
        )
        _check(y, x, q, activations, scale)


def test_gpu_default_config_in_interpret_mode():
    """The configuration a GPU would pick for a SmolLM2-sized layer, run here."""
    m, n, k = 2, 576, 1536
    config = pallas.default_config(m, n, k)
    rng = _rng("gpu-default")
    q = _weight(rng, n, k)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    y = pallas.matmul_with_config(x, q, config=config, interpret=ON_CPU)
    _check(y, x, q, "bf16", None)


def test_leading_axes_flatten_into_rows():
    rng = _rng("lead")
    q = _weight(rng, 31, 64)
    x = jnp.asarray(rng.standard_normal((2, 3, 64)), jnp.bfloat16)
    y = pallas.matmul(x, q)
    assert y.shape == (2, 3, 31)
    np.testing.assert_array_equal(
        np.asarray(y, np.float32),
        np.asarray(pallas.matmul(x.reshape(6, 64), q), np.float32).reshape(2, 3, 31),
    )
    _check(y, x, q, "bf16", None)


# --------------------------------------------------------------------------
# Decodes and the W4A4 pre-pass, bit for bit
# --------------------------------------------------------------------------


def test_e4m3_decode_all_bytes():
    b = np.arange(256, dtype=np.uint8)
    got = np.asarray(jax.jit(pallas._decode_e4m3)(jnp.asarray(b, jnp.int32)))
    want = np.abs(b.view(ml_dtypes.float8_e4m3fn).astype(np.float32)) * np.float32(2.0**14)
    finite = (b & 0x7F) != 0x7F
    np.testing.assert_array_equal(got[finite].view(np.uint32), want[finite].view(np.uint32))
    assert np.isnan(got[~finite]).all()


@pytest.mark.parametrize("shift", [0, 4])
def test_e2m1_decode_all_codes(shift):
    codes = np.arange(16, dtype=np.int32)
    # Put the code in the nibble under test and garbage in the other one.
    byte = (codes << shift) | ((codes[::-1] & 0xF) << (4 - shift))
    got = np.asarray(jax.jit(pallas._decode_e2m1, static_argnums=1)(jnp.asarray(byte), shift))
    want = fmt.E2M1_VALUES * np.float32(2.0**-14)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_activation_prepass_is_bit_exact(dtype, per_row):
    """``E2M1[code] * s`` and the global scale equal the format's quantizer's."""
    rng = _rng("prepass", str(dtype), per_row)
    m, k = 7, 576
    x = rng.standard_normal((m, k)) * np.exp2(rng.uniform(-10, 10, (m, 1)))
    x[0, :32] = 0.0  # zero blocks: scale 0 -> 1
    x[1] = 0.0  # an all-zero row: per-row global scale 1
    # E2M1 ties (x / d exactly on a midpoint) in the block of row 2 at [16, 32).
    x[2, 16:32] = np.array([6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5] * 2) * np.repeat([1, -1], 8)
    x = jnp.asarray(x, dtype)
    scale = None if per_row else jnp.float32(1.7e-3)
    v, g = jax.jit(pallas._activation_values)(x, scale)
    qa = fmt.quantize_activations(x, scale)
    want_v = np.asarray(fmt.dequantize_blocks(qa))
    np.testing.assert_array_equal(np.asarray(v, np.float32).view(np.uint32), want_v.view(np.uint32))
    want_g = np.broadcast_to(np.asarray(qa.global_scale, np.float32).reshape(-1), (m,))
    np.testing.assert_array_equal(np.asarray(g).view(np.uint32), want_g.view(np.uint32))


def test_nan_scale_poisons_its_output_column():
    """A NaN block scale (how the format marks non-finite blocks) reaches the output."""
    rng = _rng("nan")
    q = _weight(rng, 20, 64)
    bad = np.asarray(q.scales).view(np.uint8).copy()
    bad[5, 2] = 0x7F  # E4M3 NaN
    q = fmt.NVFP4Tensor(q.packed, jnp.asarray(bad.view(ml_dtypes.float8_e4m3fn)), q.global_scale)
    x = jnp.asarray(rng.standard_normal((3, 64)), jnp.bfloat16)
    y = np.asarray(pallas.matmul(x, q), np.float32)
    assert np.isnan(y[:, 5]).all()
    assert np.isfinite(np.delete(y, 5, axis=1)).all()


# --------------------------------------------------------------------------
# Transformations
# --------------------------------------------------------------------------


def test_jit_equals_eager():
    rng = _rng("jit")
    q = _weight(rng, 29, 96)
    x = jnp.asarray(rng.standard_normal((4, 96)), jnp.bfloat16)
    s = jnp.float32(0.01)
    f = jax.jit(lambda x, q, s: pallas.matmul(x, q, activations="nvfp4", input_scale=s))
    eager = pallas.matmul(x, q, activations="nvfp4", input_scale=s)
    np.testing.assert_array_equal(np.asarray(f(x, q, s)), np.asarray(eager))


def test_vmap_over_activations_and_weights():
    rng = _rng("vmap")
    b, m, n, k = 3, 2, 19, 80
    qs = [_weight(rng, n, k) for _ in range(b)]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *qs)
    xs = jnp.asarray(rng.standard_normal((b, m, k)), jnp.bfloat16)
    shared = jax.jit(jax.vmap(lambda x: pallas.matmul(x, qs[0])))(xs)
    both = jax.jit(jax.vmap(lambda x, q: pallas.matmul(x, q, activations="nvfp4")))(xs, stacked)
    for i in range(b):
        np.testing.assert_array_equal(
            np.asarray(shared[i]), np.asarray(pallas.matmul(xs[i], qs[0]))
        )
        one = pallas.matmul(xs[i], qs[i], activations="nvfp4")
        np.testing.assert_array_equal(np.asarray(both[i]), np.asarray(one))


def test_inside_scan():
    rng = _rng("scan")
    q = _weight(rng, 24, 48)
    xs = jnp.asarray(rng.standard_normal((3, 1, 48)), jnp.bfloat16)
    _, ys = jax.jit(lambda xs: jax.lax.scan(lambda c, x: (c, pallas.matmul(x, q)), 0, xs))(xs)
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(ys[i]), np.asarray(pallas.matmul(xs[i], q)))


# --------------------------------------------------------------------------
# Refusals and the chooser
# --------------------------------------------------------------------------


def _fake_gpu(monkeypatch, compute_capability):
    monkeypatch.setattr(pallas, "_platform", lambda x: "gpu")
    device = types.SimpleNamespace(compute_capability=compute_capability, core_count=132)
    monkeypatch.setattr(pallas, "_gpu_device", lambda: device)


def _small():
    q = fmt.quantize(jnp.ones((8, 32), jnp.float32))
    return jnp.ones((2, 32), jnp.bfloat16), q


def test_refuses_prefill():
    q = fmt.quantize(jnp.ones((8, 32), jnp.float32))
    with pytest.raises(NotImplementedError, match="M=17"):
        pallas.supports(jnp.ones((17, 32), jnp.bfloat16), q, activations="bf16")
    with pytest.raises(NotImplementedError, match="M=18"):
        pallas.matmul(jnp.ones((3, 6, 32), jnp.bfloat16), q)
    pallas.supports(jnp.ones((4, 4, 32), jnp.bfloat16), q, activations="nvfp4")


def test_refuses_other_platforms_and_old_gpus(monkeypatch):
    x, q = _small()
    monkeypatch.setattr(pallas, "_platform", lambda x: "tpu")
    with pytest.raises(NotImplementedError, match="tpu"):
        pallas.supports(x, q, activations="bf16")
    _fake_gpu(monkeypatch, "7.5")
    with pytest.raises(NotImplementedError, match=r"compute capability 7\.5"):
        pallas.supports(x, q, activations="bf16")
    _fake_gpu(monkeypatch, "gfx90a")  # ROCm reports architecture names
    with pytest.raises(NotImplementedError, match="NVIDIA"):
        pallas.supports(x, q, activations="bf16")
    for cc in ("8.0", "9.0", "10.0"):
        _fake_gpu(monkeypatch, cc)
        pallas.supports(x, q, activations="nvfp4")


def test_refuses_unsupported_dtype_and_mode():
    x, q = _small()
    with pytest.raises(NotImplementedError, match="int8"):
        pallas.supports(x.astype(jnp.int8), q, activations="bf16")
    with pytest.raises(NotImplementedError, match="activations"):
        pallas.supports(x, q, activations="fp8")


def test_chooser_reports_pallas_reason():
    x, q = _small()
    big = jnp.ones((32, 32), jnp.bfloat16)
    with pytest.raises(api.BackendUnavailableError, match=r"pallas: M=32 > 16"):
        api.matmul(big, q, implementation="pallas")
    reasons = dict(api.explain(big, q, implementation=("pallas", "xla")))
    assert "prefill" in reasons["pallas"] and reasons["xla"] is None
    if ON_CPU:
        assert dict(api.explain(x, q, implementation="pallas"))["pallas"] is None
        y = api.matmul(x, q, implementation="pallas")
        np.testing.assert_array_equal(np.asarray(y), np.asarray(pallas.matmul(x, q)))


def test_default_config_shapes():
    for m, n, k in [
        (1, 4096, 4096),
        (16, 24576, 4096),
        (1, 4096, 12288),
        (1, 576, 576),
        (3, 17, 16),
    ]:
        c = pallas.default_config(m, n, k)
        assert c.block_n >= 16 and c.block_n & (c.block_n - 1) == 0
        assert c.block_k >= 32 and c.block_k & (c.block_k - 1) == 0
        steps = -(-(k // 16) // (c.block_k // 16))
        assert 1 <= c.split_k <= steps
        # No split is left without K steps.
        per = -(-steps // c.split_k)
        assert (c.split_k - 1) * per < steps
    with pytest.raises(ValueError, match="block_n"):
        x, q = _small()
        pallas.matmul_with_config(x, q, config=TC(block_n=24, block_k=64))
