"""Problems: the embedded generator of multi-step arithmetic word problems, and loaders for user files.

Every problem has a content id (`problem_id`) and a split decided by that id alone, so the split of a
problem never changes when the dataset grows or is regenerated with another size.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from pydantic import BaseModel, Field, model_validator

from scaffold_lib.core.ids import content_id

SYNTHETIC_SOURCE = "synthetic-arith"

NAMES = ("Ava", "Ben", "Chloe", "Diego", "Emma", "Farah", "Hugo", "Iris", "Jonas", "Keiko", "Liam", "Maya",
         "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tara", "Omar")
ITEMS = ("apples", "marbles", "stickers", "pencils", "cookies", "coins", "stamps", "shells", "books", "cards")

# Each operation has several phrasings; `{n}` is the operand. The programmatic teacher parses questions
# with the same table (see `parse_question`), so generator and solver cannot drift apart.
START_TEMPLATES = ("{name} has {n} {item}.", "{name} starts with {n} {item}.", "{name} owns {n} {item}.")
OP_TEMPLATES: dict[str, tuple[str, ...]] = {
    "add": ("{name} buys {n} more {item}.", "{name} finds {n} more {item}.", "A friend gives {name} {n} more {item}.",
            "{name} wins {n} more {item}."),
    "sub": ("{name} gives away {n} {item}.", "{name} loses {n} {item}.", "{name} uses up {n} {item}.",
            "{name} sells {n} {item}."),
    "mul": ("{name} ends up with {n} times as many {item}.", "The number of {item} {name} has grows {n} times."),
    "div": ("{name} splits the {item} into {n} equal groups and keeps one group.",
            "{name} shares the {item} equally with friends so that {n} people get the same amount, and keeps one share."),
}
DISTRACTOR_TEMPLATES = ("{other} has {n} {item2}.", "A box of {item2} costs {n} dollars.",
                        "{other} is {n} years old.")
QUESTION_TEMPLATES = ("How many {item} does {name} have now?", "How many {item} does {name} have in the end?")


class GeneratorConfig(BaseModel):
    """Size and difficulty of the embedded problem set."""

    n_problems: int = Field(400, ge=1)
    seed: int = 0
    min_ops: int = Field(2, ge=1, le=8)
    max_ops: int = Field(4, ge=1, le=8)
    max_number: int = Field(20, ge=2, description="largest start value / operand of add and sub")
    max_factor: int = Field(3, ge=2, description="largest factor of mul / div")
    max_value: int = Field(100, ge=10, description="no intermediate value exceeds this")
    distractor_prob: float = Field(0.4, ge=0, le=1)
    test_fraction: float = Field(0.2, ge=0, le=1)

    @model_validator(mode="after")
    def _ops_range(self) -> "GeneratorConfig":
        if self.min_ops > self.max_ops:
            raise ValueError(f"min_ops ({self.min_ops}) > max_ops ({self.max_ops})")
        return self


@dataclass(frozen=True)
class Problem:
    problem_id: str
    source: str
    split: str
    question: str
    answer: str
    answer_type: str = "number"

    def as_row(self) -> dict:
        return asdict(self)


def make_problem_id(source: str, question: str, answer: str) -> str:
    return content_id("problem", source, question.strip(), answer.strip())


def split_of(problem_id: str, test_fraction: float) -> str:
    """Split from the id alone: stable under growth, reordering and regeneration."""
    return "test" if int(problem_id[:8], 16) / 0xFFFFFFFF < test_fraction else "train"


def shard_of(problem_id: str, n_shards: int) -> int:
    """Which of `n_shards` problem shards (partitions of teacher generation) a problem belongs to, from the id
    alone; other hex digits than the split's, so shards are not correlated with the split."""
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


