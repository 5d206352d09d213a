"""End-to-end decode speed: BF16 against NVFP4 (CUDA / Pallas / XLA; W4A16 and W4A4).

Models at real shapes with random weights made on the GPU (no checkpoint travels):
Qwen3-8B and Qwen3-32B configs, plus the real default model when its GGUF is in
the cache. Each (model, variant) runs in its own process so its peak GPU memory
is its own. Per batch size: prefill time, decode ms/token over the steady state
(the jitted `lax.while_loop` of `reset_jax.decode`, timed as a whole and divided
by the steps it ran, median over repeats), tokens/s, weight bytes and peak GPU
memory; ReSET against a fixed temperature on the same loop gives the sampler's
cost. Prints a table with speedups over the faster BF16 path (plain, or with the
fused attention op) and over the issue's plain anchor step (``anchor.py``), and
writes JSON.

Usage:
  python benchmarks/decode.py --models qwen3-8b --batch 1,8 --json /tmp/decode.json
  python benchmarks/decode.py --models qwen3-8b --variants anchor-fused,bf16-fattn,cuda-w4a16-chain-model
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

VARIANTS = {
    # name: (quantize, activations, implementation[, extra build_model options])
    "bf16": (None, "bf16", None),
    "cuda-w4a16": ("nvfp4", "bf16", ("cuda", "xla")),  # prefill (M > 16) goes to XLA
    "cuda-w4a4": ("nvfp4", "nvfp4", ("cuda", "xla")),
    "pallas-w4a16": ("nvfp4", "bf16", ("pallas", "xla")),
    "pallas-w4a4": ("nvfp4", "nvfp4", ("pallas", "xla")),
    "xla-w4a16": ("nvfp4", "bf16", "xla"),
    "xla-w4a4": ("nvfp4", "nvfp4", "xla"),
    # lm_head (and embedding) quantized too: checkpoints keep them dense; these show
    # what an all-NVFP4 model would weigh and decode at
    "cuda-w4a16-qhead": ("nvfp4", "bf16", ("cuda", "xla"), {"exclude": ()}),
    "cuda-w4a16-qall": (
        "nvfp4",
        "bf16",
        ("cuda", "xla"),
        {"exclude": (), "quantize_embedding": True},
    ),
    "xla-w4a16-qall": ("nvfp4", "bf16", "xla", {"exclude": (), "quantize_embedding": True}),
    # residual adds + RMSNorms folded into the following GEMV's custom call
    "cuda-w4a16-fnorm": ("nvfp4", "bf16", ("cuda", "xla"), {"fuse_norms": True}),
    "cuda-w4a16-qhead-fnorm": (
        "nvfp4",
        "bf16",
        ("cuda", "xla"),
        {"exclude": (), "fuse_norms": True},
    ),
    "xla-w4a16-fnorm": ("nvfp4", "bf16", "xla", {"fuse_norms": True}),
    # + each decode step's attention as one custom call (reset_jax.attention)
    "bf16-fattn": (None, "bf16", None, {"fuse_attention": True}),
    "cuda-w4a16-fattn": ("nvfp4", "bf16", ("cuda", "xla"), {"fuse_attention": True}),
    "cuda-w4a16-fnorm-fattn": (
        "nvfp4",
        "bf16",
        ("cuda", "xla"),
        {"fuse_norms": True, "fuse_attention": True},
    ),
    "cuda-w4a16-qhead-fnorm-fattn": (
        "nvfp4",
        "bf16",
        ("cuda", "xla"),
        {"exclude": (), "fuse_norms": True, "fuse_attention": True},
    ),
    # + whole decoder layers in one custom call each (reset_jax.decoder_layers), kernels
    # chained with programmatic dependent launches; "-model": every layer in one call
    "cuda-w4a16-chain": (
        "nvfp4",
        "bf16",
        ("cuda", "xla"),
        {"fuse_attention": True, "fuse_decoder": "layer"},
    ),
    "cuda-w4a16-chain-model": (
        "nvfp4",
        "bf16",
        ("cuda", "xla"),
        {"fuse_attention": True, "fuse_decoder": "model"},
    ),
    # the same with the codes in their natural order (A/B of the MMA word order's decode)
    "cuda-w4a16-chain-model-natural": (
        "nvfp4",
        "bf16",
        ("cuda", "xla"),
        {"fuse_attention": True, "fuse_decoder": "model", "code_order": "natural"},
    ),
    # the same with gate/up rows stacked: SwiGLU as its own kernel (A/B of the epilogue fold)
    "cuda-w4a16-chain-model-stacked": (
        "nvfp4",
        "bf16",
        ("cuda", "xla"),
        {"fuse_attention": True, "fuse_decoder": "model", "interleave_gate_up": False},
    ),
    # NVFP4 lm_head too (not how NVFP4 checkpoints ship: they keep lm_head dense)
    "cuda-w4a16-qhead-chain-model": (
        "nvfp4",
        "bf16",
        ("cuda", "xla"),
        {"exclude": (), "fuse_attention": True, "fuse_decoder": "model"},
    ),
    "cuda-w4a16-chain-nopdl": (
        "nvfp4",
        "bf16",
        ("cuda", "xla"),
        {"fuse_attention": True, "fuse_decoder": "layer", "pdl": False},
    ),
    "cuda-w4a16-qhead-chain": (
        "nvfp4",
        "bf16",
        ("cuda", "xla"),
        {"exclude": (), "fuse_attention": True, "fuse_decoder": "layer"},
    ),
}


# One run of everything the table compares (a long run: the XLA rows decode slowly).
DEFAULT_VARIANTS = (
    "anchor-fused,bf16,bf16-fattn,cuda-w4a16-chain-model,cuda-w4a16,cuda-w4a4,"
    "pallas-w4a16,pallas-w4a4,xla-w4a16,xla-w4a4"
)

# The dense variants "× BF16" divides by: the faster of them per model, batch and sampler.
BF16_BASELINES = ("bf16", "bf16-fattn")

# The plain BF16 step (benchmarks/anchor.py), weights as x @ W ("kn") or x @ W.T
# ("nk"; "nk-fused": q/k/v and gate/up as one matmul each, as the library has them).
ANCHORS = {"anchor": "kn", "anchor-nt": "nk", "anchor-fused": "nk-fused"}


def _qwen3(**shape) -> dict:
    """A Qwen3 ``config.json`` with the published models' shared fields."""
    base = dict(
        architectures=["Qwen3ForCausalLM"],
        vocab_size=151936,
        num_key_value_heads=8,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=40960,
        tie_word_embeddings=False,
        eos_token_id=151645,
    )
    return base | shape


