"""The stages in one process, without Dagster: the stage table's functions in order, each followed by its checks (a
failed blocking check stops what depends on it, as under Dagster, and the run ends as failed).
`scaffold run` runs the pipeline; every stage command (`scaffold data`, `pack`, `train`, …) runs its stages here too,
so a command, the runner and Dagster's `full_pipeline` job run the same functions with the same checks."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scaffold_lib import stages
from scaffold_lib.checks import Check
from scaffold_lib.config import PipelineConfig
from scaffold_lib.core.errors import RunFailed
from scaffold_lib.evaluation.handles import EvaluationHandle
from scaffold_lib.stages import Stage, StageCall
from scaffold_lib.store.handles import save_handle
from scaffold_lib.store.store import Store

Log = Callable[[str], None]


class GateFailed(RunFailed):
    """A blocking quality check failed: what depends on it did not run."""


@dataclass
class RunResult:
    """What a run of stages produced: each stage's output (its handle or report) by stage name, and every check."""

    run_id: str
    outputs: dict[str, Any] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    handles: dict[str, Path] = field(default_factory=dict)  # stage name -> where its handle was saved


def new_run_id(prefix: str = "cli") -> str:
    return f"{prefix}-{uuid.uuid4()}"


def run_stages(
    store: Store,
    cfg: PipelineConfig,
    chosen: Sequence[Stage],
    run_id: str | None = None,
    *,
    inputs: Mapping[str, Any] | None = None,
    log: Log = print,
    progress: bool = True,
    who: str | None = None,
    preset: str = "",
    stage_log: Log | None = None,
) -> RunResult:
    """Run `chosen` stages in order, each with the handles of the stages before it (from this run, else `inputs`),
    saving each handle for the commands and Dagster runs after it; then its checks. A failed blocking check stops the
    stages that depend on it, as under Dagster (the others still run), and the run then raises `GateFailed`."""
    result = RunResult(run_id or new_run_id())
    available = dict(inputs or {})
    blocked: dict[str, list[str]] = {}  # stage -> the failed blocking checks it depends on
    for stage in chosen:
        causes = sorted({c for name in stage.upstream for c in blocked.get(name, [])})
        if causes:
            blocked[stage.name] = causes
            log(f"{stage.name}: not run ({', '.join(causes)} failed)")
            continue
        call = StageCall(
            store,
            cfg,
            result.run_id,
            inputs={name: available[name] for name in stage.inputs if name in available},
            progress=progress,
            log=stage_log,
            who=who or f"scaffold run {result.run_id}",
            preset=preset,
        )
        output = stage.run(call)
        result.outputs[stage.name] = available[stage.name] = output
        if stage.handle is not None:
            result.handles[stage.name] = save_handle(store.home, stage.name, result.run_id, output)
        log(output.summary())
        # a check reads the handle a stage hands on, else the store (as under Dagster, where no report is kept)
        handed_on = output if stage.handle is not None else None
        evaluated = [gate.evaluate(store, handed_on, stage.name) for gate in stage.gates]
        result.checks += evaluated
        for check in evaluated:
            log(check.line())
        if failed := [f"{c.asset}.{c.name}" for c in evaluated if c.blocking and not c.passed]:
            blocked[stage.name] = failed
    failed = [c for c in result.checks if c.blocking and not c.passed]
    if failed:
        raise GateFailed("; ".join(f"{c.asset}.{c.name} failed: {c.metadata}" for c in failed))
    return result


def run_pipeline(
    store: Store, cfg: PipelineConfig, run_id: str | None = None, log: Log = print, progress: bool = True
) -> RunResult:
    """problems -> traces -> steps -> labels -> shards -> scaffold student + CoT-SFT baseline -> scores -> promotion."""
    return run_stages(store, cfg, stages.PIPELINE, run_id, log=log, progress=progress)


def run_data_stages(store: Store, cfg: PipelineConfig, run_id: str | None = None, log: Log = print) -> RunResult:
    """problems -> decontamination -> traces -> steps -> labels, into the warehouse."""
    return run_stages(store, cfg, stages.of_command("data"), run_id, log=log)


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