def generate_problems(cfg: GeneratorConfig = GeneratorConfig()) -> list[Problem]:
    """`cfg.n_problems` distinct problems, deterministic in `cfg.seed` (the i-th problem only depends on seed, i)."""
    problems: list[Problem] = []
    seen: set[str] = set()
    attempt = 0
    while len(problems) < cfg.n_problems:
        rng = random.Random(f"{cfg.seed}:{attempt}")
        attempt += 1
        problem = _one_problem(rng, cfg)
        if problem.problem_id not in seen:
            seen.add(problem.problem_id)
            problems.append(problem)
        if attempt > 50 * cfg.n_problems + 1000:
            raise ValueError(f"cannot draw {cfg.n_problems} distinct problems with {cfg}; widen the ranges")
    return problems


def _one_problem(rng: random.Random, cfg: GeneratorConfig) -> Problem:
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
    pid = make_problem_id(SYNTHETIC_SOURCE, question, answer)
    return Problem(pid, SYNTHETIC_SOURCE, split_of(pid, cfg.test_fraction), question, answer, "number")


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


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for key, group in (("name", r"(?P<name>[A-Z][a-z]+)"), ("other", r"[A-Z][a-z]+"), ("n", r"(?P<n>\d+)"),
                       ("item2", r"[a-z]+"), ("item", r"(?P<item>[a-z]+)")):
        pattern = pattern.replace(re.escape("{" + key + "}"), group)
    return re.compile(pattern + r"$")


_PARSERS: list[tuple[str, re.Pattern]] = (
    [("start", _template_regex(t)) for t in START_TEMPLATES]
    + [(op, _template_regex(t)) for op, ts in OP_TEMPLATES.items() for t in ts]
    + [("distractor", _template_regex(t)) for t in DISTRACTOR_TEMPLATES]
)
_QUESTION_PARSERS = [_template_regex(t) for t in QUESTION_TEMPLATES]
_SENTENCE = re.compile(r"(?<=[.?])\s+")


@dataclass(frozen=True)
class ParsedQuestion:
    name: str
    item: str
    steps: list[ParsedStep] = field(default_factory=list)


def parse_question(question: str) -> ParsedQuestion | None:
    """Structure of a synthetic word problem, or None when the question is not one of ours.

    A fact about another person or another item is a distractor, whatever template it uses."""
    sentences = _SENTENCE.split(question.strip())
    target = next((m for regex in _QUESTION_PARSERS if (m := regex.match(sentences[-1]))), None)
    if target is None:
        return None
    name, item = target["name"], target["item"]
    steps: list[ParsedStep] = []
    for sentence in sentences[:-1]:
        match = next(((kind, m) for kind, regex in _PARSERS if (m := regex.match(sentence))), None)
        if match is None:
            return None
        kind, m = match
        groups = m.groupdict()
        if groups.get("name", name) != name or groups.get("item", item) != item:
            kind = "distractor"
        steps.append(ParsedStep(kind, int(m["n"]), sentence))
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


# ---------------------------------------------------------------------------------------------------------
# Loading user problem files (JSONL / Parquet, GSM8K format included)


class ProblemFileError(ValueError):
    """A problem file cannot be read; the message names the file, the line and the field."""


class FieldMap(BaseModel):
    """Which columns of the user's file hold what. Defaults fit GSM8K (`question`, `answer` ending `#### N`)."""

    question: str = "question"
    answer: str = "answer"
    id: str | None = None
    split: str | None = None


@dataclass(frozen=True)
class Quarantined:
    """A row that could not become a problem, kept with why (written to the `quarantine` table)."""

    source_file: str
    line: int
    field: str
    error: str
    raw: str

    def as_row(self) -> dict:
        return asdict(self)


@dataclass
class LoadResult:
    problems: list[Problem]
    quarantined: list[Quarantined]


_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.S)


