"""The labelling stage: one of the seven signals for every step without a label under the current keyword table
(keywords, computation patterns, the final step as the answer, a counted fallback), streamed and written as it goes;
then, when configured, an LLM confirms or corrects the keyword labels and labels the fallback steps (the paper's
second stage), its verdicts cached by step content.
"""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from scaffold_lib.core.errors import StageFailed
from scaffold_lib.core.ids import content_id
from scaffold_lib.data.config import LabellerConfig
from scaffold_lib.data.label_stats import coverage_by_source, label_statistics
from scaffold_lib.data.label_validation import LabelValidator, ValidatorConfig, Verdict, decide
from scaffold_lib.data.signals import FALLBACK, KEYWORD, PATTERN, keyword_table, label_column
from scaffold_lib.store import data_tables
from scaffold_lib.store.handles import StageReport
from scaffold_lib.store.store import Store
from scaffold_lib.store.warehouse import WRITE_ROWS
from scaffold_lib.store.writing import BehindWriter, in_session


@in_session
def label_signals(
    store: Store, cfg: LabellerConfig = LabellerConfig(), run_id: str | None = None, batch_steps: int = WRITE_ROWS
) -> StageReport:
    """Keyword-label every step without a label under this keyword table and fallback (final step of a trace =
    answer), streamed in batches written as they are labelled; then the LLM stage when configured. A refresh reads
    the new steps only; a changed table relabels every step."""
    wh = store.warehouse
    table = keyword_table(cfg.keywords_path)
    key = content_id("labelling", table.digest, cfg.fallback_signal)
    # the pending steps' ids first (no text read): their count, and the first row holding one
    total, first_row = data_tables.unlabelled_steps(wh, key)

    def write(labels: pa.Table, relabel: pa.ChunkedArray) -> int:
        relabelled = wh.upsert("signal_labels", labels.filter(relabel), run_id)
        return relabelled + wh.append("signal_labels", labels.filter(pc.invert(relabel)), run_id)  # steps with no label

    with tqdm(total=total, unit="step", desc="labelling", disable=None) as bar, BehindWriter() as writer:
        for steps in data_tables.stream_unlabelled_steps(wh, key, first_row, batch_steps) if total else ():
            labels = label_column(steps.column("text"), steps.column("is_final"), table, cfg.fallback_signal)
            labels = labels.add_column(0, "step_id", steps.column("step_id")).append_column(
                "labelling_key", pa.array([key] * steps.num_rows, pa.string())
            )
            writer.submit(write, labels, steps.column("relabel"))
            bar.update(steps.num_rows)
    new = sum(writer.results)
    details: dict = {"keywords_file": table.source}
    if cfg.validate_with_llm:
        validator = LabelValidator(
            ValidatorConfig(
                endpoint=cfg.endpoint.require("label validation"),
                max_reasks=cfg.max_reasks,
                structured_output=cfg.structured_output,
            ),
            store.journals,
            progress=cfg.progress,
        )
        details["validation"] = validate_signal_labels(store, validator, run_id)
    details.update(label_statistics(store), coverage_by_source=coverage_by_source(store))
    return StageReport("signal_labels", new, wh.count("signal_labels"), details)


def validate_signal_labels(store: Store, validator: LabelValidator, run_id: str | None = None) -> dict:
    """The LLM stage: confirm or correct every keyword label and label the fallback steps. Verdicts come from the
    warehouse cache first, so only steps never asked before reach the endpoint."""
    wh = store.warehouse
    steps = data_tables.labels_by(wh, [KEYWORD, PATTERN, FALLBACK])
    items = [(validator.cache_key(s["text"], s["keyword_signal"]), s["text"], s["keyword_signal"]) for s in steps]
    keys = sorted({key for key, _, _ in items})
    cached = {
        r["cache_key"]: Verdict(r["signal"], r["reply"], r["attempts"]) for r in data_tables.cached_verdicts(wh, keys)
    }
    asked, errors = (
        validator.validate([i for i in items if i[0] not in cached]) if len(cached) < len(keys) else ({}, {})
    )
    wh.insert_new(
        "llm_label_cache",
        [
            {
                "cache_key": key,
                "validator": validator.identity,
                "proposed_signal": proposed,
                "signal": v.signal,
                "reply": v.reply,
                "attempts": v.attempts,
            }
            for key, _, proposed in {i[0]: i for i in items}.values()
            if (v := asked.get(key)) is not None
        ],
        run_id,
    )
    verdicts = {**cached, **asked}
    rows, unparseable = [], 0
    for step, (key, _, _) in zip(steps, items):
        decision = decide(step["labeller"], step["keyword_signal"], verdicts.get(key))
        unparseable += key in verdicts and verdicts[key].signal is None
        if decision is not None:
            rows.append(
                {
                    "step_id": step["step_id"],
                    "signal": decision[0],
                    "labeller": decision[1],
                    "keyword": step["keyword"],
                    "keyword_signal": step["keyword_signal"],
                    "confidence": 1.0,
                    "labelling_key": step["labelling_key"],  # a verdict on this table's label: kept until it changes
                }
            )
    wh.upsert("signal_labels", rows, run_id)
    if keys and not verdicts:
        raise StageFailed(
            f"label validation got no verdict for any of {len(keys)} steps: "
            f"{dict(Counter(e.split(':', 1)[0] for e in errors.values()))}"
        )
    return {
        "validator": validator.identity,
        "relabelled": len(rows),
        "steps_to_validate": len(steps),
        "distinct_steps": len(keys),
        "verdicts_from_cache": len(cached),
        "asked": len(asked) + len(errors),
        "failed": len(errors),
        "unparseable_after_reasks": unparseable,
        "errors": dict(Counter(e.split(":", 1)[0] for e in errors.values())),
    }
