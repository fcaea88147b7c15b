"""Error analysis of wrong answers to the synthetic word problems: what went wrong, read from the equations a
response writes (`a op n = r`) against the problem's own operations and distractor facts.

Categories, first match wins: `no_answer` (nothing extractable, or cut off by a decoding cap), `used_distractor` (an
equation takes a number only a distractor sentence gives), `arithmetic_slip` (an equation whose result is wrong),
`stopped_early` (fewer operations carried out than the problem has), `wrong_operation` (the right number of correct
equations, but not the problem's operations in its order), `other`. Where can a scaffold help? Signals about the flow
(a check after a product, "Wait" after a slip, setting a distractor aside) bear on slips and distractors; they
cannot supply arithmetic the student does not have.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

from scaffold_lib.data.synthetic import parse_question

CATEGORIES = ("no_answer", "used_distractor", "arithmetic_slip", "stopped_early", "wrong_operation", "other")
_EQUATION = re.compile(r"(-?\d+)\s*([-+*/×x÷])\s*(\d+)\s*=\s*(-?\d+)")
_SYMBOL = {"+": "add", "-": "sub", "*": "mul", "×": "mul", "x": "mul", "/": "div", "÷": "div"}
_APPLY = {"add": lambda a, n: a + n, "sub": lambda a, n: a - n, "mul": lambda a, n: a * n, "div": lambda a, n: a // n}


def categorise(question: str, response: str, extracted: str | None, stopped_by: str | None) -> str | None:
    """The category of a wrong answer to a synthetic problem, or None when the question is not one of ours."""
    parsed = parse_question(question)
    if parsed is None:
        return None
    if extracted is None or stopped_by in ("max_tokens", "max_steps"):
        return "no_answer"
    ops = [(s.kind, s.n) for s in parsed.steps if s.kind not in ("start", "distractor")]
    own_numbers = {s.n for s in parsed.steps if s.kind != "distractor"}
    distractor_numbers = {s.n for s in parsed.steps if s.kind == "distractor"} - own_numbers
    equations = [(int(a), _SYMBOL[sym], int(n), int(r)) for a, sym, n, r in _EQUATION.findall(response)]
    if any(n in distractor_numbers or a in distractor_numbers for a, _, n, _ in equations):
        return "used_distractor"
    if any(_APPLY[op](a, n) != r for a, op, n, r in equations):
        return "arithmetic_slip"
    if len(equations) < len(ops):
        return "stopped_early"
    if [(op, n) for _, op, n, _ in equations[: len(ops)]] != ops:
        return "wrong_operation"
    return "other"


def error_table(rows: Iterable[dict]) -> dict[str, dict[str, int]]:
    """arm -> category -> count, over wrong answers (`rows`: arm, question, response, extracted, stopped_by,
    correct)."""
    table: dict[str, Counter] = {}
    for r in rows:
        if r["correct"]:
            continue
        category = categorise(r["question"], r["response"] or "", r["extracted"], r["stopped_by"])
        if category is not None:
            table.setdefault(r["arm"], Counter())[category] += 1
    return {arm: {c: counts.get(c, 0) for c in CATEGORIES} for arm, counts in table.items()}


def error_table_markdown(table: dict[str, dict[str, int]]) -> str:
    arms = sorted(table)
    lines = ["| wrong answers | " + " | ".join(arms) + " |", "|---|" + "---:|" * len(arms)]
    totals = {arm: sum(table[arm].values()) or 1 for arm in arms}
    for category in CATEGORIES:
        cells = [f"{table[arm][category]} ({100 * table[arm][category] / totals[arm]:.0f} %)" for arm in arms]
        lines.append(f"| {category} | " + " | ".join(cells) + " |")
    lines.append("| all | " + " | ".join(str(sum(table[arm].values())) for arm in arms) + " |")
    return "\n".join(lines)
