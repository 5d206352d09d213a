"""Evaluate model configurations side by side over seeds.

A configuration is a weight format plus a sampler: ``bf16`` (dense weights,
fixed temperature), ``nvfp4`` (NVFP4 W4A16 weights, fixed temperature),
``w4a4`` (NVFP4 weights and activations), each optionally ``+reset`` (the
ReSET sampler instead of the fixed temperature). Every configuration sees the
same problems with the same seeds, so their accuracies are paired.

The model, the tokenizer, the sampler and the generation call come from a
:class:`Backend`; the default one uses ``reset_jax``'s models and ``generate``,
and tests pass a fake one.

Outputs in ``out_dir``: ``samples.jsonl`` (one line per config, seed and
problem, appended as batches finish so an interrupted run can ``resume``),
``run.json`` (the settings), ``summary.json`` and ``summary.md``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import re
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from reset_jax.eval.datasets import Example
from reset_jax.eval.prompts import build_prompt
from reset_jax.eval.scoring import score_answer

__all__ = [
    "RESET_TABLE",
    "Backend",
    "EvalResult",
    "JaxBackend",
    "RunConfig",
    "format_markdown",
    "parse_configs",
    "reset_params_for",
    "run_eval",
    "summarize",
]

DEFAULT_TEMPERATURE = 0.6
DEFAULT_TOP_P = 0.95

# (t_low, tau0) published with the paper (docs/reset-algorithm.md). Keys are
# matched against the model name with any organisation prefix dropped.
RESET_TABLE: dict[str, tuple[float, float]] = {
    "qwen3-8b": (0.1, 0.5505),
    "qwen3-14b": (0.3, 0.4863),
    "qwen3-32b": (0.1, 0.5363),
    "deepseek-r1-distill-qwen-7b": (0.4, 0.6446),
    "deepseek-r1-distill-qwen-14b": (0.3, 0.6488),
}

_WEIGHTS = {
    "bf16": (None, "bf16"),
    "nvfp4": ("nvfp4", "bf16"),
    "w4a4": ("nvfp4", "nvfp4"),
}


@dataclass(frozen=True)
class RunConfig:
    """One evaluated configuration.

    Attributes:
      name: as given on the command line, e.g. ``"nvfp4+reset"``.
      quantize: ``None`` (dense) or ``"nvfp4"``.
      activations: ``"bf16"`` or ``"nvfp4"`` (W4A4).
      sampler: ``"fixed"`` or ``"reset"``.
      temperature: the fixed temperature (``sampler == "fixed"``).
      t_low, tau0, t_high, window: ReSET parameters (``sampler == "reset"``).
    """

    name: str
    quantize: str | None
    activations: str
    sampler: str
    temperature: float | None = None
    t_low: float | None = None
    tau0: float | None = None
    t_high: float = 1.0
    window: int = 32

    @property
    def weights_key(self) -> tuple[str | None, str]:
        """Configurations with the same key share one loaded model."""
        return (self.quantize, self.activations)


def reset_params_for(model_name: str) -> tuple[float, float] | None:
    """The paper's ``(t_low, tau0)`` for a model name or path, or None if unknown.

    Args:
      model_name: e.g. ``"Qwen/Qwen3-8B"`` or ``"/ckpt/qwen3-8b-nvfp4"``.

    Returns:
      ``(t_low, tau0)`` or None.
    """
    name = os.path.basename(os.path.normpath(str(model_name))).lower()
    # Longest key first, so "qwen3-14b" is never read as a prefix match of another.
    for key in sorted(RESET_TABLE, key=len, reverse=True):
        if re.search(rf"(?<![a-z0-9]){re.escape(key)}(?![0-9a-z])", name):
            return RESET_TABLE[key]
    return None


def parse_configs(
    names: str | Sequence[str],
    *,
    model_name: str = "",
    temperature: float = DEFAULT_TEMPERATURE,
    t_low: float | None = None,
    tau0: float | None = None,
    t_high: float = 1.0,
    window: int = 32,
) -> list[RunConfig]:
    """Turn ``"bf16,nvfp4,nvfp4+reset"`` into :class:`RunConfig` objects.

    Each name is a weight format (``bf16``, ``nvfp4``, ``w4a4``) optionally
    followed by ``+reset``. ReSET's ``t_low``/``tau0`` come from the arguments
    when given, else from :data:`RESET_TABLE` for ``model_name``.

    Args:
      names: comma-separated string or a sequence of names.
      model_name: used to look up the per-model ReSET values.
      temperature: the fixed temperature for non-ReSET configurations.
      t_low: ReSET low temperature (overrides the table).
      tau0: ReSET entropy threshold (overrides the table).
      t_high: ReSET high temperature.
      window: ReSET window.

    Returns:
      The configurations, in the given order.

    Raises:
      ValueError: an unknown or repeated name, or a ``+reset`` configuration
        without ``t_low``/``tau0`` for a model that is not in the table.
    """
    if isinstance(names, str):
        names = [n for n in (p.strip() for p in names.split(",")) if n]
    if not names:
        raise ValueError("no configurations given")
    if len(set(names)) != len(names):
        raise ValueError(f"configurations repeat: {list(names)}")
    configs = []
    for name in names:
        base, _, extra = name.partition("+")
        if base not in _WEIGHTS or extra not in ("", "reset"):
            raise ValueError(
                f"unknown configuration {name!r}; use one of {sorted(_WEIGHTS)}, "
                "optionally followed by '+reset' (e.g. 'nvfp4+reset')"
            )
        quantize, activations = _WEIGHTS[base]
        if extra == "reset":
            table = reset_params_for(model_name)
            lo = t_low if t_low is not None else (table[0] if table else None)
            tau = tau0 if tau0 is not None else (table[1] if table else None)
            if lo is None or tau is None:
                raise ValueError(
                    f"{name!r} needs ReSET's t_low and tau0, and {model_name!r} is not in the "
                    f"table of published values ({', '.join(RESET_TABLE)}); pass --t-low and "
                    "--tau0 (calibrate tau0 with `reset-jax calibrate`)"
                )
            configs.append(
                RunConfig(name, quantize, activations, "reset", None, lo, tau, t_high, window)
            )
        else:
            configs.append(RunConfig(name, quantize, activations, "fixed", temperature))
    return configs


class Backend(Protocol):
    """What the harness needs from a model stack."""

    def load(self, quantize: str | None, activations: str) -> tuple[Any, Any]:
        """Returns ``(model, tokenizer)`` for one weight format."""
        ...

    def make_sampler(self, config: RunConfig, tokenizer: Any) -> Any:
        """Returns the sampler object passed to :meth:`generate`."""
        ...

    def generate(
        self,
        model: Any,
        tokenizer: Any,
        prompts: list[str],
        *,
        max_new_tokens: int,
        sampler: Any,
        top_p: float,
        top_k: int,
        seed: int,
    ) -> Any:
        """Returns an object with ``texts``, ``token_ids``, ``entropies``, ``temperatures``, ``timing``."""
        ...


@dataclass
class JaxBackend:
    """The real stack: ``reset_jax.models``, ``reset_jax.tokenizer``, ``reset_jax.generate``.

    Attributes:
      model: a model name (``"smollm2-135m-instruct"``) or checkpoint path.
      dtype: compute dtype name for the dense parts (``"bfloat16"``/``"float32"``).
      chat: apply the tokenizer's chat template to each prompt.
      implementation: NVFP4 matmul backend(s) (``"cuda"``, ``"pallas"``,
        ``"xla"``); None lets ``reset_jax.nvfp4.matmul`` choose.
      fuse: the CLI's ``--fuse`` (``"auto"``, ``"none"``, ``"norms"``, ``"attention"``, ``"all"``,
        ``"layers"``), applied to every model loaded (``reset_jax.cli.apply_fuse``; the CLI's
        default ``"auto"`` fuses on a GPU, so evaluations there run the fused decode path).
    """

    model: str = "smollm2-135m-instruct"
    dtype: str = "bfloat16"
    chat: bool = True
    implementation: str | None = None
    fuse: str = "none"
    _tokenizer: Any = field(default=None, init=False, repr=False)
    # The last model loaded, keyed by its weight format: calibrating and then
    # evaluating the same format reuses it (and its compiled decode loop).
    _last: tuple[Any, Any] | None = field(default=None, init=False, repr=False)

    def load(self, quantize, activations):
        import jax.numpy as jnp

        from reset_jax.models import from_pretrained
        from reset_jax.tokenizer import load_tokenizer

        key = (quantize, activations)
        if self._last is not None and self._last[0] == key:
            model = self._last[1]
        else:
            self._last = None  # let the previous model go before the next one loads
            kwargs = {} if self.implementation is None else {"implementation": self.implementation}
            model = from_pretrained(
                self.model,
                dtype=jnp.dtype(self.dtype),
                quantize=quantize,
                activations=activations,
                **kwargs,
            )
            if self.fuse != "none":
                from reset_jax.cli import apply_fuse

                apply_fuse(model, self.fuse, self.implementation)
            self._last = (key, model)
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.model)
        return model, self._tokenizer

    def make_sampler(self, config, tokenizer):
        if config.sampler == "reset":
            gen = importlib.import_module("reset_jax.generate")
            return gen.reset_config_for(
                tokenizer,
                t_low=config.t_low,
                tau0=config.tau0,
                t_high=config.t_high,
                window=config.window,
            )
        from reset_jax.sampling import FixedTemperature

        return FixedTemperature.create(config.temperature)

    def generate(self, model, tokenizer, prompts, *, max_new_tokens, sampler, top_p, top_k, seed):
        # The module, not the attribute: reset_jax.generate may be the function.
        gen = importlib.import_module("reset_jax.generate")
        return gen.generate(
            model,
            tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            sampler=sampler,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            chat=self.chat,
        )


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _batch_seed(seed: int, start: int) -> int:
    # Depends on the seed and the batch's position only, so every configuration
    # starts the same problems from the same key (paired comparisons).
    return seed * 1_000_003 + start


def _sample_records(
    config: RunConfig,
    seed: int,
    examples: Sequence[Example],
    result: Any,
    max_new_tokens: int,
) -> list[dict]:
    texts = _get(result, "texts")
    token_ids = _get(result, "token_ids")
    entropies = _get(result, "entropies")
    temperatures = _get(result, "temperatures")
    reasons = _get(result, "finish_reasons")
    records = []
    for i, ex in enumerate(examples):
        text = texts[i]
        n_choices = len(ex.choices) if ex.choices else 4
        sc = score_answer(text, ex.answer, task=ex.task, n_choices=n_choices)
        ent = np.asarray(entropies[i], dtype=np.float64) if entropies is not None else np.zeros(0)
        temp = (
            np.asarray(temperatures[i], dtype=np.float64)
            if temperatures is not None
            else np.zeros(0)
        )
        n_tokens = len(token_ids[i]) if token_ids is not None else int(ent.size)
        share_high = None
        if config.sampler == "reset" and temp.size:
            share_high = float(np.mean(temp >= config.t_high - 1e-6))
        records.append(
            {
                "config": config.name,
                "seed": seed,
                "id": ex.id,
                "prediction": text,
                "extracted": sc.extracted,
                "gold": ex.answer,
                "correct": sc.correct,
                "n_tokens": n_tokens,
                # "length" or "cache": the answer may have been cut off.
                "truncated": (reasons[i] != "stop") if reasons else n_tokens >= max_new_tokens,
                "mean_entropy": float(ent.mean()) if ent.size else None,
                "share_t_high": share_high,
            }
        )
    return records


@dataclass
class EvalResult:
    """What :func:`run_eval` returns.

    Attributes:
      records: every per-sample record (as written to ``samples.jsonl``).
      summary: the per-configuration summary (as written to ``summary.json``).
      markdown: the summary table (as written to ``summary.md``).
    """

    records: list[dict]
    summary: dict
    markdown: str


def _t_quantile(n: int) -> float:
    """Two-sided 95% quantile of Student's t with ``n - 1`` degrees of freedom."""
    from scipy.stats import t  # scipy ships with jax

    return float(t.ppf(0.975, n - 1))


