"""Import existing teacher traces (JSONL / Parquet files, a folder of them, a dataset saved with `save_to_disk`, or an
HF `datasets` name, streamed) instead of generating them, in any of the public shapes of `trace_formats` (`openr1`,
`s1k`, `columns`, `messages`, `sharegpt`, or `auto`: detected from the columns, and said).

Import is file-driven and streamed: the trace stage hands the importer the problems that still lack a trace from it
(`TodoProblems`, by id and by normalised question) and the importer reads the files batch by batch, keeping only
the rows that match one of them. Memory is bounded by a batch plus the table of problems still to trace, about
330 bytes per problem whatever its text (id, gold answer, question digest), never by the corpus' texts.
For Parquet, only the key column (question or problem id) is read for a row group whose rows are all already
imported, so a refresh after a new file arrives costs little more than reading that file.

Problems and gold answers come from the trace file itself when it has a gold column (`iter_trace_problems`, read by
the problems stage, split by the usual seeded group split); a separate problem file stays optional. Rows are joined
to problems by problem id (when the file carries ours) or else by the question text (whitespace- and case-
normalised), and verified against the gold answer like any teacher's; a verdict the dataset recorded is kept beside
ours and disagreements are counted. Bad rows (or one bad sample of a row) are quarantined with file, line and field
(or raise, with `lenient=False`); problems no file covers are counted as `not_covered`.
"""

from __future__ import annotations

import hashlib
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from scaffold_lib.core.files import DataFileError, raw_of
from scaffold_lib.core.ids import content_id
from scaffold_lib.data.problems import (
    Gold,
    Problem,
    Quarantined,
    SplitConfig,
    make_problem_id,
    normalise_question,
    split_of,
)
from scaffold_lib.data.teachers import TeacherResult, make_trace_id, trace_from_record
from scaffold_lib.data.trace_formats import (
    RowError,
    TraceFieldMap,
    row_gold,
    row_problem_id,
    row_question,
    row_samples,
    trace_gold,
)
from scaffold_lib.data.trace_sources import TraceSource, open_source, trace_sources


@dataclass(frozen=True)
class ImportedRow:
    source_file: str
    line: int
    problem_id: str | None
    question: str
    thinking: str
    answer: str
    verdict: bool | None = None  # the dataset's own verdict on this sample
    verdict_unreadable: bool = False
    finish_reason: str | None = None
    incomplete: bool = False


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


# --- rows ----------------------------------------------------------------------------------------------------------


def _quarantine(name: str, line: int, row: dict | None, raw: str, error: RowError, lenient: bool) -> Quarantined:
    if not lenient:
        raise DataFileError(f"{name}:{line}: field {error.field!r}: {error.error}")
    return Quarantined(name, line, error.field, error.error, error.raw or raw_of(row or {}, raw))


def _readable_rows(name: str, rows, cols, second, lenient: bool) -> Iterator[tuple | Quarantined]:
    """(line, row, raw, question, `second(row, cols)`) of each row whose question and second field (its problem id, its
    gold answer) read; a quarantined row for each that does not."""
    for line, row, raw, error in rows:
        if error is not None:
            yield _quarantine(name, line, row, raw, RowError("<row>", error), lenient)
            continue
        question, other = row_question(row, cols), second(row, cols)
        bad = next((v for v in (question, other) if isinstance(v, RowError)), None)
        if bad is not None:
            yield _quarantine(name, line, row, raw, bad, lenient)
            continue
        yield line, row, raw, question, other


def read_trace_rows(
    source: str,
    fields: TraceFieldMap = TraceFieldMap(),
    *,
    format: str = "auto",
    split: str = "train",
    lenient: bool = True,
    wanted=None,
    chosen: dict[str, str] | None = None,
) -> Iterator[ImportedRow | Quarantined]:
    """A valid row per sample and quarantined rows (or samples), streamed file by file. `wanted(problem_id,
    question)` (default: all) lets a reader skip rows for problems nobody asks about before validating their traces
    (Parquet: before reading them). `chosen` receives each source's format (`openr1 (auto)`)."""
    wanted = wanted or (lambda problem_id, question: True)
    for src in trace_sources(source):
        cols, rows = open_source(src, format, fields, split, wanted=wanted)
        if chosen is not None:
            chosen[src.name] = cols.label
        for read in _readable_rows(src.name, rows, cols, row_problem_id, lenient):
            if isinstance(read, Quarantined):
                yield read
                continue
            line, row, raw, question, problem_id = read
            if not wanted(problem_id, question):
                continue
            samples = row_samples(row, cols)
            if isinstance(samples, RowError):
                yield _quarantine(src.name, line, row, raw, samples, lenient)
                continue
            for s in samples:
                if isinstance(s, RowError):
                    yield _quarantine(src.name, line, row, raw, s, lenient)
                else:
                    yield ImportedRow(
                        src.name,
                        line,
                        problem_id,
                        question,
                        s.thinking,
                        s.answer,
                        s.verdict,
                        s.verdict_unreadable,
                        s.finish_reason,
                        s.incomplete,
                    )


