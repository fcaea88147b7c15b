"""The embedded problem set: seeded multi-step arithmetic word problems (plain, or a timeline of dated facts told out
of order), their out-of-distribution suites, and the parser that reads one back (the programmatic teacher solves
what it parses; the error analysis reads a response's equations against it). Grouped by arithmetic skeleton.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from scaffold_lib.core.ids import content_id
from scaffold_lib.data.problems import Problem, SplitConfig, make_problem_id, normalise_question, split_of

SYNTHETIC_SOURCE = "synthetic-arith"

NAMES = (
    "Ava",
    "Ben",
    "Chloe",
    "Diego",
    "Emma",
    "Farah",
    "Hugo",
    "Iris",
    "Jonas",
    "Keiko",
    "Liam",
    "Maya",
    "Noah",
    "Olga",
    "Priya",
    "Quinn",
    "Rosa",
    "Sam",
    "Tara",
    "Omar",
)
ITEMS = ("apples", "marbles", "stickers", "pencils", "cookies", "coins", "stamps", "shells", "books", "cards")

# Each operation has several phrasings; `{n}` is the operand. The programmatic teacher parses questions
# with the same table (see `parse_question`), so generator and solver cannot drift apart.
START_TEMPLATES = ("{name} has {n} {item}.", "{name} starts with {n} {item}.", "{name} owns {n} {item}.")
OP_TEMPLATES: dict[str, tuple[str, ...]] = {
    "add": (
        "{name} buys {n} more {item}.",
        "{name} finds {n} more {item}.",
        "A friend gives {name} {n} more {item}.",
        "{name} wins {n} more {item}.",
    ),
    "sub": (
        "{name} gives away {n} {item}.",
        "{name} loses {n} {item}.",
        "{name} uses up {n} {item}.",
        "{name} sells {n} {item}.",
    ),
    "mul": ("{name} ends up with {n} times as many {item}.", "The number of {item} {name} has grows {n} times."),
    "div": (
        "{name} splits the {item} into {n} equal groups and keeps one group.",
        "{name} shares the {item} equally with friends so that {n} people get the same amount, and keeps one share.",
    ),
}
DISTRACTOR_TEMPLATES = ("{other} has {n} {item2}.", "A box of {item2} costs {n} dollars.", "{other} is {n} years old.")
QUESTION_TEMPLATES = ("How many {item} does {name} have now?", "How many {item} does {name} have in the end?")


DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


class GeneratorConfig(BaseModel):
    """Size and difficulty of the embedded problem set.

    `style = "plain"` tells the story in order. `style = "timeline"` dates every fact ("On Tuesday, …", consecutive
    days) and tells some of them out of order, with facts about other people on days of their own: which fact comes
    next, and so which kind of step, must be found in the question, while the arithmetic stays small."""

    style: Literal["plain", "timeline"] = "plain"
    n_problems: int = Field(400, ge=1)
    seed: int = 0
    min_ops: int = Field(2, ge=1, le=8)
    max_ops: int = Field(4, ge=1, le=8)
    max_number: int = Field(20, ge=2, description="largest start value / operand of add and sub")
    max_factor: int = Field(3, ge=2, description="largest factor of mul / div")
    max_value: int = Field(100, ge=10, description="no intermediate value exceeds this")
    distractor_prob: float = Field(0.4, ge=0, le=1)
    max_distractors: int = Field(
        1, ge=0, le=4, description="timeline: distractor facts drawn, each with distractor_prob"
    )
    moved_facts: int = Field(
        1, ge=0, description="timeline: dated facts taken out of their place and put back at a random one"
    )
    shuffled: bool = Field(False, description="timeline: every fact, the first included, in a random order")

    @model_validator(mode="after")
    def _ops_range(self) -> GeneratorConfig:
        if self.min_ops > self.max_ops:
            raise ValueError(f"min_ops ({self.min_ops}) > max_ops ({self.max_ops})")
        if self.style == "timeline" and 1 + self.max_ops + self.max_distractors > len(DAYS):
            raise ValueError(
                f"a timeline holds {len(DAYS)} days: 1 + max_ops ({self.max_ops}) + max_distractors "
                f"({self.max_distractors}) is more"
            )
        return self


def apply_op(op: str, value: int, n: int) -> int:
    """The result of one operation of a synthetic problem (division is exact by construction)."""
    return {"add": value + n, "sub": value - n, "mul": value * n, "div": value // n}[op]


def _choose_op(rng: random.Random, value: int, cfg: GeneratorConfig) -> tuple[str, int] | None:
    options: list[tuple[str, int]] = []
    if value + 1 <= cfg.max_value:
        options.append(("add", rng.randint(1, min(cfg.max_number, cfg.max_value - value))))
    if value >= 2:
        options.append(("sub", rng.randint(1, min(cfg.max_number, value - 1))))
    factors = [f for f in range(2, cfg.max_factor + 1) if value * f <= cfg.max_value]
    if factors and value > 0:
        options.append(("mul", rng.choice(factors)))
    divisors = [f for f in range(2, cfg.max_factor + 1) if value % f == 0 and value // f >= 1]
    if divisors:
        options.append(("div", rng.choice(divisors)))
    return rng.choice(options) if options else None


def generate_problems(cfg: GeneratorConfig = GeneratorConfig(), split: SplitConfig = SplitConfig()) -> list[Problem]:
    """`cfg.n_problems` distinct problems, deterministic in `cfg.seed` (the i-th problem only depends on seed, i),
    grouped by arithmetic skeleton."""
    return _draw(cfg, split, cfg.n_problems, lambda p: True, str(cfg.seed))


def _draw(
    cfg: GeneratorConfig, split: SplitConfig, n: int, keep: Callable[[Problem], bool], stream: str
) -> list[Problem]:
    problems: list[Problem] = []
    seen: set[str] = set()
    attempt = 0
    while len(problems) < n:
        rng = random.Random(f"{stream}:{attempt}")
        attempt += 1
        problem = _one_problem(rng, cfg, split)
        if problem.problem_id not in seen and keep(problem):
            seen.add(problem.problem_id)
            problems.append(problem)
        if attempt > 50 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct problems with {cfg}; widen the ranges")
    return problems


class OODConfig(BaseModel):
    """Out-of-distribution test sets of the synthetic generator (the paper's claim is logical robustness): more
    operations than in training (`ood_longer`), more facts about others (`ood_distractor`), a timeline's facts in any
    order (`ood_shuffled`). Each is a split of its own, drawn only from skeletons of the test split (ood_longer's are
    longer than any trained on), so no OOD item is a training exercise reworded."""

    n_problems: int = Field(0, ge=0, description="problems per OOD suite (0: none)")
    extra_ops: int = Field(2, ge=1, description="ood_longer: up to this many operations more than max_ops")
    extra_distractors: int = Field(2, ge=1, description="ood_distractor: this many more distractors, each certain")
    seed: int = 1


def ood_settings(cfg: GeneratorConfig, ood: OODConfig) -> dict[str, GeneratorConfig]:
    """The generator settings of each OOD suite that the base settings allow (a timeline holds seven days)."""
    timeline = cfg.style == "timeline"
    ops = min(cfg.max_ops + ood.extra_ops, len(DAYS) - 1 - cfg.max_distractors if timeline else 8)
    distractors = min(cfg.max_distractors + ood.extra_distractors, len(DAYS) - 1 - cfg.max_ops if timeline else 4)
    out = {}
    if ops > cfg.max_ops:
        out["ood_longer"] = cfg.model_copy(update={"min_ops": cfg.max_ops + 1, "max_ops": ops})
    if distractors > cfg.max_distractors or not timeline:
        out["ood_distractor"] = cfg.model_copy(update={"max_distractors": distractors, "distractor_prob": 1.0})
    if timeline:
        out["ood_shuffled"] = cfg.model_copy(update={"shuffled": True})
    return out


def ood_problems(cfg: GeneratorConfig, ood: OODConfig, split: SplitConfig) -> list[Problem]:
    """`ood.n_problems` problems of each OOD suite, their split the suite's name."""
    if not ood.n_problems:
        return []
    out = []
    for name, settings in ood_settings(cfg, ood).items():
        drawn = _draw(settings, split, ood.n_problems, lambda p: p.split == "test", f"{ood.seed}:{name}")
        out += [replace(p, split=name) for p in drawn]
    return out


def _story(
    rng: random.Random, cfg: GeneratorConfig, name: str, item: str, interleave_distractors: bool
) -> tuple[list[str], int]:
    """The starting amount and the operations on it, in order, and the value they leave; the operations stop early
    where none keeps the value in range. `interleave_distractors`: a distractor may come before each operation."""
    value = rng.randint(2, cfg.max_number)
    sentences = [rng.choice(START_TEMPLATES).format(name=name, n=value, item=item)]
    for _ in range(rng.randint(cfg.min_ops, cfg.max_ops)):
        if interleave_distractors and rng.random() < cfg.distractor_prob / max(1, cfg.max_ops):
            sentences.append(_distractor(rng, name, item))
        choice = _choose_op(rng, value, cfg)
        if choice is None:
            break
        op, n = choice
        sentences.append(rng.choice(OP_TEMPLATES[op]).format(name=name, n=n, item=item))
        value = apply_op(op, value, n)
    return sentences, value


def _one_problem(rng: random.Random, cfg: GeneratorConfig, split: SplitConfig) -> Problem:
    if cfg.style == "timeline":
        return _timeline_problem(rng, cfg, split)
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    sentences, value = _story(rng, cfg, name, item, interleave_distractors=True)
    if rng.random() < cfg.distractor_prob:
        sentences.insert(rng.randint(1, len(sentences)), _distractor(rng, name, item))
    sentences.append(rng.choice(QUESTION_TEMPLATES).format(name=name, item=item))
    question, answer = " ".join(sentences), str(value)
    group = skeleton_of(question)
    return Problem(
        make_problem_id(question, answer), SYNTHETIC_SOURCE, split_of(group, split), question, answer, "number", group
    )


def _timeline_problem(rng: random.Random, cfg: GeneratorConfig, split: SplitConfig) -> Problem:
    """Facts on consecutive days, the first the start; distractors (another person's or another item's facts) on days
    of their own; told in order but for `moved_facts` (or, `shuffled`, in any order)."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    facts, value = _story(rng, cfg, name, item, interleave_distractors=False)
    for _ in range(cfg.max_distractors):
        if rng.random() < cfg.distractor_prob:
            facts.insert(rng.randint(1, len(facts)), _distractor(rng, name, item))
    first = rng.randrange(len(DAYS) - len(facts) + 1)
    dated = [f"On {DAYS[first + i]}, {_lower_first(f)}" for i, f in enumerate(facts)]
    if cfg.shuffled:
        rng.shuffle(dated)
    else:
        for _ in range(min(cfg.moved_facts, len(dated) - 1)):
            moved = dated.pop(rng.randrange(1, len(dated)))
            dated.insert(rng.randrange(len(dated) + 1), moved)
    dated.append(rng.choice(QUESTION_TEMPLATES).format(name=name, item=item))
    question, answer = " ".join(dated), str(value)
    group = skeleton_of(question)
    return Problem(
        make_problem_id(question, answer), SYNTHETIC_SOURCE, split_of(group, split), question, answer, "number", group
    )


def _lower_first(sentence: str) -> str:
    """ "Ava buys …" stays, "A friend gives …" and "The number of …" become "a friend …", "the number …"."""
    head = sentence.split(" ", 1)[0]
    return sentence if head in NAMES else sentence[0].lower() + sentence[1:]


def _distractor(rng: random.Random, name: str, item: str) -> str:
    other = rng.choice([n for n in NAMES if n != name])
    item2 = rng.choice([i for i in ITEMS if i != item])
    return rng.choice(DISTRACTOR_TEMPLATES).format(other=other, n=rng.randint(2, 30), item2=item2)


# ---------------------------------------------------------------------------------------------------------
# Parsing the synthetic problems back (used by the programmatic teacher to *solve* them)


@dataclass(frozen=True)
class ParsedStep:
    kind: str  # start | add | sub | mul | div | distractor
    n: int
    sentence: str
    day: str | None = None  # a timeline problem's date of the fact


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for key, group in (
        ("name", r"(?P<name>[A-Z][a-z]+)"),
        ("other", r"[A-Z][a-z]+"),
        ("n", r"(?P<n>\d+)"),
        ("item2", r"[a-z]+"),
        ("item", r"(?P<item>[a-z]+)"),
    ):
        pattern = pattern.replace(re.escape("{" + key + "}"), group)
    return re.compile(pattern + r"$")


_PARSERS: list[tuple[str, re.Pattern]] = (
    [("start", _template_regex(t)) for t in START_TEMPLATES]
    + [(op, _template_regex(t)) for op, ts in OP_TEMPLATES.items() for t in ts]
    + [("distractor", _template_regex(t)) for t in DISTRACTOR_TEMPLATES]
)
_QUESTION_PARSERS = [_template_regex(t) for t in QUESTION_TEMPLATES]
_SENTENCE = re.compile(r"(?<=[.?])\s+")
_DATED = re.compile(r"On (?P<day>" + "|".join(DAYS) + r"), (?P<fact>.+)$")


@dataclass(frozen=True)
class ParsedQuestion:
    name: str
    item: str
    steps: list[ParsedStep] = field(default_factory=list)


def parse_question(question: str) -> ParsedQuestion | None:
    """Structure of a synthetic word problem, or None when the question is not one of ours.

    A fact about another person or another item is a distractor, whatever template it uses. The facts of a timeline
    problem (every fact dated) come back in the order of their days, each with its day."""
    sentences = _SENTENCE.split(question.strip())
    target = next((m for regex in _QUESTION_PARSERS if (m := regex.match(sentences[-1]))), None)
    if target is None:
        return None
    name, item = target["name"], target["item"]
    steps: list[ParsedStep] = []
    dates = [_DATED.match(s) for s in sentences[:-1]]
    dated = bool(dates) and all(dates)
    for sentence, date in zip(sentences[:-1], dates):
        fact = date["fact"][0].upper() + date["fact"][1:] if dated else sentence
        match = next(((kind, m) for kind, regex in _PARSERS if (m := regex.match(fact))), None)
        if match is None:
            return None
        kind, m = match
        groups = m.groupdict()
        if groups.get("name", name) != name or groups.get("item", item) != item:
            kind = "distractor"
        steps.append(ParsedStep(kind, int(m["n"]), sentence, date["day"] if dated else None))
    if dated:
        steps.sort(key=lambda s: DAYS.index(s.day))
    starts = [s for s in steps if s.kind == "start"]
    if len(starts) != 1 or steps[0].kind != "start":
        return None
    return ParsedQuestion(name, item, steps)


def solve(parsed: ParsedQuestion) -> int:
    value = 0
    for step in parsed.steps:
        if step.kind == "start":
            value = step.n
        elif step.kind != "distractor":
            value = apply_op(step.kind, value, step.n)
    return value


def skeleton_of(question: str) -> str:
    """The arithmetic skeleton of a synthetic problem (start value, then each operation with its operand; names,
    items, phrasing and distractors left out): two problems with one skeleton are the same exercise reworded."""
    parsed = parse_question(question)
    if parsed is None:
        return content_id("question", normalise_question(question))
    return "skeleton:" + ",".join(f"{s.kind}{s.n}" for s in parsed.steps if s.kind != "distractor")
