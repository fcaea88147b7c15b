"""Trace datasets as the public ones are shaped (OpenR1-Math's `generations` lists, chat `messages`, ShareGPT
`conversations`, s1K's thinking/attempt columns) imported with no field map, problems and gold answers from the file
itself, through the `scaffold` CLI and through Dagster; a saved `datasets` folder by path; the teacher chosen per
source, and a GSM8K file dropped into `incoming/` refreshed end to end by the sensor's job."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from scaffold_lib.cli import main
from scaffold_lib.core.errors import StageFailed, UserError
from scaffold_lib.core.ids import content_id
from scaffold_lib.data.collect import build_problems
from scaffold_lib.data.config import EndpointConfig
from scaffold_lib.data.llm_teachers import EndpointTeacher
from scaffold_lib.data.problems import SPLITS, Problem, SplitConfig, normalise_question, split_of
from scaffold_lib.data.teacher_routing import PerSourceTeacher
from scaffold_lib.data.trace import build_teacher, write_traces
from scaffold_lib.data.trace_formats import TraceFieldMap, detect, resolve_columns, trace_gold
from scaffold_lib.data.trace_import import trace_sources
from scaffold_lib.store.data_tables import PROBLEM_COLUMNS
from scaffold_lib.store.store import Store
from scaffold_lib.store.warehouse import Warehouse
from support.dagster_kit import definitions, failures, metadata, micro, new_instance, resources, run_config

DATA_ASSETS = ("problems", "decontamination", "teacher_traces", "segmented_steps", "signal_labels")
QUESTIONS = [
    ("Tom has 3 apples and buys 4 more. How many apples does Tom have now?", "7"),
    ("A box holds 4 rows of 3 pencils. How many pencils are in the box?", "12"),
    ("Lena reads 15 pages on Monday and 5 pages on Tuesday. How many pages did she read?", "20"),
    ("A baker makes 30 rolls and sells 12. How many rolls are left?", "18"),
]
HALF = ("A pie is cut into 2 equal parts and Ann eats 1 part. What fraction of the pie did she eat?", "\\frac{1}{2}")


def reasoning(answer: str) -> str:
    # every step opens with a keyword, so the labelling gate passes on these few traces
    return f"So I need the total.\n\nThen I work it out: the result is {answer}.\n\nTherefore the answer is {answer}."


def r1(answer: str) -> str:
    return f"<think>\n{reasoning(answer)}\n</think>\n\nThe answer is $\\boxed{{{answer}}}$."


# --- files of each public shape ---------------------------------------------------------------------------------


def openr1_file(folder: Path) -> Path:
    """OpenR1-Math-220k's columns. 4 problems, 7 generations: one wrong one the dataset marked correct (a verdict
    disagreement), one empty one (quarantined as generations[0])."""
    (q1, a1), (q2, a2), (q3, a3) = QUESTIONS[:3]
    rows = [
        (q1, a1, [r1(a1), r1("8")], [True, True]),
        (q2, a2, [r1(a2), r1(a2)], [True, True]),
        (HALF[0], HALF[1], [r1(HALF[1])], [True]),
        (q3, a3, ["", r1(a3)], [False, True]),
    ]
    frame = pd.DataFrame(
        [
            {
                "problem": q,
                "solution": f"Work it out. $\\boxed{{{a}}}$",
                "answer": a,
                "problem_type": "Algebra",
                "question_type": "math-word-problem",
                "source": "olympiads",
                "uuid": f"uuid-{i}",
                "is_reasoning_complete": [True] * len(gens),
                "generations": gens,
                "correctness_math_verify": verdicts,
                "correctness_llama": None,
                "finish_reasons": ["stop"] * len(gens),
                "correctness_count": sum(verdicts),
                "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": gens[-1]}],
            }
            for i, (q, a, gens, verdicts) in enumerate(rows)
        ]
    )
    path = folder / "openr1_math.parquet"
    frame.to_parquet(path)
    return path


def messages_file(folder: Path) -> Path:
    """Chat `messages` (Mixture-of-Thoughts' columns, with OpenR1-Math's `answer`): <think> in the content, a
    vLLM-style `reasoning_content` field, a system turn; and a chat with no reply (quarantined)."""
    (q1, a1), (q2, a2), (q3, a3) = QUESTIONS[:3]
    rows = [
        {"messages": [{"role": "user", "content": q1}, {"role": "assistant", "content": r1(a1)}], "answer": a1},
        {
            "messages": [
                {"role": "system", "content": "You are a careful solver."},
                {"role": "user", "content": q2},
                {"role": "assistant", "content": f"The answer is {a2}.", "reasoning_content": reasoning(a2)},
            ],
            "answer": a2,
        },
        {"messages": [{"role": "user", "content": q3}, {"role": "assistant", "content": r1(a3)}], "answer": a3},
        {"messages": [{"role": "user", "content": QUESTIONS[3][0]}], "answer": QUESTIONS[3][1]},
    ]
    path = folder / "mixture.jsonl"
    path.write_text("".join(json.dumps({**r, "num_tokens": 100, "source": "math"}) + "\n" for r in rows))
    return path


def sharegpt_file(folder: Path) -> Path:
    """ShareGPT `conversations` (from/value): human/gpt turns, and Bespoke-Stratos' user/assistant turns with its
    begin/end-of-thought markers."""
    (q1, a1), (q2, a2), (q3, a3) = QUESTIONS[:3]
    bespoke = (
        f"<|begin_of_thought|>\n\n{reasoning(a3)}\n\n<|end_of_thought|>\n\n"
        f"<|begin_of_solution|>\n\nThe answer is $\\boxed{{{a3}}}$.\n\n<|end_of_solution|>"
    )
    rows = [
        ([{"from": "human", "value": q1}, {"from": "gpt", "value": r1(a1)}], a1),
        ([{"from": "human", "value": q2}, {"from": "gpt", "value": r1(a2)}], a2),
        ([{"from": "user", "value": q3}, {"from": "assistant", "value": bespoke}], a3),
    ]
    path = folder / "stratos.jsonl"
    path.write_text(
        "".join(json.dumps({"system": "Think first.", "conversations": c, "answer": a}) + "\n" for c, a in rows)
    )
    return path


def s1k_file(folder: Path) -> Path:
    """s1K's columns: the gold answer inside `solution` (a worked solution's \\boxed{}, or a bare number as AIME's)."""
    rows = []
    for q, a in QUESTIONS[:3]:
        rows.append(
            {
                "solution": f"Count them: $\\boxed{{{a}}}$." if a != "20" else a,
                "question": q,
                "cot_type": "math",
                "source_type": "AI-MO/NuminaMath-CoT/aops_forum",
                "metadata": "{}",
                "cot": None,
                "thinking_trajectories": [reasoning(a)],
                "attempt": f"The answer is $\\boxed{{{a}}}$.",
            }
        )
    path = folder / "s1k.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return path


