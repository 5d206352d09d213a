"""Qwen2 (DeepSeek-R1-Distill-Qwen-7B/14B, Qwen2.5): bias on q, k and v, none on o.

The structure is the shared decoder in ``layers.py``; the config makes
``qkv_bias`` true and ``o_bias`` false for this family whatever its
``attention_bias`` says (see ``ModelConfig.qkv_bias``), matching the reference
implementation. Sliding-window attention (``use_sliding_window``) is refused at
config time; the distilled reasoning models do not use it.
"""

from __future__ import annotations

from reset_jax.models.layers import CausalLM


class Qwen2ForCausalLM(CausalLM):
    """Qwen2 decoder: ``config.family == "qwen2"``."""

    family = "qwen2"
