"""A training run in MLflow and the student it registers: the run opened before training (params in batches, never
secrets; the shards as its input dataset; metrics as the steps happen), the loss plot, the student logged as an
MLflow pyfunc model and registered as a new version with alias `challenger`, and its lineage (version -> shards) in
the warehouse.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from scaffold_lib.core.plots import png
from scaffold_lib.store import registry
from scaffold_lib.store.store import Store
from scaffold_lib.store.warehouse import Warehouse
from scaffold_lib.student.config import TrainConfig
from scaffold_lib.student.handles import BASELINE_SUFFIX, ShardsHandle
from scaffold_lib.student.training import TrainResult

# a registered student is served by this "model from code" file (named, not imported: serving sits above this layer)
SERVING_MODEL_CODE = Path(__file__).resolve().parent.parent / "serving" / "pyfunc_model.py"
SERVING_DECODE = "decode.json"  # decoding settings a served student uses (read by scaffold_lib.serving.student)


@dataclass(frozen=True)
class TrainingRun:
    """An MLflow run of one arm's training, and the registered model it will become a version of."""

    run_id: str
    model_name: str
    kind: str
    manifest_hash: str
    tags: dict[str, str]


def open_training_run(
    store: Store, shards: ShardsHandle, cfg: TrainConfig, run_id: str | None, tags: dict[str, str] | None
) -> TrainingRun:
    """The MLflow run of training `cfg.kind` on its manifest of `shards`, opened before the work starts (so its
    duration is the real one and metrics appear live)."""
    kind, reg = cfg.kind, store.registry
    manifest = shards.manifests[kind]
    name = reg.model_name if kind == "scaffold" else reg.model_name + BASELINE_SUFFIX
    tags = {"manifest_hash": manifest, "kind": kind, **(tags or {})}
    mlflow_run = registry.start_run(
        reg,
        f"{kind}-{manifest[:8]}",
        tags=tags,
        params={
            "train": cfg.model_dump(),
            "base_model": shards.source_model,
            **({"signal_injection": shards.signal_injection} if kind == "scaffold" else {}),
            "manifest_hash": manifest,
            "tokenizer_hash": shards.tokenizer_hash,
            **({"dagster_run_id": run_id} if run_id else {}),
        },
        dataset={
            "name": f"{kind}-shards",
            "digest": manifest,
            "source": f"{shards.storage}/{kind}",
            "rows": shards.stats[kind]["rows"],
            "tokens": shards.stats[kind]["tokens"],
            "traces": shards.traces,
        },
    )
    return TrainingRun(mlflow_run, name, kind, manifest, tags)


def register_student(
    store: Store,
    run: TrainingRun,
    student_dir: str,
    result: TrainResult,
    description: str,
    serving_decode: dict | None,
    run_id: str | None,
) -> tuple[str, Path]:
    """(version, loss plot) of the trained student registered from its run: its serving decode settings written
    beside it, the loss plot logged to the run, the model logged as a pyfunc and registered with alias `challenger`."""
    reg = store.registry
    if serving_decode is not None:
        (Path(student_dir) / SERVING_DECODE).write_text(json.dumps(serving_decode, indent=2))
    plot = loss_plot(result, run.kind, store.artifacts / "plots" / f"{run.run_id}.png")
    registry.client(reg).log_artifact(run.run_id, str(plot))
    version = registry.register_model(
        reg,
        run.run_id,
        student_dir,
        name=run.model_name,
        tags={**run.tags, **({"dagster_run_id": run_id} if run_id else {})},
        description=description,
        model_code=SERVING_MODEL_CODE,
    )
    return version, plot


def record_lineage(
    wh: Warehouse,
    run: TrainingRun,
    version: str,
    cfg: TrainConfig,
    final_loss: float,
    shard_ids: list[str],
    run_id: str | None,
) -> None:
    """The version and the shards it was trained on, in the warehouse: "which traces trained it" is then one join."""
    wh.insert_new(
        "model_versions",
        [
            {
                "model_name": run.model_name,
                "version": version,
                "kind": run.kind,
                "mlflow_run_id": run.run_id,
                "manifest_hash": run.manifest_hash,
                "config_json": json.dumps(cfg.model_dump()),
                "final_loss": final_loss,
            }
        ],
        run_id,
    )
    wh.insert_new(
        "model_shards",
        [{"model_name": run.model_name, "version": version, "shard_id": s} for s in shard_ids],
        run_id,
    )


def loss_plot(result: TrainResult, kind: str, path: Path) -> Path:
    """The loss curves of a training run as a small PNG (total, token and, for the scaffold student, signal loss)."""
    steps = range(1, len(result.losses) + 1)
    with png(
        path, (5, 3), 110, title=f"{kind} training", xlabel="step", ylabel="loss (nats)", legend="upper right"
    ) as ax:
        ax.plot(steps, result.losses, label="loss")
        if kind == "scaffold" and result.signal_losses and any(result.signal_losses):
            ax.plot(steps, result.token_losses, label="token loss", alpha=0.7)
            ax.plot(steps, result.signal_losses, label="signal loss", alpha=0.7)
    return path