# format -> (writer, problems, traces, quarantined trace rows)
FORMATS = {
    "openr1": (openr1_file, 4, 6, 1),
    "messages": (messages_file, 3, 3, 1),
    "sharegpt": (sharegpt_file, 3, 3, 0),
    "s1k": (s1k_file, 3, 3, 0),
}


def tables(home: Path) -> dict:
    wh = Warehouse(home / "warehouse.duckdb")
    return {
        "problems": wh.query("SELECT * FROM problems ORDER BY question"),
        "traces": wh.query("SELECT * FROM teacher_traces ORDER BY problem_id, sample"),
        "steps": wh.scalar("SELECT count(*) FROM segmented_steps"),
        "labels": wh.scalar("SELECT count(*) FROM signal_labels"),
        "quarantine": wh.query("SELECT stage, line, field, error FROM quarantine ORDER BY stage, line"),
    }


def assert_imported(home: Path, fmt: str, source: str) -> dict:
    _, n_problems, n_traces, n_bad = FORMATS[fmt]
    t = tables(home)
    assert len(t["problems"]) == n_problems and {p["source"] for p in t["problems"]} == {source}
    # split by the usual seeded group split of the question, ids content hashes
    for p in t["problems"]:
        assert p["split"] == split_of(content_id("question", normalise_question(p["question"])), SplitConfig())
    assert {p["split"] for p in t["problems"]} <= set(SPLITS)
    assert len(t["traces"]) == n_traces and {r["problem_id"] for r in t["traces"]} <= {
        p["problem_id"] for p in t["problems"]
    }
    assert sum(q["stage"] == "teacher_traces" for q in t["quarantine"]) == n_bad
    assert t["steps"] >= 4 * n_traces and t["labels"] == t["steps"]  # three reasoning steps and the answer each
    return t


