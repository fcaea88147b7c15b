"""Every stage of `scaffold_lib.stages` as a Dagster asset, and each of its checks as an asset check: nothing here
names a stage but the fleet's partitioned teacher. An asset builds the library's configuration from its run config
(the stage's sections, the instance's preset as defaults), calls the stage with the handles its upstream assets
produced in the same run, logs the stage's summary and attaches its metadata (`metadata.py`)."""

import dagster as dg

from pipelines.defs import metadata
from pipelines.defs.common import (
    FLEET_GROUP,
    POOLS,
    check_result,
    instance_config,
    library_config,
    rounded,
    section_config,
    stage_failure,
)
from pipelines.defs.metadata import dagster_ui
from pipelines.defs.resources import SecretsResource, StoreResource
from scaffold_lib.core.errors import RunFailed, UserError
from scaffold_lib.stages import PIPELINE, STAGES, Gate, Stage, StageCall, promotion_gates, stage

# Problem partitions for fanning teacher generation out over a fleet: a backfill of `teacher_trace_shards` runs one
# partition per part (part k on base URL k mod n) and a failed one re-runs alone. It writes the same table, with the
# same ids, as `teacher_traces`, in its own group and job (a job cannot mix two partitionings); never materialised is
# its normal state unless you run a fleet.
N_TRACE_PARTITIONS = 8
TRACE_PARTITIONS = dg.StaticPartitionsDefinition([f"shard-{i:02d}" for i in range(N_TRACE_PARTITIONS)])
PARTITIONED_TEACHER = "teacher_trace_shards"


def _call(
    context: dg.AssetExecutionContext, stage: Stage, config: dg.Config, store, secrets, inputs: dict
) -> StageCall:
    """The stage's call in this run: the instance's configuration with the run config's sections over it (and the
    secrets over the endpoints), this run's handles of its upstream stages, and Dagster's hooks."""
    base = instance_config()
    cfg = base.config.model_copy(update={section: library_config(config, section) for section in stage.sections})
    if secrets is not None:
        cfg = cfg.model_copy(
            update={
                "teacher": cfg.teacher.model_copy(
                    update={"endpoint": secrets.apply(cfg.teacher.endpoint, secrets.teacher_api_key)}
                ),
                "labeller": cfg.labeller.model_copy(
                    update={"endpoint": secrets.apply(cfg.labeller.endpoint, secrets.labeller_api_key)}
                ),
            }
        )
    run_id = context.run.run_id

    def pipes(command: list[str], env: dict[str, str]) -> None:  # torchrun ranks stream their logs into this run
        dg.PipesSubprocessClient().run(command=command, context=context, env=env)

    partition = None
    if context.has_partition_key:
        partition = (TRACE_PARTITIONS.get_partition_keys().index(context.partition_key), N_TRACE_PARTITIONS)
    return StageCall(
        store.open(),
        cfg,
        run_id,
        inputs=inputs,
        progress=False,
        log=context.log.info,
        run_command=pipes,
        tags={"dagster_run_id": run_id, "dagster_run_url": f"{dagster_ui()}/runs/{run_id}"},
        partition=partition,
        failed_gates=failed_promotion_gates(context),
        who=f"dagster run {run_id}",
        preset=base.preset,
    )


def failed_promotion_gates(context: dg.AssetExecutionContext) -> list[str]:
    """Blocking checks on the scaffold student's lineage whose latest evaluation, in this run or an earlier one (e.g.
    a data refresh), did not pass. A blocking check only stops downstream steps of its own run, so promotion asks."""
    failed = []
    for asset, name in promotion_gates():
        record = context.instance.get_latest_asset_check_evaluation_record(dg.AssetCheckKey(dg.AssetKey(asset), name))
        if record is not None and record.status.value == "FAILED":
            failed.append(f"{asset}.{name} failed in run {record.run_id}")
    return failed


def _materialise(context, stage: Stage, call: StageCall):
    """Run the stage; what it hands on goes to the IO manager, its metadata to the UI."""
    try:
        output = stage.run(call)
    except (UserError, RunFailed) as exc:  # retrying cannot help: fail once, loudly
        raise stage_failure(exc) from exc
    context.log.info(output.summary())
    shown = rounded(metadata.METADATA.get(stage.name, metadata.report_metadata)(call.store, output, call))
    # an Output, not a bare value: after a Pipes launch Dagster requires a typed event stream
    return dg.Output(output, metadata=shown) if stage.handle is not None else dg.MaterializeResult(metadata=shown)


def stage_asset(stage: Stage, **override) -> dg.AssetsDefinition:
    """The asset of a stage: its run config, inputs, dependencies, pool, kinds, retries and description from the
    table (`override`: other arguments of `dg.asset`, for the partitioned teacher)."""
    RunConfig = section_config(*stage.sections)
    after = [*stage.after, *([PARTITIONED_TEACHER] if "teacher_traces" in stage.after else [])]
    decorate = dg.asset(
        **{
            "name": stage.name,
            "description": stage.description,
            "group_name": stage.group,
            "kinds": set(stage.kinds),
            "pool": POOLS.get(stage.pool),
            "ins": {upstream: dg.AssetIn(upstream) for upstream in stage.inputs},
            "deps": after,
            "retry_policy": dg.RetryPolicy(max_retries=stage.retries, delay=10, backoff=dg.Backoff.EXPONENTIAL)
            if stage.retries
            else None,
            **override,
        }
    )
    if {"teacher", "labeller"} & set(stage.sections):  # the stages that may call an endpoint get its keys

        def asset(
            context: dg.AssetExecutionContext,
            config: RunConfig,
            store: StoreResource,
            secrets: SecretsResource,
            **inputs,
        ):
            return _materialise(context, stage, _call(context, stage, config, store, secrets, inputs))

    else:

        def asset(context: dg.AssetExecutionContext, config: RunConfig, store: StoreResource, **inputs):
            return _materialise(context, stage, _call(context, stage, config, store, None, inputs))

    return decorate(asset)


def stage_check(stage: Stage, gate: Gate) -> dg.AssetChecksDefinition:
    """A check of the table as an asset check: of the stage's handle (loaded by the IO manager) or of the store."""
    decorate = dg.asset_check(asset=stage.name, name=gate.name, blocking=gate.blocking, description=gate.description)
    if stage.handle is not None:

        def check(handle, store: StoreResource) -> dg.AssetCheckResult:
            return check_result(gate.evaluate(store.open(), handle, stage.name))

    else:

        def check(store: StoreResource) -> dg.AssetCheckResult:
            return check_result(gate.evaluate(store.open(), None, stage.name))

    return decorate(check)


ASSETS: dict[str, dg.AssetsDefinition] = {s.name: stage_asset(s) for s in STAGES}
ASSETS[PARTITIONED_TEACHER] = stage_asset(
    stage("teacher_traces"),
    name=PARTITIONED_TEACHER,
    group_name=FLEET_GROUP,
    partitions_def=TRACE_PARTITIONS,
    retry_policy=None,  # a failed partition re-runs alone, by hand
    description="Optional: teacher traces for one problem partition, for backfills over several endpoints "
    "(`trace_backfill` job). The default pipeline traces through `teacher_traces` and never needs this asset.",
)
CHECKS: dict[str, dg.AssetChecksDefinition] = {g.name: stage_check(s, g) for s in STAGES for g in s.gates}
PIPELINE_ASSETS = [s.name for s in PIPELINE]  # what `full_pipeline` materialises


@dg.definitions
def stage_definitions() -> dg.Definitions:
    return dg.Definitions(assets=list(ASSETS.values()), asset_checks=list(CHECKS.values()))
