"""The evaluation stages, each one function over the store: benchmark scores of a trained pair (scaffold student and
CoT-SFT baseline, plus the untuned backbone) on every configured suite, and the promotion of the challenger.

Scores go to the warehouse (one row per model × suite × variant, and one row per item so comparisons can be paired)
and to the students' MLflow runs; the Dagster assets and the `scaffold` CLI call exactly these functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, Field

from scaffold_lib.core import paths
from scaffold_lib.core.ids import content_id
from scaffold_lib.data.problems import quarantine_rows
from scaffold_lib.evaluation.config import EvalConfig, PromotionConfig
from scaffold_lib.evaluation.decontamination import suite_contamination
from scaffold_lib.evaluation.metrics import (
    BASE_VARIANT,
    SampleRecord,
    ScoreRow,
    comparison_table_markdown,
    evaluate_plain,
    evaluate_scaffold,
    export_samples,
    paired_differences_markdown,
    score_table_markdown,
    suite_run,
)
from scaffold_lib.evaluation.suites import (
    HELDOUT,
    OOD_SUITES,
    EvalItem,
    SuiteDataError,
    SuiteLoad,
    from_warehouse,
    get_suite,
)
from scaffold_lib.store.store import Store
from scaffold_lib.store.training_data import training_traces
from scaffold_lib.store.warehouse import Warehouse
from scaffold_lib.student.examples import Formatter
from scaffold_lib.student.handles import ModelHandle, ShardsHandle
from scaffold_lib.student.model import ScaffoldStudent, check_tokenizer, load_tokenizer

UNTUNED = "untuned"  # the version name of the backbone's score rows (it is no registered version)


def model_label(name: str, version: str) -> str:
    """How a scored model is named in tables and lists: `scaffold-student v3`, `base:embedded (untuned)`."""
    return f"{name} (untuned)" if version == UNTUNED else f"{name} v{version}"


class EvaluationHandle(BaseModel):
    """One evaluation of a student (and its baseline): ids, the rows, the tables."""

    evaluation_id: str
    model_name: str
    version: str
    baseline: str | None  # "<name> v<version>"
    suites: list[str]
    split: str
    eval_config_hashes: dict[str, str]
    rows: list[dict]
    items: dict[str, int]  # suite -> items scored (paired: every variant answered these)
    dropped_without_golden: dict[str, int] = Field(default_factory=dict)
    # suite -> {"overlapping": training problems sharing an n-gram with it, "trained_on": of those, in the student's shards}
    contamination: dict[str, dict] = Field(default_factory=dict)
    samples: dict[str, str] = Field(default_factory=dict)
    # suite -> rows of its file quarantined (eval.lenient), each in the warehouse's `quarantine` table with file and line
    quarantined: dict[str, int] = Field(default_factory=dict)
    comparison_table: str
    score_table: str


def heldout_items(wh: Warehouse, split: str = "test", limit: int | None = None) -> list[EvalItem]:
    """Held-out problems of `split`, with the teacher's steps and signals as golden where the teacher traced the
    problem (its correct trace when it has one)."""
    problems = wh.query(
        "SELECT problem_id, question, answer, answer_type FROM problems WHERE split = ? ORDER BY problem_id", [split]
    )[:limit]
    golden: dict[str, dict] = {}
    traces, _ = training_traces(wh, (split,), include_incorrect=True, only_problems=[p["problem_id"] for p in problems])
    for t in sorted(traces, key=lambda t: (not t["is_correct"], t["trace_id"])):
        golden.setdefault(t["problem_id"], t)
    return [
        EvalItem(
            p["problem_id"],
            p["question"],
            p["answer"],
            p["answer_type"],
            golden[p["problem_id"]]["signals"] if p["problem_id"] in golden else None,
            golden[p["problem_id"]]["steps"] if p["problem_id"] in golden else None,
        )
        for p in problems
    ]


def suite_items(store: Store, suite: str, cfg: EvalConfig, run_id: str | None = None) -> SuiteLoad:
    """A suite's items: the warehouse's held-out (or OOD) problems, or the suite's file (`eval.suite_files`, else
    its public file name in `eval.suites_dir`), whose bad rows are quarantined to the warehouse when lenient."""
    if suite == HELDOUT:
        return SuiteLoad(heldout_items(store.warehouse, cfg.split, cfg.limit), [])
    if suite in OOD_SUITES:
        items = heldout_items(store.warehouse, suite, cfg.limit)
        if not items:
            raise SuiteDataError(
                f"suite {suite!r}: the warehouse has no {suite} problems; set problems.ood.n_problems (the "
                "synthetic generator draws them) and run the data stages"
            )
        return SuiteLoad(items, [])
    folder = Path(cfg.suites_dir) if cfg.suites_dir else store.benchmarks
    loaded = get_suite(suite).read(cfg.suite_files.get(suite), data_dir=folder, limit=cfg.limit, lenient=cfg.lenient)
    store.warehouse.insert_new("quarantine", quarantine_rows(f"suite:{suite}", loaded.quarantined), run_id)
    return loaded


def paired_items(items: list[EvalItem], variants: Sequence[str]) -> tuple[list[EvalItem], int]:
    """The items every variant can answer: with the golden variant, those with teacher signals (when any has them),
    so every row of a comparison is scored on the same items. Returns (items, how many were left out)."""
    if "golden" in variants and any(i.golden_signals for i in items):
        kept = [i for i in items if i.golden_signals]
        return kept, len(items) - len(kept)
    return items, 0


def load_for_eval(path: str | Path, kind: str | None = None) -> tuple[ScaffoldStudent, Formatter]:
    """A student (or backbone) and its formatter, after checking its tokenizer and heads (loud on a mismatch)."""
    model = ScaffoldStudent.from_pretrained(path, kind=kind)
    tokenizer = load_tokenizer(path)
    fmt = Formatter.for_model(path, tokenizer)
    if model.kind == "scaffold":
        check_tokenizer(path, tokenizer, fmt.tags)
    return model.eval(), fmt


def _local_or_registered(store: Store, handle: ModelHandle) -> Path:
    path = Path(handle.path)
    if (path / "config.json").exists():
        return path
    from scaffold_lib.store import registry

    return registry.download_model(store.registry, handle.version, model_name=handle.model_name)


def evaluate_models(
    store: Store,
    student: ModelHandle,
    baseline: ModelHandle | None,
    shards: ShardsHandle,
    cfg: EvalConfig,
    run_id: str | None = None,
    progress: bool = False,
) -> EvaluationHandle:
    """Pass@1 per suite for the student (every scaffold variant), the CoT-SFT baseline and the untuned backbone, with
    next-signal accuracy, signal fidelity and answer consistency; decoding caps from the training data's budget, the
    same for both arms. Rows (and per-item results) go to the warehouse and to the students' MLflow runs."""
    from scaffold_lib.store import registry

    wh = store.warehouse
    unknown = sorted(set(cfg.suite_files) - set(cfg.suites))
    if unknown:  # a file given for a suite that is not scored is a typo, not a wish
        raise SuiteDataError(f"eval.suite_files names {unknown}, which eval.suites {cfg.suites} does not score")
    loaded = {suite: suite_items(store, suite, cfg, run_id) for suite in cfg.suites}
    runs = {suite: suite_run(cfg, suite, shards.budget, loaded[suite].items) for suite in cfg.suites}
    evaluation_id = content_id(
        "evaluation",
        student.model_name,
        student.version,
        baseline and (baseline.model_name, baseline.version),
        sorted((s, r.config_hash) for s, r in runs.items()),
        cfg.include_base,
    )
    models: list[tuple[str, str, str | None, Path, str]] = [
        (student.model_name, student.version, student.mlflow_run_id, _local_or_registered(store, student), "scaffold")
    ]
    if baseline is not None:
        models.append(
            (
                baseline.model_name,
                baseline.version,
                baseline.mlflow_run_id,
                _local_or_registered(store, baseline),
                "baseline",
            )
        )
    if cfg.include_base:  # the backbone is no registered version: named by what the config named, never an MLflow run
        models.append(
            (
                f"base:{Path(shards.source_model).name or shards.source_model}",
                UNTUNED,
                None,
                Path(shards.base_model),
                BASE_VARIANT,
            )
        )
    all_rows: list[dict] = []
    counts, dropped, samples = {}, {}, {}
    correct: dict[str, dict[str, dict[str, bool]]] = {}  # suite -> variant -> item -> right
    for suite, run in runs.items():
        items, left_out = paired_items(loaded[suite].items, run.variants)
        if not items:
            raise ValueError(
                f"suite {suite!r} has no items to score"
                + (
                    f" in the {cfg.split} split: run the data stages (problems with a {cfg.split} split)"
                    if suite == HELDOUT
                    else ""
                )
            )
        counts[suite], dropped[suite] = len(items), left_out
        for name, version, mlflow_run, path, role in models:
            model, fmt = load_for_eval(path, kind="baseline" if role == BASE_VARIANT else None)
            if role == "scaffold":
                rows, records = evaluate_scaffold(model, fmt, items, run, progress)
            else:
                rows, records = evaluate_plain(
                    model, fmt, items, run, "cot_sft" if role == "baseline" else BASE_VARIANT, progress
                )
            all_rows += _store_scores(wh, evaluation_id, name, version, mlflow_run, rows, records, run_id)
            for r in records:
                correct.setdefault(suite, {}).setdefault(r.variant, {})[r.doc_id] = r.correct
            if cfg.export_samples and records:
                label = model_label(name, version)
                out = paths.inside(
                    store.artifacts / "samples", suite, label.replace("/", "_").replace(" ", "-") + ".jsonl"
                )
                samples[f"{suite}: {label}"] = str(export_samples(records, out))
    table, detail = comparison_table_markdown(all_rows), score_table_markdown(all_rows)
    table += "\n\n" + paired_differences_markdown(correct)
    reg = store.registry
    for mlflow_run in {r["mlflow_run_id"] for r in all_rows if r["mlflow_run_id"]}:
        own = [r for r in all_rows if r["mlflow_run_id"] == mlflow_run]
        whole = mlflow_run == student.mlflow_run_id  # the student's run gets the whole comparison
        registry.log_scores(
            reg,
            mlflow_run,
            all_rows if whole else own,
            table + "\n\n" + detail if whole else score_table_markdown(own),
            "scores-" + "-".join(runs),
        )
    return EvaluationHandle(
        evaluation_id=evaluation_id,
        model_name=student.model_name,
        version=student.version,
        baseline=baseline and f"{baseline.model_name} v{baseline.version}",
        suites=list(runs),
        split=cfg.split,
        eval_config_hashes={s: r.config_hash for s, r in runs.items()},
        rows=all_rows,
        items=counts,
        dropped_without_golden=dropped,
        contamination=suite_contamination(
            store, [s for s in runs if not from_warehouse(s)], student.model_name, student.version
        ),
        samples=samples,
        quarantined={s: len(load.quarantined) for s, load in loaded.items() if load.quarantined},
        comparison_table=table,
        score_table=detail,
    )


