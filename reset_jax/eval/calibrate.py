"""Calibrate ReSET's τ₀: decode a few problems, pool the token entropies, take a percentile.

The paper decodes 5 held-out problems with the NVFP4 model and takes the 80th
percentile of every token entropy pooled. The entropy of a token is that of
the raw logits (before any temperature), so the decoding temperature only
changes which trajectory is followed; we decode with the fixed-temperature
baseline (0.6, top-p 0.95) by default.

The per-token dump (one JSON object a line: ``id``, ``config``, ``text``,
``token_ids``, ``tokens``, ``entropies``, ``temperatures``) is also the input
of ``reset-jax entropy-plot``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from reset_jax.eval.datasets import Example
from reset_jax.eval.harness import Backend, RunConfig, _get
from reset_jax.eval.prompts import build_prompt

__all__ = [
    "PERCENTILES",
    "CalibrationResult",
    "calibrate",
    "entropy_percentiles",
    "format_percentiles",
    "pooled_entropies",
    "read_entropy_jsonl",
    "write_entropy_jsonl",
]

PERCENTILES = (10, 25, 50, 75, 80, 90, 95, 99)


@dataclass
class CalibrationResult:
    """Outcome of :func:`calibrate`.

    Attributes:
      records: one dict per decoded problem (the JSONL lines).
      tau0: the chosen percentile of the pooled entropies (nats).
      percentile: which percentile ``tau0`` is.
      percentiles: ``{p: value}`` for :data:`PERCENTILES` (nats).
      n_tokens: how many token entropies were pooled.
    """

    records: list[dict]
    tau0: float
    percentile: float
    percentiles: dict[int, float]
    n_tokens: int


def pooled_entropies(records: Sequence[dict]) -> np.ndarray:
    """Every token entropy of every record, concatenated.

    Args:
      records: dicts with an ``entropies`` list.

    Returns:
      ``[N]`` float64.
    """
    parts = [np.asarray(r["entropies"], dtype=np.float64).ravel() for r in records]
    return np.concatenate(parts) if parts else np.zeros(0)


def entropy_percentiles(entropies: np.ndarray, qs: Sequence[float] = PERCENTILES) -> dict:
    """Percentiles of pooled entropies (linear interpolation, NumPy's default).

    Args:
      entropies: ``[N]`` entropies in nats.
      qs: the percentiles wanted.

    Returns:
      ``{q: value}``.
    """
    e = np.asarray(entropies, dtype=np.float64).ravel()
    if e.size == 0:
        raise ValueError("no entropies to take percentiles of (did generation produce tokens?)")
    return {q: float(np.percentile(e, q)) for q in qs}


def _token_strings(tokenizer, ids: Sequence[int]) -> list[str]:
    out = []
    for t in ids:
        try:
            out.append(tokenizer.decode([int(t)]))
        except Exception:  # a tokenizer that cannot decode a lone id: keep the id
            out.append(str(int(t)))
    return out


def calibrate(
    examples: Sequence[Example],
    *,
    backend: Backend,
    quantize: str | None = "nvfp4",
    activations: str = "bf16",
    n: int = 5,
    max_new_tokens: int = 1024,
    temperature: float = 0.6,
    top_p: float = 0.95,
    top_k: int = 0,
    seed: int = 0,
    batch_size: int | None = None,
    percentile: float = 80.0,
    label: str | None = None,
) -> CalibrationResult:
    """Decode the first ``n`` examples and compute τ₀ from their token entropies.

    Args:
      examples: problems (the first ``n`` are used).
      backend: the model stack (see :class:`reset_jax.eval.harness.Backend`).
      quantize: ``"nvfp4"`` (the paper's setting) or None for the dense model.
      activations: ``"bf16"`` (W4A16) or ``"nvfp4"`` (W4A4).
      n: how many problems.
      max_new_tokens: budget per problem.
      temperature: fixed decoding temperature.
      top_p: nucleus sampling.
      top_k: top-k (0 = off).
      seed: sampling seed.
      batch_size: problems per generate call (default: all ``n`` at once).
      percentile: which percentile is τ₀ (the paper: 80).
      label: the ``config`` field of the records (default ``"nvfp4"``/``"bf16"``/``"w4a4"``).

    Returns:
      A :class:`CalibrationResult`.
    """
    from reset_jax.sampling import calibrate_tau0  # the one definition of τ₀

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    chosen = list(examples[:n])
    if not chosen:
        raise ValueError("no examples to calibrate on")
    if label is None:
        label = "bf16" if quantize is None else ("w4a4" if activations == "nvfp4" else "nvfp4")
    model, tokenizer = backend.load(quantize, activations)
    cfg = RunConfig(label, quantize, activations, "fixed", temperature)
    sampler = backend.make_sampler(cfg, tokenizer)
    bs = batch_size or len(chosen)
    records = []
    for start in range(0, len(chosen), bs):
        batch = chosen[start : start + bs]
        prompts = [build_prompt(ex) for ex in batch]
        result = backend.generate(
            model,
            tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            sampler=sampler,
            top_p=top_p,
            top_k=top_k,
            seed=seed * 1_000_003 + start,
        )
        for i, ex in enumerate(batch):
            ids = [int(t) for t in _get(result, "token_ids")[i]]
            records.append(
                {
                    "id": ex.id,
                    "config": label,
                    "text": _get(result, "texts")[i],
                    "token_ids": ids,
                    "tokens": _token_strings(tokenizer, ids),
                    "entropies": [float(x) for x in np.asarray(_get(result, "entropies")[i])],
                    "temperatures": [float(x) for x in np.asarray(_get(result, "temperatures")[i])],
                }
            )
    pooled = pooled_entropies(records)
    table = entropy_percentiles(pooled)
    tau0 = float(calibrate_tau0(pooled, percentile=percentile))
    return CalibrationResult(records, tau0, percentile, table, int(pooled.size))


def format_percentiles(result: CalibrationResult) -> str:
    """A short human-readable report of a calibration.

    Args:
      result: from :func:`calibrate`.

    Returns:
      Several lines of text.
    """
    lines = [
        f"pooled {result.n_tokens} token entropies from {len(result.records)} problems",
        f"tau0 = {result.tau0:.4f} nats ({result.percentile:g}th percentile)",
        "percentile  entropy (nats)",
    ]
    lines += [f"{q:>10}  {v:.4f}" for q, v in result.percentiles.items()]
    return "\n".join(lines)


def write_entropy_jsonl(path: str | os.PathLike, records: Sequence[dict]) -> None:
    """Write calibration records, one JSON object a line.

    Args:
      path: output file (its directory is created).
      records: as in :attr:`CalibrationResult.records`.
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_entropy_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read records written by :func:`write_entropy_jsonl`.

    Args:
      path: the file.

    Returns:
      The records; each has at least ``entropies``.

    Raises:
      ValueError: a line without an ``entropies`` list (the message names the line).
    """
    path = os.fspath(path)
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            r = json.loads(line)
            if not isinstance(r, dict) or not isinstance(r.get("entropies"), list):
                raise ValueError(f"{path}:{lineno}: expected an object with an 'entropies' list")
            records.append(r)
    if not records:
        raise ValueError(f"{path}: no records")
    return records
