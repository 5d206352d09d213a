"""``reset-jax calibrate``, ``reset-jax entropy-plot`` and ``reset-jax eval``.

``reset_jax.cli`` calls :func:`register` with its subparsers; :func:`main`
runs these three commands alone (``python -m reset_jax.eval.cli ...``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Sequence

from reset_jax.cli import add_model_flags, resolve_dtype
from reset_jax.hub import DEFAULT_MODEL

__all__ = ["DEFAULT_MODEL", "main", "make_backend", "register"]


def make_backend(args: argparse.Namespace):
    """The model stack for a command (tests replace this function).

    Args:
      args: parsed arguments with ``model``, ``dtype`` (a name or ``"auto"``),
        ``no_chat``, ``implementation`` and ``fuse``.

    Returns:
      A :class:`reset_jax.eval.harness.JaxBackend`.
    """
    from reset_jax.eval.harness import JaxBackend

    return JaxBackend(
        model=args.model,
        dtype=_dtype_name(args.dtype),
        chat=not args.no_chat,
        implementation=args.implementation,
        fuse=args.fuse,
    )


def _dtype_name(name: str) -> str:
    """``--dtype`` as a concrete dtype name (``auto`` resolved for this machine)."""
    import numpy as np

    return np.dtype(resolve_dtype(name)).name


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _add_common_args(p: argparse.ArgumentParser, *, activations: bool) -> None:
    # The model flags (--model, --dtype, [--activations,] --implementation) are
    # `reset-jax generate`'s: one helper, the same defaults.
    add_model_flags(p, activations=activations)
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (default: 0.95)")
    p.add_argument("--top-k", type=int, default=0, help="top-k, 0 = off (default: 0)")


def _load(args: argparse.Namespace):
    from reset_jax.eval.datasets import load_examples

    examples = load_examples(args.data)
    if args.offset:
        examples = examples[args.offset :]
    limit = getattr(args, "limit", None) or getattr(args, "n", None)
    if limit is not None:
        examples = examples[:limit]
    if not examples:
        raise SystemExit(f"error: no examples left in {args.data} after --offset {args.offset}")
    return examples


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from reset_jax.eval.calibrate import calibrate, format_percentiles, write_entropy_jsonl

    examples = _load(args)
    quantize = None if args.quantize == "none" else args.quantize
    result = calibrate(
        examples,
        backend=make_backend(args),
        quantize=quantize,
        activations=args.activations,
        n=len(examples),
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        batch_size=args.batch_size,
        percentile=args.percentile,
    )
    label = result.records[0]["config"]
    print(
        f"{label} model {args.model}, T={args.temperature:g}, top-p {args.top_p:g}, "
        f"up to {args.max_new_tokens} new tokens, problems {[r['id'] for r in result.records]}"
    )
    print(format_percentiles(result))
    if args.out:
        write_entropy_jsonl(args.out, result.records)
        print(f"wrote {args.out}")
    print(f"use: --tau0 {result.tau0:.4f}")
    return 0


def _read_series(path: str) -> tuple[dict[str, list[float]], list]:
    from reset_jax.eval.calibrate import read_entropy_jsonl

    recs = read_entropy_jsonl(path)
    return {str(r.get("id", i)): r["entropies"] for i, r in enumerate(recs)}, recs


def _cmd_entropy_plot(args: argparse.Namespace) -> int:
    import numpy as np

    from reset_jax.eval.plots import format_summaries, plot_entropy_distributions

    named: list[tuple[str, str]] = []
    if args.bf16:
        named.append(("BF16", args.bf16))
    if args.nvfp4:
        named.append(("NVFP4", args.nvfp4))
    for item in args.series or []:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise SystemExit(f"error: --series wants LABEL=FILE, got {item!r}")
        named.append((label, path))
    if not named:
        raise SystemExit("error: give --bf16 and/or --nvfp4 (or --series LABEL=FILE)")
    per_id = {label: _read_series(path)[0] for label, path in named}
    # The comparison is only fair on the same prompts: keep the common ids.
    common = set.intersection(*(set(d) for d in per_id.values()))
    if len(named) > 1:
        if not common:
            raise SystemExit(
                "error: the files share no problem id; they must decode the same prompts"
            )
        dropped = {lb: len(d) - len(common) for lb, d in per_id.items() if len(d) != len(common)}
        if dropped:
            print(
                f"note: keeping the {len(common)} problems common to all files (dropped {dropped})"
            )
    series = {
        lb: np.concatenate(
            [np.asarray(d[k], dtype=np.float64) for k in sorted(common)] or [np.zeros(0)]
        )
        for lb, d in per_id.items()
    }
    _, summaries = plot_entropy_distributions(
        series, args.output, low=args.low, tau0=args.tau0, title=args.title
    )
    print(format_summaries(summaries))
    if args.summary_json:
        with open(args.summary_json, "w", encoding="utf-8") as f:
            json.dump(summaries, f, indent=2)
    print(f"wrote {args.output}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from reset_jax.eval.harness import parse_configs, run_eval

    try:
        configs = parse_configs(
            args.configs,
            model_name=args.model,
            temperature=args.temperature,
            t_low=args.t_low,
            tau0=args.tau0,
            t_high=args.t_high,
            window=args.window,
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    examples = _load(args)
    settings = {
        "model": args.model,
        # The dtype the run used, so a resume elsewhere cannot mix dtypes under "auto".
        "dtype": _dtype_name(args.dtype),
        "data": args.data,
        "offset": args.offset,
        "chat": not args.no_chat,
        "implementation": args.implementation,
        "command": "reset-jax " + shlex.join(args.argv if args.argv is not None else sys.argv[1:]),
    }
    result = run_eval(
        examples,
        configs,
        backend=make_backend(args),
        seeds=args.seeds,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        top_p=args.top_p,
        top_k=args.top_k,
        out_dir=args.out,
        resume=args.resume,
        settings=settings,
        progress=not args.no_progress,
        log=lambda m: print(m, file=sys.stderr),
    )
    print(result.markdown)
    print(f"wrote {os.path.join(args.out, 'samples.jsonl')}, summary.json, summary.md")
    return 0


def register(subparsers) -> None:
    """Add ``calibrate``, ``entropy-plot`` and ``eval`` to a ``reset-jax`` CLI.

    Args:
      subparsers: the object returned by ``ArgumentParser.add_subparsers()``;
        each command sets ``func`` (called with the parsed arguments, returns
        an exit status).
    """
    p = subparsers.add_parser(
        "calibrate",
        help="decode a few problems and print tau0 (80th percentile of token entropy)",
        description="Decode problems with the (NVFP4) model, dump per-token entropies and "
        "temperatures, and print tau0 and the other percentiles of the pooled entropies.",
    )
    _add_common_args(p, activations=True)
    p.add_argument(
        "--data", required=True, help="JSONL file (question, answer[, id]) or HF dataset id"
    )
    p.add_argument("--n", type=_positive_int, default=5, help="problems to decode (default: 5)")
    p.add_argument(
        "--offset", type=int, default=0, help="skip this many problems first (default: 0)"
    )
    p.add_argument("--max-new-tokens", type=_positive_int, default=1024)
    p.add_argument(
        "--quantize",
        choices=["nvfp4", "none"],
        default="nvfp4",
        help="nvfp4 (default, as the paper) or none for the dense model",
    )
    p.add_argument(
        "--temperature", type=float, default=0.6, help="decoding temperature (default: 0.6)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=_positive_int, default=None, help="default: all at once")
    p.add_argument("--percentile", type=float, default=80.0, help="tau0's percentile (default: 80)")
    p.add_argument("--out", default=None, help="write the per-token JSONL here")
    p.set_defaults(func=_cmd_calibrate)

    p = subparsers.add_parser(
        "entropy-plot",
        help="plot BF16 vs NVFP4 token-entropy distributions from calibrate dumps",
        description="Histogram (log counts), log-entropy histogram and CDF of token entropies "
        "from `reset-jax calibrate --out` files, with summary numbers.",
    )
    p.add_argument("--bf16", help="calibrate dump of the BF16 model (--quantize none)")
    p.add_argument("--nvfp4", help="calibrate dump of the NVFP4 model")
    p.add_argument(
        "--series", action="append", metavar="LABEL=FILE", help="more series (repeatable)"
    )
    p.add_argument("-o", "--output", required=True, help="figure path (.png, .pdf, .svg)")
    p.add_argument(
        "--low", type=float, default=0.1, help="low-entropy threshold in nats (default: 0.1)"
    )
    p.add_argument("--tau0", type=float, default=None, help="mark this tau0")
    p.add_argument("--title", default=None)
    p.add_argument("--summary-json", default=None, help="also write the summary numbers here")
    p.set_defaults(func=_cmd_entropy_plot)

    p = subparsers.add_parser(
        "eval",
        help="evaluate bf16 / nvfp4 / nvfp4+reset side by side over seeds",
        description="Run configurations side by side over seeds and write per-sample JSONL, "
        "summary.json and summary.md. Configurations: bf16, nvfp4, w4a4, each optionally +reset.",
    )
    _add_common_args(p, activations=False)  # each configuration names its own
    p.add_argument(
        "--data", required=True, help="JSONL file or Hugging Face id NAME[:CONFIG][@SPLIT]"
    )
    p.add_argument(
        "--configs",
        default="bf16,nvfp4,nvfp4+reset",
        help="comma-separated (default: bf16,nvfp4,nvfp4+reset)",
    )
    p.add_argument("--seeds", type=_positive_int, default=3, help="seeds 0..N-1 (default: 3)")
    p.add_argument("--limit", type=_positive_int, default=None, help="first N problems only")
    p.add_argument("--offset", type=int, default=0, help="skip this many problems first")
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--max-new-tokens", type=_positive_int, default=1024)
    p.add_argument(
        "--temperature",
        type=float,
        default=0.6,
        help="fixed temperature of the non-ReSET configurations (default: 0.6)",
    )
    p.add_argument(
        "--t-low", type=float, default=None, help="ReSET T_low (default: per-model table)"
    )
    p.add_argument("--tau0", type=float, default=None, help="ReSET tau0 (default: per-model table)")
    p.add_argument("--t-high", type=float, default=1.0, help="ReSET T_high (default: 1.0)")
    p.add_argument("--window", type=_positive_int, default=32, help="ReSET window (default: 32)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--resume", action="store_true", help="continue a run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_eval, argv=None)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one of the three commands without the rest of the ``reset-jax`` CLI.

    Args:
      argv: arguments (default: ``sys.argv[1:]``).

    Returns:
      The exit status.
    """
    parser = argparse.ArgumentParser(prog="reset-jax")
    register(parser.add_subparsers(dest="command", required=True))
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.command == "eval":
        args.argv = argv
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
