"""What the sampler costs per decode step: ReSET against a fixed temperature, and its pieces.

A decode step does, after the ``lm_head``: ``sampling.step`` (the token entropy,
and for ReSET the temperature rule), ``sampling.sample`` (top-p / top-k draw) and
``sampling.observe``. This times exactly that on ``[B, V]`` logits (std
``--logit-std``, the decode benchmark's setting) in a jitted ``fori_loop`` of
``--iters`` steps with the sampler state carried from step to step, so the loop
runs what ``decode_loop`` runs per token, without the model. The rule and the
knobs (top-p 0.95, top-k off, temperature 0.6) are loop data, as in the decode
loop, not constants XLA could fold. The variants are
timed in interleaved rounds in one process; the table gives the median and the
quartiles of the per-step time, and ReSET minus fixed, which is the ReSET rule's
own cost (both rules compute the entropy: the decode loop records it).

Pieces (``--pieces``) time one part each in the same loop: ``entropy``
(``token_entropy``), ``top-k`` (the sampler's candidate top-k with z's logsumexp), ``sample``
(``sample`` alone at a fixed temperature). A piece's time includes the loop's own
cost, which the ``loop`` row measures.

    python3 benchmarks/sampler_cost.py [--batch 1,8] [--pieces] [--step-ms 2.75,3.46]
        [--logit-std 7.0] [--against REV|FILE.py[,...]]
        [--paths [--rates FILE.json] [--profile DIR]]

``--logit-std`` sets how flat the logits are. At the default 7 the top-p 0.95 nucleus is a
few tokens for both rules. At 3.0 the fixed rule's (T = 0.6) is ~300-600 tokens, wider than
the 256 candidates: its batch takes the sampler's wide draw (the 1024 best) every step; the
ReSET rule picks T = 1 on these flat rows, whose nuclei of ~10,000 take the full sort. At
2.0 both take the full sort. ``--against`` also times the sampler (rules, ``step``,
``sample``, ``observe``) of other git revisions, or of saved copies of ``reset_jax/sampling.py`` (``git show REV:reset_jax/sampling.py``, for a
machine without the history), in the same loop (``fixed@REV``, ``reset@REV``; a file is
labelled by its name), for an A/B in one process.

``--step-ms`` (one per batch size) prints ReSET minus fixed as a share of a decode
step of that length (e.g. the NVFP4 step from ``benchmarks/decode.py``).

``--paths`` times each rule's whole step on logits that force each of the sampler's paths
(`PATHS`: the candidates with no hot row, the candidates with ReSET's hot rows, the wide
draw, the full sort), and with ``--rates FILE`` (a ``nucleus_widths.py --fixed-temperature``
JSON: how often a real model's steps keep more than 256, 512 and 1024 tokens under each
rule, and how many are at ReSET's ``t_high``) prints each rule's expected cost a step at
those rates and their difference: ReSET's cost on real logits, which random logits never
show (its ``t_high`` steps widen the nucleus; a fixed T = 0.6 rarely does).

    python3 benchmarks/sampler_cost.py --paths --rates \
        benchmarks/data/nucleus_widths_smollm2_AG5_cpu.json --step-ms 2.020,2.663

``--profile DIR`` (GPU, with ``--paths``) then traces one loop of each variant on each path
and prints where its step goes: the kernels by the JAX source line of their op, and the idle
gaps (the conditionals' readbacks) by the kernels around them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from reset_jax import sampling

# The fixed rule's temperature (and the pieces' one): the saved rates of `--rates` must
# have counted the fixed rule at it.
FIXED_T = 0.6


def _rules(vocab: int, mod=sampling) -> dict:
    """Both rules as module ``mod`` (``reset_jax.sampling`` or a `load_sampling_at` copy)
    defines them."""
    # Qwen's "\n" and ".\n\n" ids; any ids below the vocabulary do.
    nl, dnl = min(198, vocab - 1), min(271, vocab - 1)
    return {
        "fixed": mod.FixedTemperature.create(FIXED_T),
        "reset": mod.ReSETConfig.create(t_low=0.1, tau0=0.55, nl_ids=[nl], dnl_ids=[dnl]),
    }


def _loop(body_fn, init_state, iters: int):
    """A jitted loop of ``iters`` steps: ``(state, token) = body_fn(key, state, logits)``.

    The logits change every step by a negligible amount that depends on the token,
    so no step can be hoisted or skipped. ``init_state`` is an argument of the compiled
    loop, not a constant in it (XLA would sink loop-invariant constants into the body
    and fold what they decide).
    """

    @jax.jit
    def run_from(key, logits, init_state):
        def body(i, c):
            key, st, acc, x = c
            key, sub = jax.random.split(key)
            st, tok = body_fn(sub, st, x)
            x = x.at[:, 0].add(tok.astype(jnp.float32) * 1e-30)
            return key, st, acc + tok, x

        acc = jnp.zeros((logits.shape[0],), jnp.int32)
        return jax.lax.fori_loop(0, iters, body, (key, init_state, acc, logits))

    def run(key, logits):
        return run_from(key, logits, init_state)

    run.lower = lambda key, logits: run_from.lower(key, logits, init_state)
    return run


def load_sampling_at(rev: str):
    """``reset_jax/sampling.py`` as it was at git revision ``rev`` (or the file at path ``rev``,
    for a machine without the git history), as a module of its own (its rules, ``step``,
    ``sample`` and ``observe`` for ``--against``)."""
    import importlib.util
    import subprocess
    import tempfile
    from pathlib import Path

    if rev.endswith(".py"):
        if not Path(rev).is_file():
            raise SystemExit(f"--against {rev}: no such file")
        text, rev = Path(rev).read_text(), Path(rev).stem
    else:
        try:
            text = subprocess.run(
                ["git", "show", f"{rev}:reset_jax/sampling.py"],
                cwd=Path(__file__).resolve().parents[1],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        except (OSError, subprocess.CalledProcessError) as e:
            why = getattr(e, "stderr", None) or e
            raise SystemExit(f"--against {rev}: cannot read reset_jax/sampling.py: {why}") from e
    path = Path(tempfile.mkdtemp()) / f"sampling_at_{rev.replace('/', '_')}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def variants(batch: int, vocab: int, pieces: bool, against: dict | None = None) -> dict:
    """Name -> (body_fn, initial state) for one batch size.

    The rule and the knobs (temperature, top-p, top-k) ride in the loop's state, as in the
    decode loop, where they are arguments: closed over, they would be constants that XLA
    folds (a constant top-p < 1 removes the plain draw, a constant temperature the argmax).
    ``against``: {label: module} of other revisions' samplers (`load_sampling_at`): their
    rules, ``step``, ``sample`` and ``observe``, each timed in the whole step as
    ``fixed@label`` and ``reset@label``.
    """
    knobs = dict(
        t=jnp.full((batch,), FIXED_T, jnp.float32),
        top_p=jnp.full((batch,), 0.95, jnp.float32),
        top_k=jnp.zeros((batch,), jnp.int32),
    )
    out = {}
    modules = {"": sampling, **{f"@{k}": m for k, m in (against or {}).items()}}
    for label, mod in modules.items():
        for name, rule in _rules(vocab, mod).items():

            def full(key, st, x, mod=mod):
                rule_state, kn = st
                rule_state, temperature, _ = mod.step(kn["rule"], rule_state, x)
                tok = mod.sample(key, x, temperature, top_p=kn["top_p"], top_k=kn["top_k"])
                return (mod.observe(kn["rule"], rule_state, tok), kn), tok

            state = (mod.init_state(rule, batch), dict(knobs, rule=rule))
            out[name + label] = (full, state)
    if pieces:
        c = min(256, vocab)

        def entropy(key, kn, x):
            return kn, (sampling.token_entropy(x) > 1e30).astype(jnp.int32)

        def top_k_piece(key, kn, x):  # the candidates' call `_sample` makes: with z's logsumexp
            _, idx, exact, log_norm = sampling._scaled_top_k(x, kn["t"], c)
            return kn, idx[:, 0] + exact.astype(jnp.int32) + (log_norm > 1e30).astype(jnp.int32)

        def sample(key, kn, x):
            return kn, sampling.sample(key, x, kn["t"], top_p=kn["top_p"], top_k=kn["top_k"])

        def loop_only(key, kn, x):
            return kn, jnp.zeros((x.shape[0],), jnp.int32)

        out.update(
            {
                "loop": (loop_only, knobs),
                "entropy": (entropy, knobs),
                "top-k": (top_k_piece, knobs),
                "sample": (sample, knobs),
            }
        )
    return out


def _time_interleaved(runs: dict, logits: dict, iters: int, rounds: int) -> dict:
    """``{logits name: {run name: [rounds]}}``: µs a step of every run on every logits set,
    after one warm-up each; each round times them all in turn, so drifts hit all alike."""
    key = jax.random.key(0)
    for run in runs.values():
        for x in logits.values():
            jax.block_until_ready(run(key, x))
    times = {p: {n: [] for n in runs} for p in logits}
    for _ in range(rounds):
        for n, run in runs.items():
            for p, x in logits.items():
                t0 = time.perf_counter()
                jax.block_until_ready(run(key, x))
                times[p][n].append(1e6 * (time.perf_counter() - t0) / iters)
    return times


def measure(
    batch: int,
    vocab: int,
    iters: int,
    rounds: int,
    pieces: bool,
    logit_std: float,
    against: dict | None = None,
):
    """Per-step microseconds of every variant: ``{name: [rounds]}`` (after one warm-up run)."""
    logits = logit_std * jax.random.normal(jax.random.key(1), (batch, vocab), jnp.float32)
    runs = {
        n: _loop(fn, st, iters) for n, (fn, st) in variants(batch, vocab, pieces, against).items()
    }
    return _time_interleaved(runs, {"": logits}, iters, rounds)[""]


# --paths: logits that force each of the sampler's paths for both rules. A row holds
# this many near-equal best values (scattered over the row, so no top-k stage sees them
# clustered) far above the rest: its top-p 0.95 nucleus is ~95 % of them at any
# temperature the rules pick, and its entropy (~log n nats) makes ReSET pick t_high, a hot
# row for a sampler with hot candidates. 128 -> ~122 tokens, within the 256 candidates (the
# fast path, but for ReSET's hot rows with their 384 hot candidates); 768 -> ~730, past 256 and
# 512, within the 1024 wide ones; 4096 -> ~3890, past those too (the full sort). "fast":
# random logits with one token far above the rest (entropy ~0: ReSET picks t_low; no hot row).
PATHS = {"fast": None, "hot": 128, "wide": 768, "full": 4096}


def forced_logits(path: str, batch: int, vocab: int, logit_std: float, key) -> jax.Array:
    """``[batch, vocab]`` float32 logits whose top-p 0.95 draw takes ``path`` of `PATHS`:
    ``fast`` is the usual random logits (std ``logit_std``) with one token per row raised
    far above the others (a nucleus of one, for both rules at t_low)."""
    k1, k2, k3 = jax.random.split(key, 3)
    if PATHS[path] is None:
        x = logit_std * jax.random.normal(k1, (batch, vocab), jnp.float32)
        top = jax.random.randint(k2, (batch,), 0, vocab)
        return x.at[jnp.arange(batch), top].add(20.0 * max(logit_std, 1.0))
    n = PATHS[path]
    if vocab < n:
        raise ValueError(f"path {path!r} needs a vocabulary of at least {n}, got {vocab}")
    rest = jax.random.normal(k1, (batch, vocab), jnp.float32) - 40.0
    pos = jnp.argsort(jax.random.uniform(k2, (batch, vocab)), axis=-1)[:, :n]
    top = 0.01 * jax.random.normal(k3, (batch, n), jnp.float32)
    return rest.at[jnp.arange(batch)[:, None], pos].set(top)


def _bench_module(name: str):
    """The benchmark script ``benchmarks/<name>.py`` next to this one, imported."""
    import importlib

    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module(name)


def path_logits(batch: int, vocab: int, logit_std: float) -> dict:
    """``{path: [batch, vocab] logits}`` for every path of `PATHS` (`forced_logits`)."""
    return {
        p: forced_logits(p, batch, vocab, logit_std, jax.random.key(i + 1))
        for i, p in enumerate(PATHS)
    }


def profile_paths(runs: dict, logits: dict, iters: int, trace_root: str) -> dict:
    """``{path: {variant: account}}``: one traced loop of each of ``runs`` (`_loop`s of
    ``iters`` steps, already compiled by the timing) on each of ``logits`` (`path_logits`),
    read back kernel by kernel with ``profile_decode``'s helpers (GPU only: a CPU trace has
    no kernels). An account holds the traced wall, span, kernel-busy and idle time a step,
    its kernels by kind (``rows``), by the JAX source line of their op (``ops``) and the
    idle gaps by the kernels around them (``gaps``); see ``profile_decode.account``. The
    idle time is mostly the conditionals' readbacks."""
    prof = _bench_module("profile_decode")

    key = jax.random.key(0)
    out = {}
    for p, x in logits.items():
        out[p] = {}
        for n, run in runs.items():
            jax.block_until_ready(run(key, x))  # compiled, graphs instantiated
            trace_dir = os.path.join(trace_root, f"b{x.shape[0]}_{p}_{n}")
            with jax.profiler.trace(trace_dir):
                t0 = time.perf_counter()
                jax.block_until_ready(run(key, x))
                wall = time.perf_counter() - t0
            events, ops, op_source, _, _ = prof.gpu_events(trace_dir, with_ops=True)
            acc = prof.account(events, iters, wall)
            acc["ops"] = prof.op_table(events, ops, op_source, iters)
            acc["gaps"] = prof.gap_table(events, ops, op_source, iters)
            out[p][n] = acc
    return out


