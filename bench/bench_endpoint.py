"""Endpoint teacher throughput: requests/s achieved against the scripted OpenAI-compatible server with a fixed
per-request latency, as a share of the ideal C / latency (C = requests in flight), and the client's CPU time per
request (this process) and the server's (a subprocess), since both share this machine's cores. The full teacher path is measured: the official
async `openai` client, tenacity, the journal write per completion, answer verification.

    .venv/bin/python bench/bench_endpoint.py [--latency 0.2] [--concurrency 16 64] [--rounds 8]
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scaffold_lib.data.config import EndpointConfig
from scaffold_lib.data.llm_teachers import EndpointTeacher
from scaffold_lib.data.synthetic import GeneratorConfig, generate_problems

REPO = Path(__file__).resolve().parent.parent


def start_server(latency: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "tests" / "support" / "scripted_endpoint.py"),
            "--port",
            "0",
            "--latency",
            str(latency),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    url = next(word for word in line.split() if word.startswith("http://"))
    return proc, url


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of another process (Linux /proc), to see whether the server is the limit."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--latency", type=float, default=0.2, help="server time per request, seconds")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--rounds", type=int, default=8, help="requests per worker")
    args = parser.parse_args()
    proc, url = start_server(args.latency)
    try:
        print(f"server {url}, latency {args.latency * 1000:.0f} ms per request")
        print(
            "| in flight C | requests | wall s | req/s | ideal C/latency | share of ideal | client CPU ms/request "
            "| server CPU ms/request |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for c in args.concurrency:
            n = c * args.rounds
            problems = generate_problems(GeneratorConfig(n_problems=n, seed=c))
            config = EndpointConfig(base_urls=[url], model="scripted-r1", api_key="bench", concurrency=c, timeout_s=30)
            with tempfile.TemporaryDirectory() as journal_dir:
                teacher = EndpointTeacher(config, journal_dir=journal_dir, progress=False)
                cpu, server_cpu, wall = time.process_time(), cpu_seconds(proc.pid), time.perf_counter()
                result = teacher.generate(problems)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                server_cpu = cpu_seconds(proc.pid) - server_cpu
            assert not result.failures, result.failures[:3]
            ideal = c / args.latency
            rate = len(result.traces) / wall
            print(
                f"| {c} | {len(result.traces)} | {wall:.2f} | {rate:.1f} | {ideal:.1f} | {rate / ideal:.1%} "
                f"| {1000 * cpu / len(result.traces):.2f} | {1000 * server_cpu / len(result.traces):.2f} |"
            )
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
