"""Segmentation: a trace is cut into steps. Purely structural, chosen per teacher or source and recorded with the steps.

- `blank_line`: at blank lines, as the paper does for R1-style traces (short paragraphs);
- `line`: at every line break, for worked solutions in the GSM8K style (one step a line);
- `auto`: `blank_line` when the trace has a blank line, else `line`.

Robust to CRLF, runs of blank lines and stray whitespace; never yields an empty step; keeps a fenced code block (```)
or display maths ($$ … $$, \\[ … \\]) inside one step even when it contains blank lines or line breaks.
"""

from __future__ import annotations

import os
import re
import threading
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from scaffold_lib.core.ids import step_id
from scaffold_lib.data.config import SEGMENTERS, SegmentationConfig

if TYPE_CHECKING:
    import duckdb


_BLANK = re.compile(r"\n[ \t\f\v]*(?:\n[ \t\f\v]*)+")
_LINE = re.compile(r"\n")
_HAS_BLANK = re.compile(r"\n[ \t\f\v]*\n")
_OPENERS = ("```", "$$", "\\[")


def clean(trace: str) -> str:
    if "\r" in trace:
        trace = trace.replace("\r\n", "\n").replace("\r", "\n")
    if "\x00" in trace:
        trace = trace.replace("\x00", "")
    return trace


def resolve(trace: str, segmenter: str = "blank_line") -> str:
    """The concrete segmenter (`auto` decided by the trace)."""
    if segmenter not in SEGMENTERS:
        raise ValueError(f"unknown segmenter {segmenter!r}; choose one of {SEGMENTERS}")
    if segmenter == "auto":
        return "blank_line" if _HAS_BLANK.search(trace.strip()) else "line"
    return segmenter


def segment(trace: str, segmenter: str = "blank_line") -> list[str]:
    """Split a trace into its steps. Never raises on a str; returns [] for an empty trace."""
    trace = clean(trace)
    style = resolve(trace, segmenter)
    parts = (_BLANK if style == "blank_line" else _LINE).split(trace)
    if any(o in trace for o in _OPENERS):
        parts = _rejoin_blocks(parts, "\n\n" if style == "blank_line" else "\n")
    return [p for p in (part.strip() for part in parts) if p]


def _rejoin_blocks(parts: list[str], joiner: str) -> list[str]:
    out: list[str] = []
    buffer: list[str] = []
    in_fence = in_dollars = False
    bracket_depth = 0
    for part in parts:
        buffer.append(part)
        in_fence ^= part.count("```") % 2 == 1
        in_dollars ^= part.count("$$") % 2 == 1
        bracket_depth = max(0, bracket_depth + part.count("\\[") - part.count("\\]"))
        if not (in_fence or in_dollars or bracket_depth):
            out.append(joiner.join(buffer))
            buffer = []
    if buffer:  # an unclosed block runs to the end of the trace: keep it as one step
        out.append(joiner.join(buffer))
    return out


# --- the same segmentation over a batch of traces, vectorised ----------------------------------------------------
# `segment` is the rule; `segment_batch` runs it as one DuckDB query over an Arrow batch (millions of steps a minute
# instead of a Python call per trace) and hands the traces it cannot do exactly in SQL — a block opener (```, $$, \[)
# or a NUL in the text or the answer — to `segment`. tests/test_segmentation.py checks the two agree.

