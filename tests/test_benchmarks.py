"""The benchmarks run end to end on the CPU (toy shapes), so they do not rot between GPU runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reset_jax import sampling as S

ROOT = Path(__file__).resolve().parents[1]


def _load_bench(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_decode_benchmark_tiny(tmp_path):
    out = tmp_path / "decode.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "decode.py"), "--models", "tiny",
           "--variants", "bf16,xla-w4a16,xla-w4a16-qall,cuda-w4a16-chain-model", "--batch", "1",
           "--samplers", "reset", "--also-fixed", "xla-w4a16", "--prompt-len", "8",
           "--new-tokens", "6", "--repeats", "1", "--sync-every", "3", "--json", str(out),
           "--plot", str(tmp_path / "decode.png")]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    records = {r["variant"]: r for r in json.loads(out.read_text())}
    # (the chained variant runs its CPU fallback: the per-layer path)
    assert set(records) == {"bf16", "xla-w4a16", "xla-w4a16-qall", "cuda-w4a16-chain-model"}
    for r in records.values():
        assert "error" not in r, r.get("error")
        for x in r["results"]:
            # 5 loop steps in inner loops of 3: the sixth, after every row is done, is not counted.
            assert x["steps"] == 5 and x["decode_ms_per_token"] > 0 and x["tokens_per_s"] > 0
            assert x["sync_every"] == 3
    # The fixed-temperature rows exist only where asked for.
    samplers = {(x["batch"], x["sampler"]) for x in records["xla-w4a16"]["results"]}
    assert samplers == {(1, "reset"), (1, "fixed")}
    # NVFP4 weights are smaller, and more so with the lm_head and embedding quantized too.
    wb = {v: r["weight_bytes"] for v, r in records.items()}
    assert wb["xla-w4a16-qall"] < wb["xla-w4a16"] < wb["bf16"]
    assert "| tiny | xla-w4a16 | 1 | reset | 3 |" in res.stdout
    assert "ReSET overhead tiny/xla-w4a16/B=1/sync=3" in res.stdout
    # The random model's logits were scaled to the default std (7).
    assert all(r["logit_std"] == 7.0 and r["norm_scale"] > 0 for r in records.values())
    assert "Random-weight logits scaled to std 7.0" in res.stdout
    png = (tmp_path / "decode.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_decode_table_of_a_checkpoint_and_a_random_shape():
    """A checkpoint's record (no logit scaling, its own depth) next to a scaled random shape."""
    bench = _load_bench("decode")

    def rec(model, variant, ms, std, layers):
        x = dict(batch=1, sampler="reset", sync_every=8, prefill_ms=1.0, decode_ms_per_token=ms,
                 tokens_per_s=1e3 / ms, peak_bytes=10**9)  # fmt: skip
        return dict(model=model, variant=variant, weight_bytes=10**9, logit_std=std,
                    num_layers=layers, results=[x])  # fmt: skip

    ckpt = [rec("smollm2-135m-instruct", "bf16", 1.2, None, 30),
            rec("smollm2-135m-instruct", "cuda", 0.8, None, 30)]  # fmt: skip
    table = bench._table(ckpt)
    assert "| smollm2-135m-instruct | cuda | 1 | reset | 8 |" in table  # no "(30 layers)"
    assert "| 1.50 |" in table and "logit" not in table
    table = bench._table([*ckpt, rec("qwen3-8b", "bf16", 6.0, 7.0, 36)])
    assert "Random-weight logits scaled to std 7.0" in table


def _kernel_rows():
    """kernels.py-shaped rows: two projections (one L2-resident), four backends, M 1 and 8."""
    rows = []
    for shape, l2, base in (("a.qkv", False, 20.0), ("b.o", True, 3.0)):
        for m in (1, 8):
            for impl, us in (("bf16", base), ("cuda", base / 2), ("pallas", base / 1.2)):
                if m == 8 and impl == "pallas":
                    continue
                r = dict(shape=shape, M=m, impl=impl, us=us * (1.2 if m == 8 else 1.0),
                         l2_resident=l2)  # fmt: skip
                r["speedup_vs_bf16"] = base * (1.2 if m == 8 else 1.0) / r["us"]
                rows.append(r)
    rows.append(dict(shape="a.qkv", M=1, impl="xla", error="out of memory"))  # no "us": skipped
    return rows


def test_plots_draw_the_kernel_and_decode_tables(tmp_path):
    plots = _load_bench("plots")
    k = plots.plot_kernels({"device": "test GPU", "rows": _kernel_rows()}, tmp_path / "k.png")
    d = plots.plot_decode(
        [
            dict(model="m", variant="bf16", results=[
                dict(batch=1, sampler="reset", decode_ms_per_token=2.0, tokens_per_s=500.0),
                dict(batch=1, sampler="fixed", decode_ms_per_token=1.9, tokens_per_s=526.0)]),
            dict(model="m", variant="cuda", results=[
                dict(batch=1, sampler="reset", decode_ms_per_token=1.0, tokens_per_s=1000.0)]),
            dict(model="m", variant="bf16-fattn", results=[
                dict(batch=1, sampler="reset", decode_ms_per_token=1.5, tokens_per_s=667.0)]),
            dict(model="m", variant="anchor-fused", results=[
                dict(batch=1, sampler="greedy", sync_every=None, decode_ms_per_token=1.6,
                     tokens_per_s=625.0)]),
            dict(model="m", variant="broken", error="x"),
        ],
        tmp_path / "d.png",
    )  # fmt: skip
    for path in (k, d):
        data = open(path, "rb").read()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000
    with pytest.raises(ValueError, match="no M = 1 rows"):
        plots.plot_kernels(
            {"rows": [r for r in _kernel_rows() if r["impl"] == "bf16"]}, tmp_path / "x.png"
        )
    assert plots.cards([dict(device="NVIDIA H200"), dict(), dict(device="NVIDIA H100"),
                        dict(device="NVIDIA H200")]) == "NVIDIA H200 / NVIDIA H100"  # fmt: skip
    assert plots.cards([dict(model="m")]) == ""
    with pytest.raises(ValueError, match="no decode records"):
        plots.plot_decode([dict(model="m", variant="bf16", error="x")], tmp_path / "y.png")
    # The saved H100 runs draw too (the figures in benchmarks/figures come from them).
    data_dir = ROOT / "benchmarks" / "data"
    assert plots.main(["--kernels", str(data_dir / "kernels_O2_h100.json"), "--decode",
                       str(data_dir / "decode_smollm2_O3_h100.json"), "--out", str(tmp_path)]) == 0  # fmt: skip
    assert (tmp_path / "kernels.png").is_file() and (tmp_path / "decode.png").is_file()


