"""The data stages, each one function over the store: problems -> teacher traces -> segmented steps -> signal labels.

Each reads its parents' rows, does only the new work (content ids make "new" exact), writes its table idempotently
and returns a `StageReport`. A stage that did nothing useful — every item failed, was quarantined or was not
covered — raises `StageFailed` with the reason: silence is the worst failure. The Dagster assets, the `scaffold`
CLI and the experiment runner call exactly these functions.
"""

from __future__ import annotations

import functools
import itertools
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel
from tqdm.auto import tqdm

from scaffold_lib.core.errors import RunFailed
from scaffold_lib.core.ids import content_id
from scaffold_lib.data.config import LabellerConfig, ProblemsConfig, SegmentationConfig, TeacherConfig
from scaffold_lib.data.endpoint import TRANSPORT_ERRORS
from scaffold_lib.data.label_validation import LabelValidator, ValidatorConfig, Verdict, decide
from scaffold_lib.data.llm_teachers import EndpointTeacher, HFTeacher
from scaffold_lib.data.problem_files import iter_problem_file, problem_files
from scaffold_lib.data.problems import OOD_SPLITS, SPLITS, Problem, Quarantined, collect_problems, partition_of
from scaffold_lib.data.reasoning_gym_problems import load_reasoning_gym
from scaffold_lib.data.segmentation import segment_batch
from scaffold_lib.data.signals import (
    FALLBACK,
    KEYWORD,
    PATTERN,
    SIGNALS,
    LabelStats,
    keyword_table,
    label_column,
)
from scaffold_lib.data.synthetic import generate_problems, ood_problems
from scaffold_lib.data.teacher_routing import PerSourceTeacher
from scaffold_lib.data.teachers import (
    ProgrammaticTeacher,
    ReferenceTeacher,
    Teacher,
    TeacherResult,
)
from scaffold_lib.data.trace_import import (
    ImportedTeacher,
    TodoProblems,
    TraceSource,
    iter_trace_problems,
    trace_sources,
)
from scaffold_lib.store.store import Store
from scaffold_lib.store.warehouse import ROW_GROUP_ROWS, TRACE_ROW_GROUP_ROWS, WRITE_ROWS


def in_session(stage):
    """Run a stage with the warehouse held open (its many batched reads and writes share one open database)."""

    @functools.wraps(stage)
    def run(store: Store, *args, **kwargs):
        with store.warehouse.session():
            return stage(store, *args, **kwargs)

    return run


class BehindWriter:
    """Warehouse writes one batch behind, in a background thread: DuckDB inserts a batch (it releases the GIL) while
    Python prepares the next. At most one batch waits; a failed write raises at the next `submit` or on leaving the
    block, and each batch is still one transaction, so an interrupted stage keeps every batch written before."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="warehouse-writer")
        self._last: Future | None = None
        self.results: list = []

    def submit(self, write: Callable, *args) -> None:
        self.wait()
        self._last = self._pool.submit(write, *args)

    def wait(self) -> None:
        if self._last is not None:
            last, self._last = self._last, None
            self.results.append(last.result())

    def __enter__(self) -> BehindWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        try:
            if exc_type is None:
                self.wait()
        finally:
            self._pool.shutdown(wait=True)


class StageFailed(RunFailed):
    """A stage did nothing useful; the message says why and what to change."""


@dataclass
class StageReport:
    """What a stage did, for logs, the CLI and Dagster metadata."""

    stage: str
    new_rows: int
    total_rows: int
    details: dict = field(default_factory=dict)

    def summary(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.details.items() if not isinstance(v, (dict, list)))
        return f"{self.stage}: +{self.new_rows} new rows ({self.total_rows} total){'; ' + extra if extra else ''}"


def quarantine_rows(stage: str, items: Sequence[Quarantined]) -> list[dict]:
    return [
        {"quarantine_id": content_id("quarantine", stage, q.source_file, q.line, q.raw), "stage": stage, **q.as_row()}
        for q in items
    ]


# --- problems --------------------------------------------------------------------------------------------------


def file_key(path: Path, settings: BaseModel) -> str:
    """A loaded file's identity: where it is, its size and modification time, and how it was read."""
    stat = path.stat()
    return content_id("file", str(path.resolve()), stat.st_size, stat.st_mtime_ns, settings.model_dump())


