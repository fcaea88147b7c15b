"""The training stage: one arm (the scaffold student or the CoT-SFT baseline) trained on its manifest's shards, in
this process or under torchrun (DDP, or FSDP), then registered in MLflow with its lineage (`register.py`).

Checkpoints and the student directory are keyed by (arm, backbone, manifest, config): a retried run resumes where the
killed one stopped, and a re-run with the same inputs finds its student.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from scaffold_lib.core.devices import pick_device
from scaffold_lib.core.errors import StageFailed, UserError
from scaffold_lib.core.ids import content_id
from scaffold_lib.store import registry, training_data
from scaffold_lib.store.store import Store
from scaffold_lib.store.warehouse import Warehouse
from scaffold_lib.student.checkpoints import full_model_state
from scaffold_lib.student.config import SignalInjection, TrainConfig
from scaffold_lib.student.examples import text_format
from scaffold_lib.student.handles import KINDS, LaunchJob, ModelHandle, ShardsHandle
from scaffold_lib.student.model import ScaffoldStudent, load_tokenizer, tokenizer_hash
from scaffold_lib.student.register import TrainingRun, open_training_run, record_lineage, register_student
from scaffold_lib.student.shards import load_rows
from scaffold_lib.student.training import LossNotFinite, TrainResult, init_distributed, train


class ShardTokenizerMismatch(UserError):
    """Shards tokenised with one tokenizer met a model with another."""


@dataclass
class TrainedStudent:
    path: str
    kind: str
    manifest_hash: str
    shard_ids: list[str]
    result: TrainResult
    config: dict
    world_size: int = 1


def check_shards_fit(wh: Warehouse, manifest_hash: str, base_model: str) -> list[dict]:
    """The shards of a manifest, after checking they were tokenised with the backbone's tokenizer."""
    shards = training_data.shards_of_manifest(wh, manifest_hash)
    if not shards:
        raise StageFailed(f"no shards with manifest {manifest_hash}: run the pack stage first")
    model_hash = tokenizer_hash(load_tokenizer(base_model))
    shard_hashes = {s["tokenizer_hash"] for s in shards}
    if shard_hashes != {model_hash}:
        raise ShardTokenizerMismatch(
            f"shards of manifest {manifest_hash} were tokenised with tokenizer {sorted(shard_hashes)} but the backbone "
            f"{base_model} has tokenizer {model_hash}: repack the shards for this backbone (the pack stage with "
            "student.base_model set to it)"
        )
    return shards


def student_key(cfg: TrainConfig, base_model: str, manifest_hash: str, injection: SignalInjection) -> str:
    """The identity of a training run (its checkpoints and student directory): the baseline has no injection, and a
    scaffold student with the original `output` injection keeps the key it had before the setting existed."""
    extra = [injection] if cfg.kind == "scaffold" and injection != "output" else []
    return content_id("student", cfg.kind, base_model, manifest_hash, cfg.model_dump(), *extra)