def test_plots_draw_a_layer_bench_over_positions(tmp_path):
    plots = _load_bench("plots")
    rows = [
        dict(build="a", position=640, cache_slots=1024, model="m", M=1, us=40.0),
        dict(build="a", position=640, cache_slots=32768, model="m", M=1, us=45.0),  # longer cache
        dict(build="a", position=8000, cache_slots=8064, model="m", M=1, us=60.0),
        dict(build="b", position=8000, cache_slots=8064, model="m", M=1, us=50.0),
        dict(build="b", position=640, cache_slots=1024, model="m", M=1, us=39.0),
    ]
    series = plots.layer_series({"rows": rows})
    assert series == {("m", 1, "a"): [(640, 40.0), (8000, 60.0)],
                      ("m", 1, "b"): [(640, 39.0), (8000, 50.0)]}  # fmt: skip
    with pytest.raises(ValueError, match="no layer bench rows"):
        plots.plot_layer_positions({"rows": []}, tmp_path / "x.png")
    # The saved run draws (benchmarks/figures/layer_attention_AA4_h200.png comes from it).
    path = ROOT / "benchmarks" / "data" / "layer_attention_AA4_h200.json"
    assert plots.main(["--layers", str(path), "--out", str(tmp_path)]) == 0
    data = (tmp_path / "layers.png").read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 10_000
    saved = plots.layer_series(json.loads(path.read_text()))
    assert saved[("qwen3-8b", 8, "aa4afb6")][-1] == (30000, 346.56)
    assert saved[("qwen3-8b", 8, "merged partials")][-1][1] < 320


def test_decode_benchmark_without_layers(tmp_path):
    """--num-layers 0 times what a step costs outside its layers (embedding, norm, lm_head)."""
    out = tmp_path / "decode.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "decode.py"), "--models", "tiny",
           "--variants", "bf16", "--batch", "1", "--prompt-len", "8", "--new-tokens", "4",
           "--repeats", "1", "--num-layers", "0", "--json", str(out)]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    (rec,) = json.loads(out.read_text())
    assert rec["num_layers"] == 0 and rec["results"][0]["steps"] == 3
    # The tiny shape's two layers are gone from the weights: 64 * 512 * 2 (embedding and
    # lm_head) + 64 (final norm) bf16 values.
    assert rec["weight_bytes"] == 2 * (2 * 64 * 512 + 64)
    assert "| tiny (0 layers) | bf16 | 1 | reset |" in res.stdout


def test_decode_benchmark_cache_len():
    """--cache-len sizes the KV cache (a long cache with short rows, as generate() allocates)
    and is recorded; a cache too short for the prompt and the new tokens is refused."""
    bench = _load_bench("decode")
    rec = bench.run_one("tiny", "bf16", [1], prompt_len=4, new_tokens=3, repeats=1,
                        samplers=["reset"], cache_len=48)  # fmt: skip
    assert rec["cache_len"] == 48 and rec["results"][0]["steps"] == 2
    model, graphdef, params, _ = bench.build("tiny", "bf16", 0.0, None)
    new_cache, _, _ = bench.compile_request(model, graphdef, params, 1, 4, 3,
                                            bench.make_sampler("reset"), 1, cache_len=48)  # fmt: skip
    assert new_cache().k.shape[2] == 48
    assert bench.run_one("tiny", "bf16", [1], 4, 3, 1, ["reset"])["cache_len"] == 7
    with pytest.raises(SystemExit):
        bench.main(["--models", "tiny", "--prompt-len", "8", "--new-tokens", "4",
                    "--cache-len", "11"])  # fmt: skip


def _llama_tiny():
    return dict(architectures=["LlamaForCausalLM"], vocab_size=256, hidden_size=64,
                intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
                max_position_embeddings=512, tie_word_embeddings=True)  # fmt: skip


@pytest.mark.parametrize("shape", ["qwen3", "llama"])
@pytest.mark.parametrize("layout", ["kn", "nk", "nk-fused"])
def test_anchor_step_computes_the_library_model(shape, layout):
    """The plain step of benchmarks/anchor.py is the same model as the library's, so timing
    one against the other compares implementations of one computation: its logits, one
    token at a time through its cache, equal the library's uncached forward (float32, with
    float32 products: a GPU's default precision for float32 dots rounds their inputs)."""
    with jax.default_matmul_precision("highest"):
        _anchor_matches_library(shape, layout)


