"""Flax NNX decoder models (Qwen3, Qwen2, Llama) and their checkpoints.

Installed as ``reset_jax.models``::

    from reset_jax.models import from_pretrained
    model = from_pretrained("path/or/name", dtype=jnp.bfloat16, quantize="nvfp4")
    logits = model(input_ids)  # [B, S] -> [B, S, V] float32
"""

from reset_jax.models.cache import KVCache
from reset_jax.models.config import ModelConfig
from reset_jax.models.layers import (
    CausalLM,
    Embedding,
    Linear,
    LinearGroup,
    NVFP4Param,
    fuse_attention,
    fuse_decoder,
    fuse_norms,
    quantize_embedding,
)
from reset_jax.models.llama import LlamaForCausalLM
from reset_jax.models.loading import (
    DEFAULT_EXCLUDE,
    MODEL_CLASSES,
    CheckpointError,
    QuantMeta,
    apply_build_options,
    build_from_state_dict,
    build_model,
    from_pretrained,
    model_tensors,
    named_linears,
    read_quant_meta,
    read_safetensors,
    save_nvfp4,
    write_safetensors,
)
from reset_jax.models.qwen2 import Qwen2ForCausalLM
from reset_jax.models.qwen3 import Qwen3ForCausalLM

__all__ = [
    "DEFAULT_EXCLUDE",
    "MODEL_CLASSES",
    "CausalLM",
    "CheckpointError",
    "Embedding",
    "KVCache",
    "Linear",
    "LinearGroup",
    "LlamaForCausalLM",
    "ModelConfig",
    "NVFP4Param",
    "QuantMeta",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "apply_build_options",
    "build_from_state_dict",
    "build_model",
    "from_pretrained",
    "fuse_attention",
    "fuse_decoder",
    "fuse_norms",
    "model_tensors",
    "named_linears",
    "quantize_embedding",
    "read_quant_meta",
    "read_safetensors",
    "save_nvfp4",
    "write_safetensors",
]
