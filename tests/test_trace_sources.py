"""The pieces of the real-teacher path that need no server: the journal, reasoning parsing, label verdict parsing,
trace import, and the warehouse bringing older files up to the current schema."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from scaffold_lib.data.journal import Journal
from scaffold_lib.data.label_validation import Verdict, decide, parse_signal
from scaffold_lib.data.problem_files import ProblemFileError
from scaffold_lib.data.signals import FALLBACK, FINAL_STEP, KEYWORD, LLM, LLM_AGREE, LLM_OVERRIDE
from scaffold_lib.data.synthetic import GeneratorConfig, generate_problems, parse_question, solve
from scaffold_lib.data.trace_formats import split_reasoning
from scaffold_lib.data.trace_import import ImportedTeacher, TraceFieldMap, read_trace_rows
from scaffold_lib.store.warehouse import Warehouse
from support.stages import generate_teacher_traces, segment_traces, store_problems


def test_journal_keeps_acknowledged_records_and_cuts_a_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    with Journal(path, key="id") as journal:
        journal.append({"id": "a", "text": "first"})
        journal.append({"id": "b", "text": "ünïcode\n\nwith blank lines"})
    with path.open("ab") as fh:  # what a kill in the middle of a write leaves
        fh.write(b'{"id": "c", "text": "half')
    reopened = Journal(path, key="id")
    assert reopened.torn_bytes == len(b'{"id": "c", "text": "half')
    assert "a" in reopened and "b" in reopened and "c" not in reopened
    assert reopened.get("b")["text"] == "ünïcode\n\nwith blank lines"
    reopened.append({"id": "c", "text": "whole"})
    reopened.close()
    lines = path.read_bytes().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["a", "b", "c"]  # the torn bytes are gone, not glued on


def test_journal_names_an_unreadable_line(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    path.write_text('{"id": "a"}\nnot json\n')
    with pytest.raises(ValueError, match=r"j\.jsonl:2: unreadable journal line"):
        Journal(path, key="id")


def test_journal_survives_a_very_long_record(tmp_path: Path) -> None:
    text = "x" * 10_000_000
    with Journal(tmp_path / "j.jsonl", key="id") as journal:
        journal.append({"id": "big", "text": text})
    assert Journal(tmp_path / "j.jsonl", key="id").get("big")["text"] == text


@pytest.mark.parametrize(
    "content, reasoning, expected",
    [
        ("The answer is 4.", "2 + 2 = 4.", ("2 + 2 = 4.", "The answer is 4.")),
        ("<think>\nSo 2 + 2 = 4.\n</think>\n\nThe answer is 4.", None, ("So 2 + 2 = 4.", "The answer is 4.")),
        ("  <think>a\n\nb</think>done", "", ("a\n\nb", "done")),
        ("<think>cut off by max_tokens", None, ("cut off by max_tokens", "")),
        ("Plain answer with no thinking.", None, ("", "Plain answer with no thinking.")),
        ("The <think> tag in the middle is content", None, ("", "The <think> tag in the middle is content")),
        ("answer", "   ", ("", "answer")),
    ],
)
def test_split_reasoning(content: str, reasoning: str | None, expected: tuple[str, str]) -> None:
    assert split_reasoning(content, reasoning) == expected


@pytest.mark.parametrize(
    "reply, signal",
    [
        ("conclusion_summary", "conclusion_summary"),
        ("  Contrast_Concession.\n", "contrast_concession"),
        ("`reasoning_analysis`", "reasoning_analysis"),
        ('"examples_illustration"', "examples_illustration"),
        ("opinion recall", "opinion_recall"),
        ("addition-elaboration", "addition_elaboration"),
        ('{"signal": "response_generation"}', "response_generation"),
        ('{"signal": "nonsense"}', None),
        ('{"label": "conclusion_summary"}', None),
        ("{broken json", None),
        ("conclusion", None),
        ("The signal is conclusion_summary because it concludes.", None),
        ("", None),
    ],
)
def test_parse_signal_is_strict(reply: str, signal: str | None) -> None:
    assert parse_signal(reply) == signal


def test_decide_maps_verdicts_to_labellers() -> None:
    agree = Verdict("conclusion_summary", "conclusion_summary", 1)
    other = Verdict("contrast_concession", "contrast_concession", 2)
    invalid = Verdict(None, "???", 3)
    assert decide(KEYWORD, "conclusion_summary", agree) == ("conclusion_summary", LLM_AGREE)
    assert decide(KEYWORD, "conclusion_summary", other) == ("contrast_concession", LLM_OVERRIDE)
    assert decide(FALLBACK, None, other) == ("contrast_concession", LLM)
    assert decide(KEYWORD, "conclusion_summary", invalid) is None
    assert decide(FALLBACK, None, None) is None
    assert decide(FINAL_STEP, None, agree) is None


def _synthetic(n: int = 12) -> list:
    return generate_problems(GeneratorConfig(n_problems=n, seed=3))


def test_trace_import_joins_by_question_and_by_id_and_verifies(tmp_path: Path, warehouse_path: Path) -> None:
    problems = _synthetic()
    wh = Warehouse(warehouse_path)
    store_problems(wh, problems)
    rows = []
    for i, p in enumerate(problems[:6]):
        gold = solve(parse_question(p.question))
        answer = gold if i != 0 else gold + 1  # one wrong trace: verification must catch it
        rows.append(
            {
                "problem": "  " + p.question.upper() + " ",
                "generation": f"<think>\nSo I add things up.\n\nTherefore it is {answer}.\n</think>\n\nThe answer is {answer}.",
            }
        )
    rows.append(
        {
            "problem_id": problems[6].problem_id,
            "problem": "different wording",
            "generation": f"Since it is easy, it is {problems[6].answer}.\n\nThe answer is {problems[6].answer}.",
        }
    )
    rows.append({"problem": "A question nobody asked?", "generation": "The answer is 1."})
    rows.append({"problem": problems[7].question, "generation": ""})  # empty: quarantined, not a trace
    rows.append({"problem": problems[8].question})  # missing field
    path = tmp_path / "traces.parquet"
    pd.DataFrame(rows).to_parquet(path)
    teacher = ImportedTeacher(str(path), TraceFieldMap(problem_id="problem_id"), name="r1-dump")
    report = generate_teacher_traces(wh, teacher)
    assert report.new_rows == 7 and report.details["not_covered"] == len(problems) - 7
    assert report.details["quarantined"] == 2
    quarantine = wh.query("SELECT line, field, error FROM quarantine WHERE stage = 'teacher_traces' ORDER BY line")
    assert [(q["line"], q["field"]) for q in quarantine] == [(9, "generation"), (10, "generation")]
    assert quarantine[0]["error"] == "is empty" and quarantine[1]["error"] == "missing"
    traces = {t["problem_id"]: t for t in wh.query("SELECT * FROM teacher_traces")}
    assert traces[problems[0].problem_id]["is_correct"] is False
    assert all(traces[p.problem_id]["is_correct"] for p in problems[1:7])
    first = traces[problems[1].problem_id]
    assert first["text"].startswith("So I add things up.") and first["answer_text"].startswith("The answer is")
    # the thinking's steps, then the final content as the answer step
    segment_traces(wh)
    steps = wh.query("SELECT text FROM segmented_steps WHERE trace_id = ? ORDER BY idx", [first["trace_id"]])
    assert [s["text"].split()[0] for s in steps] == ["So", "Therefore", "The"]
    # a second import asks nothing and adds nothing
    again = generate_teacher_traces(
        wh, ImportedTeacher(str(path), TraceFieldMap(problem_id="problem_id"), name="r1-dump")
    )
    assert again.new_rows == 0 and again.details["asked"] == len(problems) - 7


def test_trace_import_strict_mode_names_file_line_and_field(write_jsonl) -> None:
    path = write_jsonl([{"problem": "q?", "generation": "fine"}, {"problem": 7, "generation": "x"}])
    with pytest.raises(ProblemFileError, match=r"data\.jsonl:2: field 'problem': must be a string, got int"):
        list(read_trace_rows(str(path), lenient=False))
    missing = Path(path).with_name("absent.jsonl")
    with pytest.raises(ProblemFileError, match="absent.jsonl: no such file"):
        list(read_trace_rows(str(missing)))


def test_trace_import_separate_answer_column_and_samples(write_jsonl, warehouse_path: Path) -> None:
    problems = _synthetic(3)
    wh = Warehouse(warehouse_path)
    store_problems(wh, problems)
    p = problems[0]
    path = write_jsonl(
        [
            {"q": p.question, "think": "Since x, so y.", "final": f"The answer is {p.answer}."},
            {"q": p.question, "think": "Another try.", "final": "The answer is -1."},
        ]
    )
    teacher = ImportedTeacher(str(path), TraceFieldMap(question="q", thinking="think", answer="final"))
    report = generate_teacher_traces(wh, teacher)
    rows = wh.query("SELECT sample, is_correct FROM teacher_traces ORDER BY sample")
    assert report.new_rows == 2 and [(r["sample"], r["is_correct"]) for r in rows] == [(0, True), (1, False)]


def test_an_older_warehouse_file_gains_the_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    con.execute(
        "CREATE TABLE signal_labels (step_id VARCHAR PRIMARY KEY, signal VARCHAR NOT NULL, labeller VARCHAR "
        "NOT NULL, keyword VARCHAR, confidence DOUBLE NOT NULL, dagster_run_id VARCHAR, created_at TIMESTAMP)"
    )
    con.execute("INSERT INTO signal_labels VALUES ('s1', 'conclusion_summary', 'keyword', 'thus', 1.0, 'r', now())")
    con.close()
    wh = Warehouse(path)
    assert wh.query("SELECT step_id, keyword_signal FROM signal_labels") == [{"step_id": "s1", "keyword_signal": None}]
    assert (
        wh.upsert(
            "signal_labels",
            [
                {
                    "step_id": "s1",
                    "signal": "contrast_concession",
                    "labeller": LLM_OVERRIDE,
                    "keyword": "thus",
                    "keyword_signal": "conclusion_summary",
                    "confidence": 1.0,
                }
            ],
        )
        == 1
    )
    assert wh.query("SELECT signal, labeller FROM signal_labels") == [
        {"signal": "contrast_concession", "labeller": LLM_OVERRIDE}
    ]


def test_hf_teacher_generates_from_a_saved_checkpoint_and_resumes_from_its_journal(
    tmp_path: Path, warehouse_path: Path
) -> None:
    from scaffold_lib.data.config import HFTeacherConfig
    from scaffold_lib.data.llm_teachers import HFTeacher
    from scaffold_lib.student.model import build_embedded_base
    from student_kit import TINY

    problems = _synthetic(5)
    checkpoint = build_embedded_base(
        TINY.model_copy(update={"vocab_size": 300}),
        [p.question for p in problems] * 4,
        tmp_path / "tiny-teacher",
    )
    config = HFTeacherConfig(model=str(checkpoint), batch_size=2, max_new_tokens=12)
    result = HFTeacher(config, journal_dir=tmp_path / "j", progress=False).generate(problems)
    assert {t.teacher for t in result.traces} | {f.teacher for f in result.failures} <= {"hf:tiny-teacher"}
    # an untrained model writes noise, but every problem gets a trace or a recorded failure, never nothing
    assert len(result.traces) + len(result.failures) == 5
    assert all(0 < t.completion_tokens <= 12 and t.prompt_tokens > 10 for t in result.traces)
    assert {t.endpoint for t in result.traces} <= {"local:cpu"}
    # greedy decoding from the same checkpoint is reproducible, and a second teacher finds all in the journal
    again = HFTeacher(config, journal_dir=tmp_path / "j", progress=False).generate(problems)
    assert again.stats["answers_from_journal"] == len(result.traces) and again.stats["requests_answered"] == 0
    fresh = HFTeacher(config, journal_dir=tmp_path / "fresh", progress=False).generate(problems)
    assert sorted(t.text for t in fresh.traces) == sorted(t.text for t in result.traces)
