"""Answer extraction, normalisation and comparison; dataset loading; prompts."""

import json
import sys
import types
from pathlib import Path

import pytest

from reset_jax.eval.datasets import Example, load_examples, load_hf, load_jsonl
from reset_jax.eval.prompts import MATH_INSTRUCTION, build_prompt
from reset_jax.eval.scoring import (
    extract_boxed,
    extract_choice,
    extract_math_answer,
    math_equal,
    normalize_math_answer,
    parse_number,
    score_answer,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
GSM8K = SHARED / "data" / "gsm8k-dev-50.jsonl"


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{42}.", "42"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}"),
        (r"first \boxed{3}, then corrected: \boxed{4}", "4"),
        (r"\boxed {7}", "7"),
        (r"\boxed 7.", "7"),
        (r"$\boxed{\text{12 apples}}$", r"\text{12 apples}"),
        (r"\fbox{9}", "9"),
        (r"\boxed{5} and then a truncated \boxed{6", "5"),  # unclosed box ignored
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),  # escaped braces are content
        ("no box here", None),
        (r"\boxedfoo{3}", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"The total is \boxed{1,000} dollars. Earlier I said 5.", "1,000"),
        ("Half of 10 is 5.\n#### 5", "5"),
        ("#### 1,200\nsome trailing chatter 7", "1,200"),
        ("She has 5 apples and 7 pears, so 12 in total.", "12"),
        ("The answer is 42.", "42"),
        ("It costs $3.50 each, so $7.", "7"),
        ("Ratio 3/4 of the cake", "3/4"),
        ("temperatures drop to -5 degrees", "-5"),
        ("that is 2.5e3 units", "2.5e3"),
        ("version1 of x2", None),  # digits glued to words are not numbers
        ("nothing numeric", None),
        ("", None),
    ],
)
def test_extract_math_answer(text, expected):
    assert extract_math_answer(text) == expected


@pytest.mark.parametrize(
    "answer, value",
    [
        ("42", 42),
        ("1,000", 1000),
        ("1,234,567.5", 1234567.5),
        (r"1{,}000", 1000),
        (r"1\,000\,000", 1000000),
        ("$18", 18),
        (r"\$1,234.50", 1234.5),
        ("18 dollars", 18),
        (r"18 \text{ dollars}", 18),
        (r"5\text{ cm}^2", 5),
        ("12 pm", 12),
        (r"\text{12}", 12),
        (r"\textbf{12}", 12),
        ("25%", 25),
        (r"25\%", 25),
        (r"90^\circ", 90),
        ("x = 5", 5),
        ("Total: 17", 17),
        (r"\frac{1}{2}", 0.5),
        (r"\dfrac{3}{4}", 0.75),
        (r"\tfrac12", 0.5),
        (r"-\frac{3}{4}", -0.75),
        (r"\frac{-3}{4}", -0.75),
        (r"2\frac{1}{2}", 2.5),
        (r"-2\frac{1}{2}", -2.5),
        ("3/4", 0.75),
        ("3/4 cup", 0.75),
        ("(-3)/4", -0.75),
        ("1e3", 1000),
        ("2.5E-2", 0.025),
        (r"1.5 \times 10^3", 1500),
        (r"1.5 \cdot 10^{3}", 1500),
        ("10.0", 10),
        ("10.", 10),
        (".5", 0.5),
        ("−7", -7),  # unicode minus
        (r"\left( 7 \right)", 7),
        ("3 and 4", None),
        (r"3 \text{ and } 4", None),
        ("x^2+1", None),
        ("", None),
        ("1/0", None),
    ],
)
def test_parse_number(answer, value):
    got = parse_number(answer)
    if value is None:
        assert got is None
    else:
        assert got == pytest.approx(value)


@pytest.mark.parametrize(
    "answer, normalized",
    [
        ("1,000", "1000"),
        ("10.0", "10"),
        (r"\frac{1}{2}", "0.5"),
        ("1e3", "1000"),
        (r"\$5", "5"),
        (r"\text{Yes}", "yes"),
        (r"\{1, 2\}", r"\{1,2\}"),
        (r"x^2 + \frac{a}{b}", "x^2+(a)/(b)"),
    ],
)
def test_normalize_math_answer(answer, normalized):
    assert normalize_math_answer(answer) == normalized


@pytest.mark.parametrize(
    "pred, gold, equal",
    [
        ("1,000", "1000", True),
        ("1000.00", "1000", True),
        (r"\frac{1}{3}", "0.3333333", True),
        ("0.333", r"\frac{1}{3}", False),
        ("123460", "123456", False),  # a loose relative tolerance would accept this
        ("25%", "25", True),
        ("0.25", "25", False),
        ("$18.00", "18", True),
        (r"\text{yes}", "Yes", True),
        ("5 apples", "5", True),
        ("x^2", "5", False),
        (None, "5", False),
        ("-3", "3", False),
    ],
)
def test_math_equal(pred, gold, equal):
    assert math_equal(pred, gold) is equal


@pytest.mark.parametrize(
    "text, letter",
    [
        ("The answer is (B).", "B"),
        (r"Therefore \boxed{C}.", "C"),
        (r"\boxed{\text{D}}", "D"),
        (r"\boxed{(A)}", "A"),
        (r"\boxed{B. 42}", "B"),
        ("**B**", "B"),
        ("The final answer is **B. 12 cm**", "B"),
        ("Answer: D", "D"),
        ("answer: **(C)**", "C"),
        ("The correct option is C", "C"),
        ("I think A is wrong. Answer: B", "B"),
        ("Between (A) and (C), I pick (C)", "C"),
        ("Answer is A\n\nWhy not (B)? Because...", "A"),  # an answer phrase beats a mention
        ("B", "B"),
        ("C.", "C"),
        ("(d)", "D"),
        ("A train leaves at 3 pm. The answer is a fraction.", None),
        ("The answer is E", None),  # out of range for 4 choices
        ("The answer is Approximately 3", None),
        ("", None),
    ],
)
def test_extract_choice(text, letter):
    assert extract_choice(text, n_choices=4) == letter


