"""The problems stage: questions with gold answers collected into the warehouse from the configured source (the
synthetic generator and its OOD suites, or reasoning-gym), the problem files (configured, and dropped into the watched
folder) and an imported trace file's own problems, split by group.

Files are streamed in batches of `PROBLEM_BATCH` problems and recorded in `source_files` once read whole, so a refresh
reads the new files only and a kill mid-file reads it again (its written problems are skipped by id).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from pathlib import Path

from pydantic import BaseModel

from scaffold_lib.core.errors import StageFailed
from scaffold_lib.core.ids import content_id
from scaffold_lib.data.config import ProblemsConfig, TeacherConfig
from scaffold_lib.data.problem_files import iter_problem_file, problem_files
from scaffold_lib.data.problems import OOD_SPLITS, SPLITS, Problem, Quarantined, collect_problems, quarantine_rows
from scaffold_lib.data.reasoning_gym_problems import load_reasoning_gym
from scaffold_lib.data.synthetic import generate_problems, ood_problems
from scaffold_lib.data.trace_import import iter_trace_problems
from scaffold_lib.data.trace_sources import TraceSource, trace_sources
from scaffold_lib.store import data_tables
from scaffold_lib.store.handles import StageReport
from scaffold_lib.store.store import Store
from scaffold_lib.store.writing import in_session

# problems read from a file and written together: memory holds one batch, whatever the file's size
PROBLEM_BATCH = 10_000


def file_key(path: Path, settings: BaseModel) -> str:
    """A loaded file's identity: where it is, its size and modification time, and how it was read."""
    stat = path.stat()
    return content_id("file", str(path.resolve()), stat.st_size, stat.st_mtime_ns, settings.model_dump())


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


def write_problems(
    store: Store, items: Iterable[Problem | Quarantined], run_id: str | None = None, name: str = "problems"
) -> tuple[int, int, int]:
    """(new, rows, quarantined) of one source's problems and quarantined rows, written in batches of `PROBLEM_BATCH`
    (a problem repeated in the source is one problem, its first row); a source whose every row was quarantined fails
    with the first one's line and field."""
    wh = store.warehouse
    items = iter(items)
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
    `teacher` importing traces) from the trace source's own problem and gold-answer columns."""
    wh = store.warehouse
    importing = teacher is not None and teacher.backend == "import" and bool(teacher.import_source)
    generated, files = problem_sources(cfg, store.incoming, lambda key: data_tables.file_loaded(wh, key), importing)
    new, offered, quarantined = write_problems(store, generated, run_id, f"source {cfg.source!r}")
    for path, key in files.items():
        items = iter_problem_file(path, cfg.fields, split=cfg.split, lenient=cfg.lenient)
        added, rows, bad = write_problems(store, items, run_id, str(path))
        stat = path.stat()
        record = {"file_key": key, "stage": "problems", "path": str(path), "size": stat.st_size}
        record.update(mtime_ns=stat.st_mtime_ns, rows=rows, quarantined=bad)
        wh.insert_new("source_files", [record], run_id)  # read whole: not read again while unchanged
        new, offered, quarantined = new + added, offered + rows, quarantined + bad
    formats: dict[str, str] = {}
    without_gold: list[str] = []
    for src in trace_sources(teacher.import_source) if importing else []:
        record = _trace_file_record(src, teacher, cfg.split)
        if data_tables.file_loaded(wh, record["file_key"]):
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
        added, rows, bad = write_problems(store, items, run_id, src.name)
        formats[src.name] = info["format"]
        if info["gold_column"] is None:
            without_gold.append(src.name)
        wh.insert_new("source_files", [{**record, "rows": rows, "quarantined": bad}], run_id)
        new, offered, quarantined = new + added, offered + rows, quarantined + bad
    if not wh.count("problems"):
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


def problems_report(store: Store, new: int, offered: int, quarantined: int) -> StageReport:
    """The problems stage's report: rows offered, new and quarantined, split sizes, groups shared by splits."""
    splits = data_tables.split_sizes(store.warehouse)
    return StageReport(
        "problems",
        new,
        store.warehouse.count("problems"),
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
    return data_tables.groups_shared_between_splits(store.warehouse, ["test", *OOD_SPLITS])
