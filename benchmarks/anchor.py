"""The issue's BF16 anchor: a plain JAX decode step, written without the library's model code.

Issue 5 measured "a plain JAX BF16 decode step of the Qwen3-8B shape (random weights,
unrolled layer loop, cache in place)" at 6.1 ms/token at batch 1 on an H100 and asks
that our BF16 path be at least as fast. This is such a step, so that the comparison
can be made in one run on one card instead of against a number from another day:

* the weights of a library model (dense bf16), copied into plain arrays: q, k, v, gate
  and up as separate matmuls, as the checkpoint names them;
* ``layout="kn"``: every weight ``[K, N]`` and ``h @ W`` (Flax ``Dense``'s kernel
  layout); ``layout="nk"``: ``[N, K]`` and ``h @ W.T`` (PyTorch's, and the library's);
  ``layout="nk-fused"``: the same with q/k/v and gate/up concatenated into one matmul
  each, as the library does (fewer, longer matrix-vector products);
* a Python loop over the layers, unrolled under ``jax.jit``; one cache array per layer,
  head-major ``[B, Hkv, T, Dh]`` so that both attention products are batched over
  (b, kv head) with no transpose of the cache at any batch size, written with
  ``lax.dynamic_update_slice`` and donated, so XLA updates it in place;
* every matmul plain ``@`` in the weights' dtype (float32 accumulation, bf16 result: an
  M = 1 product asked for a float32 result runs 3-13 % slower on an H100);
* attention over all T slots with a ``t <= pos`` mask, float32 softmax;
* the next token by a greedy argmax (no sampler), fed back on the device; one jitted
  call per token from Python, so dispatch runs ahead of the GPU and no step waits for
  the host.

All rows share one position (a batch of equal-length prompts). The prompt is not
prefilled: the cache is random, which costs the same reads.
"""

from __future__ import annotations

import time

import numpy as np

LAYOUTS = ("kn", "nk", "nk-fused")


def anchor_params(model, layout: str = "kn") -> dict:
    """Plain arrays from a dense library ``CausalLM`` (a Qwen3 or Llama shape, no biases).

    Args:
      model: a ``reset_jax.models.CausalLM`` with dense weights.
      layout: ``"kn"`` (weights ``[K, N]``), ``"nk"`` (``[N, K]``) or ``"nk-fused"``
        (``[N, K]``, q/k/v and gate/up concatenated along N).

    Returns:
      a pytree: ``embed [V, D]``, ``norm [D]``, ``lm_head`` (``[D, V]`` or ``[V, D]``),
      ``layers``: per layer ``ln1, ln2 [D]``, ``q, k, v, o, gate, up, down`` (fused:
      ``qkv`` and ``gate_up`` instead of their parts), and ``q_norm, k_norm [Dh]`` where
      the model has them.

    Raises:
      ValueError: an NVFP4 weight, a bias, or an unknown layout.
    """
    import jax.numpy as jnp

    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; expected one of {LAYOUTS}")

    def dense(lin):
        if lin.quantized or lin.bias is not None:
            raise ValueError("the anchor takes dense weights without biases")
        return lin.weight.get_value()  # [N, K]

    def parts(group) -> list:
        ws = [dense(lin) for lin in group.linears]
        if len(ws) == len(group.sizes):
            return ws
        (w,) = ws  # fused [sum N_i, K]
        cuts = np.cumsum(group.sizes)[:-1].tolist()
        return jnp.split(w, cuts, axis=0)

    def lay(w):
        return w.T if layout == "kn" else w  # a copy for "kn"

    m = model.model
    layers = []
    for layer in m.layers:
        attn, mlp = layer.self_attn, layer.mlp
        q, k, v = parts(attn.qkv)
        gate, up = parts(mlp.gate_up)
        p = dict(
            ln1=layer.input_layernorm.weight.get_value(),
            ln2=layer.post_attention_layernorm.weight.get_value(),
            o=lay(dense(attn.o_proj)), down=lay(dense(mlp.down_proj)),
        )  # fmt: skip
        if layout == "nk-fused":
            p.update(qkv=jnp.concatenate([q, k, v]), gate_up=jnp.concatenate([gate, up]))
        else:
            p.update(q=lay(q), k=lay(k), v=lay(v), gate=lay(gate), up=lay(up))
        if attn.q_norm is not None:
            p["q_norm"] = attn.q_norm.weight.get_value()
            p["k_norm"] = attn.k_norm.weight.get_value()
        layers.append(p)
    emb = m.embed_tokens.weight.get_value()
    head = emb if model.lm_head is None else dense(model.lm_head)  # [V, D]
    return dict(embed=emb, norm=m.norm.weight.get_value(), lm_head=lay(head), layers=layers)


