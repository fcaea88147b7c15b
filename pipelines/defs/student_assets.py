"""The student stages as assets: packed shards -> scaffold student and CoT-SFT baseline (MLflow) -> benchmark scores
-> promotion of the challenger. Each asset calls its library stage function with the handle its upstream produced in
the same run (through the IO manager) and adds Dagster metadata."""

import os
from pathlib import Path

import dagster as dg

from pipelines.defs.common import (
    GPU_POOL,
    STUDENT_GROUP,
    WAREHOUSE_POOL,
    check_result,
    instance_config,
    library_config,
    markdown_table,
    png_markdown,
    rounded,
    run_id,
    section_config,
    sparkline,
    stage_failure,
)
from pipelines.defs.resources import StoreResource
from scaffold_lib import checks
from scaffold_lib.evaluation.evaluate import evaluate_models
from scaffold_lib.evaluation.handles import EvaluationHandle
from scaffold_lib.evaluation.metrics import PASS_COLUMNS, PROCESS_COLUMNS, score_table_markdown, serving_decode
from scaffold_lib.evaluation.promote import promote_challenger
from scaffold_lib.evaluation.suites import HELDOUT, SuiteDataError
from scaffold_lib.store import registry
from scaffold_lib.store.lineage import traces_of_model
from scaffold_lib.student.handles import ModelHandle, ShardsHandle
from scaffold_lib.student.model import StudentLoadError
from scaffold_lib.student.pack import pack_shards
from scaffold_lib.student.train import ShardTokenizerMismatch, train_model

ShardsRunConfig = section_config("shards", "student")
TrainRunConfig = section_config("train")
EvalRunConfig = section_config("eval")
PromotionRunConfig = section_config("promotion")


def dagster_ui() -> str:
    return os.environ.get("SCAFFOLD_DAGSTER_UI", "http://127.0.0.1:3000").rstrip("/")


def mlflow_run_url(model: ModelHandle) -> str:
    return f"{registry.ui_url()}/#/experiments/{model.mlflow_experiment_id}/runs/{model.mlflow_run_id}"


@dg.asset(
    group_name=STUDENT_GROUP,
    kinds={"python", "parquet", "duckdb"},
    deps=["signal_labels", "decontamination"],
    pool=WAREHOUSE_POOL,
)
def packed_shards(context: dg.AssetExecutionContext, config: ShardsRunConfig, store: StoreResource) -> ShardsHandle:
    """Correct training traces in the scaffold format (and plain CoT for the baseline), best-fit-decreasing packed
    into fixed-length rows with per-example position ids, written as Parquet shards with a manifest per arm. The
    backbone's tokenizer gets the signal tags here, so training and decoding use the same ids."""
    s = store.open()
    try:
        handle = pack_shards(s, library_config(config, "shards"), library_config(config, "student"), run_id(context))
    except ValueError as exc:
        raise stage_failure(exc) from exc
    stored_rows = s.warehouse.parquet_rows(
        [
            r["path"]
            for kind in handle.manifests
            for r in s.warehouse.query("SELECT path FROM shards WHERE manifest_hash = ?", [handle.manifests[kind]])
        ]
    )
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
    context.add_output_metadata(
        rounded(
            {
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
                "rows_read_back": stored_rows,
                "storage": handle.storage,
                "decoding_budget": dg.MetadataValue.json(handle.budget),
                "packing": dg.MetadataValue.md(
                    markdown_table(["kind", "examples", "rows", "tokens", "fill", "split (too long)", "dropped"], rows)
                ),
            }
        )
    )
    return handle


@dg.asset_check(asset=packed_shards, blocking=True, description="every packed set fills its rows to the target")
def shard_fill_on_target(packed_shards: ShardsHandle) -> dg.AssetCheckResult:
    return check_result(checks.shard_fill_on_target(packed_shards, packed_shards.fill_target))


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