def _print_profile(b: int, prof: dict, top: int) -> None:
    print(f"\nB = {b}: one traced loop a path (µs a step)")
    print("| path | variant | traced wall | GPU span | kernels busy | idle | kernels |")
    print("|---|---|---|---|---|---|---|")
    for p, accs in prof.items():
        for n, a in accs.items():
            print(
                f"| {p} | {n} | {1e3 * a['wall_ms_per_token']:.1f} | "
                f"{1e3 * a['gpu_span_ms_per_token']:.1f} | "
                f"{1e3 * a['kernel_busy_ms_per_token']:.1f} | "
                f"{1e3 * a['idle_ms_per_token']:.1f} | {a['kernels_per_token']:.0f} |"
            )
    for p, accs in prof.items():
        for n, a in accs.items():
            print(f"\nB = {b}, {p}, {n}: kernels by JAX source (top {top})")
            print("| op | µs/step | calls/step |\n|---|---|---|")
            for r in a["ops"][:top]:
                print(f"| {r['op']} | {r['us_per_token']:.2f} | {r['calls_per_token']:.2f} |")
            print("| idle before → after | µs/step | gaps/step |\n|---|---|---|")
            for r in a["gaps"][:5]:
                print(
                    f"| {r['before']} → {r['after']} | {r['us_per_token']:.2f} | "
                    f"{r['gaps_per_token']:.2f} |"
                )


