"""DDP on CPU: one process (2 threads) x 2B rows vs torchrun with 2 processes (1 thread each) x B rows, the same
global batch and steps on the embedded default student. Prints tokens/s and the final losses (which must agree:
the trainer slices one global batch over the ranks).

    .venv/bin/python bench/bench_ddp.py [--steps 30] [--batch 8]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def run(cmd: list[str], env: dict) -> str:
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8, help="global rows per step")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="bench-ddp-"))
    env = {**os.environ, "DAGSTER_HOME": str(home), "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cli = [sys.executable, "-m", "scaffold_lib.cli", "--home", str(home), "--preset", "demo"]
    subprocess.run([*cli, "data", "--n-problems", "80"], env=env, capture_output=True, check=True)
    pack = subprocess.run([*cli, "pack"], env=env, capture_output=True, text=True, check=True)
    info = json.loads(pack.stdout)
    results = {}
    for name, procs in (("1 process x 2 threads", 1), ("2 processes x 1 thread", 2)):
        job = home / f"job{procs}.json"
        job.write_text(
            json.dumps(
                {
                    "warehouse": str(home / "warehouse.duckdb"),
                    "artifacts": str(home / f"run{procs}"),
                    "base_model": info["base_model"],
                    "manifest_hash": info["manifests"]["scaffold"],
                    "train": {
                        "max_steps": args.steps,
                        "batch_size": args.batch // procs,
                        "checkpoint_every": 0,
                        "warmup_steps": 3,
                        "learning_rate": 3e-3,
                    },
                }
            )
        )
        launcher = (
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs)]
            if procs > 1
            else [sys.executable]
        )
        summary = json.loads(
            run([*launcher, "-m", "scaffold_lib.student.launch", str(job)], {**env, "OMP_NUM_THREADS": str(2 // procs)})
        )
        result = json.loads((Path(summary["student_path"]) / "training.json").read_text())["result"]
        results[name] = (result["tokens_per_s"], summary["final_loss"])
        print(
            f"{name}, {args.batch // procs} rows each: {result['tokens_per_s']:,.0f} tokens/s, "
            f"final loss {summary['final_loss']:.6f}"
        )
    (one_speed, one_loss), (two_speed, two_loss) = results.values()
    print(
        f"2 processes vs 1: {two_speed / one_speed:.2f}x tokens/s; final loss difference {abs(two_loss - one_loss):.1e}"
    )


if __name__ == "__main__":
    main()
