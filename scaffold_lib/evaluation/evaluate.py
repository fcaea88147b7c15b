"""The evaluation stage: benchmark scores of a trained pair (scaffold student and CoT-SFT baseline, plus the untuned
backbone) on every configured suite — the warehouse's held-out (or OOD) problems, or a benchmark's file — with the
process metrics. Every variant answers the same items; scores go to the warehouse (one row per model × suite ×
variant, one per answer so comparisons can be paired) and to the students' MLflow runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from scaffold_lib.core import paths
from scaffold_lib.core.errors import StageFailed
from scaffold_lib.core.ids import content_id
from scaffold_lib.data.problems import quarantine_rows
from scaffold_lib.evaluation.config import EvalConfig
from scaffold_lib.evaluation.decontaminate import suite_contamination
from scaffold_lib.evaluation.handles import UNTUNED, EvaluationHandle, model_label
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
from scaffold_lib.store import data_tables, registry
from scaffold_lib.store.store import Store
from scaffold_lib.store.training_data import training_traces
from scaffold_lib.store.warehouse import Warehouse
from scaffold_lib.student.examples import Formatter
from scaffold_lib.student.handles import ModelHandle, ShardsHandle
from scaffold_lib.student.model import ScaffoldStudent, check_tokenizer, load_tokenizer


def heldout_items(wh: Warehouse, split: str = "test", limit: int | None = None) -> list[EvalItem]:
    """Held-out problems of `split`, with the teacher's steps and signals as golden where the teacher traced the
    problem (its correct trace when it has one)."""
    problems = data_tables.problems_of_split(wh, split)[:limit]
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
    formatter = Formatter.for_model(path, tokenizer)
    if model.kind == "scaffold":
        check_tokenizer(path, tokenizer, formatter.tags)
    return model.eval(), formatter


def _local_or_registered(store: Store, handle: ModelHandle) -> Path:
    path = Path(handle.path)
    if (path / "config.json").exists():
        return path
    return registry.download_model(store.registry, handle.version, model_name=handle.model_name)


@dataclass(frozen=True)
class _Scored:
    """A model an evaluation scores: its registered name and version, its MLflow run, where it is, and its role."""

    name: str
    version: str
    mlflow_run: str | None
    path: Path
    role: str  # scaffold, baseline or the untuned backbone (BASE_VARIANT)


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
    models = _models_scored(store, student, baseline, shards, cfg.include_base)
    all_rows: list[dict] = []
    counts, dropped, samples = {}, {}, {}
    correct: dict[str, dict[str, dict[str, bool]]] = {}  # suite -> variant -> item -> right
    for suite, run in runs.items():
        items, left_out = paired_items(loaded[suite].items, run.variants)
        if not items:
            where = f" in the {cfg.split} split: run the data stages (problems with a {cfg.split} split)"
            raise StageFailed(f"suite {suite!r} has no items to score" + (where if suite == HELDOUT else ""))
        counts[suite], dropped[suite] = len(items), left_out
        for scored in models:
            model, formatter = load_for_eval(scored.path, kind="baseline" if scored.role == BASE_VARIANT else None)
            if scored.role == "scaffold":
                rows, records = evaluate_scaffold(model, formatter, items, run, progress)
            else:
                variant = "cot_sft" if scored.role == "baseline" else BASE_VARIANT
                rows, records = evaluate_plain(model, formatter, items, run, variant, progress)
            all_rows += _store_scores(store.warehouse, evaluation_id, scored, rows, records, run_id)
            for r in records:
                correct.setdefault(suite, {}).setdefault(r.variant, {})[r.doc_id] = r.correct
            if cfg.export_samples and records:
                label = model_label(scored.name, scored.version)
                name = label.replace("/", "_").replace(" ", "-") + ".jsonl"
                samples[f"{suite}: {label}"] = str(
                    export_samples(records, paths.inside(store.artifacts / "samples", suite, name))
                )
    table, detail = comparison_table_markdown(all_rows), score_table_markdown(all_rows)
    table += "\n\n" + paired_differences_markdown(correct)
    _log_scores(store, student, all_rows, table, detail, "scores-" + "-".join(runs))
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


def _models_scored(
    store: Store, student: ModelHandle, baseline: ModelHandle | None, shards: ShardsHandle, include_base: bool
) -> list[_Scored]:
    """The student, its baseline when given, and the untuned backbone when asked for (no registered version: named
    by what the config named, never an MLflow run)."""
    models = [
        _Scored(
            student.model_name, student.version, student.mlflow_run_id, _local_or_registered(store, student), "scaffold"
        )
    ]
    if baseline is not None:
        path = _local_or_registered(store, baseline)
        models.append(_Scored(baseline.model_name, baseline.version, baseline.mlflow_run_id, path, "baseline"))
    if include_base:
        name = f"base:{Path(shards.source_model).name or shards.source_model}"
        models.append(_Scored(name, UNTUNED, None, Path(shards.base_model), BASE_VARIANT))
    return models


def _log_scores(store: Store, student: ModelHandle, rows: list[dict], table: str, detail: str, artifact: str) -> None:
    """Each scored model's MLflow run gets its rows; the student's run gets the whole comparison."""
    for mlflow_run in {r["mlflow_run_id"] for r in rows if r["mlflow_run_id"]}:
        own = [r for r in rows if r["mlflow_run_id"] == mlflow_run]
        whole = mlflow_run == student.mlflow_run_id
        registry.log_scores(
            store.registry,
            mlflow_run,
            rows if whole else own,
            table + "\n\n" + detail if whole else score_table_markdown(own),
            artifact,
        )


def _store_scores(
    wh: Warehouse,
    evaluation_id: str,
    scored: _Scored,
    rows: list[ScoreRow],
    records: list[SampleRecord],
    run_id: str | None,
) -> list[dict]:
    """One model's score rows and answers into the warehouse; the rows as the tables show them."""
    name, version, mlflow_run = scored.name, scored.version, scored.mlflow_run
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
