"""Where a decode step's time goes: a kernel-by-kernel account from a JAX trace.

Builds one variant of ``benchmarks/decode.py`` (same shapes, random weights,
ReSET sampler, logits scaled to a realistic std), compiles the jitted decode
loop, runs it once untraced for the wall-clock ms/token, then once under
``jax.profiler.trace`` and reads the trace back with ``jax.profiler.ProfileData``
(no TensorBoard needed). CUDA graphs stay on while tracing
(``--xla_enable_command_buffers_during_profiling``), so the kernels run as they
do untraced; CUPTI still reports each kernel node.

Prints, per generated token: the wall time, the summed GPU kernel time, the
time the GPU sat idle between kernels (launch gaps, host syncs) and which
kernels each idle gap sat between, and the
kernels grouped by kind (NVFP4 GEMV, cuBLAS GEMM, XLA fusions by name,
copies) and by the JAX source line of their HLO op, with counts per token;
writes the whole account as JSON.

Usage (GPU):
  python benchmarks/profile_decode.py --model qwen3-8b --variant cuda-w4a16 \\
      --batch 1 --new-tokens 64 --json /tmp/profile.json
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile
import time

# Same graph settings as the decode benchmark, and graphs kept on under the profiler.
_FLAGS = (
    "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL "
    "--xla_gpu_graph_min_graph_size=1"
)


def _set_xla_flags() -> None:
    """Adds the benchmark's XLA flags and memory share (before JAX starts; a user's own
    settings win)."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")  # BF16 Qwen3-32B
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_gpu_enable_command_buffer" not in flags:
        flags = (flags + " " + _FLAGS).strip()
    if "xla_enable_command_buffers_during_profiling" not in flags:
        flags += " --xla_enable_command_buffers_during_profiling=true"
    os.environ["XLA_FLAGS"] = flags


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import decode as bench  # noqa: E402  (benchmarks/decode.py)


def kernel_kind(name: str) -> str:
    """Groups a GPU kernel name: ours, cuBLAS, copies, or the XLA fusion's name."""
    low = name.lower()
    if "rjattn::" in low or "attnpartialkernel" in low or "attncombinekernel" in low:
        m = re.search(r"(Attn\w+Kernel)", name)  # "void rjattn::(anon)::AttnPartialKernel<128, 4>"
        return "attention (ours): " + (m.group(1) if m else name[:40])
    if "gemvkernel" in low or "quantizeactivations" in low or "nvfp4" in low:
        if "wide" in low:
            return "nvfp4 (ours): wide"
        m = re.search(r"(\w+)\s*[<(]", name)  # "void nvfp4::GemvKernel<16, 1, 2, 8>(...)"
        return "nvfp4 (ours): " + (m.group(1) if m else name[:40])
    if any(t in low for t in ("gemm", "gemv", "nvjet", "cutlass", "xmma", "cublas", "splitk")):
        return "cuBLAS GEMM/GEMV"
    if "memcpy" in low or "memset" in low:
        return "copy/memset"
    # XLA kernel names: "loop_add_fusion_12", "input_reduce_fusion", "wrapped_slice" ...
    return "xla: " + re.sub(r"(_\d+)+$", "", re.sub(r"\.\d+", "", name))[:60]


def _stats(event) -> dict:
    try:
        return {str(k): v for k, v in event.stats}
    except Exception:  # a trace without stats still gives the kind table
        return {}


