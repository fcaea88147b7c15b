"""The data stages against a real DuckDB file: rows, parent-id joins, idempotence, growth, quarantine."""

from __future__ import annotations

import signal
import subprocess
import sys

import pyarrow as pa
import pytest

from scaffold_lib.core.errors import StageFailed, UserError
from scaffold_lib.data.label_stats import signal_distribution_markdown
from scaffold_lib.data.problem_files import load_problem_file
from scaffold_lib.data.problems import Problem
from scaffold_lib.data.segmentation import segment
from scaffold_lib.data.signals import SIGNALS
from scaffold_lib.data.synthetic import GeneratorConfig, generate_problems
from scaffold_lib.data.teachers import ProgrammaticTeacher, ProgrammaticTeacherConfig
from scaffold_lib.store.warehouse import Warehouse
from support.stages import FOREIGN, generate_teacher_traces, label_signals, segment_traces, store_problems

DATA_TABLES = ("problems", "teacher_traces", "segmented_steps", "signal_labels")


def problems(n: int) -> list[Problem]:
    return generate_problems(GeneratorConfig(n_problems=n, seed=0))


def run_all(wh: Warehouse, ps: list[Problem], teacher=None, run_id: str | None = None) -> dict:
    teacher = teacher or ProgrammaticTeacher()
    return {
        r.stage: r
        for r in (
            store_problems(wh, ps, run_id=run_id),
            generate_teacher_traces(wh, teacher, run_id=run_id),
            segment_traces(wh, run_id=run_id),
            label_signals(wh, run_id=run_id),
        )
    }


def test_rows_in_every_data_table(warehouse_path):
    wh = Warehouse(warehouse_path)
    reports = run_all(wh, problems(20), run_id="run-1")
    counts = wh.counts()
    assert counts["problems"] == 20 and counts["teacher_traces"] == 20
    assert counts["segmented_steps"] >= 20 * 4
    assert counts["signal_labels"] == counts["segmented_steps"]
    assert counts["teacher_failures"] == 0 and counts["quarantine"] == 0
    for table in DATA_TABLES:
        assert reports[table].new_rows == reports[table].total_rows == counts[table]
    assert reports["teacher_traces"].details["asked"] == 20
    # every row records the run that wrote it
    for table in DATA_TABLES:
        assert wh.scalar(f"SELECT count(*) FROM {table} WHERE dagster_run_id = 'run-1'") == counts[table]
    labels = reports["signal_labels"].details
    assert labels["steps"] == counts["signal_labels"]
    assert 0.7 < labels["keyword_coverage"] <= 1.0
    assert labels["by_signal"]["response_generation"] >= 20
    assert "| conclusion_summary |" in signal_distribution_markdown(labels["by_signal"])


def test_parent_ids_join(warehouse_path):
    wh = Warehouse(warehouse_path)
    run_all(wh, problems(20))
    orphans = {
        "trace without problem": "SELECT count(*) FROM teacher_traces t ANTI JOIN problems p USING (problem_id)",
        "step without trace": "SELECT count(*) FROM segmented_steps s ANTI JOIN teacher_traces t USING (trace_id)",
        "label without step": "SELECT count(*) FROM signal_labels l ANTI JOIN segmented_steps s USING (step_id)",
        "step without label": "SELECT count(*) FROM segmented_steps s ANTI JOIN signal_labels l USING (step_id)",
        "problem without trace": "SELECT count(*) FROM problems p ANTI JOIN teacher_traces t USING (problem_id)",
    }
    assert {k: wh.scalar(sql) for k, sql in orphans.items()} == {k: 0 for k in orphans}
    # steps of each trace are numbered 0..n-1, are exactly segment(text), and the last one is the answer
    for t in wh.query("SELECT trace_id, text FROM teacher_traces"):
        rows = wh.query(
            "SELECT s.idx, s.text, l.signal FROM segmented_steps s JOIN signal_labels l USING (step_id) "
            "WHERE trace_id = ? ORDER BY idx",
            [t["trace_id"]],
        )
        assert [r["idx"] for r in rows] == list(range(len(rows)))
        assert [r["text"] for r in rows] == segment(t["text"])
        assert rows[-1]["signal"] == "response_generation"
    assert {r["signal"] for r in wh.query("SELECT DISTINCT signal FROM signal_labels")} <= set(SIGNALS)


