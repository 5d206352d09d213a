"""Whole decoder layers per decode step (``reset_jax.decoder_layers``, ``fuse_decoder``).

CPU: the chained path (its XLA composition) decodes exactly like the per-layer path it
replaces, for Qwen3 (q/k norms) and Llama (none), one call per layer or per model; the
fallback and argument errors. GPU (marked): the custom call (PDL on and off, per layer
and per model) against the per-layer CUDA path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from reset_jax import decode as dec
from reset_jax import decoder_layers, nvfp4, sampling
from reset_jax.models import ModelConfig, build_model, fuse_decoder, model_tensors
from reset_jax.nvfp4 import cuda as nvfp4_cuda

HAS_GPU = jax.default_backend() == "gpu"
gpu = pytest.mark.gpu


def _config(family: str = "Qwen3ForCausalLM", head_dim: int = 16, hidden: int = 64, **kw):
    extra = dict(head_dim=head_dim) if family.startswith("Qwen3") else {}
    return ModelConfig.from_hf(
        dict(
            architectures=[family], vocab_size=257, hidden_size=hidden,
            intermediate_size=2 * hidden, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
            max_position_embeddings=256, tie_word_embeddings=False, **extra, **kw,
        )
    )  # fmt: skip


def _models(config, dtype, chain_kw, **kw):
    """(per-layer fused path, chained path) of the same random weights."""
    base = dict(dtype=dtype, seed=3, quantize="nvfp4", fuse_norms=True, fuse_attention=True, **kw)
    plain = build_model(config, **base)
    chained = build_model(config, **base)
    assert fuse_decoder(chained, **chain_kw) == config.num_layers
    return plain, chained


def _decode(model, ids, new: int = 5):
    """Greedy tokens and the last step's hidden state through the jitted decode loop."""
    b, s = ids.shape
    graphdef, params = nnx.split(model)
    knobs = dec.make_knobs(b, top_p=1.0, seed=0, stop_ids=(), max_new_tokens=new)
    st = dec.decode(graphdef, params, ids, jnp.full((b,), s, jnp.int32),
                    model.init_cache(b, s + new + 2), sampling.FixedTemperature.create(0.0),
                    knobs, max_new=new)  # fmt: skip

    def step(graphdef, params, cache):  # one more decode step: hidden [B, 1, D]
        m = nnx.merge(graphdef, params)
        pos = jnp.full((b, 1), s + new, jnp.int32)
        return m.forward(st.tokens[:, -1:], pos, cache)[0]

    hidden = jax.jit(step, static_argnums=0)(graphdef, params, st.cache)
    return np.asarray(st.tokens), np.asarray(hidden, np.float32)


@pytest.mark.parametrize(
    ("family", "mode"),
    [("Qwen3ForCausalLM", "layer"), ("Qwen3ForCausalLM", "model"), ("LlamaForCausalLM", "model")],
)
def test_chained_path_matches_per_layer_path(family, mode, monkeypatch):
    calls = []
    real = decoder_layers._xla
    monkeypatch.setattr(decoder_layers, "_xla", lambda *a: calls.append(len(a[7])) or real(*a))
    plain, chained = _models(_config(family), jnp.float32, dict(mode=mode, implementation="xla"),
                             implementation="xla")  # fmt: skip
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 257, (2, 7)), jnp.int32)
    tok_a, hid_a = _decode(plain, ids)
    tok_b, hid_b = _decode(chained, ids)
    # The chained path ran, in calls of one layer or of all three.
    assert calls and set(calls) == ({1} if mode == "layer" else {3})
    np.testing.assert_array_equal(tok_a, tok_b)
    np.testing.assert_array_equal(hid_a, hid_b)


def test_chained_path_bf16_and_prefill_untouched():
    plain, chained = _models(_config(), jnp.bfloat16, dict(mode="layer", implementation="xla"),
                             implementation="xla")  # fmt: skip
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 257, (3, 6)), jnp.int32)
    tok_a, hid_a = _decode(plain, ids)
    tok_b, hid_b = _decode(chained, ids)
    np.testing.assert_array_equal(tok_a, tok_b)
    np.testing.assert_allclose(hid_a, hid_b, rtol=0, atol=2e-2 * np.abs(hid_a).max())


