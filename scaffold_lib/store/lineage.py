"""Row-level lineage over the warehouse (docs/architecture.md, "Lineage"): score <- model version <- shard <- trace <- problem.

"Which teacher traces trained the champion?" and "which model versions used trace X?" are one query each."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from scaffold_lib.store.warehouse import Warehouse


def traces_of_model(wh: Warehouse, model_name: str, version: str) -> list[dict]:
    """Every teacher trace (with its problem) in the shards that trained `model_name` v`version`."""
    return wh.query(
        """
        SELECT DISTINCT t.trace_id, t.problem_id, p.source, p.split, t.teacher, t.is_correct
        FROM model_shards ms
        JOIN shard_members sm USING (shard_id)
        JOIN teacher_traces t USING (trace_id)
        JOIN problems p USING (problem_id)
        WHERE ms.model_name = ? AND ms.version = ?
        ORDER BY t.trace_id""",
        [model_name, str(version)],
    )


def models_of_trace(wh: Warehouse, trace_id: str) -> list[dict]:
    """Every model version whose shards contain `trace_id`, with its MLflow run and its scores."""
    return wh.query(
        """
        SELECT DISTINCT mv.model_name, mv.version, mv.kind, mv.mlflow_run_id, mv.dagster_run_id, mv.created_at
        FROM shard_members sm
        JOIN model_shards ms USING (shard_id)
        JOIN model_versions mv ON mv.model_name = ms.model_name AND mv.version = ms.version
        WHERE sm.trace_id = ?
        ORDER BY mv.created_at""",
        [trace_id],
    )


def model_summary(wh: Warehouse, model_name: str, version: str) -> dict:
    """Counts for a model version: shards, traces, problems, and its score rows."""
    traces = traces_of_model(wh, model_name, version)
    shards = wh.query(
        "SELECT shard_id FROM model_shards WHERE model_name = ? AND version = ?", [model_name, str(version)]
    )
    scores = wh.query(
        "SELECT benchmark, variant, n, accuracy, eval_config_hash FROM benchmark_scores "
        "WHERE model_name = ? AND version = ? ORDER BY benchmark, variant",
        [model_name, str(version)],
    )
    return {
        "model": f"{model_name} v{version}",
        "shards": len(shards),
        "traces": len(traces),
        "problems": len({t["problem_id"] for t in traces}),
        "scores": scores,
    }
