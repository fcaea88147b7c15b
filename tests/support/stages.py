"""The library's data stages called on a bare `Warehouse` (tests build warehouses directly; the stages take a Store)."""

from __future__ import annotations

from collections.abc import Sequence

from scaffold_lib.data import stages
from scaffold_lib.data.problems import Problem, Quarantined
from scaffold_lib.store.store import Store
from scaffold_lib.store.warehouse import Warehouse

ALL_SPLITS = ("train", "validation", "test")


def store_of(wh: Warehouse) -> Store:
    return Store.at(wh.path.parent, warehouse=wh.path)


def store_problems(
    wh: Warehouse, problems: Sequence[Problem], quarantined: Sequence[Quarantined] = (), run_id: str | None = None
) -> stages.StageReport:
    return stages.store_problems(store_of(wh), problems, quarantined, run_id)


def generate_teacher_traces(
    wh: Warehouse,
    teacher,
    splits: Sequence[str] = ALL_SPLITS,
    run_id: str | None = None,
    shard: tuple[int, int] | None = None,
) -> stages.StageReport:
    return stages.write_traces(store_of(wh), stages.TeacherConfig(splits=list(splits)), run_id, shard, teacher=teacher)


def segment_traces(wh: Warehouse, run_id: str | None = None) -> stages.StageReport:
    return stages.segment_traces(store_of(wh), run_id=run_id)


def label_signals(wh: Warehouse, run_id: str | None = None) -> stages.StageReport:
    return stages.label_signals(store_of(wh), run_id=run_id)