# config.json fields of the published models (shapes are what matter here).
HF_CONFIGS = {
    "qwen3-8b": _qwen3(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32
    ),
    "qwen3-32b": _qwen3(
        hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64
    ),
    # A toy shape for a CPU smoke test of this script.
    "tiny": _qwen3(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
    ),
}


def _tree_bytes(tree) -> int:
    """Bytes of the arrays in ``tree``, an array held twice (a tied embedding) counted once."""
    import jax

    leaves = {id(x): x for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "nbytes")}
    return int(sum(x.nbytes for x in leaves.values()))


def set_logit_std(model, target: float, seed: int = 0) -> float:
    """Sets the final RMSNorm weight to the constant that gives logits of std ``target``.

    Random normal weights give nearly uniform logits: std ~1.3 at the Qwen3-8B
    shape, 11 nats of entropy over 151,936 tokens and a top-p 0.95 nucleus of
    ~10^5 tokens, so every sampled token takes the sampler's full-vocabulary
    sort (``sampling.sample``'s fallback), which real models, at about 1-2 nats,
    rarely need. Gaussian logits of std 7 have ~1.7 nats and a nucleus inside the
    sampler's 256 candidates. Measured on random unit-RMS hidden states through
    the model's own output layer (dense or NVFP4), so the scale is the same for
    every variant of a shape up to quantization error.

    Returns:
      the weight value set.
    """
    import jax
    import jax.numpy as jnp

    norm = model.model.norm
    d = model.config.hidden_size
    norm.weight.set_value(jnp.ones((d,), model.dtype))
    h = jax.random.normal(jax.random.key(seed), (8, d), jnp.float32).astype(model.dtype)
    std = float(jnp.std(model.logits(norm(h))))
    c = target / std
    norm.weight.set_value(jnp.full((d,), c, model.dtype))
    return c


