"""Problems: the embedded generator of multi-step arithmetic word problems, problem files (JSONL / Parquet, GSM8K
format by default) and reasoning-gym generators.

Every problem has a content id (`problem_id`, a hash of its question and answer: the same problem under another
file name is the same problem) and a group: the arithmetic skeleton of a synthetic problem, the template of a
reasoning-gym item, a file's `group` column, else the question itself. The split (train / validation / test) is
decided by the group alone, seeded, so no test item is a reworded training item and a problem's split never changes
when the set grows. A file's `split` column, when present, is honoured instead.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import BaseModel, Field, model_validator

from scaffold_lib.core.answers import gold_answer
from scaffold_lib.core.files import DataFileError, iter_file_rows, raw_of, text_error
from scaffold_lib.core.ids import content_id

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


SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
    "testing": "test",
}


class SplitConfig(BaseModel):
    """Shares of the groups that go to validation and test (the rest is train), decided by a seeded hash of the group."""

    validation_fraction: float = Field(0.1, ge=0, le=1)
    test_fraction: float = Field(0.2, ge=0, le=1)
    seed: int = 0

    @model_validator(mode="after")
    def _fractions(self) -> SplitConfig:
        if self.validation_fraction + self.test_fraction > 1:
            raise ValueError("validation_fraction + test_fraction must not exceed 1")
        return self


@dataclass(frozen=True)
class Problem:
    problem_id: str
    source: str
    split: str
    question: str
    answer: str
    answer_type: str = "number"
    group_id: str | None = None
    solution: str | None = None  # a worked solution shipped with the problem (GSM8K, reasoning-gym): a reference trace

    def as_row(self) -> dict:
        return dict(vars(self))  # flat fields: asdict() would deep-copy each (a corpus of long traces)


class Gold(NamedTuple):
    """What grading a trace needs of its problem (a `Problem` has the same fields). The trace importer keeps these, not
    whole problems, for the problems still to trace."""

    problem_id: str
    answer: str
    answer_type: str


def normalise_question(text: str) -> str:
    return " ".join(text.split()).casefold()


def make_problem_id(question: str, answer: str) -> str:
    """Content id: the question (whitespace and case normalised) and the gold answer, never where it came from."""
    return content_id("problem", normalise_question(question), answer.strip())


def split_of(group_id: str, cfg: SplitConfig) -> str:
    """Split from the group alone (seeded): stable under growth, reordering and regeneration, and every problem of a
    group lands in the same split."""
    u = int(content_id("split", cfg.seed, group_id)[:8], 16) / 0x100000000
    return (
        "test"
        if u < cfg.test_fraction
        else "validation"
        if u < cfg.test_fraction + cfg.validation_fraction
        else "train"
    )


def shard_of(problem_id: str, n_shards: int) -> int:
    """Which of `n_shards` problem shards (partitions of teacher generation) a problem belongs to, from the id
    alone."""
    return int(problem_id[8:16], 16) % n_shards


def _apply(op: str, value: int, n: int) -> int:
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


OOD_SPLITS = ("ood_longer", "ood_distractor", "ood_shuffled")


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


def _one_problem(rng: random.Random, cfg: GeneratorConfig, split: SplitConfig) -> Problem:
    if cfg.style == "timeline":
        return _timeline_problem(rng, cfg, split)
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    value = rng.randint(2, cfg.max_number)
    sentences = [rng.choice(START_TEMPLATES).format(name=name, n=value, item=item)]
    for _ in range(rng.randint(cfg.min_ops, cfg.max_ops)):
        if rng.random() < cfg.distractor_prob / max(1, cfg.max_ops):
            sentences.append(_distractor(rng, name, item))
        choice = _choose_op(rng, value, cfg)
        if choice is None:
            break
        op, n = choice
        sentences.append(rng.choice(OP_TEMPLATES[op]).format(name=name, n=n, item=item))
        value = _apply(op, value, n)
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
    value = rng.randint(2, cfg.max_number)
    facts = [rng.choice(START_TEMPLATES).format(name=name, n=value, item=item)]
    for _ in range(rng.randint(cfg.min_ops, cfg.max_ops)):
        choice = _choose_op(rng, value, cfg)
        if choice is None:
            break
        op, n = choice
        facts.append(rng.choice(OP_TEMPLATES[op]).format(name=name, n=n, item=item))
        value = _apply(op, value, n)
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
            value = _apply(step.kind, value, step.n)
    return value


def skeleton_of(question: str) -> str:
    """The arithmetic skeleton of a synthetic problem (start value, then each operation with its operand; names,
    items, phrasing and distractors left out): two problems with one skeleton are the same exercise reworded."""
    parsed = parse_question(question)
    if parsed is None:
        return content_id("question", normalise_question(question))
    return "skeleton:" + ",".join(f"{s.kind}{s.n}" for s in parsed.steps if s.kind != "distractor")


# ---------------------------------------------------------------------------------------------------------
# Loading user problem files (JSONL / Parquet, GSM8K format included)


ProblemFileError = DataFileError  # what loading a problem file raises: names the file, the line and the field


class FieldMap(BaseModel):
    """Which columns of the user's file hold what. Defaults fit GSM8K (`question`, `answer` ending `#### N`);
    `split` and `group` are used when the file has them."""

    question: str = "question"
    answer: str = "answer"
    id: str | None = None
    split: str | None = "split"
    group: str | None = "group"


@dataclass(frozen=True)
class Quarantined:
    """A row that could not become a problem, kept with why (written to the `quarantine` table)."""

    source_file: str
    line: int
    field: str
    error: str
    raw: str

    def as_row(self) -> dict:
        return dict(vars(self))  # flat fields: asdict() would deep-copy each (a corpus of long traces)


@dataclass
class LoadResult:
    problems: list[Problem]
    quarantined: list[Quarantined]


def load_problem_file(
    path: str | Path,
    fields: FieldMap = FieldMap(),
    *,
    source: str | None = None,
    split: SplitConfig = SplitConfig(),
    lenient: bool = False,
) -> LoadResult:
    """Problems from a JSONL/Parquet file, all in memory (the problems stage streams `iter_problem_file` instead).
    The same problem twice in one file is one problem. Errors as `iter_problem_file`."""
    return collect_problems(iter_problem_file(path, fields, source=source, split=split, lenient=lenient))


def collect_problems(items: Iterable[Problem | Quarantined]) -> LoadResult:
    """Problems and quarantined rows of `items`; a problem that comes twice is one problem, its first row."""
    problems: dict[str, Problem] = {}
    quarantined: list[Quarantined] = []
    for item in items:
        if isinstance(item, Quarantined):
            quarantined.append(item)
        else:
            problems.setdefault(item.problem_id, item)
    return LoadResult(list(problems.values()), quarantined)


def iter_problem_file(
    path: str | Path,
    fields: FieldMap = FieldMap(),
    *,
    source: str | None = None,
    split: SplitConfig = SplitConfig(),
    lenient: bool = False,
) -> Iterator[Problem | Quarantined]:
    """Problems of a JSONL/Parquet file, streamed row by row (a problem repeated in the file comes again). A bad row
    raises `ProblemFileError` naming file, line and field, or, with `lenient=True`, comes as a `Quarantined`. A
    `split` column is honoured; without one, the seeded group split decides (group column, else the question)."""
    path = Path(path)
    if not path.exists():
        raise ProblemFileError(f"{path}: no such file")
    source = source or path.stem

    def bad(line: int, field_name: str, error: str, raw: str) -> Quarantined:
        if not lenient:
            raise ProblemFileError(f"{path}:{line}: field {field_name!r}: {error}")
        return Quarantined(str(path), line, field_name, error, raw)

    for line, row, raw, error in iter_file_rows(path):
        if error is not None:
            yield bad(line, "<row>", error, raw)
            continue
        question, answer = row.get(fields.question), row.get(fields.answer)
        if not isinstance(question, str) or not question.strip():
            yield bad(
                line,
                fields.question,
                "missing" if question is None else f"must be a non-empty string, got {question!r:.60}",
                raw_of(row, raw),
            )
            continue
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        if not isinstance(answer, str) or not answer.strip():
            yield bad(
                line,
                fields.answer,
                "missing" if answer is None else f"must be a non-empty string or number, got {answer!r:.60}",
                raw_of(row, raw),
            )
            continue
        unusable = next(
            (
                (name, err)
                for name, value in ((fields.question, question), (fields.answer, answer))
                if (err := text_error(value))
            ),
            None,
        )
        if unusable is not None:
            yield bad(line, *unusable, raw_of(row, raw))
            continue
        gold, answer_type = gold_answer(answer)
        given_split = row.get(fields.split) if fields.split else None
        if given_split is not None and str(given_split).strip().lower() not in SPLIT_ALIASES:
            yield bad(
                line, fields.split, f"unknown split {given_split!r}; use one of {', '.join(SPLITS)}", raw_of(row, raw)
            )
            continue
        group = row.get(fields.group) if fields.group else None
        group_id = f"group:{group}" if group is not None else content_id("question", normalise_question(question))
        pid = make_problem_id(question, gold)
        if fields.id and row.get(fields.id) is not None:
            pid = content_id("problem-id", str(row[fields.id]))
        chosen = (
            SPLIT_ALIASES[str(given_split).strip().lower()] if given_split is not None else split_of(group_id, split)
        )
        worked = answer.strip() if "####" in answer else None  # GSM8K's answer field is a worked solution
        yield Problem(pid, source, chosen, question.strip(), gold, answer_type, group_id, worked)


# ---------------------------------------------------------------------------------------------------------
# reasoning-gym generators (offline, real GSM8K-derived language)


class ReasoningGymConfig(BaseModel):
    """A reasoning-gym dataset (`pip install reasoning-gym`): items with a question, an answer and, for
    `gsm_symbolic`, a worked solution. The item's template is its group."""

    dataset: str = "gsm_symbolic"
    size: int = Field(500, ge=1)
    seed: int = 0


