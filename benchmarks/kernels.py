"""Small-M NVFP4 matmul backends against bf16 ``x @ W.T``, side by side on one GPU.

For each projection shape (Qwen3-8B, Qwen3-32B, SmolLM2) and M in {1, 2, 4, 8,
16} this times

* ``cuda``       the CUDA FFI kernel, W4A16 (``activations="bf16"``)
* ``cuda-w4a4``  the CUDA FFI kernel, W4A4 (activation quantizer + GEMV)
* ``pallas``     the Pallas kernel (skipped with the reason if it refuses)
* ``xla``        XLA dequantize-then-dot
* ``bf16``       a bf16 weight, ``x @ W.T``

Timing: one jitted function applies the layer to L different weight copies (L
chosen so the copies total >= --rotate-mb, default 256 MB, five times the
H100's 50 MB L2; shapes too small for that within 32 copies are marked
``L2-resident``), so each call reads its weight from HBM. By default only a
scalar leaves the jit (``--timing reduced``): the L results are temporaries
with stable addresses, as inside a decode step, and XLA records the L launches
into one command buffer (CUDA graph; the script sets ``XLA_FLAGS`` to put FFI
custom calls into command buffers unless XLA_FLAGS is already set). Launch
gaps are therefore included but amortised as in real use. Each batch issues
--reps calls asynchronously and blocks once; the time per layer is batch time /
(reps * L), the median over --batches batches.

Bandwidth counts the bytes one call must move: the weight (NVFP4: K/2 + K/16
bytes a row; bf16: 2K) plus x and y. The copy ceiling is measured in the same
run (device-to-device copy through PyTorch when it is importable, bytes read +
written; and an XLA elementwise pass).

    python benchmarks/kernels.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.85")
# XLA (jax 0.11) does not record FFI custom calls into command buffers by default;
# a decode step should (measured: 8.4 -> ~1 us of host overhead per call, see
# benchmarks/KERNEL_NOTES.md), so the benchmark does too unless XLA_FLAGS is set.
COMMAND_BUFFER_FLAGS = (
    "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL "
    "--xla_gpu_graph_min_graph_size=1"
)
os.environ.setdefault("XLA_FLAGS", COMMAND_BUFFER_FLAGS)

SHAPES = {
    # name: (N, K)
    "qwen3-8b.qkv": (6144, 4096),
    "qwen3-8b.o": (4096, 4096),
    "qwen3-8b.gate_up": (24576, 4096),
    "qwen3-8b.down": (4096, 12288),
    "qwen3-32b.qkv": (10240, 5120),
    "qwen3-32b.o": (5120, 8192),
    "qwen3-32b.gate_up": (51200, 5120),
    "qwen3-32b.down": (5120, 25600),
    "smollm2.qkv": (960, 576),
    "smollm2.o": (576, 576),
    "smollm2.gate_up": (3072, 576),
    "smollm2.down": (576, 1536),
}
IMPLS = ("cuda", "cuda-w4a4", "pallas", "xla", "bf16")
MAX_COPIES = 32


def torch_copy_bandwidth(nbytes: int = 1 << 30) -> float | None:
    """Device-to-device copy through PyTorch, GB/s counting bytes read + written."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda").fill_(1)
    b = torch.empty_like(a)
    times = []
    for i in range(12):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        if i >= 2:
            times.append(s.elapsed_time(e) * 1e-3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(times) / 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--out", default=None, help="JSON path (default: $OUT/kernels.json or ./kernels.json)"
    )
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated names or prefixes")
    p.add_argument("--m", default="1,2,4,8,16", help="M values for cuda and bf16")
    p.add_argument("--m-other", default=None, help="M values for the other impls (default: --m)")
    p.add_argument("--impl", default=",".join(IMPLS))
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--batches", type=int, default=5)
    p.add_argument("--rotate-mb", type=float, default=256.0)
    p.add_argument(
        "--timing",
        default="reduced",
        help="comma list: 'reduced' (only a scalar leaves the jit, so the L results are "
        "temporaries with stable addresses, as in a decode step) and/or 'outputs' (the L "
        "results are returned)",
    )
    p.add_argument("--hlo-stats", action="store_true", help="note command-buffer use of each jit")
    p.add_argument("--plot", default="", help="also draw the table into this PNG (plots.py)")
    args = p.parse_args(argv)
    timings = [v for v in args.timing.split(",") if v]

    copy_torch = torch_copy_bandwidth()  # before JAX takes most of the memory

    import jax
    import jax.numpy as jnp
    import numpy as np

    from reset_jax.nvfp4 import api
    from reset_jax.nvfp4.format import NVFP4Tensor

    dev = jax.devices()[0]
    ms = [int(v) for v in args.m.split(",")]
    ms_other = [int(v) for v in (args.m_other or args.m).split(",")]
    impls = [v for v in args.impl.split(",") if v]
    wanted = [s for s in args.shapes.split(",") if s]
    shapes = {n: v for n, v in SHAPES.items() if any(n == w or n.startswith(w) for w in wanted)}

    # XLA elementwise pass over 1 GiB (read + write).
    a = jnp.ones((1 << 29,), jnp.bfloat16)
    f_copy = jax.jit(lambda a: a * 2)
    jax.block_until_ready(f_copy(a))
    ts = []
    for _ in range(7):
        t0 = time.perf_counter()
        jax.block_until_ready(f_copy(a))
        ts.append(time.perf_counter() - t0)
    copy_xla = 2 * a.nbytes / statistics.median(ts) / 1e9
    del a
    copy_bw = copy_torch or copy_xla
    print(f"device: {dev.device_kind}; jax {jax.__version__}")
    print(
        f"copy bandwidth: torch D2D {copy_torch and round(copy_torch)} GB/s, "
        f"XLA elementwise {copy_xla:.0f} GB/s (read+write); using {copy_bw:.0f} GB/s"
    )

    key = jax.random.key(0)
    rows = []

    def make_nvfp4(n, k, copies):
        out = []
        for i in range(copies):
            k1, k2 = jax.random.split(jax.random.fold_in(key, i))
            packed = jax.random.bits(k1, (n, k // 2), jnp.uint8)
            # E4M3 scale bytes 0x30..0x4F (0.5 .. 3.75): realistic magnitudes, no NaN.
            sbytes = jax.random.randint(k2, (n, k // 16), 0x30, 0x50, jnp.int32).astype(jnp.uint8)
            scales = jax.lax.bitcast_convert_type(sbytes, jnp.float8_e4m3fn)
            out.append(NVFP4Tensor(packed, scales, jnp.float32(0.01)))
        return out

    def make_bf16(n, k, copies):
        return [
            (
                jax.random.normal(jax.random.fold_in(key, 1000 + i), (n, k), jnp.float32) * 0.02
            ).astype(jnp.bfloat16)
            for i in range(copies)
        ]

    def layer_fn(impl):
        if impl == "bf16":
            return lambda x, w: x @ w.T
        name, act = {
            "cuda": ("cuda", "bf16"),
            "cuda-w4a4": ("cuda", "nvfp4"),
            "pallas": ("pallas", "bf16"),
            "xla": ("xla", "bf16"),
        }[impl]
        scale = jnp.float32(0.05) if act == "nvfp4" else None
        return lambda x, w: api.matmul(
            x, w, activations=act, input_scale=scale, implementation=name
        )

    def make_fn(one, timing):
        if timing == "reduced":
            # Only a scalar leaves the jit: the L results are temporaries whose
            # addresses stay the same from call to call, as inside a decode step.
            def body(x, ws):
                ys = [one(x, w) for w in ws]
                return ys[0], sum(y[0, 0].astype(jnp.float32) for y in ys)

            return jax.jit(body)
        return jax.jit(lambda x, ws: tuple(one(x, w) for w in ws))

    def time_fn(f, x, ws, copies):
        for _ in range(2):
            jax.block_until_ready(f(x, ws))
        per = []
        for _ in range(args.batches):
            t0 = time.perf_counter()
            for _ in range(args.reps):
                out = f(x, ws)
            jax.block_until_ready(out)
            per.append((time.perf_counter() - t0) / (args.reps * copies))
        return statistics.median(per) * 1e6

    def report(final: bool) -> None:
        # Speedup over bf16 at the same shape and M.
        def bkey(r):
            return (r["shape"], r["M"], r.get("timing"))

        base = {bkey(r): r["us"] for r in rows if r["impl"] == "bf16" and "us" in r}
        for r in rows:
            if "us" in r and bkey(r) in base:
                r["speedup_vs_bf16"] = base[bkey(r)] / r["us"]

        hdr = f"{'shape':20s} {'M':>3s} {'impl':10s} {'us':>9s} {'GB/s':>7s} {'%copy':>6s} {'x bf16':>7s}  note"
        if final:
            print(hdr)
        for r in rows if final else []:
            if "error" in r:
                print(
                    f"{r['shape']:20s} {r['M']:3d} {r['impl']:10s} {'-':>9s} {'':>7s} {'':>6s} {'':>7s}  {r['error'][:90]}"
                )
                continue
            note = "L2-resident" if r["l2_resident"] else ""
            if "timing" in r:
                note += f" [{r['timing']}]"
            if "hlo_command_buffers" in r:
                note += f" cmdbuf={r['hlo_command_buffers']}"
            if "rel_err_vs_xla" in r:
                note += f" err={r['rel_err_vs_xla']:.1e}"
            print(
                f"{r['shape']:20s} {r['M']:3d} {r['impl']:10s} {r['us']:9.2f} {r['gbps']:7.0f} "
                f"{r['pct_copy']:6.1f} {r.get('speedup_vs_bf16', float('nan')):7.2f}  {note}"
            )
        result = dict(
            complete=final,
            device=dev.device_kind,
            jax=jax.__version__,
            python=platform.python_version(),
            copy_gbps_torch=copy_torch,
            copy_gbps_xla=copy_xla,
            copy_gbps=copy_bw,
            timing=(
                "jitted function applying the layer to L weight copies (>= rotate_mb MB, command "
                "buffer), reps async calls per batch, median over batches of batch_time/(reps*L)"
            ),
            reps=args.reps,
            batches=args.batches,
            rotate_mb=args.rotate_mb,
            xla_flags=os.environ.get("XLA_FLAGS", ""),
            rows=rows,
        )
        out = args.out or os.path.join(os.environ.get("OUT", "."), "kernels.json")
        with open(out, "w") as fh:
            json.dump(result, fh, indent=1)
        if final:
            print(f"wrote {out}")
            if args.plot:
                sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
                from plots import plot_kernels

                try:
                    print(f"wrote {plot_kernels(result, args.plot)}")
                except ValueError as e:  # e.g. no bf16 rows to compare with
                    print(f"no plot: {e}")

    for sname, (n, k) in shapes.items():
        fp4_bytes = n * k // 2 + n * k // 16
        bf16_bytes = 2 * n * k
        need = {}
        for impl in impls:
            wb = bf16_bytes if impl == "bf16" else fp4_bytes
            need[impl] = min(MAX_COPIES, max(2, math.ceil(args.rotate_mb * 2**20 / wb)))
        fp4_copies = max((need[i] for i in impls if i != "bf16"), default=0)
        w_fp4 = make_nvfp4(n, k, fp4_copies) if fp4_copies else []
        w_bf16 = make_bf16(n, k, need["bf16"]) if "bf16" in impls else []
        for m in sorted(set(ms) | set(ms_other)):
            x = jax.random.normal(jax.random.fold_in(key, 7 + m), (m, k), jnp.float32).astype(
                jnp.bfloat16
            )
            ref = None
            for impl in impls:
                if impl not in ("cuda", "bf16") and m not in ms_other:
                    continue
                copies = need[impl]
                ws = (w_bf16 if impl == "bf16" else w_fp4)[:copies]
                wb = bf16_bytes if impl == "bf16" else fp4_bytes
                resident = copies * wb < 100 * 2**20
                one = layer_fn(impl)
                for timing in timings:
                    row = dict(
                        shape=sname, N=n, K=k, M=m, impl=impl, copies=copies, l2_resident=resident
                    )
                    if len(timings) > 1:
                        row["timing"] = timing
                    try:
                        f = make_fn(one, timing)
                        if args.hlo_stats:
                            txt = f.lower(x, ws).compile().as_text()
                            row["hlo_command_buffers"] = txt.count("command_buffer")
                        y0 = jax.block_until_ready(f(x, ws))[0]
                        us = time_fn(f, x, ws, copies)
                        nbytes = wb + 2 * m * (k + n)
                        row.update(
                            us=us,
                            gbps=nbytes / us / 1e3,
                            pct_copy=100 * nbytes / us / 1e3 / copy_bw,
                        )
                        if impl == "xla" and ref is None:
                            ref = np.asarray(y0, np.float64)
                        row["_y0"] = y0
                    except Exception as e:  # a backend that refuses or fails is reported
                        msg = (
                            " | ".join(ln.strip() for ln in str(e).strip().splitlines())
                            or type(e).__name__
                        )
                        row.update(error=f"{type(e).__name__}: {msg[:300]}")
                    rows.append(row)
            # Agreement with the XLA backend on the first weight copy.
            for row in rows:
                if row["shape"] == sname and row["M"] == m and "_y0" in row:
                    y0 = row.pop("_y0")
                    if ref is not None and row["impl"] in ("cuda", "pallas"):
                        y = np.asarray(y0, np.float64)
                        row["rel_err_vs_xla"] = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
        del w_fp4, w_bf16
        report(final=False)  # partial results survive a timeout

    report(final=True)

    return 0


if __name__ == "__main__":
    sys.exit(main())