def build(model_name: str, variant: str, logit_std: float = 0.0, num_layers: int | None = None):
    """Builds one model variant (random weights on the device for the named shapes).

    ``num_layers`` replaces a named shape's layer count (0: embedding, final norm and
    ``lm_head`` only -- what a decode step costs outside its layers).

    Returns:
      ``(model, graphdef, params, record)``: the nnx model, its split and a JSON-able
      record (weight bytes, build seconds, device, logit std, norm scale).
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from reset_jax.models import ModelConfig, apply_build_options, build_model, from_pretrained

    quantize, activations, implementation, *more = VARIANTS[variant]
    extra = more[0] if more else {}
    t0 = time.perf_counter()
    if num_layers is not None and model_name not in HF_CONFIGS:
        raise SystemExit(f"--num-layers: only for the random-weight shapes {sorted(HF_CONFIGS)}")
    if model_name in HF_CONFIGS:
        hf = HF_CONFIGS[model_name]
        if num_layers is not None:
            if num_layers < 0:
                raise SystemExit(f"--num-layers must be >= 0, got {num_layers}")
            hf = hf | {"num_hidden_layers": num_layers}
        config = ModelConfig.from_hf(hf)
        # Random normal weights drawn and quantized on the device (seconds for 8B).
        model = build_model(config, dtype=jnp.bfloat16, quantize=quantize,
                            activations=activations, implementation=implementation,
                            **extra)  # fmt: skip
    else:
        # The random shapes' options: ``exclude`` at load time, the rest on the loaded model.
        rest = {k: v for k, v in extra.items() if k != "exclude"}
        model = from_pretrained(
            model_name,
            dtype=jnp.bfloat16,
            quantize=quantize,
            activations=activations,
            implementation=implementation,
            **{k: v for k, v in extra.items() if k == "exclude"},
        )
        apply_build_options(model, implementation=implementation, **rest)
        config = model.config
    norm_scale = None
    if logit_std > 0 and model_name in HF_CONFIGS:
        norm_scale = set_logit_std(model, logit_std)
    graphdef, params = nnx.split(model)
    jax.block_until_ready(params)
    build_s = time.perf_counter() - t0
    weight_bytes = _tree_bytes(params)
    rec = dict(model=model_name, variant=variant, weight_bytes=weight_bytes, build_s=build_s,
               device=str(jax.devices()[0].device_kind),
               logit_std=logit_std if model_name in HF_CONFIGS else None,
               norm_scale=norm_scale, num_layers=config.num_layers, results=[])  # fmt: skip
    return model, graphdef, params, rec


def make_sampler(name: str):
    """The benchmark's ReSET (Qwen boundary ids) or fixed-temperature sampler."""
    from reset_jax import sampling

    if name == "reset":
        # Boundary ids of Qwen's tokenizer ("\n" = 198, "\n\n" = 271) stand in here.
        return sampling.ReSETConfig.create(
            t_high=1.0, t_low=0.1, tau0=0.55, nl_ids=[198], dnl_ids=[271, 382]
        )
    return sampling.FixedTemperature.create(0.6)


