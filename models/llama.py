"""Llama (SmolLM2, Llama 3): the plain decoder.

The structure is the shared decoder in ``layers.py`` with no q/k norm; biases
follow ``attention_bias`` (q, k, v and o together) and ``mlp_bias``. Llama 3
checkpoints use the ``llama3`` RoPE scaling; SmolLM2 ties its embeddings.
GGUF files store q/k rows permuted for llama.cpp's RoPE layout; ``gguf.py``
undoes that before the tensors reach this model.
"""

from __future__ import annotations

from reset_jax.models.layers import CausalLM


class LlamaForCausalLM(CausalLM):
    """Llama decoder: ``config.family == "llama"``."""

    family = "llama"
