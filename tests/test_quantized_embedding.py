"""An NVFP4 token embedding (``quantize_embedding``): lookups, the tied output layer, memory."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from reset_jax import nvfp4
from reset_jax.models import ModelConfig, build_model, model_tensors, quantize_embedding

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    """benchmarks/decode.py as a module: its model shapes are the ones measured."""
    spec = importlib.util.spec_from_file_location("bench_decode", ROOT / "benchmarks" / "decode.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def _tiny(tied: bool) -> ModelConfig:
    return ModelConfig.from_hf(dict(_bench().HF_CONFIGS["tiny"], tie_word_embeddings=tied))


@pytest.mark.parametrize("tied", [False, True])
def test_lookup_and_tied_output_use_the_quantized_table(tied):
    model = build_model(_tiny(tied), dtype=jnp.float32, seed=3)
    dense = np.asarray(model.model.embed_tokens.weight.get_value())
    want = np.asarray(nvfp4.dequantize(nvfp4.quantize(jnp.asarray(dense))))
    assert quantize_embedding(model) is model
    emb = model.model.embed_tokens
    assert emb.quantized and emb.dtype == np.float32 and model.dtype == np.float32
    ids = jnp.asarray([[0, 5, 95, 5], [17, 3, 3, 64]], jnp.int32)
    np.testing.assert_array_equal(np.asarray(emb(ids)), want[np.asarray(ids)])
    # Quantization changed the table (so the check above is not vacuous).
    assert np.abs(want - dense).max() > 0
    h = jax.random.normal(jax.random.key(0), (2, 3, 64), jnp.float32)
    got = np.asarray(emb.attend(h), np.float64)
    ref = np.asarray(h, np.float64) @ want.astype(np.float64).T
    assert got.shape == (2, 3, 512)
    # The XLA reference (CPU) is exact up to float32 sums; GPU kernels round to bf16.
    tol = 1e-5 if jax.default_backend() == "cpu" else 5e-3
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < tol
    logits = model(ids)
    assert logits.shape == (2, 4, 512) and bool(jnp.isfinite(logits).all())
    with pytest.raises(ValueError, match="already NVFP4"):
        quantize_embedding(model)


def test_a_quantized_embedding_is_not_saved_silently():
    model = build_model(_tiny(False), dtype=jnp.float32, quantize="nvfp4")
    model_tensors(model)  # dense embedding: fine
    quantize_embedding(model)
    with pytest.raises(ValueError, match="NVFP4 embedding has no Hugging Face"):
        model_tensors(model)


def _weight_bytes(model) -> int:
    leaves = jax.tree_util.tree_leaves(nnx.state(model))
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in leaves))


def test_qwen3_8b_weight_memory():
    """Exact byte counts of the Qwen3-8B shape (abstract: nothing is allocated)."""
    cfg = ModelConfig.from_hf(_bench().HF_CONFIGS["qwen3-8b"])

    def size(**kw):
        return _weight_bytes(nnx.eval_shape(lambda: build_model(cfg, dtype=jnp.bfloat16, **kw)))

    bf16 = size()
    default = size(quantize="nvfp4")  # lm_head and embedding dense, as checkpoints keep them
    all_fp4 = size(quantize="nvfp4", exclude=(), quantize_embedding=True)
    assert abs(bf16 / 1e9 - 16.381) < 0.001
    assert abs(default / bf16 - 0.3905) < 0.001
    assert all_fp4 / bf16 <= 0.30 and abs(all_fp4 / bf16 - 0.2813) < 0.001
