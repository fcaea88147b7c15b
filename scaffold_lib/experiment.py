"""The experiment: does scaffolding beat CoT distillation? Both arms are trained over several seeds on the same data;
τ (and, when asked, β) is chosen on the validation split; every variant is then scored once on the test split; the
arms are compared item by item (paired bootstrap interval, exact McNemar test), per seed and pooled over seeds; the
wrong answers are sorted into error categories; and the signal head's calibration is measured on validation.

Everything lands in the warehouse (`experiment_scores`, with item-level correctness in `item_scores` through the
evaluation ids) and in MLflow (a parent run holding the report and the τ plot, the training runs as its children).
`scaffold experiment` and the Dagster `experiment` job run this function.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from scaffold_lib.config import PipelineConfig
from scaffold_lib.core.ids import content_id
from scaffold_lib.evaluation.errors import error_table, error_table_markdown
from scaffold_lib.evaluation.metrics import signal_predictions
from scaffold_lib.evaluation.stages import EvaluationHandle, evaluate_models, heldout_items, load_for_eval
from scaffold_lib.evaluation.stats import Calibration, calibration, mean_sd, paired_comparison
from scaffold_lib.evaluation.suites import HELDOUT
from scaffold_lib.store.store import Store
from scaffold_lib.student.stages import ModelHandle, ShardsHandle, pack_shards, train_model

COMPARISONS = (
    ("predicted", "cot_sft"),
    ("golden", "predicted"),
    ("predicted", "random"),
    ("summaries_only", "predicted"),
    ("golden", "cot_sft"),
)


@dataclass
class ExperimentResult:
    experiment_id: str
    tau: float
    beta: float
    report: str
    comparisons: dict[str, dict] = field(default_factory=dict)  # "predicted-cot_sft" -> pooled PairedComparison
    per_seed: dict[str, dict[int, float]] = field(default_factory=dict)  # variant -> seed -> test Pass@1
    report_path: str = ""
    plot_path: str = ""
    minutes: float = 0.0


def _item_correctness(store: Store, evaluation: EvaluationHandle) -> dict[tuple[str, str], dict[str, bool]]:
    """(model name, variant) -> doc_id -> correct, for one evaluation."""
    rows = store.warehouse.query(
        "SELECT model_name, variant, doc_id, correct FROM item_scores WHERE evaluation_id = ?",
        [evaluation.evaluation_id],
    )
    out: dict[tuple[str, str], dict[str, bool]] = {}
    for r in rows:
        out.setdefault((r["model_name"], r["variant"]), {})[r["doc_id"]] = r["correct"]
    return out


def _accuracy(evaluation: EvaluationHandle, variant: str) -> tuple[float, dict]:
    row = next(r for r in evaluation.rows if r["variant"] == variant)
    return row["accuracy"], row


def _forced_share(store: Store, evaluation: EvaluationHandle) -> float:
    return store.warehouse.scalar(
        "SELECT coalesce(avg((stopped_by = 'tau')::INT), 0) FROM item_scores WHERE evaluation_id = ? "
        "AND variant = 'predicted'",
        [evaluation.evaluation_id],
    )


def tau_plot(sweep: dict[float, list[float]], chosen: float, path: Path) -> Path:
    """Pass@1 on validation against τ (mean over seeds, with their spread)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    taus = sorted(sweep)
    means = [mean_sd(sweep[t])[0] * 100 for t in taus]
    sds = [mean_sd(sweep[t])[1] * 100 for t in taus]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.errorbar(taus, means, yerr=sds, marker="o", capsize=3)
    ax.axvline(chosen, color="grey", linestyle=":", label=f"chosen τ = {chosen}")
    ax.set_xlabel("τ (confidence to write another step)")
    ax.set_ylabel("Pass@1 on validation (%)")
    ax.set_title("Scaffold student, predicted signals")
    ax.legend(loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def run_experiment(
    store: Store,
    cfg: PipelineConfig,
    run_id: str | None = None,
    *,
    preset: str = "",
    log: Callable[[str], None] = print,
    progress: bool = False,
) -> ExperimentResult:
    """Train, tune on validation, test once, compare; the data stages must have run (`pipeline.run_data_stages`)."""
    from scaffold_lib.store import registry

    started = time.perf_counter()
    run_id = run_id or f"experiment-{uuid.uuid4()}"
    exp = cfg.experiment
    experiment_id = content_id("experiment", cfg.model_dump(mode="json"), run_id)
    out_dir = store.artifacts / "experiments" / experiment_id
    reg = store.registry
    parent = registry.start_run(
        reg,
        f"experiment-{experiment_id[:8]}",
        params={"experiment": exp.model_dump(), "train": cfg.train.model_dump(), "preset": preset},
        tags={"experiment_id": experiment_id, "kind": "experiment", "run_id": run_id},
    )
    try:
        result = _run(store, cfg, run_id, experiment_id, parent, out_dir, preset, log, progress)
    except BaseException:
        registry.finish_run(reg, parent, failed=True)
        raise
    result.minutes = (time.perf_counter() - started) / 60
    registry.log_metrics(
        reg,
        parent,
        0,
        {f"pooled.{k}.difference": v["difference"] for k, v in result.comparisons.items()}
        | {f"pooled.{k}.p_value": v["p_value"] for k, v in result.comparisons.items()}
        | {"tau": result.tau, "beta": result.beta, "minutes": result.minutes},
    )
    client = registry.client(reg)
    client.log_text(parent, result.report, "report.md")
    client.log_artifact(parent, result.plot_path)
    registry.finish_run(reg, parent)
    log(f"experiment {experiment_id}: {result.minutes:.1f} min; report {result.report_path}")
    return result


def _train(
    store: Store,
    shards: ShardsHandle,
    cfg: PipelineConfig,
    kind: str,
    seed: int,
    beta: float,
    run_id: str,
    tags: dict[str, str],
    progress: bool,
) -> ModelHandle:
    train = cfg.train.model_copy(update={"seed": seed, "beta": beta})
    serving = cfg.eval.decode.resolved(shards.budget).model_dump()
    return train_model(
        store, shards, train, kind, run_id, tags={**tags, "seed": str(seed)}, serving_decode=serving, progress=progress
    )


def _run(
    store: Store,
    cfg: PipelineConfig,
    run_id: str,
    experiment_id: str,
    parent: str,
    out_dir: Path,
    preset: str,
    log: Callable[[str], None],
    progress: bool,
) -> ExperimentResult:
    exp = cfg.experiment
    tags = {"experiment_id": experiment_id, "mlflow.parentRunId": parent}
    shards = pack_shards(store, cfg.shards, cfg.student, run_id)
    log(f"shards: {shards.traces} training traces, manifests {shards.manifests}")
    validation = cfg.eval.model_copy(
        update={
            "suites": [HELDOUT],
            "split": "validation",
            "limit": exp.validation_limit,
            "variants": ["predicted"],
            "include_base": False,
            "export_samples": False,
        }
    )
    rows: list[dict] = []

    def record(seed: int, evaluation: EvaluationHandle, tau: float, purpose: str) -> None:
        for r in evaluation.rows:
            rows.append(
                {
                    "experiment_id": experiment_id,
                    "seed": seed,
                    "model_name": r["model_name"],
                    "version": r["version"],
                    "variant": r["variant"],
                    "split": r["split"],
                    "tau": tau,
                    "purpose": purpose,
                    "n": r["n"],
                    "accuracy": r["accuracy"],
                    "mean_steps": r["mean_steps"],
                    "evaluation_id": evaluation.evaluation_id,
                }
            )

    def validate(model: ModelHandle, tau: float) -> EvaluationHandle:
        decode = validation.decode.model_copy(update={"tau": tau})
        return evaluate_models(store, model, None, shards, validation.model_copy(update={"decode": decode}), run_id)

    # β on validation (first seed), when a grid is given
    beta, beta_scores = cfg.train.beta, {}
    if exp.betas:
        for b in exp.betas:
            candidate = _train(store, shards, cfg, "scaffold", exp.seeds[0], b, run_id, tags, progress)
            beta_scores[b] = _accuracy(validate(candidate, 0.0), "predicted")[0]
            log(f"β = {b}: validation Pass@1 {100 * beta_scores[b]:.1f} %")
        beta = max(exp.betas, key=lambda b: (beta_scores[b], -b))
    students, baselines = {}, {}
    for seed in exp.seeds:
        students[seed] = _train(store, shards, cfg, "scaffold", seed, beta, run_id, tags, progress)
        baselines[seed] = _train(store, shards, cfg, "baseline", seed, beta, run_id, tags, progress)
        log(
            f"seed {seed}: scaffold v{students[seed].version} loss {students[seed].final_loss:.3f}, "
            f"baseline v{baselines[seed].version} loss {baselines[seed].final_loss:.3f}"
        )

    # τ on validation, and the signal head's calibration there
    sweep: dict[float, list[float]] = {t: [] for t in exp.taus}
    sweep_rows = []
    confidences, hits = [], []
    val_items = heldout_items(store.warehouse, "validation", exp.validation_limit)
    for seed, student in students.items():
        model, fmt = load_for_eval(student.path)
        probs, targets = signal_predictions(model, fmt, val_items)
        conf, pred = probs.max(-1)
        confidences += conf.tolist()
        hits += (pred == targets).tolist()
        for tau in exp.taus:
            evaluation = validate(student, tau)
            accuracy, row = _accuracy(evaluation, "predicted")
            sweep[tau].append(accuracy)
            sweep_rows.append(
                {
                    "seed": seed,
                    "tau": tau,
                    "accuracy": accuracy,
                    "mean_steps": row["mean_steps"],
                    "forced": _forced_share(store, evaluation),
                }
            )
            record(seed, evaluation, tau, "validation")
    tau = max(exp.taus, key=lambda t: (mean_sd(sweep[t])[0], -t))  # ties go to the smaller τ
    log(
        f"τ chosen on validation: {tau} ("
        + ", ".join(f"{t}: {100 * mean_sd(v)[0]:.1f} %" for t, v in sweep.items())
        + ")"
    )
    calib = calibration(confidences, hits)

    # test, once
    test = cfg.eval.model_copy(
        update={
            "suites": [HELDOUT],
            "split": "test",
            "limit": exp.test_limit,
            "decode": cfg.eval.decode.model_copy(update={"tau": tau}),
        }
    )
    by_seed: dict[int, dict[tuple[str, str], dict[str, bool]]] = {}
    per_seed: dict[str, dict[int, float]] = {}
    test_evaluations = {}
    for i, seed in enumerate(exp.seeds):
        run_cfg = test.model_copy(update={"include_base": test.include_base and i == 0})
        evaluation = evaluate_models(store, students[seed], baselines[seed], shards, run_cfg, run_id)
        test_evaluations[seed] = evaluation
        record(seed, evaluation, tau, "test")
        by_seed[seed] = _item_correctness(store, evaluation)
        for r in evaluation.rows:
            per_seed.setdefault(r["variant"], {})[seed] = r["accuracy"]
    store.warehouse.insert_new(
        "experiment_scores", [{**r, "row_id": content_id("experiment-row", r)} for r in rows], run_id
    )

    comparisons, per_seed_lines = {}, []
    for a, b in COMPARISONS:
        pooled_a, pooled_b = [], []
        for seed in exp.seeds:
            items_a = next((v for (name, variant), v in by_seed[seed].items() if variant == a), None)
            items_b = next((v for (name, variant), v in by_seed[seed].items() if variant == b), None)
            if not items_a or not items_b:
                continue
            common = sorted(set(items_a) & set(items_b))
            pooled_a += [items_a[d] for d in common]
            pooled_b += [items_b[d] for d in common]
            per_seed_lines.append(
                f"- seed {seed}: "
                + paired_comparison(
                    [items_a[d] for d in common], [items_b[d] for d in common], exp.bootstrap, seed
                ).line(a, b)
            )
        if pooled_a:
            comparisons[f"{a}-{b}"] = paired_comparison(pooled_a, pooled_b, exp.bootstrap).as_dict()

    errors = error_table(_error_rows(store, test_evaluations))
    plot = tau_plot(sweep, tau, out_dir / "tau.png")
    report = _report(
        cfg,
        preset,
        experiment_id,
        shards,
        beta,
        beta_scores,
        tau,
        sweep_rows,
        calib,
        per_seed,
        comparisons,
        per_seed_lines,
        errors,
        students,
        baselines,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.md").write_text(report)
    (out_dir / "summary.json").write_text(
        json.dumps(
            {
                "tau": tau,
                "beta": beta,
                "comparisons": comparisons,
                "per_seed": per_seed,
                "errors": errors,
                "calibration_ece": calib.ece,
            },
            indent=2,
            default=str,
        )
    )
    return ExperimentResult(
        experiment_id, tau, beta, report, comparisons, per_seed, str(out_dir / "report.md"), str(plot)
    )


def _error_rows(store: Store, evaluations: dict[int, EvaluationHandle]) -> list[dict]:
    ids = [e.evaluation_id for e in evaluations.values()]
    return store.warehouse.query(
        """
        SELECT i.variant AS arm, p.question, i.response, i.extracted, i.stopped_by, i.correct
        FROM item_scores i JOIN problems p ON p.problem_id = i.doc_id
        WHERE list_contains(?, i.evaluation_id) AND list_contains(['predicted', 'cot_sft', 'golden'], i.variant)""",
        [ids],
    )


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def _report(
    cfg: PipelineConfig,
    preset: str,
    experiment_id: str,
    shards: ShardsHandle,
    beta: float,
    beta_scores: dict,
    tau: float,
    sweep_rows: list[dict],
    calib: Calibration,
    per_seed: dict,
    comparisons: dict,
    per_seed_lines: list[str],
    errors: dict,
    students: dict,
    baselines: dict,
) -> str:
    exp = cfg.experiment
    seeds = exp.seeds
    lines = [
        f"# Experiment {experiment_id}",
        "",
        f"Preset `{preset or 'custom'}`; seeds {seeds}; {shards.traces} training traces; β = {beta}"
        + (f" (chosen on validation from {beta_scores})" if beta_scores else " (fixed)")
        + f"; τ = {tau} (chosen on validation).",
        "",
        "## Test Pass@1 per variant (mean ± sd over seeds)",
        "",
        "| variant | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd |",
        "|---|" + "---:|" * (len(seeds) + 1),
    ]
    order = ("base", "cot_sft", "golden", "predicted", "random", "summaries_only")
    for variant in [v for v in order if v in per_seed]:
        values = [per_seed[variant].get(s) for s in seeds]
        present = [v for v in values if v is not None]
        mean, sd = mean_sd(present)
        lines.append(
            f"| {variant} | "
            + " | ".join("–" if v is None else _pct(v) for v in values)
            + f" | {_pct(mean)} ± {_pct(sd)} |"
        )
    lines += [
        "",
        "## Paired comparisons on test (pooled over seeds: every seed × item is a pair)",
        "",
        "| comparison | difference (points) | 95 % CI (paired bootstrap) | discordant A/B | McNemar p |",
        "|---|---:|---|---:|---:|",
    ]
    for key, c in comparisons.items():
        a, b = key.split("-")
        lines.append(
            f"| {a} − {b} | {100 * c['difference']:+.1f} | {100 * c['ci_low']:+.1f} to "
            f"{100 * c['ci_high']:+.1f} | {c['a_only']}/{c['b_only']} | {c['p_value']:.3g} |"
        )
    lines += [
        "",
        "Per seed:",
        "",
        *per_seed_lines,
        "",
        "## τ on validation (predicted signals)",
        "",
        "| τ | seed | Pass@1 | mean steps | answers forced by τ |",
        "|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['tau']} | {r['seed']} | {_pct(r['accuracy'])} | {r['mean_steps']:.2f} | {_pct(r['forced'])} % |"
        for r in sweep_rows
    ]
    lines += [
        "",
        "## Calibration of the signal head on validation (teacher-forced step boundaries)",
        "",
        calib.markdown(),
        "",
        "## Wrong answers on test, by cause (pooled over seeds)",
        "",
        error_table_markdown(errors) if errors else "(no synthetic problems to analyse)",
        "",
        "## Models",
        "",
    ]
    lines += [f"- seed {s}: scaffold {students[s].model_uri}, baseline {baselines[s].model_uri}" for s in seeds]
    return "\n".join(lines) + "\n"
