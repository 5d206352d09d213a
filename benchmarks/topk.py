"""The sampler's top-k: the CUDA kernels and the staged path against ``lax.top_k``.

Checks on the current backend that ``sampling._top_k_rows`` returns exactly what
``lax.top_k`` returns (values, indices, tie order) on random logits, bf16 and
integer ties, clustered values, signed zeros, masked (-inf) rows and a NaN, for
each method that can run here: ``cuda`` (the CUDA kernels, ffi/topk_kernels.h;
GPU with the library only), ``staged`` (chunked ``lax.top_k`` stages) and, as the
reference, ``lax.top_k``. Then times each at B = 1, 2 and 8, vocabulary 151,936,
k = 256: ``--iters`` calls inside one jitted ``fori_loop`` (no dispatch), median of
``--reps`` loops, minus the same loop without the top-k. ``cuda`` and ``staged``
are timed with their fallback's ``lax.cond``, whose predicate a GPU reads back every
call; the sampler pays that once a step for all its fallbacks, and
``benchmarks/sampler_cost.py --pieces`` times the top-k without it.

    python3 benchmarks/topk.py [--reps 15] [--iters 64]

Exit status 1 if any case differs.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from reset_jax import sampling


def methods(vocab: int, k: int) -> dict:
    """name -> f(z) returning (values, indices), exact (with its fallback) where needed."""
    out = {}
    if sampling._cuda_top_k_reason((8, vocab), k) is None:
        out["cuda"] = functools.partial(sampling._top_k_rows, c=k)
    out["staged"] = functools.partial(sampling._top_k_rows, c=k, staged=True)
    out["lax.top_k"] = lambda z: jax.lax.top_k(z, k)
    return out


def loop_time(fn, z, iters: int, reps: int) -> float:
    """Median µs per call of ``fn`` inside a jitted loop (fn None: the loop alone)."""

    @jax.jit
    def run(z):
        def body(i, carry):
            acc, x = carry
            x = x.at[0, 0].add(1e-30 * acc.astype(x.dtype))  # a dependence per iteration
            if fn is None:
                return acc + 1, x
            _, idx = fn(x)
            return acc + idx[0, 0], x

        return jax.lax.fori_loop(0, iters, body, (jnp.int32(0), z))[0]

    run(z).block_until_ready()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        run(z).block_until_ready()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)) * 1e6 / iters


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--iters", type=int, default=64)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--k", type=int, default=256)
    a = p.parse_args(argv)
    rng = np.random.default_rng(4)
    z = jnp.asarray(rng.standard_normal((8, a.vocab)) * 7, jnp.float32)
    masked = np.full((2, a.vocab), -np.inf, np.float32)
    for r in range(2):
        masked[r, rng.integers(0, a.vocab, 400)] = rng.integers(0, 1000, 400) / 8
    signed = -1 - np.abs(rng.standard_normal((2, a.vocab))).astype(np.float32)
    for r in range(2):
        signed[r, rng.integers(0, a.vocab, 300)] = np.where(rng.random(300) < 0.5, -0.0, 0.0)
    cases = {
        "random": z,
        "bf16 ties": z.astype(jnp.bfloat16).astype(jnp.float32),
        "integer ties": jnp.round(z / 4),
        "clustered": z.at[:, 1000:1100].set(100.0 + jnp.arange(100.0)),
        "signed zeros": jnp.zeros((3, a.vocab)).at[:, ::3].set(-0.0),
        "zeros on top": jnp.asarray(signed),
        "masked": jnp.asarray(masked),
        "NaN": z.at[2, 77].set(jnp.nan),
    }
    fns = methods(a.vocab, a.k)
    ref = jax.jit(fns["lax.top_k"])
    bad = 0
    print(f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind}); methods {list(fns)}")
    for name, x in cases.items():
        wv, wi = ref(x)
        line = []
        for m, fn in fns.items():
            if m == "lax.top_k":
                continue
            gv, gi = jax.jit(fn)(x)
            same = np.array_equal(np.asarray(gi), np.asarray(wi)) and np.array_equal(
                np.asarray(gv).view(np.int32), np.asarray(wv).view(np.int32)
            )
            bad += not same
            line.append(f"{m} identical={same}")
        print(f"{name:14s} " + "  ".join(line))
    names = list(fns)
    print("| B | " + " | ".join(f"{n} µs" for n in names) + " | loop µs |")
    print("|---" * (len(names) + 2) + "|")
    for b in (1, 2, 8):
        x = z[:b]
        floor = loop_time(None, x, a.iters, a.reps)
        row = [loop_time(fns[n], x, a.iters, a.reps) - floor for n in names]
        print(f"| {b} | " + " | ".join(f"{t:.1f}" for t in row) + f" | {floor:.1f} |")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