def iter_trace_problems(
    src: TraceSource,
    fields: TraceFieldMap = TraceFieldMap(),
    *,
    format: str = "auto",
    split: SplitConfig = SplitConfig(),
    hf_split: str = "train",
    lenient: bool = True,
    info: dict | None = None,
) -> Iterator[Problem | Quarantined]:
    """The problems of a trace source that has a gold-answer column: question and gold from each row, grouped by
    question and split by the seeded group split, ids content hashes as for problem files (a problem answered by
    several rows or generations is one problem, repeated). `info` receives the format and the gold column. A source
    without a gold column, or whose rows carry our problem ids, gives none (its traces join problems from files)."""
    cols, rows = open_source(src, format, fields, hf_split, problems_only=True)
    if info is not None:
        info.update(format=cols.label, gold_column=cols.gold)
    if cols.gold is None or cols.problem_id is not None:
        return
    for read in _readable_rows(src.name, rows, cols, row_gold, lenient):
        if isinstance(read, Quarantined):
            yield read
            continue
        *_, question, gold = read
        answer, answer_type = trace_gold(gold)
        group_id = content_id("question", normalise_question(question))  # as a problem file without a group column
        yield Problem(
            make_problem_id(question, answer),
            src.label,
            split_of(group_id, split),
            question.strip(),
            answer,
            answer_type,
            group_id,
        )


# --- the teacher ---------------------------------------------------------------------------------------------------


class ImportedTeacher:
    """Traces read from files instead of written by a model. The trace stage calls `import_batches` with the problems
    still to trace; several rows (or generations) for one problem become samples 0, 1, … in file order."""

    samples = 1  # what the stage asks for: a problem is done once any row of it was imported

    def __init__(
        self,
        source: str,
        fields: TraceFieldMap = TraceFieldMap(),
        *,
        name: str | None = None,
        split: str = "train",
        lenient: bool = True,
        format: str = "auto",
    ) -> None:
        self.source, self.fields, self.split, self.lenient, self.format = source, fields, split, lenient, format
        self.identity = f"import:{name or Path(source).stem}"
        trace_sources(source)  # a missing file fails here, before any work

    def trace_id_for(self, problem: Problem | Gold, sample: int = 0) -> str:
        return make_trace_id(problem.problem_id, self.identity, "", {"sample": sample})

    def import_batches(self, todo: TodoProblems, batch_rows: int = 5_000) -> Iterator[TeacherResult]:
        """Traces for the `todo` problems, `batch_rows` file rows at a time; the last result's `not_covered` counts
        the problems no row matched and its `stats` hold the totals."""
        samples: Counter[str] = Counter()
        counts: Counter[str] = Counter()
        chosen: dict[str, str] = {}
        batch = TeacherResult()
        for item in read_trace_rows(
            self.source,
            self.fields,
            format=self.format,
            split=self.split,
            lenient=self.lenient,
            wanted=lambda pid, question: todo.match(pid, question) is not None,
            chosen=chosen,
        ):
            if isinstance(item, Quarantined):
                batch.quarantined.append(item)
                counts["rows_quarantined"] += 1
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
                    "finish_reason": item.finish_reason,
                    "recorded_correct": item.verdict,
                }
                trace = trace_from_record(record, problem, self.identity)
                batch.traces.append(trace)
                counts["rows_imported"] += 1
                counts["verdicts_recorded"] += item.verdict is not None
                # the dataset's grader and ours read the same answer differently: counted, both kept
                counts["verdict_disagreements"] += item.verdict is not None and item.verdict != trace.is_correct
                counts["verdicts_unreadable"] += item.verdict_unreadable
                counts["incomplete_reasoning"] += item.incomplete
            if len(batch.traces) + len(batch.quarantined) >= batch_rows:
                yield batch
                batch = TeacherResult()
        batch.not_covered = len(todo) - len(samples)
        formats = sorted(set(chosen.values()))
        batch.stats = {
            "rows_imported": counts["rows_imported"],
            "rows_quarantined": counts["rows_quarantined"],
            "problems_matched": len(samples),
            "not_covered": batch.not_covered,
            "import_format": formats[0] if len(formats) == 1 else "; ".join(f"{k}: {v}" for k, v in chosen.items()),
            **{k: counts[k] for k in ("verdicts_recorded", "verdict_disagreements") if counts["verdicts_recorded"]},
            **{k: counts[k] for k in ("verdicts_unreadable", "incomplete_reasoning") if counts[k]},
        }
        yield batch
