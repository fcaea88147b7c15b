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
from scaffold_lib.data.synthetic import ParsedQuestion, parse_question

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


# Openings by signal: varied with the seed so no two traces share one template.
OPENINGS = {
    "reasoning_analysis": ("So", "Since", "Because", "That means", "Let me compute:", "Let's see:", "Now, since"),
    "addition_elaboration": ("Then", "Next,", "After that,", "Also,", "Moreover,", "In addition,", "Then,"),
}
OP_PHRASES = {
    "add": ("{name} gets {n} more, so {a} + {n} = {r}", "adding {n} gives {a} + {n} = {r}", "{a} + {n} = {r} {item}"),
    "sub": (
        "{name} has {n} fewer, so {a} - {n} = {r}",
        "taking away {n} leaves {a} - {n} = {r}",
        "{a} - {n} = {r} {item}",
    ),
    "mul": (
        "the {item} grow {n} times, so {a} * {n} = {r}",
        "multiplying by {n} gives {a} * {n} = {r}",
        "{a} * {n} = {r} {item}",
    ),
    "div": (
        "the {item} are split into {n} groups, so {a} / {n} = {r}",
        "dividing by {n} gives {a} / {n} = {r}",
        "{a} / {n} = {r} {item}",
    ),
}
SYMBOL = {"add": "+", "sub": "-", "mul": "*", "div": "/"}


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
            text = (write_flow_trace if self.config.style == "flow" else write_trace)(parsed, rng, self.config)
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


