"""The data stages, each one function over the store: problems -> teacher traces -> segmented steps -> signal labels.

Each reads its parents' rows, does only the new work (content ids make "new" exact), writes its table idempotently
and returns a `StageReport`. A stage that did nothing useful — every item failed, was quarantined or was not
covered — raises `StageFailed` with the reason: silence is the worst failure. The Dagster assets, the `scaffold`
CLI and the experiment runner call exactly these functions.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from scaffold_lib.core.errors import RunFailed
from scaffold_lib.core.ids import content_id
from scaffold_lib.data.endpoint import TRANSPORT_ERRORS, EndpointConfig
from scaffold_lib.data.label_validation import LabelValidator, ValidatorConfig, Verdict, decide
from scaffold_lib.data.llm_teachers import EndpointTeacher, HFTeacher, HFTeacherConfig, PromptConfig
from scaffold_lib.data.problems import (
    SPLITS,
    LoadResult,
    Problem,
    ProblemsConfig,
    Quarantined,
    generate_problems,
    load_problem_file,
    load_reasoning_gym,
    problem_files,
    shard_of,
)
from scaffold_lib.data.segmentation import SegmentationConfig, resolve, segment
from scaffold_lib.data.signals import (
    FALLBACK,
    KEYWORD,
    PATTERN,
    SIGNALS,
    LabellerConfig,
    LabelStats,
    keyword_table,
    label_step,
)
from scaffold_lib.data.teachers import (
    ProgrammaticTeacher,
    ProgrammaticTeacherConfig,
    ReferenceTeacher,
    Teacher,
    TeacherResult,
)
from scaffold_lib.data.trace_import import ImportedTeacher, TraceFieldMap
from scaffold_lib.store.store import Store

TeacherBackend = Literal["programmatic", "reference", "openai", "hf", "import"]


class StageFailed(RunFailed):
    """A stage did nothing useful; the message says why and what to change."""


@dataclass
class StageReport:
    """What a stage did, for logs, the CLI and Dagster metadata."""

    stage: str
    new_rows: int
    total_rows: int
    details: dict = field(default_factory=dict)

    def summary(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.details.items() if not isinstance(v, (dict, list)))
        return f"{self.stage}: +{self.new_rows} new rows ({self.total_rows} total){'; ' + extra if extra else ''}"


def quarantine_rows(stage: str, items: Sequence[Quarantined]) -> list[dict]:
    return [
        {"quarantine_id": content_id("quarantine", stage, q.source_file, q.line, q.raw), "stage": stage, **q.as_row()}
        for q in items
    ]


# --- problems --------------------------------------------------------------------------------------------------


def gather_problems(cfg: ProblemsConfig, incoming: Path | None = None) -> tuple[list[Problem], dict[str, LoadResult]]:
    """(problems of the configured source, load result per problem file): the configured files plus every problem
    file in the watched folder."""
    problems: list[Problem] = []
    if cfg.source == "synthetic":
        problems = generate_problems(cfg.synthetic, cfg.split)
    elif cfg.source == "reasoning_gym":
        problems = load_reasoning_gym(cfg.reasoning_gym, cfg.split)
    watched = Path(cfg.watch_dir) if cfg.watch_dir else incoming
    files = [Path(f) for f in cfg.files] + (problem_files(watched) if watched and watched.exists() else [])
    loaded = {str(f): load_problem_file(f, cfg.fields, split=cfg.split, lenient=cfg.lenient) for f in files}
    if cfg.source == "files" and not files:
        raise StageFailed(
            f"problems source 'files' but no problem file: set problems.files or drop files into {watched}"
        )
    return problems, loaded


def build_problems(store: Store, cfg: ProblemsConfig, run_id: str | None = None) -> StageReport:
    """Questions with gold answers, from the configured source and problem files, split by group."""
    generated, loaded = gather_problems(cfg, store.incoming)
    offered = generated + [p for result in loaded.values() for p in result.problems]
    quarantined = [q for result in loaded.values() for q in result.quarantined]
    for path, result in loaded.items():
        if not result.problems and result.quarantined:
            first = result.quarantined[0]
            raise StageFailed(
                f"{path}: every row was quarantined ({len(result.quarantined)}), e.g. line "
                f"{first.line}, field {first.field!r}: {first.error}"
            )
    if not offered:
        raise StageFailed(f"no problems: source {cfg.source!r} produced none and no problem file had any")
    report = store_problems(store, offered, quarantined, run_id)
    report.details["files_loaded"] = len(loaded)
    return report


def store_problems(
    store: Store, problems: Sequence[Problem], quarantined: Sequence[Quarantined] = (), run_id: str | None = None
) -> StageReport:
    """Write problems (new ids only) and quarantined rows; report the split sizes and any group shared by splits."""
    wh = store.warehouse
    new = wh.insert_new("problems", [p.as_row() for p in problems], run_id)
    wh.insert_new("quarantine", quarantine_rows("problems", quarantined), run_id)
    splits = {r["split"]: r["n"] for r in wh.query("SELECT split, count(*) AS n FROM problems GROUP BY split")}
    return StageReport(
        "problems",
        new,
        wh.scalar("SELECT count(*) FROM problems"),
        {
            "offered": len(problems),
            "files_loaded": 0,
            "quarantined": len(quarantined),
            "splits": {s: splits.get(s, 0) for s in SPLITS},
            "split_overlap": split_overlap(store),
        },
    )


def split_overlap(store: Store) -> dict[str, int]:
    """Groups found in more than one split (0 everywhere when the split is by group; a file's own `split` column may
    break that, and this says so)."""
    rows = store.warehouse.query("""
        SELECT a.split || '/' || b.split AS pair, count(DISTINCT a.group_id) AS n
        FROM problems a JOIN problems b ON a.group_id = b.group_id AND a.split < b.split
        WHERE a.group_id IS NOT NULL GROUP BY ALL""")
    return {r["pair"]: r["n"] for r in rows}


# --- teacher traces -------------------------------------------------------------------------------------------------


class TeacherConfig(BaseModel):
    """Which teacher writes the traces, and how."""

    backend: TeacherBackend = Field(
        "programmatic",
        description="programmatic: the built-in teacher of the synthetic problems; reference: the "
        "worked solutions shipped with the problems; openai: any OpenAI-compatible endpoint; hf: a local causal LM; "
        "import: an existing trace file or HF dataset",
    )
    programmatic: ProgrammaticTeacherConfig = Field(default_factory=ProgrammaticTeacherConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    endpoint: EndpointConfig = Field(default_factory=EndpointConfig)
    hf: HFTeacherConfig = Field(default_factory=HFTeacherConfig)
    import_source: str = Field("", description="a .jsonl/.parquet path or HF dataset name, for backend 'import'")
    import_fields: TraceFieldMap = Field(default_factory=TraceFieldMap)
    splits: list[str] = Field(
        default_factory=lambda: list(SPLITS),
        description="problems of these splits are traced (held-out traces give golden signals)",
    )
    journal_dir: str | None = Field(None, description="completions are journalled here; default <home>/journals")
    progress: bool = True


def build_teacher(cfg: TeacherConfig, journal_dir: str | Path, shard: tuple[int, int] | None = None) -> Teacher:
    """The configured teacher; for shard k of n, an endpoint teacher talks to base URL k mod len(base_urls) only, so
    partitions fan out over the servers and each trace names its server."""
    journals = cfg.journal_dir or journal_dir
    if cfg.backend == "programmatic":
        return ProgrammaticTeacher(cfg.programmatic)
    if cfg.backend == "reference":
        return ReferenceTeacher()
    if cfg.backend == "openai":
        endpoint = cfg.endpoint.require("teacher")
        if shard is not None:
            endpoint = endpoint.model_copy(
                update={"base_urls": [endpoint.base_urls[shard[0] % len(endpoint.base_urls)]]}
            )
        return EndpointTeacher(endpoint, cfg.prompt, journals, progress=cfg.progress)
    if cfg.backend == "hf":
        if not cfg.hf.model:
            raise StageFailed("teacher backend 'hf' needs teacher.hf.model (a hub id or a local model directory)")
        return HFTeacher(cfg.hf, cfg.prompt, journals, progress=cfg.progress)
    if not cfg.import_source:
        raise StageFailed(
            "teacher backend 'import' needs teacher.import_source (a .jsonl/.parquet path or an HF dataset name)"
        )
    return ImportedTeacher(cfg.import_source, cfg.import_fields)


def _problem_rows(store: Store, splits: Sequence[str]) -> list[Problem]:
    rows = store.warehouse.query(
        "SELECT problem_id, source, split, question, answer, answer_type, group_id, solution FROM problems "
        "WHERE list_contains(?, split) ORDER BY problem_id",
        [list(splits)],
    )
    return [Problem(**r) for r in rows]


def write_traces(
    store: Store,
    cfg: TeacherConfig,
    run_id: str | None = None,
    shard: tuple[int, int] | None = None,
    teacher: Teacher | None = None,
) -> StageReport:
    """Trace every problem (of shard `(index, count)` when given) that has no trace from this teacher yet. Raises
    `StageFailed` when problems were asked and not one trace came back."""
    wh = store.warehouse
    teacher = teacher or build_teacher(cfg, store.journals, shard)
    problems = _problem_rows(store, cfg.splits)
    if shard is not None:
        problems = [p for p in problems if shard_of(p.problem_id, shard[1]) == shard[0]]
    existing = {
        r["trace_id"] for r in wh.query("SELECT trace_id FROM teacher_traces WHERE teacher = ?", [teacher.identity])
    }
    todo = [
        p for p in problems if any(teacher.trace_id_for(p, sample) not in existing for sample in range(teacher.samples))
    ]
    result = teacher.generate(todo) if todo else TeacherResult()
    new = wh.insert_new("teacher_traces", [t.as_row() for t in result.traces], run_id)
    wh.insert_new(
        "teacher_failures",
        [{"failure_id": content_id("failure", f.trace_id, run_id), **f.as_row()} for f in result.failures],
        run_id,
    )
    wh.insert_new("quarantine", quarantine_rows("teacher_traces", result.quarantined), run_id)
    errors = Counter(f.error for f in result.failures)
    details = {
        "teacher": teacher.identity,
        "asked": len(todo),
        "failed": len(result.failures),
        "failed_unreachable": sum(f.error.startswith(TRANSPORT_ERRORS) for f in result.failures),
        "not_covered": result.not_covered,
        "quarantined": len(result.quarantined),
        "skipped_existing": len(problems) - len(todo),
        "run": result.stats,
    }
    total = wh.scalar("SELECT count(*) FROM teacher_traces WHERE teacher = ?", [teacher.identity])
    # nothing useful: problems were asked and every one failed, or the teacher covers none of them at all (problems a
    # trace file leaves out, beside ones it covered, are its normal steady state)
    if todo and not result.traces and (result.failures or total == 0):
        reasons = [f"{n} x {error[:300]}" for error, n in errors.most_common(3)]
        if result.not_covered:
            reasons.append(f"{result.not_covered} not covered by {teacher.identity}")
        if result.quarantined:
            first = result.quarantined[0]
            reasons.append(
                f"{len(result.quarantined)} input rows quarantined (e.g. {first.source_file}:{first.line} "
                f"field {first.field!r}: {first.error})"
            )
        raise StageFailed(f"teacher {teacher.identity} answered none of {len(todo)} problems: " + "; ".join(reasons))
    stats = wh.query(
        "SELECT count(*) AS n, avg(is_correct::INT) AS acc, avg(completion_tokens) AS toks "
        "FROM teacher_traces WHERE teacher = ?",
        [teacher.identity],
    )[0]
    details.update(
        teacher_accuracy=round(stats["acc"] or 0.0, 4), mean_completion_tokens=round(stats["toks"] or 0.0, 1)
    )
    return StageReport("teacher_traces", new, stats["n"], details)


# --- segmented steps -----------------------------------------------------------------------------------------------


def segment_traces(
    store: Store, cfg: SegmentationConfig = SegmentationConfig(), run_id: str | None = None
) -> StageReport:
    """Cut every not-yet-segmented trace into steps with its teacher's segmenter (recorded on each step); a trace with
    no step is quarantined, not dropped."""
    wh = store.warehouse
    traces = wh.query(
        "SELECT t.trace_id, t.teacher, t.text, t.answer_text FROM teacher_traces t "
        "ANTI JOIN segmented_steps s USING (trace_id) "
        "ANTI JOIN quarantine q ON q.stage = 'segmented_steps' AND q.source_file = t.trace_id"
    )
    rows, empty, used = [], [], Counter()
    for t in traces:
        segmenter = resolve(t["text"], cfg.for_teacher(t["teacher"]))
        steps = segment(t["text"], segmenter)
        if steps and t["answer_text"] and t["answer_text"].strip():
            # a reasoning model's final content is one answer step after its thinking, however many paragraphs
            steps.append("\n".join(segment(t["answer_text"])))
        if not steps:
            empty.append(Quarantined(t["trace_id"], 0, "text", "trace has no non-empty step", t["text"][:500]))
        used[segmenter] += bool(steps)
        rows.extend(
            {
                "step_id": content_id("step", t["trace_id"], i, s),
                "trace_id": t["trace_id"],
                "idx": i,
                "text": s,
                "segmenter": segmenter,
            }
            for i, s in enumerate(steps)
        )
    new = wh.insert_new("segmented_steps", rows, run_id)
    wh.insert_new("quarantine", quarantine_rows("segmented_steps", empty), run_id)
    if traces and len(empty) == len(traces):
        raise StageFailed(
            f"every one of the {len(traces)} new traces was empty after segmentation (quarantined: see "
            "the quarantine table, stage 'segmented_steps')"
        )
    total = wh.scalar("SELECT count(*) FROM segmented_steps")
    per_trace = wh.scalar("SELECT avg(n) FROM (SELECT count(*) AS n FROM segmented_steps GROUP BY trace_id)")
    return StageReport(
        "segmented_steps",
        new,
        total,
        {
            "traces_segmented": len(traces) - len(empty),
            "empty_traces_quarantined": len(empty),
            "mean_steps_per_trace": round(per_trace or 0.0, 2),
            "segmenters": dict(used),
        },
    )


# --- signal labels -------------------------------------------------------------------------------------------------


class LabellingConfig(LabellerConfig):
    """The keyword labeller (always), then, with `validate_with_llm`, an LLM through an endpoint that confirms or
    corrects each keyword label and labels the steps no keyword matched (the paper's second stage)."""

    validate_with_llm: bool = False
    endpoint: EndpointConfig = Field(default_factory=lambda: EndpointConfig(temperature=0.0, max_tokens=64))
    max_reasks: int = Field(2, ge=0)
    structured_output: bool = False
    progress: bool = True


def label_signals(store: Store, cfg: LabellingConfig = LabellingConfig(), run_id: str | None = None) -> StageReport:
    """Keyword-label every unlabelled step (final step of a trace = answer); then the LLM stage when configured."""
    wh = store.warehouse
    table = keyword_table(cfg.keywords_path)
    steps = wh.query("""
        SELECT s.step_id, s.text, s.idx = m.last_idx AS is_final
        FROM segmented_steps s
        JOIN (SELECT trace_id, max(idx) AS last_idx FROM segmented_steps GROUP BY trace_id) m USING (trace_id)
        ANTI JOIN signal_labels l USING (step_id)""")
    rows = []
    for s in steps:
        label = label_step(s["text"], s["is_final"], table, cfg.fallback_signal)
        rows.append(
            {
                "step_id": s["step_id"],
                "signal": label.signal,
                "labeller": label.labeller,
                "keyword": label.keyword,
                "confidence": label.confidence,
                "keyword_signal": label.signal if label.labeller in (KEYWORD, PATTERN) else None,
            }
        )
    new = wh.insert_new("signal_labels", rows, run_id)
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
    return StageReport("signal_labels", new, wh.scalar("SELECT count(*) FROM signal_labels"), details)


def validate_signal_labels(store: Store, validator: LabelValidator, run_id: str | None = None) -> dict:
    """The LLM stage: confirm or correct every keyword label and label the fallback steps. Verdicts come from the
    warehouse cache first, so only steps never asked before reach the endpoint."""
    wh = store.warehouse
    steps = wh.query(
        """
        SELECT l.step_id, s.text, l.labeller, l.keyword, l.keyword_signal, l.signal
        FROM signal_labels l JOIN segmented_steps s USING (step_id)
        WHERE list_contains(?, l.labeller) ORDER BY l.step_id""",
        [[KEYWORD, PATTERN, FALLBACK]],
    )
    items = [(validator.cache_key(s["text"], s["keyword_signal"]), s["text"], s["keyword_signal"]) for s in steps]
    keys = sorted({key for key, _, _ in items})
    cached = {
        r["cache_key"]: Verdict(r["signal"], r["reply"], r["attempts"])
        for r in wh.query(
            "SELECT cache_key, signal, reply, attempts FROM llm_label_cache WHERE list_contains(?, cache_key)", [keys]
        )
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


def label_statistics(store: Store) -> dict:
    stats = LabelStats()
    for r in store.warehouse.query("SELECT signal, labeller, count(*) AS n FROM signal_labels GROUP BY ALL"):
        stats.steps += r["n"]
        stats.by_signal[r["signal"]] += r["n"]
        stats.by_labeller[r["labeller"]] += r["n"]
    return stats.as_dict()


def coverage_by_source(store: Store) -> dict[str, dict[str, float]]:
    """Keyword, keyword+pattern and fallback shares per problem source (GSM8K-style worked solutions open
    differently from R1 traces)."""
    rows = store.warehouse.query(
        """
        SELECT p.source, avg((l.labeller IN ('keyword', 'keyword+llm-agree', 'llm-override'))::INT) AS keyword,
               avg((l.labeller IN ('keyword', 'keyword+llm-agree', 'llm-override', 'pattern'))::INT) AS rules,
               avg((l.labeller = 'fallback')::INT) AS fallback
        FROM signal_labels l JOIN segmented_steps s USING (step_id) JOIN teacher_traces t USING (trace_id)
        JOIN problems p USING (problem_id) GROUP BY p.source ORDER BY p.source"""
    )
    return {
        r["source"]: {
            "keyword_coverage": round(r["keyword"], 4),
            "rule_coverage": round(r["rules"], 4),
            "fallback_share": round(r["fallback"], 4),
        }
        for r in rows
    }


def signal_distribution_markdown(by_signal: dict[str, int]) -> str:
    total = sum(by_signal.values()) or 1
    lines = ["| signal | steps | share |", "|---|---:|---:|"]
    lines += [f"| {s} | {by_signal.get(s, 0)} | {by_signal.get(s, 0) / total:.1%} |" for s in SIGNALS]
    return "\n".join(lines)
