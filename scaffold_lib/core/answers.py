"""The one scorer: which answer a text commits to, and whether it equals the gold answer. Teacher verification,
scaffolded decoding and benchmark scoring all use it, so a trace cannot be "correct" by one rule and scored wrong by
another.

Answer types: `number` (GSM8K style), `math` (MATH style, LaTeX), `yes_no`, `choice` (an option letter) and `text`.

Numbers follow lm-evaluation-harness's GSM8K task where it is right: a `#### N` marker is the commitment (its
strict-match filter), else the last number (its flexible-extract filter); before falling back to the last number
we also honour `\\boxed{}` and an answer statement ("The answer is 6 + 7 = 13." commits to 13). We compare numbers by
value, so `$18.00` equals 18 (lm-eval's exact match after stripping `$`, `,` and a final period does not).
MATH answers are compared with math-verify, the grader open-r1 and lighteval use.
"""

from __future__ import annotations

import re
import threading

ANSWER_TYPES = ("number", "math", "yes_no", "choice", "text")
LETTERS = "ABCDEFGHIJ"

_NUM = r"-?\$?\s?\d[\d,]*(?:\.\d+)?"
_ANSWER_IS = r"(?:final answer|answer)\s*(?:is|:|=)?\s*[:*\s]*"
# an answer statement runs to the end of its sentence: a period before a space or the end, or a line break
_STATEMENT = re.compile(_ANSWER_IS + r"(.+?)(?:\.(?=\s|$)|\n|$)", re.I)
_GSM8K_MARK = re.compile(r"####\s*(" + _NUM + ")")
_GOLD_MARK = re.compile(r"####\s*(.+?)\s*$", re.S)
# compiled once: normalise_number runs several times per trace, millions of times on an imported corpus
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3})")
_SPACED_NUMBER = re.compile(r"-?\s?\d+(?:\.\d+)?")
_PLAIN_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def normalise_number(text: str) -> str | None:
    """'1,000' -> '1000', '$18.00' -> '18', '50%' -> '50', '-3.50' -> '-3.5', '1{,}000' / '1,\\!000' -> '1000';
    None when the text is not one number."""
    t = text.strip().replace("{,}", ",").replace("\\!", "").replace("\\,", "").replace("\\$", "$")
    t = _THOUSANDS_COMMA.sub("", t).replace("$", "").replace("\\%", "").rstrip(".%").strip()
    t = t.replace(" ", "") if _SPACED_NUMBER.fullmatch(t) else t
    if not _PLAIN_NUMBER.fullmatch(t):
        return None
    if "." in t:
        t = t.rstrip("0").rstrip(".")
    return "0" if t in ("-0", "") else t


def gold_answer(raw: str) -> tuple[str, str]:
    """(answer, answer_type) of a gold field: GSM8K's `… #### 1,000` -> ("1000", "number"); free text stays text."""
    text = raw.strip()
    mark = _GOLD_MARK.search(text)
    if mark:
        text = mark.group(1).strip()
    number = normalise_number(text)
    return (number, "number") if number is not None else (text, "text")


def boxed_contents(text: str) -> list[str]:
    """The contents of every `\\boxed{…}` / `\\fbox{…}`, with nested braces balanced (`\\boxed{\\frac{1}{2}}`)."""
    out = []
    for match in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                out.append(text[start:i])
                break
    return out


def _latex_digits(text: str) -> str:
    """LaTeX spellings of a thousands separator (`1{,}000`, `1,\\!000`) as plain commas."""
    return text.replace("{,}", ",").replace("\\!", "") if "{,}" in text or "\\!" in text else text


def last_number(text: str) -> str | None:
    for raw in reversed(re.findall(_NUM, _latex_digits(text))):
        if (value := normalise_number(raw)) is not None:
            return value
    return None


def answer_statement(text: str) -> str | None:
    """What the last "The answer is …" / "Answer: …" sentence says, or None."""
    statements = _STATEMENT.findall(text)
    return statements[-1].strip() if statements else None


def extract_number(text: str) -> str | None:
    """The number a response commits to: `#### N` (first, as lm-eval's strict match), else the last `\\boxed{}` holding a
    number, else the last number of the last answer statement, else the last number anywhere (flexible match)."""
    text = _latex_digits(text)
    mark = _GSM8K_MARK.search(text)
    if mark and (value := normalise_number(mark.group(1))) is not None:
        return value
    for boxed in reversed(boxed_contents(text)):
        if (value := last_number(boxed)) is not None:
            return value
    statement = answer_statement(text)
    if statement is not None and (value := last_number(statement)) is not None:
        return value
    return last_number(text)


def numbers_equal(predicted: str | None, gold: str) -> bool:
    p, g = normalise_number(predicted or ""), normalise_number(gold)
    return p is not None and g is not None and abs(float(p) - float(g)) <= 1e-9 * max(1.0, abs(float(g)))


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
    """What a whole trace commits to: its separate final answer when it has one, else its last paragraph, else
    anything in it (a trace may state its answer early and keep checking)."""
    for part in (answer_text, text.strip().rsplit("\n\n", 1)[-1], text):
        if part and (value := extract(part, answer_type)) is not None:
            return value
    return None