def write_trace(parsed: ParsedQuestion, rng: random.Random, cfg: ProgrammaticTeacherConfig) -> str:
    name, item = parsed.name, parsed.item
    ops = [s for s in parsed.steps if s.kind not in ("start", "distractor")]
    wrong_at = rng.randrange(len(ops)) if ops and rng.random() < cfg.wrong_fraction else -1
    mistake_at = rng.randrange(len(ops)) if ops and wrong_at < 0 and rng.random() < cfg.mistake_prob else -1
    start = parsed.steps[0].n
    steps: list[str] = [
        rng.choice(
            (
                f"Okay, {name} starts with {start} {item}, and I need the number at the end.",
                f"Let me start with what we know: {name} has {start} {item}.",
                f"First, {name} has {start} {item}.",
                f"So the question is about {name}'s {item}, starting from {start}.",
                f"Alright, {name} begins with {start} {item}.",
            )
        )
    ]
    value, chain, op_i = start, str(start), 0
    for step in parsed.steps[1:]:
        if step.kind == "distractor":
            fact = step.sentence.rstrip(".")
            fact = "a" + fact[1:] if fact.startswith("A ") else fact
            steps.append(
                rng.choice(
                    (
                        f"I think the fact that {fact} does not matter here.",
                        f"But {fact} is about something else, so I ignore it.",
                        f"Hmm, {fact}; that is a distraction.",
                        f"However, {fact} does not change {name}'s {item}.",
                    )
                )
            )
            continue
        a, n, op = value, step.n, step.kind
        right = {"add": a + n, "sub": a - n, "mul": a * n, "div": a // n}[op]
        shown = right
        if op_i in (wrong_at, mistake_at):
            shown = right + rng.choice((-2, -1, 1, 2))
        phrase = rng.choice(OP_PHRASES[op]).format(name=name, n=n, a=a, r=shown, item=item)
        if rng.random() < cfg.bare_step_prob:
            steps.append(phrase[0].upper() + phrase[1:] + ".")
        else:
            # the flow follows the problem (adding elaborates, the rest is analysis) with some noise, so the
            # next signal is learnable from context while the wording still varies
            signal = "addition_elaboration" if op == "add" else "reasoning_analysis"
            if rng.random() < cfg.signal_noise:
                signal = "reasoning_analysis" if signal == "addition_elaboration" else "addition_elaboration"
            steps.append(f"{rng.choice(OPENINGS[signal])} {phrase}.")
        if op_i == mistake_at:
            steps.append(
                rng.choice(
                    (
                        f"Wait, {a} {SYMBOL[op]} {n} is {right}, not {shown}. Let me fix that.",
                        f"But that is not right: {a} {SYMBOL[op]} {n} = {right}.",
                        f"Actually, I made a slip: {a} {SYMBOL[op]} {n} = {right}.",
                    )
                )
            )
            shown = right
        value = shown
        chain = f"({chain} {SYMBOL[op]} {n})" if op in ("mul", "div") and " " in chain else f"{chain} {SYMBOL[op]} {n}"
        if op in ("mul", "div") and rng.random() < cfg.elaboration_prob:
            steps.append(
                rng.choice(
                    (
                        f"For example, {n} groups of {value if op == 'div' else a} make {a if op == 'div' else value}, which checks out."
                        if op == "div"
                        else f"For example, {n} piles of {a} {item} make {value} {item} in all.",
                        f"For instance, I can picture it as {n} rows of {value if op == 'div' else a}.",
                    )
                )
            )
        elif rng.random() < cfg.elaboration_prob / 3:
            steps.append(
                rng.choice(
                    (
                        f"I recall that checking each step helps, and {value} looks right so far.",
                        f"Hmm, so far {name} has {value} {item}.",
                    )
                )
            )
        op_i += 1
    steps.append(
        rng.choice(
            (
                f"Therefore, {name} has {value} {item} in the end.",
                f"So overall, {chain} = {value}.",
                f"Putting it together, {name} ends with {value} {item}.",
                f"Thus the count is {value}.",
                f"In summary, {name} has {value} {item}.",
            )
        )
    )
    steps.append(rng.choice((f"The answer is {value}.", f"**Answer:** {value}", f"The final answer is {value}.")))
    return "\n\n".join(steps)


def _on(day: str | None) -> str:
    return f"on {day}, " if day else ""


# The flow style (default): the next step depends on the state of the solution, as in R1 traces.
FLOW_OPENINGS = {
    "addition_elaboration": ("Then", "Next,", "After that,", "Then,"),
    "reasoning_analysis": ("So", "Since", "Because", "That means", "Let me compute:"),
}


def write_flow_trace(parsed: ParsedQuestion, rng: random.Random, cfg: ProgrammaticTeacherConfig) -> str:
    """An R1-style trace whose flow follows the solution: an operation step (an addition step elaborates, the other
    operations are analysis); after a product or a quotient a check ("Hmm, let me check: …", or for a product with
    `illustrate_products` an example); a slip is always followed by the check that catches it ("Wait, …"), so a
    contrast step means the step before it was wrong; a fact about something else is set aside ("But … does not
    matter"); in long problems a running summary every few operations ("So far, …"), so summaries-only decoding keeps
    what the rest needs; then a conclusion and the answer. The facts of a timeline problem are taken day by day, each
    step naming its day, so which step comes next is read off the question's dates."""
    name, item = parsed.name, parsed.item
    ops = [s for s in parsed.steps if s.kind not in ("start", "distractor")]
    # a trace wrong on purpose: one slip that no check catches (the teacher's own accuracy is then below 1)
    uncaught = rng.randrange(len(ops)) if ops and rng.random() < cfg.wrong_fraction else -1
    start = parsed.steps[0].n
    first_day = _on(parsed.steps[0].day)
    steps = [
        rng.choice(
            (
                f"First, {first_day}{name} has {start} {item}.",
                f"Okay, {first_day}{name} starts with {start} {item}.",
                f"Let me start with what we know: {first_day}{name} has {start} {item}.",
            )
        )
    ]
    value, op_i = start, 0
    for step in parsed.steps[1:]:
        if step.kind == "distractor":
            fact = step.sentence.rstrip(".")
            fact = "a" + fact[1:] if fact.startswith("A ") else fact
            if step.day:  # "On Friday, Olga has 7 marbles" -> "on Friday, Olga has 7 marbles"
                fact = "o" + fact[1:]
            steps.append(
                rng.choice(
                    (
                        f"But {fact} is about something else, so I ignore it.",
                        f"However, {fact} does not change {name}'s {item}.",
                    )
                )
            )
            continue
        a, n, op = value, step.n, step.kind
        right = {"add": a + n, "sub": a - n, "mul": a * n, "div": a // n}[op]
        slip = op_i == uncaught or (op_i != uncaught and rng.random() < cfg.slip_prob)
        shown = right + rng.choice((-2, -1, 1, 2)) if slip else right
        phrase = rng.choice(OP_PHRASES[op]).format(name=name, n=n, a=a, r=shown, item=item)
        signal = "addition_elaboration" if op == "add" else "reasoning_analysis"
        if rng.random() < cfg.signal_noise:
            signal = "reasoning_analysis" if signal == "addition_elaboration" else "addition_elaboration"
        opening = rng.choice(FLOW_OPENINGS[signal])
        steps.append(f"{opening} {_on(step.day).rstrip(', ') + ', ' if step.day else ''}{phrase}.")
        if slip and op_i != uncaught:
            steps.append(f"Wait, {a} {SYMBOL[op]} {n} is {right}, not {shown}. Let me fix that.")
            shown = right
        elif op == "mul" and not slip and cfg.illustrate_products and rng.random() < cfg.verify_prob:
            steps.append(f"For example, {n} piles of {a} {item} make {shown} {item}.")
        elif op in ("mul", "div") and not slip and rng.random() < cfg.verify_prob:
            inverse = f"{shown} / {n} = {a}" if op == "mul" else f"{shown} * {n} = {a}"
            steps.append(f"Hmm, let me check: {inverse}, so {shown} is right.")
        value = shown
        op_i += 1
        if cfg.summary_every and len(ops) > cfg.summary_every and op_i % cfg.summary_every == 0 and op_i < len(ops):
            steps.append(f"So far, {name} has {value} {item}.")
    steps.append(
        rng.choice(
            (
                f"Therefore, {name} has {value} {item} in the end.",
                f"In summary, {name} has {value} {item}.",
                f"Thus the count is {value}.",
            )
        )
    )
    steps.append(f"The answer is {value}.")
    return "\n\n".join(steps)
