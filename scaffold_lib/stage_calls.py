"""How each stage of the table (`scaffold_lib.stages`) calls its library function: what one run of a stage gets
(`StageCall`), and one adapter a stage taking from it what its function wants. Each function's module is imported
when the stage runs, so the table stays light (`scaffold --help` does not wait for torch, DuckDB or MLflow)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from scaffold_lib.config import PipelineConfig
from scaffold_lib.store.store import Store
from scaffold_lib.student.handles import ModelHandle

RunCommand = Callable[[list[str], dict[str, str]], None]  # runs a launcher command (torchrun) with extra environment


@dataclass
class StageCall:
    """What one run of a stage gets: the store, the whole configuration, the run's id, the handles of the stages it
    takes, and the hooks of whoever runs it (Dagster, the runner, a command)."""

    store: Store
    config: PipelineConfig
    run_id: str
    inputs: dict[str, Any] = field(default_factory=dict)  # stage name -> its handle
    progress: bool = True  # progress bars on the terminal
    log: Callable[[str], None] | None = None  # progress lines of a long stage (training steps, the experiment)
    run_command: RunCommand | None = None  # how a torchrun launch is started (Dagster: through Pipes)
    tags: dict[str, str] | None = None  # MLflow tags of a training run
    partition: tuple[int, int] | None = None  # (index, count) of a partitioned teacher backfill
    failed_gates: Sequence[str] = ()  # blocking checks that failed upstream: promotion refuses
    who: str = "scaffold"  # recorded on a promotion
    preset: str = ""  # the preset's name, for the experiment report


def collect(call: StageCall):
    from scaffold_lib.data.collect import build_problems

    # the teacher section too: an imported trace file brings its own problems and gold answers
    return build_problems(call.store, call.config.problems, call.run_id, call.config.teacher)


def decontaminate(call: StageCall):
    from scaffold_lib.evaluation.decontaminate import decontaminate

    return decontaminate(call.store, call.config.decontamination, call.run_id)


def trace(call: StageCall):
    from scaffold_lib.data.trace import write_traces

    return write_traces(call.store, call.config.teacher, call.run_id, call.partition)


def segment(call: StageCall):
    from scaffold_lib.data.segment import segment_traces

    return segment_traces(call.store, call.config.segmentation, call.run_id)


def label(call: StageCall):
    from scaffold_lib.data.label import label_signals

    return label_signals(call.store, call.config.labeller, call.run_id)


def pack(call: StageCall):
    from scaffold_lib.student.pack import pack_shards

    return pack_shards(call.store, call.config.shards, call.config.student, call.run_id)


def train(kind: str) -> Callable[[StageCall], ModelHandle]:
    def run(call: StageCall) -> ModelHandle:
        from scaffold_lib.evaluation.metrics import serving_decode
        from scaffold_lib.student.train import train_model

        shards, cfg = call.inputs["packed_shards"], call.config.train
        log = call.log

        def on_log(step: int, metrics: dict) -> None:
            log(
                f"{kind} step {step}/{cfg.max_steps}: loss {metrics['loss']:.4f}, {metrics['tokens_per_s']:,.0f} tokens/s"
            )

        return train_model(
            call.store,
            shards,
            cfg,
            kind,
            call.run_id,
            on_log=on_log if log is not None else None,
            run_command=call.run_command,
            tags=call.tags,
            serving_decode=serving_decode(call.config.eval, shards.budget),  # what a served student decodes with
            progress=call.progress,
        )

    return run


def evaluate(call: StageCall):
    from scaffold_lib.evaluation.evaluate import evaluate_models

    student, baseline, shards = (call.inputs.get(n) for n in ("student_model", "baseline_model", "packed_shards"))
    return evaluate_models(call.store, student, baseline, shards, call.config.eval, call.run_id, progress=call.progress)


def promote(call: StageCall):
    from scaffold_lib.evaluation.promote import promote_challenger

    evaluation = call.inputs["benchmark_scores"]
    return promote_challenger(call.store, evaluation, call.config.promotion, call.failed_gates, who=call.who)


def experiment(call: StageCall):
    from scaffold_lib.experiment import run_experiment

    return run_experiment(call.store, call.config, call.run_id, preset=call.preset, log=call.log or print)