def gpu_events(trace_dir: str, with_ops: bool = False):
    """GPU kernel/copy events of a trace folder.

    Returns:
      ``[(name, start_ns, duration_ns)]``; with ``with_ops``, also each event's
      op (its ``tf_op`` stat — the JAX source path — else its ``hlo_op``, or "") and a map from HLO op name to the
      JAX source path XLA recorded for it (stats of the "XLA Ops" line: ``tf_op``
      / ``long_name``, whichever the trace has), the stat keys seen, and each
      event's CUDA graph id (0 when it ran outside a graph, None when the trace has
      no graph id).
    """
    from jax.profiler import ProfileData

    paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not paths:
        raise SystemExit(f"no .xplane.pb under {trace_dir}")
    # A reused folder holds one timestamped subfolder per trace: read the newest only.
    newest = max(os.path.dirname(p) for p in paths)
    paths = [p for p in paths if os.path.dirname(p) == newest]
    events, ops, graphs, seen, keys = [], [], [], set(), set()
    op_source: dict[str, str] = {}
    for path in paths:
        data = ProfileData.from_file(path)
        for plane in data.planes:
            if not plane.name.startswith("/device:GPU"):
                continue
            for line in plane.lines:
                seen.add(f"{plane.name}/{line.name}")
                low = line.name.lower()
                if with_ops and low == "xla ops":
                    for e in line.events:
                        st = _stats(e)
                        keys.update(f"xla-ops:{k}" for k in st)
                        src = st.get("tf_op") or st.get("long_name") or ""
                        if src:
                            op_source.setdefault(e.name, str(src))
                # XLA's own per-op lines ("XLA Ops", "XLA Modules") repeat the
                # kernels; stream lines hold the CUPTI kernel records.
                if not low.startswith("stream"):
                    continue
                for e in line.events:
                    events.append((e.name, int(e.start_ns), int(e.duration_ns)))
                    if with_ops:
                        st = _stats(e)
                        keys.update(f"stream:{k}" for k in st)
                        # The kernel's own tf_op stat is the JAX source path when present.
                        ops.append(str(st.get("tf_op") or st.get("hlo_op", "")))
                        # None: the trace does not say (no graph id stat).
                        gid = st.get("cuda_graph_id")
                        try:
                            graphs.append(None if gid is None else int(gid))
                        except (TypeError, ValueError):
                            graphs.append(None)
    if not events:
        raise SystemExit(
            f"no GPU stream events in the trace (is CUPTI available?); lines: {sorted(seen)}"
        )
    if with_ops:
        return events, ops, op_source, sorted(keys), graphs
    return events


def _merged(text: str) -> str:
    """``text`` up to any " = ", with every number replaced by "#" (layer indices and
    numeric suffixes dropped, so the layers' kernels group together)."""
    return re.sub(r"\d+", "#", text.split(" = ")[0])


def _op_path(op: str, op_source: dict) -> str:
    """The JAX source path of HLO op ``op`` (`_merged`), or "" if the trace has none."""
    src = op_source.get(op, "") or (op if "/" in op else "")
    return _merged(src) if src else ""


def op_table(events, ops, op_source: dict, steps: int) -> list[dict]:
    """Kernel time per token grouped by the JAX source path of its HLO op.

    ``events`` as for ``account``; ``ops[i]`` the op of ``events[i]``: a JAX source
    path (the kernel's ``tf_op``), an HLO op name, or "" if unknown; ``op_source``
    HLO op name -> JAX source path. Returns rows
    ``{op, us_per_token, calls_per_token}`` sorted by time.

    The path (e.g. ``jit(decode_loop)/while/body/.../attend/softmax``) says which
    line of the model each small kernel comes from; layer indices and numeric
    suffixes are dropped so the 36 layers' kernels add up in one row.
    """
    by = collections.defaultdict(lambda: [0, 0])
    for (name, _, d), op in zip(events, ops):
        # Without a source path the HLO op name ("fusion.12") says nothing once its
        # number is dropped: fall back to the kernel's kind.
        src = (_op_path(op, op_source) or _merged(kernel_kind(name)))[-110:]
        by[src][0] += d
        by[src][1] += 1
    rows = [dict(op=k, us_per_token=t / 1e3 / steps, calls_per_token=n / steps)
            for k, (t, n) in by.items()]  # fmt: skip
    return sorted(rows, key=lambda r: -r["us_per_token"])


def outside_graphs(events, graphs, steps: int) -> dict | str:
    """Kernels per token that ran outside CUDA graphs, by kind.

    ``graphs[i]`` is the CUDA graph id of ``events[i]``: 0 outside a graph, None
    when the trace does not say for that event. Events without an id are counted
    apart, under ``"no graph id: <kind>"``, never as outside (or inside).

    Returns:
      ``{kind: per token}``, or "unknown ..." when no event has a graph id.
    """
    if all(g is None for g in graphs):
        return "unknown (no CUDA graph id in the trace)"
    outside = collections.Counter(kernel_kind(e[0]) for e, g in zip(events, graphs) if g == 0)
    missing = collections.Counter(
        f"no graph id: {kernel_kind(e[0])}" for e, g in zip(events, graphs) if g is None
    )
    return {k: n / steps for k, n in (outside.most_common() + missing.most_common())}


