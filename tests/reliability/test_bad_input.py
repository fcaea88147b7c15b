"""Guarantee 3: bad input gets a clear error naming the file, line and field, or is quarantined and counted; it
never crashes a run with a bare traceback and never drops a row silently. Property-based where it fits: counts of
rows in must equal problems + quarantined rows + exact duplicates for any file content."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scaffold_lib.data.problem_files import FieldMap, ProblemFileError, load_problem_file
from scaffold_lib.data.segmentation import segment
from scaffold_lib.data.signals import SIGNALS, KeywordFileError, KeywordTable, label_steps
from scaffold_lib.data.trace_import import ImportedTeacher, TraceFieldMap
from scaffold_lib.store.warehouse import Warehouse
from support.stages import generate_teacher_traces, segment_traces, store_problems

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
raw_lines = st.one_of(
    st.fixed_dictionaries({"question": json_values, "answer": json_values}).map(json.dumps),  # wrong types
    st.fixed_dictionaries({"question": st.text(min_size=1, max_size=40), "answer": st.integers(-99, 99)}).map(
        json.dumps
    ),
    st.dictionaries(st.sampled_from(["question", "answer", "other"]), json_values, max_size=3).map(json.dumps),
    st.text(max_size=40).filter(lambda s: "\n" not in s and "\r" not in s),  # not JSON at all, or blank
    st.binary(max_size=20).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b"")),  # non-UTF-8, NUL bytes
)
CASES = {"problem files": 0, "problem rows": 0, "traces": 0}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(raw_lines, min_size=1, max_size=12))
def test_every_row_of_any_problem_file_is_a_problem_a_quarantine_row_or_a_duplicate(tmp_path_factory, lines) -> None:
    path = tmp_path_factory.mktemp("files") / "problems.jsonl"
    path.write_bytes(
        b"\n".join(line if isinstance(line, bytes) else line.encode("utf-8", "surrogatepass") for line in lines) + b"\n"
    )
    result = load_problem_file(path, FieldMap(), lenient=True)
    non_blank = [line for line in path.read_bytes().split(b"\n") if line.strip()]
    # every quarantined row names its line and field; nothing vanished except exact duplicates and blank lines
    for q in result.quarantined:
        assert 1 <= q.line <= len(lines) and q.field and q.error
    duplicates = len(non_blank) - len(result.problems) - len(result.quarantined)
    assert duplicates >= 0
    assert duplicates == 0 or len({p.problem_id for p in result.problems}) == len(result.problems)
    try:  # strict mode: the first bad row is an error naming file and line, never another exception
        load_problem_file(path, FieldMap(), lenient=False)
    except ProblemFileError as exc:
        assert str(exc).startswith(f"{path}:") and "field" in str(exc)
    CASES["problem files"] += 1
    CASES["problem rows"] += len(lines)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=400) | st.binary(max_size=200).map(lambda b: b.decode("utf-8", "replace")))
def test_segmentation_and_labelling_never_raise_on_any_string(text: str) -> None:
    steps = segment(text)
    labels = label_steps(steps)
    assert len(labels) == len(steps) and all(s.strip() for s in steps)
    assert all(label.signal in SIGNALS for label in labels)
    CASES["traces"] += 1


def test_huge_nul_and_whitespace_traces_are_segmented_or_quarantined_not_crashed(tmp_path: Path) -> None:
    wh = Warehouse(tmp_path / "wh.duckdb")
    from scaffold_lib.data.synthetic import GeneratorConfig, generate_problems

    problems = generate_problems(GeneratorConfig(n_problems=4, seed=1))
    store_problems(wh, problems)
    huge = "\n\n".join(f"So step {i} adds {i}." for i in range(400_000))  # ~10 MB
    assert len(huge) > 9_000_000
    texts = [huge, "So\x00 it is 3.\n\nThe answer is 3.", "   \n\t\n  ", ""]
    rows = [{"problem": p.question, "generation": t} for p, t in zip(problems, texts)]
    path = tmp_path / "traces.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = generate_teacher_traces(wh, ImportedTeacher(str(path), TraceFieldMap()))
    # NUL bytes and blank traces are quarantined with line and field; the 10 MB trace goes through
    quarantined = {(q["line"], q["field"], q["error"]) for q in wh.query("SELECT line, field, error FROM quarantine")}
    assert quarantined == {
        (2, "generation", "contains NUL bytes"),
        (3, "generation", "is empty"),
        (4, "generation", "is empty"),
    }
    assert report.new_rows == 1
    segmented = segment_traces(wh)
    assert segmented.new_rows == 400_000 and wh.scalar("SELECT max(length(text)) FROM segmented_steps") < 40


def test_the_label_command_names_file_and_line_for_non_utf8_and_nul(tmp_path: Path) -> None:
    path = tmp_path / "traces.jsonl"
    path.write_bytes(b'{"id": "a", "trace": "So 1.\\n\\nThe answer is 1."}\n{"id": "b", "trace": "bad \xff byte"}\n')
    out = subprocess.run(
        [sys.executable, "-m", "scaffold_lib.cli", "label", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"{path}:2: not UTF-8 (" in out.stderr and "re-encode the file as UTF-8" in out.stderr
    assert out.stdout.count("\n") == 2  # the first trace's steps were written before the error


def test_unknown_signal_names_in_a_keyword_file_are_named(tmp_path: Path) -> None:
    path = tmp_path / "keywords.toml"
    path.write_text('[contrast_concession]\nkeywords = ["but"]\n\n[wild_guess]\nkeywords = ["maybe"]\n')
    try:
        KeywordTable.load(path)
    except KeywordFileError as exc:
        assert str(path) in str(exc) and "wild_guess" in str(exc)
    else:
        raise AssertionError("an unknown signal name must be refused")


def test_a_problem_file_changing_under_the_sensor_is_picked_up_again_and_half_lines_are_quarantined(
    tmp_path: Path, monkeypatch
) -> None:
    from pipelines.defs.automation import new_problem_file_sensor

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    path = incoming / "gsm8k.jsonl"
    path.write_text(json.dumps({"question": "Tom has 3 apples. How many?", "answer": "#### 3"}) + "\n")
    first = new_problem_file_sensor(dg.build_sensor_context(instance=dg.DagsterInstance.ephemeral()))
    with path.open("a") as fh:  # a writer is half-way through the second line when the sensor looks again
        fh.write('{"question": "Ann has 2 pe')
    os.utime(path, (path.stat().st_atime, path.stat().st_mtime + 5))
    second = new_problem_file_sensor(dg.build_sensor_context(instance=dg.DagsterInstance.ephemeral()))
    assert first.run_requests[0].run_key != second.run_requests[0].run_key  # a changed file is a new run
    loaded = load_problem_file(path, FieldMap(), lenient=True)
    assert len(loaded.problems) == 1 and [(q.line, q.field) for q in loaded.quarantined] == [(2, "<row>")]


def test_zz_report_how_many_cases_were_tried() -> None:
    # named to run last in this module: the figures docs/reliability.md quotes
    print(
        f"\n[reliability] bad input: {CASES['problem files']} generated problem files with {CASES['problem rows']} "
        f"rows, {CASES['traces']} generated traces; no crash, every row accounted for"
    )
    assert CASES["problem files"] >= 100 and CASES["traces"] >= 100