def compile_request(model, graphdef, params, batch: int, prompt_len: int, new_tokens: int,
                    sampler, sync_every: int, cache_len: int = 0):  # fmt: skip
    """Compiles the prefill and decode loop for one request of random prompts.

    Prompts are ``[batch, prompt_len]`` token ids drawn with seed ``batch``; top-p
    0.95, no stop ids, ``new_tokens`` to generate; ``sync_every`` as in
    `decode.decode_loop`; a cache of ``cache_len`` slots (0: ``prompt_len + new_tokens``).

    Returns:
      ``(new_cache, prefill, decode)``: ``new_cache()`` an empty cache,
      ``prefill(cache)`` the loop's first state, ``decode(state)`` the final state.
    """
    import jax.numpy as jnp

    from reset_jax import decode as dec

    b, v = batch, model.config.vocab_size
    knobs = dec.make_knobs(b, top_p=0.95, seed=1, stop_ids=(), max_new_tokens=new_tokens)
    ids = jnp.asarray(np.random.default_rng(b).integers(0, v, (b, prompt_len)), jnp.int32)
    lens = jnp.full((b,), prompt_len, jnp.int32)
    max_len = cache_len or prompt_len + new_tokens
    pre = dec.prefill.lower(graphdef, params, ids, lens, model.init_cache(b, max_len),
                            sampler, knobs, max_new=new_tokens).compile()  # fmt: skip
    state0 = pre(params, ids, lens, model.init_cache(b, max_len), sampler, knobs)
    loop = dec.decode_loop.lower(
        graphdef, params, state0, sampler, knobs, sync_every=sync_every
    ).compile()
    return (
        lambda: model.init_cache(b, max_len),
        lambda cache: pre(params, ids, lens, cache, sampler, knobs),  # static args baked in
        lambda state: loop(params, state, sampler, knobs),
    )


def run_one(model_name: str, variant: str, batches: list[int], prompt_len: int, new_tokens: int,
            repeats: int, samplers: list[str], logit_std: float = 0.0,
            syncs: tuple[int | None, ...] = (None,),
            num_layers: int | None = None, cache_len: int = 0) -> dict:  # fmt: skip
    """Builds one model variant and times it; returns a JSON-able record.

    Every batch is timed with every sampler and every ``sync_every`` in ``syncs``
    (None: the library's default). ``cache_len``: KV cache slots (0: prompt + new tokens).

    logit_std > 0: random-weight shapes get their final norm scaled so that the
    logits have that std (``set_logit_std``); 0 keeps the raw random model.
    """
    import jax

    from reset_jax import decode as dec

    if variant in ANCHORS:
        return run_anchor(model_name, variant, batches, prompt_len, new_tokens, repeats, num_layers,
                          cache_len)  # fmt: skip
    cache_len = cache_len or prompt_len + new_tokens
    model, graphdef, params, rec = build(model_name, variant, logit_std, num_layers)
    rec["cache_len"] = cache_len
    syncs = [dec.DEFAULT_SYNC_EVERY if x is None else x for x in syncs]
    for b, sampler_name, sync in itertools.product(batches, samplers, syncs):
        sampler = make_sampler(sampler_name)
        tc = time.perf_counter()
        new_cache, prefill, decode = compile_request(
            model, graphdef, params, b, prompt_len, new_tokens, sampler, sync, cache_len
        )
        compile_s = time.perf_counter() - tc
        prefill_t, decode_t, steps = [], [], None
        for _ in range(repeats + 1):  # the first run warms up
            cache = new_cache()
            jax.block_until_ready(cache)
            t1 = time.perf_counter()
            st = prefill(cache)
            jax.block_until_ready(st)
            t2 = time.perf_counter()
            st = decode(st)
            jax.block_until_ready(st)
            t3 = time.perf_counter()
            prefill_t.append(t2 - t1)
            decode_t.append(t3 - t2)
            steps = int(st.step) - 1  # the loop ran step 1..N-1; prefill made token 0
            lengths = np.asarray(st.lengths)
            bad = np.asarray(st.error_step)
        if (bad >= 0).any() or (lengths < new_tokens).any():
            raise RuntimeError(
                f"{model_name}/{variant}/B={b}: rows stopped early "
                f"(lengths {lengths.tolist()}, bad-logit steps {bad.tolist()})"
            )
        ms_tok = 1e3 * float(np.median(decode_t[1:])) / steps
        stats = jax.devices()[0].memory_stats() or {}
        rec["results"].append(
            dict(
                batch=b,
                sampler=sampler_name,
                sync_every=sync,
                prefill_ms=1e3 * float(np.median(prefill_t[1:])),
                decode_ms_per_token=ms_tok,
                tokens_per_s=b * 1e3 / ms_tok,
                steps=steps,
                compile_s=compile_s,
                peak_bytes=int(stats.get("peak_bytes_in_use", 0)),
            )
        )
        print(json.dumps(rec["results"][-1]), file=sys.stderr, flush=True)
    return rec


