"""The data stages: problems -> teacher traces -> segmented steps -> signal labels, with their checks."""

from pathlib import Path

import dagster as dg
from pydantic import Field

from pipelines.defs.common import DATA_GROUP, WAREHOUSE_POOL, markdown_table
from pipelines.defs.resources import LabellerResource, TeacherResource, WarehouseResource
from scaffold_lib.core import paths
from scaffold_lib.data.problems import FieldMap, GeneratorConfig, ProblemFileError, generate_problems, load_problem_file
from scaffold_lib.data.endpoint import EndpointConfigError
from scaffold_lib.data.signals import SIGNALS
from scaffold_lib.data.stages import (generate_teacher_traces, label_signals, label_statistics, segment_traces,
                                 signal_distribution_markdown, store_problems, validate_signal_labels)

PROBLEM_SUFFIXES = (".jsonl", ".parquet", ".ndjson", ".json")


def incoming_dir() -> Path:
    return paths.dagster_home() / "incoming"


def problem_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*") if p.is_file() and p.suffix.lower() in PROBLEM_SUFFIXES)


class ProblemsConfig(dg.Config):
    n_problems: int = Field(1500, description="size of the embedded synthetic problem set")
    seed: int = 0
    min_ops: int = 2
    max_ops: int = 4
    max_number: int = 20
    max_factor: int = 3
    distractor_prob: float = 0.4
    test_fraction: float = 0.2
    problem_dir: str = Field("", description="every JSONL/Parquet file here (GSM8K format) is loaded too; "
                                             "empty = $DAGSTER_HOME/incoming")
    lenient: bool = Field(True, description="quarantine bad rows of user files instead of failing")


@dg.asset(group_name=DATA_GROUP, kinds={"python", "duckdb"}, pool=WAREHOUSE_POOL)
def problems(context: dg.AssetExecutionContext, config: ProblemsConfig, warehouse: WarehouseResource) -> dg.MaterializeResult:
    """Questions with gold answers: the seeded synthetic arithmetic set plus any problem files dropped into the
    watched folder. Keyed by content hash; the train/test split is decided by the id alone."""
    wh = warehouse.open()
    generated = generate_problems(GeneratorConfig(n_problems=config.n_problems, seed=config.seed, min_ops=config.min_ops,
                                                  max_ops=config.max_ops, max_number=config.max_number,
                                                  max_factor=config.max_factor, distractor_prob=config.distractor_prob,
                                                  test_fraction=config.test_fraction))
    store_problems(wh, generated, run_id=context.run_id)
    files = problem_files(Path(config.problem_dir) if config.problem_dir else incoming_dir())
    quarantined = 0
    for path in files:
        try:
            loaded = load_problem_file(path, FieldMap(), default_split="test", lenient=config.lenient)
        except ProblemFileError as exc:
            raise dg.Failure(str(exc)) from exc
        store_problems(wh, loaded.problems, loaded.quarantined, run_id=context.run_id)
        quarantined += len(loaded.quarantined)
        context.log.info(f"{path.name}: {len(loaded.problems)} problems, {len(loaded.quarantined)} quarantined")
    by_source = wh.query("SELECT source, split, count(*) AS n FROM problems GROUP BY ALL ORDER BY ALL")
    total = wh.scalar("SELECT count(*) FROM problems")
    sample = wh.query("SELECT question, answer FROM problems ORDER BY problem_id LIMIT 3")
    return dg.MaterializeResult(metadata={
        "dagster/row_count": total,
        "new_rows": wh.scalar("SELECT count(*) FROM problems WHERE dagster_run_id = ?", [context.run_id]),
        "files_loaded": len(files),
        "quarantined_rows": quarantined,
        "by_source": dg.MetadataValue.md(markdown_table(["source", "split", "problems"],
                                                        [[r["source"], r["split"], r["n"]] for r in by_source])),
        "sample": dg.MetadataValue.md(markdown_table(["question", "answer"], [[s["question"], s["answer"]] for s in sample])),
        "warehouse": dg.MetadataValue.path(str(wh.path)),
    })


