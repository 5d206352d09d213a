"""The sampler's top-k: the staged path against ``lax.top_k`` (exactness and time).

Checks on the current backend that ``sampling._top_k_rows(..., staged=True)``
returns exactly what ``lax.top_k`` returns (values, indices, tie order) on
random logits, bf16 and integer ties, clustered values (the fallback), signed
zeros and a NaN; then times both under ``jit`` (wall time per call including
dispatch, median of ``--reps``) at B = 1, 2 and 8, vocabulary 151,936, k = 256.

    python3 benchmarks/topk.py [--reps 50]

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--k", type=int, default=256)
    a = p.parse_args(argv)
    rng = np.random.default_rng(4)
    z = jnp.asarray(rng.standard_normal((8, a.vocab)) * 7, jnp.float32)
    cases = {
        "random": z,
        "bf16 ties": z.astype(jnp.bfloat16).astype(jnp.float32),
        "integer ties": jnp.round(z / 4),
        "clustered": z.at[:, 1000:1100].set(100.0 + jnp.arange(100.0)),
        "signed zeros": jnp.zeros((3, a.vocab)).at[:, ::3].set(-0.0),
        "NaN": z.at[2, 77].set(jnp.nan),
    }
    staged = jax.jit(functools.partial(sampling._top_k_rows, staged=True), static_argnums=1)
    ref = jax.jit(jax.lax.top_k, static_argnums=1)
    bad = 0
    print(f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind})")
    for name, x in cases.items():
        (gv, gi), (wv, wi) = staged(x, a.k), ref(x, a.k)
        same = np.array_equal(np.asarray(gi), np.asarray(wi)) and np.array_equal(
            np.asarray(gv), np.asarray(wv), equal_nan=True
        )
        bad += not same
        print(f"{name:14s} identical={same}")
    print("| B | staged µs | lax.top_k µs |\n|---|---|---|")
    for b in (1, 2, 8):
        row = []
        for fn in (staged, ref):
            x = z[:b]
            fn(x, a.k)[0].block_until_ready()
            ts = []
            for _ in range(a.reps):
                t = time.perf_counter()
                fn(x, a.k)[0].block_until_ready()
                ts.append(time.perf_counter() - t)
            row.append(np.median(ts) * 1e6)
        print(f"| {b} | {row[0]:.1f} | {row[1]:.1f} |")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
