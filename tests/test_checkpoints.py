"""Checkpoint reading and writing: NVFP4 round trips, W4A4 input scales, and error messages."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402

from reset_jax import nvfp4  # noqa: E402
from reset_jax.models import (  # noqa: E402
    CheckpointError,
    NVFP4Param,
    build_from_state_dict,
    from_pretrained,
    model_tensors,
    read_safetensors,
    save_nvfp4,
    write_safetensors,
)

VOCAB = 256


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random Qwen2 (biases on q/k/v: quantized layers with a dense bias) saved by transformers."""
    config = transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        initializer_range=0.15,
        torch_dtype="float32",
    )
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("ckpt") / "hf"
    model.save_pretrained(path)
    (path / "tokenizer_config.json").write_text("{}")
    return path


@pytest.fixture(scope="module")
def ids():
    return jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, 10)), jnp.int32)


def _logits(model, ids):
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, ids))


def _assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        # Compare bytes: float8 and -0.0 make value comparisons too lenient.
        assert a[name].tobytes() == b[name].tobytes(), name


def test_nvfp4_round_trip(hf_dir, ids, tmp_path):
    q = from_pretrained(hf_dir, dtype=jnp.float32, quantize="nvfp4", implementation="xla")
    qkv = q.model.layers[0].self_attn.qkv
    assert qkv.fused and qkv.names == ("q_proj", "k_proj", "v_proj")  # one shared global scale
    lin = qkv.linears[0]
    assert lin.quantized and isinstance(lin.weight, NVFP4Param)
    assert isinstance(lin.weight.get_value(), nvfp4.NVFP4Tensor) and lin.bias is not None
    assert lin.weight.get_value().shape == (64 + 32 + 32, 64)
    assert not q.lm_head.quantized  # excluded by default

    out = save_nvfp4(q, tmp_path / "nvfp4", tokenizer_files_from=hf_dir)
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "modelopt" and qc["quant_algo"] == "NVFP4"
    assert qc["group_size"] == 16 and qc["exclude_modules"] == ["lm_head"]
    assert (out / "hf_quant_config.json").is_file() and (out / "tokenizer_config.json").is_file()
    stored = read_safetensors(out / "model.safetensors")
    p = "model.layers.1.mlp.down_proj"
    assert stored[f"{p}.weight"].dtype == np.uint8 and stored[f"{p}.weight"].shape == (64, 64)
    assert stored[f"{p}.weight_scale"].dtype == ml_dtypes.float8_e4m3fn
    assert stored[f"{p}.weight_scale"].shape == (64, 8)
    assert stored[f"{p}.weight_scale_2"].shape == () and f"{p}.input_scale" not in stored
    a = "model.layers.0.self_attn"
    assert stored[f"{a}.k_proj.weight"].shape == (32, 32) and stored[f"{a}.k_proj.bias"].shape == (
        32,
    )
    assert stored[f"{a}.q_proj.weight_scale_2"] == stored[f"{a}.v_proj.weight_scale_2"]
    assert stored["lm_head.weight"].dtype == np.float32

    back = from_pretrained(out, dtype=jnp.float32, implementation="xla")
    _assert_same_tensors(model_tensors(q), model_tensors(back))
    np.testing.assert_array_equal(_logits(q, ids), _logits(back, ids))


def _dense_twin(model):
    """The same model with every NVFP4 layer replaced by its dequantized float32 weight."""
    tensors = model_tensors(model)
    dense = {}
    for name, a in tensors.items():
        if name.endswith((".weight_scale", ".weight_scale_2")):
            continue
        if f"{name}_scale" in tensors:  # name is an NVFP4 layer's ".weight"
            q = nvfp4.NVFP4Tensor(
                jnp.asarray(a), jnp.asarray(tensors[f"{name}_scale"]), tensors[f"{name}_scale_2"]
            )
            a = np.asarray(nvfp4.dequantize(q, jnp.float32))
        dense[name] = a
    return build_from_state_dict(model.config, dense, dtype=jnp.float32)


