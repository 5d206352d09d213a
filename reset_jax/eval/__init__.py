"""Accuracy tooling: answer scoring, datasets, prompts, τ₀ calibration, entropy plots, evaluation.

Names are imported on first use, so ``reset_jax.eval.cli`` (which the
``reset-jax`` CLI imports at start-up) does not pull in matplotlib or the
model stack.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "calibrate": (
        "CalibrationResult",
        "calibrate",
        "entropy_percentiles",
        "format_percentiles",
        "pooled_entropies",
        "read_entropy_jsonl",
        "write_entropy_jsonl",
    ),
    "datasets": ("Example", "load_examples", "load_hf", "load_jsonl"),
    "harness": (
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
    ),
    "plots": (
        "entropy_summary",
        "format_summaries",
        "plot_entropy_distributions",
        "plot_token_trace",
        "step_starts",
    ),
    "prompts": ("MATH_INSTRUCTION", "MC_INSTRUCTION", "build_prompt", "build_prompts"),
    "scoring": (
        "Score",
        "extract_boxed",
        "extract_choice",
        "extract_math_answer",
        "math_equal",
        "normalize_math_answer",
        "parse_number",
        "score_answer",
    ),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'reset_jax.eval' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"reset_jax.eval.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_WHERE))
