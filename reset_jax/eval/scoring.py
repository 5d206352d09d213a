"""Answer extraction and comparison for math and multiple-choice tasks.

Math: the answer is the content of the last ``\\boxed{...}`` (braces nested to
any depth), else the text after the last ``#### ``, else the last number in the
text. Both sides are normalised (LaTeX spacing and ``\\text{}``, ``$``,
thousands separators, ``%``, units or words after the number, fractions,
scientific notation, a trailing ``.0``) and compared numerically with a small
relative tolerance when both parse as numbers, else as normalised strings.

Multiple choice: the answer is a letter, found in ``\\boxed{C}``, "the answer
is (B)", "Answer: B", ``**B**``, ``(B)``, or a reply that is only a letter.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction

__all__ = [
    "Score",
    "extract_boxed",
    "extract_choice",
    "extract_math_answer",
    "math_equal",
    "normalize_math_answer",
    "parse_number",
    "score_answer",
]

# The relative tolerance is tight on purpose: GSM8K-style answers are integers
# up to 1e6, and 1e-4 would call 123456 and 123460 equal. 1e-6 still accepts a
# decimal written to 7 significant digits for a fraction (0.3333333 for 1/3).
REL_TOL = 1e-6
ABS_TOL = 1e-9

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def _match_braces(text: str, open_idx: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_idx``, or None if unbalanced."""
    depth = 0
    i = open_idx
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
            # An escaped brace (\{ or \}) is content, not structure.
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """The content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``).

    Nested braces are matched (``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``).
    ``\\boxed 5`` (no braces, one token) is accepted too. A box that is never
    closed (a truncated generation) is ignored, and an earlier complete one is
    used instead.

    Args:
      text: the generated text.

    Returns:
      The box content, stripped, or None if there is no complete box.
    """
    best: str | None = None
    best_pos = -1
    for cmd in _BOX_COMMANDS:
        start = 0
        while True:
            idx = text.find(cmd, start)
            if idx < 0:
                break
            start = idx + len(cmd)
            j = start
            while j < len(text) and text[j] == " ":
                j += 1
            if j < len(text) and text[j] == "{":
                end = _match_braces(text, j)
                if end is None:
                    continue
                content, pos = text[j + 1 : end], idx
            elif j > start and j < len(text):
                # "\boxed 5": TeX takes the next token as the argument.
                m = re.match(r"[^\s$]+", text[j:])
                if m is None:
                    continue
                content, pos = m.group(0).rstrip(".,;"), idx
            else:
                # "\boxedfoo" is another command, or the text ends here.
                continue
            if pos > best_pos:
                best, best_pos = content.strip(), pos
    return best


_NUMBER_RE = re.compile(
    r"""
    (?<![\w.])                       # not the tail of a word or of another number
    -?
    (?:
        \d{1,3}(?:,\d{3})+(?:\.\d+)? # 1,234,567.89
      | \d+(?:\.\d+)?                # 1234.5
      | \.\d+                        # .5
    )
    (?:[eE][+-]?\d+)?                # 1e3, 2.5E-4
    (?:\s*/\s*\d+(?:\.\d+)?(?![\d,]))? # 3/4
    """,
    re.VERBOSE,
)


def _last_number(text: str) -> str | None:
    found = None
    for m in _NUMBER_RE.finditer(text):
        found = m.group(0)
    return found


def extract_math_answer(text: str) -> str | None:
    """The raw (unnormalised) final answer of a math solution.

    Order: the last ``\\boxed{...}``; else the text after the last ``####``
    (GSM8K style) up to the end of its line; else the last number in the text.

    Args:
      text: the generated text.

    Returns:
      The answer string, or None when the text has no box, no ``####`` and no number.
    """
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        line = tail.splitlines()[0].strip() if tail else ""
        if line:
            return line
    cleaned = _strip_latex(text)
    return _last_number(cleaned)


def _replace_frac(s: str) -> str:
    r"""``\frac{a}{b}`` (also ``\dfrac``, ``\tfrac``, ``\frac12``) -> ``(a)/(b)``."""
    out = []
    i = 0
    pattern = re.compile(r"\\[dt]?frac")
    while True:
        m = pattern.search(s, i)
        if m is None:
            out.append(s[i:])
            break
        out.append(s[i : m.start()])
        j = m.end()
        args = []
        for _ in range(2):
            while j < len(s) and s[j] == " ":
                j += 1
            if j < len(s) and s[j] == "{":
                end = _match_braces(s, j)
                if end is None:
                    break
                args.append(_replace_frac(s[j + 1 : end]))
                j = end + 1
            elif j < len(s) and not s[j].isspace():
                # \frac12: single-character arguments.
                args.append(s[j])
                j += 1
            else:
                break
        if len(args) != 2:
            out.append(s[m.start() : j])
            i = j
            continue
        out.append(f"({args[0]})/({args[1]})")
        i = j
    return "".join(out)