def _anchor_matches_library(shape, layout):
    from reset_jax.models import ModelConfig, build_model

    anchor = _load_bench("anchor")
    hf = _load_bench("decode").HF_CONFIGS["tiny"] if shape == "qwen3" else _llama_tiny()
    config = ModelConfig.from_hf(hf)
    model = build_model(config, dtype=jnp.float32, seed=3)
    b, s = 2, 7
    ids = jax.random.randint(jax.random.key(1), (b, s), 0, config.vocab_size)
    want = model(ids)  # [B, S, V]
    params = anchor.anchor_params(model, layout)
    step = anchor.make_step(config, layout, logits=True)
    cache = anchor.init_cache(config, b, 12, jnp.float32)  # random: slots > pos are masked
    pos, got = jnp.asarray(0, jnp.int32), []
    for t in range(s):
        cache, logits, pos = step(params, cache, ids[:, t].astype(jnp.int32), pos)
        got.append(logits)
    got = jnp.stack(got, axis=1)
    assert int(pos) == s
    scale = float(jnp.max(jnp.abs(want)))
    assert float(jnp.max(jnp.abs(got - want))) < 1e-4 * scale
    # The greedy step takes the argmax of the same logits.
    greedy = anchor.make_step(config, layout)
    cache = anchor.init_cache(config, b, 12, jnp.float32)
    _, tok, _ = greedy(params, cache, ids[:, 0].astype(jnp.int32), jnp.asarray(0, jnp.int32))
    assert (tok == jnp.argmax(want[:, 0], axis=-1)).all()


def test_anchor_rejects_what_it_does_not_implement():
    from reset_jax.models import ModelConfig, build_model

    anchor = _load_bench("anchor")
    config = ModelConfig.from_hf(_load_bench("decode").HF_CONFIGS["tiny"])
    model = build_model(config, dtype=jnp.float32)
    with pytest.raises(ValueError, match="layout"):
        anchor.anchor_params(model, "kk")
    quantized = build_model(config, dtype=jnp.float32, quantize="nvfp4", implementation="xla")
    with pytest.raises(ValueError, match="dense weights"):
        anchor.anchor_params(quantized)


def test_decode_benchmark_times_the_anchor_beside_the_library():
    """decode.py's anchor variants: a greedy record in the run_one format, and a
    "× anchor" column that divides the faster anchor's time by each row's."""
    bench = _load_bench("decode")
    rec = bench.run_one("tiny", "anchor-nt", [1, 2], prompt_len=4, new_tokens=5, repeats=1,
                        samplers=["reset"])  # fmt: skip
    assert rec["variant"] == "anchor-nt" and rec["layout"] == "nk"
    assert [x["batch"] for x in rec["results"]] == [1, 2]
    for x in rec["results"]:
        assert x["sampler"] == "greedy" and x["steps"] == 4 and x["prefill_ms"] is None
        assert x["decode_ms_per_token"] > 0
    # the anchor's weights: the bf16 model's minus nothing (q/k/v split, same bytes)
    bf16 = bench.build("tiny", "bf16")[3]
    assert rec["weight_bytes"] == bf16["weight_bytes"]

    def fake(variant, ms, sampler="reset"):
        x = dict(batch=1, sampler=sampler, sync_every=8, prefill_ms=1.0, decode_ms_per_token=ms,
                 tokens_per_s=1e3 / ms, peak_bytes=10**9)  # fmt: skip
        return dict(model="m", variant=variant, weight_bytes=10**9, results=[x])

    table = bench._table([fake("anchor", 5.0, "greedy") | {"layout": "kn"},
                          fake("anchor-nt", 4.0, "greedy"), fake("bf16", 5.0),
                          fake("cuda", 2.0)])  # fmt: skip
    assert "× anchor |" in table.splitlines()[0]
    assert "against the faster plain step" in table and "m/B=1: anchor-nt" in table
    assert rec["logit_std"] is None  # the greedy step's logits are not scaled
    assert "| m | cuda | 1 | reset | 8 | 1.0 | 2.000 | 500.0 | 2.50 | 2.00 |" in table
    assert "| m | bf16 | 1 | reset | 8 | 1.0 | 5.000 | 200.0 | 1.00 | 0.80 |" in table
    assert "× anchor" not in bench._table([fake("bf16", 5.0)])
    # × BF16 divides by the faster dense variant, and the table says which one it was.
    table = bench._table([fake("bf16", 5.0), fake("bf16-fattn", 4.0), fake("cuda", 2.0)])
    assert "| m | cuda | 1 | reset | 8 | 1.0 | 2.000 | 500.0 | 2.00 |" in table
    assert "| m | bf16 | 1 | reset | 8 | 1.0 | 5.000 | 200.0 | 0.80 |" in table
    assert "against the faster BF16 variant: m/B=1/reset/sync=8: bf16-fattn" in table
    assert "faster BF16" not in bench._table([fake("bf16", 5.0), fake("bf16-fattn", 6.0)])


def test_decode_default_variants_are_the_issues_table():
    """With no --variants, decode.py runs every backend and activation format the issue
    compares, beside the plain anchor and both BF16 paths; every name is one it knows."""
    bench = _load_bench("decode")
    names = bench.DEFAULT_VARIANTS.split(",")
    assert all(v in bench.VARIANTS or v in bench.ANCHORS for v in names)
    for impl in ("cuda", "pallas", "xla"):
        assert {f"{impl}-w4a16", f"{impl}-w4a4"} <= set(names)
    assert {"anchor-fused", *bench.BF16_BASELINES, "cuda-w4a16-chain-model"} <= set(names)


def test_tree_bytes_counts_a_shared_array_once():
    bench = _load_bench("decode")
    a, b = jnp.zeros((4, 8), jnp.bfloat16), jnp.zeros((3,), jnp.float32)
    assert bench._tree_bytes({"embed": a, "lm_head": a, "norm": b}) == 64 + 12


