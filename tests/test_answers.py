"""The one scorer (`scaffold_lib.core.answers`): teacher verification, decoding and benchmark scoring read answers the
same way. Number answers are checked against lm-evaluation-harness's own GSM8K filters and exact-match metric on the
same outputs (where lm-eval is right we match it; where it is wrong, the test says so); MATH answers against
math-verify."""

from __future__ import annotations

import pytest
from lm_eval.api.metrics import exact_match_hf_evaluate
from lm_eval.filters.extraction import RegexFilter
from math_verify import parse, verify

from scaffold_lib.core.answers import (
    committed_answer,
    extract,
    extract_number,
    gold_answer,
    is_correct,
    last_number,
    math_equal,
    normalise_number,
    numbers_equal,
)
from scaffold_lib.data.problems import Problem
from scaffold_lib.data.teachers import verify as verify_trace

# lm-eval's gsm8k task (lm_eval/tasks/gsm8k/gsm8k.yaml): its two filters and its exact-match settings
STRICT = RegexFilter(regex_pattern=r"#### (\-?[0-9\.\,]+)", group_select=0)
FLEXIBLE = RegexFilter(regex_pattern=r"(-?[$0-9.,]{2,})|(-?[0-9]+)", group_select=-1)
IGNORE = [",", "\\$", "(?s).*#### ", "\\.$"]


def lm_eval_correct(output: str, gold_field: str) -> tuple[bool, bool]:
    """(strict-match, flexible-extract) correctness as lm-eval scores a GSM8K output."""

    def score(filtered: str) -> bool:
        return bool(
            exact_match_hf_evaluate([filtered], [gold_field], regexes_to_ignore=IGNORE, ignore_case=True)["exact_match"]
        )

    return score(list(STRICT.apply([[output]], [{}]))[0][0]), score(list(FLEXIBLE.apply([[output]], [{}]))[0][0])


def ours(output: str, gold_field: str) -> bool:
    gold, answer_type = gold_answer(gold_field)
    return is_correct(extract(output, answer_type), gold, answer_type)


# outputs where lm-eval's strict match (#### N) decides, and we agree with it
AGREE_STRICT = [
    ("She has 5 + 7 = 12 apples.\n#### 12", "… #### 12"),
    ("#### 72\nThen she buys 2 more, so 74.", "#### 72"),  # the marker commits, whatever follows
    ("#### 1,000", "#### 1000"),
    ("#### -3", "#### -3"),
    ("3 + 4 = 7\n#### 8", "#### 7"),  # committed to 8: wrong for both
]
# no marker: lm-eval's flexible extract (the last number) decides, and we agree with it
AGREE_FLEXIBLE = [
    ("First 3, then 4, so 7", "#### 7"),
    ("The total is 1,250 apples", "#### 1250"),
    ("It grows 3 times to 36.", "#### 36"),
    ("She has 5 now and 7 later", "#### 5"),  # last number 7: wrong for both
    ("The answer is 12.", "#### 12"),
]


@pytest.mark.parametrize("output, gold", AGREE_STRICT)
def test_marked_answers_score_as_lm_eval_strict_match(output, gold):
    strict, _ = lm_eval_correct(output, gold)
    assert ours(output, gold) is strict


@pytest.mark.parametrize("output, gold", AGREE_FLEXIBLE)
def test_unmarked_answers_score_as_lm_eval_flexible_extract(output, gold):
    _, flexible = lm_eval_correct(output, gold)
    assert ours(output, gold) is flexible


