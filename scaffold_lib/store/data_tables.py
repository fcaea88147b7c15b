"""The queries of the data tables (problems, teacher traces, steps, labels, quarantine, source files, contamination):
what the data stages read back, what their reports count and what the quality checks measure. Values always go in as
parameters; the SQL text is written here and nowhere else in the data layer."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa

    from scaffold_lib.store.warehouse import Warehouse

PROBLEM_COLUMNS = "p.problem_id, p.source, p.split, p.question, p.answer, p.answer_type, p.group_id, p.solution"

# --- problems -------------------------------------------------------------------------------------------------------


def file_loaded(wh: Warehouse, file_key: str) -> bool:
    """Whether a source file was read whole under this key (where it is, its size and time, how it was read)."""
    return wh.scalar("SELECT count(*) FROM source_files WHERE file_key = ?", [file_key]) > 0


def split_sizes(wh: Warehouse) -> dict[str, int]:
    return {r["split"]: r["n"] for r in wh.query("SELECT split, count(*) AS n FROM problems GROUP BY split")}


def splits_present(wh: Warehouse) -> set[str]:
    return {r["split"] for r in wh.query("SELECT DISTINCT split FROM problems")}


def groups_shared_between_splits(wh: Warehouse, tested: Sequence[str]) -> dict[str, int]:
    """Groups found in more than one split, by pair of splits; two splits both in `tested` may share groups."""
    rows = wh.query(
        """
        SELECT a.split || '/' || b.split AS pair, count(DISTINCT a.group_id) AS n
        FROM problems a JOIN problems b ON a.group_id = b.group_id AND a.split < b.split
        WHERE a.group_id IS NOT NULL AND NOT (list_contains(?, a.split) AND list_contains(?, b.split))
        GROUP BY ALL""",
        [list(tested), list(tested)],
    )
    return {r["pair"]: r["n"] for r in rows}


def problems_by_source(wh: Warehouse) -> list[dict]:
    """Problems by source and split: `source`, `split`, `n`."""
    return wh.query("SELECT source, split, count(*) AS n FROM problems GROUP BY ALL ORDER BY ALL")


def first_problems(wh: Warehouse, n: int) -> list[dict]:
    """The first `n` problems by id (a hash order: a fair sample), their question and answer."""
    return wh.query("SELECT question, answer FROM problems ORDER BY problem_id LIMIT ?", [n])


def problems_in_splits(wh: Warehouse, splits: Sequence[str]) -> int:
    return wh.scalar("SELECT count(*) FROM problems WHERE list_contains(?, split)", [list(splits)])


def stream_problems(wh: Warehouse, splits: Sequence[str], batch_rows: int) -> Iterator[list[dict]]:
    """Every problem of `splits` (all its columns) in problem-id order, `batch_rows` at a time."""
    return wh.stream(
        f"SELECT {PROBLEM_COLUMNS} FROM problems p WHERE list_contains(?, p.split) ORDER BY p.problem_id",
        [list(splits)],
        batch_rows=batch_rows,
    )


def problems_of_split(wh: Warehouse, split: str) -> list[dict]:
    """The problems of one split (question, gold answer and its type) in problem-id order."""
    return wh.query(
        "SELECT problem_id, question, answer, answer_type FROM problems WHERE split = ? ORDER BY problem_id", [split]
    )


def questions_of_splits(wh: Warehouse, splits: Sequence[str]) -> list[dict]:
    return wh.query(
        "SELECT problem_id, question FROM problems WHERE list_contains(?, split) ORDER BY problem_id", [list(splits)]
    )


# --- teacher traces -------------------------------------------------------------------------------------------------


def teacher_summary(wh: Warehouse, identities: Sequence[str]) -> dict:
    """Traces written under these teacher identities: how many (`n`), the share correct (`acc`) and their mean
    completion tokens (`toks`), both None when there is none."""
    return wh.query(
        "SELECT count(*) AS n, avg(is_correct::INT) AS acc, avg(completion_tokens) AS toks "
        "FROM teacher_traces WHERE list_contains(?, teacher)",
        [list(identities)],
    )[0]


# --- segmented steps ------------------------------------------------------------------------------------------------

# traces with no step yet that segmentation has not quarantined either
_UNSEGMENTED = """
    FROM teacher_traces t
    ANTI JOIN (SELECT DISTINCT trace_id FROM segmented_steps) s USING (trace_id)
    ANTI JOIN quarantine q ON q.stage = 'segmented_steps' AND q.source_file = t.trace_id"""


def unsegmented_traces(wh: Warehouse) -> int:
    return wh.scalar(f"SELECT count(*) {_UNSEGMENTED}")


def stream_unsegmented_traces(wh: Warehouse, batch_rows: int) -> Iterator[pa.Table]:
    """The traces still to segment (id, teacher, text, answer text), as Arrow batches of `batch_rows`."""
    return wh.stream_arrow(f"SELECT t.trace_id, t.teacher, t.text, t.answer_text {_UNSEGMENTED}", batch_rows=batch_rows)


def segmented_totals(wh: Warehouse) -> tuple[int, int]:
    """(steps, traces with steps)."""
    return (
        wh.scalar("SELECT count(*) FROM segmented_steps"),
        wh.scalar("SELECT count(DISTINCT trace_id) FROM segmented_steps"),
    )


# --- signal labels --------------------------------------------------------------------------------------------------


def unlabelled_steps(wh: Warehouse, labelling_key: str) -> tuple[int, int | None]:
    """(steps without a label under this labelling key, the first row that holds one). Step ids only, no text: steps
    are only ever appended, so a refresh's pending steps lie in the last row groups, and their text is read from that
    row on (reading every step's text to keep 1 % of them took 7 of a refresh's 8.8 s of labelling at 6.5 M steps)."""
    total, first_row = wh.query(
        """SELECT count(*) AS n, min(s.rowid) AS first_row FROM segmented_steps s
        ANTI JOIN (SELECT step_id FROM signal_labels WHERE labelling_key = $key) USING (step_id)""",
        {"key": labelling_key},
    )[0].values()
    return total, first_row


def stream_unlabelled_steps(wh: Warehouse, labelling_key: str, first_row: int, batch_rows: int) -> Iterator[pa.Table]:
    """The steps to label from row `first_row` on (id, text, whether it is its trace's last, whether it has a label
    under another key), as Arrow batches. A trace's last step is its last index over all its rows, some of which may
    lie before `first_row`."""
    return wh.stream_arrow(
        """SELECT s.step_id, s.text, s.idx = m.last_idx AS is_final, l.step_id IS NOT NULL AS relabel
        FROM (SELECT * FROM segmented_steps WHERE rowid >= $first_row) s
        JOIN (SELECT trace_id, max(idx) AS last_idx FROM segmented_steps
              WHERE trace_id IN (SELECT trace_id FROM segmented_steps WHERE rowid >= $first_row) GROUP BY trace_id) m
             USING (trace_id)
        LEFT JOIN signal_labels l USING (step_id)
        WHERE l.step_id IS NULL OR l.labelling_key IS DISTINCT FROM $key""",
        {"key": labelling_key, "first_row": first_row},
        batch_rows=batch_rows,
    )


def labels_by(wh: Warehouse, labellers: Sequence[str]) -> list[dict]:
    """Labels written by these labellers, with their step's text, in step-id order."""
    return wh.query(
        """
        SELECT l.step_id, s.text, l.labeller, l.keyword, l.keyword_signal, l.signal, l.labelling_key
        FROM signal_labels l JOIN segmented_steps s USING (step_id)
        WHERE list_contains(?, l.labeller) ORDER BY l.step_id""",
        [list(labellers)],
    )