@dg.asset_check(asset=problems, description="user problem files had no malformed rows (quarantined rows are counted)")
def problems_without_quarantine(warehouse: WarehouseResource) -> dg.AssetCheckResult:
    n = warehouse.open().scalar("SELECT count(*) FROM quarantine WHERE stage = 'problems'")
    return dg.AssetCheckResult(passed=n == 0, severity=dg.AssetCheckSeverity.WARN, metadata={"quarantined_rows": n})


def _trace(context: dg.AssetExecutionContext, warehouse: WarehouseResource, teacher: TeacherResource,
           shard: int | None) -> dg.MaterializeResult:
    wh = warehouse.open()
    try:
        report = generate_teacher_traces(wh, teacher.build(shard), run_id=context.run_id,
                                         shard=None if shard is None else (shard, N_TRACE_SHARDS))
    except EndpointConfigError as exc:  # every request would fail alike: stop, keeping what the journal holds
        raise dg.Failure(str(exc), allow_retries=False) from exc
    context.log.info(report.summary())
    d = report.details
    if d["asked"] and not report.new_rows and d["failed"] and d["failed_unreachable"] == d["failed"]:
        # an outage, not bad prompts: fail the run (failures are recorded, so re-running asks only for those);
        # no Dagster retry, the client already retried every request with backoff
        raise dg.Failure(f"the endpoint answered none of {d['asked']} problems: {d['run'].get('errors')}",
                         allow_retries=False)
    run = d.pop("run")
    return dg.MaterializeResult(metadata={
        "dagster/row_count": report.total_rows, "new_rows": report.new_rows, **d,
        **({"this_run": dg.MetadataValue.json(run)} if run else {}),
        **{k: v for k, v in run.items() if k in ("completion_tokens", "latency_p50_s", "latency_p95_s",
                                                  "answered_per_s") and v is not None},
        "failures_by_error": dg.MetadataValue.json(run.get("errors", {})),
    })


@dg.asset(group_name=DATA_GROUP, kinds={"python", "duckdb"}, deps=[problems], pool=WAREHOUSE_POOL,
          retry_policy=dg.RetryPolicy(max_retries=3, delay=10, backoff=dg.Backoff.EXPONENTIAL))
def teacher_traces(context: dg.AssetExecutionContext, warehouse: WarehouseResource,
                   teacher: TeacherResource) -> dg.MaterializeResult:
    """One teacher answer per problem, verified against the gold answer. Only problems without a trace from this
    teacher are sent (trace ids are content hashes), so a refresh does only the new work."""
    return _trace(context, warehouse, teacher, None)


# Problem shards for fanning generation out over a fleet: a backfill of this asset runs one partition per shard
# (shard k on base URL k mod n) and a failed shard re-runs alone. It writes the same table, with the same ids, as
# `teacher_traces`; it is a separate asset because a Dagster job cannot mix two partitionings and
# `benchmark_scores` is partitioned by suite.
N_TRACE_SHARDS = 8
TRACE_SHARDS = dg.StaticPartitionsDefinition([f"shard-{i:02d}" for i in range(N_TRACE_SHARDS)])


@dg.asset(group_name=DATA_GROUP, kinds={"python", "duckdb"}, deps=[problems], pool=WAREHOUSE_POOL,
          partitions_def=TRACE_SHARDS)
def teacher_trace_shards(context: dg.AssetExecutionContext, warehouse: WarehouseResource,
                         teacher: TeacherResource) -> dg.MaterializeResult:
    """Teacher traces for one problem shard, for backfills over several endpoints (`trace_backfill` job)."""
    return _trace(context, warehouse, teacher, TRACE_SHARDS.get_partition_keys().index(context.partition_key))