def _label(name: str, op: str, op_source: dict) -> str:
    """A kernel's kind, with the last two parts of its JAX source path when known."""
    tail = "/".join(_op_path(op, op_source).split("/")[-2:])
    return kernel_kind(name) + (f" @{tail}" if tail else "")


def gap_table(events, ops, op_source: dict, steps: int, min_ns: int = 500) -> list[dict]:
    """Where the GPU sat idle: every gap of at least ``min_ns`` between kernels, grouped
    by the kernel that ended last before it and the one that started after it.

    ``events``, ``ops`` and ``op_source`` as for ``op_table``. Returns rows
    ``{before, after, us_per_token, gaps_per_token, us_per_gap}`` sorted by time.
    """
    order = sorted(range(len(events)), key=lambda i: events[i][1])
    by = collections.defaultdict(lambda: [0, 0])
    last_i, last_end = None, None
    for i in order:
        _, start, dur = events[i]
        if last_end is not None and start - last_end >= min_ns:
            key = (
                _label(events[last_i][0], ops[last_i], op_source),
                _label(events[i][0], ops[i], op_source),
            )
            by[key][0] += start - last_end
            by[key][1] += 1
        if last_end is None or start + dur >= last_end:
            last_i, last_end = i, start + dur
    rows = [dict(before=b, after=a, us_per_token=t / 1e3 / steps, gaps_per_token=n / steps,
                 us_per_gap=t / 1e3 / n) for (b, a), (t, n) in by.items()]  # fmt: skip
    return sorted(rows, key=lambda r: -r["us_per_token"])


