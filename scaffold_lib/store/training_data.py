"""The training data as the warehouse gives it: complete traces (every step labelled) with their question, steps and
signals, streamed in windows that bound memory whatever the corpus; and the manifests and shards packing wrote.

No query sorts the corpus: one plans parts of about `READ_PART_CHARS` characters (consecutive trace ids, sized per
trace), then one query per part reads its steps in (trace, index) order, so DuckDB sorts one part and Python holds one
window (`PACK_WINDOW_CHARS`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import duckdb

    from scaffold_lib.store.warehouse import Warehouse

# characters of steps tokenised and packed together (about 2 M tokens): best-fit decreasing over a window fills rows
# nearly as well as over everything, and memory stays bounded whatever the corpus
PACK_WINDOW_CHARS = 8_000_000
# characters of steps (and of their traces' questions and answers) one query reads and sorts: DuckDB's work per query
# is bounded by this, not by the corpus
READ_PART_CHARS = 64_000_000


def eligible_traces_sql(drop_contaminated: bool) -> str:
    """SQL for the ids of complete traces (every step labelled) of the splits in `?` (correct ones unless the second
    parameter is true), optionally limited to the problems in the third and without decontaminated problems."""
    contamination = (
        "AND NOT EXISTS (SELECT 1 FROM contamination c WHERE c.problem_id = t.problem_id AND c.action = 'exclude')"
        if drop_contaminated
        else ""
    )
    return f"""
        SELECT t.trace_id FROM teacher_traces t JOIN problems p USING (problem_id)
        WHERE list_contains(?, p.split) AND (t.is_correct OR ?)
          AND (?::VARCHAR[] IS NULL OR list_contains(?::VARCHAR[], p.problem_id)) {contamination}
          AND t.trace_id IN (
              SELECT s.trace_id FROM segmented_steps s LEFT JOIN signal_labels l USING (step_id)
              GROUP BY s.trace_id HAVING count(*) = count(l.step_id))"""


def unlabelled_traces(wh: Warehouse, splits: Sequence[str], include_incorrect: bool) -> int:
    return wh.scalar(
        """
        SELECT count(DISTINCT s.trace_id) FROM segmented_steps s LEFT JOIN signal_labels l USING (step_id)
        JOIN teacher_traces t USING (trace_id) JOIN problems p USING (problem_id)
        WHERE l.step_id IS NULL AND list_contains(?, p.split) AND (t.is_correct OR ?)""",
        [list(splits), include_incorrect],
    )


def stream_training_traces(
    wh: Warehouse,
    splits: Sequence[str] = ("train",),
    include_incorrect: bool = False,
    only_problems: Sequence[str] | None = None,
    drop_contaminated: bool = False,
    packed_in: str | None = None,
    window_chars: int = PACK_WINDOW_CHARS,
    part_chars: int = READ_PART_CHARS,
) -> Iterator[list[dict]]:
    """Complete traces with question, ordered steps and signals, in trace-id order, in windows of about
    `window_chars` characters of steps. With `drop_contaminated`, problems decontamination marked for exclusion are
    left out; traces already in the shards of manifest `packed_in` are left out.

    No query sorts the corpus: one plans parts of about `part_chars` characters (consecutive trace ids, sized per
    trace), then one query per part reads its steps in (trace, index) order, so DuckDB sorts one part and Python holds
    one window, whatever the corpus' size."""
    # the plan is a temp table of this call's own cursor (DuckDB keeps temp tables per cursor): calls may interleave
    with wh.session(), wh.connect() as con:
        con.execute(
            f"""
            CREATE OR REPLACE TEMP TABLE training_plan AS
            WITH wanted AS (
                SELECT trace_id FROM ({eligible_traces_sql(drop_contaminated)})
                WHERE trace_id NOT IN (SELECT m.trace_id FROM manifest_shards ms JOIN shard_members m USING (shard_id)
                                       WHERE ms.manifest_hash = ?)),
            sized AS (
                SELECT s.trace_id, s.chars + length(p.question) + length(p.answer) AS chars
                FROM (SELECT trace_id, sum(length(text)) AS chars FROM segmented_steps SEMI JOIN wanted USING (trace_id)
                      GROUP BY trace_id) s
                JOIN teacher_traces t USING (trace_id) JOIN problems p USING (problem_id))
            SELECT trace_id, (sum(chars) OVER (ORDER BY trace_id ROWS UNBOUNDED PRECEDING) - chars) // ? AS part
            FROM sized""",
            [list(splits), include_incorrect, only_problems, only_problems, packed_in or "", max(part_chars, 1)],
        )
        try:
            yield from _windows(_planned_steps(con), window_chars)
        finally:
            con.execute("DROP TABLE IF EXISTS training_plan")