def test_rerun_is_idempotent(warehouse_path):
    wh = Warehouse(warehouse_path)
    run_all(wh, problems(15))
    before = wh.counts()
    reports = run_all(wh, problems(15))
    assert wh.counts() == before
    assert all(r.new_rows == 0 for r in reports.values())
    assert reports["teacher_traces"].details["asked"] == 0
    assert reports["teacher_traces"].details["skipped_existing"] == 15
    # a fresh Warehouse object on the same file sees the same rows
    assert Warehouse(warehouse_path).counts() == before


def test_growing_the_problem_set_only_does_the_new_work(warehouse_path):
    wh = Warehouse(warehouse_path)
    run_all(wh, problems(12))
    old_traces = {r["trace_id"] for r in wh.query("SELECT trace_id FROM teacher_traces")}
    old_steps = {r["step_id"]: r["created_at"] for r in wh.query("SELECT step_id, created_at FROM segmented_steps")}

    grown = problems(20)
    assert grown[:12] == problems(12)
    reports = run_all(wh, grown)
    assert reports["problems"].new_rows == 8
    assert reports["teacher_traces"].details["asked"] == 8  # the teacher is asked only for the new problems
    assert reports["teacher_traces"].new_rows == 8

    new_traces = {r["trace_id"] for r in wh.query("SELECT trace_id FROM teacher_traces")} - old_traces
    assert len(new_traces) == 8
    new_problem_ids = {p.problem_id for p in grown[12:]}
    assert {
        r["problem_id"]
        for r in wh.query(
            "SELECT problem_id FROM teacher_traces WHERE list_contains(?, trace_id)", [sorted(new_traces)]
        )
    } == new_problem_ids
    steps_of_new = wh.scalar(
        "SELECT count(*) FROM segmented_steps WHERE list_contains(?, trace_id)", [sorted(new_traces)]
    )
    assert reports["segmented_steps"].new_rows == steps_of_new
    assert reports["signal_labels"].new_rows == steps_of_new
    # old rows are untouched (not rewritten)
    after = {r["step_id"]: r["created_at"] for r in wh.query("SELECT step_id, created_at FROM segmented_steps")}
    assert {k: after[k] for k in old_steps} == old_steps


def test_another_teacher_config_gets_its_own_traces(warehouse_path):
    wh = Warehouse(warehouse_path)
    run_all(wh, problems(10))
    report = generate_teacher_traces(wh, ProgrammaticTeacher(ProgrammaticTeacherConfig(seed=5)))
    assert report.details["asked"] == 10 and report.new_rows == 10
    assert wh.counts()["teacher_traces"] == 20


def test_splits_filter(warehouse_path):
    wh = Warehouse(warehouse_path)
    ps = problems(40)
    store_problems(wh, ps)
    report = generate_teacher_traces(wh, ProgrammaticTeacher(), splits=("test",))
    n_test = sum(p.split == "test" for p in ps)
    assert 0 < n_test < 40
    assert report.details["asked"] == report.new_rows == n_test
    assert wh.scalar("SELECT count(*) FROM teacher_traces JOIN problems USING (problem_id) WHERE split <> 'test'") == 0