def path_rates(rule: dict, batch: int, hot: int = 0) -> dict:
    """The share of batch steps that take each path of `PATHS`, rows independent.

    ``rule``: ``{"caps": {cap: {"share", "share_hot"}}, "hot": share of hot rows}``
    (`load_rates`): per row, the shares of kept sets wider than 256, ``hot`` and 1024, all
    rows and hot ones. A batch takes the full sort where some row is past 1024. For a
    sampler without hot candidates (``hot`` 0) it takes the wide draw where some row is past
    256, else the fast path. With them, a hot row has ``hot`` first candidates: the wide
    draw where some cold row is past 256 or hot row past ``hot``; else the hot path where
    some row is hot; else the fast path.

    Raises:
      SystemExit: the rates do not count kept sets wider than ``hot``.
    """
    caps, h = rule["caps"], float(rule["hot"]) if hot else 0.0
    if hot and str(hot) not in caps:
        raise SystemExit(
            f"the rates count kept sets wider than {sorted(caps, key=int)}, not {hot} "
            "(the sampler's hot candidates): rerun nucleus_widths.py"
        )

    has_one = _bench_module("nucleus_widths").batch_has_one

    def share(cap, among_hot=False):
        return float(caps[str(cap)]["share_hot" if among_hot else "share"])

    full = has_one(share(1024), batch)
    cold_past = max(0.0, share(256) - h * share(256, among_hot=True))  # cold rows past 256
    past = cold_past + (h * share(hot, among_hot=True) if hot else 0.0)  # past their first
    wide_or_more = has_one(past, batch)
    fast = (1.0 - h - cold_past) ** batch  # every row cold and within 256
    return {
        "fast": fast,
        "hot": 1.0 - wide_or_more - fast,
        "wide": wide_or_more - full,
        "full": full,
    }