# problems read from a file and written together: memory holds one batch, whatever the file's size
PROBLEM_BATCH = 10_000


def problem_sources(
    cfg: ProblemsConfig,
    incoming: Path | None = None,
    loaded_before: Callable[[str], bool] = lambda key: False,
    from_traces: bool = False,
) -> tuple[list[Problem], dict[Path, str | None]]:
    """(problems of the configured generator, if any; file key per problem file to read): the configured files plus
    every problem file in the watched folder, except files already loaded unchanged (a missing file is kept, with no
    key, to fail when read). `from_traces`: an imported trace file brings problems, so source 'files' needs no file."""
    problems: list[Problem] = []
    if cfg.source == "synthetic":
        problems = generate_problems(cfg.synthetic, cfg.split) + ood_problems(cfg.synthetic, cfg.ood, cfg.split)
    elif cfg.source == "reasoning_gym":
        problems = load_reasoning_gym(cfg.reasoning_gym, cfg.split)
    watched = Path(cfg.watch_dir) if cfg.watch_dir else incoming
    files = [Path(f) for f in cfg.files] + (problem_files(watched) if watched and watched.exists() else [])
    if cfg.source == "files" and not files and not from_traces:
        raise StageFailed(
            f"problems source 'files' but no problem file: set problems.files or drop files into {watched}"
        )
    settings = cfg.model_copy(update={"files": [], "watch_dir": None})
    keys = {f: file_key(f, settings) if f.exists() else None for f in files}
    return problems, {f: key for f, key in keys.items() if key is None or not loaded_before(key)}


def _load_problem_items(
    store: Store, name: str, items: Iterator[Problem | Quarantined], run_id: str | None
) -> tuple[int, int, int]:
    """(new, rows, quarantined) of one file's problems, written in batches of `PROBLEM_BATCH`; a file whose every row
    was quarantined fails with the first one's line and field."""
    wh = store.warehouse
    new, rows, bad, first_bad = 0, 0, 0, None
    while batch := list(itertools.islice(items, PROBLEM_BATCH)):
        loaded = collect_problems(batch)  # a repeat in a later batch is not new: the warehouse skips it
        new += wh.insert_new("problems", [p.as_row() for p in loaded.problems], run_id)
        wh.insert_new("quarantine", quarantine_rows("problems", loaded.quarantined), run_id)
        rows += len(loaded.problems)
        bad += len(loaded.quarantined)
        first_bad = first_bad or next(iter(loaded.quarantined), None)
    if not rows and first_bad:
        raise StageFailed(
            f"{name}: every row was quarantined ({bad}), e.g. line {first_bad.line}, field {first_bad.field!r}: "
            f"{first_bad.error}"
        )
    return new, rows, bad


def _trace_file_record(src: TraceSource, teacher: TeacherConfig, split: BaseModel) -> dict:
    """The `source_files` row of a trace source read for its problems: keyed by where it is, its size and time, and
    how it was read (a hub dataset by its name: read once per settings)."""
    how = [teacher.import_format, teacher.import_fields.model_dump(), teacher.import_split, split.model_dump()]
    stat = src.path.stat() if src.path is not None else None
    size, mtime = (stat.st_size, stat.st_mtime_ns) if stat else (0, 0)
    where = str(src.path.resolve()) if src.path is not None else src.name
    key = content_id("trace-problems", where, size, mtime, how)
    return {"file_key": key, "stage": "problems", "path": where, "size": size, "mtime_ns": mtime}