def test_whitespace_only_trace_is_quarantined_not_dropped(warehouse_path):
    wh = Warehouse(warehouse_path)
    run_all(wh, problems(5))
    pid = wh.scalar("SELECT min(problem_id) FROM problems")
    blank = {
        "trace_id": "blank-trace-0001",
        "problem_id": pid,
        "teacher": "imported",
        "text": " \n\n\t \r\n \n",
        "final_answer": None,
        "is_correct": False,
        "prompt_tokens": 0,
        "completion_tokens": 0,
    }
    assert wh.insert_new("teacher_traces", [blank]) == 1
    steps_before = wh.counts()["segmented_steps"]

    # the only new trace was empty: the stage says so (non-zero), after recording the quarantine row
    with pytest.raises(StageFailed, match="every one of the 1 new traces was empty"):
        segment_traces(wh)
    rows = wh.query("SELECT stage, source_file, field, error FROM quarantine")
    assert rows == [
        {
            "stage": "segmented_steps",
            "source_file": "blank-trace-0001",
            "field": "text",
            "error": "trace has no non-empty step",
        }
    ]
    assert wh.counts()["segmented_steps"] == steps_before
    # the next run neither re-quarantines it nor tries it again
    again = segment_traces(wh)
    assert again.details["empty_traces_quarantined"] == 0 and wh.counts()["quarantine"] == 1
    assert label_signals(wh).new_rows == 0


def test_lenient_loader_quarantine_lands_in_the_table(warehouse_path, write_jsonl):
    path = write_jsonl(
        [
            {"question": "What is 2+2?", "answer": "#### 4"},
            b"{oops",
            {"question": "", "answer": "1"},
            {"question": "What is 3+3?", "answer": "#### 6"},
        ],
        name="user.jsonl",
    )
    loaded = load_problem_file(path, lenient=True)
    wh = Warehouse(warehouse_path)
    report = store_problems(wh, loaded.problems, loaded.quarantined)
    assert report.new_rows == 2 and report.details["quarantined"] == 2
    rows = wh.query("SELECT stage, source_file, line, field FROM quarantine ORDER BY line")
    assert rows == [
        {"stage": "problems", "source_file": str(path), "line": 2, "field": "<row>"},
        {"stage": "problems", "source_file": str(path), "line": 3, "field": "question"},
    ]
    assert "{oops" in wh.scalar("SELECT raw FROM quarantine WHERE line = 2")
    # storing the same load again adds nothing
    store_problems(wh, loaded.problems, loaded.quarantined)
    assert wh.counts()["quarantine"] == 2 and wh.counts()["problems"] == 2


def test_teacher_failures_are_recorded_and_retried(warehouse_path):
    wh = Warehouse(warehouse_path)
    store_problems(wh, [FOREIGN, *problems(3)])
    report = generate_teacher_traces(wh, ProgrammaticTeacher())
    assert report.details["asked"] == 4 and report.details["failed"] == 1 and report.new_rows == 3
    failure = wh.query("SELECT problem_id, error FROM teacher_failures")
    assert len(failure) == 1 and failure[0]["problem_id"] == FOREIGN.problem_id
    # no trace exists for it, so the next run asks again; answering nothing at all fails loudly, with the reason,
    # and the failure is recorded (once, not duplicated)
    with pytest.raises(StageFailed, match=r"answered none of 1 problems: 1 x .*only solves the built-in synthetic"):
        generate_teacher_traces(wh, ProgrammaticTeacher())
    assert wh.counts()["teacher_failures"] == 1


def test_insert_new_rejects_unknown_table(warehouse_path):
    with pytest.raises(KeyError):
        Warehouse(warehouse_path).insert_new("nope", [{"a": 1}])
    assert Warehouse(warehouse_path).insert_new("problems", []) == 0


