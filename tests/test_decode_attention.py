"""Decode attention as one op (``reset_jax.attention.decode_attention``, ``fuse_attention``).

CPU: the XLA composition against a float64 reference written here from the
definitions (RMSNorm, rotate-half RoPE, the cache write, masked softmax), a model
with the op decoding bit for bit like the model without it, and the errors. GPU
(marked): the CUDA custom call against the same reference on many shapes, inside
a jitted layer loop with a traced layer index, and a model with the op against the
plain one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from reset_jax import attention, sampling
from reset_jax import decode as dec
from reset_jax.models import ModelConfig, build_model, fuse_attention

HAS_GPU = jax.default_backend() == "gpu"
gpu = pytest.mark.gpu


def _bf16(x: np.ndarray) -> np.ndarray:
    """Rounds float64 values to bfloat16 and back (the model's roundings)."""
    return np.asarray(jnp.asarray(np.asarray(x, np.float32), jnp.bfloat16), np.float64)


def _operands(b, hq, hkv, d, n_layers, t, seed, qk_norm=True):
    rng = np.random.default_rng(seed)

    def bf(*shape, s=1.0):
        return jnp.asarray(rng.standard_normal(shape) * s, jnp.bfloat16)

    positions = rng.integers(0, t, b).astype(np.int32)
    positions[0] = t - 1  # the last slot
    if b > 1:
        positions[1] = 0  # only the new token visible
    angles = positions[:, None] * (10000.0 ** (-np.arange(d // 2) * 2.0 / d))[None]
    return dict(
        q=bf(b, hq, d, s=2.0), k=bf(b, hkv, d, s=2.0), v=bf(b, hkv, d),
        cos=jnp.asarray(np.cos(angles), jnp.float32), sin=jnp.asarray(np.sin(angles), jnp.float32),
        positions=jnp.asarray(positions),
        k_cache=bf(n_layers, b, t, hkv, d), v_cache=bf(n_layers, b, t, hkv, d),
        q_norm=bf(d, s=0.3) + 1 if qk_norm else None, k_norm=bf(d, s=0.3) + 1 if qk_norm else None,
    )  # fmt: skip


def _reference(ops, layer, eps=1e-6):
    """float64 from the definitions; bf16 roundings where the model rounds."""
    f = {k: (None if v is None else np.asarray(v, np.float64)) for k, v in ops.items()}
    q, k, v = f["q"], f["k"], f["v"]
    b, hq, d = q.shape
    hkv = k.shape[1]

    def norm(x, w):
        inv = 1.0 / np.sqrt((x**2).mean(-1, keepdims=True) + eps)
        return _bf16(w * _bf16(x * inv))

    if f["q_norm"] is not None:
        q, k = norm(q, f["q_norm"]), norm(k, f["k_norm"])

    def rope(x):
        c, s = f["cos"][:, None], f["sin"][:, None]
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return _bf16(np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1))

    q, k = rope(q), rope(k)
    kc, vc = f["k_cache"].copy(), f["v_cache"].copy()
    pos = f["positions"].astype(int)
    out = np.zeros((b, hq, d))
    for r in range(b):
        kc[layer, r, pos[r]], vc[layer, r, pos[r]] = k[r], v[r]
        keys, vals = kc[layer, r, : pos[r] + 1], vc[layer, r, : pos[r] + 1]  # [t, Hkv, D]
        for h in range(hq):
            g = h // (hq // hkv)
            s = keys[:, g] @ q[r, h] * d**-0.5
            p = np.exp(s - s.max())
            out[r, h] = (p / p.sum()) @ vals[:, g]
    return out.reshape(b, hq * d), kc, vc


def _check(got, want, ops, layer, tol):
    out, kc, vc = (np.asarray(x, np.float64) for x in got)
    w_out, w_kc, w_vc = want
    assert np.isfinite(out).all()
    assert np.linalg.norm(out - w_out) / np.linalg.norm(w_out) <= tol
    pos = np.asarray(ops["positions"])
    written = np.zeros(kc.shape, bool)
    written[layer, np.arange(len(pos)), pos] = True
    # every slot but the written ones is untouched, bit for bit
    np.testing.assert_array_equal(kc[~written], np.asarray(ops["k_cache"], np.float64)[~written])
    np.testing.assert_array_equal(vc[~written], np.asarray(ops["v_cache"], np.float64)[~written])
    np.testing.assert_array_equal(vc[written], w_vc[written])
    # the new key: the reference's bf16 value, up to one bf16 step (rsqrt / summation order)
    np.testing.assert_allclose(kc[written], w_kc[written], rtol=2**-7, atol=1e-6)


def _call(ops, layer, implementation):
    kw = {k: v for k, v in ops.items() if k not in ("q_norm", "k_norm")}
    return jax.jit(
        lambda o, qn, kn: attention.decode_attention(
            **o, layer=layer, q_norm=qn, k_norm=kn, implementation=implementation
        )
    )(kw, ops["q_norm"], ops["k_norm"])


@pytest.mark.parametrize(
    ("b", "hq", "hkv", "d", "t", "qk_norm"),
    [(2, 4, 2, 16, 9, True), (3, 6, 2, 8, 70, False), (1, 2, 2, 16, 1, True)],
)
def test_xla_matches_float64_reference(b, hq, hkv, d, t, qk_norm):
    ops = _operands(b, hq, hkv, d, 3, t, seed=b + t, qk_norm=qk_norm)
    got = _call(ops, 1, "xla")
    _check(got, _reference(ops, 1), ops, 1, tol=1e-2)


def test_packed_projections_match_separate():
    ops = _operands(2, 6, 2, 16, 3, 20, seed=8)
    kw = {k: v for k, v in ops.items() if k not in ("q", "k", "v")}
    qkv = jnp.concatenate([ops[n].reshape(2, -1) for n in ("q", "k", "v")], axis=-1)
    got = attention.decode_attention_packed(qkv, 6, **kw, layer=1, implementation="xla")
    want = _call(ops, 1, "xla")
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    with pytest.raises(ValueError, match=r"is not \[B, \(Hq \+ 2 Hkv\) D\] = \[2, 128\]"):
        attention.decode_attention_packed(qkv, 4, **kw, layer=1)
    with pytest.raises(ValueError, match=r"num_heads \(Hq\) must be a positive int, got 0"):
        attention.decode_attention_packed(qkv[:, 96:], 0, **kw, layer=1)
    with pytest.raises(ValueError, match=r"qkv has 1 rows but the cache .* holds 2"):
        attention.decode_attention_packed(qkv[:1], 6, **kw, layer=1)


def test_bad_operands_are_named():
    ops = _operands(2, 4, 2, 16, 3, 9, seed=0)
    base = {k: v for k, v in ops.items() if k not in ("q_norm", "k_norm")}
    with pytest.raises(ValueError, match=r"k must be \[B, Hkv, D\]"):
        attention.decode_attention(**(base | {"k": ops["k"][:, :1]}), layer=0)
    with pytest.raises(ValueError, match="not a multiple of 2 kv heads"):
        attention.decode_attention(**(base | {"q": ops["q"][:, :3]}), layer=0)
    with pytest.raises(ValueError, match=r"cos must be \[B, D/2\]"):
        attention.decode_attention(**(base | {"cos": ops["cos"][:, :4]}), layer=0)
    with pytest.raises(ValueError, match="q_norm and k_norm go together"):
        attention.decode_attention(**base, layer=0, q_norm=ops["q_norm"])
    with pytest.raises(ValueError, match="unknown attention implementation 'triton'"):
        attention.decode_attention(**base, layer=0, implementation=("xla", "triton"))
    with pytest.raises(ValueError, match="layer 3 is out of range for a cache of 3 layers"):
        attention.decode_attention(**base, layer=3)


def test_negative_layer_counts_from_the_end():
    ops = _operands(2, 4, 2, 16, 3, 9, seed=4)
    a = _call(ops, -1, "xla")
    b = _call(ops, 2, "xla")
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


@pytest.mark.skipif(HAS_GPU, reason="checks the CPU refusal")
def test_cuda_request_on_cpu_is_refused_with_the_reason():
    ops = _operands(2, 4, 2, 64, 3, 9, seed=0)
    base = {k: v for k, v in ops.items() if k not in ("q_norm", "k_norm")}
    with pytest.raises(attention.AttentionUnavailableError, match="cuda: not on a CUDA GPU"):
        attention.decode_attention(**base, layer=0, implementation="cuda")
    out, _, _ = attention.decode_attention(**base, layer=0, implementation=("cuda", "xla"))
    assert out.shape == (2, 4 * 64)


def test_cuda_refusals_name_the_shape():
    ops = _operands(1, 4, 2, 16, 1, 4, seed=0)
    why = attention.cuda_unsupported_reason(ops["q"], ops["k"], ops["v"], ops["k_cache"])
    assert "head width 16" in why
    ops = _operands(1, 4, 2, 64, 1, 4, seed=0)
    kn = ops["k_norm"].astype(jnp.float32)
    why = attention.cuda_unsupported_reason(ops["q"], ops["k"], ops["v"], ops["k_cache"],
                                            ops["q_norm"], kn)  # fmt: skip
    assert "k_norm is float32" in why
    ops = _operands(1, 18, 1, 64, 1, 4, seed=0)
    why = attention.cuda_unsupported_reason(ops["q"], ops["k"], ops["v"], ops["k_cache"])
    assert "18 query heads per kv head" in why
    q32 = ops["q"].astype(jnp.float32)
    why = attention.cuda_unsupported_reason(q32, ops["k"], ops["v"], ops["k_cache"])
    assert "q is float32" in why
    # the grid limits, from shapes alone (nothing this large is allocated)
    bf = jnp.bfloat16
    q, kv = jax.ShapeDtypeStruct((1, 4, 64), bf), jax.ShapeDtypeStruct((1, 2, 64), bf)
    long_cache = jax.ShapeDtypeStruct((1, 1, 64 * 65535 + 1, 2, 64), bf)
    why = attention.cuda_unsupported_reason(q, kv, kv, long_cache)
    assert "65536 cache chunks of 64 slots" in why
    wide_q = jax.ShapeDtypeStruct((65536, 4, 64), bf)
    wide_kv = jax.ShapeDtypeStruct((65536, 2, 64), bf)
    why = attention.cuda_unsupported_reason(wide_q, wide_kv, wide_kv,
                                            jax.ShapeDtypeStruct((1, 65536, 8, 2, 64), bf))  # fmt: skip
    assert "B = 65536 rows:" in why


def _config(arch="Qwen3ForCausalLM", **kw) -> ModelConfig:
    return ModelConfig.from_hf(
        dict(
            architectures=[arch], vocab_size=257, hidden_size=64, intermediate_size=128,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=256,
            tie_word_embeddings=False, **kw,
        )
    )  # fmt: skip


@pytest.mark.parametrize("arch", ["Qwen3ForCausalLM", "Qwen2ForCausalLM"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_model_with_the_op_decodes_like_without(arch, dtype):
    """``implementation="xla"`` is the model's own composition: the same tokens and logits."""
    plain = build_model(_config(arch), dtype=dtype, seed=3)
    fused = build_model(_config(arch), dtype=dtype, seed=3)
    assert fuse_attention(fused, "xla") == 3
    assert all(ly.self_attn.decode_impl == ("xla",) for ly in fused.model.layers)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 257, (2, 7)), jnp.int32)

    def greedy(model):
        graphdef, params = nnx.split(model)
        knobs = dec.make_knobs(2, top_p=1.0, seed=0, stop_ids=(), max_new_tokens=6)
        st = dec.decode(graphdef, params, ids, jnp.asarray([7, 4], jnp.int32),
                        model.init_cache(2, 16), sampling.FixedTemperature.create(0.0), knobs,
                        max_new=6)  # fmt: skip
        return np.asarray(st.tokens)

    np.testing.assert_array_equal(greedy(plain), greedy(fused))

    def step(model):  # prefill, then one cached decode step: logits and caches
        cache = model.init_cache(2, 16)
        pos = jnp.broadcast_to(jnp.arange(7, dtype=jnp.int32), (2, 7))
        _, cache = model.forward(ids, pos, cache)
        hidden, cache = model.forward(ids[:, :1], jnp.full((2, 1), 7, jnp.int32), cache)
        return [np.asarray(x, np.float32) for x in (model.logits(hidden), cache.k, cache.v)]

    for a, b in zip(step(plain), step(fused)):
        if dtype == jnp.float32:  # the same composition: the same bits
            np.testing.assert_array_equal(a, b)
        else:  # bf16: fusion may keep a value in float32 in one program, not the other
            np.testing.assert_allclose(a, b, rtol=0, atol=2e-2 * np.abs(a).max())


def test_build_model_option_and_default_order():
    model = build_model(_config(), dtype=jnp.bfloat16, fuse_attention=True)
    assert all(ly.self_attn.decode_impl == ("cuda", "xla") for ly in model.model.layers)
    assert all(ly.self_attn.decode_impl is None for ly in build_model(_config()).model.layers)
    with pytest.raises(ValueError, match="expected names from"):
        fuse_attention(model, "triton")


# --------------------------------------------------------------------------
# GPU: the CUDA custom call
# --------------------------------------------------------------------------


@gpu
@pytest.mark.parametrize(
    ("b", "hq", "hkv", "d", "t", "qk_norm"),
    [
        (1, 32, 8, 128, 640, True),  # Qwen3-8B, several chunks
        (8, 32, 8, 128, 200, True),
        (3, 64, 8, 128, 65, True),  # Qwen3-32B: 8 query heads per kv head
        (2, 28, 4, 128, 130, False),  # R1-Distill-Qwen-7B (no q/k norm)
        (5, 15, 5, 64, 64, False),  # SmolLM2-360M: head width 64, group of 3
        (1, 4, 4, 64, 1, True),  # one slot; G = 1
        (4, 16, 8, 128, 300, True),  # Qwen3-0.6B / 1.7B: G = 2
        (2, 10, 2, 64, 129, True),  # G = 5, head width 64
        (16, 12, 2, 128, 1000, False),
        (2, 32, 8, 128, 1025, True),  # 17 chunks: 2 thread groups, the second one slot
        (2, 32, 8, 128, 2048, True),  # 32 chunks: 2 thread groups, both batches full
        (3, 16, 4, 64, 2100, True),  # 33 chunks: three batches over 4 groups (rescales)
        (2, 16, 4, 64, 5000, True),  # 79 chunks: five batches over the combine's 8 thread groups
        (1, 32, 8, 128, 9000, True),  # 141 chunks: group 0 walks batches 0, 4 and 8 online
    ],
)
def test_cuda_matches_float64_reference(b, hq, hkv, d, t, qk_norm):
    ops = _operands(b, hq, hkv, d, 3, t, seed=b * t + hq, qk_norm=qk_norm)
    got = _call(ops, 2, "cuda")
    _check(got, _reference(ops, 2), ops, 2, tol=5e-3)
    # The new key is the XLA op's bf16 value: the same roundings, in the same order
    # (rsqrt and summation order may move a rare one by one step).
    pos = np.asarray(ops["positions"])
    rows = np.arange(b)
    k_cuda = np.asarray(got[1], np.float32)[2, rows, pos]
    k_xla = np.asarray(_call(ops, 2, "xla")[1], np.float32)[2, rows, pos]
    np.testing.assert_allclose(k_cuda, k_xla, rtol=2**-7, atol=1e-30)
    assert (k_cuda == k_xla).mean() >= 0.99


@gpu
def test_cuda_in_a_layer_loop_with_a_traced_layer():
    """lax.fori_loop over layers (a traced layer index), caches donated; the XLA op agrees."""
    ops = _operands(2, 32, 8, 128, 4, 300, seed=11)
    kw = {k: v for k, v in ops.items() if k not in ("k_cache", "v_cache")}

    def run(impl):
        def body(i, carry):
            out, kc, vc = carry
            o, kc, vc = attention.decode_attention(
                **(kw | {"q": kw["q"] + out.reshape(kw["q"].shape) * 0.01}),
                k_cache=kc, v_cache=vc, layer=i, implementation=impl,
            )  # fmt: skip
            return o, kc, vc

        init = (jnp.zeros((2, 32 * 128), jnp.bfloat16), ops["k_cache"], ops["v_cache"])
        f = jax.jit(lambda c: jax.lax.fori_loop(0, 4, body, c), donate_argnums=0)
        return [np.asarray(x, np.float64) for x in f(jax.tree.map(jnp.copy, init))]

    (a, ka, va), (b, kb, vb) = run("cuda"), run("xla")
    assert np.linalg.norm(a - b) / np.linalg.norm(b) <= 1e-2
    np.testing.assert_array_equal(va, vb)
    np.testing.assert_allclose(ka, kb, rtol=2**-7, atol=1e-6)


@gpu
def test_model_with_cuda_attention_matches_plain():
    cfg = ModelConfig.from_hf(
        dict(architectures=["Qwen3ForCausalLM"], vocab_size=1000, hidden_size=256,
             intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6,
             max_position_embeddings=512, tie_word_embeddings=False)
    )  # fmt: skip
    plain = build_model(cfg, dtype=jnp.bfloat16, seed=1)
    fused = build_model(cfg, dtype=jnp.bfloat16, seed=1, fuse_attention=True)
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 1000, (2, 70)), jnp.int32)

    def logits(model):
        cache = model.init_cache(2, 100)
        pos = jnp.broadcast_to(jnp.arange(70, dtype=jnp.int32), (2, 70))
        _, cache = model.forward(ids, pos, cache)  # prefill: the composition
        out = []
        for step in range(3):  # decode steps: the custom call (fused model)
            nxt = ids[:, step : step + 1]
            hidden, cache = model.forward(nxt, jnp.full((2, 1), 70 + step, jnp.int32), cache)
            out.append(np.asarray(model.logits(hidden), np.float64))
        return np.stack(out)

    a, b = logits(plain), logits(fused)
    assert np.linalg.norm(a - b) / np.linalg.norm(a) <= 2e-2