# --- unit: detection and sources ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "names, expected",
    [
        ({"problem", "answer", "generations", "correctness_math_verify", "messages"}, "openr1"),  # OpenR1-Math
        ({"solution", "question", "thinking_trajectories", "attempt", "messages"}, "s1k"),  # s1K
        ({"solution", "question", "deepseek_thinking_trajectory", "deepseek_attempt", "messages"}, "s1k"),  # 1.1
        ({"messages", "num_tokens", "source"}, "messages"),  # Mixture-of-Thoughts
        ({"system", "conversations"}, "sharegpt"),  # Bespoke-Stratos
        ({"problem", "generation"}, "columns"),  # open-r1 single-generation dumps
    ],
)
def test_auto_detects_the_public_shapes(names: set, expected: str) -> None:
    assert detect(names) == expected
    assert resolve_columns("auto", names).label == f"{expected} (auto)"


def test_s1k_1_1_takes_the_r1_columns_and_the_field_map_can_pick_gemini() -> None:
    names = {"solution", "question", "gemini_thinking_trajectory", "gemini_attempt"}
    names |= {"deepseek_thinking_trajectory", "deepseek_attempt", "deepseek_grade"}
    cols = resolve_columns("s1k", names)
    assert (cols.thinking, cols.answer, cols.verdict, cols.gold) == (
        "deepseek_thinking_trajectory",
        "deepseek_attempt",
        "deepseek_grade",
        "solution",
    )
    gemini = resolve_columns(
        "s1k", names, TraceFieldMap(thinking="gemini_thinking_trajectory", answer="gemini_attempt")
    )
    assert (gemini.thinking, gemini.answer) == ("gemini_thinking_trajectory", "gemini_attempt")


@pytest.mark.parametrize(
    "raw, gold",
    [
        ("72", ("72", "number")),
        ("She has 3 + 4 = 7.\n#### 7", ("7", "number")),
        ("So the roots are $\\boxed{x = \\pm 2}$.", ("x = \\pm 2", "math")),
        ("Count them: $\\boxed{1,000}$.", ("1000", "number")),
        ("\\sqrt{2}", ("\\sqrt{2}", "math")),
    ],
)
def test_trace_gold_answers(raw: str, gold: tuple) -> None:
    assert trace_gold(raw) == gold