def test_the_unindexed_step_tables_keep_one_row_per_key(warehouse_path):
    """segmented_steps and signal_labels have no primary-key index (millions of rows): insert_new skips keys already
    there or repeated in the batch, upsert replaces, in a new warehouse as in one created with the index."""
    wh = Warehouse(warehouse_path)
    step = {"step_id": "s1", "trace_id": "t1", "idx": 0, "text": "So 3."}
    assert wh.insert_new("segmented_steps", [step, {**step, "text": "twice in a batch"}]) == 1
    assert wh.insert_new("segmented_steps", [step, {**step, "step_id": "s2", "idx": 1}]) == 1
    label = {"step_id": "s1", "signal": "reasoning_analysis", "labeller": "keyword", "confidence": 1.0}
    assert wh.insert_new("signal_labels", [label]) == 1 and wh.insert_new("signal_labels", [label]) == 0
    wh.upsert("signal_labels", [{**label, "signal": "contrast_concession", "labeller": "llm-override"}])
    assert wh.query("SELECT step_id, signal, labeller FROM signal_labels") == [
        {"step_id": "s1", "signal": "contrast_concession", "labeller": "llm-override"}
    ]
    assert wh.scalar("SELECT count(*) FROM segmented_steps") == 2
    indexes = wh.scalar(
        "SELECT count(*) FROM duckdb_constraints() WHERE constraint_type = 'PRIMARY KEY' "
        "AND table_name IN ('segmented_steps', 'signal_labels')"
    )
    assert indexes == 0


def test_append_writes_a_stages_new_rows_only_inside_a_session(warehouse_path):
    """`append` skips the key check (the stage's own pending query found the rows new), so it refuses to run where
    another process could have written in between: outside a session."""
    wh = Warehouse(warehouse_path)
    steps = pa.table({"step_id": ["s1", "s2"], "trace_id": ["t1", "t1"], "idx": [0, 1], "text": ["So 3.", "Then 4."]})
    with pytest.raises(RuntimeError, match="inside session"):
        wh.append("segmented_steps", steps)
    with wh.session():
        assert (
            wh.append("segmented_steps", steps, "run-1") == 2 and wh.append("segmented_steps", steps.slice(0, 0)) == 0
        )
    assert wh.query("SELECT step_id, idx, dagster_run_id FROM segmented_steps ORDER BY idx") == [
        {"step_id": "s1", "idx": 0, "dagster_run_id": "run-1"},
        {"step_id": "s2", "idx": 1, "dagster_run_id": "run-1"},
    ]
    with pytest.raises(KeyError), wh.session():
        wh.append("nope", steps)


