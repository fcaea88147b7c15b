"""What each stage's asset shows in the Dagster UI: row counts, splits, label distribution, keyword coverage, teacher
accuracy, shard fill, a loss table and curve, links to the MLflow run and model version, the traces that trained the
student, the score tables. One function per stage, from the stage's output; a stage without one shows its report."""

import os
from pathlib import Path

import dagster as dg

from pipelines.defs.common import markdown_table, png_markdown, sparkline
from scaffold_lib.data.label_stats import signal_distribution_markdown
from scaffold_lib.evaluation.handles import EvaluationHandle
from scaffold_lib.evaluation.metrics import PASS_COLUMNS, PROCESS_COLUMNS, score_table_markdown
from scaffold_lib.experiment_report import ExperimentResult
from scaffold_lib.stages import StageCall
from scaffold_lib.store import data_tables, registry, training_data
from scaffold_lib.store.handles import PromotionOutcome, StageReport
from scaffold_lib.store.lineage import traces_of_model
from scaffold_lib.store.store import Store
from scaffold_lib.student.handles import ModelHandle, ShardsHandle


def dagster_ui() -> str:
    return os.environ.get("SCAFFOLD_DAGSTER_UI", "http://127.0.0.1:3000").rstrip("/")


def mlflow_run_url(model: ModelHandle) -> str:
    return f"{registry.ui_url()}/#/experiments/{model.mlflow_experiment_id}/runs/{model.mlflow_run_id}"


def report_metadata(s: Store, report: StageReport, call: StageCall) -> dict:
    """A table stage's rows, and the figures of its report (nested ones as JSON)."""
    return {
        "dagster/row_count": report.total_rows,
        "new_rows": report.new_rows,
        **{k: dg.MetadataValue.json(v) if isinstance(v, (dict, list)) else v for k, v in report.details.items()},
    }


def problems(s: Store, report: StageReport, call: StageCall) -> dict:
    by_source = data_tables.problems_by_source(s.warehouse)
    sample = data_tables.first_problems(s.warehouse, 3)
    return {
        "dagster/row_count": report.total_rows,
        "new_rows": report.new_rows,
        "files_loaded": report.details["files_loaded"],
        "quarantined_rows": report.details["quarantined"],
        **{f"split_{k}": v for k, v in report.details["splits"].items()},
        "groups_shared_between_splits": sum(report.details["split_overlap"].values()),
        **{k: report.details[k] for k in ("import_format", "traces_without_gold") if k in report.details},
        "by_source": dg.MetadataValue.md(
            markdown_table(["source", "split", "problems"], [[r["source"], r["split"], r["n"]] for r in by_source])
        ),
        "sample": dg.MetadataValue.md(
            markdown_table(["question", "answer"], [[r["question"], r["answer"]] for r in sample])
        ),
        "warehouse": dg.MetadataValue.path(str(s.warehouse_path)),
    }


def decontamination(s: Store, report: StageReport, call: StageCall) -> dict:
    d = report.details
    return {
        "dagster/row_count": report.total_rows,
        "new_rows": report.new_rows,
        "overlapping_problems": d["overlapping_problems"],
        "problems_checked": d["problems_checked"],
        "action": d["action"],
        "ngram": d["ngram"],
        "overlap_by_suite": dg.MetadataValue.json(d["checked"]),
        "suites_not_checked": dg.MetadataValue.json(d["not_checked"]),
    }


def teacher_traces(s: Store, report: StageReport, call: StageCall) -> dict:
    d = dict(report.details)
    run = d.pop("run")
    shown = ("completion_tokens", "latency_p50_s", "latency_p95_s", "answered_per_s")
    return {
        "dagster/row_count": report.total_rows,
        "new_rows": report.new_rows,
        **d,
        **{k: v for k, v in run.items() if k in shown and v is not None},
        **({"this_run": dg.MetadataValue.json(run)} if run else {}),
        "failures_by_error": dg.MetadataValue.json(run.get("errors", {})),
    }