def hot_candidates(mod) -> int:
    """How many first candidates sampler module ``mod`` gives its hot rows by default, or 0
    where it has no hot rows (older revisions for ``--against``)."""
    import inspect

    p = inspect.signature(mod.sample).parameters.get("hot_candidates")
    return 0 if p is None else int(p.default)


def expected_us(path_us: dict, rates: dict) -> float:
    """A step's expected µs: each path's time weighted by how often a batch takes it."""
    return sum(rates[p] * path_us[p] for p in PATHS)


def load_rates(path: str) -> dict:
    """``{"reset": rule, "fixed": rule}`` (`path_rates`' ``rule``) from a
    ``nucleus_widths.py --fixed-temperature`` JSON, checked. ReSET's hot rows are its
    ``t_high`` ones (1.0, above `reset_jax.sampling.HOT_TEMPERATURE`); the fixed rule's
    T = 0.6 is below it."""
    with open(path) as f:
        rec = json.load(f)
    if "fixed" not in rec:
        raise SystemExit(
            f"--rates {path}: no fixed rule's counts (run nucleus_widths.py with --fixed-temperature)"
        )
    t = rec["fixed"].get("temperature")
    if t is not None and abs(float(t) - FIXED_T) > 1e-6:
        raise SystemExit(
            f"--rates {path}: its fixed rule ran at T = {t}; this benchmark's is {FIXED_T}"
        )
    hot_t = sampling.HOT_TEMPERATURE

    def rule(caps, hot_share, hot_key):
        return {
            "caps": {c: dict(v, share_hot=v[hot_key]) for c, v in caps.items()},
            "hot": hot_share,
        }

    for k in ("steps", "steps_at_t_high"):
        if k not in rec:
            raise SystemExit(f"--rates {path}: no {k!r} (a nucleus_widths.py JSON has it)")
    if any("share_at_t_high" not in v for v in rec["caps"].values()):
        raise SystemExit(f"--rates {path}: ReSET's caps lack 'share_at_t_high'")
    at_high = float(rec["steps_at_t_high"]) / float(rec["steps"])
    return {
        "reset": rule(rec["caps"], at_high if 1.0 >= hot_t else 0.0, "share_at_t_high"),
        "fixed": rule(rec["fixed"]["caps"], 1.0 if FIXED_T >= hot_t else 0.0, "share"),
        "model": rec.get("model"),
    }