def test_checkpoint_variants_get_the_random_shapes_build_options():
    """decode.py's chained / fused / all-NVFP4 variants on a loaded checkpoint (the default
    model) take the steps build_model takes for the random shapes: ``exclude`` at load time,
    the rest through ``models.apply_build_options``, as ``decode.build`` splits them."""
    from reset_jax.models import ModelConfig, apply_build_options, build_model
    from reset_jax.nvfp4 import cuda as nvfp4_cuda

    bench = _load_bench("decode")
    config = ModelConfig.from_hf(bench.HF_CONFIGS["tiny"])
    kw = dict(dtype=jnp.float32, quantize="nvfp4", implementation="xla")
    variants = ("cuda-w4a16-chain-model", "cuda-w4a16-chain-model-natural",
                "cuda-w4a16-fnorm-fattn", "xla-w4a16-qall")  # fmt: skip
    for variant in variants:
        extra = bench.VARIANTS[variant][3]
        loaded = build_model(config, **kw, exclude=extra.get("exclude", ("lm_head",)))
        rest = {k: v for k, v in extra.items() if k != "exclude"}
        assert apply_build_options(loaded, implementation="xla", **rest) is loaded
        want = build_model(config, **kw, **extra)
        assert loaded.decoder_chain == want.decoder_chain, variant
        got_layers, want_layers = loaded.model.layers, want.model.layers
        for a, b in zip(got_layers, want_layers, strict=True):
            assert a.fused_norms == b.fused_norms, variant
            assert a.self_attn.decode_impl == b.self_attn.decode_impl, variant
            assert a.mlp.gate_up.interleaved == b.mlp.gate_up.interleaved, variant
            down = a.mlp.down_proj.weight.get_value()
            order = extra.get("code_order", "auto") if "fuse_decoder" in extra else "natural"
            if order == "auto":
                order = "mma" if nvfp4_cuda.device_reason(down.packed) is None else "natural"
            assert down.code_order == b.mlp.down_proj.weight.get_value().code_order == order, (
                variant
            )
        emb, want_emb = loaded.model.embed_tokens, want.model.embed_tokens
        assert emb.quantized == want_emb.quantized, variant
    # apply_build_options passes code_order on to fuse_decoder.
    forced = apply_build_options(build_model(config, **kw), fuse_decoder="model", code_order="mma")
    assert forced.model.layers[0].mlp.down_proj.weight.get_value().code_order == "mma"
    with pytest.raises(TypeError, match="seed"):  # an option it does not handle
        apply_build_options(loaded, seed=1)


def test_set_logit_std_sets_the_logit_scale():
    from reset_jax.models import ModelConfig, build_model

    bench = _load_bench("decode")
    for quantize in (None, "nvfp4"):
        model = build_model(
            ModelConfig.from_hf(bench.HF_CONFIGS["tiny"]), dtype=jnp.float32, quantize=quantize
        )
        c = bench.set_logit_std(model, 7.0)
        assert c > 0 and bool((model.model.norm.weight.get_value() == c).all())
        # Fresh hidden states (not the ones it measured on) and real forward logits.
        h = jax.random.normal(jax.random.key(9), (64, 64), jnp.float32) * 3.0
        std = float(jnp.std(model.logits(model.model.norm(h))))
        assert 6.0 < std < 8.0, std
        ids = jnp.arange(16, dtype=jnp.int32)[None]
        assert 5.0 < float(jnp.std(model(ids))) < 9.0


def _profile_module():
    saved = list(sys.path)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import profile_decode
    finally:
        sys.path[:] = saved  # the module adds benchmarks/ too
    return profile_decode


def test_profile_account_of_synthetic_kernels():
    """The decode profiler's per-token account: busy time merges overlapping kernels,
    idle time is what lies between them, and kernels group by kind."""
    prof = _profile_module()
    gemv = "void nvfp4::WideGemvKernel<1, 2, 8, true>(nvfp4::KParams)"
    events = [  # (name, start ns, duration ns) over 2 decode steps
        (gemv, 0, 10_000),
        ("loop_add_fusion_3", 10_000, 1_000),
        ("loop_add_fusion_17", 12_000, 1_000),  # 1 µs idle before it
        ("nvjet_tst_64x8_64x16_4x1_v_bz_TNT", 12_500, 2_000),  # overlaps the add
        ("Memcpy DtoD", 20_000, 500),
        (gemv, 30_000, 10_000),
    ]
    acc = prof.account(events, steps=2, wall_s=50e-6)
    assert acc["wall_ms_per_token"] == pytest.approx(0.025)
    assert acc["gpu_span_ms_per_token"] == pytest.approx(0.020)  # 0 .. 40 µs
    # busy: [0, 11) + [12, 14.5) + [20, 20.5) + [30, 40) = 24 µs over 2 steps
    assert acc["kernel_busy_ms_per_token"] == pytest.approx(0.012)
    assert acc["idle_ms_per_token"] == pytest.approx(0.008)  # 1 + 5.5 + 9.5 µs of gaps / 2
    assert acc["kernels_per_token"] == 3
    rows = {r["kind"]: r for r in acc["rows"]}
    assert set(rows) == {"nvfp4 (ours): wide", "xla: loop_add_fusion", "cuBLAS GEMM/GEMV",
                         "copy/memset"}  # fmt: skip
    assert rows["nvfp4 (ours): wide"]["us_per_token"] == pytest.approx(10.0)
    assert rows["nvfp4 (ours): wide"]["calls_per_token"] == 1
    assert rows["xla: loop_add_fusion"]["us_per_call"] == pytest.approx(1.0)
    assert acc["rows"][0]["kind"] == "nvfp4 (ours): wide"  # sorted by time
    kind = prof.kernel_kind
    assert kind("void nvfp4::GemvKernel<16, 1, 2, 8>(nvfp4::KParams)") == "nvfp4 (ours): GemvKernel"
    assert (
        kind("void nvfp4::QuantizeActivationsKernel<true>(__nv_bfloat16 const*, float const*)")
        == "nvfp4 (ours): QuantizeActivationsKernel"
    )
    assert kind("void gemv2T_kernel_val<int, int, __nv_bfloat16>(...)") == "cuBLAS GEMM/GEMV"
    attn = (
        "void rjattn::(anonymous namespace)::AttnPartialKernel<128, 4>(rjattn::DecodeAttentionArgs)"
    )
    assert kind(attn) == "attention (ours): AttnPartialKernel"
    # kernels outside CUDA graphs: counted by kind per token; unknown without graph ids
    outside = prof.outside_graphs([*events[:2], (attn, 0, 1)], [7, 0, 0], steps=2)
    assert outside == {"xla: loop_add_fusion": 0.5, "attention (ours): AttnPartialKernel": 0.5}
    # An event without a graph id is counted apart, not as outside.
    kind1 = prof.kernel_kind(events[1][0])
    assert prof.outside_graphs(events[:2], [7, None], steps=2) == {f"no graph id: {kind1}": 0.5}
    assert prof.outside_graphs(events[:2], [None, None], steps=2).startswith("unknown")
    with pytest.raises(ValueError, match="no decode step"):
        prof.account(events, steps=0, wall_s=1.0)


