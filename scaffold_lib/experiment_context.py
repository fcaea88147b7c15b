"""What every part of one experiment (`scaffold_lib.experiment`) shares: the store, the configuration and the MLflow
parent run, and the three things each part does: train an arm, evaluate, record a score row."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from scaffold_lib.config import PipelineConfig
from scaffold_lib.evaluation.config import EvalConfig
from scaffold_lib.evaluation.evaluate import evaluate_models
from scaffold_lib.evaluation.handles import EvaluationHandle
from scaffold_lib.evaluation.metrics import serving_decode
from scaffold_lib.evaluation.suites import HELDOUT
from scaffold_lib.store.store import Store
from scaffold_lib.student.handles import ModelHandle, ShardsHandle
from scaffold_lib.student.train import train_model

Log = Callable[[str], None]


@dataclass
class Context:
    """What every part of one experiment shares."""

    store: Store
    cfg: PipelineConfig
    run_id: str
    experiment_id: str
    tags: dict[str, str]
    log: Log
    progress: bool
    rows: list[dict] = field(default_factory=list)  # experiment_scores rows

    def record(self, seed: int, evaluation: EvaluationHandle, tau: float, purpose: str) -> None:
        self.rows += [
            {
                "experiment_id": self.experiment_id,
                "seed": seed,
                "tau": tau,
                "purpose": purpose,
                "evaluation_id": evaluation.evaluation_id,
                **{k: r[k] for k in ("model_name", "version", "variant", "split", "n", "accuracy", "mean_steps")},
            }
            for r in evaluation.rows
        ]

    def train(self, shards: ShardsHandle, kind: str, seed: int, beta: float, fraction: float = 1.0) -> ModelHandle:
        train = self.cfg.train.model_copy(update={"seed": seed, "beta": beta, "data_fraction": fraction})
        serving = serving_decode(self.cfg.eval, shards.budget)
        tags = {**self.tags, "seed": str(seed), "data_fraction": str(fraction)}
        return train_model(
            self.store, shards, train, kind, self.run_id, tags=tags, serving_decode=serving, progress=self.progress
        )

    def evaluate(
        self, student: ModelHandle, baseline: ModelHandle | None, shards: ShardsHandle, **update
    ) -> EvaluationHandle:
        cfg: EvalConfig = self.cfg.eval.model_copy(update=update)
        return evaluate_models(self.store, student, baseline, shards, cfg, self.run_id)

    def predicted(
        self,
        student: ModelHandle,
        baseline: ModelHandle | None,
        shards: ShardsHandle,
        split: str,
        limit: int | None,
        tau: float,
        variants: Sequence[str] = ("predicted",),
        **update,
    ) -> EvaluationHandle:
        """The student with its predicted signals at `tau` (and the baseline, when given) on the held-out suite's
        `split`: tuning and the sample-efficiency points need no other variant (a study may add some)."""
        decode = self.cfg.eval.decode.model_copy(update={"tau": tau})
        return self.evaluate(
            student,
            baseline,
            shards,
            suites=[HELDOUT],
            split=split,
            limit=limit,
            variants=list(variants),
            include_base=False,
            decode=decode,
            **update,
        )

    def validate(self, student: ModelHandle, shards: ShardsHandle, tau: float) -> float:
        limit = self.cfg.experiment.validation_limit
        evaluation = self.predicted(student, None, shards, "validation", limit, tau, export_samples=False)
        self.record(int(student.train_config["seed"]), evaluation, tau, "validation")
        return next(r["accuracy"] for r in evaluation.rows if r["variant"] == "predicted")
