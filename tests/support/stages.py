"""The library's data stages called on a bare `Warehouse` (tests build warehouses directly; the stages take a Store).
Problems are written the way the problems stage writes every source's (`collect.write_problems`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from scaffold_lib.data import collect, label, segment, trace
from scaffold_lib.data.config import TeacherConfig
from scaffold_lib.data.problems import Problem, Quarantined, make_problem_id
from scaffold_lib.data.synthetic import GeneratorConfig, generate_problems
from scaffold_lib.data.teachers import ProgrammaticTeacher
from scaffold_lib.store.handles import StageReport
from scaffold_lib.store.store import Store
from scaffold_lib.store.warehouse import Warehouse

ALL_SPLITS = ("train", "validation", "test")
# a problem the programmatic teacher cannot answer (it solves only the generator's arithmetic)
FOREIGN = Problem(
    make_problem_id("What is the capital of France?", "Paris"),
    "gsm8k",
    "train",
    "What is the capital of France?",
    "Paris",
    "text",
)


def store_of(wh: Warehouse) -> Store:
    return Store.at(wh.path.parent, warehouse=wh.path)


def store_problems(
    wh: Warehouse, problems: Sequence[Problem], quarantined: Sequence[Quarantined] = (), run_id: str | None = None
) -> StageReport:
    store = store_of(wh)
    new, rows, bad = collect.write_problems(store, [*problems, *quarantined], run_id, "test problems")
    return collect.problems_report(store, new, rows, bad)


def generate_teacher_traces(
    wh: Warehouse,
    teacher,
    splits: Sequence[str] = ALL_SPLITS,
    run_id: str | None = None,
    partition: tuple[int, int] | None = None,
) -> StageReport:
    return trace.write_traces(store_of(wh), TeacherConfig(splits=list(splits)), run_id, partition, teacher=teacher)


def segment_traces(wh: Warehouse, run_id: str | None = None) -> StageReport:
    return segment.segment_traces(store_of(wh), run_id=run_id)


def label_signals(wh: Warehouse, run_id: str | None = None) -> StageReport:
    return label.label_signals(store_of(wh), run_id=run_id)


def labelled_store(root: Path, problems: GeneratorConfig) -> Store:
    """A store whose warehouse holds generated problems with the programmatic teacher's traces, their steps and
    labels: what packing starts from."""
    store = Store.at(root)
    wh = store.warehouse
    store_problems(wh, generate_problems(problems))
    generate_teacher_traces(wh, ProgrammaticTeacher())
    segment_traces(wh)
    label_signals(wh)
    return store
