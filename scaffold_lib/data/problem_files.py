"""Problem files users give us (JSONL / Parquet, GSM8K format by default: `question`, `answer` ending `#### N`),
streamed row by row; a bad row is an error naming file, line and field, or (lenient) a quarantined row.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel

from scaffold_lib.core.answers import gold_answer
from scaffold_lib.core.files import DataFileError, iter_file_rows, raw_of, text_error
from scaffold_lib.core.ids import content_id
from scaffold_lib.data.problems import (
    SPLIT_ALIASES,
    SPLITS,
    LoadResult,
    Problem,
    Quarantined,
    SplitConfig,
    collect_problems,
    make_problem_id,
    normalise_question,
    split_of,
)

PROBLEM_SUFFIXES = (".jsonl", ".parquet", ".ndjson", ".json")
ProblemFileError = DataFileError  # what loading a problem file raises: names the file, the line and the field


class FieldMap(BaseModel):
    """Which columns of the user's file hold what. Defaults fit GSM8K (`question`, `answer` ending `#### N`);
    `split` and `group` are used when the file has them."""

    question: str = "question"
    answer: str = "answer"
    id: str | None = None
    split: str | None = "split"
    group: str | None = "group"


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
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        # every field's type first, then what its text holds: a row's first error is reported
        unusable = (
            _not_text(fields.question, question, "a non-empty string")
            or _not_text(fields.answer, answer, "a non-empty string or number")
            or next(
                (
                    (name, err)
                    for name, value in ((fields.question, question), (fields.answer, answer))
                    if (err := text_error(value))
                ),
                None,
            )
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


def _not_text(name: str, value, expected: str) -> tuple[str, str] | None:
    """(field, why) when `value` is not a non-empty string."""
    if isinstance(value, str) and value.strip():
        return None
    return name, "missing" if value is None else f"must be {expected}, got {value!r:.60}"


def problem_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*") if p.is_file() and p.suffix.lower() in PROBLEM_SUFFIXES)