@in_session
def build_problems(
    store: Store, cfg: ProblemsConfig, run_id: str | None = None, teacher: TeacherConfig | None = None
) -> StageReport:
    """Questions with gold answers, from the configured source and problem files, split by group, and (with a
    `teacher` importing traces) from the trace source's own problem and gold-answer columns. Files are streamed in
    batches of `PROBLEM_BATCH` problems, each file recorded once read whole; a file already loaded, unchanged, is
    not read again (a refresh reads the new files only)."""
    wh = store.warehouse

    def loaded_before(key: str) -> bool:
        return wh.scalar("SELECT count(*) FROM source_files WHERE file_key = ?", [key]) > 0

    importing = teacher is not None and teacher.backend == "import" and bool(teacher.import_source)
    generated, files = problem_sources(cfg, store.incoming, loaded_before, from_traces=importing)
    new = wh.insert_new("problems", [p.as_row() for p in generated], run_id)
    offered, quarantined = len(generated), 0
    for path, key in files.items():
        items = iter_problem_file(path, cfg.fields, split=cfg.split, lenient=cfg.lenient)
        added, rows, bad = _load_problem_items(store, str(path), items, run_id)
        stat = path.stat()
        record = {"file_key": key, "stage": "problems", "path": str(path), "size": stat.st_size}
        record.update(mtime_ns=stat.st_mtime_ns, rows=rows, quarantined=bad)
        wh.insert_new("source_files", [record], run_id)  # read whole: not read again while unchanged
        new, offered, quarantined = new + added, offered + rows, quarantined + bad
    formats: dict[str, str] = {}
    without_gold: list[str] = []
    for src in trace_sources(teacher.import_source) if importing else []:
        record = _trace_file_record(src, teacher, cfg.split)
        if loaded_before(record["file_key"]):
            continue
        info: dict = {}
        items = iter_trace_problems(
            src,
            teacher.import_fields,
            format=teacher.import_format,
            split=cfg.split,
            hf_split=teacher.import_split,
            lenient=cfg.lenient,
            info=info,
        )
        added, rows, bad = _load_problem_items(store, src.name, items, run_id)
        formats[src.name] = info["format"]
        if info["gold_column"] is None:
            without_gold.append(src.name)
        wh.insert_new("source_files", [{**record, "rows": rows, "quarantined": bad}], run_id)
        new, offered, quarantined = new + added, offered + rows, quarantined + bad
    if not wh.scalar("SELECT count(*) FROM problems"):
        hint = (
            f"; the trace source {', '.join(without_gold)} has no gold-answer column (looked for answer, solution): "
            "give a problem file (--problems-file) or name its column (--fields gold=COLUMN)"
            if without_gold
            else ""
        )
        raise StageFailed(f"no problems: source {cfg.source!r} produced none and no problem file had any{hint}")
    report = problems_report(store, new, offered, quarantined)
    report.details["files_loaded"] = len(files) + len(formats)
    if formats:  # which format each trace source was read as (`auto` says what it detected)
        labels = sorted(set(formats.values()))
        report.details["import_format"] = (
            labels[0] if len(labels) == 1 else "; ".join(f"{k}: {v}" for k, v in formats.items())
        )
    if without_gold:
        report.details["traces_without_gold"] = ", ".join(without_gold)
    return report


def store_problems(
    store: Store, problems: Sequence[Problem], quarantined: Sequence[Quarantined] = (), run_id: str | None = None
) -> StageReport:
    """Write problems (new ids only) and quarantined rows; report the split sizes and any group shared by splits."""
    wh = store.warehouse
    new = wh.insert_new("problems", [p.as_row() for p in problems], run_id)
    wh.insert_new("quarantine", quarantine_rows("problems", quarantined), run_id)
    return problems_report(store, new, len(problems), len(quarantined))


def problems_report(store: Store, new: int, offered: int, quarantined: int) -> StageReport:
    wh = store.warehouse
    splits = {r["split"]: r["n"] for r in wh.query("SELECT split, count(*) AS n FROM problems GROUP BY split")}
    return StageReport(
        "problems",
        new,
        wh.scalar("SELECT count(*) FROM problems"),
        {
            "offered": offered,
            "files_loaded": 0,
            "quarantined": quarantined,
            "splits": {s: splits.get(s, 0) for s in SPLITS} | {s: n for s, n in splits.items() if s in OOD_SPLITS},
            "split_overlap": split_overlap(store),
        },
    )


def split_overlap(store: Store) -> dict[str, int]:
    """Groups found in more than one split (0 everywhere when the split is by group; a file's own `split` column may
    break that, and this says so). The OOD suites are drawn from the test split's groups on purpose: a group shared
    by test and an OOD split is not an overlap."""
    tested = ["test", *OOD_SPLITS]
    rows = store.warehouse.query(
        """
        SELECT a.split || '/' || b.split AS pair, count(DISTINCT a.group_id) AS n
        FROM problems a JOIN problems b ON a.group_id = b.group_id AND a.split < b.split
        WHERE a.group_id IS NOT NULL AND NOT (list_contains(?, a.split) AND list_contains(?, b.split))
        GROUP BY ALL""",
        [tested, tested],
    )
    return {r["pair"]: r["n"] for r in rows}


# --- teacher traces -------------------------------------------------------------------------------------------------