def test_trace_sources_tell_files_saved_datasets_and_hub_names_apart(tmp_path: Path) -> None:
    assert [s.kind for s in trace_sources("open-r1/OpenR1-Math-220k")] == ["hub"]
    assert [s.kind for s in trace_sources("simplescaling/s1K-1.1")] == ["hub"]  # a dot in the name is no suffix
    with pytest.raises(UserError, match="absent.jsonl: no such file"):
        trace_sources(str(tmp_path / "absent.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .jsonl/.parquet trace file"):
        trace_sources(str(tmp_path / "empty"))


# --- each format through the CLI and through Dagster ------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_format_imports_through_the_cli_with_its_problems(fmt: str, tmp_path: Path, capsys) -> None:
    path = FORMATS[fmt][0](tmp_path)
    home = tmp_path / "home"
    rc = main(["--home", str(home), "--preset", "micro", "data", "--teacher", "import", "--import-traces", str(path)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert f"import_format={fmt} (auto)" in out  # auto says which format it chose, in both stages' lines
    assert out.count(f"import_format={fmt} (auto)") == 2
    t = assert_imported(home, fmt, path.stem)
    print(f"{fmt}: {len(t['problems'])} problems, {len(t['traces'])} traces imported from {path.name}")
    if fmt == "openr1":
        # every generation is a sample; the dataset's verdicts are kept beside ours and one disagreement counted
        assert "verdicts_recorded=6" in out and "verdict_disagreements=1" in out
        by_sample = {(r["final_answer"], r["is_correct"], r["recorded_correct"]) for r in t["traces"]}
        assert ("8", False, True) in by_sample  # the disagreement: wrong, though the dataset says correct
        half = next(p["problem_id"] for p in t["problems"] if p["question"] == HALF[0])
        assert [(r["is_correct"], r["recorded_correct"]) for r in t["traces"] if r["problem_id"] == half] == [
            (True, True)
        ]
        assert ("teacher_traces", 4, "generations[0]", "is empty") in [tuple(q.values()) for q in t["quarantine"]]
    if fmt == "messages":
        assert ("teacher_traces", 4, "messages", "no assistant turn after the question") in [
            tuple(q.values()) for q in t["quarantine"]
        ]
        texts = {r["text"] for r in t["traces"]}
        assert reasoning("12") in texts  # from the reasoning_content field, not the content
    if fmt == "sharegpt":
        bespoke = next(r for r in t["traces"] if r["final_answer"] == "20")
        assert bespoke["text"] == reasoning("20") and bespoke["answer_text"] == "The answer is $\\boxed{20}$."
    assert all(r["is_correct"] for r in t["traces"] if r["final_answer"] != "8")


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_format_imports_through_dagster_with_its_problems(fmt: str, tmp_path: Path) -> None:
    from pipelines.defs.stage_assets import ASSETS

    path = FORMATS[fmt][0](tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    config = micro(
        problems={"source": "files"},
        teacher={"backend": "import", "import_source": str(path), "import_format": fmt},
    )
    assets = [ASSETS[name] for name in DATA_ASSETS]
    result = dg.materialize(
        assets,
        resources=resources(home),
        run_config=run_config(config, DATA_ASSETS),
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )
    assert result.success, failures(result)
    _, n_problems, n_traces, n_bad = FORMATS[fmt]
    problems, traces = metadata(result, "problems"), metadata(result, "teacher_traces")
    assert problems["new_rows"] == n_problems and problems["import_format"] == fmt  # named: no "(auto)"
    assert traces["new_rows"] == n_traces and traces["import_format"] == fmt and traces["quarantined"] == n_bad
    if fmt == "openr1":
        assert traces["verdicts_recorded"] == 6 and traces["verdict_disagreements"] == 1
    assert_imported(home, fmt, path.stem)


def test_a_dataset_saved_with_save_to_disk_imports_by_path(tmp_path: Path, capsys) -> None:
    import datasets

    frame = pd.read_parquet(openr1_file(tmp_path))
    saved = tmp_path / "openr1_saved"
    datasets.Dataset.from_pandas(frame).save_to_disk(str(saved))
    home = tmp_path / "home"
    rc = main(["--home", str(home), "--preset", "micro", "data", "--import-traces", str(saved), "--format", "openr1"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "import_format=openr1" in out
    assert_imported(home, "openr1", "openr1_saved")


def test_a_file_whose_every_row_fails_exits_non_zero_with_file_row_and_field(tmp_path: Path, capsys) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text("".join(json.dumps({"problem": q, "answer": a, "generations": 7}) + "\n" for q, a in QUESTIONS[:2]))
    rc = main(["--home", str(tmp_path / "home"), "--preset", "micro", "data", "--import-traces", str(path)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "answered none of 2 problems" in err and "2 input rows quarantined" in err
    assert f"{path}:1 field 'generations': must be a string or a list of strings, got int" in err
    # a file without a usable question in any row stops at the problems stage, with line and field
    path.write_text((json.dumps({"problem": None, "answer": "1", "generations": [r1("1")]}) + "\n") * 2)
    rc = main(["--home", str(tmp_path / "home2"), "--preset", "micro", "data", "--import-traces", str(path)])
    err = capsys.readouterr().err
    assert rc == 1 and "every row was quarantined (2), e.g. line 1, field 'problem': missing" in err


def test_a_chat_file_without_gold_answers_says_what_to_give(tmp_path: Path, capsys) -> None:
    path = tmp_path / "chats.jsonl"
    path.write_text(
        json.dumps({"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": r1("1")}]}) + "\n"
    )
    rc = main(["--home", str(tmp_path / "home"), "--preset", "micro", "data", "--import-traces", str(path)])
    err = capsys.readouterr().err
    assert rc == 1 and "has no gold-answer column" in err and "--problems-file" in err


# --- the teacher per source ----------------------------------------------------------------------------------------


def test_auto_routes_each_source_to_its_teacher(tmp_path: Path) -> None:
    store = Store.at(tmp_path)
    gsm8k = tmp_path / "gsm8k_extra.jsonl"
    gsm8k.write_text(json.dumps({"question": "Ann has 5 pens and loses 2. How many?", "answer": "5 - 2 = 3\n#### 3"}))
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"question": "What is 6 times 7?", "answer": "42"}))
    cfg = micro(problems={"files": [str(gsm8k)], "synthetic": {"n_problems": 5}})
    build_problems(store, cfg.problems)
    report = write_traces(store, cfg.teacher)
    builtin = store.warehouse.scalar("SELECT count(*) FROM problems WHERE source = 'synthetic-arith'")  # OOD too
    assert report.details["teacher"] == "auto" and builtin >= 5
    assert report.details["teacher_by_source"] == (
        f"gsm8k_extra: reference (1); synthetic-arith: programmatic-flow ({builtin})"
    )
    rows = store.warehouse.query("SELECT teacher, count(*) AS n FROM teacher_traces GROUP BY ALL ORDER BY ALL")
    assert [(r["teacher"], r["n"]) for r in rows] == [("programmatic-flow", builtin), ("reference", 1)]
    # a source with neither a worked solution nor an endpoint fails loudly, saying what to configure
    build_problems(store, cfg.problems.model_copy(update={"files": [str(plain)]}))
    with pytest.raises(StageFailed, match=r"no teacher for source 'plain'.*teacher\.endpoint\.base_urls"):
        write_traces(store, cfg.teacher)
    # with an endpoint configured, the files' problems go to it and the built-in ones stay programmatic
    endpoint = EndpointConfig(base_urls=["http://127.0.0.1:9/v1"], model="r1")  # never called: routing only
    teacher = build_teacher(cfg.teacher.model_copy(update={"endpoint": endpoint}), tmp_path / "journals")
    assert isinstance(teacher, PerSourceTeacher) and isinstance(teacher.model, EndpointTeacher)
    problems = {p["source"]: p for p in store.warehouse.query(f"SELECT {PROBLEM_COLUMNS} FROM problems p")}
    assert teacher.route(Problem(**problems["gsm8k_extra"])) is teacher.model
    assert teacher.route(Problem(**problems["synthetic-arith"])) is teacher.builtin


def test_a_gsm8k_file_dropped_into_incoming_is_refreshed_end_to_end(tmp_path: Path, monkeypatch) -> None:
    """The demo instance's path: the sensor sees the file and requests `data_refresh`; the job's run traces the
    built-in problems with the programmatic teacher and the file's with their own worked solutions."""
    from pipelines.defs import automation

    home = tmp_path / "dagster_home"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    instance = new_instance(home)
    incoming = home / "incoming"
    incoming.mkdir()
    gsm8k = [
        ("Natalia sold 48 clips in April and half as many in May. How many clips did she sell?", "48/2 = 24", 72),
        ("Weng earns $12 an hour. She babysat for 5 hours. How much did she earn?", "12*5 = 60", 60),
        ("Betty has 15 dollars and her parents give her 15 more. How much does she have?", "15+15 = 30", 30),
        ("A farm has 7 cows and buys 6 more. How many cows are there now?", "7+6 = 13", 13),
    ]
    path = incoming / "gsm8k_extra.jsonl"
    path.write_text(
        "".join(
            json.dumps({"question": q, "answer": f"So: {w} <<{w}>>.\nThe total is {n}.\n#### {n}"}) + "\n"
            for q, w, n in gsm8k
        )
    )
    try:
        (request,) = automation.new_problem_file_sensor(dg.build_sensor_context(instance=instance)).run_requests
        job = definitions().resolve_job_def(request.job_name or "data_refresh")
        assert job.name == "data_refresh"
        result = job.execute_in_process(
            run_config=run_config(micro(), DATA_ASSETS), instance=instance, tags=request.tags, raise_on_error=False
        )
        assert result.success, failures(result)
        traces = metadata(result, "teacher_traces")
        wh = Warehouse(home / "warehouse.duckdb")
        builtin = wh.scalar("SELECT count(*) FROM problems WHERE source = 'synthetic-arith'")
        assert builtin >= 60 and traces["teacher_by_source"] == (
            f"gsm8k_extra: reference (4); synthetic-arith: programmatic-flow ({builtin})"
        )
        landed = wh.query(
            """SELECT p.source, t.teacher, count(DISTINCT t.trace_id) AS traces, bool_and(t.is_correct) AS correct,
                      count(s.step_id) AS steps, count(l.step_id) AS labels, any_value(s.segmenter) AS segmenter
               FROM problems p JOIN teacher_traces t USING (problem_id) JOIN segmented_steps s USING (trace_id)
               LEFT JOIN signal_labels l USING (step_id) WHERE p.source = 'gsm8k_extra' GROUP BY ALL"""
        )
        assert len(landed) == 1
        row = landed[0]
        assert (row["teacher"], row["traces"], row["correct"], row["segmenter"]) == ("reference", 4, True, "line")
        assert row["steps"] == 12 and row["labels"] == 12  # three lines each, every one labelled
    finally:
        instance.dispose()