def _mean_or_none(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def summarize(
    records: Sequence[dict],
    configs: Sequence[RunConfig],
    *,
    timings: dict[str, list[float]] | None = None,
) -> dict:
    """Per-configuration accuracy over seeds with a 95% confidence interval.

    The accuracy of one seed is the share of problems answered correctly. The
    interval is ``mean ± t_{0.975, n-1} · sd / sqrt(n)`` over the ``n`` seeds'
    accuracies: it covers sampling noise for *these* problems, not the spread
    over other problems. With one seed there is no spread to estimate: the
    interval is reported as ``None`` (``"n/a (1 seed)"`` in the table) rather
    than invented.

    Args:
      records: per-sample records (see :func:`run_eval`).
      configs: the configurations, in display order.
      timings: per configuration, tokens/s of each batch.

    Returns:
      ``{"configs": [...], "paired": [...]}``. Each config entry has ``config``, ``spec``,
      ``n_examples``, ``seeds``, ``accuracy_per_seed``, ``accuracy_mean``,
      ``accuracy_std``, ``ci95`` (``[lo, hi]`` or None), ``ci95_method``,
      ``mean_tokens``, ``truncated_share``, ``mean_entropy``, ``share_t_high``
      and ``tokens_per_s`` (median over batches, or None). Each ``paired``
      entry compares a configuration with the baseline (``nvfp4`` if present,
      else the first) seed by seed: ``config``, ``baseline``, ``seeds``,
      ``delta_mean`` and ``ci95`` (t interval of the per-seed differences).
    """
    out = []
    for cfg in configs:
        recs = [r for r in records if r["config"] == cfg.name]
        seeds = sorted({r["seed"] for r in recs})
        per_seed = []
        for s in seeds:
            rs = [r for r in recs if r["seed"] == s]
            per_seed.append(sum(bool(r["correct"]) for r in rs) / len(rs))
        n = len(per_seed)
        mean = float(np.mean(per_seed)) if n else None
        std = statistics.stdev(per_seed) if n > 1 else None
        if n > 1:
            half = _t_quantile(n) * std / math.sqrt(n)
            ci, method = [mean - half, mean + half], f"t-distribution over {n} seeds ({n - 1} dof)"
        else:
            ci, method = None, "n/a (1 seed)" if n == 1 else "n/a (no samples)"
        tps = (timings or {}).get(cfg.name) or []
        out.append(
            {
                "config": cfg.name,
                "spec": dataclasses.asdict(cfg),
                "n_examples": len({r["id"] for r in recs}),
                "seeds": seeds,
                "accuracy_per_seed": per_seed,
                "accuracy_mean": mean,
                "accuracy_std": std,
                "ci95": ci,
                "ci95_method": method,
                "mean_tokens": _mean_or_none(r["n_tokens"] for r in recs),
                "truncated_share": _mean_or_none(float(r["truncated"]) for r in recs),
                "mean_entropy": _mean_or_none(r["mean_entropy"] for r in recs),
                "share_t_high": _mean_or_none(r["share_t_high"] for r in recs),
                "tokens_per_s": float(np.median(tps)) if tps else None,
            }
        )
    return {"configs": out, "paired": _paired_deltas(out)}


def _paired_deltas(per_config: list[dict]) -> list[dict]:
    """Each configuration against the baseline, seed by seed.

    The baseline is ``nvfp4`` when present (ReSET's claim is over plain NVFP4),
    else the first configuration. Both saw the same problems with the same
    seeds, so the per-seed differences remove the shared noise; their t
    interval is tighter than comparing the two intervals.
    """
    names = [c["config"] for c in per_config]
    if len(names) < 2:
        return []
    base = per_config[names.index("nvfp4")] if "nvfp4" in names else per_config[0]
    base_acc = dict(zip(base["seeds"], base["accuracy_per_seed"]))
    out = []
    for c in per_config:
        if c is base:
            continue
        diffs = [
            a - base_acc[s] for s, a in zip(c["seeds"], c["accuracy_per_seed"]) if s in base_acc
        ]
        n = len(diffs)
        mean = float(np.mean(diffs)) if n else None
        ci = None
        if n > 1:
            half = _t_quantile(n) * statistics.stdev(diffs) / math.sqrt(n)
            ci = [mean - half, mean + half]
        out.append(
            {
                "config": c["config"],
                "baseline": base["config"],
                "seeds": n,
                "delta_mean": mean,
                "ci95": ci,
            }
        )
    return out


def _fmt(x: float | None, spec: str, scale: float = 1.0) -> str:
    return "–" if x is None else format(x * scale, spec)


def format_markdown(summary: dict) -> str:
    """The summary as a markdown table (accuracy in percent).

    Args:
      summary: as returned by :func:`summarize`.

    Returns:
      The table, ending with a newline, followed by a note on the interval.
    """
    lines = [
        "| config | accuracy (%) | 95% CI (%) | seeds | problems | mean tokens | truncated (%) "
        "| mean entropy (nats) | T_high share (%) | tokens/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in summary["configs"]:
        ci = c["ci95"]
        ci_s = f"{100 * ci[0]:.1f} – {100 * ci[1]:.1f}" if ci else c["ci95_method"]
        lines.append(
            f"| {c['config']} | {_fmt(c['accuracy_mean'], '.1f', 100)} | {ci_s} "
            f"| {len(c['seeds'])} | {c['n_examples']} | {_fmt(c['mean_tokens'], '.1f')} "
            f"| {_fmt(c['truncated_share'], '.1f', 100)} | {_fmt(c['mean_entropy'], '.3f')} "
            f"| {_fmt(c['share_t_high'], '.1f', 100)} | {_fmt(c['tokens_per_s'], '.1f')} |"
        )
    lines.append("")
    for d in summary.get("paired", []):
        if d["delta_mean"] is None:
            continue
        ci = d["ci95"]
        ci_s = f"95% CI {100 * ci[0]:+.1f} to {100 * ci[1]:+.1f}" if ci else "no CI with 1 seed"
        lines.append(
            f"- {d['config']} vs {d['baseline']}: {100 * d['delta_mean']:+.1f} points "
            f"({ci_s}; paired over {d['seeds']} seed{'s' if d['seeds'] != 1 else ''})"
        )
    if summary.get("paired"):
        lines.append("")
    lines.append(
        "Accuracy: mean over seeds of the share of problems solved. 95% CI: Student's t "
        "over the seeds' accuracies (sampling noise on these problems; none with 1 seed)."
    )
    return "\n".join(lines) + "\n"


def _read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def run_eval(
    examples: Sequence[Example],
    configs: Sequence[RunConfig],
    *,
    backend: Backend,
    seeds: int | Sequence[int] = 1,
    batch_size: int = 8,
    max_new_tokens: int = 1024,
    top_p: float = DEFAULT_TOP_P,
    top_k: int = 0,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    settings: dict | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> EvalResult:
    """Run every configuration over every seed on every example.

    Configurations that share weights share one loaded model; only one model
    is held at a time. Batches are padded to ``batch_size`` (with copies of
    their first prompt, whose outputs are dropped) so the last batch does not
    compile a new shape.

    Args:
      examples: the problems.
      configs: from :func:`parse_configs`.
      backend: the model stack (:class:`JaxBackend` or a test fake).
      seeds: a count ``N`` (seeds ``0..N-1``) or explicit seeds.
      batch_size: prompts per ``generate`` call.
      max_new_tokens: generation budget per sample.
      top_p: nucleus sampling after the temperature.
      top_k: top-k (0 = off).
      out_dir: where to write ``samples.jsonl``, ``run.json``, ``summary.json``,
        ``summary.md``; None keeps everything in memory.
      resume: keep the samples already in ``out_dir`` and run only the missing
        ``(config, seed, batch)`` work; the settings must match the earlier run.
      settings: extra run settings to record in ``run.json`` (model, data, command).
      progress: show a tqdm progress bar.
      log: where to send one-line notes (default: nothing).

    Returns:
      An :class:`EvalResult`.

    Raises:
      FileExistsError: ``out_dir`` already holds samples and ``resume`` is off.
      ValueError: ``resume`` with different settings, or bad arguments.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be >= 1")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seed_list:
        raise ValueError("at least one seed is needed")
    if not examples or not configs:
        raise ValueError("need at least one example and one configuration")
    log = log or (lambda _msg: None)

    run_settings = {
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "top_p": top_p,
        "top_k": top_k,
        "example_ids": [ex.id for ex in examples],
        **(settings or {}),
    }
    records: list[dict] = []
    samples_path = None
    if out_dir is not None:
        out_dir = os.fspath(out_dir)
        os.makedirs(out_dir, exist_ok=True)
        samples_path = os.path.join(out_dir, "samples.jsonl")
        run_path = os.path.join(out_dir, "run.json")
        if os.path.exists(samples_path) and os.path.getsize(samples_path) > 0:
            if not resume:
                raise FileExistsError(
                    f"{samples_path} exists; pass resume=True (--resume) to continue that run, "
                    "or choose another output directory"
                )
            if os.path.exists(run_path):
                with open(run_path, encoding="utf-8") as f:
                    old_run = json.load(f)
                old = old_run.get("settings", {})
                keys = ("max_new_tokens", "batch_size", "top_p", "top_k", "model", "dtype")
                keys += ("chat", "implementation")
                diff = [k for k in keys if k in old and old.get(k) != run_settings.get(k)]
                # A configuration name must keep its meaning (e.g. the same tau0).
                old_specs = {c["name"]: c for c in old_run.get("configs", [])}
                diff += [
                    c.name
                    for c in configs
                    if c.name in old_specs and old_specs[c.name] != dataclasses.asdict(c)
                ]
                if diff:
                    raise ValueError(f"cannot resume {out_dir}: settings differ in {diff}")
            wanted = {c.name for c in configs}
            ids = {ex.id for ex in examples}
            records = [
                r
                for r in _read_jsonl(samples_path)
                if r["config"] in wanted and r["seed"] in seed_list and r["id"] in ids
            ]
            log(f"resuming: {len(records)} samples already in {samples_path}")
        with open(run_path, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "settings": run_settings,
                    "seeds": seed_list,
                    "configs": [dataclasses.asdict(c) for c in configs],
                },
                f,
                indent=2,
            )
    done = {(r["config"], r["seed"], r["id"]) for r in records}

    batches = [list(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)]
    starts = list(range(0, len(examples), batch_size))
    total = len(configs) * len(seed_list) * len(examples)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="eval", unit="sample", dynamic_ncols=True)
        bar.update(len(done))

    timings: dict[str, list[float]] = {c.name: [] for c in configs}
    # Group by weights so each model is loaded once, in first-seen order.
    order = sorted(
        range(len(configs)),
        key=lambda i: [c.weights_key for c in configs].index(configs[i].weights_key),
    )
    loaded_key, model, tokenizer = None, None, None
    try:
        for ci in order:
            cfg = configs[ci]
            todo = [
                (seed, start, batch)
                for seed in seed_list
                for start, batch in zip(starts, batches)
                if not all((cfg.name, seed, ex.id) in done for ex in batch)
            ]
            if not todo:
                continue
            if loaded_key != cfg.weights_key:
                # Drop the previous model before loading the next: large models
                # may not fit twice.
                model = None
                log(
                    f"loading weights for {cfg.name} (quantize={cfg.quantize}, activations={cfg.activations})"
                )
                model, tokenizer = backend.load(cfg.quantize, cfg.activations)
                loaded_key = cfg.weights_key
            sampler = backend.make_sampler(cfg, tokenizer)
            for seed, start, batch in todo:
                prompts = [build_prompt(ex) for ex in batch]
                pad = batch_size - len(prompts)
                result = backend.generate(
                    model,
                    tokenizer,
                    prompts + [prompts[0]] * pad,
                    max_new_tokens=max_new_tokens,
                    sampler=sampler,
                    top_p=top_p,
                    top_k=top_k,
                    seed=_batch_seed(seed, start),
                )
                new = [
                    r
                    for r in _sample_records(cfg, seed, batch, result, max_new_tokens)
                    if (cfg.name, seed, r["id"]) not in done
                ]
                tps = _get(_get(result, "timing"), "tokens_per_s")
                if tps is not None:
                    timings[cfg.name].append(float(tps))
                records.extend(new)
                done.update((cfg.name, seed, r["id"]) for r in new)
                if samples_path is not None:
                    with open(samples_path, "a", encoding="utf-8") as f:
                        for r in new:
                            f.write(json.dumps(r) + "\n")
                if bar is not None:
                    bar.update(len(new))
                    n_cfg = [r for r in records if r["config"] == cfg.name and r["seed"] == seed]
                    acc = sum(r["correct"] for r in n_cfg) / max(len(n_cfg), 1)
                    bar.set_postfix_str(f"{cfg.name} seed {seed} acc {100 * acc:.0f}%")
    finally:
        if bar is not None:
            bar.close()

    # Records in a stable order: config order, then seed, then example order.
    pos = {ex.id: i for i, ex in enumerate(examples)}
    cpos = {c.name: i for i, c in enumerate(configs)}
    records.sort(key=lambda r: (cpos[r["config"]], r["seed"], pos.get(r["id"], len(pos))))
    summary = summarize(records, configs, timings=timings)
    summary["settings"] = run_settings | {"seeds": seed_list}
    summary["settings"].pop("example_ids", None)
    summary["settings"]["n_examples"] = len(examples)
    markdown = format_markdown(summary)
    if out_dir is not None:
        with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
        with open(os.path.join(out_dir, "summary.md"), "w", encoding="utf-8") as f:
            f.write(markdown)
    return EvalResult(records=records, summary=summary, markdown=markdown)
