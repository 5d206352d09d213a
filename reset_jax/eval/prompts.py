"""Prompt templates per task type.

The text is the user turn; ``reset_jax.generate(..., chat=True)`` wraps it in
the model's chat template.
"""

from __future__ import annotations

from reset_jax.eval.datasets import LETTERS, Example

__all__ = ["MATH_INSTRUCTION", "MC_INSTRUCTION", "build_prompt", "build_prompts"]

# Exactly the instruction that goes with gsm8k-dev-50 (shared/data/README.md).
MATH_INSTRUCTION = (
    "Solve the following math problem step by step. Put your final numeric answer "
    "(without units, currency symbols, or percentage signs) in \\boxed{}, "
    "for example: \\boxed{42}."
)

# Same shape as the math one, so the scorer's first rule (the last \boxed{})
# serves both tasks.
MC_INSTRUCTION = (
    "Answer the following multiple choice question. Think step by step, then put "
    "the letter of your final choice in \\boxed{}, for example: \\boxed{B}."
)


def build_prompt(example: Example) -> str:
    """The user message for one example.

    Math: the instruction, a blank line, the question. Multiple choice: the
    instruction, a blank line, the question, a blank line, one ``(A) text``
    line per option.

    Args:
      example: the problem.

    Returns:
      The prompt text.
    """
    if example.task == "math":
        return f"{MATH_INSTRUCTION}\n\n{example.question.strip()}"
    assert example.choices is not None
    letters = LETTERS[: len(example.choices)]
    options = "\n".join(f"({letter}) {c.strip()}" for letter, c in zip(letters, example.choices))
    return f"{MC_INSTRUCTION}\n\n{example.question.strip()}\n\n{options}"


def build_prompts(examples: list[Example]) -> list[str]:
    """:func:`build_prompt` over a list.

    Args:
      examples: the problems.

    Returns:
      One prompt per example, in order.
    """
    return [build_prompt(ex) for ex in examples]
