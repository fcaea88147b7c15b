"""The data stages as functions over the warehouse: each reads its parents' rows, does only the new work
and writes its table idempotently. The Dagster assets and the `scaffold` CLI both call these."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

from scaffold_lib.core.ids import content_id
from scaffold_lib.data.endpoint import TRANSPORT_ERRORS
from scaffold_lib.data.problems import Problem, Quarantined, shard_of
from scaffold_lib.data.segmentation import segment
from scaffold_lib.data.label_validation import LabelValidator, Verdict, decide
from scaffold_lib.data.signals import FALLBACK, KEYWORD, SIGNALS, LabellerConfig, LabelStats, keyword_table, label_step
from scaffold_lib.data.teachers import Teacher
from scaffold_lib.store.warehouse import Warehouse


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
                            run_id: str | None = None, shard: tuple[int, int] | None = None) -> StageReport:
    """Trace every problem (of shard `(index, count)` when given) that has no trace from this teacher yet
    (content ids make the check exact)."""
    problems = _problem_rows(wh, splits)
    if shard is not None:
        problems = [p for p in problems if shard_of(p.problem_id, shard[1]) == shard[0]]
    existing = {r["trace_id"] for r in wh.query("SELECT trace_id FROM teacher_traces WHERE teacher = ?",
                                                [teacher.identity])}
    todo = [p for p in problems
            if any(teacher.trace_id_for(p, sample) not in existing for sample in range(teacher.samples))]
    result = teacher.generate(todo) if todo else None
    new = failed = not_covered = unreachable = 0
    if result is not None:
        new = wh.insert_new("teacher_traces", [t.as_row() for t in result.traces], run_id)
        failed, not_covered = len(result.failures), result.not_covered
        unreachable = sum(f.error.startswith(TRANSPORT_ERRORS) for f in result.failures)
        wh.insert_new("teacher_failures", [{"failure_id": content_id("failure", f.trace_id, run_id), **f.as_row()}
                                           for f in result.failures], run_id)
        wh.insert_new("quarantine", quarantine_rows("teacher_traces", result.quarantined), run_id)
    stats = wh.query("SELECT count(*) AS n, avg(is_correct::INT) AS acc, avg(completion_tokens) AS toks "
                     "FROM teacher_traces WHERE teacher = ?", [teacher.identity])[0]
    return StageReport("teacher_traces", new, stats["n"], {
        "teacher": teacher.identity, "asked": len(todo), "failed": failed, "failed_unreachable": unreachable,
        "not_covered": not_covered,
        "quarantined": len(result.quarantined) if result else 0,
        "skipped_existing": len(problems) - len(todo), "teacher_accuracy": round(stats["acc"] or 0.0, 4),
        "mean_completion_tokens": round(stats["toks"] or 0.0, 1), "run": result.stats if result else {}})


def segment_traces(wh: Warehouse, run_id: str | None = None) -> StageReport:
    """Cut every not-yet-segmented trace into steps; a trace with no steps is quarantined, not dropped."""
    traces = wh.query("SELECT t.trace_id, t.text, t.answer_text FROM teacher_traces t "
                      "ANTI JOIN segmented_steps s USING (trace_id) "
                      "ANTI JOIN quarantine q ON q.stage = 'segmented_steps' AND q.source_file = t.trace_id")
    rows, empty = [], []
    for t in traces:
        steps = segment(t["text"])
        if steps and t["answer_text"] and t["answer_text"].strip():
            # a reasoning model's final content is one answer step after its thinking, however many paragraphs
            steps.append("\n".join(segment(t["answer_text"])))
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
                     "keyword": label.keyword, "confidence": label.confidence,
                     "keyword_signal": label.signal if label.labeller == KEYWORD else None})
    new = wh.insert_new("signal_labels", rows, run_id)
    return StageReport("signal_labels", new, wh.scalar("SELECT count(*) FROM signal_labels"),
                       {"keywords_file": table.source, **label_statistics(wh)})


def validate_signal_labels(wh: Warehouse, validator: LabelValidator, run_id: str | None = None) -> StageReport:
    """The LLM stage: confirm or correct every keyword label and label the fallback steps. Verdicts come from the
    warehouse cache first, so only steps never asked before reach the endpoint."""
    steps = wh.query(f"""
        SELECT l.step_id, s.text, l.labeller, l.keyword, l.keyword_signal, l.signal
        FROM signal_labels l JOIN segmented_steps s USING (step_id)
        WHERE l.labeller IN ('{KEYWORD}', '{FALLBACK}') ORDER BY l.step_id""")
    items = [(validator.cache_key(s["text"], s["keyword_signal"]), s["text"], s["keyword_signal"]) for s in steps]
    keys = sorted({key for key, _, _ in items})
    cached = {r["cache_key"]: Verdict(r["signal"], r["reply"], r["attempts"])
              for r in wh.query("SELECT cache_key, signal, reply, attempts FROM llm_label_cache "
                                "WHERE list_contains(?, cache_key)", [keys])}
    asked, errors = validator.validate([i for i in items if i[0] not in cached]) if len(cached) < len(keys) else ({}, {})
    wh.insert_new("llm_label_cache", [
        {"cache_key": key, "validator": validator.identity, "proposed_signal": proposed, "signal": v.signal,
         "reply": v.reply, "attempts": v.attempts}
        for key, _, proposed in {i[0]: i for i in items}.values() if (v := asked.get(key)) is not None], run_id)
    verdicts = {**cached, **asked}
    rows, unparseable = [], 0
    for step, (key, _, _) in zip(steps, items):
        decision = decide(step["labeller"], step["keyword_signal"], verdicts.get(key))
        unparseable += key in verdicts and verdicts[key].signal is None
        if decision is not None:
            rows.append({"step_id": step["step_id"], "signal": decision[0], "labeller": decision[1],
                         "keyword": step["keyword"], "keyword_signal": step["keyword_signal"], "confidence": 1.0})
    wh.upsert("signal_labels", rows, run_id)
    return StageReport("signal_labels", len(rows), wh.scalar("SELECT count(*) FROM signal_labels"), {
        "validator": validator.identity, "steps_to_validate": len(steps), "distinct_steps": len(keys),
        "verdicts_from_cache": len(cached), "asked": len(asked) + len(errors), "failed": len(errors),
        "unparseable_after_reasks": unparseable, "errors": dict(Counter(e.split(":", 1)[0] for e in errors.values())),
        **label_statistics(wh)})


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

