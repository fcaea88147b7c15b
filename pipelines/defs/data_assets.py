"""The data stages as assets: problems -> teacher traces -> segmented steps -> signal labels, with their checks.
Each asset calls its library stage function and adds Dagster metadata; the checks call `scaffold_lib.checks`."""

import dagster as dg

from pipelines.defs.common import (
    DATA_GROUP,
    FLEET_GROUP,
    WAREHOUSE_POOL,
    check_result,
    library_config,
    markdown_table,
    materialized,
    run_id,
    section_config,
    stage_failure,
)
from pipelines.defs.resources import SecretsResource, StoreResource
from scaffold_lib import checks
from scaffold_lib.core.errors import StageFailed
from scaffold_lib.core.files import DataFileError
from scaffold_lib.data.collect import build_problems
from scaffold_lib.data.config import EndpointConfigError
from scaffold_lib.data.label import label_signals, signal_distribution_markdown
from scaffold_lib.data.segment import segment_traces
from scaffold_lib.data.trace import write_traces
from scaffold_lib.evaluation.decontaminate import decontaminate

# the teacher section too: an imported trace file brings its own problems and gold answers
ProblemsRunConfig = section_config("problems", "teacher")
TeacherRunConfig = section_config("teacher")
SegmentationRunConfig = section_config("segmentation")
LabellerRunConfig = section_config("labeller")