def train(
    context: dg.AssetExecutionContext, kind: str, config: dg.Config, shards: ShardsHandle, store: StoreResource
) -> dg.Output[ModelHandle]:
    cfg = library_config(config, "train")

    def on_log(step: int, metrics: dict) -> None:
        context.log.info(
            f"{kind} step {step}/{cfg.max_steps}: loss {metrics['loss']:.4f}, {metrics['tokens_per_s']:,.0f} tokens/s"
        )

    def pipes(command: list[str], env: dict[str, str]) -> None:  # torchrun ranks stream their logs into this run
        dg.PipesSubprocessClient().run(command=command, context=context, env=env)

    s = store.open()
    serving = serving_decode(instance_config().config.eval, shards.budget)
    try:
        model = train_model(
            s,
            shards,
            cfg,
            kind,
            run_id(context),
            on_log=on_log,
            run_command=pipes,
            tags={"dagster_run_id": run_id(context), "dagster_run_url": f"{dagster_ui()}/runs/{run_id(context)}"},
            serving_decode=serving,
            progress=False,
        )
    except (ShardTokenizerMismatch, StudentLoadError, FloatingPointError) as exc:
        raise stage_failure(exc) from exc
    ui = registry.ui_url()
    traces = traces_of_model(s.warehouse, model.model_name, model.version)
    # an Output, not a bare value: after a Pipes launch Dagster requires a typed event stream
    return dg.Output(
        model,
        metadata=rounded(
            {
                "model_name": model.model_name,
                "model_version": model.version,
                "mlflow_run": dg.MetadataValue.url(mlflow_run_url(model)),
                "mlflow_runs": dg.MetadataValue.url(f"{ui}/#/experiments/{model.mlflow_experiment_id}/runs"),
                "model_version_page": dg.MetadataValue.url(
                    f"{ui}/#/models/{model.model_name}/versions/{model.version}"
                ),
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
                if kind == "scaffold"
                else f"scaffold lineage --trace <id> (baseline: {model.model_name} v{model.version})",
                # the curve in the metadata table itself, the plot one click away (MLflow serves it), and both as markdown
                "loss_curve": dg.MetadataValue.text(sparkline(model.losses)),
                "loss_plot": dg.MetadataValue.url(
                    f"{ui}/get-artifact?path={Path(model.loss_plot).name}&run_uuid={model.mlflow_run_id}"
                ),
                "loss": dg.MetadataValue.md(loss_table(model)),
                "loss_curve_png": dg.MetadataValue.md(png_markdown(model.loss_plot, f"{kind} loss")),
            }
        ),
    )


@dg.asset(group_name=STUDENT_GROUP, kinds={"pytorch", "mlflow"}, pool=GPU_POOL)
def student_model(
    context: dg.AssetExecutionContext, config: TrainRunConfig, packed_shards: ShardsHandle, store: StoreResource
) -> dg.Output[ModelHandle]:
    """The scaffold student trained with the multi-task loss on this run's shards, tracked live in MLflow and
    registered as a new version with alias `challenger`. Device chosen at run time (CUDA + bf16 when present)."""
    return train(context, "scaffold", config, packed_shards, store)


@dg.asset(group_name=STUDENT_GROUP, kinds={"pytorch", "mlflow"}, pool=GPU_POOL)
def baseline_model(
    context: dg.AssetExecutionContext, config: TrainRunConfig, packed_shards: ShardsHandle, store: StoreResource
) -> dg.Output[ModelHandle]:
    """The CoT-SFT baseline: same backbone, traces and budget as the student, plain text without signals."""
    return train(context, "baseline", config, packed_shards, store)


@dg.asset_check(asset=student_model, blocking=True, description="training loss is finite and fell")
def student_loss_finite_and_falling(student_model: ModelHandle) -> dg.AssetCheckResult:
    return check_result(checks.loss_finite_and_falling(student_model))


@dg.asset_check(asset=baseline_model, blocking=True, description="training loss is finite and fell")
def baseline_loss_finite_and_falling(baseline_model: ModelHandle) -> dg.AssetCheckResult:
    return check_result(checks.loss_finite_and_falling(baseline_model))