def segmented_steps(s: Store, report: StageReport, call: StageCall) -> dict:
    d = dict(report.details)
    return {
        "dagster/row_count": report.total_rows,
        "new_rows": report.new_rows,
        "segmenters": dg.MetadataValue.json(d.pop("segmenters")),
        **d,
    }


def signal_labels(s: Store, report: StageReport, call: StageCall) -> dict:
    d = report.details
    validation = d.get("validation", {})
    return {
        "dagster/row_count": report.total_rows,
        "new_rows": report.new_rows,
        "keyword_coverage": d["keyword_coverage"],
        "rule_coverage": d["rule_coverage"],
        "fallback_share": d["fallback_share"],
        **({"llm_agreement": d["llm_agreement"]} if d["llm_agreement"] is not None else {}),
        "keywords_file": d["keywords_file"],
        "label_distribution": dg.MetadataValue.md(signal_distribution_markdown(d["by_signal"])),
        "by_labeller": dg.MetadataValue.json(d["by_labeller"]),
        "keyword_coverage_by_source": dg.MetadataValue.json(d["coverage_by_source"]),
        **({"validation": dg.MetadataValue.json(validation)} if validation else {}),
    }


def packed_shards(s: Store, handle: ShardsHandle, call: StageCall) -> dict:
    stored = [
        path for manifest in handle.manifests.values() for path in training_data.shard_paths(s.warehouse, manifest)
    ]
    rows = [
        [
            kind,
            st["examples"],
            st["rows"],
            st["tokens"],
            f"{100 * st['fill_ratio']:.2f} %",
            st["split_examples"],
            st["dropped_examples"],
        ]
        for kind, st in handle.stats.items()
    ]
    return {
        "dagster/row_count": sum(len(v) for v in handle.shard_ids.values()),
        "scaffold_manifest": handle.manifests["scaffold"],
        "baseline_manifest": handle.manifests["baseline"],
        "base_model": handle.source_model,
        "prepared_backbone": dg.MetadataValue.path(handle.base_model),
        "tokenizer_hash": handle.tokenizer_hash,
        "training_traces": handle.traces,
        "traces_skipped_unlabelled": handle.skipped_incomplete,
        "min_fill_ratio": min(st["fill_ratio"] for st in handle.stats.values()),
        "min_fill_target": handle.fill_target,
        "rows_read_back": s.warehouse.parquet_rows(stored),
        "storage": handle.storage,
        "decoding_budget": dg.MetadataValue.json(handle.budget),
        "packing": dg.MetadataValue.md(
            markdown_table(["kind", "examples", "rows", "tokens", "fill", "split (too long)", "dropped"], rows)
        ),
    }


