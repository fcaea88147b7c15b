"""The one scorer: which answer a text commits to, and whether it equals the gold answer. Teacher verification,
scaffolded decoding and benchmark scoring all use it, so a trace cannot be "correct" by one rule and scored wrong by
another.

Answer types: `number` (GSM8K style), `math` (MATH style, LaTeX), `yes_no`, `choice` (an option letter) and `text`.

Numbers follow lm-evaluation-harness's GSM8K task where it is right: a `#### N` marker is the commitment (its
strict-match filter), else the last number (its flexible-extract filter). Before falling back to the last number we
honour an explicit final-answer statement: the last `\\boxed{}` or "The answer is …" sentence ("The answer is 6 + 7 =
13." commits to 13), so numbers mentioned after it (a check, a recap) do not replace it. Numbers are read as people
write them (`.25`, `1,000`, `$18.00`, `50%`, `3/4`, `2 1/2`, `\\frac{3}{4}`) and compared by value, so `$18.00`
equals 18 (lm-eval's exact match after stripping `$`, `,` and a final period does not). MATH answers are compared
with math-verify, the grader open-r1 and lighteval use. docs/scoring.md lists every deliberate difference from both.
"""

from __future__ import annotations

import re
import threading
from decimal import Decimal
from fractions import Fraction

ANSWER_TYPES = ("number", "math", "yes_no", "choice", "text")
LETTERS = "ABCDEFGHIJ"

# a number as written: `-$1,234.50`, `.25`, `3/4`, `2 1/2` (a mixed number before a plain one: `2 1/2` is 2.5)
_NUM = r"-?\$?\s?(?:\d+\s+\d+/\d+|(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:/\d+)?)"
# an explicit statement needs its verb or colon: "answer" alone ("let me check my answer") commits to nothing
_ANSWER_IS = r"\b(?:final answer|answer)\b(?:\s+to\s+[^.:\n]{1,60}?)?\s*\**\s*(?:is|was|would be|will be|:|=)\s*[:*\s]*"
# an answer statement runs to the end of its sentence (a period, "!" or "?" before a space or the end, or a line
# break); the terminator is captured so that a question ("The answer is 5?") is not taken as a commitment
_STATEMENT = re.compile(_ANSWER_IS + r"(.+?)([.!?](?=\s|$)|\n|$)", re.I)
_GSM8K_MARK = re.compile(r"####\s*(" + _NUM + ")")
_GOLD_MARK = re.compile(r"####\s*(.+?)\s*$", re.S)
# compiled once: normalise_number runs several times per trace, millions of times on an imported corpus
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3})")
_SPACED_NUMBER = re.compile(r"-?\s?(?:\d+(?:\.\d+)?|\.\d+)")
_PLAIN_NUMBER = re.compile(r"-?(?:\d+(?:\.\d+)?|\.\d+)")
_FRACTION = re.compile(r"(-?)(?:(\d+)\s+)?(\d+)/(\d+)")
_LATEX_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*(\d+)\s*\}\s*\{\s*(\d+)\s*\}")
_MAX_DIGITS = 4300  # Python's int() limit for decimal strings; a longer "number" is not an answer


def _canonical(value: Fraction) -> str:
    """A value as one string: an integer, a terminating decimal ('0.75'), else the reduced fraction ('1/3')."""
    den = value.denominator
    while den % 2 == 0:
        den //= 2
    while den % 5 == 0:
        den //= 5
    if den != 1:
        return f"{value.numerator}/{value.denominator}"
    text = format(Decimal(value.numerator) / Decimal(value.denominator), "f")
    text = text.rstrip("0").rstrip(".") if "." in text else text
    return "0" if text in ("-0", "") else text


def normalise_number(text: str) -> str | None:
    """'1,000' -> '1000', '$18.00' -> '18', '50%' -> '50', '-3.50' -> '-3.5', '.25' -> '0.25', '3/4' -> '0.75',
    '2 1/2' -> '2.5', '1/3' -> '1/3', '\\frac{3}{4}' -> '0.75', '1{,}000' / '1,\\!000' -> '1000'; None when the text
    is not one number."""
    t = _latex_digits(text.strip().replace("\\,", "").replace("\\$", "$"))
    t = _THOUSANDS_COMMA.sub("", t).replace("$", "").replace("\\%", "").rstrip(".%").strip()
    if len(t) > _MAX_DIGITS:
        return None
    if fraction := _FRACTION.fullmatch(t):
        sign, whole, num, den = fraction.groups()
        if int(den) == 0:
            return None
        value = int(whole or 0) + Fraction(int(num), int(den))
        return _canonical(-value if sign else value)
    t = t.replace(" ", "") if _SPACED_NUMBER.fullmatch(t) else t
    if not _PLAIN_NUMBER.fullmatch(t):
        return None
    # string operations, not Fraction: this is the hot path. One spelling per value: '007' is 7, '.50' is 0.5, '-0' is 0
    whole, _, frac = t.lstrip("-").partition(".")
    whole, frac = whole.lstrip("0") or "0", frac.rstrip("0")
    value = whole + ("." + frac if frac else "")
    return "-" + value if t.startswith("-") and value != "0" else value


