"""Entry point of a training job under a distributed launcher, started by the `student_model` asset through
Dagster Pipes (or by hand):

    torchrun --standalone --nproc-per-node 8 -m scaffold_lib.student.launch job.json
    accelerate launch --num_processes 8 -m scaffold_lib.student.launch job.json

`job.json` names the warehouse, the artifacts folder, the base model, the shard manifest and the `TrainConfig`.
Every rank trains (DDP, see `training.train`); rank 0 alone writes checkpoints and the student, writes
`<student>/training.json` with the loss curve, and, when Dagster started it, streams its logs through Pipes. The child never writes the warehouse or MLflow: the asset records lineage and
registers the version after the launch returns, so DuckDB keeps one writer.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

from scaffold_lib.core.devices import pick_device, spread_malloc_arenas
from scaffold_lib.store.warehouse import Warehouse
from scaffold_lib.student.handles import LaunchJob
from scaffold_lib.student.train import fit_student
from scaffold_lib.student.training import init_distributed


def run(job: LaunchJob) -> dict:
    dist = init_distributed(pick_device(job.train.device))
    pipes = None
    with contextlib.ExitStack() as stack:
        if dist.is_main and "DAGSTER_PIPES_CONTEXT" in os.environ:
            from dagster_pipes import open_dagster_pipes

            pipes = stack.enter_context(open_dagster_pipes())

        def on_log(step: int, metrics: dict) -> None:
            if pipes is not None:
                pipes.log.info(
                    f"{job.train.kind} step {step}/{job.train.max_steps}: loss {metrics['loss']:.4f}, "
                    f"{metrics['tokens_per_s']:,.0f} tokens/s (world {dist.world})"
                )

        trained = fit_student(
            Warehouse(job.warehouse),
            job.artifacts,
            job.base_model,
            job.manifest_hash,
            job.train,
            on_log=on_log,
            progress=False,
            injection=job.signal_injection,
        )
        summary = {
            "student_path": trained.path,
            "world_size": dist.world,
            "final_loss": trained.result.final_loss,
            "resumed_from_step": trained.result.resumed_from,
            "shard_ids": trained.shard_ids,
        }
        if pipes is not None:
            pipes.log.info(
                f"rank 0 wrote {trained.path} (world {dist.world}, final loss {trained.result.final_loss:.4f})"
            )
    if dist.world > 1:
        import torch.distributed

        torch.distributed.destroy_process_group()
    return summary


def main(argv: list[str] | None = None) -> int:
    spread_malloc_arenas()  # before training starts DataLoader, tokenizer and DuckDB threads
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m scaffold_lib.student.launch JOB.json", file=sys.stderr)
        return 2
    job = LaunchJob.model_validate_json(Path(args[0]).read_text())
    summary = run(job)
    if summary["world_size"] == 1 or int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
