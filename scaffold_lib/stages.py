"""The data stages as functions over the warehouse: each reads its parents' rows, does only the new work
and writes its table idempotently. The Dagster assets and the `scaffold` CLI both call these."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from scaffold_lib.ids import content_id
from scaffold_lib.problems import Problem, Quarantined
from scaffold_lib.segmentation import segment
from scaffold_lib.signals import SIGNALS, LabellerConfig, LabelStats, keyword_table, label_step
from scaffold_lib.teachers import Teacher
from scaffold_lib.warehouse import Warehouse


@dataclass
class StageReport:
    """What a stage did, for logs, the CLI and Dagster metadata."""

    stage: str
    new_rows: int
    total_rows: int
    details: dict = field(default_factory=dict)

    def summary(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.details.items() if not isinstance(v, dict))
        return f"{self.stage}: +{self.new_rows} new rows ({self.total_rows} total){'; ' + extra if extra else ''}"


def quarantine_rows(stage: str, items: Sequence[Quarantined]) -> list[dict]:
    return [{"quarantine_id": content_id("quarantine", stage, q.source_file, q.line, q.raw), "stage": stage,
             **q.as_row()} for q in items]


def store_problems(wh: Warehouse, problems: Sequence[Problem], quarantined: Sequence[Quarantined] = (),
                   run_id: str | None = None) -> StageReport:
    new = wh.insert_new("problems", [p.as_row() for p in problems], run_id)
    wh.insert_new("quarantine", quarantine_rows("problems", quarantined), run_id)
    splits = {r["split"]: r["n"] for r in wh.query("SELECT split, count(*) AS n FROM problems GROUP BY split")}
    return StageReport("problems", new, wh.scalar("SELECT count(*) FROM problems"),
                       {"offered": len(problems), "quarantined": len(quarantined), "splits": splits})


def _problem_rows(wh: Warehouse, splits: Sequence[str]) -> list[Problem]:
    rows = wh.query("SELECT problem_id, source, split, question, answer, answer_type FROM problems "
                    "WHERE list_contains(?, split) ORDER BY problem_id", [list(splits)])
    return [Problem(**r) for r in rows]


def generate_teacher_traces(wh: Warehouse, teacher: Teacher, splits: Sequence[str] = ("train", "test"),
                            run_id: str | None = None) -> StageReport:
    """Trace every problem that has no trace from this teacher yet (content ids make the check exact)."""
    problems = _problem_rows(wh, splits)
    existing = {r["trace_id"] for r in wh.query("SELECT trace_id FROM teacher_traces WHERE teacher = ?",
                                                [teacher.identity])}
    todo = [p for p in problems if teacher.trace_id_for(p) not in existing]
    result = teacher.generate(todo) if todo else None
    new = failed = 0
    if result is not None:
        new = wh.insert_new("teacher_traces", [t.as_row() for t in result.traces], run_id)
        failed = len(result.failures)
        wh.insert_new("teacher_failures", [{"failure_id": content_id("failure", f.trace_id, run_id), **f.as_row()}
                                           for f in result.failures], run_id)
    stats = wh.query("SELECT count(*) AS n, avg(is_correct::INT) AS acc, avg(completion_tokens) AS toks "
                     "FROM teacher_traces WHERE teacher = ?", [teacher.identity])[0]
    return StageReport("teacher_traces", new, stats["n"], {
        "teacher": teacher.identity, "asked": len(todo), "failed": failed, "skipped_existing": len(problems) - len(todo),
        "teacher_accuracy": round(stats["acc"] or 0.0, 4), "mean_completion_tokens": round(stats["toks"] or 0.0, 1)})


def segment_traces(wh: Warehouse, run_id: str | None = None) -> StageReport:
    """Cut every not-yet-segmented trace into steps; a trace with no steps is quarantined, not dropped."""
    traces = wh.query("SELECT t.trace_id, t.text FROM teacher_traces t ANTI JOIN segmented_steps s USING (trace_id) "
                      "ANTI JOIN quarantine q ON q.stage = 'segmented_steps' AND q.source_file = t.trace_id")
    rows, empty = [], []
    for t in traces:
        steps = segment(t["text"])
        if not steps:
            empty.append(Quarantined(t["trace_id"], 0, "text", "trace has no non-empty step", t["text"][:500]))
        rows.extend({"step_id": content_id("step", t["trace_id"], i, s), "trace_id": t["trace_id"], "idx": i, "text": s}
                    for i, s in enumerate(steps))
    new = wh.insert_new("segmented_steps", rows, run_id)
    wh.insert_new("quarantine", quarantine_rows("segmented_steps", empty), run_id)
    total = wh.scalar("SELECT count(*) FROM segmented_steps")
    per_trace = wh.scalar("SELECT avg(n) FROM (SELECT count(*) AS n FROM segmented_steps GROUP BY trace_id)")
    return StageReport("segmented_steps", new, total, {
        "traces_segmented": len(traces) - len(empty), "empty_traces_quarantined": len(empty),
        "mean_steps_per_trace": round(per_trace or 0.0, 2)})


def label_signals(wh: Warehouse, config: LabellerConfig = LabellerConfig(), run_id: str | None = None) -> StageReport:
    """Keyword-label every unlabelled step (final step of a trace = answer)."""
    table = keyword_table(config.keywords_path)
    steps = wh.query("""
        SELECT s.step_id, s.text, s.idx = m.last_idx AS is_final
        FROM segmented_steps s
        JOIN (SELECT trace_id, max(idx) AS last_idx FROM segmented_steps GROUP BY trace_id) m USING (trace_id)
        ANTI JOIN signal_labels l USING (step_id)""")
    rows = []
    for s in steps:
        label = label_step(s["text"], s["is_final"], table, config.fallback_signal)
        rows.append({"step_id": s["step_id"], "signal": label.signal, "labeller": label.labeller,
                     "keyword": label.keyword, "confidence": label.confidence})
    new = wh.insert_new("signal_labels", rows, run_id)
    return StageReport("signal_labels", new, wh.scalar("SELECT count(*) FROM signal_labels"),
                       {"keywords_file": table.source, **label_statistics(wh)})


def label_statistics(wh: Warehouse) -> dict:
    stats = LabelStats()
    for r in wh.query("SELECT signal, labeller, count(*) AS n FROM signal_labels GROUP BY ALL"):
        stats.steps += r["n"]
        stats.by_signal[r["signal"]] += r["n"]
        stats.by_labeller[r["labeller"]] += r["n"]
    return stats.as_dict()


def signal_distribution_markdown(by_signal: dict[str, int]) -> str:
    total = sum(by_signal.values()) or 1
    lines = ["| signal | steps | share |", "|---|---:|---:|"]
    lines += [f"| {s} | {by_signal.get(s, 0)} | {by_signal.get(s, 0) / total:.1%} |" for s in SIGNALS]
    return "\n".join(lines)