def build_teacher(cfg: TeacherConfig, journal_dir: str | Path, shard: tuple[int, int] | None = None) -> Teacher:
    """The configured teacher; for shard k of n, an endpoint teacher talks to base URL k mod len(base_urls) only, so
    partitions fan out over the servers and each trace names its server."""
    journals = cfg.journal_dir or journal_dir
    if cfg.backend == "auto":
        model = None
        if cfg.endpoint.base_urls and cfg.endpoint.model:
            model = build_teacher(cfg.model_copy(update={"backend": "openai"}), journal_dir, shard)
        elif cfg.hf.model:
            model = build_teacher(cfg.model_copy(update={"backend": "hf"}), journal_dir, shard)
        return PerSourceTeacher(ProgrammaticTeacher(cfg.programmatic), ReferenceTeacher(), model)
    if cfg.backend == "programmatic":
        return ProgrammaticTeacher(cfg.programmatic)
    if cfg.backend == "reference":
        return ReferenceTeacher()
    if cfg.backend == "openai":
        endpoint = cfg.endpoint.require("teacher")
        if shard is not None:
            endpoint = endpoint.model_copy(
                update={"base_urls": [endpoint.base_urls[shard[0] % len(endpoint.base_urls)]]}
            )
        return EndpointTeacher(endpoint, cfg.prompt, journals, progress=cfg.progress)
    if cfg.backend == "hf":
        if not cfg.hf.model:
            raise StageFailed("teacher backend 'hf' needs teacher.hf.model (a hub id or a local model directory)")
        return HFTeacher(cfg.hf, cfg.prompt, journals, progress=cfg.progress)
    if not cfg.import_source:
        raise StageFailed(
            "teacher backend 'import' needs teacher.import_source (a .jsonl/.parquet path or an HF dataset name)"
        )
    return ImportedTeacher(cfg.import_source, cfg.import_fields, split=cfg.import_split, format=cfg.import_format)


# imported traces written together: one row group of the import session, each written straight into the file
IMPORT_BATCH = TRACE_ROW_GROUP_ROWS
PROBLEM_COLUMNS = "p.problem_id, p.source, p.split, p.question, p.answer, p.answer_type, p.group_id, p.solution"


def _untraced_problems(store: Store, teacher: Teacher, splits: Sequence[str], batch: int) -> Iterator[list[Problem]]:
    """Problems of `splits` missing one of their `teacher.samples` traces from this teacher, in batches. Problems are
    read by batch and their trace ids looked up in DuckDB, so the existing traces never come into Python."""
    for rows in store.warehouse.stream(
        f"SELECT {PROBLEM_COLUMNS} FROM problems p WHERE list_contains(?, p.split) ORDER BY p.problem_id",
        [list(splits)],
        batch_rows=batch,
    ):
        problems = [Problem(**r) for r in rows]
        # a per-source teacher asks each problem's own teacher for as many samples as that one writes
        samples = getattr(teacher, "samples_for", lambda p: teacher.samples)
        wanted = {teacher.trace_id_for(p, s): p.problem_id for p in problems for s in range(samples(p))}
        todo = {wanted[t] for t in store.warehouse.missing("teacher_traces", "trace_id", list(wanted))}
        yield [p for p in problems if p.problem_id in todo]


def _teacher_batches(
    store: Store, teacher: Teacher, cfg: TeacherConfig, shard: tuple[int, int] | None, asked: list[int]
) -> Iterator[TeacherResult]:
    """Results batch by batch: a model teacher answers each batch of untraced problems; an importer streams its
    files against all of them (it is driven by its files, not by the problems). `asked` counts the problems."""
    batches = (
        [p for p in problems if shard is None or partition_of(p.problem_id, shard[1]) == shard[0]]
        for problems in _untraced_problems(store, teacher, cfg.splits, cfg.batch_problems)
    )
    if isinstance(teacher, ImportedTeacher):
        todo = TodoProblems()
        for problems in batches:
            for p in problems:
                todo.add(p)
        asked[0] = len(todo)
        if todo:
            yield from teacher.import_batches(todo, min(cfg.batch_problems, IMPORT_BATCH))
        return
    for problems in batches:
        asked[0] += len(problems)
        if problems:
            yield teacher.generate(problems)


