"""Jobs, schedules and the sensor that keep the pipeline fresh without anyone pressing a button."""

import dagster as dg

from pipelines.defs.stage_assets import PARTITIONED_TEACHER
from scaffold_lib.core import paths
from scaffold_lib.data.problem_files import PROBLEM_SUFFIXES, problem_files
from scaffold_lib.stages import STAGES, of_command

# the partitioned teacher is for backfills over a fleet of endpoints (its own job): the other jobs trace every
# problem in one step through `teacher_traces`
PARTITIONED = dg.AssetSelection.assets(PARTITIONED_TEACHER)
EXPERIMENT = dg.AssetSelection.assets(*(s.name for s in STAGES if not s.in_pipeline))
# the whole pipeline, in one run: what `make demo` launches
full_pipeline_job = dg.define_asset_job(
    "full_pipeline",
    selection=dg.AssetSelection.all() - PARTITIONED - EXPERIMENT,
    description="every stage, from problems to promotion",
)
# new problems -> traces -> steps -> labels (incremental: only new problems reach the teacher)
data_refresh_job = dg.define_asset_job(
    "data_refresh",
    selection=dg.AssetSelection.assets(*(s.name for s in of_command("data"))),
    description="refresh problems, teacher traces, steps and labels",
)
# one run per problem partition (launch a backfill of it), each on its own endpoint when several are configured
trace_backfill_job = dg.define_asset_job(
    "trace_backfill",
    selection=PARTITIONED,
    description="teacher traces by problem partition, fanned out over endpoints",
)
# the experiment on the data the pipeline holds: both arms over seeds, tuned on validation, tested once
experiment_job = dg.define_asset_job(
    "experiment",
    selection=EXPERIMENT.upstream() - PARTITIONED,
    description="does scaffolding beat CoT-SFT? seeds x arms, τ on validation, paired tests on test",
)
# shards -> students -> scores -> promotion
retrain_job = dg.define_asset_job(
    "retrain_and_evaluate",
    selection=dg.AssetSelection.assets("packed_shards").downstream(),
    description="repack, retrain both students, evaluate and promote",
)

daily_data_refresh = dg.ScheduleDefinition(
    job=data_refresh_job,
    cron_schedule="0 3 * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="daily: new problems reach the teacher and the stages below",
)
weekly_retrain = dg.ScheduleDefinition(
    job=retrain_job,
    cron_schedule="0 5 * * 0",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="weekly: retrain, evaluate and maybe promote",
)


@dg.sensor(
    job=data_refresh_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="starts a data refresh when a problem file appears or changes in $DAGSTER_HOME/incoming",
)
def new_problem_file_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    folder = paths.dagster_home() / "incoming"
    if not folder.exists():
        return dg.SensorResult(
            skip_reason=f"{folder} does not exist yet: create it and drop a problem file there to start a data refresh"
        )
    files = problem_files(folder)
    if not files:  # say so: "0 runs requested" alone reads as a sensor that does not work
        return dg.SensorResult(skip_reason=f"no problem file ({', '.join(PROBLEM_SUFFIXES)}) in {folder}")
    requests = []
    for path in files:
        stat = path.stat()
        # one run per (file, size, mtime): a file that changes is picked up again, an unchanged one never twice
        requests.append(
            dg.RunRequest(run_key=f"{path.name}:{stat.st_size}:{int(stat.st_mtime)}", tags={"problem_file": path.name})
        )
    return dg.SensorResult(run_requests=requests)