def gold_answer(raw: str) -> tuple[str, str]:
    """(answer, answer_type) of a gold field: GSM8K's `… #### 1,000` -> ("1000", "number"); free text stays text."""
    text = raw.strip()
    mark = _GOLD_MARK.search(text)
    if mark:
        text = mark.group(1).strip()
    number = normalise_number(text)
    return (number, "number") if number is not None else (text, "text")


def _boxes(text: str) -> list[tuple[int, str]]:
    """(position, contents) of every `\\boxed{…}` / `\\fbox{…}`, nested braces balanced (`\\boxed{\\frac{1}{2}}`)."""
    out = []
    for match in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                out.append((match.start(), text[start:i]))
                break
    return out


def boxed_contents(text: str) -> list[str]:
    """The contents of every `\\boxed{…}` / `\\fbox{…}`, with nested braces balanced (`\\boxed{\\frac{1}{2}}`)."""
    return [contents for _, contents in _boxes(text)]


def _latex_digits(text: str) -> str:
    """LaTeX spellings of numbers as plain text: a thousands separator (`1{,}000`, `1,\\!000`) as a comma, a
    fraction of two integers (`\\frac{3}{4}`, `\\dfrac`, `\\tfrac`) as `3/4`."""
    if "{,}" in text or "\\!" in text:
        text = text.replace("{,}", ",").replace("\\!", "")
    return _LATEX_FRAC.sub(r"\1/\2", text) if "frac" in text else text


def last_number(text: str) -> str | None:
    for raw in reversed(re.findall(_NUM, _latex_digits(text))):
        if (value := normalise_number(raw)) is not None:
            return value
    return None


def _statements(text: str) -> list[tuple[int, str]]:
    """(position, what it says) of every "The answer is …" / "Answer: …" sentence that is not a question."""
    return [(m.start(), m.group(1).strip()) for m in _STATEMENT.finditer(text) if m.group(2) != "?"]


def answer_statement(text: str) -> str | None:
    """What the last "The answer is …" / "Answer: …" sentence says, or None."""
    statements = _statements(text)
    return statements[-1][1] if statements else None


def has_commitment(text: str) -> bool:
    """Whether the text states its answer explicitly: `#### N`, `\\boxed{}` or an answer statement."""
    return bool(_GSM8K_MARK.search(text) or "\\boxed" in text or "\\fbox" in text or _statements(text))


def explicit_number(text: str) -> str | None:
    """The number a text explicitly commits to, or None: `#### N` (the first, as lm-eval's strict match), else the
    last `\\boxed{}` or answer statement holding a number (its last number: "The answer is 6 + 7 = 13." is 13)."""
    text = _latex_digits(text)
    mark = _GSM8K_MARK.search(text)
    if mark and (value := normalise_number(mark.group(1))) is not None:
        return value
    for _, said in sorted(_boxes(text) + _statements(text), reverse=True):
        if (value := last_number(said)) is not None:
            return value
    return None


def extract_number(text: str) -> str | None:
    """The number a response commits to: an explicit commitment (`explicit_number`), numbers mentioned after it
    notwithstanding; else the last number anywhere (lm-eval's flexible match)."""
    value = explicit_number(text)
    return value if value is not None else last_number(text)


def numbers_equal(predicted: str | None, gold: str) -> bool:
    """Equal by value (exact fractions: '3/4' equals '0.75', '1/3' does not equal '0.33')."""
    p, g = normalise_number(predicted or ""), normalise_number(gold)
    if p is None or g is None:
        return False
    p_value, g_value = Fraction(p), Fraction(g)
    return abs(p_value - g_value) <= Fraction(1, 10**9) * max(1, abs(g_value))