def write_traces(
    store: Store,
    cfg: TeacherConfig,
    run_id: str | None = None,
    shard: tuple[int, int] | None = None,
    teacher: Teacher | None = None,
) -> StageReport:
    """Trace every problem (of shard `(index, count)` when given) that has no trace from this teacher yet, in batches
    written as they complete. Raises `StageFailed` when problems were asked and not one trace came back."""
    wh = store.warehouse
    teacher = teacher or build_teacher(cfg, store.journals, shard)
    # a model teacher can take hours: it leaves the warehouse free between its writes; the others hold it open, an
    # importer in row groups of its batches (`TRACE_ROW_GROUP_ROWS`)
    if isinstance(teacher, ImportedTeacher):
        session = wh.session(row_group_rows=TRACE_ROW_GROUP_ROWS)
    elif isinstance(teacher, (ProgrammaticTeacher, ReferenceTeacher)) or (
        isinstance(teacher, PerSourceTeacher) and teacher.model is None
    ):
        session = wh.session()
    else:
        session = nullcontext()
    with session:
        return _write_traces(store, teacher, cfg, run_id, shard)


IMPORT_DETAILS = ("import_format", "verdicts_recorded", "verdict_disagreements", "verdicts_unreadable")


def _write_traces(
    store: Store, teacher: Teacher, cfg: TeacherConfig, run_id: str | None, shard: tuple[int, int] | None
) -> StageReport:
    wh = store.warehouse
    asked, failures, quarantined, not_covered = [0], 0, 0, 0
    errors: Counter[str] = Counter()
    examples: list[Quarantined] = []
    stats: dict = {}

    def write(result: TeacherResult) -> int:
        wh.insert_new(
            "teacher_failures",
            [{"failure_id": content_id("failure", f.trace_id, run_id), **f.as_row()} for f in result.failures],
            run_id,
        )
        wh.insert_new("quarantine", quarantine_rows("teacher_traces", result.quarantined), run_id)
        return wh.insert_new("teacher_traces", [t.as_row() for t in result.traces], run_id)

    with BehindWriter() as writer:
        for result in _teacher_batches(store, teacher, cfg, shard, asked):
            writer.submit(write, result)
            failures += len(result.failures)
            errors.update(f.error for f in result.failures)
            quarantined += len(result.quarantined)
            examples = examples or result.quarantined[:1]
            not_covered += result.not_covered
            stats = merge_stats(stats, result.stats)
    new = sum(writer.results)
    in_splits = wh.scalar("SELECT count(*) FROM problems WHERE list_contains(?, split)", [list(cfg.splits)])
    details = {
        "teacher": teacher.identity,
        "asked": asked[0],
        "failed": failures,
        "failed_unreachable": sum(n for error, n in errors.items() if error.startswith(TRANSPORT_ERRORS)),
        "not_covered": not_covered,
        "quarantined": quarantined,
        "skipped_existing": in_splits - asked[0] if shard is None else None,
        # an import says which format it read and how the dataset's own verdicts compare with ours
        **{k: stats[k] for k in IMPORT_DETAILS if k in stats},
        **({"teacher_by_source": teacher.by_source()} if isinstance(teacher, PerSourceTeacher) else {}),
        "run": stats,
    }
    identities = list(getattr(teacher, "identities", [teacher.identity]))  # a per-source teacher writes as several
    total = wh.scalar("SELECT count(*) FROM teacher_traces WHERE list_contains(?, teacher)", [identities])
    # nothing useful: problems were asked and every one failed, or the teacher covers none of them at all (problems a
    # trace file leaves out, beside ones it covered, are its normal steady state)
    if asked[0] and not new and (failures or total == 0):
        reasons = [f"{n} x {error[:300]}" for error, n in errors.most_common(3)]
        if not_covered:
            reasons.append(f"{not_covered} not covered by {teacher.identity}")
        if examples:
            first = examples[0]
            reasons.append(
                f"{quarantined} input rows quarantined (e.g. {first.source_file}:{first.line} "
                f"field {first.field!r}: {first.error})"
            )
        raise StageFailed(f"teacher {teacher.identity} answered none of {asked[0]} problems: " + "; ".join(reasons))
    row = wh.query(
        "SELECT count(*) AS n, avg(is_correct::INT) AS acc, avg(completion_tokens) AS toks "
        "FROM teacher_traces WHERE list_contains(?, teacher)",
        [identities],
    )[0]
    details.update(teacher_accuracy=round(row["acc"] or 0.0, 4), mean_completion_tokens=round(row["toks"] or 0.0, 1))
    return StageReport("teacher_traces", new, row["n"], details)


