"""Import existing teacher traces (JSONL / Parquet files, a folder of them, or an HF `datasets` name) instead of
generating them.

Import is file-driven and streamed: the trace stage hands the importer the problems that still lack a trace from it
(`TodoProblems`, by id and by normalised question) and the importer reads the files batch by batch, keeping only
the rows that match one of them. Memory is bounded by a batch plus the table of problems still to trace, about
330 bytes per problem whatever its text (id, gold answer, question digest), never by the corpus' texts.
For Parquet, only the key column (question or problem id) is read for a row group whose rows are all already
imported, so a refresh after a new file arrives costs little more than reading that file.

Rows are joined to problems by problem id (when the file carries ours) or else by the question text (whitespace-
and case-normalised), and verified against the gold answer like any teacher's. The thinking column may hold
`<think>…</think>` with the answer after it, or the answer may be its own column. Bad rows are quarantined with
file, line and field (or raise, with `lenient=False`); problems no file covers are counted as `not_covered`.
"""

from __future__ import annotations

import hashlib
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from scaffold_lib.core.files import DataFileError, iter_file_rows, raw_of, text_error
from scaffold_lib.data.endpoint import split_reasoning
from scaffold_lib.data.llm_teachers import trace_from_record
from scaffold_lib.data.problems import Gold, Problem, Quarantined, normalise_question
from scaffold_lib.data.teachers import TeacherResult, make_trace_id

TRACE_FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet")


class TraceFieldMap(BaseModel):
    """Which columns hold what. Defaults fit open-r1-style datasets (`problem`, `generation` with <think>)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt mapping key must not be ignored

    question: str = "problem"
    thinking: str = "generation"
    answer: str | None = None  # a separate final-answer column, if the file has one
    problem_id: str | None = None  # a column holding our problem ids, if the traces were made from our export


@dataclass(frozen=True)
class ImportedRow:
    source_file: str
    line: int
    problem_id: str | None
    question: str
    thinking: str
    answer: str


def question_key(question: str) -> bytes:
    """A 16-byte digest of the normalised question: what rows are matched on, in place of the text."""
    return hashlib.blake2b(normalise_question(question).encode(), digest_size=16).digest()


@dataclass
class TodoProblems:
    """The problems still without a trace from this importer, looked up by our id or by normalised question. It keeps
    what grading needs of each (`Gold`) and a digest of its question, not the problem: the texts of 1.4 M problems of
    400-character questions, kept twice (as read and normalised), would take about 1.5 GB."""

    by_id: dict[str, Gold] = field(default_factory=dict)
    by_question: dict[bytes, str] = field(default_factory=dict)  # question key -> problem id

    def add(self, problem: Problem) -> None:
        gold = Gold(problem.problem_id, problem.answer, sys.intern(problem.answer_type))
        self.by_id[gold.problem_id] = gold
        self.by_question.setdefault(question_key(problem.question), gold.problem_id)

    def __len__(self) -> int:
        return len(self.by_id)

    def match(self, problem_id: str | None, question: str | None) -> Gold | None:
        if problem_id is not None:
            return self.by_id.get(problem_id)
        found = self.by_question.get(question_key(question)) if isinstance(question, str) else None
        return None if found is None else self.by_id[found]


def source_files(source: str) -> list[Path] | None:
    """The files of a source (one file, or every trace file in a folder, sorted), or None for an HF dataset name."""
    path = Path(source)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix.lower() in TRACE_FILE_SUFFIXES)
    if path.exists():
        return [path]
    if path.suffix or "/" not in source:
        raise DataFileError(f"{source}: no such file (give a .jsonl/.parquet path, a folder or an HF dataset name)")
    return None


def _hf_rows(source: str, split: str) -> Iterator[tuple[int, dict | None, str, str | None]]:
    try:
        import datasets

        dataset = datasets.load_dataset(source, split=split, streaming=True)
    except Exception as exc:  # hub unreachable, unknown name, bad split: all mean "cannot read this source"
        raise DataFileError(f"{source}: cannot load the HF dataset (split {split!r}): {exc}") from exc
    for i, row in enumerate(dataset, start=1):
        yield i, row, "", None


def _parquet_rows(path: Path, fields: TraceFieldMap, wanted) -> Iterator[tuple[int, dict | None, str, str | None]]:
    """Rows of a Parquet file; a row group is read whole only if its key column names a wanted problem (or a key
    is unusable, so the row is quarantined), otherwise only that column is read."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (OSError, ValueError) as exc:
        raise DataFileError(f"{path}: cannot read as Parquet: {exc}") from exc
    key_column = fields.problem_id or fields.question
    names = set(parquet.schema_arrow.names)
    line = 0
    for group in range(parquet.num_row_groups):
        if key_column in names:
            keys = parquet.read_row_group(group, columns=[key_column]).column(0).to_pylist()
            by_id = key_column == fields.problem_id
            hits = [i for i, k in enumerate(keys) if not isinstance(k, str) or wanted(k if by_id else None, k)]
        else:
            keys, hits = None, None  # the key column is missing: every row is quarantined below
        n = len(keys) if keys is not None else parquet.metadata.row_group(group).num_rows
        if hits == []:
            line += n
            continue
        table = parquet.read_row_group(group)
        rows = table.take(hits).to_pylist() if hits is not None else table.to_pylist()
        for i, row in zip(hits if hits is not None else range(n), rows):
            yield line + i + 1, row, "", None
        line += n