def _unwrap_command(s: str, name: str) -> str:
    """Replace ``\\name{x}`` by ``x`` (nested braces matched)."""
    pattern = re.compile(rf"\\{name}\s*{{")
    while True:
        m = pattern.search(s)
        if m is None:
            return s
        open_idx = m.end() - 1
        end = _match_braces(s, open_idx)
        if end is None:
            return s[: m.start()] + s[open_idx + 1 :]
        s = s[: m.start()] + s[open_idx + 1 : end] + s[end + 1 :]


def _strip_latex(s: str) -> str:
    """LaTeX markup that never changes a value: spacing, text wrappers, dollars."""
    for name in ("text", "textbf", "mathrm", "mathbf", "textit", "mbox", "operatorname"):
        s = _unwrap_command(s, name)
    s = s.replace("\\left", "").replace("\\right", "")
    # Thin spaces and friends; "{,}" is the LaTeX thousands separator.
    s = s.replace("{,}", ",")
    s = re.sub(r"\\[!,;:> ]", "", s)
    s = s.replace("\\quad", " ").replace("\\qquad", " ")
    s = s.replace("\\$", "").replace("$", "")
    s = s.replace("\\%", "%")
    s = re.sub(r"\^\s*\{?\\circ\}?", "", s)  # degrees
    s = s.replace("\\cdot", "*").replace("\\times", "*")
    s = s.replace("−", "-").replace("–", "-")  # unicode minus / en dash
    return s


def normalize_math_answer(answer: str) -> str:
    """A canonical string for a math answer.

    Numbers come out in a plain decimal form (``"1,000"``, ``"\\$1000.00"``,
    ``"1e3"``, ``"1000 dollars"`` -> ``"1000"``; ``"\\frac{1}{2}"`` and
    ``"1/2"`` -> ``"0.5"``; ``"25\\%"`` -> ``"25"``). Anything that is not a
    number is returned with LaTeX spacing and wrappers removed, lower-cased and
    with whitespace dropped, so that string comparison is not fooled by markup.

    Args:
      answer: an answer as extracted by :func:`extract_math_answer`, or a gold answer.

    Returns:
      The normalised string.
    """
    value = parse_number(answer)
    if value is not None:
        return _format_number(value)
    s = _replace_frac(_strip_latex(answer))
    s = re.sub(r"\s+", "", s).strip(".").lower()
    return s


def _format_number(x: float) -> str:
    if math.isfinite(x) and x == int(x) and abs(x) < 1e16:
        return str(int(x))
    return repr(x)


_FRAC_SIMPLE_RE = re.compile(r"^\(?(-?[\d.]+)\)?/\(?(-?[\d.]+)\)?$")
_PLAIN_RE = re.compile(r"^-?(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?$", re.IGNORECASE)


def _to_float(s: str) -> float | None:
    s = s.replace(",", "")
    if s.startswith("-") and s[1:2] == "(":
        # "-(3)/(4)" from "-\frac{3}{4}": the sign sits outside the fraction.
        v = _to_float(s[1:])
        return None if v is None else -v
    if _PLAIN_RE.match(s):
        return float(s)
    m = _FRAC_SIMPLE_RE.match(s)
    if m:
        num, den = m.group(1), m.group(2)
        if _PLAIN_RE.match(num) and _PLAIN_RE.match(den) and float(den) != 0:
            # Fraction keeps 1/3 exact until the last step.
            return float(Fraction(num) / Fraction(den))
    return None


def parse_number(answer: str) -> float | None:
    """The numeric value of an answer, or None if it is not a single number.

    Accepts thousands separators (``1,234``, ``1{,}234``), ``$`` and ``\\$``,
    a percent sign (``25%`` is 25: prompts ask for the number without it),
    units or words after the number (``18 dollars``, ``5\\text{ cm}``),
    a leading ``x =``, ``\\frac{a}{b}`` / ``a/b``, a mixed number
    (``2\\frac{1}{2}``), ``1e3`` and ``1.5 \\times 10^3``.

    Args:
      answer: the answer text.

    Returns:
      The value as a float, or None.
    """
    s = _strip_latex(answer).strip()
    # "x = 5", "Total: 5": keep what follows the last "=" or ":".
    s = re.split(r"=|:(?!\d)", s)[-1].strip()
    s = s.replace("%", "").strip()
    # Scientific notation written in LaTeX: 1.5 * 10^{3}.
    m = re.fullmatch(r"(-?[\d.,]+)\s*\*\s*10\^\{?(-?\d+)\}?", s)
    if m:
        base = _to_float(m.group(1))
        return None if base is None else base * 10.0 ** int(m.group(2))
    # Mixed number "2\frac{1}{2}" (before \frac is rewritten into a division).
    m = re.fullmatch(r"(-?\d+)\s*\\[dt]?frac\s*\{(\d+)\}\s*\{(\d+)\}", s)
    if m and int(m.group(3)) != 0:
        whole = int(m.group(1))
        frac = Fraction(int(m.group(2)), int(m.group(3)))
        return float(whole - frac if whole < 0 else whole + frac)
    s = _replace_frac(s)
    s = s.replace("{", "").replace("}", "").replace(" ", "")
    s = s.rstrip(".")
    if not s:
        return None
    v = _to_float(s)
    if v is not None:
        return v
    if s.startswith("(") and s.endswith(")") and _to_float(s[1:-1]) is not None:
        return _to_float(s[1:-1])
    # Units or words after the number: "18dollars", "5cm", "3/4cup", "12pm".
    # A unit may carry a power ("cm^2"), but digits after letters otherwise
    # mean a second number ("3and4"), which is not a single value.
    m = re.match(
        r"^(-?(?:\(?[\d.,]+\)?(?:/\(?[\d.]+\)?)?)(?:e[+-]?\d+)?)(?:[a-z'’]+\.?(?:\^\d)?)+$",
        s,
        re.IGNORECASE,
    )
    if m:
        head = m.group(1)
        tail = s[len(head) :]
        # "1e3" would otherwise lose its exponent to the unit rule.
        if re.fullmatch(r"[eE][+-]?\d+", tail):
            return None
        return _to_float(head)
    return None


