"""Layers shared by the decoder families, and the decoder itself.

Shapes: B batch, S new tokens, T cache slots, D model width, Hq / Hkv query /
key-value heads, G = Hq // Hkv, Dh head width, F MLP width, V vocabulary.

Module attributes mirror the Hugging Face module tree (``model.layers.0.self_attn
.o_proj``), so a parameter's NNX path is its checkpoint tensor name, except
that q/k/v and gate/up live in one ``LinearGroup`` each (``self_attn.qkv``,
``mlp.gate_up``), usually as one fused weight; ``loading.model_tensors`` splits
them back into the checkpoint's names.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from reset_jax import attention, decoder_layers, nvfp4
from reset_jax.attention import apply_rope, attend, decode_attention_packed
from reset_jax.decoder_layers import LayerWeights
from reset_jax.models.cache import KVCache
from reset_jax.models.config import ModelConfig, rope_frequencies
from reset_jax.nvfp4 import NVFP4Tensor
from reset_jax.nvfp4 import cuda as nvfp4_cuda
from reset_jax.nvfp4.fused import add_rms_norm_matmul, rms_norm

# Contract the last axis of x [..., K] with axis 1 of w [N, K]: x @ w.T without a transpose.
_NT_LAST = 1


class NVFP4Param(nnx.Param):
    """An ``nnx.Param`` whose value is an ``NVFP4Tensor`` pytree.

    A subclass so filters can tell quantized weights apart
    (``nnx.state(model, NVFP4Param)``); ``nnx.split`` / ``nnx.merge`` carry the
    tensor's three leaves like any other parameter.
    """


def _static_implementation(
    implementation: str | Sequence[str] | None,
) -> str | tuple[str, ...] | None:
    """A backend choice for ``nvfp4.matmul`` as a hashable static attribute (lists become tuples)."""
    if implementation is None or isinstance(implementation, str):
        return implementation
    return tuple(implementation)


def _dense_dot(x: jax.Array, w: jax.Array, out_dtype) -> jax.Array:
    """``x @ w.T``: ``[..., K] x [N, K] -> [..., N]`` in ``out_dtype``, accumulated in float32.

    A bf16 dot accumulates in float32 on every backend (cuBLAS, Triton, and the
    CPU's upcast); asking for a float32 *result* only where one is wanted
    matters on GPU: at M = 1 XLA then converts both operands to float32 inside
    the kernel, which measured 3-13% slower on H100 than the bf16-output dot.
    """
    x = x.astype(w.dtype)
    # HIGHEST keeps float32 weights out of TF32 passes on GPU; no effect on bf16.
    precision = lax.Precision.HIGHEST if w.dtype == jnp.float32 else None
    dims = (((x.ndim - 1,), (_NT_LAST,)), ((), ()))
    preferred = jnp.float32 if np.dtype(out_dtype) == np.float32 else None
    y = lax.dot_general(x, w, dims, precision=precision, preferred_element_type=preferred)
    return y.astype(out_dtype)


class Linear(nnx.Module):
    """``y = x @ W.T + b`` with W dense ``[N, K]`` or an ``NVFP4Tensor``.

    Every quantized call goes through ``reset_jax.nvfp4.matmul``, which picks
    the backend at trace time; ``implementation`` (static) restricts that
    choice, e.g. for benchmarks. Dense weights multiply in their own dtype with
    float32 accumulation, so a bf16 weight is read once as bf16.

    Attributes:
      weight: ``nnx.Param`` ``[N, K]`` or ``NVFP4Param`` holding an ``NVFP4Tensor``.
      bias: ``nnx.Param`` ``[N]`` or None.
      input_scale: ``nnx.Param`` float32 scalar (the W4A4 activation global scale
        from calibration) or None. With ``activations="nvfp4"`` and no
        ``input_scale`` the matmul uses a per-row dynamic scale
        ``max|x_row| / (6*448)``.
      activations: ``"bf16"`` (W4A16) or ``"nvfp4"`` (W4A4); static.
      implementation: backend name(s) passed to ``nvfp4.matmul``; static.
    """

    def __init__(
        self,
        weight: jax.Array | NVFP4Tensor,
        bias: jax.Array | None = None,
        *,
        input_scale: jax.Array | None = None,
        activations: str = "bf16",
        implementation: str | Sequence[str] | None = None,
    ):
        if activations not in ("bf16", "nvfp4"):
            raise ValueError(f"activations={activations!r}; expected 'bf16' or 'nvfp4'")
        self.quantized = isinstance(weight, NVFP4Tensor)
        self.weight = NVFP4Param(weight) if self.quantized else nnx.Param(weight)
        self.out_features, self.in_features = (int(d) for d in weight.shape)
        self.bias = None if bias is None else nnx.Param(bias)
        self.input_scale = (
            None if input_scale is None else nnx.Param(jnp.asarray(input_scale, jnp.float32))
        )
        self.activations = activations
        self.implementation = _static_implementation(implementation)

    def __call__(self, x: jax.Array, *, out_dtype=None) -> jax.Array:
        """Applies the layer.

        Args:
          x: ``[..., K]``.
          out_dtype: result dtype; ``None`` keeps ``x.dtype``.

        Returns:
          ``[..., N]``.
        """
        out_dtype = x.dtype if out_dtype is None else out_dtype
        w = self.weight.get_value()
        if self.quantized:
            scale = None
            if self.activations == "nvfp4" and self.input_scale is not None:
                scale = self.input_scale.get_value()
            y = nvfp4.matmul(
                x,
                w,
                activations=self.activations,
                input_scale=scale,
                implementation=self.implementation,
            )
            if self.bias is None:
                return y.astype(out_dtype)
        else:
            y = _dense_dot(x, w, out_dtype if self.bias is None else w.dtype)  # [..., N]
            if self.bias is None:
                return y
        return (y.astype(jnp.float32) + self.bias.get_value().astype(jnp.float32)).astype(out_dtype)


def _split(y: jax.Array, sizes: Sequence[int]) -> tuple[jax.Array, ...]:
    """``[..., sum(sizes)]`` -> one ``[..., n]`` per size."""
    return tuple(jnp.split(y, np.cumsum(sizes)[:-1].tolist(), axis=-1))


class LinearGroup(nnx.Module):
    """Linear layers that read the same input (q/k/v, gate/up), fused into one matmul when possible.

    At decode every projection is a matrix-vector product bound by reading its
    weight; one ``[sum N_i, K]`` product instead of several small ones saves
    launches and runs closer to the bandwidth ceiling (H100, Qwen3-8B shapes:
    gate+up 70 us fused against 2 x 37-40 us apart). The builder fuses the parts
    when they are all dense, or all NVFP4 with one shared ``weight_scale_2`` and
    ``input_scale`` (Model Optimizer exports unify these for exactly this
    reason); otherwise each part keeps its own ``Linear``.

    Attributes:
      names: the parts' checkpoint names relative to the parent module, e.g.
        ``("q_proj", "k_proj", "v_proj")``; static.
      sizes: each part's output width N_i; static.
      linears: one fused ``Linear`` ``[sum N_i, K]``, or one ``Linear`` per part.
      interleaved: the fused gate/up weight's rows alternate between the two parts in
        groups of ``decoder_layers.GATE_UP_GROUP`` (``interleave_gate_up``; set by
        ``fuse_decoder``); static.
    """

    def __init__(self, names: Sequence[str], sizes: Sequence[int], linears: Sequence[Linear]):
        self.names = tuple(names)
        self.sizes = tuple(int(n) for n in sizes)
        if len(linears) not in (1, len(self.names)):
            raise ValueError(f"{len(linears)} linear layers for parts {self.names}")
        self.fused = len(linears) == 1 and len(self.names) > 1
        self.linears = nnx.List(list(linears))
        self.interleaved = False

    def split(self, y: jax.Array) -> tuple[jax.Array, ...]:
        """The fused matmul's ``[..., sum N_i]`` output -> one ``[..., N_i]`` per part."""
        if self.interleaved:
            return decoder_layers.deinterleave_gate_up(y)
        return _split(y, self.sizes)

    def can_interleave_rows(self) -> bool:
        """Whether ``interleave_rows`` applies (see there)."""
        g = decoder_layers.GATE_UP_GROUP
        if not self.fused or len(self.sizes) != 2 or self.sizes[0] != self.sizes[1]:
            return False
        lin = self.linears[0]
        return self.sizes[0] % g == 0 and lin.quantized and lin.bias is None

    def interleave_rows(self) -> bool:
        """Reorders a fused two-part NVFP4 weight (gate/up) into interleaved rows, in place.

        Returns whether the group is interleaved now (it needs one fused NVFP4 weight,
        two equal parts, each a multiple of ``GATE_UP_GROUP`` rows). The outputs of
        ``__call__`` and ``packed`` do not change.
        """
        if self.interleaved:
            return True
        if not self.can_interleave_rows():
            return False
        lin = self.linears[0]
        lin.weight.set_value(decoder_layers.interleave_gate_up(lin.weight.get_value()))
        self.interleaved = True
        return True

    def __call__(self, x: jax.Array, *, out_dtype=None) -> tuple[jax.Array, ...]:
        """``[..., K]`` -> one ``[..., N_i]`` per part."""
        if not self.fused:
            return tuple(lin(x, out_dtype=out_dtype) for lin in self.linears)
        return self.split(self.linears[0](x, out_dtype=out_dtype))  # [..., N_i] each

    def packed(self, x: jax.Array) -> jax.Array:
        """``[..., K]`` -> ``[..., sum N_i]``: the parts side by side (one matmul when fused)."""
        if self.fused and not self.interleaved:
            return self.linears[0](x)
        return jnp.concatenate(self(x), axis=-1)


class Embedding(nnx.Module):
    """Token embedding ``[V, D]``; ``attend`` reuses it as a tied output layer.

    The table is dense, or an ``NVFP4Tensor`` (``quantize_embedding``): then a
    lookup gathers the rows' codes and block scales and dequantizes only those
    rows (``[..., D]`` in the table's dtype), and ``attend`` is an NVFP4 matmul.

    Attributes:
      weight: ``nnx.Param`` ``[V, D]`` or ``NVFP4Param``.
      quantized: whether the table is NVFP4; static.
      implementation: backend name(s) for ``attend`` on an NVFP4 table; static.
    """

    def __init__(
        self,
        weight: jax.Array | NVFP4Tensor,
        *,
        implementation: str | Sequence[str] | None = None,
    ):
        self.quantized = isinstance(weight, NVFP4Tensor)
        self.weight = NVFP4Param(weight) if self.quantized else nnx.Param(weight)
        self.implementation = _static_implementation(implementation)

    @property
    def dtype(self) -> np.dtype:
        """The dtype a lookup returns (the dense table's, or the NVFP4 table's ``dtype``)."""
        return np.dtype(self.weight.get_value().dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        """``[...]`` int -> ``[..., D]`` in the table's dtype."""
        w = self.weight.get_value()
        if not self.quantized:
            return jnp.take(w, ids, axis=0)
        rows = NVFP4Tensor(
            jnp.take(w.packed, ids, axis=0),
            jnp.take(w.scales, ids, axis=0),
            w.global_scale,
            dtype=w.dtype,
            code_order=w.code_order,
        )
        return nvfp4.dequantize(rows)

    def attend(self, h: jax.Array) -> jax.Array:
        """``[..., D] -> [..., V]`` float32 logits ``h @ E.T``."""
        w = self.weight.get_value()
        if not self.quantized:
            return _dense_dot(h, w, jnp.float32)
        y = nvfp4.matmul(h, w, activations="bf16", implementation=self.implementation)
        return y.astype(jnp.float32)


def quantize_embedding(
    model: nnx.Module, implementation: str | Sequence[str] | None = None
) -> nnx.Module:
    """Replaces ``model.model.embed_tokens`` by its NVFP4 quantization, in place.

    Checkpoints (Model Optimizer exports included) keep the embedding dense;
    this trades its accuracy for memory (a ``[V, D]`` table at 0.5625 B per
    value instead of 2), e.g. to measure a model whose every weight is NVFP4.

    Args:
      model: a ``CausalLM`` with a dense embedding table.
      implementation: backend name(s) for the tied output layer, if tied.

    Returns:
      ``model``.

    Raises:
      ValueError: the embedding is already quantized, or D is not a multiple of 16.
    """
    emb = model.model.embed_tokens
    if emb.quantized:
        raise ValueError("the embedding is already NVFP4")
    w = emb.weight.get_value()
    if w.shape[-1] % 16:
        raise ValueError(f"embedding width {w.shape[-1]} is not a multiple of 16")
    q = nvfp4.quantize(w)
    model.model.embed_tokens = Embedding(q, implementation=implementation)
    return model


class RMSNorm(nnx.Module):
    """``w * x / sqrt(mean(x^2) + eps)``, normalized in float32, scaled in the model dtype."""

    def __init__(self, weight: jax.Array, eps: float):
        self.weight = nnx.Param(weight)
        self.eps = float(eps)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[..., D] -> [..., D]`` in ``x.dtype``, normalized in float32."""
        return rms_norm(x, self.weight.get_value(), self.eps)


# ---- RoPE -----------------------------------------------------------------------------------


def rope_tables(config: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin of every (position, frequency) pair.

    Args:
      config: model config (RoPE variant and base).
      positions: ``[B, S]`` int32 absolute positions.

    Returns:
      ``(cos, sin)``, each float32 ``[B, S, Dh/2]``, already multiplied by the
      variant's attention factor (YaRN).
    """
    inv_freq, factor = rope_frequencies(config)
    inv = jnp.asarray(inv_freq)  # [Dh/2]
    if config.rope_type == "dynamic":
        # Dynamic NTK grows the base once the sequence outruns the trained
        # context; like the reference, the length is the largest position seen
        # in this call.
        dim = config.head_dim
        factor_d = config.rope_params["factor"]
        max_pos = config.max_position_embeddings
        seq = jnp.maximum(jnp.max(positions) + 1, max_pos).astype(jnp.float32)
        base = config.rope_theta * ((factor_d * seq / max_pos) - (factor_d - 1)) ** (
            dim / (dim - 2)
        )
        inv = 1.0 / base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    angles = positions[..., None].astype(jnp.float32) * inv  # [B, S, Dh/2]
    return jnp.cos(angles) * factor, jnp.sin(angles) * factor


# apply_rope and attend live in reset_jax.attention (imported above).


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE; Qwen3 adds per-head q/k RMSNorm before RoPE."""

    def __init__(
        self,
        config: ModelConfig,
        qkv: LinearGroup,
        o_proj: Linear,
        q_norm: RMSNorm | None = None,
        k_norm: RMSNorm | None = None,
    ):
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.qkv, self.o_proj = qkv, o_proj
        self.q_norm, self.k_norm = q_norm, k_norm
        # Static: the implementation(s) of ``reset_jax.attention.decode_attention`` for
        # one-token decode steps (``fuse_attention``), or None for the composition below.
        self.decode_impl = None

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        cache: KVCache | None = None,
        layer: int = 0,
        qkv: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Attention for new tokens, optionally writing them to the cache first.

        Args:
          x: ``[B, S, D]``.
          positions: ``[B, S]`` int32 absolute positions (cache slots).
          cos, sin: float32 ``[B, S, Dh/2]`` from ``rope_tables``.
          cache: the model's cache, or None for the uncached causal forward.
          layer: this layer's index into the cache.
          qkv: the projections side by side, ``[B, S, (Hq + 2 Hkv) Dh]``, when the
            caller computed them (``DecoderLayer.fused``); ``x`` is then unused.

        Returns:
          ``([B, S, D], updated cache or None)``.
        """
        b, s = (x if qkv is None else qkv).shape[:2]
        dh = self.head_dim
        if cache is not None and s == 1 and self.decode_impl is not None:
            # One decode step: the packed projections straight into one op.
            packed = self.qkv.packed(x) if qkv is None else qkv  # [B, 1, (Hq + 2 Hkv) Dh]
            norms = {}
            if self.q_norm is not None:
                norms = dict(q_norm=self.q_norm.weight.get_value(),
                             k_norm=self.k_norm.weight.get_value(), eps=self.q_norm.eps)  # fmt: skip
            out, ck, cv = decode_attention_packed(packed[:, 0], self.num_heads, cos[:, 0],
                                                  sin[:, 0], positions[:, 0], cache.k, cache.v,
                                                  layer, scale=dh**-0.5,
                                                  implementation=self.decode_impl,
                                                  **norms)  # fmt: skip
            return self.o_proj(out[:, None]), cache.replace(k=ck, v=cv)
        q, k, v = self.qkv(x) if qkv is None else _split(qkv, self.qkv.sizes)
        q = q.reshape(b, s, self.num_heads, dh)  # [B, S, Hq, Dh]
        k = k.reshape(b, s, self.num_kv_heads, dh)  # [B, S, Hkv, Dh]
        v = v.reshape(b, s, self.num_kv_heads, dh)  # [B, S, Hkv, Dh]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            keys, values = k, v  # slot t holds token t
        else:
            # Scatter each token to slot positions[b, s] of layer `layer`; with the
            # cache donated, XLA updates the buffer in place.
            rows = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, s))
            ck = cache.k.at[layer, rows, positions].set(k.astype(cache.k.dtype))
            cv = cache.v.at[layer, rows, positions].set(v.astype(cache.v.dtype))
            cache = cache.replace(k=ck, v=cv)
            keys, values = ck[layer], cv[layer]  # [B, T, Hkv, Dh]
        out = attend(q, keys, values, positions, dh**-0.5)  # [B, S, Hq * Dh]
        return self.o_proj(out), cache


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``, gate and up as one ``LinearGroup``."""

    def __init__(self, gate_up: LinearGroup, down_proj: Linear):
        self.gate_up, self.down_proj = gate_up, down_proj

    def __call__(self, x: jax.Array) -> jax.Array:
        """SwiGLU ``down(silu(gate(x)) * up(x))``: ``[B, S, D] -> [B, S, D]``."""
        gate, up = self.gate_up(x)  # [B, S, F] each
        return self.finish(gate, up)

    def finish(self, gate: jax.Array, up: jax.Array) -> jax.Array:
        """``down(silu(gate) * up)`` from the two projections ``[B, S, F]``: ``[B, S, D]``."""
        h = jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)
        return self.down_proj(h.astype(gate.dtype))


class DecoderLayer(nnx.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(
        self,
        self_attn: Attention,
        mlp: MLP,
        input_layernorm: RMSNorm,
        post_attention_layernorm: RMSNorm,
    ):
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = input_layernorm
        self.post_attention_layernorm = post_attention_layernorm
        # Static: fold the residual adds and norms into the NVFP4 matmuls after
        # them (``fuse_norms``); results are the same, the kernels fewer.
        self.fused_norms = False

    def __call__(self, x, positions, cos, sin, cache=None, layer=0):
        """One pre-norm block: ``x [B, S, D]``, ``positions [B, S]``, RoPE ``cos``/``sin``
        ``[B, S, Dh/2]``, optional ``KVCache`` (layer ``layer`` is read and written).

        Returns ``(x [B, S, D], cache)``.
        """
        h, cache = self.self_attn(self.input_layernorm(x), positions, cos, sin, cache, layer)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, cache

    def fused(self, x, pending, positions, cos, sin, cache=None, layer=0):
        """The same block with the residual adds folded into the next projection.

        ``x + pending`` (the previous layer's MLP output, not yet added; None for
        the first layer) and ``x + attention`` are each added, normalized and
        multiplied in one ``nvfp4.fused.add_rms_norm_matmul`` call. Same shapes
        as ``__call__``; returns ``(x, mlp_output, cache)``, where ``x`` still
        lacks ``mlp_output`` (the next layer, or the model, adds it).
        """
        qkv_lin, gu_lin = self.self_attn.qkv.linears[0], self.mlp.gate_up.linears[0]
        if pending is None:
            y = qkv_lin(self.input_layernorm(x))
        else:
            y, x = add_rms_norm_matmul(x, pending, self.input_layernorm.weight.get_value(),
                                       self.input_layernorm.eps, qkv_lin.weight.get_value(),
                                       implementation=qkv_lin.implementation)  # fmt: skip
        h, cache = self.self_attn(None, positions, cos, sin, cache, layer, qkv=y)
        y, x = add_rms_norm_matmul(x, h, self.post_attention_layernorm.weight.get_value(),
                                   self.post_attention_layernorm.eps, gu_lin.weight.get_value(),
                                   implementation=gu_lin.implementation)  # fmt: skip
        gate, up = self.mlp.gate_up.split(y)
        return x, self.mlp.finish(gate, up), cache

    def chain_weights(self) -> LayerWeights | None:
        """This layer as ``decoder_layers.decode_layers`` takes it, or None where it cannot.

        Needs ``fused`` (``fuse_norms``), o and down NVFP4 W4A16 without bias, one
        epsilon for both norms and one for the q/k norms.
        """
        if not self.fused_norms:
            return None
        attn, mlp = self.self_attn, self.mlp
        for lin in (attn.o_proj, mlp.down_proj):
            if not lin.quantized or lin.bias is not None or lin.activations != "bf16":
                return None
        if self.input_layernorm.eps != self.post_attention_layernorm.eps:
            return None
        if attn.q_norm is not None and attn.q_norm.eps != attn.k_norm.eps:
            return None
        return LayerWeights(
            input_norm=self.input_layernorm.weight.get_value(),
            qkv=attn.qkv.linears[0].weight.get_value(),
            q_norm=None if attn.q_norm is None else attn.q_norm.weight.get_value(),
            k_norm=None if attn.k_norm is None else attn.k_norm.weight.get_value(),
            o=attn.o_proj.weight.get_value(),
            post_norm=self.post_attention_layernorm.weight.get_value(),
            gate_up=mlp.gate_up.linears[0].weight.get_value(),
            down=mlp.down_proj.weight.get_value(),
        )

    def can_fuse_norms(self) -> bool:
        """Whether ``fused`` applies: q/k/v and gate/up each one NVFP4 W4A16 matmul, no bias."""

        def ok(group: LinearGroup) -> bool:
            if not group.fused:
                return False
            lin = group.linears[0]
            return lin.quantized and lin.bias is None and lin.activations == "bf16"

        same_dtype = (
            self.input_layernorm.weight.get_value().dtype
            == self.post_attention_layernorm.weight.get_value().dtype
        )
        return same_dtype and ok(self.self_attn.qkv) and ok(self.mlp.gate_up)


def fuse_norms(model: CausalLM) -> int:
    """Folds each layer's residual adds and RMSNorms into the NVFP4 matmuls after them.

    Every layer whose q/k/v and gate/up are each one NVFP4 W4A16 matmul without
    bias switches to ``DecoderLayer.fused``: on the CUDA backend the add, the
    norm and the GEMV run in one custom call (two fewer XLA kernels per norm);
    on other backends the same arithmetic runs as before. Decoding results are
    the same up to the summation order of the norm's mean square.

    Args:
      model: a ``CausalLM`` (changed in place).

    Returns:
      the number of layers switched.
    """
    n = 0
    for layer in model.model.layers:
        # The residual stream keeps the model dtype only if the norms have it too.
        norm_dtype = layer.input_layernorm.weight.get_value().dtype
        layer.fused_norms = layer.can_fuse_norms() and norm_dtype == model.dtype
        n += layer.fused_norms
    return n


def fuse_attention(model: CausalLM, implementation: str | Sequence[str] | None = None) -> int:
    """Runs each layer's one-token decode attention as one ``decode_attention`` call.

    q/k RMSNorm, RoPE, the KV-cache write and the attention over the cache of a
    decode step (one new token per row) become one op: on a CUDA GPU one custom
    call of two kernels instead of ~12 small XLA kernels and two cuBLAS calls per
    layer. Prefill and uncached forwards keep the composition. Results match it
    up to float32 summation order and the probabilities' bf16 rounding, which the
    kernel skips (``reset_jax.attention``).

    Args:
      model: a ``CausalLM`` (changed in place).
      implementation: ``decode_attention``'s ``implementation`` (None: CUDA where it
        can serve the call, else XLA; ``"xla"`` keeps the composition exactly).

    Returns:
      the number of layers switched (layers whose q and k norms differ in epsilon stay).

    Raises:
      ValueError: an unknown implementation name.
    """
    impl = attention.implementation_order(implementation)  # a hashable static tuple
    n = 0
    for layer in model.model.layers:
        attn = layer.self_attn
        ok = attn.q_norm is None or attn.q_norm.eps == attn.k_norm.eps
        attn.decode_impl = impl if ok else None
        n += ok
    return n


CHAIN_MODES = ("layer", "model")


def fuse_decoder(
    model: CausalLM,
    mode: str = "layer",
    *,
    pdl: bool = True,
    interleave_gate_up: bool = True,
    code_order: str = "auto",
    implementation: str | Sequence[str] | None = None,
) -> int:
    """Runs decode steps through ``decoder_layers.decode_layers``: whole layers per custom call.

    Folds the norms first (``fuse_norms``). On the CUDA backend each layer's seven
    kernels (add + norm + q/k/v GEMV, attention, o GEMV, add + norm + gate/up GEMV,
    SwiGLU, down GEMV) then run in one custom call, launched as programmatic
    dependents on sm_90+ so each kernel's start overlaps the previous one's tail.
    Prefill, and any step the custom call cannot serve (CPU, M > 16, a layer that
    does not fit), keep the per-layer path; results are the same up to float32
    summation order (the first layer's norm runs in the fused add + norm kernel) and
    SwiGLU's last float32 bit.

    Args:
      model: a ``CausalLM`` (changed in place).
      mode: ``"layer"`` (one call per layer) or ``"model"`` (every layer in one call,
        so the kernels chain across layers too).
      pdl: programmatic dependent launches (False: plain launches, for A/B).
      interleave_gate_up: reorder each layer's fused gate/up weight once, here, into
        ``decoder_layers.interleave_gate_up``'s row order, so that the CUDA gate+up GEMV
        applies SwiGLU in its epilogue (one kernel fewer per layer; every other path
        splits its output accordingly; results unchanged). False keeps the stacked rows.
      code_order: the order the chained layers' NVFP4 codes are kept in from here on
        (``nvfp4.format.to_code_order``, converted once, here): ``"mma"``, the CUDA
        kernels' faster decode (every other path, e.g. the XLA prefill, converts back
        on the fly, and checkpoints are written in the natural order), ``"natural"``,
        or ``"auto"``: ``"mma"`` where the weights are on a GPU the CUDA library serves,
        else ``"natural"``. A chain that never takes the CUDA call (``implementation``
        not naming ``"cuda"``) keeps or gets natural codes. Results are the same bits
        in every order.
      implementation: ``decode_layers``' ``implementation`` (None: CUDA where it
        serves, else the per-layer path; ``"xla"``: the XLA composition for every step).

    Returns:
      the number of layers that the chained path covers (0: it stays off).

    Raises:
      ValueError: an unknown mode or code order.
    """
    if mode not in CHAIN_MODES:
        raise ValueError(f"mode={mode!r}: expected one of {CHAIN_MODES}")
    if code_order not in (*nvfp4.format.CODE_ORDERS, "auto"):
        raise ValueError(
            f"code_order={code_order!r}: expected 'auto' or one of {nvfp4.format.CODE_ORDERS}"
        )
    fuse_norms(model)
    layers = model.model.layers
    ok = all(layer.chain_weights() is not None for layer in layers)
    if ok and interleave_gate_up and all(ly.mlp.gate_up.can_interleave_rows() for ly in layers):
        for layer in layers:
            layer.mlp.gate_up.interleave_rows()
    impl = _static_implementation(implementation)
    names = (impl,) if isinstance(impl, str) else impl
    if ok:
        order = code_order
        if names is not None and "cuda" not in names:
            order = "natural"  # the order is for the CUDA kernels only
        elif order == "auto":  # the layers' weights live on one device: ask once
            first = layers[0].self_attn.o_proj.weight.get_value().packed
            order = "mma" if nvfp4_cuda.device_reason(first) is None else "natural"
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            done = []
            for lin in (attn.qkv.linears[0], attn.o_proj, mlp.gate_up.linears[0], mlp.down_proj):
                old = lin.weight.get_value()
                new = nvfp4.format.to_code_order(old, order)
                if new is not old:
                    lin.weight.set_value(new)
                    done.append(new.packed)
            # One layer's conversions at a time: dispatched asynchronously, every layer's
            # old and new codes could otherwise be alive at once (peak memory).
            jax.block_until_ready(done)
    model.decoder_chain = (mode, bool(pdl), impl) if ok else None
    return len(layers) if ok else 0


# ---- the decoder ----------------------------------------------------------------------------


class WeightSource(Protocol):
    """Where a model's parameters come from while it is built (a checkpoint or random init)."""

    def tensor(self, name: str, shape: tuple[int, ...]) -> jax.Array:
        """A dense tensor (embedding, norm) in the model dtype, checked against ``shape``."""
        ...

    def linear(self, name: str, out_features: int, in_features: int, bias: bool) -> Linear:
        """The linear layer ``name`` (e.g. ``model.layers.0.self_attn.o_proj``), dense or NVFP4."""
        ...

    def linear_group(
        self, prefix: str, names: Sequence[str], sizes: Sequence[int], in_features: int, bias: bool
    ) -> LinearGroup:
        """Layers ``prefix.<name>`` sharing one input, fused where their weights allow."""
        ...