def extract_math(text: str) -> str | None:
    """A MATH answer: the last `\\boxed{}`, else the last answer statement, else the number the text ends on."""
    boxed = boxed_contents(text)
    if boxed:
        return boxed[-1].strip()
    statement = answer_statement(text)
    if statement is not None:
        return statement.strip("$ ")
    return extract_number(text)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def math_equal(predicted: str | None, gold: str) -> bool:
    """Equivalence as math-verify decides it (fractions, roots, `\\pm`, sets, tuples, intervals, matrices, units)."""
    if predicted is None or not predicted.strip():
        return False
    if normalise_number(predicted) is not None and normalise_number(gold) is not None:
        return numbers_equal(predicted, gold)
    from math_verify import parse, verify

    # math-verify's timeouts use SIGALRM, which only the main thread may set
    timeout = 5 if _in_main_thread() else None

    def wrap(s: str) -> str:
        return s if "$" in s or "\\(" in s else f"${s}$"

    try:
        gold_parsed = parse(wrap(gold), parsing_timeout=timeout)
        pred_parsed = parse(wrap(predicted), parsing_timeout=timeout)
        return bool(gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=timeout))
    except Exception:  # anything it cannot read is simply not equal: scoring never raises on a model's output
        return False


_YES_NO = {"yes": "yes", "no": "no", "true": "yes", "false": "no"}


def extract_yes_no(text: str) -> str | None:
    """The answer statement's yes/no (or true/false), else a leading yes/no, else the last one mentioned."""
    stated = re.findall(_ANSWER_IS + r"\W*(yes|no|true|false)\b", text, re.I)
    if stated:
        return _YES_NO[stated[-1].lower()]
    leading = re.match(r"\W*(yes|no|true|false)\b", text, re.I)
    if leading:
        return _YES_NO[leading.group(1).lower()]
    mentions = re.findall(r"\b(yes|no)\b", text, re.I)
    return _YES_NO[mentions[-1].lower()] if mentions else None


def extract_choice(text: str, choices: list[str] | None = None) -> str | None:
    """The option letter: an answer statement (`answer is (B)`), a letter standing alone (`B`, `(b)`, `B.`), a
    parenthesised letter, else the one option whose text appears. A sentence's article "A" is not the letter A."""
    letters = LETTERS[: len(choices)] if choices else LETTERS[:5]
    one = f"[{letters}{letters.lower()}]"
    patterns = (
        _ANSWER_IS + r"(?:option\s*)?\(?(" + one + r")\)?(?![\w'])",
        r"^\W*\(?(" + one + r")\)?[.):]?\s*$",
        r"^\(?(" + one + r")[.)]\s",
        r"\((" + one + r")\)",
    )
    for pattern in patterns:
        found = re.findall(pattern, text.strip(), re.I | re.M if pattern.startswith("^") else re.I)
        if found:
            return found[-1].upper()
    if choices:
        lowered = text.casefold()
        hits = {LETTERS[i] for i, c in enumerate(choices) if c.strip() and c.strip().casefold() in lowered}
        if len(hits) == 1:
            return hits.pop()
    return None


def _plain(text: str) -> str:
    return re.sub(r"[^\w\s]", "", text).strip().casefold()


def extract(text: str, answer_type: str, choices: list[str] | None = None) -> str | None:
    """The answer `text` commits to, read the way `answer_type` answers are written."""
    if answer_type == "number":
        return extract_number(text)
    if answer_type == "math":
        return extract_math(text)
    if answer_type == "yes_no":
        return extract_yes_no(text)
    if answer_type == "choice":
        return extract_choice(text, choices)
    if answer_type == "text":
        return answer_statement(text) or (text.strip().splitlines() or [None])[-1]
    raise ValueError(f"unknown answer type {answer_type!r}; expected one of {ANSWER_TYPES}")


def is_correct(extracted: str | None, gold: str, answer_type: str) -> bool:
    if extracted is None:
        return False
    if answer_type == "number":
        return numbers_equal(extracted, gold)
    if answer_type == "math":
        return math_equal(extracted, gold)
    return _plain(extracted) == _plain(gold)


def committed_answer(text: str, answer_type: str, answer_text: str | None = None) -> str | None:
    """What a whole trace commits to: its separate final answer when it has one; else its explicit statement (a trace
    may state its answer and keep checking: the numbers of the check are not the answer); else its last paragraph;
    else anything in it."""
    parts = (answer_text, text if has_commitment(text) else None, text.strip().rsplit("\n\n", 1)[-1], text)
    for part in parts:
        if part and (value := extract(part, answer_type)) is not None:
            return value
    return None