def merge_stats(total: dict, batch: dict) -> dict:
    """Run statistics over batches: counts add up, the rest (rates, percentiles) is the latest batch's."""
    merged = {**total, **batch}
    for key, value in batch.items():
        if isinstance(value, int) and not isinstance(value, bool) and isinstance(total.get(key), int):
            merged[key] = total[key] + value
    return merged


# --- segmented steps -----------------------------------------------------------------------------------------------


def trace_start(idx: pa.ChunkedArray, at: int) -> int:
    """The first row at or after `at` where a trace's steps begin (the number of rows when none does). Each write of
    steps ends there, so it holds whole traces: a trace whose steps were split over two writes, with a kill between
    them, would count as segmented (the pending query is per trace) and lose its last steps. The end of the cut
    trace, a few dozen rows, goes through the write-ahead log with the write."""
    first = pc.index(idx.slice(at), 0).as_py()
    return at + first if first >= 0 else len(idx)


@in_session
def segment_traces(
    store: Store,
    cfg: SegmentationConfig = SegmentationConfig(),
    run_id: str | None = None,
    batch_traces: int = 2_000,
    write_rows: int = WRITE_ROWS,
) -> StageReport:
    """Cut every not-yet-segmented trace into steps with its teacher's segmenter (recorded on each step), streamed
    in batches of traces and written in inserts of at least `write_rows` steps; a trace with no step is quarantined,
    not dropped."""
    wh = store.warehouse
    pending = """
        FROM teacher_traces t
        ANTI JOIN (SELECT DISTINCT trace_id FROM segmented_steps) s USING (trace_id)
        ANTI JOIN quarantine q ON q.stage = 'segmented_steps' AND q.source_file = t.trace_id"""
    todo = wh.scalar(f"SELECT count(*) {pending}")
    empty = 0
    used: Counter[str] = Counter()
    unwritten: list[pa.Table] = []
    unwritten_quarantine: list[Quarantined] = []

    def write(steps: pa.Table, quarantined: list[Quarantined]) -> int:
        wh.insert_new("quarantine", quarantine_rows("segmented_steps", quarantined), run_id)
        return wh.append("segmented_steps", steps, run_id)  # the pending traces have no step yet

    with tqdm(total=todo, unit="trace", desc="segmenting", disable=None) as bar, BehindWriter() as writer:
        for traces in wh.stream_arrow(
            f"SELECT t.trace_id, t.teacher, t.text, t.answer_text {pending}", batch_rows=batch_traces
        ):
            steps = segment_batch(traces, cfg)
            firsts = steps.filter(pc.equal(steps.column("idx"), 0))
            used.update({c["values"]: c["counts"] for c in pc.value_counts(firsts.column("segmenter")).to_pylist()})
            no_step = pc.invert(pc.is_in(traces.column("trace_id"), value_set=firsts.column("trace_id")))
            quarantined = [
                Quarantined(t["trace_id"], 0, "text", "trace has no non-empty step", t["text"][:500])
                for t in traces.filter(no_step).select(["trace_id", "text"]).to_pylist()
            ]
            unwritten.append(steps)
            unwritten_quarantine += quarantined
            rows = sum(t.num_rows for t in unwritten)
            if rows >= write_rows:  # whole row groups (and the end of the trace they cut) now, the rest later
                ready = pa.concat_tables(unwritten)
                cut = trace_start(
                    ready.column("idx"), rows - rows % ROW_GROUP_ROWS if write_rows >= ROW_GROUP_ROWS else rows
                )
                writer.submit(write, ready.slice(0, cut), unwritten_quarantine)
                unwritten, unwritten_quarantine = [ready.slice(cut)], []
            empty += len(quarantined)
            bar.update(traces.num_rows)
        if unwritten:
            writer.submit(write, pa.concat_tables(unwritten), unwritten_quarantine)
    new = sum(writer.results)
    if todo and empty == todo:
        raise StageFailed(
            f"every one of the {todo} new traces was empty after segmentation (quarantined: see "
            "the quarantine table, stage 'segmented_steps')"
        )
    total = wh.scalar("SELECT count(*) FROM segmented_steps")
    traces_total = wh.scalar("SELECT count(DISTINCT trace_id) FROM segmented_steps")
    return StageReport(
        "segmented_steps",
        new,
        total,
        {
            "traces_segmented": todo - empty,
            "empty_traces_quarantined": empty,
            "mean_steps_per_trace": round(total / traces_total, 2) if traces_total else 0.0,
            "segmenters": dict(used),
        },
    )


