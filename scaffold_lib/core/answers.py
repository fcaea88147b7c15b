"""Answer extraction and matching, shared by teacher verification and student scoring."""

from __future__ import annotations

import re
import string

_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"
_PATTERNS = (
    re.compile(r"\\boxed\{([^{}]*)\}"),
    re.compile(r"answer\s*(?:is|:)\s*[:*\s]*(" + _NUMBER + ")", re.I),
    re.compile(r"\*\*answer:?\*\*:?\s*(" + _NUMBER + ")", re.I),
)
_ANY_NUMBER = re.compile(_NUMBER)


def normalise_number(text: str) -> str | None:
    """'1,000' -> '1000', '$18.00' -> '18', '-3.50' -> '-3.5'; None when it is not a number."""
    t = text.strip().rstrip(".").replace(",", "").replace("$", "")
    if not re.fullmatch(r"-?\d+(?:\.\d+)?", t):
        return None
    if "." in t:
        t = t.rstrip("0").rstrip(".")
    return "0" if t in ("-0", "") else t


def extract_final_answer(text: str) -> str | None:
    """The answer a trace or generation commits to: an explicit answer phrase, else the last number."""
    for pattern in _PATTERNS:
        matches = pattern.findall(text)
        if matches:
            raw = matches[-1]
            return normalise_number(raw) or raw.strip()
    numbers = _ANY_NUMBER.findall(text)
    return normalise_number(numbers[-1]) if numbers else None


def last_number(text: str) -> str | None:
    numbers = _ANY_NUMBER.findall(text)
    return normalise_number(numbers[-1]) if numbers else None


def answers_match(predicted: str | None, gold: str, answer_type: str = "number") -> bool:
    if predicted is None:
        return False
    if answer_type == "number":
        p, g = normalise_number(predicted), normalise_number(gold)
        return p is not None and g is not None and float(p) == float(g)
    strip = str.maketrans("", "", string.punctuation)
    return predicted.translate(strip).strip().casefold() == gold.translate(strip).strip().casefold()
