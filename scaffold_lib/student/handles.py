"""What the student stages hand on: the packed shards (`ShardsHandle`), a trained and registered student
(`ModelHandle`), and the job file a distributed launch trains from (`LaunchJob`). Small pydantic documents (ids, paths,
hashes, figures), saved per run as JSON (`store.handles`); models are never handed on, they live in MLflow."""

from __future__ import annotations

from pydantic import BaseModel, Field

from scaffold_lib.student.config import SignalInjection, TrainConfig

KINDS = ("scaffold", "baseline")  # the two arms: the scaffold student and the CoT-SFT baseline
BASELINE_SUFFIX = "-baseline"  # the CoT-SFT baseline is registered as <model name>-baseline


class ShardsHandle(BaseModel):
    """What the shards stage produced: the prepared backbone, its tokenizer, one manifest per arm, and the token
    budget of a step / an answer / a whole trace in the training data (decoding caps come from it)."""

    base_model: str  # local directory of the prepared backbone (tokenizer with the signal tags)
    source_model: str  # what the config named: "embedded", a hub id or a path
    pretrained: bool
    tokenizer_hash: str
    text_format: dict
    manifests: dict[str, str]
    storage: str
    traces: int
    skipped_incomplete: int
    stats: dict[str, dict]
    budget: dict[str, int]
    fill_target: float = 0.0
    excluded_contaminated: int = 0  # training problems left out because they overlap a benchmark
    shard_ids: dict[str, list[str]] = Field(default_factory=dict)
    # how the scaffold student built on these shards adds its signal embedding (student.signal_injection); not part
    # of the shards' identity: every injection trains on the same shards
    signal_injection: SignalInjection = "output"

    def summary(self) -> str:
        return f"packed_shards: {self.traces} traces, manifests {self.manifests}"


class ModelHandle(BaseModel):
    """A trained, registered student: where it is in MLflow and on disk, what it was trained on, how it went."""

    model_name: str
    version: str
    kind: str
    mlflow_run_id: str
    mlflow_experiment_id: str = ""
    model_uri: str
    path: str
    manifest_hash: str
    base_model: str
    tokenizer_hash: str
    train_config: dict
    device: str
    world_size: int = 1
    steps: int
    resumed_from: int = 0
    first_loss: float
    final_loss: float  # mean of the last 10 steps (TrainResult.final_loss)
    losses: list[float]
    token_losses: list[float] = Field(default_factory=list)
    signal_losses: list[float] = Field(default_factory=list)
    tokens_per_s: float
    train_tokens: int
    traces: int
    loss_plot: str = ""  # PNG of the loss curves (also logged to the MLflow run)

    def summary(self) -> str:
        return f"{self.kind}: {self.model_uri}, loss {self.first_loss:.3f} -> {self.final_loss:.3f}"


class LaunchJob(BaseModel):
    """What every rank of a torchrun / accelerate launch trains from (`scaffold_lib.student.launch`)."""

    warehouse: str
    artifacts: str
    base_model: str
    manifest_hash: str
    train: TrainConfig
    signal_injection: SignalInjection = "output"
