"""Problems: what every source yields (a question with its gold answer, keyed by content, in a split) and the
split itself.

Every problem has a content id (`problem_id`, a hash of its question and answer: the same problem under another
file name is the same problem) and a group: the arithmetic skeleton of a synthetic problem, the template of a
reasoning-gym item, a file's `group` column, else the question itself. The split (train / validation / test) is
decided by the group alone, seeded, so no test item is a reworded training item and a problem's split never changes
when the set grows. A file's `split` column, when present, is honoured instead. The sources: `synthetic` (the
embedded generator), `problem_files` (JSONL / Parquet, GSM8K format by default), `reasoning_gym_problems`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from pydantic import BaseModel, Field, model_validator

from scaffold_lib.core.ids import content_id

SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
    "testing": "test",
}


class SplitConfig(BaseModel):
    """Shares of the groups that go to validation and test (the rest is train), decided by a seeded hash of the group."""

    validation_fraction: float = Field(0.1, ge=0, le=1)
    test_fraction: float = Field(0.2, ge=0, le=1)
    seed: int = 0

    @model_validator(mode="after")
    def _fractions(self) -> SplitConfig:
        if self.validation_fraction + self.test_fraction > 1:
            raise ValueError("validation_fraction + test_fraction must not exceed 1")
        return self


class FlatRow:
    """A dataclass whose fields are its warehouse row, as they are (problems, quarantined rows, traces, failures)."""

    def as_row(self) -> dict:
        return dict(vars(self))  # flat fields: asdict() would deep-copy each (a corpus of long traces)


@dataclass(frozen=True)
class Problem(FlatRow):
    problem_id: str
    source: str
    split: str
    question: str
    answer: str
    answer_type: str = "number"
    group_id: str | None = None
    solution: str | None = None  # a worked solution shipped with the problem (GSM8K, reasoning-gym): a reference trace


class Gold(NamedTuple):
    """What grading a trace needs of its problem (a `Problem` has the same fields). The trace importer keeps these, not
    whole problems, for the problems still to trace."""

    problem_id: str
    answer: str
    answer_type: str


def normalise_question(text: str) -> str:
    return " ".join(text.split()).casefold()


def make_problem_id(question: str, answer: str) -> str:
    """Content id: the question (whitespace and case normalised) and the gold answer, never where it came from."""
    return content_id("problem", normalise_question(question), answer.strip())


def split_of(group_id: str, cfg: SplitConfig) -> str:
    """Split from the group alone (seeded): stable under growth, reordering and regeneration, and every problem of a
    group lands in the same split."""
    u = int(content_id("split", cfg.seed, group_id)[:8], 16) / 0x100000000
    return (
        "test"
        if u < cfg.test_fraction
        else "validation"
        if u < cfg.test_fraction + cfg.validation_fraction
        else "train"
    )


def partition_of(problem_id: str, n_partitions: int) -> int:
    """Which of `n_partitions` partitions of teacher generation (a fleet's backfill) a problem belongs to, from the id
    alone."""
    return int(problem_id[8:16], 16) % n_partitions


OOD_SPLITS = ("ood_longer", "ood_distractor", "ood_shuffled")


@dataclass(frozen=True)
class Quarantined(FlatRow):
    """A row that could not become a problem, kept with why (written to the `quarantine` table)."""

    source_file: str
    line: int
    field: str
    error: str
    raw: str


@dataclass
class LoadResult:
    problems: list[Problem]
    quarantined: list[Quarantined]


def collect_problems(items: Iterable[Problem | Quarantined]) -> LoadResult:
    """Problems and quarantined rows of `items`; a problem that comes twice is one problem, its first row."""
    problems: dict[str, Problem] = {}
    quarantined: list[Quarantined] = []
    for item in items:
        if isinstance(item, Quarantined):
            quarantined.append(item)
        else:
            problems.setdefault(item.problem_id, item)
    return LoadResult(list(problems.values()), quarantined)


def quarantine_rows(stage: str, items: Sequence[Quarantined]) -> list[dict]:
    """`quarantine` table rows of `items`, keyed by where each came from and what it held."""
    return [
        {"quarantine_id": content_id("quarantine", stage, q.source_file, q.line, q.raw), "stage": stage, **q.as_row()}
        for q in items
    ]
