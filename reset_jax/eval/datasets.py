"""Evaluation data: JSONL files, and Hugging Face ``datasets`` ids when online.

A JSONL file holds one JSON object a line with ``question`` and ``answer``, and
optionally ``id`` and ``choices`` (a list of option texts). With ``choices`` the
example is multiple choice and ``answer`` may be a letter (``"B"``), a 0-based
index (``1``) or the text of one option; it is stored as a letter.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Example", "load_examples", "load_hf", "load_jsonl"]

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class Example:
    """One evaluation problem.

    Attributes:
      id: a stable identifier (from the file, or ``"<name>-<line>"``).
      question: the problem text.
      answer: the gold answer: a number/expression for math, a letter for multiple choice.
      choices: option texts for multiple choice, else None.
    """

    id: str
    question: str
    answer: str
    choices: tuple[str, ...] | None = None

    @property
    def task(self) -> str:
        """``"mc"`` when the example has choices, else ``"math"``."""
        return "mc" if self.choices else "math"


def _gsm8k_final(answer: str) -> str:
    # GSM8K's answer field is the worked solution ending "#### N".
    return answer.rsplit("####", 1)[1].strip() if "####" in answer else answer.strip()


def _choice_letter(answer: Any, choices: Sequence[str], where: str) -> str:
    n = len(choices)
    if isinstance(answer, bool):
        raise ValueError(
            f"{where}: 'answer' must be a letter, an index or an option text, got {answer!r}"
        )
    if isinstance(answer, int):
        if not 0 <= answer < n:
            raise ValueError(f"{where}: answer index {answer} is out of range for {n} choices")
        return LETTERS[answer]
    text = str(answer).strip()
    m = re.fullmatch(r"\(?([A-Za-z])\)?\.?", text)
    if m and m.group(1).upper() in LETTERS[:n]:
        return m.group(1).upper()
    matches = [i for i, c in enumerate(choices) if str(c).strip() == text]
    if len(matches) == 1:
        return LETTERS[matches[0]]
    raise ValueError(
        f"{where}: answer {answer!r} is neither a letter in A-{LETTERS[n - 1]}, "
        f"a 0-based index, nor exactly one of the {n} choices"
    )


def _make_example(obj: Mapping[str, Any], default_id: str, where: str) -> Example:
    missing = [k for k in ("question", "answer") if k not in obj]
    if missing:
        raise ValueError(
            f"{where}: missing field(s) {missing}; each line needs 'question' and 'answer' "
            f"(found {sorted(obj)})"
        )
    question = obj["question"]
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: 'question' must be a non-empty string")
    choices = obj.get("choices")
    if choices is not None:
        if (
            not isinstance(choices, list | tuple)
            or not 2 <= len(choices) <= len(LETTERS)
            or not all(isinstance(c, str | int | float) for c in choices)
        ):
            raise ValueError(f"{where}: 'choices' must be a list of 2 to 26 option texts")
        choices = tuple(str(c) for c in choices)
        answer = _choice_letter(obj["answer"], choices, where)
    else:
        if obj["answer"] is None or isinstance(obj["answer"], list | dict):
            raise ValueError(
                f"{where}: 'answer' must be a string or a number, got {obj['answer']!r}"
            )
        answer = str(obj["answer"]).strip()
    ex_id = obj.get("id", default_id)
    return Example(id=str(ex_id), question=question, answer=answer, choices=choices)


def _check_unique(examples: list[Example], source: str) -> None:
    seen: set[str] = set()
    for ex in examples:
        if ex.id in seen:
            raise ValueError(f"{source}: duplicate id {ex.id!r}; ids key the per-sample results")
        seen.add(ex.id)


def load_jsonl(path: str | os.PathLike, *, limit: int | None = None) -> list[Example]:
    """Read examples from a JSONL file.

    Args:
      path: the file; blank lines are skipped.
      limit: keep only the first ``limit`` examples.

    Returns:
      The examples, in file order.

    Raises:
      FileNotFoundError: no such file.
      ValueError: a line that is not JSON or lacks a field (the message names the line).
    """
    path = os.fspath(path)
    name = os.path.splitext(os.path.basename(path))[0]
    examples: list[Example] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            examples.append(_make_example(obj, f"{name}-{lineno}", where))
            if limit is not None and len(examples) >= limit:
                break
    if not examples:
        raise ValueError(f"{path}: no examples")
    _check_unique(examples, path)
    return examples


# Column names seen in common Hugging Face evaluation sets, tried in order.
_QUESTION_KEYS = ("question", "problem", "Question", "Problem", "prompt", "input")
_ANSWER_KEYS = ("answer", "final_answer", "Answer", "target", "label", "solution")
_CHOICE_KEYS = ("choices", "options")
_ID_KEYS = ("id", "unique_id", "ID", "problem_id", "idx")


def _pick(row: Mapping[str, Any], keys: Iterable[str]) -> str | None:
    return next((k for k in keys if k in row), None)


def _parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """``"hf:NAME[:CONFIG][@SPLIT]"`` (the ``hf:`` prefix is optional) -> parts."""
    s = spec[3:] if spec.startswith("hf:") else spec
    split = "test"
    if "@" in s:
        s, split = s.rsplit("@", 1)
    config = None
    if ":" in s:
        s, config = s.split(":", 1)
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", s):
        raise ValueError(f"{spec!r} is neither an existing file nor a Hugging Face dataset id")
    return s, config, split


def load_hf(spec: str, *, limit: int | None = None) -> list[Example]:
    """Load a Hugging Face dataset split as examples (needs ``datasets`` and a network).

    ``spec`` is ``NAME[:CONFIG][@SPLIT]`` (split defaults to ``test``), e.g.
    ``openai/gsm8k:main@test`` or ``HuggingFaceH4/MATH-500``. Columns are
    mapped by name: the question from ``question``/``problem``/``prompt``, the
    answer from ``answer``/``final_answer``/... (a GSM8K ``#### N`` tail is
    reduced to ``N``), options from ``choices``/``options``.

    Args:
      spec: the dataset id, optionally prefixed ``hf:``.
      limit: keep only the first ``limit`` rows.

    Returns:
      The examples.

    Raises:
      ImportError: the ``datasets`` package is not installed.
      ValueError: the columns cannot be mapped (the message lists them).
    """
    name, config, split = _parse_hf_spec(spec)
    try:
        import datasets as hf_datasets  # optional: only this loader needs it
    except ImportError:
        raise ImportError(
            f"loading {spec!r} from the Hugging Face hub needs the `datasets` package "
            "(`pip install datasets`) and a network connection; or pass a local JSONL "
            "file with 'question' and 'answer' fields"
        ) from None
    ds = hf_datasets.load_dataset(name, config, split=split)
    rows = ds if limit is None else ds.select(range(min(limit, len(ds))))
    examples = []
    for i, row in enumerate(rows):
        qk, ak = _pick(row, _QUESTION_KEYS), _pick(row, _ANSWER_KEYS)
        if qk is None or ak is None:
            raise ValueError(
                f"{spec}: cannot find a question and an answer column among {sorted(row)}; "
                f"expected one of {_QUESTION_KEYS} and one of {_ANSWER_KEYS}"
            )
        ck, ik = _pick(row, _CHOICE_KEYS), _pick(row, _ID_KEYS)
        answer = row[ak]
        obj: dict[str, Any] = {"question": row[qk]}
        if ck is not None:
            obj["choices"] = list(row[ck])
            obj["answer"] = answer
        else:
            obj["answer"] = _gsm8k_final(str(answer))
        if ik is not None:
            obj["id"] = row[ik]
        examples.append(_make_example(obj, f"{name.split('/')[-1]}-{split}-{i}", f"{spec} row {i}"))
    if not examples:
        raise ValueError(f"{spec}: no rows")
    _check_unique(examples, spec)
    return examples


def load_examples(source: str | os.PathLike, *, limit: int | None = None) -> list[Example]:
    """Examples from a JSONL path, or from a Hugging Face id when no such file exists.

    Args:
      source: a ``.jsonl`` path, or ``[hf:]NAME[:CONFIG][@SPLIT]``.
      limit: keep only the first ``limit`` examples.

    Returns:
      The examples.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    source = os.fspath(source)
    if os.path.exists(source) or source.endswith((".jsonl", ".json")):
        return load_jsonl(source, limit=limit)
    return load_hf(source, limit=limit)