def fit_student(
    wh: Warehouse,
    artifacts: str | Path,
    base_model: str,
    manifest_hash: str,
    cfg: TrainConfig,
    on_log: Callable[[int, dict], None] | None = None,
    progress: bool = True,
    injection: SignalInjection = "output",
) -> TrainedStudent:
    """Train on the shards of one manifest (this process, or one rank under torchrun); checkpoints are keyed by (base,
    manifest, config), so a retried run resumes where the killed one stopped. Writes the student directory; no
    registry or warehouse writes (the stage does those, in one process)."""
    artifacts = Path(artifacts)
    shards = check_shards_fit(wh, manifest_hash, base_model)
    key = student_key(cfg, base_model, manifest_hash, injection)
    data = load_rows([s["path"] for s in shards])
    torch.manual_seed(cfg.seed)  # the new signal head and embedding: the same seed gives the same student
    model = ScaffoldStudent.from_pretrained(
        base_model,
        kind=cfg.kind,
        injection=injection,
        **({"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}),
    )
    result = train(model, data, cfg, checkpoint_dir=artifacts / "checkpoints" / key, on_log=on_log, progress=progress)
    out = artifacts / "students" / key
    dist = init_distributed(pick_device(cfg.device))
    if cfg.fsdp and dist.world > 1:  # gather the shards; rank 0 saves them as a plain student
        state = full_model_state(model, sharded=True)
        if dist.is_main:
            model = ScaffoldStudent.from_pretrained(base_model, kind=cfg.kind, injection=injection)
            model.load_state_dict(state)
    if dist.is_main:  # under torchrun every rank holds the same weights: one writes them
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, load_tokenizer(base_model), text_format(base_model))
        (tmp / "training.json").write_text(
            json.dumps(
                {
                    "train_config": cfg.model_dump(),
                    "manifest_hash": manifest_hash,
                    "base_model": base_model,
                    "final_loss": result.final_loss,
                    "world_size": dist.world,
                    "result": asdict(result),
                },
                indent=2,
            )
        )
        shutil.rmtree(out, ignore_errors=True)
        tmp.replace(out)
    dist.barrier()
    return TrainedStudent(
        str(out), cfg.kind, manifest_hash, [s["shard_id"] for s in shards], result, cfg.model_dump(), dist.world
    )


def torchrun_command(job_file: Path, nproc: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "-m",
        "scaffold_lib.student.launch",
        str(job_file),
    ]


RunCommand = Callable[[list[str], dict[str, str]], None]


def _run_subprocess(command: list[str], env: dict[str, str]) -> None:
    subprocess.run(command, env={**os.environ, **env}, check=True)


def fit_under_torchrun(
    store: Store,
    base_model: str,
    manifest_hash: str,
    cfg: TrainConfig,
    run_command: RunCommand | None = None,
    injection: SignalInjection = "output",
) -> TrainedStudent:
    """Train under `torchrun` (DDP, or FSDP with `cfg.fsdp`): writes the job file, runs the command (`run_command`:
    Dagster passes one that streams the ranks' logs through Pipes), then reads what rank 0 wrote."""
    job = LaunchJob(
        warehouse=str(store.warehouse_path),
        artifacts=str(store.artifacts),
        base_model=base_model,
        manifest_hash=manifest_hash,
        train=cfg,
        signal_injection=injection,
    )
    job_file = store.artifacts / "launch" / f"{content_id('launch', job.model_dump())}.json"
    job_file.parent.mkdir(parents=True, exist_ok=True)
    job_file.write_text(job.model_dump_json())
    env = {"OMP_NUM_THREADS": "1"} if cfg.device != "cuda" and not torch.cuda.is_available() else {}
    (run_command or _run_subprocess)(torchrun_command(job_file, cfg.nproc), env)
    key = student_key(cfg, base_model, manifest_hash, injection)
    student = store.artifacts / "students" / key
    record = json.loads((student / "training.json").read_text())
    shards = training_data.shards_of_manifest(store.warehouse, manifest_hash)
    return TrainedStudent(
        str(student),
        cfg.kind,
        manifest_hash,
        [s["shard_id"] for s in shards],
        TrainResult(**record["result"]),
        cfg.model_dump(),
        record["world_size"],
    )


def train_model(
    store: Store,
    shards: ShardsHandle,
    cfg: TrainConfig,
    kind: str,
    run_id: str | None = None,
    *,
    on_log: Callable[[int, dict], None] | None = None,
    run_command: RunCommand | None = None,
    tags: dict[str, str] | None = None,
    serving_decode: dict | None = None,
    progress: bool = True,
) -> ModelHandle:
    """The whole training stage for one arm: an MLflow run opened before training (metrics logged as the steps
    happen), the fit (in process or under torchrun), the student registered as a new version with alias
    `challenger` (an MLflow pyfunc model that `mlflow models serve` serves, with `serving_decode` as its decoding
    settings), and its lineage (version -> shards) in the warehouse."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    cfg = cfg.model_copy(update={"kind": kind}).for_rows(shards.stats[kind]["rows"]).resolved(shards.pretrained)
    manifest = shards.manifests[kind]
    shard_rows = check_shards_fit(store.warehouse, manifest, shards.base_model)
    reg = store.registry
    run = open_training_run(store, shards, cfg, run_id, tags)

    def log(step: int, metrics: dict) -> None:
        registry.log_metrics(reg, run.run_id, step, metrics)
        if on_log is not None:
            on_log(step, metrics)

    try:
        if cfg.launcher == "torchrun":
            trained = fit_under_torchrun(store, shards.base_model, manifest, cfg, run_command, shards.signal_injection)
            for step, loss in enumerate(trained.result.losses, start=1):  # the ranks do not write MLflow
                registry.log_metrics(reg, run.run_id, step, {"loss": loss})
        else:
            trained = fit_student(
                store.warehouse,
                store.artifacts,
                shards.base_model,
                manifest,
                cfg,
                log,
                progress,
                shards.signal_injection,
            )
        result = trained.result
        if not result.losses or not all(math.isfinite(x) for x in result.losses):
            raise LossNotFinite(f"training {kind} produced no finite loss")
        description = (
            f"{kind} student trained {cfg.max_steps} steps on {shards.traces} traces (manifest {manifest}); "
            f"loss {result.losses[0]:.3f} -> {result.final_loss:.3f}"
        )
        version, plot = register_student(store, run, trained.path, result, description, serving_decode, run_id)
    except BaseException:
        registry.finish_run(reg, run.run_id, failed=True)
        raise
    registry.finish_run(reg, run.run_id)
    record_lineage(store.warehouse, run, version, cfg, result.final_loss, [s["shard_id"] for s in shard_rows], run_id)
    return _handle(reg, run, version, plot, trained, shards, cfg)


def _handle(
    reg: registry.RegistryConfig,
    run: TrainingRun,
    version: str,
    plot: Path,
    trained: TrainedStudent,
    shards: ShardsHandle,
    cfg: TrainConfig,
) -> ModelHandle:
    """What the training stage hands on: the registered version, what it was trained on and how it went."""
    result = trained.result
    return ModelHandle(
        mlflow_experiment_id=registry.experiment_id(reg),
        loss_plot=str(plot),
        model_name=run.model_name,
        version=version,
        kind=cfg.kind,
        mlflow_run_id=run.run_id,
        model_uri=f"models:/{run.model_name}/{version}",
        path=trained.path,
        manifest_hash=shards.manifests[cfg.kind],
        base_model=shards.base_model,
        tokenizer_hash=shards.tokenizer_hash,
        train_config=cfg.model_dump(),
        device=str(pick_device(cfg.device)),
        world_size=trained.world_size,
        steps=cfg.max_steps,
        resumed_from=result.resumed_from,
        first_loss=result.losses[0],
        final_loss=result.final_loss,
        losses=result.losses,
        token_losses=result.token_losses,
        signal_losses=result.signal_losses,
        tokens_per_s=result.tokens_per_s,
        train_tokens=result.train_tokens,
        traces=shards.traces,
    )