def test_nvfp4_logits_equal_dense_dequantized(hf_dir, ids):
    q = from_pretrained(hf_dir, dtype=jnp.float32, quantize="nvfp4", implementation="xla")
    got, want = _logits(q, ids), _logits(_dense_twin(q), ids)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    # And quantization changed something (the test is not comparing dense to dense).
    ref = _logits(from_pretrained(hf_dir, dtype=jnp.float32), ids)
    assert np.abs(ref - got).max() > 1e-3 * np.abs(ref).max()


def test_nvfp4_unshared_scales_stay_unfused(hf_dir, ids, tmp_path):
    """q/k/v with different global scales load as three layers and still compute the same model."""
    q = from_pretrained(hf_dir, dtype=jnp.float32, quantize="nvfp4")
    path = save_nvfp4(q, tmp_path / "nvfp4")
    k = "model.layers.1.self_attn.k_proj"

    def requantize_k(t):
        own = nvfp4.NVFP4Tensor(
            jnp.asarray(t[f"{k}.weight"]),
            jnp.asarray(t[f"{k}.weight_scale"]),
            t[f"{k}.weight_scale_2"],
        )
        g = 1.5 * np.float32(t[f"{k}.weight_scale_2"])  # no longer shared with q and v
        own = nvfp4.quantize(nvfp4.dequantize(own, jnp.float32), global_scale=g)
        t[f"{k}.weight"], t[f"{k}.weight_scale"] = np.asarray(own.packed), np.asarray(own.scales)
        t[f"{k}.weight_scale_2"] = np.asarray(own.global_scale, np.float32).reshape(())

    _edit_tensors(path, requantize_k)
    m = from_pretrained(path, dtype=jnp.float32, implementation="xla")
    assert not m.model.layers[1].self_attn.qkv.fused and m.model.layers[0].self_attn.qkv.fused
    got, want = _logits(m, ids), _logits(_dense_twin(m), ids)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def _w4a4_export(hf_dir, path, input_scale: float = 0.004):
    """A Model Optimizer-style W4A4 export: the NVFP4 round trip plus calibrated input scales."""
    q = from_pretrained(hf_dir, dtype=jnp.float32, quantize="nvfp4")
    save_nvfp4(q, path)
    tensors = dict(read_safetensors(path / "model.safetensors"))
    for name in list(tensors):
        if name.endswith(".weight_scale_2"):
            tensors[name.replace(".weight_scale_2", ".input_scale")] = np.float32(input_scale)
    write_safetensors(path / "model.safetensors", tensors)
    return path


def test_w4a4_loads_input_scale(hf_dir, ids, tmp_path):
    path = _w4a4_export(hf_dir, tmp_path / "w4a4")
    m = from_pretrained(path, dtype=jnp.float32, activations="nvfp4", implementation="xla")
    gate_up = m.model.layers[0].mlp.gate_up
    assert gate_up.fused  # equal input scales: still one fused layer
    lin = gate_up.linears[0]
    assert lin.activations == "nvfp4"
    assert float(lin.input_scale.get_value()) == np.float32(0.004)
    # The layer quantizes its input with the calibrated scale, not a dynamic one.
    x = jax.random.normal(jax.random.key(0), (3, 64), jnp.float32)
    w = nvfp4.dequantize(lin.weight.get_value(), jnp.float32)
    want = nvfp4.format.fake_quantize_activations(x, 0.004) @ w.T
    np.testing.assert_allclose(lin(x), want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
    dynamic = nvfp4.format.fake_quantize_activations(x, None) @ w.T
    assert float(jnp.abs(lin(x) - dynamic).max()) > 0

    # The whole model runs W4A4, and the input scales survive another save / load.
    assert np.isfinite(_logits(m, ids)).all()
    again = save_nvfp4(m, tmp_path / "again")
    back = from_pretrained(again, dtype=jnp.float32, activations="nvfp4", implementation="xla")
    _assert_same_tensors(model_tensors(m), model_tensors(back))
    assert float(back.model.layers[1].self_attn.o_proj.input_scale.get_value()) == np.float32(0.004)
    assert float(
        back.model.layers[1].self_attn.qkv.linears[0].input_scale.get_value()
    ) == np.float32(0.004)


def test_nvfp4_model_bf16_split_merge(hf_dir, ids):
    """NVFP4 leaves survive nnx.split / merge under jit, in bf16 too."""
    m = from_pretrained(hf_dir, dtype=jnp.bfloat16, quantize="nvfp4", implementation="xla")
    graphdef, state = nnx.split(m)
    quantized = nnx.state(m, NVFP4Param)
    leaves = jax.tree.leaves(quantized)
    assert {np.dtype(x.dtype) for x in leaves} == {
        np.dtype(np.uint8),
        np.dtype(ml_dtypes.float8_e4m3fn),
        np.dtype(np.float32),
    }
    logits = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, ids)
    assert logits.dtype == jnp.float32 and logits.shape == (2, 10, VOCAB)
    # Same NVFP4 weights computed in float32: bf16 activations cost about 1%.
    ref = _logits(
        from_pretrained(hf_dir, dtype=jnp.float32, quantize="nvfp4", implementation="xla"), ids
    )
    assert np.abs(np.asarray(logits) - ref).max() < 0.05 * np.abs(ref).max()