def test_extract_choice_more_options():
    assert extract_choice("The answer is E", n_choices=5) == "E"
    with pytest.raises(ValueError, match="n_choices"):
        extract_choice("A", n_choices=1)


def test_score_answer():
    s = score_answer(r"... so she pays \boxed{\$1,250}.", "1250")
    assert s.extracted == r"\$1,250" and s.correct
    s = score_answer("I am not sure.", "3")
    assert s.extracted is None and not s.correct
    assert score_answer(r"\boxed{b}", "B", task="mc").correct
    assert not score_answer("The answer is (A)", "B", task="mc").correct
    with pytest.raises(ValueError, match="unknown task"):
        score_answer("x", "y", task="code")


@pytest.mark.skipif(not GSM8K.exists(), reason="shared/data not beside the repository")
def test_gsm8k_reference_solutions_score_correct():
    # The reference solutions end in "#### N": every one must grade correct,
    # and every gold answer must be a plain number.
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines() if line.strip()]
    assert len(rows) == 50
    for row in rows:
        assert parse_number(row["answer"]) is not None, row["id"]
        assert score_answer(row["solution"], row["answer"]).correct, row["id"]


# --- datasets -------------------------------------------------------------------------


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) if not isinstance(r, str) else r for r in rows) + "\n")
    return path


def test_load_jsonl_math_and_choices(tmp_path):
    p = _write_jsonl(
        tmp_path / "mix.jsonl",
        [
            {"id": "q1", "question": "2+2?", "answer": 4},
            "",
            {"question": "Pick", "choices": ["x", "y", "z"], "answer": "B"},
            {"question": "Pick", "choices": ["x", "y", "z"], "answer": 2},
            {"question": "Pick", "choices": ["x", "y", "z"], "answer": "y"},
            {"question": "Pick", "choices": ["x", "y", "z"], "answer": "(c)"},
        ],
    )
    exs = load_jsonl(p)
    assert [e.id for e in exs] == ["q1", "mix-3", "mix-4", "mix-5", "mix-6"]
    assert exs[0] == Example("q1", "2+2?", "4", None) and exs[0].task == "math"
    assert [e.answer for e in exs[1:]] == ["B", "C", "B", "C"]
    assert exs[1].task == "mc" and exs[1].choices == ("x", "y", "z")
    assert len(load_examples(p, limit=2)) == 2


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", r"bad\.jsonl:2: not valid JSON"),
        ('{"question": "q"}', r"bad\.jsonl:2: missing field\(s\) \['answer'\]"),
        ("[1, 2]", "expected a JSON object"),
        ('{"question": "", "answer": "1"}', "non-empty string"),
        ('{"question": "q", "answer": "E", "choices": ["a", "b"]}', "neither a letter"),
        ('{"question": "q", "answer": 5, "choices": ["a", "b"]}', "out of range"),
        ('{"question": "q", "answer": "a", "choices": ["a"]}', "2 to 26"),
        ('{"id": "ok", "question": "q", "answer": "1"}', "duplicate id 'ok'"),
    ],
)
def test_load_jsonl_errors(tmp_path, line, message):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"id": "ok", "question": "q", "answer": "1"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        load_jsonl(p)


def test_load_jsonl_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_examples(tmp_path / "nope.jsonl")


def test_hf_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="pip install datasets"):
        load_examples("openai/gsm8k:main@test")
    with pytest.raises(ValueError, match="neither an existing file"):
        load_hf("not a dataset id!")


def test_hf_column_mapping_with_fake_datasets(monkeypatch):
    calls = []

    class FakeSplit(list):
        def select(self, idx):
            return FakeSplit(self[i] for i in idx)

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        if name == "openai/gsm8k":
            return FakeSplit(
                [
                    {"question": "q1", "answer": "work\n#### 1,000"},
                    {"question": "q2", "answer": "#### 7"},
                ]
            )
        if name == "cais/mmlu":
            return FakeSplit([{"question": "q", "choices": ["a", "b", "c", "d"], "answer": 3}])
        return FakeSplit([{"text": "no known columns"}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    exs = load_examples("hf:openai/gsm8k:main@test", limit=1)
    assert calls[-1] == ("openai/gsm8k", "main", "test")
    assert exs == [Example("gsm8k-test-0", "q1", "1,000", None)]
    assert load_examples("cais/mmlu:all")[0].answer == "D"
    assert calls[-1] == ("cais/mmlu", "all", "test")
    with pytest.raises(ValueError, match="cannot find a question and an answer column"):
        load_examples("someone/else@train")


# --- prompts --------------------------------------------------------------------------


def test_math_prompt_is_the_documented_one():
    expected = (
        "Solve the following math problem step by step. Put your final numeric answer "
        "(without units, currency symbols, or percentage signs) in \\boxed{}, for example: "
        "\\boxed{42}."
    )
    assert expected == MATH_INSTRUCTION
    readme = SHARED / "data" / "README.md"
    if readme.exists():
        assert MATH_INSTRUCTION in " ".join(readme.read_text().split())
    assert (
        build_prompt(Example("1", "  What is 2+2? ", "4")) == MATH_INSTRUCTION + "\n\nWhat is 2+2?"
    )


def test_mc_prompt_lists_options():
    p = build_prompt(Example("1", "Which?", "B", ("red", "green")))
    assert p.endswith("Which?\n\n(A) red\n(B) green")
    assert "\\boxed{}" in p
