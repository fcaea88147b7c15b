"""The UIs tell the truth and connect, checked the way a person would see them, through the servers' own APIs: the
demo's run (launched through the workspace) is listed under `full_pipeline` with its code location, every asset of
the job is materialised (`benchmark_scores` included), the MLflow experiment opens on its runs and they have real
durations, and the champion answers a question over HTTP from `mlflow models serve`.

The README's screenshots come from `docs/screenshots.py`, which starts the same servers and drives a headless
browser over the same pages."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from screenshots import free_port, wait_for  # docs/screenshots.py starts the same servers

from pipelines.ui import dagster_server, mlflow_server
from scaffold_lib.data.signals import ANSWER_SIGNAL, SIGNALS
from scaffold_lib.store import registry
from scaffold_lib.store.store import Store

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def serve(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(
            command, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Iterator[dict]:
    home = tmp_path_factory.mktemp("ui-home")
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "TQDM_DISABLE": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{home}/mlflow.db",
        # mlflow.set_registry_uri (earlier tests, in this process) exports MLFLOW_REGISTRY_URI: not to these servers
        "MLFLOW_REGISTRY_URI": f"sqlite:///{home}/mlflow.db",
    }
    out = subprocess.run(
        [sys.executable, "-m", "pipelines.demo", "--preset", "micro"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run_id = out.stdout.split("run ", 1)[1].split(" ", 1)[0]
    dagster_port, mlflow_port = free_port(), free_port()
    servers = [
        serve(dagster_server(dagster_port, dev=False), env, home / "webserver.log"),
        serve(mlflow_server(home, mlflow_port), env, home / "mlflow.log"),
    ]
    try:
        wait_for(f"http://127.0.0.1:{dagster_port}/server_info")
        wait_for(f"http://127.0.0.1:{mlflow_port}/health")
        yield {
            "home": home,
            "env": env,
            "run_id": run_id,
            "stdout": out.stdout,
            "dagster": f"http://127.0.0.1:{dagster_port}",
            "mlflow": f"http://127.0.0.1:{mlflow_port}",
        }
    finally:
        for proc in servers:
            stop(proc)


def graphql(demo: dict, query: str, variables: dict | None = None) -> dict:
    response = httpx.post(f"{demo['dagster']}/graphql", json={"query": query, "variables": variables or {}}, timeout=60)
    response.raise_for_status()
    body = response.json()
    assert "errors" not in body, body
    return body["data"]


def test_the_demo_prints_progress_and_the_summary_not_dagsters_event_stream(demo):
    stdout = demo["stdout"]
    assert "of job full_pipeline queued" in stdout and "benchmark_scores: done" in stdout
    assert "DEBUG" not in stdout and "STEP_START" not in stdout
    assert "The comparison table (Pass@1):" in stdout and "Champion: models:/scaffold-student@champion" in stdout


def test_the_run_is_listed_under_full_pipeline_with_its_code_location(demo):
    data = graphql(
        demo,
        """
        query { runsOrError(filter: {pipelineName: "full_pipeline"}) {
            ... on Runs { results { runId status repositoryOrigin { repositoryLocationName } } } } }""",
    )
    runs = {r["runId"]: r for r in data["runsOrError"]["results"]}
    assert demo["run_id"] in runs and runs[demo["run_id"]]["status"] == "SUCCESS"
    assert runs[demo["run_id"]]["repositoryOrigin"]["repositoryLocationName"] == "reasoning-scaffold"


def test_every_asset_of_the_job_is_materialised(demo):
    data = graphql(
        demo,
        """
        query { assetNodes { assetKey { path } groupName
                             assetMaterializations(limit: 1) { runId } } }""",
    )
    nodes = {"/".join(n["assetKey"]["path"]): n for n in data["assetNodes"]}
    for key, node in nodes.items():
        if node["groupName"] in ("teacher_fleet", "experiment"):
            assert not node["assetMaterializations"], key  # optional assets: their own jobs
            continue
        assert [m["runId"] for m in node["assetMaterializations"]] == [demo["run_id"]], key
    assert "benchmark_scores" in nodes


def test_the_mlflow_experiment_opens_on_runs_with_real_durations(demo):
    experiments = httpx.post(
        f"{demo['mlflow']}/api/2.0/mlflow/experiments/search", json={"max_results": 100}, timeout=30
    ).json()["experiments"]
    by_name = {e["name"]: e for e in experiments}
    assert set(by_name) == {"reasoning-scaffold"}  # no empty Default beside it
    ours = by_name["reasoning-scaffold"]
    assert {t["key"]: t["value"] for t in ours.get("tags", [])}["mlflow.experimentKind"] == "custom_model_development"
    runs = httpx.post(
        f"{demo['mlflow']}/api/2.0/mlflow/runs/search", json={"experiment_ids": [ours["experiment_id"]]}, timeout=30
    ).json()["runs"]
    assert len(runs) == 2
    for run in runs:
        info, tags = run["info"], {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert int(info["end_time"]) - int(info["start_time"]) > 500, info  # training took place inside the run
        assert tags["dagster_run_url"].endswith(f"/runs/{demo['run_id']}")
        assert run["inputs"]["dataset_inputs"][0]["dataset"]["digest"] == tags["manifest_hash"]


def test_the_champion_serves_a_prediction_over_http(demo):
    port = free_port()
    proc = serve(
        [
            str(BIN / "mlflow"),
            "models",
            "serve",
            "-m",
            "models:/scaffold-student@champion",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        {**demo["env"], "PATH": f"{BIN}:{os.environ.get('PATH', '')}"},  # MLflow runs `uvicorn` by name
        demo["home"] / "serve.log",
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", timeout_s=240)
        question = "Ava has 3 apples. Ava buys 2 more apples. How many apples does Ava have now?"
        response = httpx.post(
            f"http://127.0.0.1:{port}/invocations",
            timeout=120,
            json={"dataframe_split": {"columns": ["question"], "data": [[question]]}},
        )
        assert response.status_code == 200, response.text
        (prediction,) = response.json()["predictions"]
        assert prediction["question"] == question
        assert prediction["response"].splitlines()[-1].startswith("[response_generation]")
        assert isinstance(prediction["steps"], list)  # a JSON list, not a JSON string to parse again
        for step in prediction["steps"]:
            assert step["signal"] in set(SIGNALS) - {ANSWER_SIGNAL} and isinstance(step["text"], str)
        for bad, why in ((["  "], "(row 0): empty"), ([None], "(row 0): missing")):
            refused = httpx.post(
                f"http://127.0.0.1:{port}/invocations",
                timeout=60,
                json={"dataframe_split": {"columns": ["question"], "data": [bad]}},
            )
            assert refused.status_code == 400, refused.text
            assert f"field 'question' {why}" in refused.json()["message"]
    finally:
        stop(proc)


def test_the_champion_loads_through_pyfunc_and_predicts(demo):
    import mlflow.pyfunc

    reg = Store.at(demo["home"]).registry
    registry.client(reg)
    model = mlflow.pyfunc.load_model("models:/scaffold-student@champion")
    out = model.predict({"question": ["Ava has 3 apples. Ava buys 2 more apples. How many apples does Ava have now?"]})
    assert list(out.columns) == ["question", "answer", "steps", "response"] and len(out) == 1
    assert out["question"][0].startswith("Ava has 3 apples") and isinstance(out["steps"][0], list)
    version = registry.client(reg).get_model_version("scaffold-student", registry.resolve_version(reg, "champion"))
    assert "student trained" in version.description and "promotion" in version.description.lower()


def _as_a_background_job() -> None:
    """What `make ui &` from a script starts with: SIGINT ignored, SIGTERM at its default. This worker's own SIGTERM
    may be ignored (a Dagster run in-process gives SIGTERM SIGINT's disposition, and xdist workers ignore SIGINT), and
    make keeps an inherited ignored SIGTERM ignored, so it is reset here rather than inherited."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_make_ui_started_in_the_background_stops_on_sigterm(tmp_path):
    """`make ui &` from a script: the children inherit an ignored SIGINT, and a SIGTERM reaches make alone. Both
    servers, with everything they started, must be gone afterwards, and the printed MLflow link opens the runs."""
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    dagster_port, mlflow_port = free_port(), free_port()
    pids: list[int] = []
    make = subprocess.Popen(
        [
            "make",
            "-s",
            "-o",
            ".venv/.installed",
            "ui",
            f"UI_ARGS=--dagster-port {dagster_port} --mlflow-port {mlflow_port}",
        ],
        cwd=REPO,
        env={**os.environ, "DAGSTER_HOME": str(home)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=_as_a_background_job,
    )
    try:
        first = next(line for line in make.stdout if line.startswith("Dagster:"))
        second = make.stdout.readline()
        # the experiment's training runs, not MLflow's landing page (its GenAI overview)
        assert re.search(rf"MLflow \(training runs\): http://127.0.0.1:{mlflow_port}/#/experiments/\d+/runs$", first)
        pids = [int(part.split()[-1]) for part in second.split("pids: ", 1)[1].split(";")[0].split(", ")]
        wait_for(f"http://127.0.0.1:{dagster_port}/server_info", timeout_s=240)
        wait_for(f"http://127.0.0.1:{mlflow_port}/health")
        os.kill(make.pid, signal.SIGTERM)  # `kill $!`: make only, not its process group
        try:
            make.wait(timeout=90)
        except subprocess.TimeoutExpired:
            log = (home / "ui.log").read_text(errors="replace")[-3000:]
            pytest.fail(
                f"make ui still running 90 s after SIGTERM (this process's SIGTERM: {signal.getsignal(signal.SIGTERM)}); "
                f"servers {pids}; ui.log ends:\n{log}"
            )
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
            for pid in pids:  # the servers run in sessions of their own: a failed stop must not leave them running
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
    for pid in pids:  # each server ran in its own session: nothing of it may remain
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)
    for port in (dagster_port, mlflow_port):
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
