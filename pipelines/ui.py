"""`make ui`: the Dagster UI and the MLflow UI on loopback, both logging to `$DAGSTER_HOME/ui.log`, until Ctrl-C,
SIGTERM or SIGHUP stops both (and everything they started).

    python -m pipelines.ui [--dagster-port 3000] [--mlflow-port 5000]

A shell recipe cannot promise that: started in the background from a script (`make ui &`), every child inherits an
ignored SIGINT, `dagster dev` then ignores SIGTERM as well, and a `kill` of make leaves both servers running. So each
server runs in its own session with SIGINT restored, and this process stops each whole session on any of the three
signals, or when one of the servers exits by itself.
"""

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
GRACE_S = 20.0


def mlflow_server(home: Path, port: int) -> list[str]:
    """`mlflow server` on the home's tracking database and artifact folder (docs/screenshots.py and tests/test_uis.py
    start the same)."""
    return [
        str(BIN / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{home}/mlflow.db",
        "--default-artifact-root",
        (home / "mlartifacts").as_uri(),
    ]


def dagster_server(port: int, *, dev: bool = True) -> list[str]:
    """Dagster on the workspace: `dagster dev` (webserver, daemon and code server: what `make ui` runs), or the
    webserver alone (enough to read runs and assets: the screenshots, the UI test)."""
    program = [str(BIN / "dagster"), "dev"] if dev else [str(BIN / "dagster-webserver")]
    quiet = ["--log-level", "warning"] if dev else []
    return [*program, "-w", str(REPO / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port), *quiet]


def commands(home: Path, dagster_port: int, mlflow_port: int) -> dict[str, list[str]]:
    """The two servers, both bound to 127.0.0.1 (nothing here is meant to be reachable from another machine)."""
    return {"mlflow": mlflow_server(home, mlflow_port), "dagster": dagster_server(dagster_port)}


def _restore_sigint() -> None:
    # runs in the child before exec: an inherited "ignore SIGINT" would make `dagster dev` deaf to being stopped
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stop(procs: dict[str, subprocess.Popen]) -> None:
    """SIGINT (what Ctrl-C sends: `dagster dev` shuts its webserver, daemon and code server down on it) to each
    server's whole session, SIGTERM after the grace period, SIGKILL last."""
    for sig, wait_s in ((signal.SIGINT, GRACE_S), (signal.SIGTERM, GRACE_S / 2), (signal.SIGKILL, 5.0)):
        alive = [p for p in procs.values() if _group_alive(p.pid)]
        if not alive:
            return
        for p in alive:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and any(_group_alive(p.pid) for p in alive):
            for p in alive:
                p.poll()  # reap the server itself, so its group can empty
            time.sleep(0.2)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member we may not signal still counts
        return True
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.ui", description=__doc__)
    parser.add_argument("--dagster-port", type=int, default=3000)
    parser.add_argument("--mlflow-port", type=int, default=5000)
    args = parser.parse_args(argv)
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(REPO / "dagster_home"))).resolve()
    (home / "mlartifacts").mkdir(parents=True, exist_ok=True)
    mlflow_ui = f"http://127.0.0.1:{args.mlflow_port}"
    # links in Dagster metadata point at this MLflow, whatever its port
    env = {**os.environ, "DAGSTER_HOME": str(home), "SCAFFOLD_MLFLOW_UI": mlflow_ui}

    from scaffold_lib.store import registry
    from scaffold_lib.store.store import Store

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # the terminal shows the addresses, not MLflow's set-up

    # before the server starts: a first call creates the tracking database, which two processes must not do at once
    runs = registry.runs_page(Store.at(home).registry, mlflow_ui)
    stopping: list[int] = []
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda number, _frame: stopping.append(number))
    procs: dict[str, subprocess.Popen] = {}
    with (home / "ui.log").open("ab") as log:
        try:
            for name, command in commands(home, args.dagster_port, args.mlflow_port).items():
                procs[name] = subprocess.Popen(
                    command,
                    env=env,
                    cwd=REPO,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=_restore_sigint,
                )
            print(
                f"Dagster: http://127.0.0.1:{args.dagster_port}   MLflow (training runs): {runs}\n"
                f"logs: {home / 'ui.log'}; pids: "
                + ", ".join(f"{name} {p.pid}" for name, p in procs.items())
                + "; Ctrl-C or SIGTERM stops both",
                flush=True,
            )
            while not stopping:
                ended = [name for name, p in procs.items() if p.poll() is not None]
                if ended:
                    print(f"{ended[0]} exited (code {procs[ended[0]].returncode}); see {home / 'ui.log'}", flush=True)
                    return 1
                time.sleep(0.5)
            return 0
        finally:
            stop(procs)


if __name__ == "__main__":
    sys.exit(main())