def _print_paths(b, times, rates, step_ms, hot):
    med = {p: {n: float(np.median(v)) for n, v in t.items()} for p, t in times.items()}
    print("| B | variant | " + " | ".join(f"{p} µs" for p in PATHS) + " |")
    print("|---|---|" + "---|" * len(PATHS))
    for n in med["fast"]:
        print(f"| {b} | {n} | " + " | ".join(f"{med[p][n]:.2f}" for p in PATHS) + " |")
    if rates is None:
        return None
    print("| B | rule | " + " | ".join(f"{p} share" for p in PATHS) + " | expected µs/step |")
    print("|---|---|" + "---|" * (len(PATHS) + 1))
    exp = {}
    for n in med["fast"]:
        rule, _, label = n.partition("@")
        r = path_rates(rates[rule], b, hot["@" + label if label else ""])
        exp[n] = expected_us({p: med[p][n] for p in PATHS}, r)
        cells = " | ".join(f"{100 * r[p]:.2f} %" for p in PATHS)
        print(f"| {b} | {n} | {cells} | {exp[n]:.2f} |")
    extra = exp["reset"] - exp["fixed"]
    share = f" = {100 * extra / (1e3 * step_ms):.3f} % of a {step_ms} ms step" if step_ms else ""
    print(f"| {b} | **reset − fixed, expected** | **{extra:+.2f}**{share} |")
    return exp


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--iters", type=int, default=128, help="steps per timed loop")
    p.add_argument("--rounds", type=int, default=15, help="interleaved timed loops per variant")
    p.add_argument("--logit-std", type=float, default=7.0)
    p.add_argument("--pieces", action="store_true", help="also time entropy, top-k, sample")
    p.add_argument("--step-ms", default=None, help="decode step ms per batch size (for the share)")
    p.add_argument("--json", default=None, help="write the per-round times here")
    p.add_argument(
        "--against",
        default=None,
        help="comma-separated git revisions (or paths to a saved sampling.py) whose sampler "
        "(rules, step, sample, observe) is also timed, side by side",
    )
    p.add_argument(
        "--paths",
        action="store_true",
        help="time every variant on logits that force each sampler path (fast, hot, wide, full)",
    )
    p.add_argument(
        "--rates",
        default=None,
        help="with --paths: a nucleus_widths.py --fixed-temperature JSON; prints each rule's "
        "expected cost a step at those rates",
    )
    p.add_argument(
        "--profile",
        default=None,
        help="with --paths, on a GPU: after the timing, trace one loop of each variant on "
        "each path into this folder and print its kernels by JAX source line",
    )
    a = p.parse_args(argv)
    if a.rates and not a.paths:
        p.error("--rates needs --paths")
    if a.profile and not a.paths:
        p.error("--profile needs --paths")
    if a.profile:
        # Keep the CUDA graphs on while tracing, as the timed loops run (before JAX starts;
        # too late where the backend is already up).
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_enable_command_buffers_during_profiling" not in flags:
            os.environ["XLA_FLAGS"] = (
                flags + " --xla_enable_command_buffers_during_profiling=true"
            ).strip()
        if jax.default_backend() != "gpu":
            p.error(
                f"--profile reads GPU kernels from a trace; the backend is {jax.default_backend()}"
            )
    if a.paths and a.pieces:
        p.error("--paths times whole steps; leave out --pieces")
    widest = max(n for n in PATHS.values() if n is not None)
    if a.paths and a.vocab < widest:
        p.error(f"--paths needs --vocab of at least {widest} (its full-sort logits), got {a.vocab}")
    batches = [int(b) for b in a.batch.split(",")]
    steps = [float(s) for s in a.step_ms.split(",")] if a.step_ms else []
    if steps and len(steps) != len(batches):
        p.error(f"--step-ms needs one value per batch size ({len(batches)})")
    if a.iters < 1 or a.rounds < 1:
        p.error("--iters and --rounds must be >= 1")
    against = {}
    if a.against:  # labelled by revision, or by a saved file's name without ".py"
        for r in a.against.split(","):
            label = os.path.basename(r).removesuffix(".py") if r.endswith(".py") else r
            if label in against:
                p.error(f"--against: two samplers labelled {label!r}")
            against[label] = load_sampling_at(r)
    print(
        f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind}), V = {a.vocab}, "
        f"logit std {a.logit_std}"
    )
    record = {}
    if a.paths:
        rates = load_rates(a.rates) if a.rates else None
        hot = {"": hot_candidates(sampling)}
        hot.update({f"@{k}": hot_candidates(m) for k, m in against.items()})
        if rates:
            print(f"rates: {a.rates} ({rates['model']}), rows independent")
            for n in set(hot.values()) - {0}:
                for rule in ("reset", "fixed"):
                    if str(n) not in rates[rule]["caps"]:
                        p.error(
                            f"--rates {a.rates}: its {rule} rule counts kept sets wider than "
                            f"{sorted(rates[rule]['caps'], key=int)}, not {n} (a sampler's "
                            "hot candidates): rerun nucleus_widths.py"
                        )
        expected, profiles = {}, {}
        for i, b in enumerate(batches):
            logits = path_logits(b, a.vocab, a.logit_std)
            runs = {
                n: _loop(fn, st, a.iters)
                for n, (fn, st) in variants(b, a.vocab, False, against).items()
            }
            times = _time_interleaved(runs, logits, a.iters, a.rounds)
            record[b] = times
            expected[b] = _print_paths(b, times, rates, steps[i] if steps else None, hot)
            if a.profile:
                ours = {n: r for n, r in runs.items() if "@" not in n}  # not --against's
                prof = profile_paths(ours, logits, a.iters, a.profile)
                _print_profile(b, prof, top=14)
                profiles[b] = prof
        if a.json:
            with open(a.json, "w") as f:
                out = {"vocab": a.vocab, "iters": a.iters, "paths": PATHS, "us_per_step": record}
                json.dump(dict(out, expected_us=expected, profiles=profiles), f, indent=1)
        return 0
    print("| B | variant | µs/step (median) | quartiles |\n|---|---|---|---|")
    for i, b in enumerate(batches):
        times = measure(b, a.vocab, a.iters, a.rounds, a.pieces, a.logit_std, against)
        record[b] = times
        med = {n: float(np.median(v)) for n, v in times.items()}
        for n, v in times.items():
            q1, q3 = np.percentile(v, [25, 75])
            print(f"| {b} | {n} | {med[n]:.2f} | {q1:.2f} – {q3:.2f} |")
        extra = med["reset"] - med["fixed"]
        share = (
            f" = {100 * extra / (1e3 * steps[i]):.3f} % of a {steps[i]} ms step" if steps else ""
        )
        print(f"| {b} | **reset − fixed** | **{extra:+.2f}**{share} | |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"vocab": a.vocab, "iters": a.iters, "us_per_step": record}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