def test_profile_reads_a_trace(tmp_path):
    """gpu_events reads the newest trace in a folder: on a GPU its kernels, on the CPU
    a clear error naming the lines it saw, not an empty table."""
    prof = _profile_module()
    f = jax.jit(lambda x: jnp.sin(x) @ x)
    x = jnp.ones((64, 64))
    f(x).block_until_ready()
    for _ in range(2):  # two traces in one folder: only the newest is read
        with jax.profiler.trace(str(tmp_path)):
            f(x).block_until_ready()
    if jax.default_backend() == "gpu":
        events = prof.gpu_events(str(tmp_path))
        assert events and all(d >= 0 for _, _, d in events)
    else:
        with pytest.raises(SystemExit, match=r"no GPU stream events.*lines: \["):
            prof.gpu_events(str(tmp_path))
    with pytest.raises(SystemExit, match=r"no \.xplane\.pb"):
        prof.gpu_events(str(tmp_path / "empty"))


def test_profile_op_table_merges_layers():
    """Kernels group by the JAX source path of their HLO op, layer numbers merged."""
    prof = _profile_module()
    events = [("loop_add_fusion_3", 0, 1000), ("loop_add_fusion_4", 2000, 1000), ("k", 5000, 3000)]
    ops = ["fusion.12", "fusion.13", ""]
    source = {
        "fusion.12": "jit(decode_loop)/while/body/layers.3/add",
        "fusion.13": "jit(decode_loop)/while/body/layers.17/add",
    }
    rows = prof.op_table(events, ops, source, steps=2)
    assert rows == [
        dict(op="xla: k", us_per_token=1.5, calls_per_token=0.5),
        dict(op="jit(decode_loop)/while/body/layers.#/add", us_per_token=1.0, calls_per_token=1.0),
    ]


def test_profile_gap_table_names_the_kernels_around_each_gap():
    """Idle gaps group by the kernel that ended last before them and the one after."""
    prof = _profile_module()
    # a [0, 10) and b [2, 4) overlap: the gap after them runs from 10, not 4.
    events = [("a", 0, 10_000), ("b", 2_000, 2_000), ("c", 13_000, 1_000), ("a", 14_200, 800),
              ("c", 16_000, 1_000), ("b", 17_100, 100)]  # fmt: skip
    ops = ["fusion.1", "", "", "fusion.1", "", ""]
    source = {"fusion.1": "jit(decode_loop)/while/body/layers.3/sample/cond"}
    rows = prof.gap_table(events, ops, source, steps=2)
    a = "xla: a @sample/cond"
    assert rows == [
        dict(before=a, after="xla: c", us_per_token=2.0, gaps_per_token=1.0, us_per_gap=2.0),
    ]  # 10 -> 13 and 15 -> 16; 14 -> 14.2 and 17 -> 17.1 are below 0.5 µs


def test_topk_benchmark_checks_exactness(capsys):
    """benchmarks/topk.py compares each top-k method here with lax.top_k (eight kinds of rows)
    and fails on a mismatch."""
    mod = _load_bench("topk")
    assert mod.main(["--reps", "1", "--iters", "2", "--vocab", "4096", "--k", "64"]) == 0
    out = capsys.readouterr().out
    methods = 2 if "'cuda'" in out else 1  # the CUDA kernels where the library and a GPU are
    assert out.count("identical=True") == 8 * methods and "identical=False" not in out
    assert "| 8 |" in out