@pytest.mark.parametrize(
    "output, gold, why",
    [
        (
            "So she pays $18.00.\n#### $18.00",
            "#### 18",
            "exact match compares '18.00' with '18': a value, not a string",
        ),
        (
            "The answer is 6 + 7 = 13. I double-checked 6 and 7.",
            "#### 13",
            "flexible extract takes the last number (7); the answer statement commits to 13",
        ),
        ("The answer is \\boxed{42}, since 40 + 2.", "#### 42", "flexible extract takes the last number (2)"),
        ("The answer is 1,000. That is 10 boxes of 100.", "#### 1000", "the last number is 100"),
    ],
)
def test_where_lm_eval_is_wrong_we_say_so(output, gold, why):
    strict, flexible = lm_eval_correct(output, gold)
    assert not strict and not flexible, why  # lm-eval scores these wrong ...
    assert ours(output, gold), why  # ... and they are right


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is 1,000.", "1000"),
        ("**Answer:** 42", "42"),
        ("**Answer**: 42", "42"),
        ("So we get \\boxed{7} in the end, not 8", "7"),
        ("It costs $18.00", "18"),
        ("The answer is $18.00.", "18"),
        ("Final answer: -3.50", "-3.5"),
        ("First 3 apples, then 5, finally 11 apples", "11"),
        ("The answer is 4. Later 9 was mentioned.", "4"),  # an answer statement beats a later number
        ("answer is 2 ... the answer is 6", "6"),  # the last statement counts
        ("The answer is 6 + 7 = 13.", "13"),  # the statement's result, not its first operand
        ("#### 72 and then 2 more", "72"),
        ("The answer is 1{,}000", "1000"),
        ("No number here at all.", None),
        ("", None),
    ],
)
def test_extract_number(text, expected):
    assert extract_number(text) == expected


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("1,000", "1000"),
        ("$18.00", "18"),
        ("-3.50", "-3.5"),
        ("7.", "7"),
        ("-0", "0"),
        ("abc", None),
        ("1.2.3", None),
        ("1,\\!000", "1000"),
        ("\\$5", "5"),
        ("50%", "50"),
    ],
)
def test_normalise_number(raw, expected):
    assert normalise_number(raw) == expected


def test_last_number_and_number_equality():
    assert last_number("from 3 to 1,250 items") == "1250"
    assert last_number("none") is None
    assert numbers_equal("18.0", "18") and numbers_equal("$1,000", "1000")
    assert not numbers_equal("17", "18") and not numbers_equal(None, "18") and not numbers_equal("abc", "18")
    assert is_correct("Paris.", "paris", "text") and not is_correct("Rome", "paris", "text")


@pytest.mark.parametrize(
    "predicted, gold",
    [
        ("\\pm 2", "\\pm2"),
        ("\\{1,2\\}", "\\{2,1\\}"),
        ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
        ("1,\\!000", "1000"),
        ("\\frac{1}{2}", "0.5"),
        ("2\\sqrt{2}", "\\sqrt{8}"),
        ("\\$18.00", "18"),
    ],
)
def test_math_equivalence_agrees_with_math_verify(predicted, gold):
    assert math_equal(predicted, gold)
    assert verify(parse(f"${gold}$"), parse(f"${predicted}$"))


@pytest.mark.parametrize("predicted, gold", [("\\frac{1}{3}", "0.33"), ("[1, 2)", "(1, 2)"), ("4", "5"), ("", "5")])
def test_math_inequivalence(predicted, gold):
    assert not math_equal(predicted, gold)


def test_teacher_verification_uses_the_same_rule_as_scoring():
    """The case the one scorer exists for: a trace whose answer statement holds an expression."""
    p = Problem("x", "s", "train", "q", "13", "number")
    text = "So 6 + 7 makes sense.\n\nThe answer is 6 + 7 = 13."
    answer, correct = verify_trace(text, p)
    assert (answer, correct) == ("13", True)
    assert committed_answer(text, "number") == extract(text.rsplit("\n\n", 1)[-1], "number") == "13"
    # a separate final answer wins over the thinking
    assert committed_answer("I think 12.", "number", answer_text="The answer is 13.") == "13"


def test_verify_reads_the_last_step():
    p = Problem("x", "s", "train", "q", "12", "number")
    assert verify_trace("So 3 * 4 = 12.\n\nThe answer is 12.", p) == ("12", True)
    assert verify_trace("So 3 * 4 = 12.\n\nThe answer is 13.", p) == ("13", False)
    assert verify_trace("The answer is 5?\n\nNo: 12 in the end, so 12.", p) == ("12", True)
    assert verify_trace("no numbers at all", p) == (None, False)


