"""Qwen3 (Qwen3-8B/14B/32B): per-head RMSNorm on q and k before RoPE, no qkv bias.

The structure is the shared decoder in ``layers.py``; the config switches on
``qk_norm`` for this family (see ``ModelConfig.qk_norm``), which adds
``self_attn.q_norm`` / ``self_attn.k_norm`` weights ``[head_dim]`` to every
layer. Qwen3 sets ``head_dim`` explicitly (128), independent of
``hidden_size / num_heads``. Long-context variants use YaRN RoPE scaling.
"""

from __future__ import annotations

from reset_jax.models.layers import CausalLM


class Qwen3ForCausalLM(CausalLM):
    """Qwen3 decoder: ``config.family == "qwen3"``."""

    family = "qwen3"
