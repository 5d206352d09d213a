"""The ``reset-jax`` command line.

    reset-jax generate --prompt "What is 12 * 7?"            # default model, ReSET
    reset-jax generate --model DIR_OR_GGUF --quantize nvfp4 --sampler fixed --prompt ...
    reset-jax quantize SRC DST                               # NVFP4 checkpoint

``calibrate``, ``entropy-plot`` and ``eval`` come from `reset_jax.eval.cli`.
Heavy imports (jax, the models) happen inside the commands, so ``--help`` is
instant.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from reset_jax import __version__

__all__ = ["build_parser", "main"]

# Used for ReSET when the model has no calibrated values (see hub.KNOWN_MODELS).
FALLBACK_T_LOW = 0.1
FALLBACK_TAU0 = 0.55


def _log(msg: str) -> None:
    print(f"[reset-jax] {msg}", file=sys.stderr, flush=True)


def _enable_compile_cache() -> None:
    """Keep compiled decode loops on disk: the next run skips most of the compile."""
    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir:
        return  # the user chose a place (or none) already
    from reset_jax.hub import default_cache_dir

    jax.config.update("jax_compilation_cache_dir", str(default_cache_dir() / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def resolve_dtype(name: str) -> Any:
    """The dtype a ``--dtype`` value names (``auto``: bfloat16 on GPU, float32 elsewhere)."""
    import jax
    import jax.numpy as jnp

    if name == "auto":
        # bf16 matmuls are slow and coarse on CPU; GPUs are what bf16 is for.
        return jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    return jnp.dtype(name)


def _load_model(args: argparse.Namespace, *, quantize: str | None) -> Any:
    from reset_jax.models import from_pretrained

    dtype = resolve_dtype(args.dtype)
    import numpy as np

    what = (
        f"{args.model} ({np.dtype(dtype).name}{', NVFP4 ' + args.activations if quantize else ''})"
    )
    _log(f"loading {what} ...")
    kwargs = {} if args.implementation is None else {"implementation": args.implementation}
    model = from_pretrained(
        args.model, dtype=dtype, quantize=quantize, activations=args.activations, **kwargs
    )
    apply_fuse(model, getattr(args, "fuse", "none"), args.implementation)
    return model


FUSE_CHOICES = ("auto", "none", "norms", "attention", "all", "layers")


def resolve_fuse(fuse: str, implementation: str | None = None, backend: str | None = None) -> str:
    """What ``--fuse auto`` means here: ``"layers"`` on a GPU backend where the CUDA kernels
    may serve (``implementation`` None or ``"cuda"``), else ``"none"`` (the CPU, or an
    explicit Pallas / XLA request). Any other value is returned as given.

    Args:
      fuse: the ``--fuse`` flag.
      implementation: the ``--implementation`` flag.
      backend: ``jax.default_backend()`` when None.
    """
    if fuse != "auto":
        return fuse
    import jax

    backend = jax.default_backend() if backend is None else backend
    return "layers" if backend == "gpu" and implementation in (None, "cuda") else "none"


def apply_fuse(model: Any, fuse: str, implementation: str | None = None) -> None:
    """Applies ``--fuse`` to a loaded model (in place) and logs what it switched.

    Args:
      model: a ``reset_jax.models.CausalLM``.
      fuse: ``"auto"`` (`resolve_fuse`: ``"layers"`` on a GPU, else ``"none"``),
        ``"none"``, ``"norms"`` (``models.fuse_norms``), ``"attention"``
        (``models.fuse_attention``), ``"all"`` (both) or ``"layers"`` (both, and every
        decode step's layers in one custom call: ``models.fuse_decoder(model, "model")``).
      implementation: the ``--implementation`` flag; ``"xla"`` keeps the attention
        on the XLA composition too.
    """
    if fuse not in FUSE_CHOICES:
        raise ValueError(f"--fuse {fuse!r}: expected one of {', '.join(FUSE_CHOICES)}")
    if fuse == "auto":
        fuse = resolve_fuse(fuse, implementation)
        _log(f"--fuse auto: {fuse}")
    if fuse in ("norms", "all", "layers"):
        from reset_jax.models import fuse_norms

        _log(f"fused add + norm into {fuse_norms(model)} layers' matmuls")
    if fuse in ("attention", "all", "layers"):
        from reset_jax.models import fuse_attention

        # --implementation xla keeps XLA everywhere; otherwise CUDA where it serves.
        impl = "xla" if implementation == "xla" else None
        n = fuse_attention(model, impl)
        where = "XLA composition" if impl else "CUDA where it serves the call, else XLA"
        _log(f"one-call decode attention in {n} layers ({where})")
    if fuse == "layers":
        from reset_jax.models import fuse_decoder

        n = fuse_decoder(model, "model", implementation=impl)
        if n:
            _log(f"decode steps through all {n} layers in one custom call (CUDA where it "
                 "serves the step, else the per-layer path)")  # fmt: skip
        else:
            _log("decode steps keep the per-layer path (one call for all layers needs every "
                 "layer NVFP4 W4A16 without bias)")  # fmt: skip


def _sampler(args: argparse.Namespace, tokenizer: Any) -> tuple[Any, str]:
    """The sampler the flags ask for, and a short name for the summary."""
    from reset_jax import hub, sampling
    from reset_jax.generate import reset_config_for

    if args.sampler == "greedy":
        return sampling.FixedTemperature.create(0.0), "greedy"
    if args.sampler == "fixed":
        return sampling.FixedTemperature.create(args.temperature), "fixed"
    entry = hub.KNOWN_MODELS.get(str(args.model).lower())
    defaults = dict(entry.reset_defaults) if entry is not None else {}
    t_low = args.t_low if args.t_low is not None else defaults.get("t_low")
    tau0 = args.tau0 if args.tau0 is not None else defaults.get("tau0")
    if t_low is None or tau0 is None:
        t_low = FALLBACK_T_LOW if t_low is None else t_low
        tau0 = FALLBACK_TAU0 if tau0 is None else tau0
        _log(
            f"no calibrated ReSET values for {args.model}; using t_low={t_low}, tau0={tau0} "
            "(calibrate with `reset-jax calibrate`, then pass --t-low/--tau0)"
        )
    rule = reset_config_for(
        tokenizer, t_low=t_low, tau0=tau0, t_high=args.t_high, window=args.window
    )
    return rule, "reset"


def temperature_account(kind: str, result: Any, sampler: Any) -> str:
    """One line on the temperatures `generate` chose, over all rows.

    Args:
      kind: ``"reset"``, ``"fixed"`` or ``"greedy"``.
      result: a `GenerationResult`.
      sampler: the sampler it ran with.

    Returns:
      E.g. ``"ReSET: 37 tokens at T_high=1.0, 91 at T_low=0.1; mean entropy 0.84 nats"``.
    """
    import numpy as np

    temps = np.concatenate([np.asarray(t) for t in result.temperatures] or [np.zeros(0)])
    ents = np.concatenate([np.asarray(e) for e in result.entropies] or [np.zeros(0)])
    mean_h = f"mean entropy {ents.mean():.2f} nats" if ents.size else "no tokens"
    if kind == "reset":
        t_high = float(np.asarray(sampler.t_high).reshape(-1)[0])
        t_low = float(np.asarray(sampler.t_low).reshape(-1)[0])
        n_high = int(np.isclose(temps, t_high).sum())
        n_low = int(temps.size - n_high)
        return f"ReSET: {n_high} tokens at T_high={t_high:g}, {n_low} at T_low={t_low:g}; {mean_h}"
    if kind == "greedy":
        return f"greedy: {temps.size} tokens at T=0; {mean_h}"
    t = float(np.asarray(sampler.temperature).reshape(-1)[0])
    return f"fixed temperature: {temps.size} tokens at T={t:g}; {mean_h}"


def _cmd_generate(args: argparse.Namespace) -> int:
    _enable_compile_cache()
    from reset_jax.generate import generate
    from reset_jax.tokenizer import load_tokenizer

    model = _load_model(args, quantize=args.quantize)
    _log("loading the tokenizer ...")
    tokenizer = load_tokenizer(args.model)
    sampler, kind = _sampler(args, tokenizer)
    _log("generating (the first run of a shape compiles the decode loop) ...")
    result = generate(
        model,
        tokenizer,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        sampler=sampler,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        chat=not args.no_chat,
        max_cache_len=args.max_cache_len,
        **({} if args.sync_every is None else {"sync_every": args.sync_every}),
    )
    many = len(args.prompt) > 1
    for i, text in enumerate(result.texts):
        if many:
            print(f"=== [{i}] {args.prompt[i]}")
        print(text)
    t = result.timing
    reasons = ", ".join(sorted(set(result.finish_reasons)))
    print("---")
    print(
        f"{t.new_tokens} new tokens ({reasons}) | prefill {t.prefill_s:.2f} s | "
        f"decode {t.tokens_per_s:.1f} tokens/s | compile {t.compile_s:.1f} s"
    )
    print(temperature_account(kind, result, sampler))
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    _enable_compile_cache()
    from pathlib import Path

    from reset_jax import hub
    from reset_jax.models import save_nvfp4
    from reset_jax.tokenizer import load_tokenizer

    args.model = args.src
    model = _load_model(args, quantize="nvfp4")
    src = hub.resolve(args.src)
    # A GGUF (or a name) carries its tokenizer inside; a directory has files to copy.
    tokenizer = src if src.is_dir() else load_tokenizer(src)
    out = save_nvfp4(model, args.dst, tokenizer_files_from=tokenizer)
    size = sum(f.stat().st_size for f in Path(out).iterdir() if f.is_file())
    print(f"wrote {out} ({size / 2**20:.1f} MiB)")
    return 0


def add_model_flags(
    p: argparse.ArgumentParser, *, model: bool = True, activations: bool = True, fuse: bool = True
) -> None:
    """The flags that choose and load a model, shared by every subcommand that loads one.

    Args:
      p: the subcommand's parser.
      model: add ``--model`` (``quantize`` takes its checkpoint as a positional).
      activations: add ``--activations`` (``eval`` takes the activation format
        from each configuration name instead).
      fuse: add ``--fuse`` (``quantize`` writes the weights as loaded: no decode fusions).
    """
    from reset_jax.hub import DEFAULT_MODEL, KNOWN_MODELS

    if model:
        p.add_argument(
            "--model",
            default=DEFAULT_MODEL,
            help=f"checkpoint path (HF directory, NVFP4 export, .gguf) or a name: "
            f"{', '.join(sorted(KNOWN_MODELS))} (default: {DEFAULT_MODEL})",
        )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="dense weights, activations and cache (default: auto = bfloat16 on GPU, "
        "float32 on CPU)",
    )
    if activations:
        p.add_argument(
            "--activations",
            choices=["bf16", "nvfp4"],
            default="bf16",
            help="with NVFP4 weights: bf16 = W4A16 (default), nvfp4 = W4A4",
        )
    p.add_argument(
        "--implementation",
        choices=["cuda", "pallas", "xla"],
        default=None,
        help="NVFP4 matmul backend (default: the first of cuda, pallas, xla that serves)",
    )
    if not fuse:
        return
    p.add_argument(
        "--fuse",
        choices=list(FUSE_CHOICES),
        default="auto",
        help="decode-speed fusions (GPU): norms = residual add + RMSNorm inside the NVFP4 "
        "matmul (W4A16 layers), attention = q/k norm + RoPE + cache write + attention as one "
        "call, all = both, layers = both and every decode step's layers in one custom call "
        "(kernels chained with programmatic dependent launch on sm_90+); results match up to "
        "float32 summation order and rounding (default: auto = layers on a GPU unless "
        "--implementation asks for pallas or xla, none elsewhere)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``reset-jax`` argument parser, with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="reset-jax",
        description="NVFP4 reasoning-model decoding in JAX with ReSET step-aware temperatures.",
    )
    parser.add_argument("--version", action="version", version=f"reset-jax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "generate",
        help="generate text (default model, ReSET sampler)",
        description="Generate continuations with the jitted decode loop and report the "
        "temperatures ReSET chose.",
    )
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--max-cache-len", type=int, default=None, help="default: prompt + new tokens")
    p.add_argument(
        "--sync-every",
        type=_positive_int,
        default=None,
        help="decode steps per check of 'every row done' (default 8; 1 stops right after the "
        "last row's stop token, larger values wait less for the host)",
    )
    p.add_argument("--quantize", choices=["nvfp4"], default=None, help="quantize weights to NVFP4")
    add_model_flags(p)
    p.add_argument("--sampler", choices=["reset", "fixed", "greedy"], default="reset")
    p.add_argument("--t-high", type=float, default=1.0, help="ReSET T_high (default: 1.0)")
    p.add_argument("--t-low", type=float, default=None, help="ReSET T_low (default: per model)")
    p.add_argument("--tau0", type=float, default=None, help="ReSET tau0 (default: per model)")
    p.add_argument("--window", type=int, default=32, help="ReSET window (default: 32)")
    p.add_argument(
        "--temperature", type=float, default=0.6, help="--sampler fixed temperature (default: 0.6)"
    )
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser(
        "quantize",
        help="quantize a checkpoint to NVFP4 and save it (Model Optimizer layout)",
        description="Load SRC, quantize its linear layers (lm_head stays dense) to NVFP4 and "
        "write a Model Optimizer-style checkpoint to DST that `--model DST` loads back.",
    )
    p.add_argument("src", help="checkpoint path or model name")
    p.add_argument("dst", help="output directory")
    add_model_flags(p, model=False, fuse=False)
    p.set_defaults(func=_cmd_quantize)

    try:
        from reset_jax.eval import cli as eval_cli
    except ImportError as e:  # only the module's absence is tolerated
        if e.name not in ("reset_jax.eval", "reset_jax.eval.cli"):
            raise
    else:
        eval_cli.register(sub)
    return parser


# XLA (jax 0.11) leaves FFI custom calls out of command buffers (CUDA graphs) by default,
# which costs ~8 us of host time per NVFP4 matmul on a GPU (benchmarks/RESULTS.md); the
# flags are GPU-only and ignored elsewhere. A user's own XLA_FLAGS setting wins.
GPU_XLA_FLAGS = "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL"


def _default_xla_flags() -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_gpu_enable_command_buffer" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {GPU_XLA_FLAGS}".strip()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    _default_xla_flags()  # before any JAX backend starts
    args = build_parser().parse_args(argv)
    from reset_jax.hub import HubError

    try:
        return int(args.func(args) or 0)
    except (HubError, FileNotFoundError, ValueError) as e:
        # Expected user errors (bad name, path, prompt length): no traceback.
        print(f"reset-jax: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"reset-jax: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
