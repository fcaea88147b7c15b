"""The segmentation stage: every trace without steps yet is cut into steps by its teacher's segmenter (recorded on
each step), streamed in batches of traces and written in inserts of whole row groups that end where a trace starts;
a trace with no step is quarantined, not dropped.
"""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from scaffold_lib.core.errors import StageFailed
from scaffold_lib.data.config import SegmentationConfig
from scaffold_lib.data.problems import Quarantined, quarantine_rows
from scaffold_lib.data.segmentation import segment_batch
from scaffold_lib.store import data_tables
from scaffold_lib.store.handles import StageReport
from scaffold_lib.store.store import Store
from scaffold_lib.store.warehouse import ROW_GROUP_ROWS, WRITE_ROWS
from scaffold_lib.store.writing import BehindWriter, in_session


def trace_start(idx: pa.ChunkedArray, at: int) -> int:
    """The first row at or after `at` where a trace's steps begin (the number of rows when none does). Each write of
    steps ends there, so it holds whole traces: a trace whose steps were split over two writes, with a kill between
    them, would count as segmented (the pending query is per trace) and lose its last steps. The end of the cut
    trace, a few dozen rows, goes through the write-ahead log with the write."""
    first = pc.index(idx.slice(at), 0).as_py()
    return at + first if first >= 0 else len(idx)


@in_session
def segment_traces(
    store: Store,
    cfg: SegmentationConfig = SegmentationConfig(),
    run_id: str | None = None,
    batch_traces: int = 2_000,
    write_rows: int = WRITE_ROWS,
) -> StageReport:
    """Cut every not-yet-segmented trace into steps with its teacher's segmenter (recorded on each step), streamed
    in batches of traces and written in inserts of at least `write_rows` steps; a trace with no step is quarantined,
    not dropped."""
    wh = store.warehouse
    todo = data_tables.unsegmented_traces(wh)
    empty = 0
    used: Counter[str] = Counter()
    unwritten: list[pa.Table] = []
    unwritten_quarantine: list[Quarantined] = []

    def write(steps: pa.Table, quarantined: list[Quarantined]) -> int:
        wh.insert_new("quarantine", quarantine_rows("segmented_steps", quarantined), run_id)
        return wh.append("segmented_steps", steps, run_id)  # the pending traces have no step yet

    with tqdm(total=todo, unit="trace", desc="segmenting", disable=None) as bar, BehindWriter() as writer:
        for traces in data_tables.stream_unsegmented_traces(wh, batch_traces):
            steps = segment_batch(traces, cfg)
            firsts = steps.filter(pc.equal(steps.column("idx"), 0))
            used.update({c["values"]: c["counts"] for c in pc.value_counts(firsts.column("segmenter")).to_pylist()})
            no_step = pc.invert(pc.is_in(traces.column("trace_id"), value_set=firsts.column("trace_id")))
            quarantined = [
                Quarantined(t["trace_id"], 0, "text", "trace has no non-empty step", t["text"][:500])
                for t in traces.filter(no_step).select(["trace_id", "text"]).to_pylist()
            ]
            unwritten.append(steps)
            unwritten_quarantine += quarantined
            rows = sum(t.num_rows for t in unwritten)
            if rows >= write_rows:  # whole row groups (and the end of the trace they cut) now, the rest later
                ready = pa.concat_tables(unwritten)
                cut = trace_start(
                    ready.column("idx"), rows - rows % ROW_GROUP_ROWS if write_rows >= ROW_GROUP_ROWS else rows
                )
                writer.submit(write, ready.slice(0, cut), unwritten_quarantine)
                unwritten, unwritten_quarantine = [ready.slice(cut)], []
            empty += len(quarantined)
            bar.update(traces.num_rows)
        if unwritten:
            writer.submit(write, pa.concat_tables(unwritten), unwritten_quarantine)
    new = sum(writer.results)
    if todo and empty == todo:
        raise StageFailed(
            f"every one of the {todo} new traces was empty after segmentation (quarantined: see "
            "the quarantine table, stage 'segmented_steps')"
        )
    total, traces_total = data_tables.segmented_totals(wh)
    return StageReport(
        "segmented_steps",
        new,
        total,
        {
            "traces_segmented": todo - empty,
            "empty_traces_quarantined": empty,
            "mean_steps_per_trace": round(total / traces_total, 2) if traces_total else 0.0,
            "segmenters": dict(used),
        },
    )