@dg.asset(group_name=STUDENT_GROUP, kinds={"pytorch", "duckdb"}, pool=WAREHOUSE_POOL)
def benchmark_scores(
    context: dg.AssetExecutionContext,
    config: EvalRunConfig,
    student_model: ModelHandle,
    baseline_model: ModelHandle,
    packed_shards: ShardsHandle,
    store: StoreResource,
) -> EvaluationHandle:
    """Pass@1 on every configured suite for this run's challenger (predicted / golden / random signals,
    summaries-only), its CoT-SFT baseline and the untuned backbone, with next-signal accuracy, signal fidelity and
    answer consistency: the paper's comparison table. Every variant answers the same items; rows carry the
    eval-config hash, the model version and the evaluation they belong to."""
    try:
        evaluation = evaluate_models(
            store.open(), student_model, baseline_model, packed_shards, library_config(config, "eval"), run_id(context)
        )
    except (SuiteDataError, StudentLoadError, ValueError) as exc:
        raise stage_failure(exc) from exc
    samples = [[*key.split(": ", 1), f"`{path}`"] for key, path in evaluation.samples.items()]
    context.add_output_metadata(
        rounded(
            {
                "dagster/row_count": len(evaluation.rows),
                "suites": ", ".join(evaluation.suites),
                "split": evaluation.split,
                "challenger_version": evaluation.version,
                "evaluation_id": evaluation.evaluation_id,
                "items_per_suite": dg.MetadataValue.json(evaluation.items),
                **(
                    {"quarantined_suite_rows": dg.MetadataValue.json(evaluation.quarantined)}
                    if evaluation.quarantined
                    else {}
                ),
                "comparison_table": dg.MetadataValue.md(evaluation.comparison_table),
                # two narrow tables: the one wide table wrapped and was cut off in the metadata panel
                "scores": dg.MetadataValue.md(score_table_markdown(evaluation.rows, PASS_COLUMNS)),
                "process_metrics": dg.MetadataValue.md(score_table_markdown(evaluation.rows, PROCESS_COLUMNS)),
                "mlflow_run": dg.MetadataValue.url(mlflow_run_url(student_model)),
                **(
                    {"samples": dg.MetadataValue.md(markdown_table(["suite", "model", "file"], samples))}
                    if samples
                    else {}
                ),
            }
        )
    )
    return evaluation


@dg.asset_check(
    asset=benchmark_scores,
    description="the scaffold student (predicted signals) beats the CoT-SFT "
    "baseline; otherwise says by how much it does not",
)
def scaffold_beats_baseline(benchmark_scores: EvaluationHandle) -> dg.AssetCheckResult:
    suite = HELDOUT if HELDOUT in benchmark_scores.suites else benchmark_scores.suites[0]
    return check_result(checks.scaffold_beats_baseline(benchmark_scores, suite, benchmark_scores.split))


def failed_blocking_checks(context: dg.AssetExecutionContext) -> list[str]:
    """Blocking checks on the scaffold student's lineage whose latest evaluation, in this run or an earlier one (e.g.
    a data refresh), did not pass. A blocking check only stops downstream steps of its own run, so promotion asks."""
    failed = []
    for asset, name in BLOCKING_GATES:
        key = dg.AssetCheckKey(dg.AssetKey(asset), name)
        record = context.instance.get_latest_asset_check_evaluation_record(key)
        if record is not None and record.status.value == "FAILED":
            failed.append(f"{asset}.{name} failed in run {record.run_id}")
    return failed


# the blocking checks upstream of the scaffold student, by (asset, check): promotion requires all of them passing
BLOCKING_GATES = (
    ("problems", "splits_disjoint_by_group"),
    ("teacher_traces", "teacher_accuracy_above_floor"),
    ("segmented_steps", "no_empty_steps"),
    ("signal_labels", "one_row_per_step"),
    ("signal_labels", "label_coverage_in_bounds"),
    ("packed_shards", "shard_fill_on_target"),
    ("student_model", "student_loss_finite_and_falling"),
)


@dg.asset(group_name=STUDENT_GROUP, kinds={"mlflow"})
def model_promotion(
    context: dg.AssetExecutionContext,
    config: PromotionRunConfig,
    benchmark_scores: EvaluationHandle,
    store: StoreResource,
) -> dg.MaterializeResult:
    """Moves the `champion` alias to this run's challenger when every gate passed and its score on the promotion
    suite beats the current champion's by the configured margin (same eval config); otherwise records why on the
    version."""
    s = store.open()
    outcome = promote_challenger(
        s,
        benchmark_scores,
        library_config(config, "promotion"),
        failed_blocking_checks(context),
        who=f"dagster run {run_id(context)}",
    )
    context.log.info(
        f"promotion of v{benchmark_scores.version}: {'yes' if outcome.promoted else 'no'} — {outcome.reason}"
    )
    return dg.MaterializeResult(
        metadata=rounded(
            {
                "challenger_version": benchmark_scores.version,
                "previous_champion": outcome.previous_champion or "none",
                "promoted": outcome.promoted,
                "champion_version": outcome.champion or "none",
                "reason": outcome.reason,
                "champion_uri": f"models:/{s.model_name}@champion",
            }
        )
    )
