"""The pipeline's stages, declared once. Each `Stage` names its function, the configuration sections it takes, what
it takes from the stages before it and hands on, its quality checks and whether each blocks, and the `scaffold`
command that runs it. Everything that runs stages is derived from this table:

- `pipelines/defs/stage_assets.py` makes a Dagster asset of each stage (its run config built from the sections) and
  an asset check of each of its checks;
- `scaffold_lib.runner` runs them in order in one process (`scaffold run`, the stage commands), with the same checks;
- `scaffold_lib.cli` makes a subcommand of each command, with the stage's settings as flags.

Adding a stage or a check is one entry here (tests/test_stage_table.py holds the three entry points to it).

The table imports nothing heavy: each stage's code is imported when the stage runs (its adapter in
`scaffold_lib.stage_calls`), so `scaffold --help` and `scaffold config` do not wait for torch, DuckDB or MLflow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from pydantic import BaseModel

from scaffold_lib import checks
from scaffold_lib import stage_calls as calls
from scaffold_lib.checks import Check, Finding
from scaffold_lib.evaluation.handles import EvaluationHandle
from scaffold_lib.stage_calls import StageCall
from scaffold_lib.store.store import Store
from scaffold_lib.student.handles import ModelHandle, ShardsHandle


@dataclass(frozen=True)
class Gate:
    """A quality check of one stage's output; a blocking one that fails stops what depends on it and promotion."""

    name: str
    measure: Callable[[Store, Any], Finding]
    blocking: bool
    description: str

    def evaluate(self, store: Store, output: Any, stage: str) -> Check:
        found = self.measure(store, output)
        return Check(
            self.name, stage, found.passed, self.blocking, found.description or self.description, found.metadata
        )


@dataclass(frozen=True)
class Stage:
    name: str  # the Dagster asset key, the handle folder
    run: Callable[[StageCall], Any]
    sections: tuple[str, ...]  # the PipelineConfig sections it takes: its Dagster run config
    group: str  # data / student / experiment (a Dagster group; `data` is the data refresh)
    command: str  # the `scaffold` subcommand that runs it
    description: str
    inputs: tuple[str, ...] = ()  # stages whose handles it takes
    after: tuple[str, ...] = ()  # stages it follows without taking their output
    handle: type[BaseModel] | None = None  # what it hands on (saved per run); None: it writes tables only
    gates: tuple[Gate, ...] = ()
    flags: tuple[str, ...] = ()  # settings its command takes as flags (named by the field, or its `flag`)
    kinds: tuple[str, ...] = ("python", "duckdb")  # what it works with (Dagster's kind tags)
    pool: str | None = "warehouse"  # one at a time: "warehouse" (DuckDB's single writer), "accelerator" (training)
    retries: int = 0  # a stage that talks to remote services may be retried: its writes are idempotent
    in_pipeline: bool = True  # part of `scaffold run` and Dagster's full_pipeline job

    @property
    def upstream(self) -> tuple[str, ...]:
        return (*self.inputs, *self.after)


# --- the table --------------------------------------------------------------------------------------------------------

TRAIN_FLAGS = (
    "train.max_steps",
    "train.beta",
    "train.learning_rate",
    "train.batch_size",
    "train.grad_accum",
    "train.seed",
    "train.checkpoint_every",
    "train.device",
    "train.launcher",
    "train.nproc",
    "train.lora_r",
    "train.gradient_checkpointing",
)


def _training_stage(name: str, kind: str, description: str) -> Stage:
    """The student's and the baseline's training: the same stage but for the arm (`kind`)."""
    loss_check = f"{name.removesuffix('_model')}_loss_finite_and_falling"
    return Stage(
        name,
        calls.train(kind),
        sections=("train",),
        group="student",
        command="train",
        inputs=("packed_shards",),
        handle=ModelHandle,
        description=description,
        kinds=("pytorch", "mlflow"),
        pool="accelerator",
        gates=(Gate(loss_check, checks.loss_finite_and_falling, True, "training loss is finite and fell"),),
        flags=TRAIN_FLAGS,
    )


# the data refresh: the stages of the `data` group and command
_data_stage = partial(Stage, group="data", command="data")

