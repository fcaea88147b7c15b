"""`make demo`: the whole pipeline on a preset (default `demo`: the embedded default) as one run of the
`full_pipeline` job, launched through the workspace like any run from the UI (so it carries its job and code
location), then where everything is, the score table and the champion.

    python -m pipelines.demo [--preset demo|micro|…]

The instance is set to the preset first (`$DAGSTER_HOME/scaffold.toml`), so the asset configs' defaults — what the
launchpad shows and what schedules and sensors run with — are the demo's. A Dagster daemon is started for the run
(its log goes to `$DAGSTER_HOME/daemon.log`) and stopped afterwards; the terminal shows one line per stage.
"""

import argparse
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKSPACE = REPO / "workspace.yaml"
JOB = "full_pipeline"


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def watch(instance, run_id: str, started: float, timeout_s: float = 3600):
    """Print one line per finished stage until the run ends; return the finished run."""
    from dagster import DagsterEventType, DagsterRunStatus

    kinds = {DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE, DagsterEventType.RUN_FAILURE}
    cursor, done = None, {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}
    while time.perf_counter() - started < timeout_s:
        run = instance.get_run_by_id(run_id)
        connection = instance.get_records_for_run(run_id, cursor=cursor, of_type=kinds)
        cursor = connection.cursor
        for record in connection.records:
            event = record.event_log_entry.dagster_event
            what = "done" if event.event_type == DagsterEventType.STEP_SUCCESS else "FAILED"
            print(f"  {time.perf_counter() - started:6.0f} s  {event.step_key or 'run'}: {what}", flush=True)
        if run is not None and run.status in done and not connection.has_more:
            return run
        time.sleep(1.0)
    raise TimeoutError(f"run {run_id} did not finish in {timeout_s:.0f} s")


def run_job(home: Path, env: dict[str, str], run_id: str, started: float):
    """The job launched through the workspace as `run_id` and run by a daemon started for it (stopped after, with
    the run workers it started); the finished run, or None when the launch failed (said on stderr)."""
    import dagster as dg

    # not below $DAGSTER_HOME/logs: Dagster moves that folder away (its telemetry queue)
    with (home / "daemon.log").open("ab") as log:
        # its own session, so stopping it stops the run workers it started too
        daemon = subprocess.Popen(
            [_bin("dagster-daemon"), "run", "-w", str(WORKSPACE)],
            env=env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        launched = subprocess.run(
            [_bin("dagster"), "job", "launch", "-w", str(WORKSPACE), "-j", JOB, "--run-id", run_id],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        if launched.returncode != 0:
            print(launched.stderr[-3000:], file=sys.stderr)
            return None
        print(f"run {run_id} of job {JOB} queued; the daemon launches it (log: {home / 'daemon.log'})")
        with dg.DagsterInstance.get() as instance:
            return watch(instance, run_id, started)
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="demo", help="a named preset (scaffold presets)")
    args = parser.parse_args(argv)
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(REPO / "dagster_home"))).resolve()
    home.mkdir(parents=True, exist_ok=True)

    import dagster as dg

    from scaffold_lib.config import instance_settings, save_instance_settings
    from scaffold_lib.evaluation.handles import EvaluationHandle
    from scaffold_lib.runner import summary
    from scaffold_lib.store import registry
    from scaffold_lib.store.handles import load_handle
    from scaffold_lib.store.store import Store

    current, overrides = instance_settings(home)
    if current != args.preset or not (home / "scaffold.toml").exists():
        save_instance_settings(home, args.preset, overrides if current == args.preset else {})
        print(f"{home}: this instance now runs preset {args.preset!r} (was {current!r})")

    env = {**os.environ, "DAGSTER_HOME": str(home)}
    with dg.DagsterInstance.get():
        pass  # create the instance's storage here: the daemon and the launcher would race to create its tables
    run_id = str(uuid.uuid4())
    started = time.perf_counter()
    run = run_job(home, env, run_id, started)
    if run is None:
        return 1
    elapsed = time.perf_counter() - started
    if run.status != dg.DagsterRunStatus.SUCCESS:
        print(
            f"\nThe pipeline run {run_id} ended {run.status.value}; open the Dagster UI (make ui) for its logs.",
            file=sys.stderr,
        )
        return 1
    store = Store.at(home)
    evaluation = load_handle(home, "benchmark_scores", EvaluationHandle, run_id)
    champion = registry.alias_version(store.registry, registry.CHAMPION)
    print(
        "\n"
        + summary(
            store,
            evaluation,
            champion,
            f"Reasoning Scaffolding demo ({args.preset}): run {run_id} of job {JOB} finished in {elapsed / 60:.1f} min",
        )
    )
    print(
        "Open the UIs with `make ui`: Dagster on http://127.0.0.1:3000, MLflow's training runs on "
        + registry.runs_page(store.registry)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
