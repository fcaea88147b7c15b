"""Serving latency: one question per request to `mlflow models serve` (the champion, over HTTP), with the serving
thread count set (`SCAFFOLD_SERVE_THREADS`, default half the cores) against torch's default (every core).

    python bench/bench_serving.py [--home H] [--requests 20] [--threads 1 2]

Without --home it builds an instance first: the demo preset's student architecture, `--n-problems` problems,
`--steps` training steps, registered and promoted (`scaffold data/pack/train/promote`). One server per thread count
runs at the same time and the requests alternate between them, so a machine whose load changes during the run
affects both alike. Prints the median and 90th percentile per thread count; the figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
QUESTIONS = [
    "Ava has 3 apples. Ava buys 2 more apples. How many apples does Ava have now?",
    "Ben has 9 pens. Ben gives away 4 pens. How many pens does Ben have left?",
    "A box holds 6 eggs. Cara buys 3 boxes. How many eggs does Cara have?",
    "Dan reads 5 pages a day for 4 days, then 2 more pages. How many pages did Dan read?",
]


def scaffold(home: Path, *args: str) -> str:
    out = subprocess.run(
        [str(BIN / "scaffold"), "--home", str(home), "--preset", "demo", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"},
    )
    if out.returncode != 0:
        raise SystemExit(f"scaffold {' '.join(args)} failed:\n{out.stderr[-2000:]}")
    return out.stdout


def build_instance(home: Path, n_problems: int, steps: int) -> None:
    scaffold(home, "data", "--n-problems", str(n_problems))
    scaffold(home, "pack")
    scaffold(home, "train", "--kind", "scaffold", "--steps", str(steps))
    scaffold(home, "promote", "--version", "1", "--reason", "serving benchmark")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(home: Path, port: int, threads: int | None, log: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",  # MLflow starts uvicorn by name
        "MLFLOW_TRACKING_URI": f"sqlite:///{home}/mlflow.db",
        "MLFLOW_REGISTRY_URI": f"sqlite:///{home}/mlflow.db",
    }
    if threads is None:
        env.pop("SCAFFOLD_SERVE_THREADS", None)
    else:
        env["SCAFFOLD_SERVE_THREADS"] = str(threads)
    command = [str(BIN / "mlflow"), "models", "serve", "-m", "models:/scaffold-student@champion"]
    command += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    with log.open("wb") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def ask(port: int, question: str) -> float:
    started = time.perf_counter()
    response = httpx.post(
        f"http://127.0.0.1:{port}/invocations",
        json={"dataframe_split": {"columns": ["question"], "data": [[question]]}},
        timeout=300,
    )
    response.raise_for_status()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=None, help="an instance with a champion (default: build one)")
    parser.add_argument("--n-problems", type=int, default=300)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--requests", type=int, default=20, help="per thread count")
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1, os.cpu_count() or 2], help="thread counts to compare"
    )
    args = parser.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="bench-serving-"))
    if args.home is None:
        started = time.perf_counter()
        build_instance(home, args.n_problems, args.steps)
        print(f"instance {home} built in {time.perf_counter() - started:.0f} s")
    ports = {t: free_port() for t in args.threads}
    servers = {t: serve(home, ports[t], t, home / f"serve-{t}.log") for t in args.threads}
    try:
        for t, port in ports.items():
            deadline = time.monotonic() + 300
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/ping", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or servers[t].poll() is not None:
                    raise SystemExit(f"server with {t} thread(s) did not start; see {home}/serve-{t}.log")
                time.sleep(1)
            ask(port, QUESTIONS[0])  # the first request loads lazily imported code: not a serving latency
        latencies: dict[int, list[float]] = {t: [] for t in args.threads}
        for i in range(args.requests):
            for t, port in ports.items():
                latencies[t].append(ask(port, QUESTIONS[i % len(QUESTIONS)]))
        load = os.getloadavg()[0]
        print(
            f"{args.requests} requests per thread count, alternating; load average {load:.1f} on {os.cpu_count()} cores"
        )
        for t, values in latencies.items():
            values.sort()
            p90 = values[min(len(values) - 1, round(0.9 * (len(values) - 1)))]
            print(f"  {t} thread(s): median {statistics.median(values):.3f} s, p90 {p90:.3f} s, max {values[-1]:.3f} s")
    finally:
        for proc in servers.values():
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