def _store_scores(
    wh: Warehouse,
    evaluation_id: str,
    name: str,
    version: str,
    mlflow_run: str | None,
    rows: list[ScoreRow],
    records: list[SampleRecord],
    run_id: str | None,
) -> list[dict]:
    dict_rows = [
        {
            **r.as_row(),
            "model_name": name,
            "version": version,
            "mlflow_run_id": mlflow_run,
            "evaluation_id": evaluation_id,
            "score_id": content_id("score", name, version, r.benchmark, r.split, r.variant, r.eval_config_hash),
        }
        for r in rows
    ]
    wh.insert_new("benchmark_scores", dict_rows, run_id)
    by_variant = {r.variant: r for r in rows}
    wh.insert_new(
        "item_scores",
        [
            {
                "evaluation_id": evaluation_id,
                "model_name": name,
                "version": version,
                "benchmark": by_variant[rec.variant].benchmark,
                "split": by_variant[rec.variant].split,
                "variant": rec.variant,
                "doc_id": rec.doc_id,
                "correct": rec.correct,
                "extracted": rec.extracted,
                "gold": rec.gold,
                "n_steps": len(rec.signals),
                "new_tokens": rec.new_tokens,
                "stopped_by": rec.stopped_by,
                "response": rec.response,
            }
            for rec in records
        ],
        run_id,
    )
    return [{**r, "model": model_label(name, version)} for r in dict_rows]


