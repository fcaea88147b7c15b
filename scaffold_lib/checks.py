"""Quality gates over the store, as pure functions: Dagster's asset checks and the `scaffold run` pipeline evaluate the
same ones, and a failed blocking gate stops what depends on it (and blocks promotion)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from scaffold_lib.data.collect import split_overlap
from scaffold_lib.data.label import label_statistics
from scaffold_lib.data.signals import SIGNALS
from scaffold_lib.evaluation.handles import EvaluationHandle
from scaffold_lib.store.store import Store
from scaffold_lib.student.handles import ModelHandle, ShardsHandle

TEACHER_ACCURACY_FLOOR = 0.5
MIN_KEYWORD_COVERAGE, MAX_FALLBACK_SHARE = 0.5, 0.3


@dataclass(frozen=True)
class Check:
    name: str
    asset: str
    passed: bool
    blocking: bool
    description: str
    metadata: dict = field(default_factory=dict)

    def line(self) -> str:
        mark = "ok " if self.passed else ("FAIL" if self.blocking else "warn")
        return f"[{mark}] {self.asset}.{self.name}: {self.description} {self.metadata}"


def problems_without_quarantine(store: Store) -> Check:
    n = store.warehouse.scalar("SELECT count(*) FROM quarantine WHERE stage = 'problems'")
    return Check(
        "problems_without_quarantine",
        "problems",
        n == 0,
        False,
        "problem files had no malformed rows (quarantined rows are counted)",
        {"quarantined_rows": n},
    )


def splits_disjoint_by_group(store: Store) -> Check:
    """No group (arithmetic skeleton, template) has problems in more than one split: no test item is a reworded
    training item."""
    overlap = split_overlap(store)
    shared = sum(overlap.values())
    return Check(
        "splits_disjoint_by_group",
        "problems",
        shared == 0,
        True,
        "no group has problems in two splits",
        {"shared_groups": shared, **overlap},
    )


def teacher_accuracy_above_floor(store: Store, floor: float = TEACHER_ACCURACY_FLOOR) -> Check:
    acc = float(store.warehouse.scalar("SELECT coalesce(avg(is_correct::INT), 0) FROM teacher_traces"))
    return Check(
        "teacher_accuracy_above_floor",
        "teacher_traces",
        acc >= floor,
        True,
        f"teacher accuracy is above the floor ({floor})",
        {"teacher_accuracy": round(acc, 4), "floor": floor},
    )


def no_empty_steps(store: Store) -> Check:
    # DuckDB's trim() strips spaces only: a step of newlines/tabs must count as empty too
    n = store.warehouse.scalar(r"SELECT count(*) FROM segmented_steps WHERE regexp_full_match(text, '[\s\p{Z}]*')")
    return Check(
        "no_empty_steps", "segmented_steps", n == 0, True, "no step is empty or whitespace", {"empty_steps": n}
    )


def one_row_per_step(store: Store) -> Check:
    """Each step id once in `segmented_steps` and at most once in `signal_labels`, and no label without its step: the
    step tables have no unique index (millions of rows), the stages keep them unique and this proves it."""
    wh = store.warehouse
    counts = {
        "duplicate_step_ids": wh.scalar("SELECT count(*) - count(DISTINCT step_id) FROM segmented_steps"),
        "duplicate_labels": wh.scalar("SELECT count(*) - count(DISTINCT step_id) FROM signal_labels"),
        "labels_without_step": wh.scalar(
            "SELECT count(*) FROM signal_labels ANTI JOIN segmented_steps USING (step_id)"
        ),
    }
    return Check(
        "one_row_per_step",
        "signal_labels",
        not any(counts.values()),
        True,
        "every step id once in segmented_steps, at most one label per step, no label without its step",
        counts,
    )


def label_coverage_in_bounds(
    store: Store, min_coverage: float = MIN_KEYWORD_COVERAGE, max_fallback: float = MAX_FALLBACK_SHARE
) -> Check:
    """Keywords and patterns label at least `min_coverage` of the steps, the fallback at most `max_fallback`."""
    stats = label_statistics(store)
    ok = stats["rule_coverage"] >= min_coverage and stats["fallback_share"] <= max_fallback
    return Check(
        "label_coverage_in_bounds",
        "signal_labels",
        ok,
        True,
        f"keyword+pattern coverage >= {min_coverage:.0%} and fallback share <= {max_fallback:.0%} "
        "(paper: 74 % keyword coverage)",
        {
            "keyword_coverage": stats["keyword_coverage"],
            "rule_coverage": stats["rule_coverage"],
            "fallback_share": stats["fallback_share"],
            "signals_seen": sum(1 for s in SIGNALS if stats["by_signal"][s]),
        },
    )


def shard_fill_on_target(shards: ShardsHandle, target: float) -> Check:
    fill = min(s["fill_ratio"] for s in shards.stats.values())
    return Check(
        "shard_fill_on_target",
        "packed_shards",
        fill >= target,
        True,
        "every packed set fills its rows to the target",
        {"min_fill_ratio": fill, "target": target},
    )


def loss_finite_and_falling(model: ModelHandle) -> Check:
    ok = math.isfinite(model.final_loss) and model.final_loss < model.first_loss
    asset = "student_model" if model.kind == "scaffold" else "baseline_model"
    return Check(
        f"{'student' if model.kind == 'scaffold' else 'baseline'}_loss_finite_and_falling",
        asset,
        ok,
        True,
        "training loss is finite and fell",
        {"first_loss": model.first_loss, "final_loss": model.final_loss},
    )


def scaffold_beats_baseline(evaluation: EvaluationHandle, suite: str, split: str) -> Check:
    acc = {r["variant"]: r["accuracy"] for r in evaluation.rows if r["benchmark"] == suite and r["split"] == split}
    scaffold, baseline = acc.get("predicted", 0.0), acc.get("cot_sft", 0.0)
    return Check(
        "scaffold_beats_baseline",
        "benchmark_scores",
        scaffold > baseline,
        False,
        f"scaffold {scaffold:.3f} vs baseline {baseline:.3f} (difference {scaffold - baseline:+.3f})",
        {"scaffold": scaffold, "baseline": baseline, "difference": scaffold - baseline},
    )


DATA_CHECKS = (
    problems_without_quarantine,
    splits_disjoint_by_group,
    teacher_accuracy_above_floor,
    no_empty_steps,
    one_row_per_step,
    label_coverage_in_bounds,
)