# what str.strip() strips: every character with str.isspace() (tests/test_segmentation.py recomputes it)
PY_WHITESPACE = "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
_SQL_BLANK = r"\n[ \t\f\v]*(?:\n[ \t\f\v]*)+"  # _BLANK, in RE2 (same semantics for this pattern)
_SEGMENT_SQL = """
WITH cleaned AS (
  SELECT row, trace_id, requested,
         replace(replace(text, chr(13) || chr(10), chr(10)), chr(13), chr(10)) AS text,
         replace(replace(answer_text, chr(13) || chr(10), chr(10)), chr(13), chr(10)) AS answer_text
  FROM traces WHERE NOT needs_python(text, answer_text)
), blank AS (
  SELECT row, trace_id, requested, text, blank_parts(text) AS parts,
         array_to_string(blank_parts(answer_text), chr(10)) AS answer
  FROM cleaned
), styled AS (
  -- `auto`: blank_line when the stripped trace has a blank line, i.e. when the blank-line split has two non-empty
  -- steps or more
  SELECT row, trace_id, answer, parts, CASE WHEN requested = 'auto'
         THEN CASE WHEN len(parts) >= 2 THEN 'blank_line' ELSE 'line' END ELSE requested END AS segmenter, text
  FROM blank
), steps AS (
  SELECT row, trace_id, segmenter, CASE WHEN segmenter = 'blank_line' THEN parts
         ELSE list_filter(list_transform(string_split(text, chr(10)), lambda p: py_strip(p)), lambda p: p <> '') END AS steps,
         answer
  FROM styled
), answered AS (
  SELECT row, trace_id, segmenter,
         CASE WHEN len(steps) > 0 AND coalesce(answer, '') <> '' THEN list_append(steps, answer) ELSE steps END AS steps
  FROM steps
), flat AS (
  SELECT row, trace_id, segmenter, unnest(steps) AS text, generate_subscripts(steps, 1) - 1 AS idx FROM answered
)
SELECT row, left(sha256('step' || chr(31) || trace_id || chr(31) || idx::VARCHAR || chr(31) || text), 16) AS step_id,
       trace_id, idx::INTEGER AS idx, text, segmenter
FROM flat
"""


def _sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


_KERNELS = threading.local()


def _kernel() -> duckdb.DuckDBPyConnection:
    """This thread's in-memory DuckDB connection with the macros of `_SEGMENT_SQL`, made once per thread and process
    (making one cost 20 ms, a second per million steps). It holds one batch's steps: a memory limit keeps it from
    taking DuckDB's default of 80 % of the RAM beside the warehouse's own budget."""
    if getattr(_KERNELS, "pid", None) != os.getpid():
        _KERNELS.con, _KERNELS.pid = _new_kernel(), os.getpid()
    return _KERNELS.con


def _new_kernel() -> duckdb.DuckDBPyConnection:
    import duckdb  # here, not at the top: the GPU machine's device check segments traces without duckdb

    con = duckdb.connect(config={"memory_limit": "1GB"})
    ws = _sql_literal(PY_WHITESPACE)
    # str.strip(): the common case (printable ASCII at both ends) needs no work, and trim() with a set of characters
    # is slow enough to matter
    con.execute(
        "CREATE MACRO py_strip(p) AS CASE WHEN ascii(p) BETWEEN 33 AND 126 AND ascii(right(p, 1)) BETWEEN 33 AND 126 "
        f"THEN p ELSE trim(p, {ws}) END"
    )
    con.execute(
        f"CREATE MACRO blank_parts(t) AS list_filter(list_transform(regexp_split_to_array(t, {_sql_literal(_SQL_BLANK)}),"
        " lambda p: py_strip(p)), lambda p: p <> '')"
    )
    # what `segment` rejoins (a block opener) or cleans (a NUL) is left to it
    markers = " OR ".join(f"contains({{c}}, {_sql_literal(m)})" for m in _OPENERS) + " OR contains({c}, chr(0))"
    con.execute(
        f"CREATE MACRO needs_python(t, a) AS {markers.format(c='t')} OR coalesce({markers.format(c='a')}, false)"
    )
    return con


# Below this mean trace length a batch is cut in Python: DuckDB's cost is per step (list functions, hashing), Python's
# grows with the text, and short traces have many short steps. Measured (docs/benchmarks.md): 350-character traces
# of ~40-character steps cut 2x faster in Python, 12,800-character R1-length traces 1.7x faster in SQL.
SQL_MIN_MEAN_TRACE_CHARS = 2_000