# --- signal labels -------------------------------------------------------------------------------------------------


@in_session
def label_signals(
    store: Store, cfg: LabellerConfig = LabellerConfig(), run_id: str | None = None, batch_steps: int = WRITE_ROWS
) -> StageReport:
    """Keyword-label every step without a label under this keyword table and fallback (final step of a trace =
    answer), streamed in batches written as they are labelled; then the LLM stage when configured. A refresh reads
    the new steps only; a changed table relabels every step."""
    wh = store.warehouse
    table = keyword_table(cfg.keywords_path)
    key = content_id("labelling", table.digest, cfg.fallback_signal)
    # The pending steps' ids first (no text read): their count, and the first row holding one. Steps are only ever
    # appended, so a refresh's pending steps lie in the last row groups, and the text is read from there on: reading
    # every step's text to keep 1 % of them took 7 of a refresh's 8.8 s of labelling at 6.5 M steps.
    total, first_row = wh.query(
        """SELECT count(*) AS n, min(s.rowid) AS first_row FROM segmented_steps s
        ANTI JOIN (SELECT step_id FROM signal_labels WHERE labelling_key = $key) USING (step_id)""",
        {"key": key},
    )[0].values()
    # a trace's last step is its answer: its last index over all its rows, some of which may lie before `first_row`
    pending = """
        FROM (SELECT * FROM segmented_steps WHERE rowid >= $first_row) s
        JOIN (SELECT trace_id, max(idx) AS last_idx FROM segmented_steps
              WHERE trace_id IN (SELECT trace_id FROM segmented_steps WHERE rowid >= $first_row) GROUP BY trace_id) m
             USING (trace_id)
        LEFT JOIN signal_labels l USING (step_id)
        WHERE l.step_id IS NULL OR l.labelling_key IS DISTINCT FROM $key"""

    def write(labels: pa.Table, relabel: pa.ChunkedArray) -> int:
        relabelled = wh.upsert("signal_labels", labels.filter(relabel), run_id)
        return relabelled + wh.append("signal_labels", labels.filter(pc.invert(relabel)), run_id)  # steps with no label

    with tqdm(total=total, unit="step", desc="labelling", disable=None) as bar, BehindWriter() as writer:
        for steps in (
            wh.stream_arrow(
                f"SELECT s.step_id, s.text, s.idx = m.last_idx AS is_final, l.step_id IS NOT NULL AS relabel {pending}",
                {"key": key, "first_row": first_row},
                batch_rows=batch_steps,
            )
            if total
            else ()
        ):
            labels = label_column(steps.column("text"), steps.column("is_final"), table, cfg.fallback_signal)
            labels = labels.add_column(0, "step_id", steps.column("step_id")).append_column(
                "labelling_key", pa.array([key] * steps.num_rows, pa.string())
            )
            writer.submit(write, labels, steps.column("relabel"))
            bar.update(steps.num_rows)
    new = sum(writer.results)
    details: dict = {"keywords_file": table.source}
    if cfg.validate_with_llm:
        validator = LabelValidator(
            ValidatorConfig(
                endpoint=cfg.endpoint.require("label validation"),
                max_reasks=cfg.max_reasks,
                structured_output=cfg.structured_output,
            ),
            store.journals,
            progress=cfg.progress,
        )
        details["validation"] = validate_signal_labels(store, validator, run_id)
    details.update(label_statistics(store), coverage_by_source=coverage_by_source(store))
    return StageReport("signal_labels", new, wh.scalar("SELECT count(*) FROM signal_labels"), details)


