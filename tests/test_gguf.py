"""GGUF parsing on small files written here the way llama.cpp's converter writes
them: the q/k permutation is undone in the direction transformers undoes it,
metadata maps to the HF config, and bad files fail with clear errors."""

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from reset_jax.models import from_pretrained
from reset_jax.models.gguf import GGUFError, load_gguf

HF_CONFIG = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rope_theta=50000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)

_STEMS = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
}


def llamacpp_permute(w, n_head):
    """What llama.cpp's convert_hf_to_gguf.py does to Llama q/k rows."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def gguf_name(hf_name):
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, n, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{n}.{_STEMS[module]}.{kind}"


def write_gguf(path, state, cfg, *, arch="llama", quant=None, drop=(), reshape=None):
    """A GGUF file holding `state` (HF names -> float32 arrays) as llama.cpp would."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    if "head_dim" in cfg:
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    for name, t in state.items():
        if name in drop:
            continue
        t = np.asarray(t, np.float32)
        if arch == "llama" and ".q_proj." in name:
            t = llamacpp_permute(t, cfg["num_attention_heads"])
        elif arch == "llama" and ".k_proj." in name:
            t = llamacpp_permute(t, cfg["num_key_value_heads"])
        if reshape and name in reshape:
            t = t[: reshape[name]]
        if quant is not None and t.ndim == 2:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(t, quant), raw_dtype=quant)
        else:
            w.add_tensor(gguf_name(name), t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_CONFIG)).eval()
    return model


@pytest.fixture(scope="module")
def state(hf_model):
    return {k: v.detach().numpy().copy() for k, v in hf_model.state_dict().items()}


def test_roundtrip_undoes_the_permutation(tmp_path, state):
    path = write_gguf(tmp_path / "tiny.gguf", state, HF_CONFIG)
    config, tensors = load_gguf(path)
    assert set(tensors) == set(state)
    for name, want in state.items():
        np.testing.assert_array_equal(tensors[name], want, err_msg=name)
    assert config["architectures"] == ["LlamaForCausalLM"]
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "bos_token_id",
        "eos_token_id",
    ):
        assert config[key] == HF_CONFIG[key], key
    assert config["rope_theta"] == HF_CONFIG["rope_theta"]
    assert config["head_dim"] == 16 and config["tie_word_embeddings"] is False


def test_agrees_with_transformers_gguf_loader(tmp_path, state, hf_model):
    # Quantized (Q8_0) so dequantization is exercised as well.
    path = write_gguf(tmp_path / "q8.gguf", state, HF_CONFIG, quant=gguf.GGMLQuantizationType.Q8_0)
    _, ours = load_gguf(path)
    theirs = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=hf_model)["tensors"]
    assert set(theirs) == set(ours)
    for name, t in theirs.items():
        np.testing.assert_array_equal(ours[name], t.numpy(), err_msg=name)
    # Dequantization error is small, and q/k rows are back in HF order.
    np.testing.assert_allclose(
        ours["model.layers.1.self_attn.q_proj.weight"],
        state["model.layers.1.self_attn.q_proj.weight"],
        atol=2e-3,
    )


def test_gguf_model_logits_match_torch(tmp_path, state, hf_model):
    path = write_gguf(tmp_path / "tiny.gguf", state, HF_CONFIG)
    model = from_pretrained(path, dtype=jnp.float32)
    ids = np.array([[1, 5, 9, 33, 70, 2, 14, 88]])
    ours = np.asarray(model(jnp.asarray(ids, jnp.int32)))
    with torch.no_grad():
        theirs = hf_model(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4 * np.abs(theirs).max())


def test_tied_embeddings_have_no_lm_head(tmp_path, state):
    cfg = HF_CONFIG | {"tie_word_embeddings": True}
    path = write_gguf(tmp_path / "tied.gguf", state, cfg, drop=("lm_head.weight",))
    config, tensors = load_gguf(path)
    assert config["tie_word_embeddings"] is True and "lm_head.weight" not in tensors


def test_missing_tensor(tmp_path, state):
    path = write_gguf(
        tmp_path / "m.gguf", state, HF_CONFIG, drop=("model.layers.1.mlp.up_proj.weight",)
    )
    with pytest.raises(GGUFError, match=r"missing tensors \['model.layers.1.mlp.up_proj.weight'\]"):
        load_gguf(path)


def test_misshaped_tensor(tmp_path, state):
    path = write_gguf(
        tmp_path / "s.gguf",
        state,
        HF_CONFIG,
        reshape={"model.layers.0.self_attn.v_proj.weight": 16},
    )
    with pytest.raises(
        GGUFError, match=r"'blk.0.attn_v.weight'.*shape \(16, 64\), expected \(32, 64\)"
    ):
        load_gguf(path)


def test_unknown_architecture_and_bad_paths(tmp_path, state):
    path = write_gguf(tmp_path / "gpt2.gguf", state, HF_CONFIG, arch="gpt2")
    with pytest.raises(GGUFError, match="architecture 'gpt2' is not supported"):
        load_gguf(path)
    with pytest.raises(FileNotFoundError):
        load_gguf(tmp_path / "nope.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(GGUFError, match="not a readable GGUF"):
        load_gguf(junk)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_families(tmp_path, arch):
    # Qwen2 has q/k/v biases, Qwen3 per-head q/k norms; llama.cpp permutes neither.
    cfg = HF_CONFIG | {"head_dim": 16, "tie_word_embeddings": True}
    cls = {"qwen2": transformers.Qwen2ForCausalLM, "qwen3": transformers.Qwen3ForCausalLM}[arch]
    config_cls = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[arch]
    torch.manual_seed(1)
    hf = cls(config_cls(**cfg)).eval()
    state = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}
    path = write_gguf(tmp_path / f"{arch}.gguf", state, cfg, arch=arch, drop=("lm_head.weight",))
    config, tensors = load_gguf(path)
    assert config["model_type"] == arch and config["head_dim"] == 16
    assert set(tensors) == set(state) - {"lm_head.weight"}
    for name, want in tensors.items():
        np.testing.assert_array_equal(want, state[name], err_msg=name)
    model = from_pretrained(path, dtype=jnp.float32)
    ids = np.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        want = hf(torch.as_tensor(ids)).logits.numpy()
    got = np.asarray(model(jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())