def load_reasoning_gym(cfg: ReasoningGymConfig, split: SplitConfig = SplitConfig()) -> list[Problem]:
    try:
        import reasoning_gym
    except ImportError as exc:
        raise DataFileError(
            "problems source 'reasoning_gym' needs the reasoning-gym package: pip install 'reasoning-scaffold[real]'"
        ) from exc
    dataset = reasoning_gym.create_dataset(cfg.dataset, size=cfg.size, seed=cfg.seed)
    templates = getattr(dataset, "task_indices", None)
    problems, seen = [], set()
    for i in range(len(dataset)):
        item = dataset[i]
        gold, answer_type = gold_answer(str(item["answer"]))
        solution = (item.get("metadata") or {}).get("answer_cot")
        group_id = (
            f"{cfg.dataset}:template-{templates[i]}"
            if templates is not None
            else content_id("question", normalise_question(item["question"]))
        )
        pid = make_problem_id(item["question"], gold)
        if pid in seen:
            continue
        seen.add(pid)
        problems.append(
            Problem(
                pid,
                f"reasoning-gym/{cfg.dataset}",
                split_of(group_id, split),
                item["question"].strip(),
                gold,
                answer_type,
                group_id,
                solution,
            )
        )
    return problems


# ---------------------------------------------------------------------------------------------------------
# The problems stage's configuration

PROBLEM_SUFFIXES = (".jsonl", ".parquet", ".ndjson", ".json")


class ProblemsConfig(BaseModel):
    """Where the problems come from and how they are split."""

    source: Literal["synthetic", "reasoning_gym", "files"] = Field(
        "synthetic",
        description="synthetic: the built-in generator; reasoning_gym: a reasoning-gym dataset; "
        "files: only the problem files",
    )
    synthetic: GeneratorConfig = Field(default_factory=GeneratorConfig)
    ood: OODConfig = Field(default_factory=OODConfig)
    reasoning_gym: ReasoningGymConfig = Field(default_factory=ReasoningGymConfig)
    files: list[str] = Field(default_factory=list, description="problem files (JSONL/Parquet), loaded with `fields`")
    fields: FieldMap = Field(default_factory=FieldMap)
    watch_dir: str | None = Field(
        None,
        description="every problem file here is loaded too (default: "
        "$DAGSTER_HOME/incoming, which the file sensor watches)",
    )
    split: SplitConfig = Field(default_factory=SplitConfig)
    lenient: bool = Field(True, description="quarantine bad rows of problem files instead of failing")


def problem_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*") if p.is_file() and p.suffix.lower() in PROBLEM_SUFFIXES)
