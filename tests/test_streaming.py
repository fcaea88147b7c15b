"""The data stages stream (issue: scale) and a refresh does only the new work: batches of any size write the same
rows; problem files and trace files are read once unless they change; packing appends shards for new traces when
the tokenizer is unchanged and repacks when a packed trace stops being a training trace."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from scaffold_lib.data import collect
from scaffold_lib.data.collect import build_problems
from scaffold_lib.data.config import LabellerConfig, ProblemsConfig, TeacherConfig
from scaffold_lib.data.label import label_signals
from scaffold_lib.data.problems import Gold, Problem
from scaffold_lib.data.segment import segment_traces, trace_start
from scaffold_lib.data.signals import ANSWER_SIGNAL, SIGNALS
from scaffold_lib.data.synthetic import GeneratorConfig, generate_problems
from scaffold_lib.data.trace import IMPORT_BATCH, write_traces
from scaffold_lib.data.trace_import import ImportedTeacher, TodoProblems, TraceFieldMap
from scaffold_lib.store.store import Store
from scaffold_lib.store.training_data import shards_of_manifest, training_traces
from scaffold_lib.store.warehouse import ROW_GROUP_ROWS, Warehouse
from scaffold_lib.student.config import PackConfig, ShardsConfig, StudentConfig
from scaffold_lib.student.examples import STEP_SEPARATOR, signal_tags, training_corpus
from scaffold_lib.student.model import build_embedded_base
from scaffold_lib.student.pack import pack_shards
from student_kit import TINY
from support.stages import ALL_SPLITS, generate_teacher_traces, store_problems

TABLES = {"segmented_steps": "step_id", "signal_labels": "step_id", "teacher_traces": "trace_id"}


def _data(store: Store, n: int, seed: int, batch: int | None = None) -> None:
    store_problems(store.warehouse, generate_problems(GeneratorConfig(n_problems=n, seed=seed)))
    cfg = TeacherConfig(splits=list(ALL_SPLITS), **({"batch_problems": batch} if batch else {}))
    write_traces(store, cfg)
    segment_traces(store, **({"batch_traces": batch, "write_rows": batch * 4} if batch else {}))
    label_signals(store, **({"batch_steps": batch * 3} if batch else {}))


def _rows(store: Store, table: str, key: str) -> list[tuple]:
    columns = {
        "segmented_steps": "step_id, trace_id, idx, text, segmenter",
        "signal_labels": "step_id, signal, labeller, keyword, confidence",
        "teacher_traces": "trace_id, problem_id, text, final_answer, is_correct",
    }[table]
    return [tuple(r.values()) for r in store.warehouse.query(f"SELECT {columns} FROM {table} ORDER BY {key}")]


def test_batches_of_any_size_write_the_same_rows(tmp_path):
    whole, batched = Store.at(tmp_path / "whole"), Store.at(tmp_path / "batched")
    _data(whole, 40, seed=3)
    _data(batched, 40, seed=3, batch=3)  # 3 problems, 3 traces, 9 steps per batch: many batches
    for table, key in TABLES.items():
        rows = _rows(whole, table, key)
        assert rows and rows == _rows(batched, table, key), table


def test_a_refresh_reads_only_new_problems_and_traces(tmp_path):
    store = Store.at(tmp_path)
    _data(store, 30, seed=1)
    before = store.warehouse.counts()
    report = write_traces(store, TeacherConfig(splits=list(ALL_SPLITS), batch_problems=4))
    assert report.new_rows == 0 and report.details["asked"] == 0 and report.details["skipped_existing"] == 30
    assert segment_traces(store).new_rows == 0 and label_signals(store).new_rows == 0
    _data(store, 5, seed=99)
    after = store.warehouse.counts()
    assert after["problems"] == before["problems"] + 5
    assert after["teacher_traces"] == before["teacher_traces"] + 5
    assert after["segmented_steps"] > before["segmented_steps"]
    assert after["signal_labels"] == after["segmented_steps"]


def test_a_changed_keyword_table_relabels_every_step_and_an_unchanged_one_nothing(tmp_path):
    store = Store.at(tmp_path)
    _data(store, 20, seed=4)
    wh = store.warehouse
    steps = wh.scalar("SELECT count(*) FROM segmented_steps")
    assert label_signals(store).new_rows == 0
    # the most used keyword, moved to another signal by a custom table
    keyword, signal = wh.query(
        "SELECT keyword, signal FROM signal_labels WHERE labeller = 'keyword' GROUP BY ALL ORDER BY count(*) DESC LIMIT 1"
    )[0].values()
    other = next(s for s in SIGNALS if s not in (signal, ANSWER_SIGNAL))
    custom = tmp_path / "keywords.toml"
    custom.write_text(f'[{other}]\nkeywords = ["{keyword}"]\n')
    cfg = LabellerConfig(keywords_path=str(custom))
    assert label_signals(store, cfg).new_rows == steps  # every step labelled again, under the new table
    assert wh.scalar("SELECT count(*) FROM signal_labels") == steps
    moved = wh.query("SELECT DISTINCT signal FROM signal_labels WHERE keyword = ? AND labeller = 'keyword'", [keyword])
    assert [r["signal"] for r in moved] == [other]
    assert label_signals(store, cfg).new_rows == 0
    # back to the built-in table: relabelled once more, as before
    assert label_signals(store).new_rows == steps
    back = wh.query("SELECT DISTINCT signal FROM signal_labels WHERE keyword = ? AND labeller = 'keyword'", [keyword])
    assert [r["signal"] for r in back] == [signal]


def test_problem_files_are_read_once_unless_they_change(tmp_path):
    store = Store.at(tmp_path)
    problems = generate_problems(GeneratorConfig(n_problems=6, seed=2))
    path = tmp_path / "incoming.jsonl"
    pd.DataFrame([{"question": p.question, "answer": p.answer} for p in problems[:4]]).to_json(
        path, orient="records", lines=True
    )
    cfg = ProblemsConfig(source="files", files=[str(path)])
    first = build_problems(store, cfg)
    assert first.new_rows == 4 and first.details["files_loaded"] == 1
    again = build_problems(store, cfg)
    assert again.new_rows == 0 and again.details["files_loaded"] == 0  # unchanged: not read
    pd.DataFrame([{"question": p.question, "answer": p.answer} for p in problems]).to_json(
        path, orient="records", lines=True
    )
    os.utime(path, ns=(1, 1))  # a new size and mtime: the file is read again
    changed = build_problems(store, cfg)
    assert changed.new_rows == 2 and changed.details["files_loaded"] == 1


def test_a_problem_file_streams_in_batches_that_write_what_one_batch_would(tmp_path, monkeypatch):
    """The problems stage holds one batch of a file, not the file: batches of 3 write the same problems and
    quarantined rows as one batch, a problem repeated in a later batch stays one problem, its first row."""
    problems = generate_problems(GeneratorConfig(n_problems=8, seed=6))
    rows = [{"question": p.question, "answer": p.answer} for p in problems]
    rows.insert(5, {"question": "", "answer": "3"})  # quarantined: an empty question
    rows.append({**rows[1], "group": "a repeat, read in the last batch"})
    path = tmp_path / "problems.jsonl"
    pd.DataFrame(rows).to_json(path, orient="records", lines=True)
    cfg = ProblemsConfig(source="files", files=[str(path)], lenient=True)
    whole = build_problems(Store.at(tmp_path / "whole"), cfg)
    monkeypatch.setattr(collect, "PROBLEM_BATCH", 3)
    batched_store = Store.at(tmp_path / "batched")
    batched = build_problems(batched_store, cfg)
    assert whole.new_rows == batched.new_rows == 8 and whole.total_rows == batched.total_rows == 8
    assert whole.details["quarantined"] == batched.details["quarantined"] == 1
    columns = "problem_id, source, split, question, answer, answer_type, group_id"
    tables = [
        s.warehouse.query(f"SELECT {columns} FROM problems ORDER BY problem_id")
        for s in (Store.at(tmp_path / "whole"), batched_store)
    ]
    assert tables[0] == tables[1]
    assert not any(r["group_id"].startswith("group:") for r in tables[1])  # the repeat's own group did not win


def test_trace_import_streams_a_folder_and_reads_new_files_for_new_problems(tmp_path):
    store = Store.at(tmp_path)
    problems = generate_problems(GeneratorConfig(n_problems=12, seed=4))
    store_problems(store.warehouse, problems[:8])
    folder = tmp_path / "traces"
    folder.mkdir()

    def write(name: str, subset) -> None:
        rows = [
            {"problem": p.question, "generation": f"So it is {p.answer}.\n\nThe answer is {p.answer}."} for p in subset
        ]
        # small row groups: the importer reads only the question column of groups with no wanted problem
        pd.DataFrame(rows).to_parquet(folder / name, row_group_size=3)

    write("part-0.parquet", problems[:8])
    teacher = ImportedTeacher(str(folder), TraceFieldMap(), name="dump")
    first = generate_teacher_traces(store.warehouse, teacher)
    assert first.new_rows == 8 and first.details["not_covered"] == 0
    assert first.details["run"]["rows_imported"] == 8
    # new problems arrive with a new file; only they are matched, the old file's rows are skipped unread
    store_problems(store.warehouse, problems[8:])
    write("part-1.parquet", problems[8:])
    second = generate_teacher_traces(store.warehouse, ImportedTeacher(str(folder), TraceFieldMap(), name="dump"))
    assert second.new_rows == 4 and second.details["asked"] == 4
    assert second.details["run"]["rows_imported"] == 4
    assert store.warehouse.scalar("SELECT count(*) FROM teacher_traces WHERE is_correct") == 12


def test_trace_import_writes_traces_in_row_groups_of_its_batches(tmp_path):
    """The importer's session writes each batch of `IMPORT_BATCH` traces as its own row group, straight into the file
    (DuckDB's default row group would hold 120 times as many, through the write-ahead log)."""
    store = Store.at(tmp_path)
    n = IMPORT_BATCH + 50
    rows = [{"question": f"How many apples does shop {i} hold?", "answer": str(i)} for i in range(n)]
    pd.DataFrame(rows).to_parquet(tmp_path / "problems.parquet")
    build_problems(store, ProblemsConfig(source="files", files=[str(tmp_path / "problems.parquet")]))
    traces = [{"problem": r["question"], "generation": f"So it is {r['answer']}.\n\n{r['answer']}"} for r in rows]
    pd.DataFrame(traces).to_parquet(tmp_path / "traces.parquet")
    cfg = TeacherConfig(splits=list(ALL_SPLITS))
    report = write_traces(store, cfg, teacher=ImportedTeacher(str(tmp_path / "traces.parquet"), TraceFieldMap()))
    assert report.new_rows == n
    sizes = store.warehouse.query(
        "SELECT row_group_id, max(count) AS n FROM pragma_storage_info('teacher_traces') WHERE column_name = 'trace_id' "
        "GROUP BY row_group_id ORDER BY row_group_id"
    )
    assert [r["n"] for r in sizes] == [IMPORT_BATCH, 50]


def _pretrained_like_base(tmp_path: Path) -> StudentConfig:
    """A backbone directory with a fixed tokenizer (as a pretrained one has), so new traces do not change it."""
    problems = generate_problems(GeneratorConfig(n_problems=40, seed=7))
    corpus = [training_corpus(p.question, [p.question, f"The answer is {p.answer}."], [], {}) for p in problems]
    out = build_embedded_base(TINY, corpus, tmp_path / "backbone", [STEP_SEPARATOR, *signal_tags().values()])
    return TINY.model_copy(update={"base_model": str(out), "chat_template": False})


def test_packing_appends_new_traces_and_repacks_when_a_packed_trace_leaves(tmp_path):
    store = Store.at(tmp_path / "home")
    wh = store.warehouse
    student = _pretrained_like_base(tmp_path)
    sc = ShardsConfig(pack=PackConfig(row_len=512, rows_per_shard=2))
    _data(store, 30, seed=1)
    first = pack_shards(store, sc, student)
    old = {
        s["shard_id"]: Path(s["path"]).stat().st_mtime_ns for s in shards_of_manifest(wh, first.manifests["scaffold"])
    }
    assert first.stats["scaffold"]["appended_to"] is None

    _data(store, 10, seed=50)
    second = pack_shards(store, sc, student)
    n_train = len(training_traces(wh)[0])
    new_train = n_train - first.traces
    assert new_train > 0 and second.traces == n_train
    for kind in ("scaffold", "baseline"):
        stats = second.stats[kind]
        assert stats["appended_to"] == first.manifests[kind] and stats["appended_traces"] == new_train
        assert stats["examples"] == n_train
        members = wh.scalar(
            "SELECT count(DISTINCT m.trace_id) FROM manifest_shards ms JOIN shard_members m USING (shard_id) "
            "WHERE ms.manifest_hash = ?",
            [second.manifests[kind]],
        )
        assert members == n_train
    shards = {s["shard_id"]: s for s in shards_of_manifest(wh, second.manifests["scaffold"])}
    assert set(old) < set(shards)  # the old shards are kept, untouched, and new ones added
    assert all(Path(shards[i]["path"]).stat().st_mtime_ns == mtime for i, mtime in old.items())
    assert second.budget.keys() == first.budget.keys()
    assert all(second.budget[k] >= first.budget[k] for k in first.budget)

    # a packed trace stops being a training trace (its problem is found in a benchmark): everything is repacked
    dropped = wh.query("SELECT problem_id FROM teacher_traces ORDER BY trace_id LIMIT 1")[0]["problem_id"]
    wh.insert_new(
        "contamination",
        [
            {
                "contamination_id": "c1",
                "problem_id": dropped,
                "suite": "s",
                "doc_id": "d",
                "ngram": "x",
                "n": 8,
                "action": "exclude",
            }
        ],
    )
    third = pack_shards(store, sc, student)
    assert third.stats["scaffold"]["appended_to"] is None
    assert (
        wh.scalar(
            "SELECT count(*) FROM manifest_shards ms JOIN shard_members m USING (shard_id) JOIN teacher_traces t "
            "USING (trace_id) WHERE ms.manifest_hash = ? AND t.problem_id = ?",
            [third.manifests["scaffold"], dropped],
        )
        == 0
    )


def test_batch_encoding_gives_the_examples_of_one_trace_at_a_time(tmp_path):
    """The pack stage tokenises a window of traces in one call through the fast tokenizer's Rust encoder; the ids
    and examples are those of the tokenizer's own call, trace by trace."""
    from scaffold_lib.student.examples import Formatter
    from scaffold_lib.student.model import load_tokenizer

    student = _pretrained_like_base(tmp_path)
    tokenizer = load_tokenizer(student.base_model)
    formatter = Formatter(tokenizer, signal_tags())
    traces = [
        ("What is 2 + 3?", ["First, 2 + 3 = 5.", "Wait, check: ünïcödé ß 5.", "The answer is 5."]),
        ("Empty-ish?", ["  leading spaces\n\nand a blank line", "[conclusion_summary] a tag in the text"]),
    ]
    pieces = [s for _, steps in traces for s in steps]
    assert formatter._encode(pieces) == tokenizer(pieces, add_special_tokens=False)["input_ids"]
    values, offsets = formatter._encode_flat(pieces)
    assert values.dtype == np.int32 and len(offsets) == len(pieces) + 1
    assert [values[a:b].tolist() for a, b in zip(offsets, offsets[1:])] == formatter._encode(pieces)
    signals = [["addition_elaboration", "contrast_concession", "response_generation"], ["reasoning_analysis"] * 2]
    for (question, steps), sig, (q_ids, step_ids) in zip(traces, signals, formatter.encode(traces)):
        one = formatter.scaffold("t", question, steps, sig)
        batched = formatter.build("t", q_ids, step_ids, sig)
        assert one.input_ids.tolist() == batched.input_ids.tolist()
        assert one.signal_positions.tolist() == batched.signal_positions.tolist()
        assert (
            formatter.baseline("t", question, steps).labels.tolist()
            == formatter.build("t", q_ids, step_ids, None).labels.tolist()
        )


def test_training_traces_stream_in_windows_of_whole_traces(tmp_path):
    from scaffold_lib.store.training_data import stream_training_traces

    store = Store.at(tmp_path)
    _data(store, 20, seed=8)
    (whole,) = list(stream_training_traces(store.warehouse))
    windows = list(stream_training_traces(store.warehouse, window_chars=200))
    assert len(windows) > 1 and [t for w in windows for t in w] == whole
    # read a few traces per query (no query sorts the corpus): the same traces, in the same order and windows
    assert list(stream_training_traces(store.warehouse, window_chars=200, part_chars=300)) == windows
    assert list(stream_training_traces(store.warehouse, part_chars=1)) == [whole]
    assert all(len(t["steps"]) == len(t["signals"]) > 1 for t in whole)
    assert [t["trace_id"] for t in whole] == sorted(t["trace_id"] for t in whole)


def test_a_write_of_steps_ends_where_a_trace_starts():
    idx = pa.chunked_array([[0, 1, 2], [0, 1, 0]])  # traces of 3, 2 and 1 steps over two chunks
    assert [trace_start(idx, at) for at in range(7)] == [0, 3, 3, 3, 5, 5, 6]


def test_segmentation_writes_whole_traces_when_a_row_group_cuts_one(tmp_path, monkeypatch):
    """Steps are written in whole row groups; the write that a row group's end cuts through a trace takes the rest
    of that trace too, so no trace is ever split over two writes (a kill between them would lose its last steps)."""
    store = Store.at(tmp_path)
    n, steps_per_trace = 1_900, 67  # 127,300 steps: more than one row group of 122,880, which ends inside a trace
    assert ROW_GROUP_ROWS % steps_per_trace
    rows = [{"question": f"How many apples does shop {i} hold?", "answer": str(i)} for i in range(n)]
    pd.DataFrame(rows).to_parquet(tmp_path / "problems.parquet")
    build_problems(store, ProblemsConfig(source="files", files=[str(tmp_path / "problems.parquet")]))
    text = "\n\n".join(f"Then shop {{i}} gets {j} more apples." for j in range(steps_per_trace - 1))
    traces = [
        {"problem": r["question"], "generation": text.format(i=i) + f"\n\n{r['answer']}"} for i, r in enumerate(rows)
    ]
    pd.DataFrame(traces).to_parquet(tmp_path / "traces.parquet")
    cfg = TeacherConfig(splits=list(ALL_SPLITS))
    write_traces(store, cfg, teacher=ImportedTeacher(str(tmp_path / "traces.parquet"), TraceFieldMap()))
    writes: list[pa.Table] = []
    append = Warehouse.append

    def recording(self, table, rows, dagster_run_id=None):
        if table == "segmented_steps":
            writes.append(rows.select(["trace_id", "idx"]))
        return append(self, table, rows, dagster_run_id)

    monkeypatch.setattr(Warehouse, "append", recording)
    report = segment_traces(store, batch_traces=500, write_rows=ROW_GROUP_ROWS)
    assert report.new_rows == n * steps_per_trace
    assert [w.num_rows for w in writes] == [
        ROW_GROUP_ROWS + steps_per_trace - ROW_GROUP_ROWS % steps_per_trace,
        n * steps_per_trace - ROW_GROUP_ROWS - steps_per_trace + ROW_GROUP_ROWS % steps_per_trace,
    ]
    for write in writes:  # every write begins with a trace's first step and ends with its last
        counts = pc.value_counts(write.column("trace_id")).field("counts")
        assert pc.all(pc.equal(counts, steps_per_trace)).as_py()
    first, second = ({t for t in w.column("trace_id").to_pylist()} for w in writes)
    assert not first & second


def test_labelling_restores_steps_left_unlabelled_anywhere_with_the_same_labels(tmp_path):
    """A kill mid-labelling leaves unlabelled steps anywhere in the table, the last step of a trace among them (its
    answer step, found over all of the trace's rows): the next run labels exactly those, as an unbroken run would."""
    store = Store.at(tmp_path)
    _data(store, 30, seed=5)
    full = _rows(store, "signal_labels", "step_id")
    wh = store.warehouse
    with wh.connect() as con:
        con.execute(
            "DELETE FROM signal_labels WHERE step_id IN (SELECT step_id FROM segmented_steps WHERE rowid % 7 = 3)"
        )
    removed = len(full) - wh.scalar("SELECT count(*) FROM signal_labels")
    finals = wh.scalar(
        "SELECT count(*) FROM segmented_steps s ANTI JOIN signal_labels USING (step_id) "
        "WHERE s.idx = (SELECT max(idx) FROM segmented_steps t WHERE t.trace_id = s.trace_id)"
    )
    assert removed > 20 and finals > 0
    assert label_signals(store).new_rows == removed
    assert _rows(store, "signal_labels", "step_id") == full


def test_the_importers_table_of_problems_to_trace_keeps_digests_not_question_texts():
    """The importer holds every problem still to trace for as long as it reads its files: it keeps what grading
    needs and a digest of the question, so its size does not grow with the texts (1.4 M problems of 400-character
    questions held whole took about 1.5 GB). Matching by id and by normalised question still works."""
    problems = [
        Problem(f"p{i:05d}", "files", "train", f"Question {i}: " + "how many apples? " * 300, str(i), "number")
        for i in range(2_000)
    ]  # 5 MB of question text
    tracemalloc.start()
    todo = TodoProblems()
    for p in problems:
        todo.add(p)
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert held < 1_000_000  # no question text: 2,000 normalised copies alone would be 10 MB
    assert len(todo) == 2_000
    assert todo.match("p00007", None) == Gold("p00007", "7", "number")
    assert todo.match(None, "  QUESTION 7:\n" + "How many apples?  " * 300) == Gold("p00007", "7", "number")
    assert todo.match(None, "Question 7: how many pears?") is None and todo.match("p99999", None) is None


def test_training_traces_read_a_long_question_once_per_trace_not_once_per_step(tmp_path, monkeypatch):
    """Real questions are often longer than all their steps together: the per-part query once repeated the question
    on every step row, so a 2,000-character question over 65 steps needed 10x the part's size of DuckDB memory."""
    from scaffold_lib.store.training_data import stream_training_traces

    store = Store.at(tmp_path)
    _data(store, 30, seed=8)
    (short,) = list(stream_training_traces(store.warehouse))
    with store.warehouse.connect() as con:
        con.execute("UPDATE problems SET question = question || repeat(' and so on', 50_000)")  # 500k characters
        steps, traces = con.execute(
            "SELECT count(*), count(DISTINCT trace_id) FROM segmented_steps s "
            "JOIN teacher_traces USING (trace_id) JOIN problems p USING (problem_id) WHERE p.split = 'train'"
        ).fetchone()
    assert steps > 4 * traces  # repeated per step row, the questions would be 4x as many characters
    # a cap the questions fit under once per trace (0.5 MB a trace) but not once per step (2+ MB a trace)
    monkeypatch.setenv("SCAFFOLD_DUCKDB_MEMORY", "40MB")
    (long,) = list(stream_training_traces(Warehouse(store.warehouse.path), part_chars=3_000_000))
    assert [t["question"] for t in long] == [t["question"] + " and so on" * 50_000 for t in short]
    assert [(t["steps"], t["signals"]) for t in long] == [(t["steps"], t["signals"]) for t in short]