def account(events, steps: int, wall_s: float) -> dict:
    """Per-token totals: kernel time, idle time and a table by kernel kind.

    Args:
      events: ``[(name, start_ns, duration_ns)]`` of one traced run.
      steps: decode steps in that run.
      wall_s: its host wall time.

    Returns:
      ``wall_ms_per_token``, ``gpu_span_ms_per_token`` (first kernel start to last
      kernel end), ``kernel_busy_ms_per_token`` (union of kernel intervals),
      ``idle_ms_per_token`` (span - busy: gaps between kernels),
      ``kernels_per_token`` and ``rows``: ``{kind, us_per_token, calls_per_token,
      us_per_call}`` sorted by time.
    """
    if steps < 1:
        raise ValueError(f"steps={steps}: the traced loop ran no decode step")
    spans = sorted((s, s + d) for _, s, d in events)
    busy, cur_s, cur_e = 0, spans[0][0], spans[0][1]
    for s, e in spans[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    first, last = spans[0][0], max(e for _, e in spans)
    by = collections.defaultdict(lambda: [0, 0])
    for name, _, d in events:
        k = kernel_kind(name)
        by[k][0] += d
        by[k][1] += 1
    rows = sorted(
        (dict(kind=k, us_per_token=t / 1e3 / steps, calls_per_token=n / steps, us_per_call=t / 1e3 / n)
         for k, (t, n) in by.items()),
        key=lambda r: -r["us_per_token"],
    )  # fmt: skip
    return dict(
        steps=steps,
        wall_ms_per_token=1e3 * wall_s / steps,
        gpu_span_ms_per_token=(last - first) / 1e6 / steps,
        kernel_busy_ms_per_token=busy / 1e6 / steps,
        idle_ms_per_token=((last - first) - busy) / 1e6 / steps,
        kernels_per_token=len(events) / steps,
        rows=rows,
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen3-8b")
    p.add_argument("--variant", default="cuda-w4a16", choices=sorted(bench.VARIANTS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--sampler", default="reset", choices=("reset", "fixed"))
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--logit-std", type=float, default=7.0)
    p.add_argument(
        "--sync-every",
        type=int,
        default=None,
        help="as in decode.decode_loop (default: its default)",
    )
    p.add_argument(
        "--num-layers",
        type=int,
        default=None,
        help="replace the shape's layer count, as in decode.py (0: no layers)",
    )
    p.add_argument("--top", type=int, default=25, help="rows of the table")
    p.add_argument("--trace-dir", default="", help="keep the trace here (default: a temp folder)")
    p.add_argument("--json", default="")
    a = p.parse_args(argv)
    if a.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (the loop runs new_tokens - 1 steps)")
    _set_xla_flags()

    import jax

    from reset_jax import decode as dec

    sync_every = dec.DEFAULT_SYNC_EVERY if a.sync_every is None else a.sync_every
    model, graphdef, params, rec = bench.build(a.model, a.variant, a.logit_std, a.num_layers)
    b = a.batch
    new_cache, prefill, decode = bench.compile_request(
        model,
        graphdef,
        params,
        b,
        a.prompt_len,
        a.new_tokens,
        bench.make_sampler(a.sampler),
        sync_every,
    )

    def one_loop():
        st = prefill(new_cache())
        jax.block_until_ready(st)
        t = time.perf_counter()
        st = decode(st)
        jax.block_until_ready(st)
        return time.perf_counter() - t, int(st.step) - 1

    one_loop()  # warm-up: graphs instantiated
    wall, steps = one_loop()
    trace_dir = a.trace_dir or tempfile.mkdtemp(prefix="decode_trace_")
    st = prefill(new_cache())
    jax.block_until_ready(st)
    with jax.profiler.trace(trace_dir):
        t = time.perf_counter()
        st = decode(st)
        jax.block_until_ready(st)
        traced_wall = time.perf_counter() - t
    events, ops, op_source, keys, graphs = gpu_events(trace_dir, with_ops=True)
    acc = account(events, steps, traced_wall)
    acc["outside_graphs_per_token"] = outside_graphs(events, graphs, steps)
    acc["ops"] = op_table(events, ops, op_source, steps)
    acc["gaps"] = gap_table(events, ops, op_source, steps)
    acc["trace_stat_keys"] = keys
    acc.update(untraced_ms_per_token=1e3 * wall / steps, **{k: rec[k] for k in ("model", "variant", "device")},
               batch=b, sampler=a.sampler, xla_flags=os.environ["XLA_FLAGS"],
               sync_every=sync_every)  # fmt: skip

    print(
        f"{a.model} {a.variant} B={b} {a.sampler} sync_every={sync_every} on {rec['device']}: "
        f"{steps} steps"
    )
    print(
        f"untraced {acc['untraced_ms_per_token']:.3f} ms/token; traced {acc['wall_ms_per_token']:.3f};"
        f" GPU span {acc['gpu_span_ms_per_token']:.3f}; kernels busy"
        f" {acc['kernel_busy_ms_per_token']:.3f} ({acc['kernels_per_token']:.0f} kernels/token);"
        f" idle in the traced run {acc['idle_ms_per_token']:.3f}; untraced wall - busy"
        f" {acc['untraced_ms_per_token'] - acc['kernel_busy_ms_per_token']:.3f}"
    )
    print(
        "kernels outside CUDA graphs per token (and, marked, events without a graph id): "
        f"{acc['outside_graphs_per_token']}"
    )
    print("| kind | µs/token | calls/token | µs/call |\n|---|---|---|---|")
    for r in acc["rows"][: a.top]:
        print(
            f"| {r['kind']} | {r['us_per_token']:.1f} | {r['calls_per_token']:.1f} | {r['us_per_call']:.2f} |"
        )
    print(f"\nby JAX source of the HLO op (stat keys in the trace: {acc['trace_stat_keys']})")
    print("| op | µs/token | calls/token |\n|---|---|---|")
    for r in acc["ops"][: a.top]:
        print(f"| {r['op']} | {r['us_per_token']:.1f} | {r['calls_per_token']:.1f} |")
    print("\nidle gaps >= 0.5 µs in the traced run, by the kernels around them")
    print("| before | after | µs/token | gaps/token | µs/gap |\n|---|---|---|---|---|")
    for r in acc["gaps"][: a.top]:
        print(
            f"| {r['before']} | {r['after']} | {r['us_per_token']:.1f} | "
            f"{r['gaps_per_token']:.2f} | {r['us_per_gap']:.1f} |"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(acc, f, indent=1)


if __name__ == "__main__":
    main()
