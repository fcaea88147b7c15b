"""Teachers write reasoning traces. The embedded default is a programmatic teacher that solves the synthetic
problems and writes R1-style traces: short paragraphs separated by blank lines, opening with transition words
of the seven signal kinds, with elaborations, occasional mistakes corrected by a "Wait, …" step, a
conclusion and a final answer step. Endpoint / local-HF teachers and trace import plug into `Teacher`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from pydantic import BaseModel, Field

from scaffold_lib.core.answers import committed_answer, is_correct
from scaffold_lib.core.ids import content_id
from scaffold_lib.data.problems import FlatRow, Gold, Problem, Quarantined
from scaffold_lib.data.synthetic import parse_question
from scaffold_lib.data.worked_traces import flow_trace_text, v1_trace_text

DEFAULT_PROMPT = (
    "Solve the problem. Think step by step in short paragraphs separated by blank lines, "
    "then give the final answer as 'The answer is N.'\n\nProblem: {question}"
)


@dataclass(frozen=True)
class Trace(FlatRow):
    trace_id: str
    problem_id: str
    teacher: str
    text: str
    final_answer: str | None
    is_correct: bool
    prompt_tokens: int
    completion_tokens: int
    sample: int = 0
    answer_text: str | None = None  # a reasoning model's final content; `text` is then its thinking
    latency_s: float | None = None
    attempts: int | None = None
    endpoint: str | None = None
    finish_reason: str | None = None
    recorded_correct: bool | None = None  # an imported dataset's own verdict, kept beside ours (`is_correct`)


@dataclass(frozen=True)
class TeacherFailure(FlatRow):
    """A problem the teacher could not answer; recorded (and retried on the next run), never dropped."""

    trace_id: str
    problem_id: str
    teacher: str
    error: str


@dataclass
class TeacherResult:
    traces: list[Trace] = field(default_factory=list)
    failures: list[TeacherFailure] = field(default_factory=list)
    not_covered: int = 0  # problems this teacher has no answer for by design (e.g. absent from an imported file)
    quarantined: list[Quarantined] = field(default_factory=list)  # unusable input rows (an imported trace file)
    stats: dict = field(default_factory=dict)  # usage, latency, errors: shown in the asset metadata


class Teacher(Protocol):
    """Anything that writes traces. `trace_id_for` must be computable before generating, so a stage can skip
    the problems whose traces already exist (a refresh only does the new work)."""

    identity: str
    samples: int  # traces per problem

    def trace_id_for(self, problem: Problem, sample: int = 0) -> str: ...

    def generate(self, problems: Sequence[Problem]) -> TeacherResult: ...


def make_trace_id(problem_id: str, teacher_identity: str, prompt: str, sampling: dict) -> str:
    return content_id("trace", problem_id, teacher_identity, prompt, sampling)


def verify(text: str, problem: Problem | Gold, answer_text: str | None = None) -> tuple[str | None, bool]:
    """The answer the trace commits to (the scorer's rule) and whether it equals the gold answer."""
    answer = committed_answer(text, problem.answer_type, answer_text)
    return answer, is_correct(answer, problem.answer, problem.answer_type)


def trace_from_record(record: dict, problem: Problem | Gold, teacher: str) -> Trace:
    thinking, answer = record["thinking"], record["answer"]
    text, answer_text = (thinking, answer or None) if thinking else (answer, None)
    final_answer, correct = verify(text, problem, answer_text)
    return Trace(
        record["trace_id"],
        problem.problem_id,
        teacher,
        text,
        final_answer,
        correct,
        record["prompt_tokens"],
        record["completion_tokens"],
        record["sample"],
        answer_text,
        record.get("latency_s"),
        record.get("attempts"),
        record.get("endpoint"),
        record.get("finish_reason"),
        record.get("recorded_correct"),
    )


# GSM8K's calculator annotations (`<<48/2=24>>`) are its annotators' tool calls, not reasoning
_CALCULATOR = re.compile(r"<<[^<>\n]*>>")


class ReferenceTeacher:
    """The worked solutions that ship with the problems (a GSM8K file's answer field, reasoning-gym's `answer_cot`)
    taken as teacher traces. A problem without one is not covered (counted, never failed)."""

    identity = "reference"
    samples = 1

    def trace_id_for(self, problem: Problem, sample: int = 0) -> str:
        return make_trace_id(problem.problem_id, self.identity, "", {"sample": sample})

    def generate(self, problems: Sequence[Problem]) -> TeacherResult:
        result = TeacherResult()
        for problem in problems:
            if not problem.solution:
                result.not_covered += 1
                continue
            text = _CALCULATOR.sub("", problem.solution).strip()
            answer, correct = verify(text, problem)
            result.traces.append(
                Trace(
                    self.trace_id_for(problem),
                    problem.problem_id,
                    self.identity,
                    text,
                    answer,
                    correct,
                    len(problem.question.split()),
                    len(text.split()),
                )
            )
        return result


class ProgrammaticTeacherConfig(BaseModel):
    """The built-in teacher. `flow` (default): the next step depends on the state of the solution (checks after
    products and quotients, a "Wait" right after each slip, running summaries in long problems). `v1`: the first
    teacher, whose flow was partly random (kept to compare the two)."""

    style: Literal["flow", "v1"] = "flow"
    seed: int = 0
    wrong_fraction: float = Field(0.1, ge=0, le=1, description="share of traces made wrong on purpose")
    slip_prob: float = Field(0.15, ge=0, le=1, description="flow: chance an operation is miscomputed, then caught")
    verify_prob: float = Field(1.0, ge=0, le=1, description="flow: chance a product or quotient is checked")
    summary_every: int = Field(
        2, ge=0, description="flow: a running summary after every N operations of a long problem (0: none)"
    )
    illustrate_products: bool = Field(
        False, description='flow: a product is checked with an example ("For example, 3 piles of 4 …") instead'
    )
    signal_noise: float = Field(0.0, ge=0, le=1, description="chance an operation step uses the other opening kind")
    mistake_prob: float = Field(0.2, ge=0, le=1, description="v1: chance of a corrected mistake at a random step")
    elaboration_prob: float = Field(0.5, ge=0, le=1, description="v1: chance of an example or remark step")
    bare_step_prob: float = Field(0.12, ge=0, le=1, description="v1: steps with no opening keyword (fallback)")


class ProgrammaticTeacher:
    """Solves the embedded synthetic problems and writes a trace for each; problems it cannot parse fail."""

    def __init__(self, config: ProgrammaticTeacherConfig = ProgrammaticTeacherConfig()) -> None:
        self.config = config
        self.identity = f"programmatic-{config.style}"
        self.samples = 1

    def _sampling(self) -> dict:
        return self.config.model_dump()

    def trace_id_for(self, problem: Problem, sample: int = 0) -> str:
        return make_trace_id(problem.problem_id, self.identity, DEFAULT_PROMPT, {**self._sampling(), "sample": sample})

    def generate(self, problems: Sequence[Problem]) -> TeacherResult:
        result = TeacherResult()
        for problem in problems:
            trace_id = self.trace_id_for(problem)
            parsed = parse_question(problem.question)
            if parsed is None:
                result.failures.append(
                    TeacherFailure(
                        trace_id,
                        problem.problem_id,
                        self.identity,
                        "the programmatic teacher only solves the built-in synthetic problems; "
                        "configure an endpoint teacher for this source",
                    )
                )
                continue
            rng = random.Random(f"{self.config.seed}:{problem.problem_id}")
            text = (flow_trace_text if self.config.style == "flow" else v1_trace_text)(parsed, rng, self.config)
            answer, correct = verify(text, problem)
            prompt = DEFAULT_PROMPT.format(question=problem.question)
            result.traces.append(
                Trace(
                    trace_id,
                    problem.problem_id,
                    self.identity,
                    text,
                    answer,
                    correct,
                    len(prompt.split()),
                    len(text.split()),
                )
            )
        return result