# --- promotion -----------------------------------------------------------------------------------------------------


def promote_challenger(
    store: Store,
    evaluation: EvaluationHandle,
    cfg: PromotionConfig,
    failed_gates: Sequence[str] = (),
    who: str = "scaffold",
):
    """Move `champion` to the evaluated student when every gate passed and its score on the promotion suite beats the
    current champion's (same eval config) by the margin; otherwise record why on the version."""
    from scaffold_lib.store import registry

    wh, reg = store.warehouse, store.registry
    config_hash = evaluation.eval_config_hashes.get(cfg.suite)
    failed = list(failed_gates)
    if config_hash is None:
        failed.append(f"the evaluation did not score the promotion suite {cfg.suite!r}")
    contaminated = evaluation.contamination.get(cfg.suite, {}).get("trained_on", 0)
    if contaminated:
        failed.append(
            f"{contaminated} training problems of v{evaluation.version} overlap the promotion suite "
            f"{cfg.suite!r} (decontamination.action = 'exclude' leaves them out)"
        )

    def accuracy(version: str) -> float | None:
        return wh.scalar(
            "SELECT max(accuracy) FROM benchmark_scores WHERE model_name = ? AND version = ? "
            "AND variant = ? AND eval_config_hash = ?",
            [reg.model_name, version, cfg.variant, config_hash],
        )

    outcome = registry.promote_if_better(reg, evaluation.version, accuracy, cfg.margin, failed, who=who)
    registry.append_description(
        reg,
        evaluation.version,
        f"Promotion: {'yes' if outcome.promoted else 'no'} — {outcome.reason}\n\n{evaluation.comparison_table}",
    )
    return outcome
