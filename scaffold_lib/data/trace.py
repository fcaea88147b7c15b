"""The teacher stage: a trace for every problem that has none from the configured teacher yet — written by the
programmatic teacher, taken from the problems' worked solutions, asked of an OpenAI-compatible endpoint or a local
model, or imported from a trace file — in batches written as they complete, failures and quarantined rows recorded.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path

from scaffold_lib.core.errors import StageFailed
from scaffold_lib.core.ids import content_id
from scaffold_lib.data.config import TeacherConfig
from scaffold_lib.data.endpoint import TRANSPORT_ERRORS
from scaffold_lib.data.llm_teachers import EndpointTeacher, HFTeacher
from scaffold_lib.data.problems import Problem, Quarantined, partition_of, quarantine_rows
from scaffold_lib.data.teacher_routing import PerSourceTeacher
from scaffold_lib.data.teachers import ProgrammaticTeacher, ReferenceTeacher, Teacher, TeacherResult
from scaffold_lib.data.trace_import import ImportedTeacher, TodoProblems
from scaffold_lib.store import data_tables
from scaffold_lib.store.handles import StageReport
from scaffold_lib.store.store import Store
from scaffold_lib.store.warehouse import TRACE_ROW_GROUP_ROWS
from scaffold_lib.store.writing import BehindWriter


def build_teacher(cfg: TeacherConfig, journal_dir: str | Path, partition: tuple[int, int] | None = None) -> Teacher:
    """The configured teacher; for partition k of n, an endpoint teacher talks to base URL k mod len(base_urls) only,
    so partitions fan out over the servers and each trace names its server."""
    journals = cfg.journal_dir or journal_dir
    if cfg.backend == "auto":
        model = None
        if cfg.endpoint.base_urls and cfg.endpoint.model:
            model = build_teacher(cfg.model_copy(update={"backend": "openai"}), journal_dir, partition)
        elif cfg.hf.model:
            model = build_teacher(cfg.model_copy(update={"backend": "hf"}), journal_dir, partition)
        return PerSourceTeacher(ProgrammaticTeacher(cfg.programmatic), ReferenceTeacher(), model)
    if cfg.backend == "programmatic":
        return ProgrammaticTeacher(cfg.programmatic)
    if cfg.backend == "reference":
        return ReferenceTeacher()
    if cfg.backend == "openai":
        endpoint = cfg.endpoint.require("teacher")
        if partition is not None:
            endpoint = endpoint.model_copy(
                update={"base_urls": [endpoint.base_urls[partition[0] % len(endpoint.base_urls)]]}
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


def _untraced_problems(store: Store, teacher: Teacher, splits: Sequence[str], batch: int) -> Iterator[list[Problem]]:
    """Problems of `splits` missing one of their `teacher.samples` traces from this teacher, in batches. Problems are
    read by batch and their trace ids looked up in DuckDB, so the existing traces never come into Python."""
    for rows in data_tables.stream_problems(store.warehouse, splits, batch):
        problems = [Problem(**r) for r in rows]
        # a per-source teacher asks each problem's own teacher for as many samples as that one writes
        samples = getattr(teacher, "samples_for", lambda p: teacher.samples)
        wanted = {teacher.trace_id_for(p, s): p.problem_id for p in problems for s in range(samples(p))}
        todo = {wanted[t] for t in store.warehouse.missing("teacher_traces", "trace_id", list(wanted))}
        yield [p for p in problems if p.problem_id in todo]


def _teacher_batches(
    store: Store, teacher: Teacher, cfg: TeacherConfig, partition: tuple[int, int] | None, asked: list[int]
) -> Iterator[TeacherResult]:
    """Results batch by batch: a model teacher answers each batch of untraced problems; an importer streams its
    files against all of them (it is driven by its files, not by the problems). `asked` counts the problems."""
    batches = (
        [p for p in problems if partition is None or partition_of(p.problem_id, partition[1]) == partition[0]]
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
    partition: tuple[int, int] | None = None,
    teacher: Teacher | None = None,
) -> StageReport:
    """Trace every problem (of partition `(index, count)` when given) that has no trace from this teacher yet, in
    batches written as they complete. Raises `StageFailed` when problems were asked and not one trace came back."""
    wh = store.warehouse
    teacher = teacher or build_teacher(cfg, store.journals, partition)
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
        return _write_traces(store, teacher, cfg, run_id, partition)


IMPORT_DETAILS = ("import_format", "verdicts_recorded", "verdict_disagreements", "verdicts_unreadable")


def _write_traces(
    store: Store, teacher: Teacher, cfg: TeacherConfig, run_id: str | None, partition: tuple[int, int] | None
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
        for result in _teacher_batches(store, teacher, cfg, partition, asked):
            writer.submit(write, result)
            failures += len(result.failures)
            errors.update(f.error for f in result.failures)
            quarantined += len(result.quarantined)
            examples = examples or result.quarantined[:1]
            not_covered += result.not_covered
            stats = merge_stats(stats, result.stats)
    new = sum(writer.results)
    in_splits = data_tables.problems_in_splits(wh, cfg.splits)
    details = {
        "teacher": teacher.identity,
        "asked": asked[0],
        "failed": failures,
        "failed_unreachable": sum(n for error, n in errors.items() if error.startswith(TRANSPORT_ERRORS)),
        "not_covered": not_covered,
        "quarantined": quarantined,
        "skipped_existing": in_splits - asked[0] if partition is None else None,
        # an import says which format it read and how the dataset's own verdicts compare with ours
        **{k: stats[k] for k in IMPORT_DETAILS if k in stats},
        **({"teacher_by_source": teacher.by_source()} if isinstance(teacher, PerSourceTeacher) else {}),
        "run": stats,
    }
    identities = list(getattr(teacher, "identities", [teacher.identity]))  # a per-source teacher writes as several
    written = data_tables.teacher_summary(wh, identities)
    # nothing useful: problems were asked and every one failed, or the teacher covers none of them at all (problems a
    # trace file leaves out, beside ones it covered, are its normal steady state)
    if asked[0] and not new and (failures or written["n"] == 0):
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
    accuracy, tokens = written["acc"] or 0.0, written["toks"] or 0.0
    details.update(teacher_accuracy=round(accuracy, 4), mean_completion_tokens=round(tokens, 1))
    return StageReport("teacher_traces", new, written["n"], details)


def merge_stats(total: dict, batch: dict) -> dict:
    """Run statistics over batches: counts add up, the rest (rates, percentiles) is the latest batch's."""
    merged = {**total, **batch}
    for key, value in batch.items():
        if isinstance(value, int) and not isinstance(value, bool) and isinstance(total.get(key), int):
            merged[key] = total[key] + value
    return merged
