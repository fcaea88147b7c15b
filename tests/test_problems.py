"""Problems: the seeded generator (determinism, growth, split by id, solvable) and the file loader (errors, lenient)."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scaffold_lib.core.answers import gold_answer as normalise_gold_answer
from scaffold_lib.core.ids import content_id
from scaffold_lib.data.problem_files import FieldMap, ProblemFileError, load_problem_file
from scaffold_lib.data.problems import SplitConfig, make_problem_id, split_of
from scaffold_lib.data.synthetic import (
    SYNTHETIC_SOURCE,
    GeneratorConfig,
    generate_problems,
    parse_question,
    skeleton_of,
    solve,
)

# ----------------------------------------------------------------------------------------------------------
# generator


def test_same_seed_same_problems():
    a = generate_problems(GeneratorConfig(n_problems=60, seed=7))
    b = generate_problems(GeneratorConfig(n_problems=60, seed=7))
    assert a == b
    assert len(a) == 60
    assert len({p.problem_id for p in a}) == 60  # distinct


def test_different_seed_different_problems():
    a = generate_problems(GeneratorConfig(n_problems=60, seed=1))
    b = generate_problems(GeneratorConfig(n_problems=60, seed=2))
    shared = {p.problem_id for p in a} & {p.problem_id for p in b}
    assert len(shared) <= 3  # a few tiny problems may coincide, not the set


def test_ith_problem_stable_when_n_grows():
    small = generate_problems(GeneratorConfig(n_problems=30, seed=3))
    large = generate_problems(GeneratorConfig(n_problems=120, seed=3))
    assert large[:30] == small


def test_problem_fields_and_ids_are_content_hashes():
    for p in generate_problems(GeneratorConfig(n_problems=40, seed=0)):
        assert p.source == SYNTHETIC_SOURCE
        assert p.answer_type == "number"
        assert p.problem_id == make_problem_id(p.question, p.answer)
        assert len(p.problem_id) == 16 and int(p.problem_id, 16) >= 0
        assert p.question.endswith("?")
        assert p.group_id == skeleton_of(p.question) and p.group_id.startswith("skeleton:start")
        assert set(p.as_row()) == {
            "problem_id",
            "source",
            "split",
            "question",
            "answer",
            "answer_type",
            "group_id",
            "solution",
        }


def test_skeleton_ignores_names_items_phrasing_and_distractors():
    a = "Ava has 5 apples. Ben is 9 years old. Ava buys 3 more apples. How many apples does Ava have now?"
    b = "Omar owns 5 coins. Omar finds 3 more coins. How many coins does Omar have in the end?"
    c = "Omar owns 5 coins. Omar finds 4 more coins. How many coins does Omar have in the end?"
    assert skeleton_of(a) == skeleton_of(b) == "skeleton:start5,add3"
    assert skeleton_of(c) != skeleton_of(a)


def test_split_depends_only_on_the_group():
    split = SplitConfig(validation_fraction=0.1, test_fraction=0.25, seed=3)
    problems = generate_problems(GeneratorConfig(n_problems=400, seed=11), split)
    for p in problems:
        assert p.split == split_of(p.group_id, split)
    # every problem of a group lands in one split: no test item is a reworded training item
    by_group: dict[str, set[str]] = {}
    for p in problems:
        by_group.setdefault(p.group_id, set()).add(p.split)
    assert all(len(splits) == 1 for splits in by_group.values())
    assert any(len([q for q in problems if q.group_id == g]) > 1 for g in by_group)  # groups do repeat
    # the same problems drawn as part of a larger set keep their split; the seed moves groups between splits
    larger = {p.problem_id: p.split for p in generate_problems(GeneratorConfig(n_problems=900, seed=11), split)}
    assert all(larger[p.problem_id] == p.split for p in problems)
    reseeded = {
        p.problem_id: p.split
        for p in generate_problems(GeneratorConfig(n_problems=400, seed=11), split.model_copy(update={"seed": 4}))
    }
    assert any(reseeded[p.problem_id] != p.split for p in problems)


@pytest.mark.parametrize("validation, test", [(0.1, 0.2), (0.0, 0.5), (0.2, 0.1)])
def test_split_fractions_roughly_respected_over_groups(validation, test):
    groups = [f"group:{i}" for i in range(4000)]
    cfg = SplitConfig(validation_fraction=validation, test_fraction=test)
    counts = Counter(split_of(g, cfg) for g in groups)
    assert abs(counts["test"] / 4000 - test) < 0.03 and abs(counts["validation"] / 4000 - validation) < 0.03


@pytest.mark.parametrize(
    "validation, test, expected", [(0.0, 0.0, {"train"}), (0.0, 1.0, {"test"}), (1.0, 0.0, {"validation"})]
)
def test_split_fraction_extremes(validation, test, expected):
    cfg = SplitConfig(validation_fraction=validation, test_fraction=test)
    assert {p.split for p in generate_problems(GeneratorConfig(n_problems=100, seed=0), cfg)} == expected


def test_split_fractions_must_leave_room():
    with pytest.raises(ValueError, match="must not exceed 1"):
        SplitConfig(validation_fraction=0.6, test_fraction=0.5)


@pytest.mark.parametrize(
    "cfg",
    [
        GeneratorConfig(n_problems=300, seed=0),
        GeneratorConfig(n_problems=300, seed=9, min_ops=1, max_ops=1, distractor_prob=0.0),
        GeneratorConfig(n_problems=300, seed=4, min_ops=5, max_ops=8, distractor_prob=1.0, max_factor=5, max_value=500),
    ],
)
def test_every_generated_problem_is_solved_to_its_answer(cfg):
    for p in generate_problems(cfg):
        parsed = parse_question(p.question)
        assert parsed is not None, p.question
        assert str(solve(parsed)) == p.answer, p.question
        ops = [s for s in parsed.steps if s.kind not in ("start", "distractor")]
        assert cfg.min_ops <= len(ops) <= cfg.max_ops
        # no intermediate value leaves [1, max_value]
        value = parsed.steps[0].n
        for step in ops:
            value = {"add": value + step.n, "sub": value - step.n, "mul": value * step.n, "div": value // step.n}[
                step.kind
            ]
            assert 1 <= value <= cfg.max_value
            if step.kind == "div":
                assert step.n <= cfg.max_factor


def test_distractors_are_parsed_as_distractors():
    problems = generate_problems(GeneratorConfig(n_problems=200, seed=2, distractor_prob=1.0))
    kinds = Counter(s.kind for p in problems for s in parse_question(p.question).steps)
    assert kinds["distractor"] >= 150
    assert kinds["start"] == 200


@pytest.mark.parametrize(
    "question",
    [
        "What is the capital of France?",
        "",
        "Tara has 3 apples.",  # no question sentence
        "How many apples does Tara have now?",  # no start sentence
        "Tara has 3 apples. Tara flies 2 kites. How many apples does Tara have now?",  # unknown sentence
    ],
)
def test_parse_question_rejects_foreign_text(question):
    assert parse_question(question) is None


def test_parse_and_solve_hand_written():
    q = (
        "Maya has 12 stickers. Omar is 9 years old. Maya loses 4 stickers. "
        "Maya ends up with 3 times as many stickers. How many stickers does Maya have in the end?"
    )
    parsed = parse_question(q)
    assert [s.kind for s in parsed.steps] == ["start", "distractor", "sub", "mul"]
    assert (parsed.name, parsed.item) == ("Maya", "stickers")
    assert solve(parsed) == 24


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"min_ops": 5, "max_ops": 3}, "min_ops"),
        ({"n_problems": 0}, "n_problems"),
        ({"max_factor": 1}, "max_factor"),
        ({"max_ops": 9}, "max_ops"),
        ({"distractor_prob": -0.1}, "distractor_prob"),
    ],
)
def test_config_validation(kwargs, needle):
    with pytest.raises(ValueError) as err:
        GeneratorConfig(**kwargs)
    assert needle in str(err.value)


# ----------------------------------------------------------------------------------------------------------
# loader


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Natalia sold 48 clips.\n48 + 24 = 72\n#### 72", ("72", "number")),
        ("Some work <<2*500=1000>>\n#### 1,000", ("1000", "number")),
        ("#### $18.00", ("18", "number")),
        ("#### -5", ("-5", "number")),
        ("#### 2.50", ("2.5", "number")),
        ("42", ("42", "number")),
        ("yes", ("yes", "text")),
        ("Paris ", ("Paris", "text")),
    ],
)
def test_normalise_gold_answer(raw, expected):
    assert normalise_gold_answer(raw) == expected


def test_gsm8k_format(write_jsonl):
    path = write_jsonl(
        [
            {
                "question": "Natalia sold clips to 48 friends... How many clips?",
                "answer": "48/2 = 24\n48+24 = 72\n#### 72",
            },
            {"question": "How much in total?", "answer": "It costs 500 * 2 = <<500*2=1000>>1000\n#### 1,000"},
            {"question": "How many?", "answer": 7},  # a bare number is accepted
        ],
        name="gsm8k_test.jsonl",
    )
    result = load_problem_file(path)
    assert result.quarantined == []
    assert [p.answer for p in result.problems] == ["72", "1000", "7"]
    assert {p.answer_type for p in result.problems} == {"number"}
    assert {p.source for p in result.problems} == {"gsm8k_test"}  # default source = file stem
    p = result.problems[1]
    # the id is the content, never the file name: the same problem from another file is the same problem
    assert p.problem_id == make_problem_id("How much in total?", "1000")
    assert p.solution.endswith("#### 1,000")  # GSM8K's worked solution is kept as a reference trace
    renamed = write_jsonl([{"question": "How much in total?", "answer": "#### 1,000"}], name="other_name.jsonl")
    assert load_problem_file(renamed).problems[0].problem_id == p.problem_id
    # without a split column, the seeded split of the group (here: the question) decides
    assert [q.split for q in result.problems] == [split_of(q.group_id, SplitConfig()) for q in result.problems]


def test_loader_source_split_and_duplicates(write_jsonl):
    row = {"question": "  What is 2+2?  ", "answer": "#### 4", "split": "dev"}
    path = write_jsonl([row, row, "", "   ", row])  # duplicates collapse; blank lines are skipped
    result = load_problem_file(path, source="mine")
    assert len(result.problems) == 1
    p = result.problems[0]
    assert (p.source, p.split, p.question, p.answer) == ("mine", "validation", "What is 2+2?", "4")


def test_a_split_column_is_honoured_and_a_group_column_groups(write_jsonl):
    rows = [{"question": f"Q{i}?", "answer": f"#### {i}", "split": s} for i, s in enumerate(("train", "test", "val"))]
    rows += [{"question": f"G{i}?", "answer": f"#### {i}", "group": "tmpl-7"} for i in range(20)]
    result = load_problem_file(write_jsonl(rows))
    assert [p.split for p in result.problems[:3]] == ["train", "test", "validation"]
    grouped = result.problems[3:]
    assert len({p.split for p in grouped}) == 1 and {p.group_id for p in grouped} == {"group:tmpl-7"}
    bad = write_jsonl([{"question": "Q?", "answer": "#### 1", "split": "holdout"}], name="bad.jsonl")
    with pytest.raises(ProblemFileError, match=r"bad\.jsonl:1: field 'split': unknown split 'holdout'"):
        load_problem_file(bad)


def test_custom_field_names(write_jsonl):
    path = write_jsonl(
        [
            {"uid": "a-1", "prompt": "Q one?", "target": "#### 3", "part": "test"},
            {"uid": "a-2", "prompt": "Q two?", "target": "five", "part": None},  # no split -> default
        ]
    )
    fields = FieldMap(question="prompt", answer="target", id="uid", split="part")
    result = load_problem_file(path, fields, source="custom", split=SplitConfig(validation_fraction=0, test_fraction=0))
    assert [(p.question, p.answer, p.answer_type, p.split) for p in result.problems] == [
        ("Q one?", "3", "number", "test"),
        ("Q two?", "five", "text", "train"),
    ]
    # with an id column the id comes from it, not from the text
    assert result.problems[0].problem_id == content_id("problem-id", "a-1")

    # the default GSM8K field names do not exist in this file: a clear error naming the field
    with pytest.raises(ProblemFileError, match=r":1: field 'question': missing"):
        load_problem_file(path)


def test_parquet_file(tmp_path):
    path = tmp_path / "probs.parquet"
    pq.write_table(pa.table({"question": ["Q1?", "Q2?", "Q3?"], "answer": ["#### 1,234", "#### 5", "no"]}), path)
    result = load_problem_file(path)
    assert [(p.question, p.answer, p.answer_type) for p in result.problems] == [
        ("Q1?", "1234", "number"),
        ("Q2?", "5", "number"),
        ("Q3?", "no", "text"),
    ]
    assert {p.source for p in result.problems} == {"probs"}


def test_parquet_bad_row_names_row_and_field(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"question": ["Q1?", None, "Q3?"], "answer": ["1", "2", "3"]}), path)
    with pytest.raises(ProblemFileError) as err:
        load_problem_file(path)
    assert str(path) in str(err.value) and ":2:" in str(err.value) and "'question'" in str(err.value)
    result = load_problem_file(path, lenient=True)
    assert [p.question for p in result.problems] == ["Q1?", "Q3?"]
    assert [(q.line, q.field) for q in result.quarantined] == [(2, "question")]


def test_corrupt_parquet_is_a_problem_file_error(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"this is not parquet")
    with pytest.raises(ProblemFileError, match="broken.parquet"):
        load_problem_file(path)


GOOD = {"question": "What is 1+1?", "answer": "#### 2"}


@pytest.mark.parametrize(
    "bad_line, field, needle",
    [
        (b'{"question": "Q?", "answer": ', "<row>", "invalid JSON"),
        (b"[1, 2, 3]", "<row>", "JSON object"),
        (json.dumps({"question": "Q?"}).encode(), "answer", "missing"),
        (json.dumps({"answer": "#### 3"}).encode(), "question", "missing"),
        (json.dumps({"question": "   ", "answer": "3"}).encode(), "question", "non-empty string"),
        (json.dumps({"question": 12, "answer": "3"}).encode(), "question", "non-empty string"),
        (json.dumps({"question": "Q?", "answer": ["3"]}).encode(), "answer", "non-empty string or number"),
        (json.dumps({"question": "Q?", "answer": True}).encode(), "answer", "non-empty string or number"),
        (json.dumps({"question": "Q?", "answer": ""}).encode(), "answer", "non-empty string or number"),
        (json.dumps({"question": "Q\u0000?", "answer": "3"}).encode(), "question", "NUL"),
        (json.dumps({"question": "Q?", "answer": "3\u0000"}).encode(), "answer", "NUL"),
        (b'{"question": "Q \\ud800?", "answer": "3"}', "question", "surrogate"),
        (b'{"question": "caf\xe9?", "answer": "3"}', "<row>", "not UTF-8"),
    ],
)
def test_bad_row_error_names_file_line_and_field(write_jsonl, bad_line, field, needle):
    path = write_jsonl([GOOD, "", bad_line, {**GOOD, "question": "Q4?"}])  # the bad row is on line 3
    with pytest.raises(ProblemFileError) as err:
        load_problem_file(path)
    message = str(err.value)
    assert message.startswith(f"{path}:3: field {field!r}: "), message
    assert needle in message
    assert "\n" not in message


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "problems.csv"
    path.write_text("question,answer\nQ?,1\n")
    with pytest.raises(ProblemFileError, match=r"problems\.csv.*unsupported file type '\.csv'"):
        load_problem_file(path)
    # lenient mode does not hide a file-level error
    with pytest.raises(ProblemFileError):
        load_problem_file(path, lenient=True)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(ProblemFileError, match=r"nope\.jsonl: no such file"):
        load_problem_file(path, lenient=True)


def test_lenient_quarantines_bad_rows_and_keeps_good_ones(write_jsonl):
    path = write_jsonl(
        [
            {"question": "Good one?", "answer": "#### 1"},
            b"{not json",
            {"question": "", "answer": "2"},
            b"\xff\xfe bad bytes",
            {"question": "Good two?", "answer": "#### 2,000"},
            {"question": "No answer?"},
            {"question": "Good three?", "answer": 3},
        ]
    )
    result = load_problem_file(path, lenient=True)
    assert [(p.question, p.answer) for p in result.problems] == [
        ("Good one?", "1"),
        ("Good two?", "2000"),
        ("Good three?", "3"),
    ]
    assert [(q.line, q.field) for q in result.quarantined] == [
        (2, "<row>"),
        (3, "question"),
        (4, "<row>"),
        (6, "answer"),
    ]
    for q in result.quarantined:
        assert q.source_file == str(path)
        assert q.error and q.raw
        assert set(q.as_row()) == {"source_file", "line", "field", "error", "raw"}
    assert "{not json" in result.quarantined[0].raw
    assert "not UTF-8" in result.quarantined[2].error


def test_a_utf8_bom_at_the_start_of_a_jsonl_file_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf"
        + b'{"question": "What is 2 + 2?", "answer": "#### 4"}\n'
        + b'{"question": "What is 3 + 3?", "answer": "#### 6"}\n'
    )
    loaded = load_problem_file(path)
    assert [p.answer for p in loaded.problems] == ["4", "6"] and loaded.quarantined == []