def math_equal(
    pred: str | None, gold: str, *, rel_tol: float = REL_TOL, abs_tol: float = ABS_TOL
) -> bool:
    """Whether a predicted math answer equals the gold one.

    Numeric when both parse (:func:`parse_number`), with ``math.isclose``
    tolerances; otherwise the :func:`normalize_math_answer` strings must match.

    Args:
      pred: extracted prediction (None counts as wrong).
      gold: gold answer.
      rel_tol: relative tolerance for numeric comparison.
      abs_tol: absolute tolerance for numeric comparison.

    Returns:
      True when they agree.
    """
    if pred is None:
        return False
    a, b = parse_number(pred), parse_number(gold)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=rel_tol, abs_tol=abs_tol)
    if (a is None) != (b is None):
        return False
    return normalize_math_answer(pred) == normalize_math_answer(gold)


def _letters(n_choices: int) -> str:
    if not 2 <= n_choices <= 26:
        raise ValueError(f"n_choices must be in [2, 26], got {n_choices}")
    return "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:n_choices]


def extract_choice(text: str, n_choices: int = 4) -> str | None:
    """The chosen letter of a multiple-choice reply.

    Tried in order, each time taking the *last* match: ``\\boxed{C}`` (also
    ``\\boxed{(C)}``, ``\\boxed{\\text{C}}``); "answer is (B)" / "Answer: B" /
    "answer: **B**"; a bold letter ``**B**``; a parenthesised letter ``(B)``;
    a reply that is only a letter ("B", "B.", "B)"). A bare capital letter
    inside prose is never taken ("A train leaves...").

    Args:
      text: the generated text.
      n_choices: how many options there are (letters ``A`` onwards).

    Returns:
      The upper-case letter, or None.
    """
    letters = _letters(n_choices)
    upper = f"[{letters}]"
    either = f"[{letters}{letters.lower()}]"

    boxed = extract_boxed(text)
    if boxed is not None:
        inner = _strip_latex(boxed).strip().strip("()*. ")
        if re.fullmatch(either, inner):
            return inner.upper()
        m = re.match(rf"^\(?({either})[).:]\s", inner + " ")
        if m:
            return m.group(1).upper()

    # Only capital letters outside a box or parentheses: "the answer is a
    # fraction" must not read as choice A.
    patterns = [
        rf"(?i:answer|option|choice)(?:\s+(?i:is|would be|should be))?\s*[:：]?"
        rf"[\s*_(\[]*({upper})(?![A-Za-z0-9])",
        rf"\*\*\s*\(?({upper})\)?(?:[.:)]|\*\*)",
        rf"\(({either})\)",
    ]
    for pat in patterns:
        found = None
        for m in re.finditer(pat, text):
            found = m.group(1)
        if found is not None:
            return found.upper()

    m = re.fullmatch(rf"\s*\(?({either})[).:]?\s*", text)
    if m:
        return m.group(1).upper()
    return None


@dataclass(frozen=True)
class Score:
    """One graded prediction.

    Attributes:
      extracted: the answer found in the prediction (None if none was found).
      correct: whether it matches the gold answer.
    """

    extracted: str | None
    correct: bool


def score_answer(prediction: str, gold: str, *, task: str = "math", n_choices: int = 4) -> Score:
    """Extract the answer from ``prediction`` and compare it to ``gold``.

    Args:
      prediction: the generated text.
      gold: the gold answer (a number/expression for math, a letter for ``"mc"``).
      task: ``"math"`` or ``"mc"``.
      n_choices: number of options for ``"mc"``.

    Returns:
      A :class:`Score`.
    """
    if task == "math":
        extracted = extract_math_answer(prediction)
        return Score(extracted, math_equal(extracted, gold))
    if task == "mc":
        letter = extract_choice(prediction, n_choices)
        return Score(letter, letter is not None and letter == gold.strip().upper())
    raise ValueError(f"unknown task {task!r}; expected 'math' or 'mc'")