def layer_progress(n: int, desc: str | None) -> Iterable[int]:
    """``range(n)``, with a tqdm bar named ``desc`` on an interactive terminal (building or
    loading a large model's layers takes a while; None: no bar)."""
    if desc is None:
        return range(n)
    from tqdm import tqdm  # the text bar: tqdm.auto's notebook widget needs ipywidgets

    return tqdm(range(n), desc=desc, unit="layer", disable=None, leave=False)


class DecoderModel(nnx.Module):
    """Embedding, decoder layers and the final norm (the Hugging Face ``model.`` subtree)."""

    def __init__(self, config: ModelConfig, source: WeightSource):
        c = config
        d, dh, f = c.hidden_size, c.head_dim, c.intermediate_size
        self.embed_tokens = Embedding(source.tensor("model.embed_tokens.weight", (c.vocab_size, d)))
        layers = []
        # A source may name the work for a progress bar (``progress``, a str).
        for i in layer_progress(c.num_layers, getattr(source, "progress", None)):
            p = f"model.layers.{i}"

            def norm(name: str, width: int, p=p) -> RMSNorm:
                return RMSNorm(source.tensor(f"{p}.{name}.weight", (width,)), c.rms_norm_eps)

            qkv_sizes = (c.num_heads * dh, c.num_kv_heads * dh, c.num_kv_heads * dh)
            attn = Attention(
                c,
                qkv=source.linear_group(
                    f"{p}.self_attn", ("q_proj", "k_proj", "v_proj"), qkv_sizes, d, c.qkv_bias
                ),
                o_proj=source.linear(f"{p}.self_attn.o_proj", d, c.num_heads * dh, c.o_bias),
                q_norm=norm("self_attn.q_norm", dh) if c.qk_norm else None,
                k_norm=norm("self_attn.k_norm", dh) if c.qk_norm else None,
            )
            mlp = MLP(
                gate_up=source.linear_group(
                    f"{p}.mlp", ("gate_proj", "up_proj"), (f, f), d, c.mlp_bias
                ),
                down_proj=source.linear(f"{p}.mlp.down_proj", d, f, c.mlp_bias),
            )
            layers.append(
                DecoderLayer(
                    attn, mlp, norm("input_layernorm", d), norm("post_attention_layernorm", d)
                )
            )
        # A Python list, unrolled under jit: scanning over layers was 2.6x slower
        # for decode on H100.
        self.layers = nnx.List(layers)
        self.norm = RMSNorm(source.tensor("model.norm.weight", (d,)), c.rms_norm_eps)


