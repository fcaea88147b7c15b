"""The whole pipeline in one process, without Dagster: every stage function in order, with the same quality gates
the Dagster asset checks evaluate (a failed blocking gate stops what depends on it and blocks promotion). This is
what `scaffold run` does; Dagster's `full_pipeline` job runs the same functions as assets."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from scaffold_lib import checks
from scaffold_lib.config import PipelineConfig
from scaffold_lib.core.errors import RunFailed
from scaffold_lib.data.collect import build_problems
from scaffold_lib.data.label import label_signals
from scaffold_lib.data.segment import segment_traces
from scaffold_lib.data.trace import write_traces
from scaffold_lib.evaluation.decontaminate import decontaminate
from scaffold_lib.evaluation.evaluate import evaluate_models
from scaffold_lib.evaluation.handles import EvaluationHandle
from scaffold_lib.evaluation.metrics import serving_decode
from scaffold_lib.evaluation.promote import promote_challenger
from scaffold_lib.store.handles import StageReport, save_handle
from scaffold_lib.store.registry import PromotionOutcome
from scaffold_lib.store.store import Store
from scaffold_lib.student.handles import ModelHandle, ShardsHandle
from scaffold_lib.student.pack import pack_shards
from scaffold_lib.student.train import train_model


class GateFailed(RunFailed):
    """A blocking quality gate failed: what depends on it did not run."""


@dataclass
class PipelineResult:
    run_id: str
    reports: dict[str, StageReport] = field(default_factory=dict)
    checks: list[checks.Check] = field(default_factory=list)
    shards: ShardsHandle | None = None
    student: ModelHandle | None = None
    baseline: ModelHandle | None = None
    evaluation: EvaluationHandle | None = None
    promotion: PromotionOutcome | None = None


def new_run_id(prefix: str = "cli") -> str:
    return f"{prefix}-{uuid.uuid4()}"


def run_data_stages(
    store: Store, cfg: PipelineConfig, run_id: str, result: PipelineResult, log: Callable[[str], None] = print
) -> None:
    steps = (
        ("problems", lambda: build_problems(store, cfg.problems, run_id, cfg.teacher)),
        ("decontamination", lambda: decontaminate(store, cfg.decontamination, run_id)),
        ("teacher_traces", lambda: write_traces(store, cfg.teacher, run_id)),
        ("segmented_steps", lambda: segment_traces(store, cfg.segmentation, run_id)),
        ("signal_labels", lambda: label_signals(store, cfg.labeller, run_id)),
    )
    gates = {
        "problems": [checks.problems_without_quarantine, checks.splits_disjoint_by_group],
        "decontamination": [],
        "teacher_traces": [checks.teacher_accuracy_above_floor],
        "segmented_steps": [checks.no_empty_steps],
        "signal_labels": [checks.one_row_per_step, checks.label_coverage_in_bounds],
    }
    for name, stage in steps:
        report = stage()
        result.reports[name] = report
        log(report.summary())
        _gate(result, [check(store) for check in gates[name]], log)


def _gate(result: PipelineResult, evaluated: list[checks.Check], log: Callable[[str], None]) -> None:
    result.checks += evaluated
    for check in evaluated:
        log(check.line())
    failed = [c for c in evaluated if c.blocking and not c.passed]
    if failed:
        raise GateFailed("; ".join(f"{c.asset}.{c.name} failed: {c.metadata}" for c in failed))


def run_pipeline(
    store: Store,
    cfg: PipelineConfig,
    run_id: str | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> PipelineResult:
    """problems -> traces -> steps -> labels -> shards -> scaffold student + CoT-SFT baseline -> scores -> promotion."""
    run_id = run_id or new_run_id()
    result = PipelineResult(run_id)
    run_data_stages(store, cfg, run_id, result, log)
    result.shards = pack_shards(store, cfg.shards, cfg.student, run_id)
    save_handle(store.home, "packed_shards", run_id, result.shards)
    log(f"packed_shards: {result.shards.traces} traces, manifests {result.shards.manifests}")
    _gate(result, [checks.shard_fill_on_target(result.shards, result.shards.fill_target)], log)
    for kind in ("scaffold", "baseline"):
        serving = serving_decode(cfg.eval, result.shards.budget)
        model = train_model(store, result.shards, cfg.train, kind, run_id, serving_decode=serving, progress=progress)
        save_handle(store.home, "student_model" if kind == "scaffold" else "baseline_model", run_id, model)
        setattr(result, "student" if kind == "scaffold" else "baseline", model)
        log(f"{kind}: {model.model_uri}, loss {model.first_loss:.3f} -> {model.final_loss:.3f}")
        _gate(result, [checks.loss_finite_and_falling(model)], log)
    result.evaluation = evaluate_models(
        store, result.student, result.baseline, result.shards, cfg.eval, run_id, progress=progress
    )
    save_handle(store.home, "benchmark_scores", run_id, result.evaluation)
    result.checks.append(checks.scaffold_beats_baseline(result.evaluation, cfg.promotion.suite, cfg.eval.split))
    log(result.checks[-1].line())
    failed = [f"{c.asset}.{c.name}" for c in result.checks if c.blocking and not c.passed]
    result.promotion = promote_challenger(store, result.evaluation, cfg.promotion, failed, who=f"scaffold run {run_id}")
    log(f"promotion: {'yes' if result.promotion.promoted else 'no'} — {result.promotion.reason}")
    return result


STAGE_TABLES = (
    "problems",
    "teacher_traces",
    "segmented_steps",
    "signal_labels",
    "shards",
    "model_versions",
    "benchmark_scores",
    "item_scores",
    "quarantine",
)


def summary(store: Store, evaluation: EvaluationHandle, champion: str | None, header: str) -> str:
    """What `make demo` and `scaffold run` print at the end: where the data is, the comparison table, the process
    metrics and the champion."""
    counts = store.warehouse.counts()
    lines = [header, "", f"Stage tables (DuckDB {store.warehouse_path}):"]
    lines += [f"  {table:<18} {counts[table]:>7} rows" for table in STAGE_TABLES]
    lines += [
        "",
        "The comparison table (Pass@1):",
        "",
        evaluation.comparison_table,
        "",
        "Process metrics:",
        "",
        evaluation.score_table,
        "",
        f"Champion: models:/{store.model_name}@champion = version {champion or 'none'} (MLflow {store.tracking_uri})",
    ]
    return "\n".join(lines)