def cached_verdicts(wh: Warehouse, cache_keys: Sequence[str]) -> list[dict]:
    return wh.query(
        "SELECT cache_key, signal, reply, attempts FROM llm_label_cache WHERE list_contains(?, cache_key)",
        [list(cache_keys)],
    )


def label_counts(wh: Warehouse) -> list[dict]:
    """Labels by (signal, labeller): `signal`, `labeller`, `n`."""
    return wh.query("SELECT signal, labeller, count(*) AS n FROM signal_labels GROUP BY ALL")


def coverage_by_source(wh: Warehouse, keyword: Sequence[str], rules: Sequence[str], fallback: str) -> list[dict]:
    """Per problem source, the shares of steps labelled by a keyword (`keyword` labellers), by a keyword or a pattern
    (`rules`) and by the fallback."""
    return wh.query(
        """
        SELECT p.source, avg(list_contains(?, l.labeller)::INT) AS keyword,
               avg(list_contains(?, l.labeller)::INT) AS rules,
               avg((l.labeller = ?)::INT) AS fallback
        FROM signal_labels l JOIN segmented_steps s USING (step_id) JOIN teacher_traces t USING (trace_id)
        JOIN problems p USING (problem_id) GROUP BY p.source ORDER BY p.source""",
        [list(keyword), list(rules), fallback],
    )


# --- what the quality checks measure --------------------------------------------------------------------------------


def quarantined(wh: Warehouse, stage: str) -> int:
    return wh.scalar("SELECT count(*) FROM quarantine WHERE stage = ?", [stage])


def teacher_accuracy(wh: Warehouse) -> float:
    return float(wh.scalar("SELECT coalesce(avg(is_correct::INT), 0) FROM teacher_traces"))


def empty_steps(wh: Warehouse) -> int:
    # DuckDB's trim() strips spaces only: a step of newlines/tabs must count as empty too
    return wh.scalar(r"SELECT count(*) FROM segmented_steps WHERE regexp_full_match(text, '[\s\p{Z}]*')")


def step_key_violations(wh: Warehouse) -> dict[str, int]:
    """Duplicate step ids, duplicate labels and labels without a step: the step tables have no unique index."""
    return {
        "duplicate_step_ids": wh.scalar("SELECT count(*) - count(DISTINCT step_id) FROM segmented_steps"),
        "duplicate_labels": wh.scalar("SELECT count(*) - count(DISTINCT step_id) FROM signal_labels"),
        "labels_without_step": wh.scalar(
            "SELECT count(*) FROM signal_labels ANTI JOIN segmented_steps USING (step_id)"
        ),
    }
