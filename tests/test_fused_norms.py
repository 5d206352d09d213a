"""Residual add + RMSNorm folded into the NVFP4 matmul after it (``nvfp4.fused``, ``fuse_norms``).

CPU: the composition the CUDA call must match, and a model with folded norms
decoding exactly like the same model without. GPU (marked): the CUDA custom
call against a float64 reference, and the folded model against the plain one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from reset_jax import decode as dec
from reset_jax import sampling
from reset_jax.models import ModelConfig, build_model, fuse_norms
from reset_jax.nvfp4 import format as fmt
from reset_jax.nvfp4 import fused

HAS_GPU = jax.default_backend() == "gpu"
gpu = pytest.mark.gpu


def _qwen3(**kw) -> ModelConfig:
    return ModelConfig.from_hf(
        dict(
            architectures=["Qwen3ForCausalLM"], vocab_size=257, hidden_size=64,
            intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0,
            max_position_embeddings=256, tie_word_embeddings=False, **kw,
        )
    )  # fmt: skip


def _operands(m: int, k: int, n: int, dtype, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)) * 3.0, dtype)
    h = jnp.asarray(rng.standard_normal((m, k)) * 0.5, dtype)
    w = jnp.asarray(0.5 + 0.2 * rng.standard_normal(k), dtype)
    q = fmt.quantize(jnp.asarray(rng.standard_normal((n, k)), jnp.float32))
    return x, h, w, q


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fallback_is_the_composition(dtype):
    x, h, w, q = _operands(3, 64, 40, dtype)
    y, r = jax.jit(lambda *a: fused.add_rms_norm_matmul(*a, 1e-6, q, implementation="xla"))(x, h, w)
    want_r = x + h
    want_y = jax.jit(
        lambda r: fused.api.matmul(fused.rms_norm(r, w, 1e-6), q, implementation="xla")
    )(want_r)
    np.testing.assert_array_equal(np.asarray(r, np.float32), np.asarray(want_r, np.float32))
    if dtype == jnp.float32:
        np.testing.assert_array_equal(np.asarray(y), np.asarray(want_y))
    else:
        # bf16: inside one jitted graph XLA may feed the norm x + h before its
        # bf16 rounding (--xla_allow_excess_precision), so the last bits differ.
        a, b = np.asarray(y, np.float64), np.asarray(want_y, np.float64)
        assert np.linalg.norm(a - b) / np.linalg.norm(b) <= 1e-2
    assert y.shape == (3, 40) and y.dtype == dtype and r.dtype == dtype


def test_rms_norm_formula():
    x = jnp.asarray([[3.0, -4.0], [0.0, 0.0]], jnp.float32)
    w = jnp.asarray([2.0, 0.5], jnp.float32)
    got = np.asarray(fused.rms_norm(x, w, 0.0))
    # rows: rms = sqrt((9 + 16) / 2); a zero row stays zero only with eps > 0
    np.testing.assert_allclose(got[0], [2 * 3 / np.sqrt(12.5), 0.5 * -4 / np.sqrt(12.5)], 1e-6)
    np.testing.assert_array_equal(np.asarray(fused.rms_norm(x, w, 1e-6))[1], [0.0, 0.0])


def test_bad_operands_are_named():
    x, h, w, q = _operands(2, 64, 8, jnp.float32)
    with pytest.raises(ValueError, match="must match x"):
        fused.add_rms_norm_matmul(x, h[:1], w, 1e-6, q)
    with pytest.raises(ValueError, match=r"norm weight \(32,\) must be \[64\]"):
        fused.add_rms_norm_matmul(x, h, w[:32], 1e-6, q)


@pytest.mark.skipif(HAS_GPU, reason="checks the CPU fallback")
def test_cuda_request_falls_back_on_cpu():
    x, h, w, q = _operands(2, 64, 8, jnp.bfloat16)
    y, r = fused.add_rms_norm_matmul(x, h, w, 1e-6, q, implementation=("cuda", "xla"))
    assert y.shape == (2, 8) and r.shape == (2, 64)
    with pytest.raises(fused.api.BackendUnavailableError, match="cuda: not on a CUDA GPU"):
        fused.add_rms_norm_matmul(x, h, w, 1e-6, q, implementation="cuda")


def _pair(config, dtype, **kw):
    plain = build_model(config, dtype=dtype, seed=5, quantize="nvfp4", **kw)
    folded = build_model(config, dtype=dtype, seed=5, quantize="nvfp4", fuse_norms=True, **kw)
    return plain, folded


def test_fuse_norms_switches_only_eligible_layers():
    plain, folded = _pair(_qwen3(), jnp.float32)
    assert [ly.fused_norms for ly in folded.model.layers] == [True] * 3
    assert not any(ly.fused_norms for ly in plain.model.layers)
    assert fuse_norms(plain) == 3
    # Dense weights, W4A4 activations or a q/k/v bias: nothing to fold into.
    dense = build_model(_qwen3(), dtype=jnp.float32)
    assert fuse_norms(dense) == 0
    w4a4 = build_model(_qwen3(), dtype=jnp.float32, quantize="nvfp4", activations="nvfp4")
    assert fuse_norms(w4a4) == 0
    qwen2 = ModelConfig.from_hf(
        dict(architectures=["Qwen2ForCausalLM"], vocab_size=97, hidden_size=32,
             intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
    )  # fmt: skip
    assert fuse_norms(build_model(qwen2, dtype=jnp.float32, quantize="nvfp4")) == 0
    # A norm weight in another dtype than the model's: that layer stays as it is.
    mixed = build_model(_qwen3(), dtype=jnp.float32, quantize="nvfp4")
    norm = mixed.model.layers[1].post_attention_layernorm.weight
    norm.set_value(norm.get_value().astype(jnp.bfloat16))
    assert fuse_norms(mixed) == 2 and not mixed.model.layers[1].fused_norms


def test_cuda_is_tried_only_first():
    """Another backend named first is used as named: the composition, not the fused call."""
    x, h, w, q = _operands(2, 64, 8, jnp.bfloat16)
    y, _ = fused.add_rms_norm_matmul(x, h, w, 1e-6, q, implementation=("xla", "cuda"))
    want = fused.api.matmul(fused.rms_norm(x + h, w, 1e-6), q, implementation="xla")
    a, b = np.asarray(y, np.float64), np.asarray(want, np.float64)
    assert np.linalg.norm(a - b) / np.linalg.norm(b) <= 1e-2
    with pytest.raises(ValueError, match=r"x has shape \(2, 48\); expected \[..., 64\]"):
        fused.add_rms_norm_matmul(x[:, :48], h[:, :48], w[:48], 1e-6, q)  # K mismatch


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_folded_model_matches_plain(dtype):
    """Uncached forward and a cached greedy decode: the same logits and tokens."""
    plain, folded = _pair(_qwen3(), dtype, implementation="xla")
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 257, (2, 9)), jnp.int32)
    a = np.asarray(
        jax.jit(lambda g, p, i: nnx.merge(g, p)(i), static_argnums=0)(*nnx.split(plain), ids)
    )
    b = np.asarray(
        jax.jit(lambda g, p, i: nnx.merge(g, p)(i), static_argnums=0)(*nnx.split(folded), ids)
    )
    if dtype == jnp.float32:
        np.testing.assert_array_equal(a, b)
    else:  # bf16: XLA may keep a sum in float32 in one graph and not the other
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-2 * np.abs(a).max())

    def greedy(model):
        graphdef, params = nnx.split(model)
        knobs = dec.make_knobs(2, top_p=1.0, seed=0, stop_ids=(), max_new_tokens=6)
        st = dec.decode(graphdef, params, ids, jnp.full((2,), 9, jnp.int32),
                        model.init_cache(2, 16), sampling.FixedTemperature.create(0.0), knobs,
                        max_new=6)  # fmt: skip
        return np.asarray(st.tokens)

    if dtype == jnp.float32:
        np.testing.assert_array_equal(greedy(plain), greedy(folded))


# --------------------------------------------------------------------------
# GPU: the CUDA custom call
# --------------------------------------------------------------------------


@gpu
# (1, 4096, 300) and (2, 4096, 6144): the wide kernel, norm applied while staging x;
# the others: the separate add + norm kernel, then the GEMV.
@pytest.mark.parametrize(
    ("m", "k", "n"),
    [(1, 4096, 300), (2, 4096, 6144), (2, 576, 17), (8, 4096, 1000), (16, 1024, 33)],
)
def test_cuda_call_matches_reference(m, k, n):
    from reset_jax.nvfp4 import cuda

    x, h, w, q = _operands(m, k, n, jnp.bfloat16, seed=m + k)
    y, r = jax.jit(lambda x, h, w: cuda.add_rms_norm_matmul(x, h, w, 1e-6, q))(x, h, w)
    want_r = np.asarray(x + h, np.float32)  # bf16 add: one rounding, as the kernel does
    np.testing.assert_array_equal(np.asarray(r, np.float32), want_r)
    r64 = want_r.astype(np.float64)
    inv = 1.0 / np.sqrt((r64**2).mean(-1, keepdims=True) + 1e-6)
    xn = np.asarray(jnp.asarray(r64 * inv, jnp.bfloat16), np.float64)  # rounded like the model
    xn = np.asarray(jnp.asarray(np.asarray(w, np.float64) * xn, jnp.bfloat16), np.float64)
    with jax.default_device(jax.devices("cpu")[0]):
        wq = np.asarray(
            fmt.dequantize(jax.device_put(q, jax.devices("cpu")[0]), jnp.float32), np.float64
        )
    want = xn @ wq.T
    got = np.asarray(y, np.float64)
    assert got.shape == (m, n) and np.isfinite(got).all()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 5e-3


@gpu
def test_folded_model_on_cuda_matches_plain():
    plain, folded = _pair(_qwen3(), jnp.bfloat16, implementation=("cuda", "xla"))
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 257, (2, 5)), jnp.int32)

    def last_logits(model):
        cache = model.init_cache(2, 8)
        pos = jnp.broadcast_to(jnp.arange(5, dtype=jnp.int32), (2, 5))
        hidden, cache = model.forward(ids, pos, cache)  # prefill (M = 10 rows)
        nxt = jnp.asarray([[3], [7]], jnp.int32)
        hidden, _ = model.forward(nxt, jnp.full((2, 1), 5, jnp.int32), cache)  # decode step
        return np.asarray(model.logits(hidden), np.float64)

    a, b = last_logits(plain), last_logits(folded)
    assert np.linalg.norm(a - b) / np.linalg.norm(a) <= 2e-2