def test_batches_stay_in_the_write_ahead_log_until_a_checkpoint_and_survive_kill_9(tmp_path):
    """Committed batches of R1-sized traces are not checkpointed one by one (DuckDB's default would after every 16 MB,
    rewriting a half-written row group each time): they stay in the write-ahead log, and a process killed before
    any checkpoint loses none of them."""
    writer = f"""
import os, signal
from scaffold_lib.store.warehouse import Warehouse
wh = Warehouse({str(tmp_path / "wh.duckdb")!r})
text = "Wait, so the total is 12 apples. " * 600
with wh.session():
    for batch in range(2):
        rows = [{{"trace_id": f"t{{batch}}-{{i}}", "problem_id": "p", "teacher": "x", "text": text + str(i),
                  "is_correct": True}} for i in range(1_000)]
        assert wh.insert_new("teacher_traces", rows) == 1_000
    wal = wh.path.with_name(wh.path.name + ".wal")
    print(wal.stat().st_size if wal.exists() else 0, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", writer], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert int(proc.stdout) > 2 * 16 * 2**20  # both 20 MB batches still in the log: no checkpoint in between
    wh = Warehouse(tmp_path / "wh.duckdb")
    assert wh.scalar("SELECT count(*) FROM teacher_traces") == 2_000


def test_an_import_session_writes_its_row_groups_into_the_file_and_a_later_checkpoint_keeps_them(tmp_path):
    """In a session with `row_group_rows`, each insert of that many traces goes straight into the file, not through the
    write-ahead log: a process killed before any checkpoint loses none of them. A later checkpoint at the default row
    group size leaves those row groups as written (DuckDB's vacuum would merge, i.e. rewrite, the whole table)."""
    writer = f"""
import os, signal
from scaffold_lib.store.warehouse import TRACE_ROW_GROUP_ROWS, Warehouse
wh = Warehouse({str(tmp_path / "wh.duckdb")!r})
text = "Wait, so the total is 12 apples. " * 60
with wh.session(row_group_rows=TRACE_ROW_GROUP_ROWS):
    for batch in range(2):
        rows = [{{"trace_id": f"t{{batch}}-{{i}}", "problem_id": "p", "teacher": "x", "text": text + str(i),
                  "is_correct": True}} for i in range(TRACE_ROW_GROUP_ROWS)]
        assert wh.insert_new("teacher_traces", rows) == TRACE_ROW_GROUP_ROWS
    wal = wh.path.with_name(wh.path.name + ".wal")
    print(wal.stat().st_size if wal.exists() else 0, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", writer], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert int(proc.stdout) < 2**20  # 2 x 4 MB of traces committed, not in the log: in the file
    wh = Warehouse(tmp_path / "wh.duckdb")
    assert wh.scalar("SELECT count(*) FROM teacher_traces") == 2 * 2048
    wh.insert_new("problems", [{"problem_id": "p", "source": "s", "split": "train", "question": "q", "answer": "1",
                                "answer_type": "int"}])  # fmt: skip
    with wh.connect() as con:
        con.execute("CHECKPOINT")
        groups = con.execute(
            "SELECT count(DISTINCT row_group_id) FROM pragma_storage_info('teacher_traces') WHERE column_name = 'text'"
        ).fetchone()[0]
    assert groups == 2


@pytest.mark.parametrize("setting", ["auto", "uncompressed"])
def test_text_compression_is_a_setting(tmp_path, monkeypatch, setting):
    """SCAFFOLD_DUCKDB_COMPRESSION=uncompressed stores trace text as written (faster writes, a larger file); auto
    leaves it to DuckDB, which compresses long repetitive text; any other value is refused by name."""
    monkeypatch.setenv("SCAFFOLD_DUCKDB_COMPRESSION", setting)
    wh = Warehouse(tmp_path / "wh.duckdb")
    text = "Wait, so the total is 12 apples. " * 400
    rows = [
        {"trace_id": f"t{i}", "problem_id": "p", "teacher": "x", "text": text + str(i), "is_correct": True}
        for i in range(200)
    ]
    assert wh.insert_new("teacher_traces", rows) == 200
    with wh.connect() as con:
        con.execute("CHECKPOINT")
        used = {
            r[0]
            for r in con.execute(
                "SELECT compression FROM pragma_storage_info('teacher_traces') WHERE column_name = 'text' AND segment_type = 'VARCHAR'"
            ).fetchall()
        }
    assert (used == {"Uncompressed"}) == (setting == "uncompressed"), used
    monkeypatch.setenv("SCAFFOLD_DUCKDB_COMPRESSION", "lz4")
    with pytest.raises(UserError, match="SCAFFOLD_DUCKDB_COMPRESSION='lz4': choose one of"):
        Warehouse(tmp_path / "other.duckdb")


def test_behind_writer_writes_in_order_and_surfaces_a_failed_write():
    from scaffold_lib.store.writing import BehindWriter

    done = []
    with BehindWriter() as writer:
        for i in range(5):
            writer.submit(lambda i=i: done.append(i) or i)
    assert done == [0, 1, 2, 3, 4] and writer.results == [0, 1, 2, 3, 4]

    def fail():
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        with BehindWriter() as writer:
            writer.submit(fail)
            writer.submit(lambda: done.append("after"))  # waits for the failed write first: raises here
    assert "after" not in done
    with pytest.raises(OSError, match="disk full"), BehindWriter() as writer:
        writer.submit(fail)  # the last write fails: raised on leaving the block
