"""Screenshots of what a first visit to the UIs shows, for the README, taken from a real run: the Dagster asset
graph, the `full_pipeline` job's runs, the `benchmark_scores` asset, MLflow's experiment and the champion version.

    .venv/bin/python docs/screenshots.py [--home DIR] [--out docs/img]

Starts `dagster-webserver` (on the workspace) and `mlflow server` on the home's stores (default: $DAGSTER_HOME, after
`make demo`), points a headless Chromium with a fresh profile at each page (a first visit: no saved layout), and
writes PNGs. Needs Debian's `chromium` (`apt-get install chromium`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from pipelines.ui import dagster_server, mlflow_server

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=5).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer in {timeout_s:.0f} s")


def shoot(url: str, out: Path, width: int = 1440, height: int = 900, budget_ms: int = 20000) -> Path:
    """A headless Chromium screenshot after `budget_ms` of virtual time (the UIs load their data by script)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium is not installed (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:  # a fresh profile: what a first visit sees
        subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                "--disable-sync",
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                f"--virtual-time-budget={budget_ms}",
                f"--screenshot={out}",
                "--hide-scrollbars",
                url,
            ],
            check=True,
            capture_output=True,
            timeout=180,
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", default=os.environ.get("DAGSTER_HOME", str(REPO / "dagster_home")))
    parser.add_argument("--out", default=str(REPO / "docs" / "img"))
    args = parser.parse_args(argv)
    home, out = Path(args.home).resolve(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DAGSTER_HOME": str(home), "MLFLOW_TRACKING_URI": f"sqlite:///{home}/mlflow.db"}
    dagster_port, mlflow_port = free_port(), free_port()
    procs = [
        subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for command in (dagster_server(dagster_port, dev=False), mlflow_server(home, mlflow_port))
    ]
    try:
        dagster, mlflow = f"http://127.0.0.1:{dagster_port}", f"http://127.0.0.1:{mlflow_port}"
        wait_for(f"{dagster}/server_info")
        wait_for(f"{mlflow}/health")
        experiments = httpx.post(
            f"{mlflow}/api/2.0/mlflow/experiments/search", json={"max_results": 10}, timeout=30
        ).json()["experiments"]
        experiment = next(e["experiment_id"] for e in experiments if e["name"] == "reasoning-scaffold")
        champion = httpx.get(
            f"{mlflow}/api/2.0/mlflow/registered-models/alias",
            params={"name": "scaffold-student", "alias": "champion"},
            timeout=30,
        ).json()
        version = champion["model_version"]["version"]
        pages = {
            "dagster-asset-graph.png": f"{dagster}/asset-groups",
            "dagster-full-pipeline-runs.png": f"{dagster}/locations/reasoning-scaffold/jobs/full_pipeline/runs",
            "dagster-benchmark-scores.png": f"{dagster}/assets/benchmark_scores",
            "mlflow-runs.png": f"{mlflow}/#/experiments/{experiment}/runs",
            "mlflow-model.png": f"{mlflow}/#/models/scaffold-student/versions/{version}",
        }
        for name, url in pages.items():
            print(shoot(url, out / name))
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