def segment_batch(traces: pa.Table, cfg: SegmentationConfig = SegmentationConfig()) -> pa.Table:
    """Steps of a batch of traces as an Arrow table (step_id, trace_id, idx, text, segmenter), in trace order, exactly
    as `segment` cuts them (plus the answer as one last step when `answer_text` is given, as the trace stage does).

    `traces` is an Arrow table with `trace_id` and `text`, optionally `teacher` (for `cfg.per_teacher`) and
    `answer_text`. A trace with no step has no row."""
    n = traces.num_rows
    text = traces.column("text")
    answer = traces.column("answer_text") if "answer_text" in traces.column_names else pa.nulls(n, pa.string())
    teachers = traces.column("teacher").to_pylist() if "teacher" in traces.column_names else [""] * n
    requested = [cfg.for_teacher(t) for t in teachers]
    unknown = set(requested) - set(SEGMENTERS)
    if unknown:
        raise ValueError(f"unknown segmenter {sorted(unknown)[0]!r}; choose one of {SEGMENTERS}")
    schema = pa.schema(
        [("row", pa.int64()), ("step_id", pa.string()), ("trace_id", pa.string()), ("idx", pa.int32()),
         ("text", pa.string()), ("segmenter", pa.string())]
    )  # fmt: skip
    if n and pc.sum(pc.utf8_length(text)).as_py() / n < SQL_MIN_MEAN_TRACE_CHARS:  # measured in Arrow, not copied
        steps, in_python = schema.empty_table(), range(n)
    else:
        con = _kernel()
        con.register(
            "traces",
            pa.table(
                {
                    "row": pa.array(range(n), pa.int64()),
                    "trace_id": traces.column("trace_id"),
                    "requested": pa.array(requested, pa.string()),
                    "text": text,
                    "answer_text": answer,
                }
            ),
        )
        try:
            steps = _in_trace_order(con.sql(_SEGMENT_SQL).to_arrow_table().cast(schema))
            in_python = [
                r for (r,) in con.sql("SELECT row FROM traces WHERE needs_python(text, answer_text)").fetchall()
            ]
        finally:
            con.unregister("traces")
    if in_python:
        columns: dict[str, list] = {name: [] for name in schema.names}
        ids, texts, answers = traces.column("trace_id").to_pylist(), text.to_pylist(), answer.to_pylist()
        for r in in_python:
            style = resolve(clean(texts[r]), requested[r])
            cut = segment(texts[r], style)
            if cut and answers[r] and answers[r].strip():
                cut.append("\n".join(segment(answers[r])))
            columns["row"] += [r] * len(cut)
            columns["step_id"] += [step_id(ids[r], i, s) for i, s in enumerate(cut)]
            columns["trace_id"] += [ids[r]] * len(cut)
            columns["idx"] += range(len(cut))
            columns["text"] += cut
            columns["segmenter"] += [style] * len(cut)
        steps = pa.concat_tables([steps, pa.table(columns, schema=schema)])
        if len(in_python) < n:  # merged: back into trace order
            steps = steps.sort_by([("row", "ascending"), ("idx", "ascending")])
    return steps.drop_columns(["row"])


def _in_trace_order(steps: pa.Table) -> pa.Table:
    """Steps ordered by (trace, index). DuckDB keeps a query's insertion order, so the kernel has no ORDER BY (sorting
    a batch's text cost a fifth of the kernel); this checks the order, cheaply, and sorts only if it was not kept."""
    row, idx = steps.column("row").to_numpy(), steps.column("idx").to_numpy()
    step_row, step_idx = np.diff(row), np.diff(idx)
    if np.all((step_row > 0) | ((step_row == 0) & (step_idx > 0))):
        return steps
    return steps.sort_by([("row", "ascending"), ("idx", "ascending")])