@dg.asset(group_name=DATA_GROUP, kinds={"python", "duckdb"}, pool=WAREHOUSE_POOL)
def problems(
    context: dg.AssetExecutionContext, config: ProblemsRunConfig, store: StoreResource
) -> dg.MaterializeResult:
    """Questions with gold answers: the configured source (synthetic generator, reasoning-gym, or problem files) plus
    any problem file dropped into the watched folder, plus an imported trace file's own problems; keyed by content,
    split train/validation/test by group."""
    s = store.open()
    try:
        report = build_problems(
            s, library_config(config, "problems"), run_id(context), library_config(config, "teacher")
        )
    except (StageFailed, DataFileError) as exc:
        raise stage_failure(exc) from exc
    context.log.info(report.summary())  # says which format an imported trace file was read as
    by_source = s.warehouse.query("SELECT source, split, count(*) AS n FROM problems GROUP BY ALL ORDER BY ALL")
    sample = s.warehouse.query("SELECT question, answer FROM problems ORDER BY problem_id LIMIT 3")
    return materialized(
        metadata={
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
    )


@dg.asset_check(asset=problems, description="problem files had no malformed rows (quarantined rows are counted)")
def problems_without_quarantine(store: StoreResource) -> dg.AssetCheckResult:
    return check_result(checks.problems_without_quarantine(store.open()))


@dg.asset_check(
    asset=problems,
    blocking=True,
    description="no group (arithmetic skeleton, template) has problems in "
    "two splits: no test item is a reworded training item",
)
def splits_disjoint_by_group(store: StoreResource) -> dg.AssetCheckResult:
    return check_result(checks.splits_disjoint_by_group(store.open()))


DecontaminationRunConfig = section_config("decontamination")


@dg.asset(group_name=DATA_GROUP, kinds={"python", "duckdb"}, deps=[problems], pool=WAREHOUSE_POOL)
def decontamination(
    context: dg.AssetExecutionContext, config: DecontaminationRunConfig, store: StoreResource
) -> dg.MaterializeResult:
    """Training problems sharing a word n-gram with a benchmark question (every suite whose file is present),
    recorded and, by default, left out of training; suites without a file are listed as not checked."""
    try:
        report = decontaminate(store.open(), library_config(config, "decontamination"), run_id(context))
    except DataFileError as exc:
        raise stage_failure(exc) from exc
    d = report.details
    return materialized(
        metadata={
            "dagster/row_count": report.total_rows,
            "new_rows": report.new_rows,
            "overlapping_problems": d["overlapping_problems"],
            "problems_checked": d["problems_checked"],
            "action": d["action"],
            "ngram": d["ngram"],
            "overlap_by_suite": dg.MetadataValue.json(d["checked"]),
            "suites_not_checked": dg.MetadataValue.json(d["not_checked"]),
        }
    )


def trace(
    context: dg.AssetExecutionContext,
    config: dg.Config,
    store: StoreResource,
    secrets: SecretsResource,
    shard: tuple[int, int] | None,
) -> dg.MaterializeResult:
    cfg = library_config(config, "teacher")
    cfg = cfg.model_copy(update={"endpoint": secrets.apply(cfg.endpoint, secrets.teacher_api_key)})
    try:
        report = write_traces(store.open(), cfg, run_id(context), shard)
    except (StageFailed, EndpointConfigError, DataFileError) as exc:
        raise stage_failure(exc) from exc
    context.log.info(report.summary())
    d = dict(report.details)
    run = d.pop("run")
    return materialized(
        metadata={
            "dagster/row_count": report.total_rows,
            "new_rows": report.new_rows,
            **d,
            **{
                k: v
                for k, v in run.items()
                if k in ("completion_tokens", "latency_p50_s", "latency_p95_s", "answered_per_s") and v is not None
            },
            **({"this_run": dg.MetadataValue.json(run)} if run else {}),
            "failures_by_error": dg.MetadataValue.json(run.get("errors", {})),
        }
    )


@dg.asset(
    group_name=DATA_GROUP,
    kinds={"python", "duckdb"},
    deps=[problems],
    pool=WAREHOUSE_POOL,
    retry_policy=dg.RetryPolicy(max_retries=3, delay=10, backoff=dg.Backoff.EXPONENTIAL),
)
def teacher_traces(
    context: dg.AssetExecutionContext, config: TeacherRunConfig, store: StoreResource, secrets: SecretsResource
) -> dg.MaterializeResult:
    """One teacher answer per problem, verified against the gold answer by the pipeline's scorer. Only problems
    without a trace from this teacher are sent (trace ids are content hashes), so a refresh does only the new work;
    a run in which the teacher answered nothing fails with the reason."""
    return trace(context, config, store, secrets, None)


# Problem shards for fanning generation out over a fleet: a backfill of this asset runs one partition per shard
# (shard k on base URL k mod n) and a failed shard re-runs alone. It writes the same table, with the same ids, as
# `teacher_traces`, in its own group and job (a job cannot mix two partitionings); never materialised is its normal
# state unless you run a fleet.
N_TRACE_SHARDS = 8
TRACE_SHARDS = dg.StaticPartitionsDefinition([f"shard-{i:02d}" for i in range(N_TRACE_SHARDS)])


@dg.asset(
    group_name=FLEET_GROUP,
    kinds={"python", "duckdb"},
    deps=[problems],
    pool=WAREHOUSE_POOL,
    partitions_def=TRACE_SHARDS,
)
def teacher_trace_shards(
    context: dg.AssetExecutionContext, config: TeacherRunConfig, store: StoreResource, secrets: SecretsResource
) -> dg.MaterializeResult:
    """Optional: teacher traces for one problem shard, for backfills over several endpoints (`trace_backfill` job).
    The default pipeline traces through `teacher_traces` and never needs this asset."""
    shard = TRACE_SHARDS.get_partition_keys().index(context.partition_key)
    return trace(context, config, store, secrets, (shard, N_TRACE_SHARDS))


@dg.asset_check(asset=teacher_traces, blocking=True, description="teacher accuracy is above the floor (0.5)")
def teacher_accuracy_above_floor(store: StoreResource) -> dg.AssetCheckResult:
    return check_result(checks.teacher_accuracy_above_floor(store.open()))


@dg.asset(
    group_name=DATA_GROUP, kinds={"python", "duckdb"}, deps=[teacher_traces, teacher_trace_shards], pool=WAREHOUSE_POOL
)
def segmented_steps(
    context: dg.AssetExecutionContext, config: SegmentationRunConfig, store: StoreResource
) -> dg.MaterializeResult:
    """Each trace cut into steps by its teacher's segmenter (blank lines for R1-style traces, lines for GSM8K-style
    solutions; recorded on each step); a trace with no step is quarantined and counted."""
    try:
        report = segment_traces(store.open(), library_config(config, "segmentation"), run_id(context))
    except StageFailed as exc:
        raise stage_failure(exc) from exc
    d = dict(report.details)
    return materialized(
        metadata={
            "dagster/row_count": report.total_rows,
            "new_rows": report.new_rows,
            "segmenters": dg.MetadataValue.json(d.pop("segmenters")),
            **d,
        }
    )


@dg.asset_check(asset=segmented_steps, blocking=True, description="no step is empty or whitespace")
def no_empty_steps(store: StoreResource) -> dg.AssetCheckResult:
    return check_result(checks.no_empty_steps(store.open()))


@dg.asset(group_name=DATA_GROUP, kinds={"python", "duckdb"}, deps=[segmented_steps], pool=WAREHOUSE_POOL)
def signal_labels(
    context: dg.AssetExecutionContext, config: LabellerRunConfig, store: StoreResource, secrets: SecretsResource
) -> dg.MaterializeResult:
    """One of the seven signals per step: keyword labeller (opening words), final step = answer, and a counted
    deterministic fallback for steps with no keyword; then, when configured, an LLM confirms or corrects each
    keyword label and labels the fallback steps (verdicts cached by step content)."""
    cfg = library_config(config, "labeller")
    cfg = cfg.model_copy(update={"endpoint": secrets.apply(cfg.endpoint, secrets.labeller_api_key)})
    try:
        report = label_signals(store.open(), cfg, run_id(context))
    except (StageFailed, EndpointConfigError) as exc:
        raise stage_failure(exc) from exc
    d = report.details
    validation = d.get("validation", {})
    return materialized(
        metadata={
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
    )


@dg.asset_check(
    asset=signal_labels,
    blocking=True,
    description="every step id once in segmented_steps, at most one label per step, no label without its step",
)
def one_row_per_step(store: StoreResource) -> dg.AssetCheckResult:
    return check_result(checks.one_row_per_step(store.open()))


@dg.asset_check(
    asset=signal_labels,
    blocking=True,
    description="keyword coverage >= 50 % and fallback share <= 30 % (paper: 74 % coverage)",
)
def label_coverage_in_bounds(store: StoreResource) -> dg.AssetCheckResult:
    return check_result(checks.label_coverage_in_bounds(store.open()))