def validate_signal_labels(store: Store, validator: LabelValidator, run_id: str | None = None) -> dict:
    """The LLM stage: confirm or correct every keyword label and label the fallback steps. Verdicts come from the
    warehouse cache first, so only steps never asked before reach the endpoint."""
    wh = store.warehouse
    steps = wh.query(
        """
        SELECT l.step_id, s.text, l.labeller, l.keyword, l.keyword_signal, l.signal, l.labelling_key
        FROM signal_labels l JOIN segmented_steps s USING (step_id)
        WHERE list_contains(?, l.labeller) ORDER BY l.step_id""",
        [[KEYWORD, PATTERN, FALLBACK]],
    )
    items = [(validator.cache_key(s["text"], s["keyword_signal"]), s["text"], s["keyword_signal"]) for s in steps]
    keys = sorted({key for key, _, _ in items})
    cached = {
        r["cache_key"]: Verdict(r["signal"], r["reply"], r["attempts"])
        for r in wh.query(
            "SELECT cache_key, signal, reply, attempts FROM llm_label_cache WHERE list_contains(?, cache_key)", [keys]
        )
    }
    asked, errors = (
        validator.validate([i for i in items if i[0] not in cached]) if len(cached) < len(keys) else ({}, {})
    )
    wh.insert_new(
        "llm_label_cache",
        [
            {
                "cache_key": key,
                "validator": validator.identity,
                "proposed_signal": proposed,
                "signal": v.signal,
                "reply": v.reply,
                "attempts": v.attempts,
            }
            for key, _, proposed in {i[0]: i for i in items}.values()
            if (v := asked.get(key)) is not None
        ],
        run_id,
    )
    verdicts = {**cached, **asked}
    rows, unparseable = [], 0
    for step, (key, _, _) in zip(steps, items):
        decision = decide(step["labeller"], step["keyword_signal"], verdicts.get(key))
        unparseable += key in verdicts and verdicts[key].signal is None
        if decision is not None:
            rows.append(
                {
                    "step_id": step["step_id"],
                    "signal": decision[0],
                    "labeller": decision[1],
                    "keyword": step["keyword"],
                    "keyword_signal": step["keyword_signal"],
                    "confidence": 1.0,
                    "labelling_key": step["labelling_key"],  # a verdict on this table's label: kept until it changes
                }
            )
    wh.upsert("signal_labels", rows, run_id)
    if keys and not verdicts:
        raise StageFailed(
            f"label validation got no verdict for any of {len(keys)} steps: "
            f"{dict(Counter(e.split(':', 1)[0] for e in errors.values()))}"
        )
    return {
        "validator": validator.identity,
        "relabelled": len(rows),
        "steps_to_validate": len(steps),
        "distinct_steps": len(keys),
        "verdicts_from_cache": len(cached),
        "asked": len(asked) + len(errors),
        "failed": len(errors),
        "unparseable_after_reasks": unparseable,
        "errors": dict(Counter(e.split(":", 1)[0] for e in errors.values())),
    }


def label_statistics(store: Store) -> dict:
    stats = LabelStats()
    for r in store.warehouse.query("SELECT signal, labeller, count(*) AS n FROM signal_labels GROUP BY ALL"):
        stats.steps += r["n"]
        stats.by_signal[r["signal"]] += r["n"]
        stats.by_labeller[r["labeller"]] += r["n"]
    return stats.as_dict()


def coverage_by_source(store: Store) -> dict[str, dict[str, float]]:
    """Keyword, keyword+pattern and fallback shares per problem source (GSM8K-style worked solutions open
    differently from R1 traces)."""
    rows = store.warehouse.query(
        """
        SELECT p.source, avg((l.labeller IN ('keyword', 'keyword+llm-agree', 'llm-override'))::INT) AS keyword,
               avg((l.labeller IN ('keyword', 'keyword+llm-agree', 'llm-override', 'pattern'))::INT) AS rules,
               avg((l.labeller = 'fallback')::INT) AS fallback
        FROM signal_labels l JOIN segmented_steps s USING (step_id) JOIN teacher_traces t USING (trace_id)
        JOIN problems p USING (problem_id) GROUP BY p.source ORDER BY p.source"""
    )
    return {
        r["source"]: {
            "keyword_coverage": round(r["keyword"], 4),
            "rule_coverage": round(r["rules"], 4),
            "fallback_share": round(r["fallback"], 4),
        }
        for r in rows
    }


def signal_distribution_markdown(by_signal: dict[str, int]) -> str:
    total = sum(by_signal.values()) or 1
    lines = ["| signal | steps | share |", "|---|---:|---:|"]
    lines += [f"| {s} | {by_signal.get(s, 0)} | {by_signal.get(s, 0) / total:.1%} |" for s in SIGNALS]
    return "\n".join(lines)