STAGES: tuple[Stage, ...] = (
    _data_stage(
        "problems",
        calls.collect,
        sections=("problems", "teacher"),
        description="Questions with gold answers: the configured source (synthetic generator, reasoning-gym, or "
        "problem files) plus any problem file dropped into the watched folder, plus an imported trace file's own "
        "problems; keyed by content, split train/validation/test by group.",
        gates=(
            Gate(
                "problems_without_quarantine",
                checks.problems_without_quarantine,
                blocking=False,
                description="problem files had no malformed rows (quarantined rows are counted)",
            ),
            Gate(
                "splits_disjoint_by_group",
                checks.splits_disjoint_by_group,
                blocking=True,
                description="no group (arithmetic skeleton, template) has problems in two splits: no test item is a "
                "reworded training item",
            ),
        ),
        flags=("problems.source", "problems.synthetic.n_problems", "problems.synthetic.seed", "problems.lenient"),
    ),
    _data_stage(
        "decontamination",
        calls.decontaminate,
        sections=("decontamination",),
        after=("problems",),
        description="Training problems sharing a word n-gram with a benchmark question (every suite whose file is "
        "present), recorded and, by default, left out of training; suites without a file are listed as not checked.",
    ),
    _data_stage(
        "teacher_traces",
        calls.trace,
        sections=("teacher",),
        after=("problems",),
        description="One teacher answer per problem, verified against the gold answer by the pipeline's scorer. Only "
        "problems without a trace from this teacher are sent (trace ids are content hashes), so a refresh does only "
        "the new work; a run in which the teacher answered nothing fails with the reason.",
        retries=3,
        gates=(
            Gate(
                "teacher_accuracy_above_floor",
                checks.teacher_accuracy_above_floor,
                blocking=True,
                description=f"teacher accuracy is above the floor ({checks.TEACHER_ACCURACY_FLOOR})",
            ),
        ),
        flags=(
            "teacher.backend",
            "teacher.endpoint.api_key_env",
            "teacher.endpoint.concurrency",
            "teacher.prompt.samples",
            "teacher.endpoint.max_tokens",
            "teacher.endpoint.temperature",
            "teacher.journal_dir",
            "teacher.import_format",
        ),
    ),
    _data_stage(
        "segmented_steps",
        calls.segment,
        sections=("segmentation",),
        after=("teacher_traces",),
        description="Each trace cut into steps by its teacher's segmenter (blank lines for R1-style traces, lines for "
        "GSM8K-style solutions; recorded on each step); a trace with no step is quarantined and counted.",
        gates=(Gate("no_empty_steps", checks.no_empty_steps, True, "no step is empty or whitespace"),),
        flags=("segmentation.segmenter",),
    ),
    _data_stage(
        "signal_labels",
        calls.label,
        sections=("labeller",),
        after=("segmented_steps",),
        description="One of the seven signals per step: keyword labeller (opening words), final step = answer, and a "
        "counted deterministic fallback for steps with no keyword; then, when configured, an LLM confirms or corrects "
        "each keyword label and labels the fallback steps (verdicts cached by step content).",
        gates=(
            Gate(
                "one_row_per_step",
                checks.one_row_per_step,
                blocking=True,
                description="every step id once in segmented_steps, at most one label per step, no label without its "
                "step",
            ),
            Gate(
                "label_coverage_in_bounds",
                checks.label_coverage_in_bounds,
                blocking=True,
                description=f"keyword+pattern coverage >= {checks.MIN_KEYWORD_COVERAGE:.0%} and fallback share <= "
                f"{checks.MAX_FALLBACK_SHARE:.0%} (paper: 74 % keyword coverage)",
            ),
        ),
        flags=("labeller.keywords_path",),
    ),
    Stage(
        "packed_shards",
        calls.pack,
        sections=("shards", "student"),
        group="student",
        command="pack",
        after=("signal_labels", "decontamination"),
        handle=ShardsHandle,
        description="Correct training traces in the scaffold format (and plain CoT for the baseline), best-fit-"
        "decreasing packed into fixed-length rows with per-example position ids, written as Parquet shards with a "
        "manifest per arm. The backbone's tokenizer gets the signal tags here, so training and decoding use the same "
        "ids.",
        kinds=("python", "parquet", "duckdb"),
        gates=(
            Gate(
                "shard_fill_on_target",
                checks.shard_fill_on_target,
                blocking=True,
                description="every packed set fills its rows to the target",
            ),
        ),
        flags=("student.base_model", "shards.pack.row_len", "shards.include_incorrect"),
    ),
    _training_stage(
        "student_model",
        "scaffold",
        "The scaffold student trained with the multi-task loss on this run's shards, tracked live in MLflow and "
        "registered as a new version with alias `challenger`. Device chosen at run time (CUDA + bf16 when present).",
    ),
    _training_stage(
        "baseline_model",
        "baseline",
        "The CoT-SFT baseline: same backbone, traces and budget as the student, plain text without signals.",
    ),
    Stage(
        "benchmark_scores",
        calls.evaluate,
        sections=("eval",),
        group="student",
        command="eval",
        inputs=("student_model", "baseline_model", "packed_shards"),
        handle=EvaluationHandle,
        description="Pass@1 on every configured suite for this run's challenger (predicted / golden / random "
        "signals, summaries-only), its CoT-SFT baseline and the untuned backbone, with next-signal accuracy, signal "
        "fidelity and answer consistency: the paper's comparison table. Every variant answers the same items; rows "
        "carry the eval-config hash, the model version and the evaluation they belong to.",
        kinds=("pytorch", "duckdb"),
        gates=(
            Gate(
                "scaffold_beats_baseline",
                checks.scaffold_beats_baseline,
                blocking=False,
                description="the scaffold student (predicted signals) beats the CoT-SFT baseline; otherwise says by "
                "how much it does not",
            ),
        ),
        flags=(
            "eval.suites",
            "eval.split",
            "eval.decode.tau",
            "eval.limit",
            "eval.variants",
            "eval.include_base",
            "eval.lenient",
        ),
    ),
    Stage(
        "model_promotion",
        calls.promote,
        sections=("promotion",),
        group="student",
        command="promote",
        inputs=("benchmark_scores",),
        description="Moves the `champion` alias to this run's challenger when every gate passed and its score on the "
        "promotion suite beats the current champion's by the configured margin (same eval config); otherwise records "
        "why on the version.",
        kinds=("mlflow",),
        pool=None,
    ),
    Stage(
        "experiment_report",
        calls.experiment,
        sections=("shards", "student", "train", "eval", "experiment"),
        group="experiment",
        command="experiment",
        after=("signal_labels", "decontamination"),
        description="Does scaffolding beat CoT distillation? Both arms over the configured seeds, settings chosen on "
        "validation, every variant scored once on test and the OOD suites, compared with the item as the unit "
        "(bootstrap over items, sign-flip test; McNemar per seed), the bed's diagnostics, sample efficiency and an "
        "error analysis; the report and the τ plot go to MLflow and the artifacts folder.",
        kinds=("pytorch", "duckdb", "mlflow"),
        pool="accelerator",
        flags=(
            "experiment.seeds",
            "experiment.taus",
            "experiment.betas",
            "experiment.validation_limit",
            "experiment.test_limit",
        ),
        in_pipeline=False,  # it trains six models or more: a job of its own
    ),
)

BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
PIPELINE: tuple[Stage, ...] = tuple(s for s in STAGES if s.in_pipeline)
PROMOTED = "student_model"  # promotion is about the scaffold student: the blocking checks it was made under


def stage(name: str) -> Stage:
    return BY_NAME[name]


def of_command(command: str) -> tuple[Stage, ...]:
    return tuple(s for s in STAGES if s.command == command)


def commands() -> tuple[str, ...]:
    """The stage commands, in the order of their first stage."""
    return tuple(dict.fromkeys(s.command for s in STAGES))


def upstream_of(name: str) -> list[Stage]:
    """`name` and every stage it depends on, in table order."""
    wanted, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current not in wanted:
            wanted.add(current)
            todo += BY_NAME[current].upstream
    return [s for s in STAGES if s.name in wanted]


def promotion_gates() -> list[tuple[str, str]]:
    """(stage, check) of every blocking check upstream of the promoted student, itself included: promotion requires
    all of them passing, in this run or (under Dagster) at their latest evaluation."""
    return [(s.name, g.name) for s in upstream_of(PROMOTED) for g in s.gates if g.blocking]