@dg.asset_check(asset=teacher_traces, blocking=True, description="teacher accuracy is above the floor (0.5)")
def teacher_accuracy_above_floor(warehouse: WarehouseResource) -> dg.AssetCheckResult:
    acc = warehouse.open().scalar("SELECT coalesce(avg(is_correct::INT), 0) FROM teacher_traces")
    return dg.AssetCheckResult(passed=acc >= 0.5, metadata={"teacher_accuracy": float(acc), "floor": 0.5})


@dg.asset(group_name=DATA_GROUP, kinds={"python", "duckdb"}, deps=[teacher_traces, teacher_trace_shards],
          pool=WAREHOUSE_POOL)
def segmented_steps(context: dg.AssetExecutionContext, warehouse: WarehouseResource) -> dg.MaterializeResult:
    """Each trace cut into steps at blank lines; a trace with no step is quarantined and counted."""
    report = segment_traces(warehouse.open(), run_id=context.run_id)
    return dg.MaterializeResult(metadata={"dagster/row_count": report.total_rows, "new_rows": report.new_rows,
                                          **report.details})


@dg.asset_check(asset=segmented_steps, blocking=True, description="no step is empty or whitespace")
def no_empty_steps(warehouse: WarehouseResource) -> dg.AssetCheckResult:
    # DuckDB's trim() strips spaces only: a step of newlines/tabs must count as empty too
    n = warehouse.open().scalar(r"SELECT count(*) FROM segmented_steps WHERE regexp_full_match(text, '[\s\p{Z}]*')")
    return dg.AssetCheckResult(passed=n == 0, metadata={"empty_steps": n})


@dg.asset(group_name=DATA_GROUP, kinds={"python", "duckdb"}, deps=[segmented_steps], pool=WAREHOUSE_POOL)
def signal_labels(context: dg.AssetExecutionContext, warehouse: WarehouseResource,
                  labeller: LabellerResource) -> dg.MaterializeResult:
    """One of the seven signals per step: keyword labeller (opening words), final step = answer, and a counted
    deterministic fallback for steps with no keyword; then, when configured, an LLM confirms or corrects each
    keyword label and labels the fallback steps (verdicts cached by step content)."""
    wh = warehouse.open()
    report = label_signals(wh, labeller.config(), run_id=context.run_id)
    validation = {}
    validator = labeller.validator()
    if validator is not None:
        try:
            checked = validate_signal_labels(wh, validator, run_id=context.run_id)
        except EndpointConfigError as exc:
            raise dg.Failure(str(exc), allow_retries=False) from exc
        context.log.info(checked.summary())
        validation = {k: checked.details[k] for k in ("validator", "steps_to_validate", "distinct_steps",
                                                      "verdicts_from_cache", "asked", "failed",
                                                      "unparseable_after_reasks")}
        validation["validation_errors"] = dg.MetadataValue.json(checked.details["errors"])
    d = label_statistics(wh)
    return dg.MaterializeResult(metadata={
        "dagster/row_count": report.total_rows, "new_rows": report.new_rows,
        "keyword_coverage": d["keyword_coverage"], "fallback_share": d["fallback_share"],
        **({"llm_agreement": d["llm_agreement"]} if d["llm_agreement"] is not None else {}),
        "keywords_file": report.details["keywords_file"],
        "label_distribution": dg.MetadataValue.md(signal_distribution_markdown(d["by_signal"])),
        "by_labeller": dg.MetadataValue.json(d["by_labeller"]),
        **validation,
    })


@dg.asset_check(asset=signal_labels, blocking=True,
                description="keyword coverage >= 50 % and fallback share <= 30 % (paper: 74 % coverage)")
def label_coverage_in_bounds(warehouse: WarehouseResource) -> dg.AssetCheckResult:
    stats = label_statistics(warehouse.open())
    ok = stats["keyword_coverage"] >= 0.5 and stats["fallback_share"] <= 0.3
    return dg.AssetCheckResult(passed=ok, metadata={"keyword_coverage": stats["keyword_coverage"],
                                                    "fallback_share": stats["fallback_share"],
                                                    "signals_seen": sum(1 for s in SIGNALS if stats["by_signal"][s])})