def normalise_gold_answer(raw: str) -> tuple[str, str]:
    """(answer, answer_type): GSM8K's `… #### 1,000` -> ("1000", "number"); free text stays text."""
    text = raw.strip()
    m = _GSM8K_FINAL.search(text)
    if m:
        text = m.group(1).strip()
    numeric = text.replace(",", "").replace("$", "").rstrip(".")
    if re.fullmatch(r"-?\d+(?:\.\d+)?", numeric):
        if "." in numeric:
            numeric = numeric.rstrip("0").rstrip(".")
        return numeric, "number"
    return text, "text"


def iter_file_rows(path: Path) -> Iterator[tuple[int, dict | None, str, str | None]]:
    """(line number, row or None, raw text, error) for JSONL or Parquet."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (OSError, ValueError) as exc:  # ArrowInvalid is a ValueError
            raise ProblemFileError(f"{path}: cannot read as Parquet: {exc}") from exc
        for i, row in enumerate(table.to_pylist(), start=1):
            yield i, row, json.dumps(row, default=str)[:500], None
        return
    if suffix not in (".jsonl", ".json", ".ndjson"):
        raise ProblemFileError(f"{path}: unsupported file type {suffix!r}; use .jsonl or .parquet")
    with path.open("rb") as fh:
        for i, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8-sig" if i == 1 else "utf-8")  # a BOM may open the file
            except UnicodeDecodeError as exc:
                yield i, None, raw[:500].decode("utf-8", "replace"), f"not UTF-8 ({exc.reason} at byte {exc.start})"
                continue
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                yield i, None, text[:500], f"invalid JSON ({exc.msg} at column {exc.colno})"
                continue
            if not isinstance(row, dict):
                yield i, None, text[:500], f"expected a JSON object, got {type(row).__name__}"
                continue
            yield i, row, text[:500], None


def text_error(value: str) -> str | None:
    if "\x00" in value:
        return "contains NUL bytes"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escape such as "\\ud800" in otherwise valid JSON
        return "contains an unpaired surrogate (not encodable as UTF-8)"
    return None


def load_problem_file(path: str | Path, fields: FieldMap = FieldMap(), *, source: str | None = None,
                      default_split: str = "train", lenient: bool = False) -> LoadResult:
    """Problems from a JSONL/Parquet file. A bad row raises `ProblemFileError` naming file, line and field,
    or, with `lenient=True`, is quarantined and returned in `LoadResult.quarantined`."""
    path = Path(path)
    if not path.exists():
        raise ProblemFileError(f"{path}: no such file")
    source = source or path.stem
    problems: list[Problem] = []
    quarantined: list[Quarantined] = []
    seen: set[str] = set()

    def bad(line: int, field_name: str, error: str, raw: str) -> None:
        if not lenient:
            raise ProblemFileError(f"{path}:{line}: field {field_name!r}: {error}")
        quarantined.append(Quarantined(str(path), line, field_name, error, raw))

    for line, row, raw, error in iter_file_rows(path):
        if error is not None:
            bad(line, "<row>", error, raw)
            continue
        question, answer = row.get(fields.question), row.get(fields.answer)
        if not isinstance(question, str) or not question.strip():
            bad(line, fields.question, "missing" if question is None else f"must be a non-empty string, got {question!r:.60}", raw)
            continue
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        if not isinstance(answer, str) or not answer.strip():
            bad(line, fields.answer, "missing" if answer is None else f"must be a non-empty string or number, got {answer!r:.60}", raw)
            continue
        unusable = next(((name, err) for name, value in ((fields.question, question), (fields.answer, answer))
                         if (err := text_error(value))), None)
        if unusable is not None:
            bad(line, *unusable, raw)
            continue
        gold, answer_type = normalise_gold_answer(answer)
        split = str(row.get(fields.split) or default_split) if fields.split else default_split
        pid = make_problem_id(source, question, gold)
        if fields.id and row.get(fields.id) is not None:
            pid = content_id("problem-id", source, str(row[fields.id]))
        if pid in seen:  # the same problem twice in one file is one problem
            continue
        seen.add(pid)
        problems.append(Problem(pid, source, split, question.strip(), gold, answer_type))
    return LoadResult(problems, quarantined)