# ---- errors -----------------------------------------------------------------------------


def _copy(hf_dir, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(hf_dir, dst)
    return dst


def _edit_tensors(path, fn):
    tensors = {k: np.array(v) for k, v in read_safetensors(path / "model.safetensors").items()}
    fn(tensors)
    write_safetensors(path / "model.safetensors", tensors)


def test_error_missing_tensor(hf_dir, tmp_path):
    path = _copy(hf_dir, tmp_path)
    _edit_tensors(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError) as e:
        from_pretrained(path, dtype=jnp.float32)
    msg = str(e.value)
    assert "missing tensor 'model.layers.1.mlp.up_proj.weight'" in msg
    assert "expected shape (128, 64)" in msg and "model.safetensors" in msg


def test_error_missing_nvfp4_scale(hf_dir, tmp_path):
    q = from_pretrained(hf_dir, dtype=jnp.float32, quantize="nvfp4")
    path = save_nvfp4(q, tmp_path / "nvfp4")
    _edit_tensors(path, lambda t: t.pop("model.layers.0.self_attn.o_proj.weight_scale"))
    with pytest.raises(
        CheckpointError,
        match=r"missing tensor 'model\.layers\.0\.self_attn\.o_proj\.weight_scale' \(expected shape \(64, 4\)",
    ):
        from_pretrained(path, dtype=jnp.float32)


def test_error_misshaped_tensor(hf_dir, tmp_path):
    path = _copy(hf_dir, tmp_path)

    def cut(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][
            :16
        ]

    _edit_tensors(path, cut)
    with pytest.raises(
        CheckpointError,
        match=r"tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' .* has shape \(16, 64\), expected \(32, 64\)",
    ):
        from_pretrained(path, dtype=jnp.float32)


def test_error_unknown_architecture(hf_dir, tmp_path):
    path = _copy(hf_dir, tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ValueError,
        match=r"unknown architecture MistralForCausalLM; reset-jax supports Qwen3ForCausalLM",
    ):
        from_pretrained(path)


def test_error_wrong_path(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"no checkpoint at .*nope.*: no such file or directory"
    ):
        from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        from_pretrained(tmp_path / "empty")


def test_error_save_unquantized(hf_dir, tmp_path):
    with pytest.raises(ValueError, match="no NVFP4 layer"):
        save_nvfp4(from_pretrained(hf_dir, dtype=jnp.float32), tmp_path / "x")


def test_implementation_reaches_every_nvfp4_matmul(hf_dir, ids):
    m = from_pretrained(
        hf_dir, dtype=jnp.float32, quantize="nvfp4", implementation="no-such-backend"
    )
    with pytest.raises(ValueError, match="unknown NVFP4 matmul implementation 'no-such-backend'"):
        m(ids)
