"""The quality checks, as pure functions over the store: each takes the store and the handle of the stage it checks
(None for a stage that writes tables only: its check reads the tables) and returns a `Finding`. Which check guards
which stage, its name and whether it blocks is declared once, in the stage table (`scaffold_lib.stages`): Dagster's
asset checks, `scaffold run` and the stage commands all evaluate them from there, and a failed blocking check stops
what depends on it (and blocks promotion)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from scaffold_lib.data.collect import split_overlap
from scaffold_lib.data.label_stats import label_statistics
from scaffold_lib.data.signals import SIGNALS
from scaffold_lib.evaluation.handles import EvaluationHandle
from scaffold_lib.evaluation.suites import HELDOUT
from scaffold_lib.store import data_tables
from scaffold_lib.store.store import Store
from scaffold_lib.student.handles import ModelHandle, ShardsHandle

TEACHER_ACCURACY_FLOOR = 0.5
MIN_KEYWORD_COVERAGE, MAX_FALLBACK_SHARE = 0.5, 0.3


@dataclass(frozen=True)
class Finding:
    """What a check found: whether it passed, the figures, and (when it says more than the check's own description)
    the result in words."""

    passed: bool
    metadata: dict = field(default_factory=dict)
    description: str | None = None


@dataclass(frozen=True)
class Check:
    """A check evaluated on one stage's output."""

    name: str
    asset: str
    passed: bool
    blocking: bool
    description: str
    metadata: dict = field(default_factory=dict)

    def line(self) -> str:
        mark = "ok " if self.passed else ("FAIL" if self.blocking else "warn")
        return f"[{mark}] {self.asset}.{self.name}: {self.description} {self.metadata}"


def problems_without_quarantine(store: Store, _handle: None) -> Finding:
    n = data_tables.quarantined(store.warehouse, "problems")
    return Finding(n == 0, {"quarantined_rows": n})


def splits_disjoint_by_group(store: Store, _handle: None) -> Finding:
    """No group (arithmetic skeleton, template) has problems in more than one split: no test item is a reworded
    training item."""
    overlap = split_overlap(store)
    shared = sum(overlap.values())
    return Finding(shared == 0, {"shared_groups": shared, **overlap})


def teacher_accuracy_above_floor(store: Store, _handle: None, floor: float = TEACHER_ACCURACY_FLOOR) -> Finding:
    acc = data_tables.teacher_accuracy(store.warehouse)
    return Finding(acc >= floor, {"teacher_accuracy": round(acc, 4), "floor": floor})


def no_empty_steps(store: Store, _handle: None) -> Finding:
    n = data_tables.empty_steps(store.warehouse)
    return Finding(n == 0, {"empty_steps": n})


def one_row_per_step(store: Store, _handle: None) -> Finding:
    """Each step id once in `segmented_steps` and at most once in `signal_labels`, and no label without its step: the
    step tables have no unique index (millions of rows), the stages keep them unique and this proves it."""
    counts = data_tables.step_key_violations(store.warehouse)
    return Finding(not any(counts.values()), counts)


def label_coverage_in_bounds(
    store: Store, _handle: None, min_coverage: float = MIN_KEYWORD_COVERAGE, max_fallback: float = MAX_FALLBACK_SHARE
) -> Finding:
    """Keywords and patterns label at least `min_coverage` of the steps, the fallback at most `max_fallback`."""
    stats = label_statistics(store)
    return Finding(
        stats["rule_coverage"] >= min_coverage and stats["fallback_share"] <= max_fallback,
        {
            "keyword_coverage": stats["keyword_coverage"],
            "rule_coverage": stats["rule_coverage"],
            "fallback_share": stats["fallback_share"],
            "signals_seen": sum(1 for s in SIGNALS if stats["by_signal"][s]),
        },
    )


def shard_fill_on_target(_store: Store, shards: ShardsHandle) -> Finding:
    fill = min(s["fill_ratio"] for s in shards.stats.values())
    return Finding(fill >= shards.fill_target, {"min_fill_ratio": fill, "target": shards.fill_target})


def loss_finite_and_falling(_store: Store, model: ModelHandle) -> Finding:
    ok = math.isfinite(model.final_loss) and model.final_loss < model.first_loss
    return Finding(ok, {"first_loss": model.first_loss, "final_loss": model.final_loss})


def scaffold_beats_baseline(_store: Store, evaluation: EvaluationHandle) -> Finding:
    """Pass@1 of the scaffold student (predicted signals) against the CoT-SFT baseline on the held-out suite (or the
    first suite scored), in the evaluation's split."""
    suite = HELDOUT if HELDOUT in evaluation.suites else evaluation.suites[0]
    acc = {
        r["variant"]: r["accuracy"]
        for r in evaluation.rows
        if r["benchmark"] == suite and r["split"] == evaluation.split
    }
    scaffold, baseline = acc.get("predicted", 0.0), acc.get("cot_sft", 0.0)
    return Finding(
        scaffold > baseline,
        {"scaffold": scaffold, "baseline": baseline, "difference": scaffold - baseline},
        f"scaffold {scaffold:.3f} vs baseline {baseline:.3f} (difference {scaffold - baseline:+.3f})",
    )