@pytest.mark.skipif(HAS_GPU, reason="checks the CPU fallback")
def test_default_falls_back_to_per_layer_path_on_cpu(monkeypatch):
    called = []
    monkeypatch.setattr(decoder_layers, "decode_layers", lambda *a, **k: called.append(1))
    plain, chained = _models(_config(), jnp.float32, dict(mode="model"))
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 257, (1, 5)), jnp.int32)
    tok_a, hid_a = _decode(plain, ids)
    tok_b, hid_b = _decode(chained, ids)
    assert not called  # the custom call cannot serve a CPU step: the per-layer path ran
    np.testing.assert_array_equal(tok_a, tok_b)
    np.testing.assert_array_equal(hid_a, hid_b)


def _layer_args(model, b: int = 2):
    c = model.config
    weights = [layer.chain_weights() for layer in model.model.layers]
    cache = model.init_cache(b, 16)
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((b, c.hidden_size)), model.dtype)
    cos = jnp.ones((b, c.head_dim // 2), jnp.float32)
    pos = jnp.asarray([3] * b, jnp.int32)
    return x, jnp.zeros_like(x), cos, 0 * cos, pos, cache.k, cache.v, weights


@pytest.mark.skipif(HAS_GPU, reason="checks the CPU errors")
def test_errors_name_the_problem():
    model = build_model(_config(), dtype=jnp.float32, seed=1, quantize="nvfp4", fuse_norms=True)
    x, h, cos, sin, pos, ck, cv, w = _layer_args(model)
    with pytest.raises(
        decoder_layers.DecoderLayersUnavailableError, match="cuda: not on a CUDA GPU"
    ):
        decoder_layers.decode_layers(
            x, h, cos, sin, pos, ck, cv, w, eps=1e-6, implementation="cuda"
        )
    with pytest.raises(ValueError, match="expected names from"):
        decoder_layers.decode_layers(x, h, cos, sin, pos, ck, cv, w, eps=1e-6, implementation="tpu")
    with pytest.raises(ValueError, match="do not fit the cache's 3 layers"):
        decoder_layers.decode_layers(x, h, cos, sin, pos, ck, cv, w, 1, eps=1e-6)
    with pytest.raises(ValueError, match="x has 1 rows but the cache"):
        decoder_layers.decode_layers(x[:1], h[:1], cos[:1], sin[:1], pos[:1], ck, cv, w, eps=1e-6)
    swapped = [w[0]._replace(o=w[0].down, down=w[0].o)]
    with pytest.raises(ValueError, match=r"layer 0: o is \(64, 128\), expected \(64, 64\)"):
        decoder_layers.decode_layers(x, h, cos, sin, pos, ck, cv, swapped, eps=1e-6)
    with pytest.raises(ValueError, match="no layers"):
        decoder_layers.decode_layers(x, h, cos, sin, pos, ck, cv, [], eps=1e-6)
    # The composition runs and updates the cache layer it was given.
    x2, h2, ck2, _ = decoder_layers.decode_layers(x, h, cos, sin, pos, ck, cv, w[1:2], 1, eps=1e-6)
    assert x2.shape == h2.shape == x.shape and np.isfinite(np.asarray(h2)).all()
    assert np.abs(np.asarray(ck2[1, :, 3])).sum() > 0 and not np.asarray(ck2[0]).any()


def test_interleave_gate_up_moves_rows_in_groups_of_eight():
    rng = np.random.default_rng(5)
    f, k = 24, 64
    w = nvfp4.quantize(jnp.asarray(rng.standard_normal((2 * f, k)), jnp.float32))
    wi = decoder_layers.interleave_gate_up(w)
    dense = np.asarray(nvfp4.dequantize(w, jnp.float32))
    dense_i = np.asarray(nvfp4.dequantize(wi, jnp.float32))
    for i in range(f // 8):  # tile i: gate rows 8i..8i+7, then the matching up rows
        np.testing.assert_array_equal(dense_i[16 * i : 16 * i + 8], dense[8 * i : 8 * i + 8])
        np.testing.assert_array_equal(
            dense_i[16 * i + 8 : 16 * i + 16], dense[f + 8 * i : f + 8 * i + 8]
        )
    x = jnp.asarray(rng.standard_normal((3, k)), jnp.float32)
    gate, up = decoder_layers.deinterleave_gate_up(nvfp4.matmul(x, wi, implementation="xla"))
    y = nvfp4.matmul(x, w, implementation="xla")
    np.testing.assert_array_equal(gate, y[:, :f])
    np.testing.assert_array_equal(up, y[:, f:])
    with pytest.raises(ValueError, match="F a multiple of 8"):
        decoder_layers.interleave_gate_up(nvfp4.quantize(jnp.ones((2 * 12, k), jnp.float32)))


def test_interleaved_gate_up_same_result_in_the_composition():
    model = build_model(_config(), dtype=jnp.float32, seed=2, quantize="nvfp4", fuse_norms=True)
    x, h, cos, sin, pos, ck, cv, w = _layer_args(model)
    wi = [lw._replace(gate_up=decoder_layers.interleave_gate_up(lw.gate_up)) for lw in w]
    a = decoder_layers.decode_layers(x, h, cos, sin, pos, ck, cv, w, eps=1e-6)
    b = decoder_layers.decode_layers(x, h, cos, sin, pos, ck, cv, wi, eps=1e-6,
                                     gate_up_interleaved=True)  # fmt: skip
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    # Interleaved rows read as stacked ones give another (wrong) result: the flag matters.
    c = decoder_layers.decode_layers(x, h, cos, sin, pos, ck, cv, wi, eps=1e-6)
    assert not np.array_equal(np.asarray(a[1]), np.asarray(c[1]))


def test_fuse_decoder_interleaves_gate_up_once():
    config = _config()
    plain = build_model(config, dtype=jnp.float32, seed=4, quantize="nvfp4", fuse_norms=True)
    model = build_model(config, dtype=jnp.float32, seed=4, quantize="nvfp4", fuse_decoder="model")
    stacked = build_model(config, dtype=jnp.float32, seed=4, quantize="nvfp4", fuse_decoder="model",
                          interleave_gate_up=False)  # fmt: skip
    gu = [ly.mlp.gate_up for ly in model.model.layers]
    assert all(g.interleaved for g in gu) and not stacked.model.layers[0].mlp.gate_up.interleaved
    assert not plain.model.layers[0].mlp.gate_up.interleaved
    assert fuse_decoder(model, "model") == 3 and gu[0].interleaved  # idempotent
    want = plain.model.layers[0].mlp.gate_up.linears[0].weight.get_value()
    got = gu[0].linears[0].weight.get_value()
    # fuse_decoder's default order: MMA (the CUDA kernels' faster decode) where they serve
    assert got.code_order == ("mma" if nvfp4_cuda.device_reason(got.packed) is None else "natural")
    np.testing.assert_array_equal(
        nvfp4.format.natural_packed(got), decoder_layers.interleave_gate_up(want).packed
    )
    # Every path through the group still sees (gate, up) and the parts side by side.
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, config.hidden_size)), jnp.float32)
    for a, b in zip(gu[0](x), plain.model.layers[0].mlp.gate_up(x)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(gu[0].packed(x), plain.model.layers[0].mlp.gate_up.packed(x))
    # A checkpoint written from the interleaved model holds the original gate / up tensors.
    want_t, got_t = model_tensors(plain), model_tensors(model)
    assert want_t.keys() == got_t.keys()
    for name in want_t:
        np.testing.assert_array_equal(got_t[name], want_t[name], err_msg=name)


def test_fuse_decoder_keeps_chained_codes_in_mma_order_with_the_same_results(monkeypatch):
    """``fuse_decoder``'s ``code_order``: the chained layers' four NVFP4 weights change order
    once; decoding gives the same bits as with natural codes; not for an XLA-only chain."""
    config = _config()
    kw = dict(dtype=jnp.float32, seed=6, quantize="nvfp4", fuse_norms=True, fuse_attention=True)
    mma, natural, xla_only = (build_model(config, **kw) for _ in range(3))
    assert fuse_decoder(mma, "model", code_order="mma") == 3
    assert fuse_decoder(natural, "model", code_order="natural") == 3
    assert fuse_decoder(xla_only, "model", code_order="mma", implementation="xla") == 3

    def orders(model):
        return {
            lin.weight.get_value().code_order
            for ly in model.model.layers
            for lin in (ly.self_attn.qkv.linears[0], ly.self_attn.o_proj,
                        ly.mlp.gate_up.linears[0], ly.mlp.down_proj)
        }  # fmt: skip

    assert orders(mma) == {"mma"} and orders(natural) == orders(xla_only) == {"natural"}
    assert fuse_decoder(mma, "model", code_order="mma") == 3 and orders(mma) == {"mma"}
    # "auto" (the default): MMA order only where the CUDA library serves the weights' device.
    auto = build_model(config, **kw)
    assert fuse_decoder(auto, "model") == 3
    assert orders(auto) == (
        {"mma"} if nvfp4_cuda.device_reason(jnp.zeros(1)) is None else {"natural"}
    )
    # A chain that will not take the CUDA call gets natural codes back.
    assert fuse_decoder(mma, "model", implementation="xla") == 3 and orders(mma) == {"natural"}
    ids = jnp.asarray(np.random.default_rng(3).integers(0, 257, (2, 6)), jnp.int32)
    tok_a, hid_a = _decode(natural, ids)
    fuse_decoder(mma, "model", code_order="mma")
    tok_b, hid_b = _decode(mma, ids)
    np.testing.assert_array_equal(tok_a, tok_b)
    np.testing.assert_array_equal(hid_a, hid_b)
    with pytest.raises(ValueError, match="code_order='packed': expected 'auto'"):
        fuse_decoder(natural, code_order="packed")
    # One custom call takes one order: mixed weights are refused with the reason.
    monkeypatch.setattr(nvfp4_cuda, "device_reason", lambda x: None)
    x, *_, ck, cv, w = _layer_args(natural)
    mixed = [w[0]._replace(o=nvfp4.format.to_code_order(w[0].o, "mma"))]
    why = decoder_layers.cuda_unsupported_reason(x, ck, mixed, v_cache=cv)
    assert why is not None and "different orders" in why


def test_fuse_decoder_only_where_every_layer_fits():
    dense = build_model(_config(), dtype=jnp.float32)
    assert fuse_decoder(dense) == 0 and dense.decoder_chain is None
    qwen2 = build_model(_config("Qwen2ForCausalLM"), dtype=jnp.float32, quantize="nvfp4")
    assert fuse_decoder(qwen2) == 0  # q/k/v bias: the norms cannot fold
    w4a4 = build_model(_config(), dtype=jnp.float32, quantize="nvfp4", activations="nvfp4")
    assert fuse_decoder(w4a4) == 0
    ok = build_model(_config(), dtype=jnp.float32, quantize="nvfp4")
    assert fuse_decoder(ok, "model", pdl=False) == 3 and ok.decoder_chain == ("model", False, None)
    with pytest.raises(ValueError, match="mode='all'"):
        fuse_decoder(ok, "all")


# --------------------------------------------------------------------------
# GPU: the custom call
# --------------------------------------------------------------------------


@gpu
@pytest.mark.parametrize("batch", [1, 3, 16])
@pytest.mark.parametrize(
    ("mode", "pdl", "family"),
    [("layer", True, "Qwen3ForCausalLM"), ("model", True, "Qwen3ForCausalLM"),
     ("layer", False, "Qwen3ForCausalLM"), ("model", True, "LlamaForCausalLM")],
)  # fmt: skip
def test_cuda_chain_matches_per_layer_cuda_path(batch, mode, pdl, family):
    _check_cuda_chain(_config(family, head_dim=64, hidden=256), batch, dict(mode=mode, pdl=pdl))


def _check_cuda_chain(config, batch, chain_kw):
    """The CUDA chain serves ``config``'s decode steps and matches the per-layer CUDA path."""
    plain, chained = _models(config, jnp.bfloat16, chain_kw, implementation=("cuda", "xla"))
    ids = jnp.asarray(np.random.default_rng(batch).integers(0, 257, (batch, 6)), jnp.int32)
    x, *_, ck, _, w = _layer_args(chained, batch)
    assert decoder_layers.cuda_unsupported_reason(x.astype(jnp.bfloat16), ck, w) is None
    tok_a, hid_a = _decode(plain, ids, new=8)
    tok_b, hid_b = _decode(chained, ids, new=8)
    # The same kernels, chained: identical bits but for SwiGLU's expf (last float32 bit).
    err = np.linalg.norm(hid_b - hid_a) / np.linalg.norm(hid_a)
    assert np.isfinite(hid_b).all() and err <= 1e-2, err
    assert (tok_a == tok_b).mean() >= 0.9


def _default_model_shape_config():
    """SmolLM2-135M-Instruct's layer shapes (the README's main command), two layers."""
    return ModelConfig.from_hf(
        dict(
            architectures=["LlamaForCausalLM"], vocab_size=257, hidden_size=576,
            intermediate_size=1536, num_hidden_layers=2, num_attention_heads=9,
            num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=10000.0,
            max_position_embeddings=256, tie_word_embeddings=True,
        )
    )  # fmt: skip


@gpu
@pytest.mark.parametrize("batch", [1, 2])
def test_cuda_chain_on_the_default_model_shape(batch):
    """The default model's layers, which `reset-jax generate --quantize nvfp4` chains on a GPU
    by default: D = 576 (K % 256 != 0, so the general GEMV path inside the chain), head width
    64, three query heads a kv head."""
    _check_cuda_chain(_default_model_shape_config(), batch, dict(mode="model"))


def test_default_model_shape_chains():
    """On any backend: `fuse_decoder` switches every layer of the default model's shape to the
    chained call (the GPU test above checks what that call computes)."""
    _models(_default_model_shape_config(), jnp.float32, dict(mode="model"))  # asserts all layers


def test_building_layers_shows_progress_on_a_terminal(monkeypatch):
    """Building (or loading) a model's layers shows a tqdm bar where stderr is a terminal,
    and prints nothing where it is not (logs, CI)."""
    import io
    import sys

    from reset_jax.models.layers import layer_progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    build_model(_config(), dtype=jnp.float32, seed=1)
    assert "building random layers:   0%|" in err.getvalue() and "0/3" in err.getvalue()
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    build_model(_config(), dtype=jnp.float32, seed=1)
    assert log.getvalue() == ""
    assert layer_progress(2, None) == range(2)


@gpu
def test_cuda_chain_is_in_the_compiled_step():
    config = _config(head_dim=128, hidden=256)
    _, chained = _models(config, jnp.bfloat16, dict(mode="model"), implementation=("cuda", "xla"))
    graphdef, params = nnx.split(chained)
    cache = chained.init_cache(2, 8)

    def step(params, cache):
        m = nnx.merge(graphdef, params)
        return m.forward(jnp.zeros((2, 1), jnp.int32), jnp.zeros((2, 1), jnp.int32), cache)[0]

    text = jax.jit(step).lower(params, cache).as_text()
    assert text.count("reset_jax_decoder_layers") == 1
    assert "reset_jax_decode_attention" not in text


@gpu
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("batch", [1, 8])
def test_cuda_call_against_xla_composition(batch, interleaved):
    """One call of two layers, distinct epsilons, random norm weights, 5 attention chunks;
    gate/up rows stacked, or interleaved (SwiGLU in the gate+up GEMV's epilogue)."""
    config = _config(head_dim=128, hidden=512)
    model = build_model(config, dtype=jnp.bfloat16, seed=7, quantize="nvfp4", fuse_norms=True)
    rng = np.random.default_rng(batch)
    w = []
    for layer in model.model.layers[:2]:
        lw = layer.chain_weights()
        rand = lambda a: jnp.asarray(1 + 0.3 * rng.standard_normal(a.shape), jnp.bfloat16)  # noqa: E731
        w.append(lw._replace(input_norm=rand(lw.input_norm), post_norm=rand(lw.post_norm),
                             q_norm=rand(lw.q_norm), k_norm=rand(lw.k_norm)))  # fmt: skip
    t, d = 300, config.hidden_size
    k_cache = jnp.asarray(rng.standard_normal((3, batch, t, 2, 128)), jnp.bfloat16)
    v_cache = jnp.asarray(rng.standard_normal((3, batch, t, 2, 128)), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((batch, d)), jnp.bfloat16)
    h = jnp.asarray(0.5 * rng.standard_normal((batch, d)), jnp.bfloat16)
    pos = jnp.asarray(rng.integers(200, t, batch), jnp.int32)
    ang = np.asarray(pos)[:, None] * 10000.0 ** (-np.arange(64) / 64)
    cos, sin = jnp.asarray(np.cos(ang), jnp.float32), jnp.asarray(np.sin(ang), jnp.float32)

    def run(impl, w, inter=False):
        f = jax.jit(lambda *a: decoder_layers.decode_layers(
            *a, w, 1, eps=1e-5, attn_eps=1e-3, implementation=impl,
            gate_up_interleaved=inter))  # fmt: skip
        return [np.asarray(o, np.float64) for o in f(x, h, cos, sin, pos, k_cache, v_cache)]

    wi = [lw._replace(gate_up=decoder_layers.interleave_gate_up(lw.gate_up)) for lw in w]
    got = run("cuda", wi, True) if interleaved else run("cuda", w)
    want = run("xla", w)
    for name, a, b in zip(("x", "h"), got[:2], want[:2]):
        err = np.linalg.norm(a - b) / np.linalg.norm(b)
        assert np.isfinite(a).all() and err <= 2e-2, (name, err)
    rows = np.arange(batch)
    for a, b in zip(got[2:], want[2:]):  # caches: layers 1 and 2 written at pos, the rest kept
        for layer in (1, 2):
            new_a, new_b = a[layer, rows, np.asarray(pos)], b[layer, rows, np.asarray(pos)]
            assert np.linalg.norm(new_a - new_b) / np.linalg.norm(new_b) <= 1e-2
            a[layer, rows, np.asarray(pos)] = b[layer, rows, np.asarray(pos)]
        np.testing.assert_array_equal(a, b)