def make_step(config, layout: str = "kn", logits: bool = False):
    """The jitted plain decode step for ``config`` (a ``ModelConfig``).

    Args:
      config: the model's ``ModelConfig``.
      layout: the weights' layout in ``params`` (``anchor_params``).
      logits: return the float32 logits ``[B, V]`` instead of the greedy tokens.

    Returns:
      ``step(params, cache, tokens, pos) -> (cache, next_tokens, pos + 1)`` with
      ``cache`` a tuple of per-layer ``(k, v)``, each ``[B, Hkv, T, Dh]`` (donated),
      ``tokens`` ``[B]`` int32 and ``pos`` an int32 scalar (the slot written this step);
      with ``logits=True``, ``(cache, logits [B, V], pos + 1)``.
    """
    import jax
    import jax.numpy as jnp
    from jax import lax

    from reset_jax.models.config import rope_frequencies

    c = config
    hq, hkv, dh = c.num_heads, c.num_kv_heads, c.head_dim
    inv_freq, factor = rope_frequencies(c)
    if c.rope_type == "dynamic":
        raise ValueError("the anchor implements static RoPE only")
    eps = c.rms_norm_eps
    want_logits = bool(logits)

    def mm(x, w):  # x [B, K]; a bf16 product accumulates in float32 and returns bf16
        return x @ w if layout == "kn" else x @ w.T

    def rms(x, w):
        x32 = x.astype(jnp.float32)
        y = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
        return (y.astype(x.dtype) * w).astype(x.dtype)

    def rope(x, cos, sin):  # x [B, H, Dh]; cos/sin [Dh/2]
        x32 = x.astype(jnp.float32)
        x1, x2 = x32[..., : dh // 2], x32[..., dh // 2 :]
        return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)

    def step(params, cache, tokens, pos):
        b = tokens.shape[0]
        x = params["embed"][tokens]  # [B, D]
        ang = pos.astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
        cos, sin = jnp.cos(ang) * factor, jnp.sin(ang) * factor
        new_cache = []
        for p, (ck, cv) in zip(params["layers"], cache, strict=True):
            t = ck.shape[2]
            h = rms(x, p["ln1"])
            if "qkv" in p:
                q, k, v = jnp.split(mm(h, p["qkv"]), [hq * dh, (hq + hkv) * dh], axis=-1)
            else:
                q, k, v = mm(h, p["q"]), mm(h, p["k"]), mm(h, p["v"])
            q, k, v = q.reshape(b, hq, dh), k.reshape(b, hkv, dh), v.reshape(b, hkv, dh)
            if "q_norm" in p:
                q, k = rms(q, p["q_norm"]), rms(k, p["k_norm"])
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            ck = lax.dynamic_update_slice(ck, k[:, :, None].astype(ck.dtype), (0, 0, pos, 0))
            cv = lax.dynamic_update_slice(cv, v[:, :, None].astype(cv.dtype), (0, 0, pos, 0))
            new_cache.append((ck, cv))
            qg = q.reshape(b, hkv, hq // hkv, dh)
            s = jnp.einsum("bkgd,bktd->bkgt", qg, ck, preferred_element_type=jnp.float32)
            s = jnp.where(jnp.arange(t) <= pos, s * dh**-0.5, -jnp.inf)
            a = jax.nn.softmax(s, axis=-1).astype(x.dtype)
            o = jnp.einsum("bkgt,bktd->bkgd", a, cv, preferred_element_type=jnp.float32)
            x = x + mm(o.astype(x.dtype).reshape(b, hq * dh), p["o"])
            h = rms(x, p["ln2"])
            if "gate_up" in p:
                g, u = jnp.split(mm(h, p["gate_up"]).astype(jnp.float32), 2, axis=-1)
            else:
                g, u = mm(h, p["gate"]).astype(jnp.float32), mm(h, p["up"]).astype(jnp.float32)
            x = x + mm((jax.nn.silu(g) * u).astype(x.dtype), p["down"])
        h = rms(x, params["norm"])
        logits = mm(h, params["lm_head"]).astype(jnp.float32)
        if want_logits:
            return tuple(new_cache), logits, pos + 1
        return tuple(new_cache), jnp.argmax(logits, axis=-1).astype(jnp.int32), pos + 1

    return jax.jit(step, donate_argnums=(1,))


def init_cache(config, batch: int, max_len: int, dtype, seed: int = 0) -> tuple:
    """Per-layer ``(k, v)`` ``[B, Hkv, T, Dh]``, random normal (the cost of reading a full cache)."""
    import jax

    c = config
    shape = (batch, c.num_kv_heads, max_len, c.head_dim)
    keys = jax.random.split(jax.random.key(seed), 2 * c.num_layers)
    return tuple(
        (
            jax.random.normal(keys[2 * i], shape, dtype),
            jax.random.normal(keys[2 * i + 1], shape, dtype),
        )
        for i in range(c.num_layers)
    )


def time_steps(step, params, cache, tokens, pos: int, steps: int, repeats: int) -> list[float]:
    """Wall seconds of ``steps`` chained steps from position ``pos``, ``repeats`` times.

    The first call of ``step`` (compilation) should have happened before; each repeat
    starts from the same position, overwriting the slots the last one wrote. ``cache``
    is donated to the first step: the caller's arrays are consumed.
    """
    import jax
    import jax.numpy as jnp

    times = []
    for _ in range(repeats):
        p = jnp.asarray(pos, jnp.int32)
        jax.block_until_ready((cache, tokens, p))
        t0 = time.perf_counter()
        for _ in range(steps):
            cache, tokens, p = step(params, cache, tokens, p)
        jax.block_until_ready((cache, tokens))
        times.append(time.perf_counter() - t0)
    return times