# --- numbers as people write them, and explicit final answers (docs/scoring.md) -------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        (".25", "0.25"),
        ("-.5", "-0.5"),
        ("007", "7"),
        ("00.10", "0.1"),
        ("3/4", "0.75"),
        ("-3/4", "-0.75"),
        ("2 1/2", "2.5"),
        ("1/3", "1/3"),  # not a terminating decimal: the reduced fraction, compared exactly
        ("6/4", "1.5"),
        ("8/4", "2"),
        ("\\frac{3}{4}", "0.75"),
        ("\\dfrac{1}{3}", "1/3"),
        ("1/0", None),
        ("1/2/3", None),
    ],
)
def test_normalise_number_reads_decimals_and_fractions(raw, expected):
    assert normalise_number(raw) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is .25", "0.25"),
        ("She keeps 3/4 of the cake.", "0.75"),
        ("It takes 2 1/2 hours.", "2.5"),
        ("The answer is \\boxed{\\frac{3}{4}}.", "0.75"),
        ("So the final answer is -\\frac{1}{2}", "-0.5"),
        ("The answer is 12.\n\nCheck: 3 * 4 = 12, and 20 - 8 = 12, so 12 of 20.", "12"),
        ("\\boxed{12} was wrong. The answer is 13.", "13"),  # the last explicit commitment counts
        ("The answer is 13. Checking: \\boxed{12} would leave 1.", "12"),
        ("Let me check my answer. 5 + 7 = 12. Then the total is 15.", "15"),  # "answer" without "is" states nothing
        ("She answered 3 questions, then 5 more: 8 in all.", "8"),
        ("The answer is 5? No: 7 + 5 = 12, so 12.", "12"),  # a question is not a commitment
        ("12/4 = 3", "3"),
    ],
)
def test_extract_number_reads_what_people_write(text, expected):
    assert extract_number(text) == expected


def test_numbers_compare_by_exact_value():
    assert numbers_equal("3/4", "0.75") and numbers_equal(".25", "0.25") and numbers_equal("2 1/2", "5/2")
    assert numbers_equal("1/3", "2/6") and not numbers_equal("0.33", "1/3") and not numbers_equal("0.333", "1/3")
    assert gold_answer("… so .25 of it.\n#### .25") == ("0.25", "number")
    assert gold_answer("#### 3/4") == ("0.75", "number") and gold_answer("#### 1/3") == ("1/3", "number")


def test_a_trace_that_states_its_answer_and_keeps_checking_commits_to_the_statement():
    checked = "So 3 * 4 = 12.\n\nThe answer is 12.\n\nLet me verify: 20 - 8 = 12, out of 20 apples."
    assert committed_answer(checked, "number") == "12"
    p = Problem("x", "s", "train", "q", "12", "number")
    assert verify_trace(checked, p) == ("12", True)
    # without a statement, the last paragraph still decides
    assert committed_answer("I think 5.\n\nNo: 7 + 5 = 12, so 12.", "number") == "12"


# Whole outputs scored three ways: ours, lm-eval's gsm8k filters (strict, flexible) and math-verify on the whole text.
# (output, gold field, ours, lm-eval strict, lm-eval flexible, math-verify); every row where we differ from one of them
# is a deliberate difference listed in docs/scoring.md.
CONVENTIONS = [
    ("#### 72", "#### 72", True, True, True, True),
    ("#### .25", "#### 0.25", True, False, False, True),  # '.25' vs '0.25': strings for lm-eval, values for us
    ("So she pays $18.00.\n#### $18.00", "#### 18", True, False, False, True),
    ("The answer is 3/4.", "#### 0.75", True, False, False, True),  # lm-eval's regexes stop at '/'
    ("It grows by 50%.", "#### 50", True, False, True, True),
    ("It grows by 50%.", "#### 0.5", False, False, False, True),  # math-verify: 50% is also 0.5; for us it is 50
    ("The answer is 12.\n\nCheck: 3 * 4 = 12, so 12 of 20.", "#### 12", True, False, False, True),
    ("#### 12\nThen 15 more questions follow.", "#### 12", True, True, False, False),  # math-verify: the last number
    ("It takes 2 1/2 hours.", "#### 2.5", True, False, False, False),  # math-verify reads '2 1/2' as 3/2
    ("First 3, then 4, so 7", "#### 7", True, False, True, True),
]


@pytest.mark.parametrize("output, gold, expected, strict, flexible, mv", CONVENTIONS)
def test_scoring_conventions_against_lm_eval_and_math_verify(output, gold, expected, strict, flexible, mv):
    assert ours(output, gold) is expected
    assert lm_eval_correct(output, gold) == (strict, flexible)
    gold_value, _ = gold_answer(gold)
    assert bool(verify(parse(f"${gold_value}$"), parse(output))) is mv
