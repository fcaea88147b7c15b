"""Import existing teacher traces (JSONL / Parquet files, or an HF `datasets` name) instead of generating them.

Rows are joined to the warehouse's problems by problem id (when the file carries ours) or else by the question
text (whitespace- and case-normalised), and verified against the gold answer like any teacher's. The thinking
column may hold `<think>…</think>` with the answer after it, or the answer may be its own column. Bad rows are
quarantined with file, line and field (or raise, with `lenient=False`); problems the file does not cover are
counted as `not_covered`, never failed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from scaffold_lib.core.files import DataFileError, iter_file_rows, text_error
from scaffold_lib.data.endpoint import split_reasoning
from scaffold_lib.data.llm_teachers import trace_from_record
from scaffold_lib.data.problems import Problem, Quarantined, normalise_question
from scaffold_lib.data.teachers import TeacherResult, make_trace_id


class TraceFieldMap(BaseModel):
    """Which columns hold what. Defaults fit open-r1-style datasets (`problem`, `generation` with <think>)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt mapping key must not be ignored

    question: str = "problem"
    thinking: str = "generation"
    answer: str | None = None  # a separate final-answer column, if the file has one
    problem_id: str | None = None  # a column holding our problem ids, if the traces were made from our export


@dataclass(frozen=True)
class ImportedRow:
    line: int
    problem_id: str | None
    question: str
    thinking: str
    answer: str


def _rows_of(source: str, split: str) -> Iterator[tuple[int, dict | None, str, str | None]]:
    path = Path(source)
    if path.exists():
        yield from iter_file_rows(path)
        return
    if path.suffix or "/" not in source:
        raise DataFileError(f"{source}: no such file (give a .jsonl/.parquet path or an HF dataset name)")
    try:
        import datasets

        dataset = datasets.load_dataset(source, split=split)
    except Exception as exc:  # hub unreachable, unknown name, bad split: all mean "cannot read this source"
        raise DataFileError(f"{source}: cannot load the HF dataset (split {split!r}): {exc}") from exc
    for i, row in enumerate(dataset, start=1):
        yield i, row, str(row)[:500], None


def load_trace_rows(
    source: str, fields: TraceFieldMap = TraceFieldMap(), *, split: str = "train", lenient: bool = True
) -> tuple[list[ImportedRow], list[Quarantined]]:
    rows: list[ImportedRow] = []
    quarantined: list[Quarantined] = []

    def bad(line: int, field_name: str, error: str, raw: str) -> None:
        if not lenient:
            raise DataFileError(f"{source}:{line}: field {field_name!r}: {error}")
        quarantined.append(Quarantined(source, line, field_name, error, raw))

    for line, row, raw, error in _rows_of(source, split):
        if error is not None:
            bad(line, "<row>", error, raw)
            continue
        values = {}
        for name in (fields.question, fields.thinking, fields.answer, fields.problem_id):
            if name is None:
                continue
            value = row.get(name)
            required = name in (fields.question, fields.thinking)
            if value is None and not required:
                continue
            problem = (
                "missing"
                if value is None
                else f"must be a string, got {type(value).__name__}"
                if not isinstance(value, str)
                else "is empty"
                if required and not value.strip()
                else text_error(value)
            )
            if problem:
                bad(line, name, problem, raw)
                break
            values[name] = value
        else:
            thinking, answer = split_reasoning(values[fields.thinking])
            if fields.answer and values.get(fields.answer, "").strip():
                # with its own answer column, the thinking column is all reasoning even without <think> tags
                # (split_reasoning would have taken untagged text for the answer, which the column then replaced)
                if not thinking:
                    thinking = values[fields.thinking].strip()
                answer = values[fields.answer].strip()
            rows.append(
                ImportedRow(
                    line,
                    values.get(fields.problem_id) if fields.problem_id else None,
                    values[fields.question],
                    thinking,
                    answer,
                )
            )
    return rows, quarantined


class ImportedTeacher:
    """A `Teacher` whose answers come from a file: `generate` looks each problem up instead of asking a model.
    Several rows for one problem become samples 0, 1, …"""

    def __init__(
        self,
        source: str,
        fields: TraceFieldMap = TraceFieldMap(),
        *,
        name: str | None = None,
        split: str = "train",
        lenient: bool = True,
    ) -> None:
        self.identity = f"import:{name or Path(source).stem}"
        self.rows, self.quarantined = load_trace_rows(source, fields, split=split, lenient=lenient)
        self._by_id: dict[str, list[ImportedRow]] = defaultdict(list)
        self._by_question: dict[str, list[ImportedRow]] = defaultdict(list)
        for row in self.rows:
            if row.problem_id:
                self._by_id[row.problem_id].append(row)
            else:
                self._by_question[normalise_question(row.question)].append(row)
        self.samples = max((len(v) for v in (*self._by_id.values(), *self._by_question.values())), default=1)
        self._quarantine_reported = False

    def trace_id_for(self, problem: Problem, sample: int = 0) -> str:
        return make_trace_id(problem.problem_id, self.identity, "", {"sample": sample})

    def matches(self, problem: Problem) -> list[ImportedRow]:
        return self._by_id.get(problem.problem_id) or self._by_question.get(normalise_question(problem.question), [])

    def generate(self, problems: Sequence[Problem]) -> TeacherResult:
        result = TeacherResult()
        if not self._quarantine_reported:  # bad rows are reported once per teacher, not once per call
            result.quarantined, self._quarantine_reported = list(self.quarantined), True
        for problem in problems:
            rows = self.matches(problem)
            result.not_covered += not rows
            for sample, row in enumerate(rows):
                record = {
                    "trace_id": self.trace_id_for(problem, sample),
                    "sample": sample,
                    "thinking": row.thinking,
                    "answer": row.answer,
                    "prompt_tokens": len(row.question.split()),
                    "completion_tokens": len((row.thinking + " " + row.answer).split()),
                }
                result.traces.append(trace_from_record(record, problem, self.identity))
        result.stats = {
            "file_rows": len(self.rows),
            "quarantined_rows": len(self.quarantined),
            "traces_matched": len(result.traces),
            "not_covered": result.not_covered,
        }
        return result
