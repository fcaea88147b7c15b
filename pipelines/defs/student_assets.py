"""The student stages: packed shards -> scaffold student and CoT-SFT baseline (MLflow) -> benchmark scores ->
promotion of the challenger to champion."""

import json
import sys
from pathlib import Path
from typing import Literal

import dagster as dg
import torch
from pydantic import Field

from pipelines.defs.common import GPU_POOL, STUDENT_GROUP, WAREHOUSE_POOL, markdown_table, upstream_metadata
from pipelines.defs.data_assets import (label_coverage_in_bounds, no_empty_steps, signal_labels,
                                        teacher_accuracy_above_floor)
from pipelines.defs.resources import MlflowResource, StudentResource, WarehouseResource
from scaffold_lib.core import paths
from scaffold_lib.store import registry
from scaffold_lib.evaluation.decoding import DecodeConfig
from scaffold_lib.student.stages import (ShardsConfig, TrainedStudent, build_packed_shards, eval_items, shards_of_manifest,
                                  train_student)
from scaffold_lib.evaluation.metrics import (BASE_VARIANT, EvalConfig, comparison_table_markdown, eval_config_hash,
                                     evaluate_baseline, evaluate_scaffold, export_samples, score_table_markdown)
from scaffold_lib.core.ids import content_id
from scaffold_lib.student.model import ScaffoldStudent, load_tokenizer
from scaffold_lib.student.shards import PackConfig
from scaffold_lib.evaluation.suites import SUITES, SYNTHETIC, SuiteDataError, get_suite
from scaffold_lib.student.launch import LaunchJob
from scaffold_lib.student.training import TrainConfig, TrainResult, pick_device

MODEL_NAME_BASELINE_SUFFIX = "-baseline"


class ShardsRunConfig(dg.Config):
    row_len: int = 512
    rows_per_shard: int = 256
    too_long: str = Field("split", description="split or drop examples longer than a row (counted either way)")
    include_incorrect: bool = False
    min_fill: float = Field(0.99, description="the blocking fill check's threshold")
    storage_url: str = Field("", description="shards to this folder or fsspec URL (s3://bucket/shards with s3fs); "
                                             "empty = the artifacts folder")


@dg.asset(group_name=STUDENT_GROUP, kinds={"python", "parquet", "duckdb"}, deps=[signal_labels], pool=WAREHOUSE_POOL)
def packed_shards(context: dg.AssetExecutionContext, config: ShardsRunConfig, warehouse: WarehouseResource,
                  student: StudentResource) -> dg.MaterializeResult:
    """Correct training traces in the scaffold format (and plain CoT for the baseline), best-fit-decreasing packed
    into fixed-length rows with per-example position ids, written as Parquet shards with a manifest."""
    wh = warehouse.open()
    cfg = ShardsConfig(student=student.student_config(),
                       pack=PackConfig(row_len=config.row_len, rows_per_shard=config.rows_per_shard,
                                       too_long=config.too_long), include_incorrect=config.include_incorrect,
                       storage_url=config.storage_url or None)
    report = build_packed_shards(wh, student.artifacts(), cfg, run_id=context.run_id)
    # read back where they are stored, by DuckDB: what the manifest promises is there
    stored_rows = wh.parquet_rows([i.path for infos in report.shards.values() for i in infos])
    rows = [[kind, s["examples"], s["rows"], s["tokens"], f"{100 * s['fill_ratio']:.2f} %", s["split_examples"],
             s["dropped_examples"]] for kind, s in report.stats.items()]
    return dg.MaterializeResult(metadata={
        "dagster/row_count": sum(len(v) for v in report.shards.values()),
        "scaffold_manifest": report.manifests["scaffold"], "baseline_manifest": report.manifests["baseline"],
        "base_model": report.base_model, "tokenizer_hash": report.tokenizer_hash,
        "training_traces": report.traces, "traces_skipped_unlabelled": report.skipped_incomplete,
        "min_fill_ratio": min(s["fill_ratio"] for s in report.stats.values()), "min_fill_target": config.min_fill,
        "rows_read_back": stored_rows, "storage": config.storage_url or str(student.artifacts() / "shards"),
        "packing": dg.MetadataValue.md(markdown_table(
            ["kind", "examples", "rows", "tokens", "fill", "split (too long)", "dropped"], rows)),
    })


@dg.asset_check(asset=packed_shards, blocking=True,
                description="every packed set fills its rows to the target (default 99 %)")