def read_trace_rows(
    source: str,
    fields: TraceFieldMap = TraceFieldMap(),
    *,
    split: str = "train",
    lenient: bool = True,
    wanted=None,
) -> Iterator[ImportedRow | Quarantined]:
    """Valid rows and quarantined ones, streamed file by file. `wanted(problem_id, question)` (default: all) lets a
    reader skip rows for problems nobody asks about before validating them (Parquet: before reading them)."""
    wanted = wanted or (lambda problem_id, question: True)
    files = source_files(source)
    readers = (
        [
            (str(f), _parquet_rows(f, fields, wanted) if f.suffix.lower() == ".parquet" else iter_file_rows(f))
            for f in files
        ]
        if files is not None
        else [(source, _hf_rows(source, split))]
    )
    for name, rows in readers:
        for line, row, raw, error in rows:
            if error is not None:
                if not lenient:
                    raise DataFileError(f"{name}:{line}: field '<row>': {error}")
                yield Quarantined(name, line, "<row>", error, raw)
                continue
            key_pid = row.get(fields.problem_id) if fields.problem_id else None
            key_question = row.get(fields.question)
            if isinstance(key_question, str) and not wanted(
                key_pid if isinstance(key_pid, str) else None, key_question
            ):
                continue
            yield _validated(name, line, row, raw, fields, lenient)


def _validated(name: str, line: int, row: dict, raw: str, fields: TraceFieldMap, lenient: bool):
    values = {}
    for column in (fields.question, fields.thinking, fields.answer, fields.problem_id):
        if column is None:
            continue
        value = row.get(column)
        required = column in (fields.question, fields.thinking)
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
            if not lenient:
                raise DataFileError(f"{name}:{line}: field {column!r}: {problem}")
            return Quarantined(name, line, column, problem, raw_of(row, raw))
        values[column] = value
    thinking, answer = split_reasoning(values[fields.thinking])
    if fields.answer and values.get(fields.answer, "").strip():
        # with its own answer column, the thinking column is all reasoning even without <think> tags
        # (split_reasoning would have taken untagged text for the answer, which the column then replaced)
        if not thinking:
            thinking = values[fields.thinking].strip()
        answer = values[fields.answer].strip()
    return ImportedRow(
        name,
        line,
        values.get(fields.problem_id) if fields.problem_id else None,
        values[fields.question],
        thinking,
        answer,
    )


class ImportedTeacher:
    """Traces read from files instead of written by a model. The trace stage calls `import_batches` with the problems
    still to trace; several rows for one problem become samples 0, 1, … in file order."""

    samples = 1  # what the stage asks for: a problem is done once any row of it was imported

    def __init__(
        self,
        source: str,
        fields: TraceFieldMap = TraceFieldMap(),
        *,
        name: str | None = None,
        split: str = "train",
        lenient: bool = True,
    ) -> None:
        self.source, self.fields, self.split, self.lenient = source, fields, split, lenient
        self.identity = f"import:{name or Path(source).stem}"
        source_files(source)  # a missing file fails here, before any work

    def trace_id_for(self, problem: Problem | Gold, sample: int = 0) -> str:
        return make_trace_id(problem.problem_id, self.identity, "", {"sample": sample})

    def import_batches(self, todo: TodoProblems, batch_rows: int = 5_000) -> Iterator[TeacherResult]:
        """Traces for the `todo` problems, `batch_rows` file rows at a time; the last result's `not_covered` counts
        the problems no row matched and its `stats` hold the totals."""
        samples: Counter[str] = Counter()
        matched_rows = quarantined = 0
        batch = TeacherResult()
        for item in read_trace_rows(
            self.source,
            self.fields,
            split=self.split,
            lenient=self.lenient,
            wanted=lambda pid, question: todo.match(pid, question) is not None,
        ):
            if isinstance(item, Quarantined):
                batch.quarantined.append(item)
                quarantined += 1
            elif (problem := todo.match(item.problem_id, item.question)) is not None:
                sample = samples[problem.problem_id]
                samples[problem.problem_id] += 1
                record = {
                    "trace_id": self.trace_id_for(problem, sample),
                    "sample": sample,
                    "thinking": item.thinking,
                    "answer": item.answer,
                    "prompt_tokens": len(item.question.split()),
                    # words, as the two texts joined by a space would split (without copying a long trace to join it)
                    "completion_tokens": len(item.thinking.split()) + len(item.answer.split()),
                }
                batch.traces.append(trace_from_record(record, problem, self.identity))
                matched_rows += 1
            if len(batch.traces) + len(batch.quarantined) >= batch_rows:
                yield batch
                batch = TeacherResult()
        batch.not_covered = len(todo) - len(samples)
        batch.stats = {
            "rows_imported": matched_rows,
            "rows_quarantined": quarantined,
            "problems_matched": len(samples),
            "not_covered": batch.not_covered,
        }
        yield batch