def loss_table(model: ModelHandle, rows: int = 12) -> str:
    every = max(1, len(model.losses) // rows)
    picked = sorted({*range(0, len(model.losses), every), len(model.losses) - 1})
    body = [
        [
            f"{i + 1}{' (first)' if i == 0 else ' (final)' if i == len(model.losses) - 1 else ''}",
            f"{model.losses[i]:.4f}",
            f"{model.token_losses[i]:.4f}" if model.token_losses else "–",
            f"{model.signal_losses[i]:.4f}" if model.kind == "scaffold" and model.signal_losses else "–",
        ]
        for i in picked
    ]
    return markdown_table(["step", "loss", "token loss", "signal loss"], body)


def trained_model(s: Store, model: ModelHandle, call: StageCall) -> dict:
    ui = registry.ui_url()
    traces = traces_of_model(s.warehouse, model.model_name, model.version)
    return {
        "model_name": model.model_name,
        "model_version": model.version,
        "mlflow_run": dg.MetadataValue.url(mlflow_run_url(model)),
        "mlflow_runs": dg.MetadataValue.url(f"{ui}/#/experiments/{model.mlflow_experiment_id}/runs"),
        "model_version_page": dg.MetadataValue.url(f"{ui}/#/models/{model.model_name}/versions/{model.version}"),
        "model_uri": model.model_uri,
        "manifest_hash": model.manifest_hash,
        "device": model.device,
        "world_size": model.world_size,
        "steps": model.steps,
        "resumed_from_step": model.resumed_from,
        "first_loss": round(model.first_loss, 4),
        "final_loss_last10_mean": round(model.final_loss, 4),
        "tokens_per_s": round(model.tokens_per_s, 1),
        "train_tokens": model.train_tokens,
        "trained_on_traces": len(traces),
        "sample_trace_ids": ", ".join(t["trace_id"] for t in traces[:5]),
        "all_traces_command": f"scaffold lineage --model {model.version} --all"
        if model.kind == "scaffold"
        else f"scaffold lineage --trace <id> (baseline: {model.model_name} v{model.version})",
        # the curve in the metadata table itself, the plot one click away (MLflow serves it), and both as markdown
        "loss_curve": dg.MetadataValue.text(sparkline(model.losses)),
        "loss_plot": dg.MetadataValue.url(
            f"{ui}/get-artifact?path={Path(model.loss_plot).name}&run_uuid={model.mlflow_run_id}"
        ),
        "loss": dg.MetadataValue.md(loss_table(model)),
        "loss_curve_png": dg.MetadataValue.md(png_markdown(model.loss_plot, f"{model.kind} loss")),
    }


def benchmark_scores(s: Store, evaluation: EvaluationHandle, call: StageCall) -> dict:
    samples = [[*key.split(": ", 1), f"`{path}`"] for key, path in evaluation.samples.items()]
    return {
        "dagster/row_count": len(evaluation.rows),
        "suites": ", ".join(evaluation.suites),
        "split": evaluation.split,
        "challenger_version": evaluation.version,
        "evaluation_id": evaluation.evaluation_id,
        "items_per_suite": dg.MetadataValue.json(evaluation.items),
        **({"quarantined_suite_rows": dg.MetadataValue.json(evaluation.quarantined)} if evaluation.quarantined else {}),
        "comparison_table": dg.MetadataValue.md(evaluation.comparison_table),
        # two narrow tables: the one wide table wrapped and was cut off in the metadata panel
        "scores": dg.MetadataValue.md(score_table_markdown(evaluation.rows, PASS_COLUMNS)),
        "process_metrics": dg.MetadataValue.md(score_table_markdown(evaluation.rows, PROCESS_COLUMNS)),
        "mlflow_run": dg.MetadataValue.url(mlflow_run_url(call.inputs["student_model"])),
        **({"samples": dg.MetadataValue.md(markdown_table(["suite", "model", "file"], samples))} if samples else {}),
    }


def model_promotion(s: Store, outcome: PromotionOutcome, call: StageCall) -> dict:
    return {
        "challenger_version": call.inputs["benchmark_scores"].version,
        "previous_champion": outcome.previous_champion or "none",
        "promoted": outcome.promoted,
        "champion_version": outcome.champion or "none",
        "reason": outcome.reason,
        "champion_uri": f"models:/{s.model_name}@champion",
    }


def experiment_report(s: Store, result: ExperimentResult, call: StageCall) -> dict:
    headline = result.primary
    return {
        "experiment_id": result.experiment_id,
        "tau": result.tau,
        "beta": result.beta,
        "signal_injection": result.injection,
        "scaffold_minus_cot_sft_points": round(100 * headline.get("difference", 0.0), 2),
        "ci_low_points": round(100 * headline.get("ci_low", 0.0), 2),
        "ci_high_points": round(100 * headline.get("ci_high", 0.0), 2),
        "p_value": round(headline.get("p_value", 1.0), 4),
        "report": dg.MetadataValue.md(result.report),
        "report_file": dg.MetadataValue.path(result.report_path),
        "tau_plot": dg.MetadataValue.md(png_markdown(result.plot_path, "Pass@1 on validation against τ")),
        "minutes": round(result.minutes, 1),
    }


# what each stage shows; a stage not named here shows its report (`report_metadata`)
METADATA = {
    "problems": problems,
    "decontamination": decontamination,
    "teacher_traces": teacher_traces,
    "segmented_steps": segmented_steps,
    "signal_labels": signal_labels,
    "packed_shards": packed_shards,
    "student_model": trained_model,
    "baseline_model": trained_model,
    "benchmark_scores": benchmark_scores,
    "model_promotion": model_promotion,
    "experiment_report": experiment_report,
}