def shard_fill_on_target(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    fill = float(upstream_metadata(context, "packed_shards", "min_fill_ratio"))
    target = float(upstream_metadata(context, "packed_shards", "min_fill_target"))
    return dg.AssetCheckResult(passed=fill >= target, metadata={"min_fill_ratio": fill, "target": target})


class TrainingRunConfig(dg.Config):
    launcher: Literal["inprocess", "torchrun"] = Field(
        "inprocess", description="torchrun: a DDP job of `nproc` processes started through Dagster Pipes")
    nproc: int = Field(1, ge=1, description="processes per node for torchrun (GPUs, or CPU processes on gloo)")
    fsdp: bool = Field(False, description="with torchrun: shard the student over the processes (FSDP2) instead "
                                          "of replicating it (DDP); scaffold student only")
    max_steps: int = 300
    beta: float = Field(0.3, description="weight of the signal loss: L = (1-β)·L_token + β·L_signal")
    learning_rate: float = 3e-3
    batch_size: int = 8
    grad_accum: int = 1
    checkpoint_every: int = 50
    seed: int = 0
    gradient_checkpointing: bool = Field(False, description="less activation memory for large students")
    attn_implementation: str | None = Field(None, description="sdpa (default), eager, flash_attention_2")
    compile: bool = Field(False, description="torch.compile the forward pass (worth it on GPUs)")
    lora_r: int = Field(0, description="0 = full fine-tune (the paper); > 0 = LoRA adapters of this rank")

    def train_config(self, kind: str, device: str) -> TrainConfig:
        return TrainConfig(kind=kind, beta=self.beta, learning_rate=self.learning_rate, max_steps=self.max_steps,
                           batch_size=self.batch_size, grad_accum=self.grad_accum, seed=self.seed,
                           checkpoint_every=self.checkpoint_every, device=device,
                           warmup_steps=min(20, max(1, self.max_steps // 10)),
                           gradient_checkpointing=self.gradient_checkpointing,
                           attn_implementation=self.attn_implementation, compile=self.compile, fsdp=self.fsdp,
                           lora_r=self.lora_r)


def _train_and_log(context: dg.AssetExecutionContext, kind: str, config: TrainingRunConfig,
                   warehouse: WarehouseResource, student: StudentResource, mlflow_res: MlflowResource) -> dg.MaterializeResult:
    wh = warehouse.open()
    manifest = upstream_metadata(context, "packed_shards", f"{kind}_manifest")
    base_model = upstream_metadata(context, "packed_shards", "base_model")
    device = str(pick_device(student.device))
    cfg = config.train_config(kind, device)
    history: list[dict] = []

    def on_log(step: int, metrics: dict) -> None:
        history.append({"step": step, **metrics})
        context.log.info(f"{kind} step {step}/{cfg.max_steps}: loss {metrics['loss']:.4f}, "
                         f"{metrics['tokens_per_s']:,.0f} tokens/s")

    launched: dict = {}
    if config.launcher == "torchrun":
        trained, launched = _launch_torchrun(context, config.nproc, warehouse, student, base_model, manifest, cfg)
        history = [{"step": i + 1, "loss": loss} for i, loss in enumerate(trained.result.losses)]
    else:
        trained = train_student(wh, student.artifacts(), base_model, manifest, cfg, on_log=on_log, progress=False)
    reg = mlflow_res.config()
    name = reg.model_name if kind == "scaffold" else reg.model_name + MODEL_NAME_BASELINE_SUFFIX
    logged = registry.log_trained_model(
        reg, trained.path, kind=kind, register_as=name,
        params={"train": cfg.model_dump(), "base_model": base_model, "manifest_hash": manifest,
                "dagster_run_id": context.run_id},
        losses=history, tags={"manifest_hash": manifest, "dagster_run_id": context.run_id})
    wh.insert_new("model_versions", [{"model_name": name, "version": logged.version, "kind": kind,
                                      "mlflow_run_id": logged.run_id, "manifest_hash": manifest,
                                      "config_json": json.dumps(cfg.model_dump()),
                                      "final_loss": trained.result.final_loss}], context.run_id)
    wh.insert_new("model_shards", [{"model_name": name, "version": logged.version, "shard_id": s}
                                   for s in trained.shard_ids], context.run_id)
    losses = trained.result.losses
    return dg.MaterializeResult(metadata={
        "model_name": name, "model_version": logged.version, "mlflow_run_id": logged.run_id,
        "model_uri": f"models:/{name}/{logged.version}", "manifest_hash": manifest, "device": device,
        "steps": cfg.max_steps, "resumed_from_step": trained.result.resumed_from,
        "first_loss": losses[0] if losses else float("nan"), "final_loss": trained.result.final_loss,
        "tokens_per_s": round(trained.result.tokens_per_s, 1), "train_tokens": trained.result.train_tokens,
        "loss_curve": dg.MetadataValue.json({"step": [h["step"] for h in history], "loss": [h["loss"] for h in history]}),
        "launcher": config.launcher, **launched,
    })


def _launch_torchrun(context: dg.AssetExecutionContext, nproc: int, warehouse: WarehouseResource,
                     student: StudentResource, base_model: str, manifest: str, cfg: TrainConfig
                     ) -> tuple[TrainedStudent, dict]:
    """Train under `torchrun` through Dagster Pipes: the ranks' logs stream into this run; rank 0 reports the
    student it wrote. This process then registers it (MLflow) and records lineage (DuckDB) as in process."""
    job = LaunchJob(warehouse=str(warehouse.open().path), artifacts=str(student.artifacts()), base_model=base_model,
                    manifest_hash=manifest, train=cfg)
    job_file = paths.inside(student.artifacts(), "launch", f"{content_id('launch', job.model_dump())}.json")
    job_file.parent.mkdir(parents=True, exist_ok=True)
    job_file.write_text(job.model_dump_json())
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "-m", "scaffold_lib.student.launch", str(job_file)]
    env = {"OMP_NUM_THREADS": "1"} if cfg.device != "cuda" and not torch.cuda.is_available() else {}
    reported = dg.PipesSubprocessClient().run(command=command, context=context, env=env).get_materialize_result()
    student_path = Path(reported.metadata["student_path"].value)
    record = json.loads((student_path / "training.json").read_text())
    result = TrainResult(**record["result"])
    shard_ids = [s["shard_id"] for s in shards_of_manifest(warehouse.open(), manifest)]
    trained = TrainedStudent(str(student_path), cfg.kind, manifest, shard_ids, result, cfg.model_dump())
    return trained, {"world_size": record["world_size"], "launch_command": " ".join(command[2:])}


@dg.asset(group_name=STUDENT_GROUP, kinds={"pytorch", "mlflow"}, deps=[packed_shards], pool=GPU_POOL)
def student_model(context: dg.AssetExecutionContext, config: TrainingRunConfig, warehouse: WarehouseResource,
                  student: StudentResource, mlflow: MlflowResource) -> dg.MaterializeResult:
    """The scaffold student trained with the multi-task loss, logged to MLflow and registered as a new version of
    the student model with alias `challenger`. Device chosen at run time (CUDA + bf16 when present)."""
    return _train_and_log(context, "scaffold", config, warehouse, student, mlflow)


@dg.asset(group_name=STUDENT_GROUP, kinds={"pytorch", "mlflow"}, deps=[packed_shards], pool=GPU_POOL)
def baseline_model(context: dg.AssetExecutionContext, config: TrainingRunConfig, warehouse: WarehouseResource,
                   student: StudentResource, mlflow: MlflowResource) -> dg.MaterializeResult:
    """The CoT-SFT baseline: same backbone, traces and budget, plain text without signals."""
    return _train_and_log(context, "baseline", config, warehouse, student, mlflow)


def _loss_check(context: dg.AssetCheckExecutionContext, asset_key: str) -> dg.AssetCheckResult:
    first = float(upstream_metadata(context, asset_key, "first_loss"))
    final = float(upstream_metadata(context, asset_key, "final_loss"))
    ok = final == final and final < float("inf") and final < first
    return dg.AssetCheckResult(passed=ok, metadata={"first_loss": first, "final_loss": final})


@dg.asset_check(asset=student_model, blocking=True, description="training loss is finite and fell")
def student_loss_finite_and_falling(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    return _loss_check(context, "student_model")


@dg.asset_check(asset=baseline_model, blocking=True, description="training loss is finite and fell")
def baseline_loss_finite_and_falling(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    return _loss_check(context, "baseline_model")


class EvalRunConfig(dg.Config):
    tau: float = Field(0.5, description="signal confidence needed to write another step (paper: 0.96)")
    max_steps: int = 16
    max_tokens: int = 400
    limit: int | None = Field(None, description="evaluate the first N items of each suite only")
    variants: list[str] = ["predicted", "golden", "random", "summaries_only"]
    suites: list[str] = Field(["synthetic-arith"], description="suites of a run without a partition key; a "
                                                               "partitioned run evaluates its own suite")
    suites_dir: str = Field("", description="where suite files are looked for; empty = $DAGSTER_HOME/benchmarks")
    include_base: bool = Field(True, description="also score the untuned backbone (the table's first row)")
    export_samples: bool = Field(True, description="write per-sample answers (lm-evaluation-harness style JSONL)")


# one partition per suite, so a suite can be (re-)evaluated alone; unpartitioned runs evaluate `config.suites`
SUITE_PARTITIONS = dg.StaticPartitionsDefinition(list(SUITES))


def suite_items(wh, name: str, config: EvalRunConfig) -> list:
    if name == SYNTHETIC:
        return eval_items(wh, "test")
    folder = Path(config.suites_dir) if config.suites_dir else paths.dagster_home() / "benchmarks"
    try:
        return get_suite(name).load(data_dir=folder, limit=config.limit)
    except SuiteDataError as exc:
        raise dg.Failure(str(exc), allow_retries=False) from exc


@dg.asset(group_name=STUDENT_GROUP, kinds={"pytorch", "duckdb"}, deps=[student_model, baseline_model],
          pool=WAREHOUSE_POOL, partitions_def=SUITE_PARTITIONS)
def benchmark_scores(context: dg.AssetExecutionContext, config: EvalRunConfig, warehouse: WarehouseResource,
                     mlflow: MlflowResource, student: StudentResource) -> dg.MaterializeResult:
    """Pass@1 per suite for the challenger (predicted / golden / random signals, summaries-only), the CoT-SFT
    baseline and the untuned base model, with next-signal accuracy, signal fidelity and answer consistency: the
    paper's comparison table. Rows carry the eval-config hash, the model version and the evaluation they belong
    to; partitioned by suite so one suite re-runs alone."""
    wh = warehouse.open()
    reg = mlflow.config()
    suites = [context.partition_key] if context.has_partition_key else config.suites
    student_name = upstream_metadata(context, "student_model", "model_name")
    student_version = upstream_metadata(context, "student_model", "model_version")
    student_run = upstream_metadata(context, "student_model", "mlflow_run_id")
    models = [("student_model", evaluate_scaffold, {}), ("baseline_model", evaluate_baseline, {})]
    all_rows, samples_written = [], {}
    for suite in suites:
        items = suite_items(wh, suite, config)
        cfg = EvalConfig(benchmark=suite, variants=config.variants, limit=config.limit,
                         decode=DecodeConfig(tau=config.tau, max_steps=config.max_steps, max_tokens=config.max_tokens))
        evaluation_id = content_id("evaluation", student_name, student_version, eval_config_hash(cfg))
        scored = []
        for asset_key, evaluate, kwargs in models:
            name = upstream_metadata(context, asset_key, "model_name")
            version = upstream_metadata(context, asset_key, "model_version")
            model_dir = registry.download_model(reg, version, model_name=name)
            rows, records = evaluate(ScaffoldStudent.from_pretrained(model_dir), load_tokenizer(model_dir), items, cfg,
                                     progress=False, **kwargs)
            scored.append((name, version, upstream_metadata(context, asset_key, "mlflow_run_id"), rows, records))
        if config.include_base:
            base = str(upstream_metadata(context, "packed_shards", "base_model"))
            rows, records = evaluate_baseline(ScaffoldStudent.from_pretrained(base, kind="baseline"),
                                              load_tokenizer(base), items, cfg, progress=False, variant=BASE_VARIANT)
            # the backbone is no registered version: named by its path (or hub id), never an MLflow run
            scored.append((f"base:{Path(base).name or base}", "untuned", None, rows, records))
        for name, version, run_id, rows, records in scored:
            dict_rows = [{**r.as_row(), "model_name": name, "version": version, "mlflow_run_id": run_id,
                          "evaluation_id": evaluation_id,
                          "score_id": content_id("score", name, version, r.benchmark, r.variant, r.eval_config_hash)}
                         for r in rows]
            wh.insert_new("benchmark_scores", dict_rows, context.run_id)
            all_rows += [{**r, "model": f"{name} v{version}"} for r in dict_rows]
            if config.export_samples and records:
                path = export_samples(records, paths.inside(student.artifacts() / "samples", suite,
                                                            f"{name.replace('/', '_')}-v{version}.jsonl"))
                samples_written[f"{name} v{version}"] = str(path)
    table = comparison_table_markdown(all_rows)
    artifact = "scores-" + "-".join(suites)
    for run_id in {r["mlflow_run_id"] for r in all_rows if r["mlflow_run_id"]}:
        own = [r for r in all_rows if r["mlflow_run_id"] == run_id]
        # the student's run also gets the whole comparison (baseline and base rows included)
        text = (table + "\n\n" + score_table_markdown(all_rows)) if run_id == student_run else score_table_markdown(own)
        registry.log_scores(reg, run_id, own if run_id != student_run else all_rows, text, artifact)
    by_variant = {(r["benchmark"], r["variant"]): r["accuracy"] for r in all_rows}
    first = suites[0]
    return dg.MaterializeResult(metadata={
        "dagster/row_count": len(all_rows), "suites": ", ".join(suites),
        "challenger_version": student_version,
        "predicted_accuracy": by_variant.get((first, "predicted"), 0.0),
        "baseline_accuracy": by_variant.get((first, "cot_sft"), 0.0),
        "comparison_table": dg.MetadataValue.md(table),
        "scores": dg.MetadataValue.md(score_table_markdown(all_rows)),
        "eval_config_hash": all_rows[0]["eval_config_hash"] if all_rows else "",
        **({"samples": dg.MetadataValue.json(samples_written)} if samples_written else {}),
    })


@dg.asset_check(asset=benchmark_scores, description="the scaffold student (predicted signals) beats the CoT-SFT "
                                                     "baseline; otherwise says by how much it does not")
def scaffold_beats_baseline(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    scaffold = float(upstream_metadata(context, "benchmark_scores", "predicted_accuracy"))
    baseline = float(upstream_metadata(context, "benchmark_scores", "baseline_accuracy"))
    return dg.AssetCheckResult(passed=scaffold > baseline, severity=dg.AssetCheckSeverity.WARN,
                               description=f"scaffold {scaffold:.3f} vs baseline {baseline:.3f} "
                                           f"(difference {scaffold - baseline:+.3f})",
                               metadata={"scaffold": scaffold, "baseline": baseline, "difference": scaffold - baseline})


def failed_blocking_checks(context: dg.AssetExecutionContext) -> list[str]:
    """Blocking checks on the scaffold student's lineage whose latest evaluation, in this run or an earlier one (e.g.
    a data refresh), did not pass. A blocking check only stops downstream steps of its own run, so promotion asks."""
    failed = []
    for checks_def in (teacher_accuracy_above_floor, no_empty_steps, label_coverage_in_bounds, shard_fill_on_target,
                       student_loss_finite_and_falling):
        for spec in checks_def.check_specs:
            record = context.instance.get_latest_asset_check_evaluation_record(spec.key) if spec.blocking else None
            if record is not None and record.status.value == "FAILED":
                failed.append(f"{spec.key.asset_key.to_user_string()}.{spec.key.name} failed in run {record.run_id}")
    return failed


@dg.asset(group_name=STUDENT_GROUP, kinds={"mlflow"}, deps=[benchmark_scores])
def model_promotion(context: dg.AssetExecutionContext, warehouse: WarehouseResource,
                    mlflow: MlflowResource) -> dg.MaterializeResult:
    """Moves the `champion` alias to the challenger when every gate passed and its predicted-signal accuracy beats
    the current champion's by the configured margin (same eval config); otherwise records why on the version."""
    reg = mlflow.config()
    wh = warehouse.open()
    version = str(upstream_metadata(context, "student_model", "model_version"))
    # the challenger's latest evaluation on the promotion suite (benchmark_scores may be partitioned by suite)
    eval_hash = wh.scalar("SELECT eval_config_hash FROM benchmark_scores WHERE model_name = ? AND version = ? "
                          "AND benchmark = ? AND variant = 'predicted' ORDER BY created_at DESC LIMIT 1",
                          [reg.model_name, version, mlflow.promotion_suite])
    failed = failed_blocking_checks(context)

    def accuracy(v: str) -> float | None:
        return wh.scalar("SELECT max(accuracy) FROM benchmark_scores WHERE model_name = ? AND version = ? "
                         "AND variant = 'predicted' AND eval_config_hash = ?", [reg.model_name, v, eval_hash])

    outcome = registry.promote_if_better(reg, version, accuracy, mlflow.promotion_margin, failed,
                                         who=f"dagster run {context.run_id}")
    if outcome.previous_champion and outcome.previous_champion != version and accuracy(outcome.previous_champion) is None:
        context.log.warning(f"champion v{outcome.previous_champion} has no score with eval config {eval_hash}: "
                            "compared as if there were none")
    promoted, reason, champion = outcome.promoted, outcome.reason, outcome.previous_champion
    context.log.info(f"promotion of v{version}: {'yes' if promoted else 'no'} — {reason}")
    return dg.MaterializeResult(metadata={
        "challenger_version": version, "previous_champion": champion or "none", "promoted": promoted,
        "champion_version": registry.alias_version(reg, registry.CHAMPION) or "none", "reason": reason,
        "champion_uri": f"models:/{reg.model_name}@champion"})