def run_anchor(model_name: str, variant: str, batches: list[int], prompt_len: int,
               new_tokens: int, repeats: int, num_layers: int | None = None,
               cache_len: int = 0) -> dict:  # fmt: skip
    """Times the plain BF16 step of ``benchmarks/anchor.py`` like ``run_one`` times a variant.

    The weights are the ``bf16`` variant's, copied into the anchor's plain arrays. Per
    batch: ``new_tokens - 1`` greedy steps from position ``prompt_len`` (the decode loop's
    step count), median over ``repeats`` after a warm-up; no prefill (``prefill_ms`` None).

    Returns:
      a record like ``run_one``'s, sampler ``"greedy"``.
    """
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import anchor

    model, graphdef, lib_params, rec = build(model_name, "bf16", 0.0, num_layers)
    config, dtype, layout = model.config, model.dtype, ANCHORS[variant]
    params = anchor.anchor_params(model, layout)
    del model, graphdef, lib_params  # the library's copies of the weights re-laid out
    jax.block_until_ready(params)
    # logit_std None: the greedy step's logits are not scaled (no sampler reads them)
    cache_len = cache_len or prompt_len + new_tokens
    rec.update(variant=variant, weight_bytes=_tree_bytes(params), layout=layout, logit_std=None,
               cache_len=cache_len)  # fmt: skip
    step = anchor.make_step(config, layout)
    steps = new_tokens - 1
    for b in batches:
        cache = anchor.init_cache(config, b, cache_len, dtype)
        rng = np.random.default_rng(b)
        tokens = jnp.asarray(rng.integers(0, config.vocab_size, b), jnp.int32)
        tc = time.perf_counter()
        cache, tokens, _ = step(params, cache, tokens, jnp.asarray(prompt_len, jnp.int32))
        jax.block_until_ready(tokens)
        compile_s = time.perf_counter() - tc
        times = anchor.time_steps(step, params, cache, tokens, prompt_len, steps, repeats + 1)
        ms_tok = 1e3 * float(np.median(times[1:])) / steps
        stats = jax.devices()[0].memory_stats() or {}
        rec["results"].append(
            dict(batch=b, sampler="greedy", sync_every=None, prefill_ms=None,
                 decode_ms_per_token=ms_tok, tokens_per_s=b * 1e3 / ms_tok, steps=steps,
                 compile_s=compile_s, peak_bytes=int(stats.get("peak_bytes_in_use", 0)))
        )  # fmt: skip
        print(json.dumps(rec["results"][-1]), file=sys.stderr, flush=True)
    return rec


