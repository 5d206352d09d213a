"""Read a GGUF file into a Hugging Face-style config and dense float32 tensors.

`load_gguf` is what `reset_jax.models.from_pretrained` calls for a path ending
in ``.gguf``. It reads the metadata and tensors with the ``gguf`` package,
dequantizes every tensor (Q4_1, Q8_0, F16, ... through `gguf.quants.dequantize`)
to float32, renames them to the names a Hugging Face checkpoint uses, and undoes
the q/k row permutation that llama.cpp's converter applies to Llama models, so
the result loads exactly like the ``config.json`` + safetensors checkpoint it
was converted from.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["GGUFError", "gguf_config", "load_gguf"]

# GGUF `general.architecture` → (HF architectures entry, HF model_type).
_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}

# Per-layer GGUF tensor stems → HF module paths under `model.layers.N.`.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


class GGUFError(ValueError):
    """A GGUF file this loader cannot turn into a supported checkpoint."""


def _field(reader: Any, key: str, default: Any = None) -> Any:
    """The value of metadata field `key` as a Python scalar, string or list."""
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    if isinstance(value, np.generic):
        value = value.item()
    return value


def gguf_config(reader: Any, path: str = "<gguf>") -> dict[str, Any]:
    """Map a GGUF file's metadata to a Hugging Face ``config.json`` dict.

    Args:
      reader: a `gguf.GGUFReader` over the file.
      path: the file's path, only for error messages.

    Returns:
      A dict with the keys `ModelConfig.from_hf` reads (``architectures``,
      ``model_type``, ``hidden_size``, ``num_hidden_layers``, ...).

    Raises:
      GGUFError: unknown architecture or a required field is missing.
    """
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise GGUFError(
            f"{path}: GGUF architecture {arch!r} is not supported; "
            f"expected one of {sorted(_ARCHITECTURES)}"
        )
    hf_arch, model_type = _ARCHITECTURES[arch]

    def required(key: str) -> Any:
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise GGUFError(f"{path}: metadata field '{arch}.{key}' is missing")
        return value

    hidden = int(required("embedding_length"))
    heads = int(required("attention.head_count"))
    kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv", heads))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // heads))
    vocab = _field(reader, f"{arch}.vocab_size")
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        vocab = len(tokens.data) if tokens is not None else None
    if vocab is None:
        vocab = _tensor_shape(reader, "token_embd.weight")[0]
    tensor_names = {t.name for t in reader.tensors}

    config: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(required("feed_forward_length")),
        "num_hidden_layers": int(required("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 2048)),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "rms_norm_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": False,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    if arch == "qwen3":
        config["attention_bias"] = False
    rope_scaling = _rope_scaling(reader, arch, path)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    for key, hf_key in (("bos_token_id", "bos_token_id"), ("padding_token_id", "pad_token_id")):
        value = _field(reader, f"tokenizer.ggml.{key}")
        if value is not None:
            config[hf_key] = int(value)
    # End-of-turn ids (e.g. <|im_end|>) stop generation just like EOS.
    eos = [
        int(v)
        for v in (
            _field(reader, "tokenizer.ggml.eos_token_id"),
            _field(reader, "tokenizer.ggml.eot_token_id"),
        )
        if v is not None
    ]
    eos = list(dict.fromkeys(eos))
    if eos:
        config["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return config


def _rope_scaling(reader: Any, arch: str, path: str) -> dict[str, Any] | None:
    kind = _field(reader, f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        if any(t.name == "rope_freqs.weight" for t in reader.tensors):
            # llama.cpp stores Llama-3 rope scaling only as this tensor of
            # per-frequency factors; the parameters it came from are gone.
            raise GGUFError(
                f"{path}: Llama-3 rope scaling stored as 'rope_freqs.weight' is not supported; "
                "load the Hugging Face checkpoint instead"
            )
        return None
    factor = _field(reader, f"{arch}.rope.scaling.factor")
    if kind != "linear" and kind != "yarn":
        raise GGUFError(f"{path}: rope scaling type {kind!r} is not supported (linear, yarn)")
    scaling: dict[str, Any] = {"rope_type": kind, "factor": float(factor)}
    original = _field(reader, f"{arch}.rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def _tensor_shape(reader: Any, name: str) -> tuple[int, ...]:
    for t in reader.tensors:
        if t.name == name:
            # GGUF lists dimensions fastest-first; numpy order is the reverse.
            return tuple(int(d) for d in reversed(t.shape.tolist()))
    raise GGUFError(f"tensor {name!r} is missing")


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation for rotate-half RoPE.

    llama.cpp's converter reorders each head's rows from HF's rotate-half
    layout (first half, second half) to interleaved pairs:
    ``w.reshape(n_head, 2, d // 2, ...).swapaxes(1, 2)``. The inverse views the
    rows as ``[n_head, d // 2, 2]`` and swaps back.

    Args:
      w: ``[n_head * d, ...]`` q or k projection rows (weight or bias).
      n_head: query heads for q, key/value heads for k.

    Returns:
      ``w`` in Hugging Face row order, same shape.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise GGUFError(f"cannot unpermute {rows} rows over {n_head} heads")
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _LAYER_RE.match(name)
    if m is None or m.group(2) not in _LAYER_NAMES:
        return None
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"


def _expected_shapes(config: Mapping[str, Any], arch: str) -> dict[str, tuple[int, ...]]:
    """Every tensor the HF checkpoint must hold, with its shape."""
    d, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    h, kv, hd = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (v, d),
        "model.norm.weight": (d,),
    }
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, d)
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes |= {
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (h * hd, d),
            p + "self_attn.k_proj.weight": (kv * hd, d),
            p + "self_attn.v_proj.weight": (kv * hd, d),
            p + "self_attn.o_proj.weight": (d, h * hd),
            p + "mlp.gate_proj.weight": (i, d),
            p + "mlp.up_proj.weight": (i, d),
            p + "mlp.down_proj.weight": (d, i),
        }
        # Qwen2 always has q/k/v bias; Llama's attention_bias adds o's too.
        if arch == "qwen2" or config["attention_bias"]:
            shapes |= {
                p + "self_attn.q_proj.bias": (h * hd,),
                p + "self_attn.k_proj.bias": (kv * hd,),
                p + "self_attn.v_proj.bias": (kv * hd,),
            }
        if arch != "qwen2" and config["attention_bias"]:
            shapes[p + "self_attn.o_proj.bias"] = (d,)
        if arch == "qwen3":
            shapes |= {p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)}
    return shapes


def load_gguf(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Load a GGUF checkpoint as a HF config dict and dense float32 tensors.

    Args:
      path: a ``.gguf`` file of a Llama, Qwen2 or Qwen3 model.

    Returns:
      ``(config, tensors)``: ``config`` is a ``config.json``-style dict;
      ``tensors`` maps HF tensor names (``model.layers.0.self_attn.q_proj.weight``
      ...) to float32 arrays in HF layout (``[out_features, in_features]``).
      ``lm_head.weight`` is absent when the embeddings are tied.

    Raises:
      FileNotFoundError: no file at `path`.
      GGUFError: unsupported architecture or tensor type, an unknown, missing
        or mis-shaped tensor.
    """
    import gguf  # Deferred: only GGUF loading needs it.

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # The gguf package raises bare ValueErrors.
        raise GGUFError(f"{path}: not a readable GGUF file ({e})") from e
    config = gguf_config(reader, path)
    arch = _field(reader, "general.architecture")
    expected = _expected_shapes(config, arch)

    tensors: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None:
            raise GGUFError(f"{path}: unexpected tensor {t.name!r} for architecture {arch!r}")
        if name not in expected:
            raise GGUFError(
                f"{path}: tensor {t.name!r} ({name}) does not belong in this {arch} config"
            )
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise GGUFError(
                f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, which gguf cannot dequantize"
            ) from e
        w = np.asarray(w, dtype=np.float32)
        want = expected[name]
        if w.shape != want:
            raise GGUFError(
                f"{path}: tensor {t.name!r} ({name}) has shape {w.shape}, expected {want}"
            )
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            n_head = config["num_attention_heads" if ".q_proj." in name else "num_key_value_heads"]
            w = _unpermute_rows(w, n_head)
        tensors[name] = np.ascontiguousarray(w)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise GGUFError(f"{path}: missing tensors {missing[:3]}{more}")
    return config, tensors