def test_sampler_cost_benchmark(tmp_path, capsys):
    """benchmarks/sampler_cost.py times both rules (and the pieces) and reports ReSET - fixed."""
    mod = _load_bench("sampler_cost")
    out_json = tmp_path / "sc.json"
    args = ["--batch", "1,2", "--vocab", "1024", "--iters", "2", "--rounds", "2", "--pieces"]
    assert mod.main([*args, "--step-ms", "2.0,3.0", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    for b in (1, 2):
        for name in ("fixed", "reset", "loop", "entropy", "top-k", "sample"):
            assert f"| {b} | {name} |" in out
    assert out.count("**reset − fixed**") == 2 and "% of a 3.0 ms step" in out
    rec = json.loads(out_json.read_text())["us_per_step"]
    assert sorted(rec) == ["1", "2"] and all(len(v) == 2 for v in rec["2"].values())
    assert all(t > 0 for v in rec["1"].values() for t in v)
    with pytest.raises(SystemExit):
        mod.main(["--batch", "1,8", "--step-ms", "2.0"])  # one step time per batch size


def test_sampler_cost_against_another_revision(capsys, monkeypatch):
    """--against times another revision's sampler in the same loop, side by side: here the
    one before the lax.switch, which draws the same tokens as this one with its hot
    candidates off (that revision has none)."""
    mod = _load_bench("sampler_cost")
    try:
        old = mod.load_sampling_at("8976df7")
    except SystemExit as e:  # a shallow clone may not hold that commit
        pytest.skip(str(e))
    body, state = mod.variants(2, 512, pieces=False, against={"8976df7": old})["reset@8976df7"]
    sample = mod.sampling.sample
    with monkeypatch.context() as m:
        m.setattr(mod.sampling, "sample", lambda *a, **kw: sample(*a, **kw, hot_candidates=1))
        new_body, new_state = mod.variants(2, 512, pieces=False)["reset"]
        logits = 3.0 * jax.random.normal(jax.random.key(2), (2, 512))
        got = mod._loop(body, state, 5)(jax.random.key(0), logits)
        want = mod._loop(new_body, new_state, 5)(jax.random.key(0), logits)
    assert got[2].tolist() == want[2].tolist()  # the summed tokens of 5 steps
    args = ["--batch", "1", "--vocab", "512", "--iters", "2", "--rounds", "1"]
    assert mod.main([*args, "--logit-std", "2.0", "--against", "8976df7"]) == 0
    out = capsys.readouterr().out
    assert "| 1 | reset@8976df7 |" in out and "logit std 2.0" in out
    with pytest.raises(SystemExit, match="no-such-rev"):
        mod.load_sampling_at("no-such-rev")


def test_sampler_cost_against_a_saved_file(tmp_path):
    """--against also takes a saved sampling.py (the GPU machine has no git history): its
    sampler (rules, step, sample, observe) is that file's, under the file's name."""
    mod = _load_bench("sampler_cost")
    src = Path(__file__).resolve().parents[1] / "reset_jax" / "sampling.py"
    saved = tmp_path / "sampling_v0.py"
    saved.write_text(src.read_text() + "\nMARK = 'saved'\n")
    old = mod.load_sampling_at(str(saved))
    assert old.MARK == "saved" and old.sample is not None
    body, st = mod.variants(1, 256, pieces=False, against={"sampling_v0": old})["reset@sampling_v0"]
    assert callable(body)
    # The whole sampler is that file's: its rule and state too, not only its sample.
    assert isinstance(st[1]["rule"], old.ReSETConfig) and isinstance(st[0], old.ReSETState)
    with pytest.raises(SystemExit, match="no such file"):
        mod.load_sampling_at(str(tmp_path / "missing.py"))
    # Revisions keep their names; two files of one name would share a label.
    other = tmp_path / "b" / "sampling_v0.py"
    other.parent.mkdir()
    other.write_text(saved.read_text())
    with pytest.raises(SystemExit):
        mod.main(["--batch", "1", "--against", f"{saved},{other}"])


def test_sampler_cost_paths_force_each_sampler_path():
    """--paths: each logits set's top-p 0.95 nucleus falls where its path says, at every
    temperature the rules pick (fixed 0.6; ReSET 0.1 or 1.0): within the 256 candidates
    (fast, hot), past 512 (a hot row's candidates) but within the 1024 wide ones, past
    those (float64 count); and ReSET (its tau0 0.55 here) picks t_low on the fast logits,
    t_high on the others."""
    mod = _load_bench("sampler_cost")
    widths = _load_bench("nucleus_widths")
    v = 8192
    ranges = {"fast": (1, 256), "hot": (1, 256), "wide": (513, 1024), "full": (1025, v)}
    assert set(ranges) == set(mod.PATHS)
    for path, (lo, hi) in ranges.items():
        x = np.asarray(mod.forced_logits(path, 3, v, 7.0, jax.random.key(4)))
        assert x.shape == (3, v) and x.dtype == np.float32 and np.isfinite(x).all()
        for t in (0.1, 0.6, 1.0):
            sizes = widths.nucleus_sizes(x, np.full(3, t), 0.95)
            assert ((lo <= sizes) & (sizes <= hi)).all(), (path, t, sizes)
        h = np.asarray(S.token_entropy(jnp.asarray(x)))
        assert ((h < 0.55) if path == "fast" else (h > 0.55)).all(), (path, h)
    with pytest.raises(ValueError, match="at least 4096"):
        mod.forced_logits("full", 1, 2000, 7.0, jax.random.key(0))


def test_sampler_cost_profile_accounts_each_path(tmp_path, monkeypatch, capsys):
    """--profile: one traced loop of each variant on each path, its kernels accounted a step
    (the trace's GPU kernels stand in here: a CPU trace has none), and a clear error where
    it cannot run."""
    mod = _load_bench("sampler_cost")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import profile_decode

    iters, seen = 4, []

    def fake_gpu_events(trace_dir, with_ops=False):
        seen.append(os.path.basename(trace_dir))
        # Per step: a 3 µs kernel, 16 µs idle (a readback), a 5 µs kernel.
        events, ops = [], []
        for i in range(iters):
            t = i * 30_000
            events += [("input_reduce_fusion", t, 3_000), ("loop_select_fusion", t + 19_000, 5_000)]
            ops += ["jit(run_from)/while/body/reduce_max", "jit(run_from)/while/body/select_n"]
        return events, ops, {}, [], [None] * len(events)

    monkeypatch.setattr(profile_decode, "gpu_events", fake_gpu_events)
    runs = {n: mod._loop(fn, st, iters) for n, (fn, st) in mod.variants(2, 4096, False).items()}
    prof = mod.profile_paths(runs, mod.path_logits(2, 4096, 7.0), iters, str(tmp_path))
    assert set(prof) == set(mod.PATHS) and all(set(a) == {"fixed", "reset"} for a in prof.values())
    assert sorted(seen) == sorted(f"b2_{p}_{n}" for p in mod.PATHS for n in ("fixed", "reset"))
    acc = prof["wide"]["reset"]
    assert acc["steps"] == iters and acc["kernels_per_token"] == 2
    assert acc["kernel_busy_ms_per_token"] * 1e3 == pytest.approx(8.0)
    assert acc["ops"][0]["us_per_token"] == pytest.approx(5.0)
    assert acc["gaps"][0]["us_per_token"] == pytest.approx(16.0)  # the readback, each step
    mod._print_profile(2, prof, top=3)
    text = capsys.readouterr().out
    assert "| wide | reset |" in text and "select_n | 5.00 | 1.00 |" in text
    # The flag --profile adds (for the CUDA graphs under the profiler) stays in this test.
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    with pytest.raises(SystemExit):
        mod.main(["--profile", str(tmp_path)])  # needs --paths
    monkeypatch.setattr(mod.jax, "default_backend", lambda: "cpu")  # also on a GPU host
    with pytest.raises(SystemExit):
        mod.main(["--paths", "--profile", str(tmp_path)])  # needs a GPU
    assert "xla_enable_command_buffers_during_profiling=true" in os.environ["XLA_FLAGS"]


def test_sampler_cost_expected_cost_at_real_rates(tmp_path, capsys):
    """A batch takes the full sort where some row is past 1024, else the wide draw where
    some row is past its first candidates (256; a hot row's 384 where the sampler has hot
    candidates), else the hot path where some row is hot (rows independent); the expected
    step weights each path's time."""
    mod = _load_bench("sampler_cost")
    older = type("older", (), {"sample": staticmethod(lambda key, logits, t, top_p=1.0: None)})
    assert mod.hot_candidates(S) == 384 and mod.hot_candidates(older) == 0
    # A quarter of the rows hot; 10 % of all rows past 256 (8 % hot, 2 % cold), 3 % past
    # 384 (all hot), 1 % past 1024.
    caps = {
        "256": {"share": 0.1, "share_at_t_high": 0.32},
        "384": {"share": 0.03, "share_at_t_high": 0.12},
        "1024": {"share": 0.01, "share_at_t_high": 0.04},
    }
    rule = {"caps": {c: dict(v, share_hot=v["share_at_t_high"]) for c, v in caps.items()}}
    rule["hot"] = 0.25
    r = mod.path_rates(rule, 1, hot=384)
    assert r == pytest.approx({"fast": 0.73, "hot": 0.22, "wide": 0.04, "full": 0.01})
    old = mod.path_rates(rule, 1)
    assert old == pytest.approx({"fast": 0.9, "hot": 0.0, "wide": 0.09, "full": 0.01})
    r8 = mod.path_rates(rule, 8, hot=384)
    assert r8["full"] == pytest.approx(1 - 0.99**8) and r8["fast"] == pytest.approx(0.73**8)
    assert r8["wide"] + r8["full"] == pytest.approx(1 - 0.95**8)
    assert sum(r8.values()) == pytest.approx(1.0)
    assert sum(mod.path_rates(rule, 8).values()) == pytest.approx(1.0)
    with pytest.raises(SystemExit, match="not 512"):
        mod.path_rates(rule, 8, hot=512)
    path_us = {"fast": 10.0, "hot": 12.0, "wide": 20.0, "full": 100.0}
    assert mod.expected_us(path_us, r) == pytest.approx(
        0.73 * 10 + 0.22 * 12 + 0.04 * 20 + 0.01 * 100
    )
    rates = tmp_path / "r.json"
    zero = {c: {"share": 0.0} for c in caps}
    rec = {
        "steps": 100,
        "steps_at_t_high": 25,
        "caps": caps,
        "model": "m",
        "fixed": {"caps": zero, "temperature": 0.6},
    }
    rates.write_text(json.dumps(rec))
    assert mod.load_rates(str(rates))["reset"]["hot"] == pytest.approx(0.25)
    assert mod.load_rates(str(rates))["fixed"]["hot"] == 0.0  # T = 0.6: below the hot one
    out = tmp_path / "o.json"
    args = ["--batch", "1", "--vocab", "4096", "--iters", "2", "--rounds", "1", "--paths"]
    assert mod.main([*args, "--rates", str(rates), "--json", str(out), "--step-ms", "2.0"]) == 0
    text = capsys.readouterr().out
    assert "| 1 | reset | 73.00 % | 22.00 % | 4.00 % | 1.00 % |" in text
    assert "| 1 | fixed | 100.00 % | 0.00 % | 0.00 % | 0.00 % |" in text
    assert "reset − fixed, expected" in text and "% of a 2.0 ms step" in text
    got = json.loads(out.read_text())
    assert set(got["us_per_step"]["1"]) == set(mod.PATHS)
    times = {p: np.median(got["us_per_step"]["1"][p]["reset"]) for p in mod.PATHS}
    want = mod.expected_us(times, r)
    assert got["expected_us"]["1"]["reset"] == pytest.approx(want)
    # A rates file without the fixed rule's counts, or from another fixed temperature.
    del rec["fixed"]
    rates.write_text(json.dumps(rec))
    with pytest.raises(SystemExit, match="fixed-temperature"):
        mod.main([*args, "--rates", str(rates)])
    rec["fixed"] = {"caps": caps, "temperature": 0.7}
    rates.write_text(json.dumps(rec))
    with pytest.raises(SystemExit, match=r"T = 0\.7"):
        mod.main([*args, "--rates", str(rates)])
    # Rates without this sampler's hot count (384), for either rule: an error before timing.
    for rule in ("reset", "fixed"):
        bad = json.loads(json.dumps(dict(rec, fixed={"caps": zero, "temperature": 0.6})))
        del (bad["caps"] if rule == "reset" else bad["fixed"]["caps"])["384"]
        rates.write_text(json.dumps(bad))
        with pytest.raises(SystemExit):
            mod.main([*args, "--rates", str(rates)])
        assert f"its {rule} rule counts kept sets wider than" in capsys.readouterr().err
    # Rates without ReSET's t_high counts.
    good = dict(rec, fixed={"caps": zero, "temperature": 0.6})
    rates.write_text(json.dumps({k: v for k, v in good.items() if k != "steps_at_t_high"}))
    with pytest.raises(SystemExit, match="steps_at_t_high"):
        mod.main([*args, "--rates", str(rates)])
    with pytest.raises(SystemExit):
        mod.main(["--rates", str(rates)])  # --rates needs --paths
    with pytest.raises(SystemExit):
        mod.main(["--paths", "--vocab", "2000"])  # too small for the full sort's logits
    # The saved rates that h100_session.sh passes load, with both rules' counts.
    saved = mod.load_rates(
        str(ROOT / "benchmarks" / "data" / "nucleus_widths_smollm2_AG5_cpu.json")
    )
    assert mod.path_rates(saved["reset"], 8)["wide"] > 0.1
    assert mod.path_rates(saved["reset"], 8, hot=384)["wide"] < 0.15
    assert mod.path_rates(saved["fixed"], 8, hot=384)["fast"] == 1.0
    assert (
        "nucleus_widths_smollm2_AG5_cpu.json"
        in (ROOT / "benchmarks" / "h100_session.sh").read_text()
    )


def test_sampler_cost_loop_runs_the_rule():
    """The timed ReSET body is the decode loop's: step, sample, observe, with state carried."""
    mod = _load_bench("sampler_cost")
    body, state = mod.variants(2, 512, pieces=False)["reset"]
    logits = 3.0 * jax.random.normal(jax.random.key(2), (2, 512))
    run = jax.jit(body)
    for i in range(3):
        state, tok = run(jax.random.key(i), state, logits)
        assert tok.shape == (2,) and bool(jnp.all((tok >= 0) & (tok < 512)))
    rule_state, knobs = state
    assert rule_state.count.tolist() == [3, 3] and rule_state.num_generated.tolist() == [3, 3]
    # The rule and the knobs are loop data, as in the decode loop, not constants XLA could
    # fold (on a GPU a constant top-p < 1 removed the plain draw, a constant temperature
    # the argmax): none of their values is a constant of the lowered loop.
    text = mod._loop(body, state, 4).lower(jax.random.key(0), logits).as_text()
    rule = knobs["rule"]
    for value in (float(knobs["top_p"][0]), float(knobs["t"][0]), float(rule.t_low)):
        assert f"dense<{value:.9g}>" not in text, value


def test_nucleus_sizes_counts_the_kept_prefix():
    """benchmarks/nucleus_widths.py: the kept-set size is the fewest best tokens whose mass
    reaches top-p, checked against a plain loop; greedy steps keep one token, masked
    (-inf) tokens never count."""
    import numpy as np

    mod = _load_bench("nucleus_widths")
    uniform = np.zeros(10)
    peaked = np.array([30.0] + [0.0] * 9)
    masked = np.array([0.0] * 4 + [-np.inf] * 6)
    got = mod.nucleus_sizes(np.stack([uniform, peaked, masked]), np.ones(3), 0.95)
    assert got.tolist() == [10, 1, 4]
    assert mod.nucleus_sizes(masked[None], np.ones(1), 1.0).tolist() == [4]
    assert mod.nucleus_sizes(uniform[None], np.zeros(1), 0.95).tolist() == [1]  # greedy
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((20, 300)) * 2.0
    temps = rng.uniform(0.3, 1.5, 20)
    for top_p in (0.3, 0.9):
        want = []
        for row, t in zip(logits, temps):
            p = np.exp(row / t - (row / t).max())
            p /= p.sum()
            mass, n = 0.0, 0
            for q in sorted(p, reverse=True):
                mass, n = mass + q, n + 1
                if mass >= top_p:
                    break
            want.append(n)
        np.testing.assert_array_equal(mod.nucleus_sizes(logits, temps, top_p), want)
    rec = mod.summarize(np.array([1, 100, 300, 2000]), np.array([False, True, True, True]))
    assert rec["caps"][256]["share"] == 0.5 and rec["caps"][256]["share_at_t_high"] == 2 / 3
    assert abs(rec["caps"][1024]["batch_8_has_one"] - (1 - 0.75**8)) < 1e-12
    assert rec["caps"][512]["share"] == 0.25 and rec["caps"][4096]["share"] == 0.0
    # The figure's curve: the share wider than each power of two.
    assert rec["ccdf"]["1"] == 0.75 and rec["ccdf"]["256"] == 0.5 and rec["ccdf"]["2048"] == 0.0
    assert rec["ccdf_at_t_high"]["64"] == 1.0 and rec["ccdf_at_t_high"]["1024"] == 1 / 3
    one_t = mod.summarize(np.array([1, 100, 300, 2000]), None)  # one temperature
    assert "steps_at_t_high" not in one_t and "ccdf_at_t_high" not in one_t
    assert one_t["caps"][256] == {"share": 0.5, "batch_8_has_one": 1 - 0.5**8}
    with pytest.raises(ValueError, match="top_p"):
        mod.nucleus_sizes(logits, temps, 0.0)


@pytest.mark.slow
def test_nucleus_widths_benchmark_on_the_default_model(tmp_path, capsys):
    """benchmarks/nucleus_widths.py end to end: the default model, one prompt, a few
    tokens."""
    mod = _load_bench("nucleus_widths")
    if not mod.DEFAULT_DATA.exists():
        pytest.skip("shared/data not beside the repository")
    out = tmp_path / "n.json"
    args = ["--prompts", "1", "--max-new-tokens", "8", "--json", str(out)]
    assert mod.main([*args, "--fixed-temperature", "0.6"]) == 0
    text = capsys.readouterr().out
    assert "| ReSET | 256 |" in text and "| fixed T = 0.6 | 256 |" in text
    assert "a batch of 8 has one" in text
    rec = json.loads(out.read_text())
    assert 1 <= rec["steps"] <= 8 and set(rec["caps"]) == {
        "64",
        "256",
        "384",
        "512",
        "1024",
        "4096",
    }
    # The fixed rule's count is over the same steps, at its one temperature.
    assert rec["fixed"]["steps"] == rec["steps"] and rec["fixed"]["temperature"] == 0.6
    assert "steps_at_t_high" not in rec["fixed"]
    assert set(rec["fixed"]["caps"]) == {"64", "256", "384", "512", "1024", "4096"}
    with pytest.raises(SystemExit):
        mod.main([*args, "--fixed-temperature", "0"])
    # The figure, from the run and again from its JSON.
    png = tmp_path / "w.png"
    assert mod.main(["--from-json", str(out), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    with pytest.raises(SystemExit):
        mod.main(["--from-json", str(out)])  # needs --plot