class CausalLM(nnx.Module):
    """A decoder-only language model; the family subclasses only name their variant.

    Attributes:
      config: the static ``ModelConfig``.
      model: embedding, layers, final norm.
      lm_head: ``Linear`` ``[V, D]``, or None when the embedding is tied.
    """

    family: str = ""

    def __init__(self, config: ModelConfig, source: WeightSource):
        if self.family and config.family != self.family:
            raise ValueError(
                f"{type(self).__name__} needs a {self.family} config, got {config.family}"
            )
        self.config = config
        self.model = DecoderModel(config, source)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else source.linear("lm_head", config.vocab_size, config.hidden_size, False)
        )
        # Static: (mode, pdl, implementation) of the chained decode path (``fuse_decoder``).
        self.decoder_chain = None

    @property
    def dtype(self) -> np.dtype:
        """The model (activation and cache) dtype: the embedding table's dtype."""
        return self.model.embed_tokens.dtype

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        """Causal forward over whole sequences, no cache.

        Args:
          input_ids: ``[B, S]`` int32, every row starting at position 0.

        Returns:
          float32 logits ``[B, S, V]``.
        """
        b, s = input_ids.shape
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        hidden, _ = self._run(input_ids, positions, None)
        return self.logits(hidden)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        """An empty ``KVCache`` ``[L, batch, max_len, Hkv, Dh]`` (model dtype by default)."""
        c = self.config
        dtype = self.dtype if dtype is None else dtype
        return KVCache.zeros(c.num_layers, batch, max_len, c.num_kv_heads, c.head_dim, dtype)

    def forward(
        self, input_ids: jax.Array, positions: jax.Array, cache: KVCache
    ) -> tuple[jax.Array, KVCache]:
        """Cached forward for prefill (S > 1) and decode (S = 1).

        Each token's key and value are written at cache slot ``positions[b, s]``
        before attention; a query at position ``p`` attends to slots ``0..p`` of
        its own row. Right-padded rows are safe: a padding slot is overwritten by
        the row's next real token before any real query can see it.

        Args:
          input_ids: ``[B, S]`` int32.
          positions: ``[B, S]`` int32 absolute positions, each ``< cache.max_len``
            (a slot past the end is silently dropped).
          cache: ``KVCache`` with batch B.

        Returns:
          ``(hidden [B, S, D] after the final norm, updated cache)``.
        """
        return self._run(input_ids, positions, cache)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """``[..., D] -> [..., V]`` float32, through ``lm_head`` or the tied embedding."""
        if self.lm_head is None:
            return self.model.embed_tokens.attend(hidden)
        return self.lm_head(hidden, out_dtype=jnp.float32)

    def _run_chained(self, x, positions, cos, sin, cache):
        """A decode step through ``decode_layers``; None where it cannot serve the step."""
        mode, pdl, impl = self.decoder_chain
        layers = self.model.layers
        weights = [layer.chain_weights() for layer in layers]
        if any(w is None for w in weights):
            return None
        first = layers[0]
        eps = first.input_layernorm.eps
        attn = first.self_attn
        attn_eps = eps if attn.q_norm is None else attn.q_norm.eps
        same = all(
            ly.input_layernorm.eps == eps
            and ly.self_attn.head_dim == attn.head_dim
            and (ly.self_attn.q_norm is None or ly.self_attn.q_norm.eps == attn_eps)
            for ly in layers
        )
        interleaved = layers[0].mlp.gate_up.interleaved
        same = same and all(ly.mlp.gate_up.interleaved == interleaved for ly in layers)
        x2 = x[:, 0]  # [B, D]
        if not same or (
            impl is None
            and decoder_layers.cuda_unsupported_reason(x2, cache.k, weights, v_cache=cache.v)
        ):
            return None  # the per-layer path (the composition of the same ops)
        h = jnp.zeros_like(x2)
        ck, cv = cache.k, cache.v
        groups = [weights] if mode == "model" else [[w] for w in weights]
        start = 0
        for group in groups:
            x2, h, ck, cv = decoder_layers.decode_layers(
                x2, h, cos[:, 0], sin[:, 0], positions[:, 0], ck, cv, group, start, eps=eps,
                attn_eps=attn_eps, scale=attn.head_dim**-0.5, gate_up_interleaved=interleaved,
                pdl=pdl, implementation=impl,
            )  # fmt: skip
            start += len(group)
        x = (x2 + h)[:, None]  # [B, 1, D]
        return self.model.norm(x), cache.replace(k=ck, v=cv)

    def _run(self, input_ids, positions, cache):
        x = self.model.embed_tokens(input_ids)  # [B, S, D]
        cos, sin = rope_tables(self.config, positions)  # [B, S, Dh/2] each
        if cache is not None and input_ids.shape[1] == 1 and self.decoder_chain is not None:
            out = self._run_chained(x, positions, cos, sin, cache)
            if out is not None:
                return out
        pending = None  # an MLP output not yet added to x (fused layers)
        for i, layer in enumerate(self.model.layers):
            if layer.fused_norms:
                x, pending, cache = layer.fused(x, pending, positions, cos, sin, cache, i)
                continue
            if pending is not None:
                x, pending = x + pending, None
            x, cache = layer(x, positions, cos, sin, cache, i)
        if pending is not None:
            x = x + pending
        return self.model.norm(x), cache
