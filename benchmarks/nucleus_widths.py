"""How wide the sampler's kept sets are on a real model's steps.

`reset_jax.sampling.sample` draws a filtered row (top-p, top-k) from its 256 best
tokens; where some row of the batch keeps more, the batch draws from the 1024 best,
and past those from a full sort of every row (on a GPU a sort of 151,936-wide rows,
far more than the rest of a step's sampling). Random logits, as the decode benchmark
uses, almost never need either. This measures how often real steps do:

1. ``reset_jax.generate`` with ReSET (the model's calibrated ``t_low``/``tau0``) and
   top-p 0.95 on GSM8K dev prompts;
2. each generated step's logits from one uncached forward pass over the sequence;
3. the nucleus of each step at its temperature: the fewest best tokens whose mass
   reaches top-p (float64).

It prints the share of steps wider than 64 / 256 / 384 / 512 / 1024 / 4096 tokens, overall and at
``t_high``, with the chance that a batch of 8 such steps has one (each row drawn
independently), and writes JSON. ``--fixed-temperature T`` also counts the same steps'
kept sets at one fixed temperature (the baseline rule ReSET's cost is measured against;
the sequences are still ReSET's, so this is the fixed rule on ReSET's contexts).

    python3 benchmarks/nucleus_widths.py [--prompts 16] [--max-new-tokens 256]
        [--model smollm2-135m-instruct] [--data ../shared/data/gsm8k-dev-50.jsonl]
        [--fixed-temperature 0.6] [--json out.json] [--plot out.png]
    python3 benchmarks/nucleus_widths.py --from-json out.json --plot out.png
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

# 256 and 1024: the sampler's candidates and wide candidates; 384: its hot rows' candidates; 512
# and 4096: what other sizes would leave to the fallbacks.
CAPS = (64, 256, 384, 512, 1024, 4096)
CCDF_GRID = tuple(2**i for i in range(15))  # 1 ... 16384
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k-dev-50.jsonl"


def nucleus_sizes(logits: np.ndarray, temperatures: np.ndarray, top_p: float) -> np.ndarray:
    """Kept-set size of each step under top-p alone (top-k off).

    Args:
      logits: ``[S, V]`` raw logits, one row per step.
      temperatures: ``[S]`` the temperature each step was drawn at (``<= 1e-6``: greedy,
        one token).
      top_p: the nucleus mass, in ``(0, 1]``.

    Returns:
      ``[S]`` int: the fewest best tokens whose probability mass (float64) reaches
      ``top_p``; at least 1, at most the finite tokens. (The sampler sums in float32, which
      can keep one token more or fewer at a tie with ``top_p``.)
    """
    from reset_jax.sampling import GREEDY_TEMPERATURE

    logits = np.asarray(logits, np.float64)
    temperatures = np.asarray(temperatures, np.float64)
    if logits.ndim != 2 or temperatures.shape != logits.shape[:1]:
        raise ValueError(f"logits {logits.shape} and temperatures {temperatures.shape}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    out = np.ones(len(logits), np.int64)
    for i, (row, t) in enumerate(zip(logits, temperatures)):
        if t <= GREEDY_TEMPERATURE:
            continue
        z = row / t
        p = np.exp(z - z.max())
        p = np.sort(p / p.sum())[::-1]
        # The kept prefix ends at the first token whose cumulative mass reaches top_p.
        out[i] = min(int(np.searchsorted(np.cumsum(p), top_p)) + 1, int(np.isfinite(row).sum()))
    return out


def batch_has_one(share: float, batch: int) -> float:
    """The chance that a batch of ``batch`` rows (independent) has a row of ``share``."""
    return 1.0 - (1.0 - share) ** batch


def summarize(sizes: np.ndarray, at_high: np.ndarray | None, batch: int = 8) -> dict:
    """Shares of steps wider than each cap: all steps, and those at ``t_high`` (a bool mask
    over the steps; None for one temperature, which leaves the ``t_high`` fields out)."""
    out = {"steps": len(sizes), "caps": {}}
    if at_high is not None:
        out["steps_at_t_high"] = int(at_high.sum())
    for cap in CAPS:
        share = float(np.mean(sizes > cap)) if len(sizes) else 0.0
        out["caps"][cap] = {"share": share}
        if at_high is not None:
            high = float(np.mean(sizes[at_high] > cap)) if at_high.any() else 0.0
            out["caps"][cap]["share_at_t_high"] = high
        out["caps"][cap][f"batch_{batch}_has_one"] = batch_has_one(share, batch)
    # Share of steps wider than each power of two, for the figure (`plot_widths`).
    out["ccdf"] = {str(n): float(np.mean(sizes > n)) if len(sizes) else 0.0 for n in CCDF_GRID}
    if at_high is not None and at_high.any():
        out["ccdf_at_t_high"] = {str(n): float(np.mean(sizes[at_high] > n)) for n in CCDF_GRID}
    if len(sizes):
        out["percentiles"] = dict(
            zip(("50", "90", "99", "99.9"), np.percentile(sizes, [50, 90, 99, 99.9]).tolist())
        )
        out["max"] = int(sizes.max())
    return out


def plot_widths(rec: dict, path: str, batch: int = 8) -> str:
    """Draws a `main` JSON record: the share of steps (and of batches of ``batch``, rows
    independent) whose kept set is wider than n, over n, for ReSET (all steps and those at
    ``t_high``) and the fixed rule, with the sampler's 256 candidates and 1024 wide ones
    marked. Returns ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    curves = [("ReSET, all steps", rec.get("ccdf"), "C0", "-")]
    curves.append(("ReSET, steps at t_high", rec.get("ccdf_at_t_high"), "C0", ":"))
    if rec.get("ccdf"):
        one = {n: batch_has_one(s, batch) for n, s in rec["ccdf"].items()}
        curves.append((f"ReSET, a batch of {batch} has one", one, "C0", "--"))
    fixed = rec.get("fixed") or {}
    if fixed.get("ccdf"):
        curves.append((f"fixed T = {fixed.get('temperature')}", fixed["ccdf"], "C1", "-"))
    floor = 0.5 / max(int(rec.get("steps", 1)), 1)  # below one step: drawn at the floor
    for label, ccdf, color, style in curves:
        if not ccdf:
            continue
        xs = [int(n) for n in ccdf]
        ys = [max(float(v), floor) for v in ccdf.values()]
        ax.step(xs, ys, where="post", color=color, linestyle=style, label=label)
    for n, name in ((256, "256 candidates"), (1024, "1024 wide candidates")):
        ax.axvline(n, color="0.5", linewidth=0.8)
        ax.text(n * 1.08, 0.6, name, rotation=90, va="top", fontsize=8, color="0.3")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_ylim(floor, 1.2)
    ax.set_xlabel("kept set (top-p nucleus) wider than n tokens")
    ax.set_ylabel("share of steps")
    ax.set_title(
        f"{rec.get('model')}: {rec.get('steps')} GSM8K steps, top-p {rec.get('top_p')}",
        fontsize=10,
    )
    ax.legend(fontsize=8, loc="lower left")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: the library's default model")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="GSM8K-style JSONL")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--fixed-temperature",
        type=float,
        default=None,
        help="also count the kept sets at this one temperature (the fixed rule)",
    )
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="draw the shares over widths into this PNG")
    p.add_argument(
        "--from-json",
        default=None,
        help="draw --plot from a saved JSON of this script instead of running the model",
    )
    a = p.parse_args(argv)
    if a.from_json:
        if not a.plot:
            p.error("--from-json needs --plot")
        with open(a.from_json) as f:
            print(plot_widths(json.load(f), a.plot))
        return 0
    if a.fixed_temperature is not None and not a.fixed_temperature > 0:
        p.error(f"--fixed-temperature must be > 0, got {a.fixed_temperature}")
    if a.prompts < 1 or a.max_new_tokens < 1:
        p.error("--prompts and --max-new-tokens must be >= 1")
    if not Path(a.data).exists():
        p.error(f"--data {a.data}: no such file")

    import jax
    import jax.numpy as jnp
    from flax import nnx
    from tqdm import tqdm

    from reset_jax import hub
    from reset_jax.eval.datasets import load_jsonl
    from reset_jax.eval.prompts import build_prompts
    from reset_jax.generate import _encode, generate, reset_config_for
    from reset_jax.models import from_pretrained
    from reset_jax.tokenizer import load_tokenizer

    name = a.model or hub.DEFAULT_MODEL
    model = from_pretrained(name, dtype=jnp.float32)
    tok = load_tokenizer(hub.resolve(name))
    entry = hub.KNOWN_MODELS.get(str(name).lower())
    defaults = dict(entry.reset_defaults) if entry is not None else {}
    if not {"t_low", "tau0"} <= set(defaults):
        p.error(f"{name}: no calibrated t_low / tau0 (reset_jax.hub.KNOWN_MODELS)")
    rule = reset_config_for(tok, t_low=defaults["t_low"], tau0=defaults["tau0"])
    prompts = build_prompts(load_jsonl(a.data, limit=a.prompts))
    t0 = time.perf_counter()
    res = generate(
        model, tok, prompts, max_new_tokens=a.max_new_tokens, sampler=rule, top_p=a.top_p,
        seed=a.seed,
    )  # fmt: skip
    gen_s = time.perf_counter() - t0
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda params, ids: nnx.merge(graphdef, params)(ids))
    sizes, temps, fixed = [], [], []
    for row, prompt in enumerate(tqdm(prompts, desc="steps' logits", unit="row")):
        ids = _encode(tok, prompt, True)
        gen = res.token_ids[row]
        if not gen:
            continue
        logits = np.asarray(forward(params, jnp.asarray([ids + gen], jnp.int32)))[0]
        # The logits at position j predict token j + 1: step i's are at len(prompt) - 1 + i.
        steps = logits[len(ids) - 1 : len(ids) - 1 + len(gen)]
        sizes.append(nucleus_sizes(steps, res.temperatures[row], a.top_p))
        temps.append(np.asarray(res.temperatures[row]))
        if a.fixed_temperature is not None:
            at = np.full(len(steps), a.fixed_temperature, np.float64)
            fixed.append(nucleus_sizes(steps, at, a.top_p))
    if not sizes:
        raise SystemExit("no row generated a token: nothing to measure")
    sizes, temps = np.concatenate(sizes), np.concatenate(temps)
    rec = summarize(sizes, temps >= float(np.max(rule.t_high)) - 1e-6)
    rec.update(model=name, prompts=a.prompts, max_new_tokens=a.max_new_tokens, top_p=a.top_p,
               t_low=defaults["t_low"], tau0=defaults["tau0"], generate_s=gen_s)  # fmt: skip
    if fixed:
        rec["fixed"] = summarize(np.concatenate(fixed), None)  # one temperature
        rec["fixed"]["temperature"] = a.fixed_temperature
    print(f"{name}: {rec['steps']} steps ({rec['steps_at_t_high']} at t_high), top-p {a.top_p}")
    print("| rule | kept set wider than | steps | steps at t_high | a batch of 8 has one |")
    print("|---|---|---|---|---|")
    for label, r in (("ReSET", rec), (f"fixed T = {a.fixed_temperature}", rec.get("fixed"))):
        for cap, c in (r or {}).get("caps", {}).items():
            high = f"{100 * c['share_at_t_high']:.2f} %" if r is rec else "-"
            print(
                f"| {label} | {cap} | {100 * c['share']:.2f} % | {high} "
                f"| {100 * c['batch_8_has_one']:.1f} % |"
            )
    for label, r in (("ReSET", rec), ("fixed", rec.get("fixed"))):
        if r and "percentiles" in r:
            print(f"{label} sizes: percentiles {r['percentiles']}, max {r['max']}")
    if a.json:
        Path(a.json).write_text(json.dumps(rec, indent=1))
    if a.plot:
        print(plot_widths(rec, a.plot))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