def _planned_steps(con: duckdb.DuckDBPyConnection) -> Iterator[tuple[dict, str, str]]:
    """(the trace's fields, step text, signal) for every step of the traces in `training_plan`, in (trace, index)
    order, a part a query. A trace's fields (its question: often longer than all its steps) are read once per trace,
    not on every step row, so a part's query sorts steps alone and the plan's part size is what DuckDB holds."""
    for (part,) in con.execute("SELECT DISTINCT part FROM training_plan ORDER BY part").fetchall():
        traces = con.execute(
            """SELECT t.trace_id, p.problem_id, p.question, p.answer, p.answer_type, t.is_correct
            FROM training_plan w JOIN teacher_traces t USING (trace_id) JOIN problems p USING (problem_id)
            WHERE w.part = ?""",
            [part],
        )
        names = [d[0] for d in traces.description]
        fields = {r[0]: dict(zip(names, r)) for r in traces.fetchall()}
        reader = con.sql(
            """
            SELECT s.trace_id, s.text, l.signal
            FROM training_plan w JOIN segmented_steps s USING (trace_id) JOIN signal_labels l USING (step_id)
            WHERE w.part = ? ORDER BY s.trace_id, s.idx""",
            params=[part],
        ).to_arrow_reader(8_192)
        for batch in reader:
            columns = (batch.column(c).to_pylist() for c in ("trace_id", "text", "signal"))
            for trace_id, text, signal in zip(*columns):
                yield fields[trace_id], text, signal


def _windows(steps: Iterator[tuple[dict, str, str]], window_chars: int) -> Iterator[list[dict]]:
    """Steps grouped into traces ({trace fields, steps, signals}), yielded in windows of whole traces of at least
    `window_chars` characters of steps (the last may be smaller)."""
    window: list[dict] = []
    chars = 0
    current: dict | None = None
    for fields, text, signal in steps:
        if current is None or fields["trace_id"] != current["trace_id"]:
            if current is not None and chars >= window_chars:
                yield window
                window, chars = [], 0
            current = {**fields, "steps": [], "signals": []}
            window.append(current)
        current["steps"].append(text)
        current["signals"].append(signal)
        chars += len(text)
    if window:
        yield window


def training_traces(
    wh: Warehouse,
    splits: Sequence[str] = ("train",),
    include_incorrect: bool = False,
    only_problems: Sequence[str] | None = None,
    drop_contaminated: bool = False,
) -> tuple[list[dict], int]:
    """(complete traces with question, ordered steps and signals; count of traces skipped because a step has no
    label), all in memory: for held-out sets and tests. The pack stage streams instead."""
    traces = [
        t
        for batch in stream_training_traces(wh, splits, include_incorrect, only_problems, drop_contaminated)
        for t in batch
    ]
    return traces, unlabelled_traces(wh, splits, include_incorrect)


def previous_manifests(wh: Warehouse, pack_keys: dict[str, str], eligible: str, params: list) -> dict[str, dict]:
    """The latest manifest of each arm's `pack_key` (two arms), when both exist, hold the same traces and every one of
    those is still eligible (`eligible`: `eligible_traces_sql` with its `params`): new traces can then be appended as new
    shards. Otherwise {} (a full repack)."""
    latest = {}
    for kind, key in pack_keys.items():
        rows = wh.query(
            "SELECT * FROM manifests WHERE pack_key = ? ORDER BY created_at DESC, manifest_hash LIMIT 1", [key]
        )
        if not rows:
            return {}
        latest[kind] = rows[0]
    members = (
        "SELECT m.trace_id FROM manifest_shards ms JOIN shard_members m USING (shard_id) WHERE ms.manifest_hash = ?"
    )
    a, b = (m["manifest_hash"] for m in latest.values())
    differ = wh.scalar(
        f"SELECT count(*) FROM (({members} EXCEPT {members}) UNION ALL ({members} EXCEPT {members}))", [a, b, b, a]
    )
    stale = wh.scalar(f"SELECT count(*) FROM ({members}) WHERE trace_id NOT IN ({eligible})", [a, *params])
    return latest if differ == 0 and stale == 0 else {}


def eligible_count(wh: Warehouse, eligible: str, params: list) -> int:
    return wh.scalar(f"SELECT count(*) FROM ({eligible})", params)


def excluded_training_problems(wh: Warehouse) -> int:
    """Training problems decontamination left out (they overlap a benchmark)."""
    return wh.scalar(
        "SELECT count(DISTINCT c.problem_id) FROM contamination c JOIN problems p USING (problem_id) "
        "WHERE c.action = 'exclude' AND p.split = 'train'"
    )


def manifest_shard_ids(wh: Warehouse, manifest_hash: str) -> list[str]:
    return [
        r["shard_id"] for r in wh.query("SELECT shard_id FROM manifest_shards WHERE manifest_hash = ?", [manifest_hash])
    ]


def manifest_totals(wh: Warehouse, manifest_hash: str) -> dict:
    """Rows and tokens over every shard of a manifest."""
    return wh.query(
        "SELECT sum(s.n_rows) AS rows, sum(s.tokens) AS tokens "
        "FROM manifest_shards ms JOIN shards s USING (shard_id) WHERE ms.manifest_hash = ?",
        [manifest_hash],
    )[0]


def shard_paths(wh: Warehouse, manifest_hash: str) -> list[str]:
    """Where the shards written with a manifest are (not those it took over from the one it appended to)."""
    return [r["path"] for r in wh.query("SELECT path FROM shards WHERE manifest_hash = ?", [manifest_hash])]


def shards_of_manifest(wh: Warehouse, manifest_hash: str) -> list[dict]:
    """The shards of a manifest: those it was written with and those it took over from the one it appended to."""
    return wh.query(
        """
        SELECT * FROM shards WHERE manifest_hash = ?
           OR shard_id IN (SELECT shard_id FROM manifest_shards WHERE manifest_hash = ?)
        ORDER BY path""",
        [manifest_hash, manifest_hash],
    )
