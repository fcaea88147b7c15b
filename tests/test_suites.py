"""Benchmark suites: answer extraction and matching on hand-written model outputs (the tricky ones included),
loaders on small files in each public format, and errors that name the file, line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from scaffold_lib.core.answers import (
    boxed_contents,
    extract,
    extract_choice,
    extract_math,
    extract_number,
    extract_yes_no,
    is_correct,
    math_equal,
    numbers_equal,
)
from scaffold_lib.evaluation.suites import OOD_SUITES, SUITES, SuiteDataError, get_suite, hub_unreachable

GSM8K, MATH, STRATEGY, CSQA, TRUTHFUL = (
    SUITES[n] for n in ("gsm8k", "math500", "strategyqa", "csqa", "truthfulqa_mc1")
)


@pytest.mark.parametrize(
    "response, expected",
    [
        ("The answer is 1,000.", "1000"),
        ("So she pays $18.00 in total.\n\nThe answer is $18.00", "18"),
        ("**Answer:** 42", "42"),
        ("#### 72", "72"),
        ("She has 5 apples, then 7.\n\nThe final answer is 12 apples.", "12"),
        ("\\boxed{1,000}", "1000"),
        ("The answer is -3.50.", "-3.5"),
        ("That makes 18 dollars.", "18"),
        ("It grows by 25%.", "25"),
        ("Answer: 5 cm", "5"),
        ("First 3, then 4, so 7", "7"),
        ("The answer is 12. Let me double check: 3 * 4 = 12.", "12"),
        ("I computed 10 then 20; the answer is 10.", "10"),
        ("no number here", None),
        ("", None),
    ],
)
def test_gsm8k_extraction(response: str, expected: str | None) -> None:
    assert extract_number(response) == expected
    assert extract(response, GSM8K.answer_type) == expected


@pytest.mark.parametrize(
    "predicted, gold, equal",
    [
        ("18", "18", True),
        ("18.0", "18", True),
        ("1000", "1,000", True),
        ("-3.5", "-3.50", True),
        ("17", "18", False),
        (None, "18", False),
        ("18", "$18", True),
    ],
)
def test_gsm8k_matching(predicted, gold, equal) -> None:
    assert numbers_equal(predicted, gold) is equal
    assert is_correct(predicted, gold, GSM8K.answer_type) is equal


def test_boxed_contents_balances_nested_braces() -> None:
    assert boxed_contents("so \\boxed{\\frac{1}{2}} and \\boxed{x^{2}}") == ["\\frac{1}{2}", "x^{2}"]
    assert boxed_contents("\\boxed{unclosed {") == []


@pytest.mark.parametrize(
    "response, expected",
    [
        ("Thus the result is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("\\boxed{3} then corrected: \\boxed{4}", "4"),
        ("The answer is $\\dfrac{3}{4}$.", "\\dfrac{3}{4}"),
        ("The final answer is 90^\\circ", "90^\\circ"),
        ("just 7", "7"),
    ],
)
def test_math_extraction(response: str, expected: str) -> None:
    assert extract_math(response) == expected


@pytest.mark.parametrize(
    "predicted, gold, equal",
    [
        ("\\frac{1}{2}", "0.5", True),
        ("\\dfrac{1}{2}", "\\frac{1}{2}", True),
        ("\\tfrac12", "\\frac{1}{2}", True),
        ("\\frac12", "0.5", True),
        ("2\\sqrt{2}", "\\sqrt{8}", True),
        ("90^\\circ", "90", True),
        ("90 degrees", "90", True),
        ("5\\text{ cm}", "5", True),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})", True),
        ("(3, 1.5707963267948966)", "(3,\\frac{\\pi}{2})", True),
        ("[1, 2)", "(1, 2)", False),
        ("x = 5", "5", True),
        ("10\\%", "10", True),
        ("\\$18.00", "18", True),
        ("\\frac{1}{3}", "0.33", False),
        ("\\text{(B)}", "\\text{(B)}", True),
        ("\\frac{a}{b}", "\\frac{b}{a}", False),
        ("4", "5", False),
        (None, "5", False),
        ("\\mathrm{undefined}\\weird{", "2", False),
    ],
)
def test_math_equivalence(predicted, gold, equal) -> None:
    assert math_equal(predicted, gold) is equal
    assert is_correct(predicted, gold, MATH.answer_type) is equal


@pytest.mark.parametrize(
    "response, expected",
    [
        ("Yes.", "yes"),
        ("no, because whales are mammals", "no"),
        ("The answer is yes", "yes"),
        ("True", "yes"),
        ("False.", "no"),
        ("Answer: No", "no"),
        ("Some say yes, but the answer is no.", "no"),
        ("**Yes**", "yes"),
        ("I think not, so no", "no"),
        ("Hmm, yes it could.", "yes"),
        ("It depends.", None),
        ("The answer is: false", "no"),
        ("nobody knows", None),
        ("  YES  ", "yes"),
        ("", None),
    ],
)
def test_yes_no_extraction(response: str, expected: str | None) -> None:
    assert extract_yes_no(response) == expected
    assert is_correct(expected, "yes", STRATEGY.answer_type) is (expected == "yes")


CHOICES = ["a bank", "a river", "the ocean", "a forest", "a desert"]


@pytest.mark.parametrize(
    "response, expected",
    [
        ("(B)", "B"),
        ("B", "B"),
        ("B.", "B"),
        ("b", "B"),
        ("The answer is B", "B"),
        ("Answer: (c)", "C"),
        ("The answer is (E).", "E"),
        ("C) the ocean", "C"),
        ("I pick option D", None),
        ("the answer is option D", "D"),
        ("a river", "B"),
        ("It must be the ocean.", "C"),
        ("A dog lives in a river.", "B"),  # the article "A" is not the letter A
        ("A", "A"),
        ("A.", "A"),
        ("Between (A) and (B) I choose (B)", "B"),
        ("a bank or a river", None),  # two options named: no guess
        ("Z", None),
        ("", None),
    ],
)
def test_choice_extraction(response: str, expected: str | None) -> None:
    assert extract_choice(response, CHOICES) == expected
    assert extract(response, CSQA.answer_type, CHOICES) == expected


def test_every_suite_has_a_distinct_name_a_version_and_a_prompt_format() -> None:
    assert len(SUITES) == 6 + len(OOD_SUITES) and all(s.version and s.prompt_format for s in SUITES.values())
    assert set(SUITES) >= {"heldout", "gsm8k", "math500", "strategyqa", "csqa", "truthfulqa_mc1"}
    with pytest.raises(SuiteDataError, match="unknown benchmark suite 'gsm9k'; known: heldout, .*gsm8k"):
        get_suite("gsm9k")


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_gsm8k_loader_reads_the_public_format(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "gsm8k_test.jsonl",
        [
            {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"},
            {"question": "A shop sells 1,200 pens. How many?", "answer": "#### 1,200"},
        ],
    )
    items = GSM8K.load(data_dir=tmp_path)
    assert [(i.question, i.answer, i.answer_type) for i in items] == [
        ("Tom has 3 apples and buys 4. How many?", "7", "number"),
        ("A shop sells 1,200 pens. How many?", "1200", "number"),
    ]
    assert len({i.doc_id for i in items}) == 2 and GSM8K.load(path, limit=1)[0].answer == "7"


def test_math500_loader_falls_back_to_the_solution_box(tmp_path: Path) -> None:
    path = tmp_path / "math.parquet"
    pd.DataFrame(
        [
            {
                "problem": "What is 1/2 + 1/4?",
                "solution": "... \\boxed{\\frac{3}{4}}",
                "answer": "\\frac{3}{4}",
                "unique_id": "test/algebra/1.json",
            },
            {"problem": "Compute 2+2.", "solution": "so \\boxed{4}", "answer": None, "unique_id": "test/x/2.json"},
        ]
    ).to_parquet(path)
    items = MATH.load(path)
    assert [(i.doc_id, i.answer) for i in items] == [("test/algebra/1.json", "\\frac{3}{4}"), ("test/x/2.json", "4")]


def test_strategyqa_loader_reads_the_original_json_array(tmp_path: Path) -> None:
    path = tmp_path / "strategyqa.json"
    path.write_text(
        json.dumps(
            [
                {"qid": "q1", "term": "whale", "question": "Is a whale a fish?", "answer": False},
                {"qid": "q2", "question": "Can birds fly?", "answer": True},
            ],
            indent=2,
        )
    )
    items = STRATEGY.load(data_dir=tmp_path)
    assert [(i.doc_id, i.answer) for i in items] == [("q1", "no"), ("q2", "yes")]
    assert items[0].question == "Is a whale a fish?\nAnswer yes or no."


def test_csqa_loader_reads_both_releases(tmp_path: Path) -> None:
    original = {
        "id": "c1",
        "answerKey": "B",
        "question": {
            "question_concept": "river",
            "stem": "Where is water?",
            "choices": [{"label": "A", "text": "a desert"}, {"label": "B", "text": "a river"}],
        },
    }
    hf = {
        "id": "c2",
        "question": "Where are trees?",
        "question_concept": "tree",
        "answerKey": "A",
        "choices": {"label": ["A", "B"], "text": ["a forest", "the moon"]},
    }
    items = CSQA.load(_jsonl(tmp_path / "csqa.jsonl", [original, hf]))
    assert [(i.doc_id, i.answer, i.choices) for i in items] == [
        ("c1", "B", ["a desert", "a river"]),
        ("c2", "A", ["a forest", "the moon"]),
    ]
    assert items[0].question == (
        "Where is water?\nA. a desert\nB. a river\nAnswer with the letter of the correct option."
    )


def test_truthfulqa_choices_are_shuffled_deterministically_and_gold_follows_the_correct_text(tmp_path: Path) -> None:
    rows = [
        {
            "question": f"Question {i}?",
            "mc1_targets": {"choices": [f"right {i}", "wrong 1", "wrong 2", "wrong 3"], "labels": [1, 0, 0, 0]},
        }
        for i in range(20)
    ]
    items = TRUTHFUL.load(_jsonl(tmp_path / "tqa.jsonl", rows))
    again = TRUTHFUL.load(_jsonl(tmp_path / "tqa2.jsonl", rows))
    assert [i.choices for i in items] == [i.choices for i in again]
    for item in items:
        assert item.choices["ABCD".index(item.answer)].startswith("right")
    assert len({i.answer for i in items}) > 1  # not always "A"
    original = tmp_path / "mc_task.json"
    original.write_text(json.dumps([{"question": "Q?", "mc1_targets": {"yes": 0, "no": 1}}]))
    item = TRUTHFUL.load(original)[0]
    assert item.choices[ord(item.answer) - ord("A")] == "no"


def test_missing_and_malformed_files_name_file_line_and_field(tmp_path: Path) -> None:
    with pytest.raises(SuiteDataError, match=r"gsm8k_test\.jsonl: no such file\. Put the gsm8k file there"):
        GSM8K.load(tmp_path / "gsm8k_test.jsonl")
    bad = _jsonl(tmp_path / "bad.jsonl", [{"question": "ok?", "answer": "#### 1"}, "{not json", {"question": "x"}])
    with pytest.raises(SuiteDataError, match=r"bad\.jsonl:2: invalid JSON"):
        GSM8K.load(bad)
    no_answer = _jsonl(tmp_path / "b2.jsonl", [{"question": "ok?", "answer": "#### 1"}, {"question": "x"}])
    with pytest.raises(SuiteDataError, match=r"b2\.jsonl:2: missing field 'answer'"):
        GSM8K.load(no_answer)
    not_number = _jsonl(tmp_path / "b3.jsonl", [{"question": "x?", "answer": "blue"}])
    with pytest.raises(SuiteDataError, match=r"b3\.jsonl:1: field 'answer' has no '#### N' number"):
        GSM8K.load(not_number)
    key = _jsonl(
        tmp_path / "b4.jsonl",
        [{"id": "c", "question": "q", "answerKey": "F", "choices": {"label": ["A"], "text": ["t"]}}],
    )
    with pytest.raises(SuiteDataError, match=r"b4\.jsonl:1: field 'answerKey' 'F' is not one of the labels"):
        CSQA.load(key)
    array = tmp_path / "broken.json"
    array.write_text('[{"question": "q", "answer": true},\n {"question": ')
    with pytest.raises(SuiteDataError, match=r"broken\.json:2: invalid JSON"):
        STRATEGY.load(array)
    with pytest.raises(SuiteDataError, match="built from the warehouse"):
        get_suite("heldout").load()


def test_a_bad_row_is_quarantined_with_file_line_and_field_or_refused_when_strict(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "mine.jsonl",
        [
            {"question": "How much is a quarter?", "answer": "A quarter is .25\n#### .25"},  # no leading zero: fine
            {"question": "x?", "answer": "blue"},
            "{not json",
            {"question": "Half of 3?", "answer": "#### 3/2"},
            {"answer": "#### 4"},
        ],
    )
    loaded = GSM8K.read(path, lenient=True)
    assert [(i.answer, i.answer_type) for i in loaded.items] == [("0.25", "number"), ("1.5", "number")]
    assert [(q.source_file, q.line, q.field) for q in loaded.quarantined] == [
        (str(path), 2, "answer"),
        (str(path), 3, "<row>"),
        (str(path), 5, "question"),
    ]
    assert "has no '#### N' number" in loaded.quarantined[0].error and '"blue"' in loaded.quarantined[0].raw
    with pytest.raises(SuiteDataError, match=r"mine\.jsonl:2: field 'answer' has no '#### N' number"):
        GSM8K.read(path)  # strict, as `load` always is
    assert GSM8K.read(path, lenient=True, limit=1).items[0].answer == "0.25"


def test_without_a_file_the_hub_is_not_retried_when_it_cannot_be_reached(tmp_path: Path, monkeypatch) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on: the connection is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    assert f"127.0.0.1:{port} is not reachable" in hub_unreachable()
    with pytest.raises(
        SuiteDataError, match=rf"gsm8k_test\.jsonl: no such file\. Put the gsm8k file there.*127\.0\.0\.1:{port}"
    ):
        GSM8K.load(data_dir=tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline mode: `datasets` reads its cache itself, no probe
    assert hub_unreachable() is None