def _table(records: list[dict]) -> str:
    def key(x):  # records written before sync_every existed synced every step
        return x["batch"], x["sampler"], x.get("sync_every", 1)

    def fastest(variants, where) -> dict:
        """``{where(r, x): (ms/token, variant)}``: the fastest result of ``variants`` there."""
        best = {}
        for r in records:
            if r["variant"] in variants:
                for x in r["results"]:
                    k, ms = where(r, x), x["decode_ms_per_token"]
                    if k not in best or ms < best[k][0]:
                        best[k] = (ms, r["variant"])
        return best

    # × BF16 divides by the faster dense row (plain, or with the fused attention op that
    # `reset-jax generate` runs on a GPU) of the same model, batch, sampler and sync.
    base = fastest(BF16_BASELINES, lambda r, x: (r["model"], *key(x)))
    # The plain step (benchmarks/anchor.py): the faster layout per model and batch.
    anchors = fastest(ANCHORS, lambda r, x: (r["model"], x["batch"]))
    head = "| model | variant | B | sampler | sync | prefill ms | decode ms/tok | tok/s | × BF16 |"
    rule = "|---|---|---|---|---|---|---|---|---|"
    if anchors:
        head, rule = head + " × anchor |", rule + "---|"
    lines = [head + " weights GB | × BF16 bytes | peak GB |", rule + "---|---|---|"]
    wbase = {r["model"]: r["weight_bytes"] for r in records if r["variant"] in BF16_BASELINES}

    def model_cell(r):
        named = HF_CONFIGS.get(r["model"], {}).get("num_hidden_layers")
        layers = r.get("num_layers", named)
        if named is None or layers == named:  # a checkpoint, or a shape at its own depth
            return r["model"]
        return f"{r['model']} ({layers} layers)"

    for r in records:
        for x in r["results"]:
            ms = x["decode_ms_per_token"]
            b = base.get((r["model"], *key(x)))
            sp = f"{b[0] / ms:.2f}" if b else "-"
            if anchors:
                a = anchors.get((r["model"], x["batch"]))
                sp += f" | {a[0] / ms:.2f}" if a else " | -"
            wb = wbase.get(r["model"])
            wr = f"{r['weight_bytes'] / wb:.3f}" if wb else "-"
            pre = "-" if x["prefill_ms"] is None else f"{x['prefill_ms']:.1f}"
            lines.append(
                f"| {model_cell(r)} | {r['variant']} | {x['batch']} | {x['sampler']} | "
                f"{'-' if key(x)[2] is None else key(x)[2]} | "
                f"{pre} | {ms:.3f} | {x['tokens_per_s']:.1f} | "
                f"{sp} | {r['weight_bytes'] / 1e9:.2f} | {wr} | {x['peak_bytes'] / 1e9:.1f} |"
            )
    names = [f"{k[0]}/B={k[1]}/{k[2]}/sync={k[3]}: {v}" for k, (_, v) in sorted(base.items())]
    if any(v != "bf16" for _, v in base.values()):
        lines.append("\n× BF16 is against the faster BF16 variant: " + "; ".join(names))
    if anchors:
        which = [f"{m}/B={b}: {v}" for (m, b), (_, v) in sorted(anchors.items())]
        lines.append("\n× anchor is against the faster plain step (greedy, no sampler, one "
                     "jitted call per token; benchmarks/anchor.py): " + "; ".join(which))  # fmt: skip
    # Checkpoints keep their own logits (logit_std None); random shapes are scaled.
    stds = {r.get("logit_std") for r in records} - {None}
    if len(stds) == 1:
        lines.append(f"\nRandom-weight logits scaled to std {stds.pop()} (final norm; 0 = raw)")
    elif stds:
        scaled = [
            (r["variant"], r.get("logit_std")) for r in records if r.get("logit_std") is not None
        ]
        lines.append(f"\nlogit std per random-weight record: {scaled}")
    # The sampler's cost: ReSET against a fixed temperature, same model/variant/batch.
    for r in records:
        by = {key(x): x for x in r["results"]}
        for (bsz, s, sync), x in sorted(by.items()):
            if s == "reset" and (bsz, "fixed", sync) in by:
                f = by[(bsz, "fixed", sync)]["decode_ms_per_token"]
                d = x["decode_ms_per_token"] - f
                lines.append(
                    f"\nReSET overhead {r['model']}/{r['variant']}/B={bsz}/sync={sync}: "
                    f"{1e3 * d:+.1f} µs/token = {100 * d / f:+.2f}% of the step"
                )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="qwen3-8b")
    p.add_argument(
        "--variants",
        default=DEFAULT_VARIANTS,
        help="comma-separated; the default is the issue's table: the plain anchor, both BF16 "
        "paths, NVFP4 through the chain, and W4A16 / W4A4 through CUDA, Pallas and XLA",
    )
    p.add_argument("--batch", default="1,8")
    p.add_argument("--samplers", default="reset", help="reset, fixed or both (reset,fixed)")
    p.add_argument(
        "--also-fixed",
        default="",
        help="variants that also run a fixed temperature (the ReSET overhead), e.g. cuda-w4a16",
    )
    p.add_argument(
        "--sync-every",
        default="",
        help="decode steps per host check of the loop condition (decode.decode_loop; "
        "default: its default); a list such as 1,8 times each",
    )
    p.add_argument(
        "--num-layers",
        type=int,
        default=None,
        help="replace the shape's layer count (0: embedding, norm, lm_head and sampler only)",
    )
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--cache-len",
        type=int,
        default=0,
        help="KV cache slots (0: prompt + new tokens); a long cache with short rows is what "
        "generate() allocates for a large max_new_tokens",
    )
    p.add_argument(
        "--logit-std",
        type=float,
        default=7.0,
        help="random-weight shapes: scale the final norm so logits have this std (about 1.7 "
        "nats of entropy, like a real model); 0 keeps the raw random model (~11 nats, a "
        "full-vocabulary sort in the sampler every token)",
    )
    p.add_argument("--json", default="decode.json")
    p.add_argument("--plot", default="", help="also draw tokens/s per variant into this PNG")
    p.add_argument("--logs", default="", help="folder for each variant process's stderr (XLA logs)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: MODEL:VARIANT in this process
    a = p.parse_args(argv)
    if a.cache_len and a.cache_len < a.prompt_len + a.new_tokens:
        p.error(f"--cache-len {a.cache_len} holds fewer slots than the prompt and the new "
                f"tokens ({a.prompt_len} + {a.new_tokens})")  # fmt: skip
    batches = [int(x) for x in a.batch.split(",")]
    samplers = a.samplers.split(",")
    syncs = tuple(int(x) for x in a.sync_every.split(",")) if a.sync_every else (None,)
    if a.one:
        model, variant = a.one.split(":")
        rec = run_one(model, variant, batches, a.prompt_len, a.new_tokens, a.repeats, samplers,
                      a.logit_std, syncs, a.num_layers, a.cache_len)  # fmt: skip
        print("RECORD " + json.dumps(rec), flush=True)
        return
    records = []
    for model in a.models.split(","):
        for variant in a.variants.split(","):
            if variant not in VARIANTS and variant not in ANCHORS:
                known = sorted(VARIANTS) + sorted(ANCHORS)
                raise SystemExit(f"unknown variant {variant!r}; choose from {known}")
            samplers_v = a.samplers
            if variant in a.also_fixed.split(",") and "fixed" not in samplers_v.split(","):
                samplers_v += ",fixed"
            cmd = [sys.executable, __file__, "--one", f"{model}:{variant}", "--batch", a.batch,
                   "--samplers", samplers_v, "--prompt-len", str(a.prompt_len),
                   "--new-tokens", str(a.new_tokens), "--repeats", str(a.repeats),
                   "--logit-std", str(a.logit_std), "--sync-every", a.sync_every,
                   "--cache-len", str(a.cache_len)]  # fmt: skip
            if a.num_layers is not None:
                cmd += ["--num-layers", str(a.num_layers)]
            print(f"== {model} {variant}", file=sys.stderr, flush=True)
            # Each variant owns the GPU: let it use most of the memory (the BF16
            # Qwen3-32B shape needs ~66 GB of weights; JAX's default is 75 %).
            env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.92", **os.environ}
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if a.logs:
                Path(a.logs).mkdir(parents=True, exist_ok=True)
                safe = f"{model}_{variant}".replace("/", "_")  # a model may be a path or hub id
                Path(a.logs, f"{safe}.log").write_text(out.stderr)
            rec_lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RECORD ")]
            if out.returncode or not rec_lines:
                print(out.stderr[-3000:], file=sys.stderr)
                records.append(dict(model=model, variant=variant, error=out.stderr[-500:]))
                continue
            records.append(json.loads(rec_lines[-1][7:]))
            Path(a.json).write_text(json.dumps(records, indent=1))
    Path(a.json).write_text(json.dumps(records, indent=1))
    print(_table([r for r in records if "results" in r]))
    if a.plot and any("results" in r for r in records):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from plots import plot_decode

        print(f"wrote {plot_decode(records, a.plot)}")
    for r in records:
        if "error" in r:
            print(f"FAILED {r['model']}/{r['variant']}: {r['error'][-300:]}")


if __name__ == "__main__":
    main()
