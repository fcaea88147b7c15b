"""The experiment: does scaffolding beat CoT distillation? The protocol `docs/preregistration.md` fixes before a
confirmatory run:

1. settings tuned on validation only: the signal injection and β (first seed, when grids are given), then τ (every
   seed); test is scored once, with what validation chose;
2. the bed's own diagnostics on validation (`evaluation.bed`): step execution of both arms, and the next signal as
   four predictors see it (position, position + previous signal, the CoT-SFT student's implicit choice, the head);
3. both arms trained over the seeds on the same traces for the same number of epochs (tokens seen are reported);
4. every variant scored on the test split and on the out-of-distribution suites the warehouse holds;
5. comparisons with the item as the unit: per item, correctness averaged over seeds, the arms paired over items
   (bootstrap interval, sign-flip test); McNemar per seed as a secondary analysis;
6. sample efficiency: both arms retrained (first seed) on fractions of the training data;
7. wrong answers by cause, and the signal head's calibration on validation.

Everything lands in the warehouse (`experiment_scores`, item-level rows in `item_scores`) and in MLflow (a parent run
with the report and the τ plot, the training runs as its children). Beside this module: `experiment_context` (what
every step shares: training an arm, evaluating, recording), `experiment_comparison` (step 5) and `experiment_report`
(the rendered report). `scaffold experiment` and the Dagster `experiment` job run `run_experiment`.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid

from scaffold_lib.config import PipelineConfig
from scaffold_lib.core.ids import content_id
from scaffold_lib.evaluation import bed
from scaffold_lib.evaluation.error_analysis import error_table
from scaffold_lib.evaluation.evaluate import heldout_items, load_for_eval
from scaffold_lib.evaluation.handles import EvaluationHandle
from scaffold_lib.evaluation.metrics import signal_predictions
from scaffold_lib.evaluation.stats import calibration, item_comparison, mean_sd
from scaffold_lib.evaluation.suites import HELDOUT, OOD_SUITES
from scaffold_lib.experiment_comparison import compare, item_matrix
from scaffold_lib.experiment_context import Context, Log
from scaffold_lib.experiment_report import PRIMARY, ExperimentResult, render_report, tau_plot
from scaffold_lib.store import data_tables
from scaffold_lib.store.scores import answers_with_questions
from scaffold_lib.store.store import Store
from scaffold_lib.store.training_data import training_traces
from scaffold_lib.student.handles import ModelHandle, ShardsHandle
from scaffold_lib.student.pack import pack_shards


def run_experiment(
    store: Store,
    cfg: PipelineConfig,
    run_id: str | None = None,
    *,
    preset: str = "",
    log: Log = print,
    progress: bool = False,
) -> ExperimentResult:
    """Tune on validation, train both arms over seeds, test once, compare item by item; the data stages must have run
    (`runner.run_data_stages`)."""
    from scaffold_lib.store import registry

    started = time.perf_counter()
    run_id = run_id or f"experiment-{uuid.uuid4()}"
    experiment_id = content_id("experiment", cfg.model_dump(mode="json"), run_id)
    reg = store.registry
    parent = registry.start_run(
        reg,
        f"experiment-{experiment_id[:8]}",
        params={"experiment": cfg.experiment.model_dump(), "train": cfg.train.model_dump(), "preset": preset},
        tags={"experiment_id": experiment_id, "kind": "experiment", "run_id": run_id},
    )
    ctx = Context(
        store, cfg, run_id, experiment_id, {"experiment_id": experiment_id, "mlflow.parentRunId": parent}, log, progress
    )
    try:
        result = _run(ctx, preset)
    except BaseException:
        registry.finish_run(reg, parent, failed=True)
        raise
    result.minutes = (time.perf_counter() - started) / 60
    registry.log_metrics(
        reg,
        parent,
        0,
        {f"{k}.difference": v["difference"] for k, v in result.comparisons.items()}
        | {f"{k}.p_value": v["p_value"] for k, v in result.comparisons.items()}
        | {"tau": result.tau, "beta": result.beta, "minutes": result.minutes},
    )
    client = registry.client(reg)
    client.log_text(parent, result.report, "report.md")
    client.log_artifact(parent, result.plot_path)
    registry.finish_run(reg, parent)
    log(f"experiment {experiment_id}: {result.minutes:.1f} min; report {result.report_path}")
    return result


def _run(ctx: Context, preset: str) -> ExperimentResult:
    exp = ctx.cfg.experiment
    shards = pack_shards(ctx.store, ctx.cfg.shards, ctx.cfg.student, ctx.run_id)
    ctx.log(f"shards: {shards.traces} training traces, manifests {shards.manifests}")
    shards, beta, tuning, first = tune_student(ctx, shards)
    students, baselines = train_arms(ctx, shards, beta, first)
    tau, sweep = choose_tau(ctx, shards, students)
    diagnostics = diagnose_bed(ctx, students[exp.seeds[0]], baselines[exp.seeds[0]])
    diagnostics["tuning"] = tuning
    tests = score_on_test(ctx, shards, students, baselines, tau)
    comparisons, per_seed, mcnemar = compare(ctx, tests)
    efficiency = sample_efficiency(ctx, shards, beta, tau, students, baselines, tests)
    ctx.store.warehouse.insert_new(
        "experiment_scores", [{**r, "row_id": content_id("experiment-row", r)} for r in ctx.rows], ctx.run_id
    )
    out_dir = ctx.store.artifacts / "experiments" / ctx.experiment_id
    plot = tau_plot(sweep, tau, out_dir / "tau.png")
    errors = error_table(_error_rows(ctx.store, [e for e in tests[HELDOUT].values()]))
    models = [
        {"seed": s, "arm": arm, "model": m.model_uri, "steps": m.steps, "tokens": m.train_tokens}
        for s in exp.seeds
        for arm, m in (("scaffold", students[s]), ("cot_sft", baselines[s]))
    ]
    result = ExperimentResult(
        ctx.experiment_id,
        tau,
        beta,
        shards.signal_injection,
        "",
        comparisons,
        per_seed,
        diagnostics,
        efficiency,
        str(out_dir / "report.md"),
        str(plot),
        preset=preset,
        seeds=list(exp.seeds),
        traces=shards.traces,
        sweep=sweep,
        mcnemar=mcnemar,
        errors=errors,
        models=models,
        smallest_effect=exp.smallest_effect,
    )
    result.report = render_report(result)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.md").write_text(result.report)
    summary = {k: getattr(result, k) for k in ("tau", "beta", "injection", "comparisons", "per_seed", "efficiency")}
    (out_dir / "summary.json").write_text(
        json.dumps({**summary, "diagnostics": diagnostics, "errors": errors}, indent=2, default=str)
    )
    return result


# --- 1. tuning on validation ---------------------------------------------------------------------------------------


def tune_student(ctx: Context, shards: ShardsHandle) -> tuple[ShardsHandle, float, list[dict], ModelHandle | None]:
    """The signal injection and β with the best validation Pass@1 (first seed, τ = the grid's first), when the
    experiment gives grids; ties go to the listed order. Returns the shards handle carrying the chosen injection, β,
    the grid's scores and the first seed's scaffold student of the chosen setting (not trained again)."""
    exp = ctx.cfg.experiment
    injections = exp.injections or [shards.signal_injection]
    betas = exp.betas or [ctx.cfg.train.beta]
    grid = list(itertools.product(injections, betas))
    if len(grid) == 1:
        return shards.model_copy(update={"signal_injection": grid[0][0]}), grid[0][1], [], None
    scores, models = [], {}
    for injection, beta in grid:
        candidate = shards.model_copy(update={"signal_injection": injection})
        models[injection, beta] = ctx.train(candidate, "scaffold", exp.seeds[0], beta)
        accuracy = ctx.validate(models[injection, beta], candidate, exp.taus[0])
        scores.append({"injection": injection, "beta": beta, "validation_pass_at_1": accuracy})
        ctx.log(f"injection {injection}, β = {beta}: validation Pass@1 {100 * accuracy:.1f} %")
    best = max(scores, key=lambda s: s["validation_pass_at_1"])  # max keeps the first of equals
    chosen = (best["injection"], best["beta"])
    return shards.model_copy(update={"signal_injection": chosen[0]}), chosen[1], scores, models[chosen]


# --- 3. both arms over the seeds -----------------------------------------------------------------------------------


def train_arms(
    ctx: Context, shards: ShardsHandle, beta: float, first: ModelHandle | None
) -> tuple[dict[int, ModelHandle], dict[int, ModelHandle]]:
    students, baselines = {}, {}
    for i, seed in enumerate(ctx.cfg.experiment.seeds):
        students[seed] = first if i == 0 and first is not None else ctx.train(shards, "scaffold", seed, beta)
        baselines[seed] = ctx.train(shards, "baseline", seed, beta)
        ctx.log(
            f"seed {seed}: scaffold v{students[seed].version} ({students[seed].steps} steps, "
            f"{students[seed].train_tokens:,} tokens, loss {students[seed].final_loss:.3f}), baseline "
            f"v{baselines[seed].version} ({baselines[seed].steps} steps, {baselines[seed].train_tokens:,} tokens, "
            f"loss {baselines[seed].final_loss:.3f})"
        )
    return students, baselines


def choose_tau(
    ctx: Context, shards: ShardsHandle, students: dict[int, ModelHandle]
) -> tuple[float, dict[float, list[float]]]:
    """τ with the best mean validation Pass@1 over the seeds (ties to the smaller τ)."""
    taus = ctx.cfg.experiment.taus
    sweep: dict[float, list[float]] = {t: [] for t in taus}
    for student in students.values():
        for tau in taus:
            sweep[tau].append(ctx.validate(student, shards, tau))
    tau = max(taus, key=lambda t: (mean_sd(sweep[t])[0], -t))
    ctx.log(
        f"τ chosen on validation: {tau} ("
        + ", ".join(f"{t}: {100 * mean_sd(v)[0]:.1f} %" for t, v in sweep.items())
        + ")"
    )
    return tau, sweep


# --- 2. the bed's diagnostics ----------------------------------------------------------------------------------------


def diagnose_bed(ctx: Context, student: ModelHandle, baseline: ModelHandle) -> dict:
    """Step execution of both arms and the four next-signal predictors, on validation (first seed's models), and the
    signal head's calibration there."""
    items = heldout_items(ctx.store.warehouse, "validation", ctx.cfg.experiment.validation_limit)
    flows = [t["signals"] for t in training_traces(ctx.store.warehouse, ("train",))[0]]
    scaffold, scaffold_fmt = load_for_eval(student.path)
    plain, plain_fmt = load_for_eval(baseline.path)
    probs, targets = signal_predictions(scaffold, scaffold_fmt, items)
    conf, pred = probs.max(-1)
    out = {
        "step_execution": {
            "scaffold": bed.step_execution(scaffold, scaffold_fmt, items),
            "cot_sft": bed.step_execution(plain, plain_fmt, items),
        },
        "next_signal": {
            **bed.structure_accuracy(flows, items),
            "cot_sft_implicit": bed.implicit_signal_accuracy(plain, plain_fmt, items)["cot_sft_implicit"],
            "signal_head": float((pred == targets).float().mean()) if len(targets) else None,
        },
        "signals_in_training": bed.flow_table(flows),
        "calibration": calibration(conf.tolist(), (pred == targets).tolist()),
    }
    ctx.log(f"bed diagnostics: {json.dumps({k: v for k, v in out.items() if k != 'calibration'}, default=str)}")
    return out


# --- 4. test, once ---------------------------------------------------------------------------------------------------


def ood_suites(ctx: Context) -> list[str]:
    """The OOD suites the warehouse holds problems of."""
    present = data_tables.splits_present(ctx.store.warehouse)
    return [s for s in OOD_SUITES if s in present]


def score_on_test(
    ctx: Context,
    shards: ShardsHandle,
    students: dict[int, ModelHandle],
    baselines: dict[int, ModelHandle],
    tau: float,
) -> dict[str, dict[int, EvaluationHandle]]:
    """suite -> seed -> evaluation: every variant on the test split, then on each OOD suite, with the chosen τ."""
    exp = ctx.cfg.experiment
    decode = ctx.cfg.eval.decode.model_copy(update={"tau": tau})
    plan = [(HELDOUT, exp.test_limit)] + [(s, exp.ood_limit) for s in ood_suites(ctx)]
    out: dict[str, dict[int, EvaluationHandle]] = {}
    for suite, limit in plan:
        for i, seed in enumerate(exp.seeds):
            evaluation = ctx.evaluate(
                students[seed],
                baselines[seed],
                shards,
                suites=[suite],
                split="test",
                limit=limit,
                decode=decode,
                include_base=ctx.cfg.eval.include_base and i == 0 and suite == HELDOUT,
            )
            ctx.record(seed, evaluation, tau, "test" if suite == HELDOUT else suite)
            out.setdefault(suite, {})[seed] = evaluation
    return out


# --- 6. sample efficiency --------------------------------------------------------------------------------------------


def sample_efficiency(
    ctx: Context,
    shards: ShardsHandle,
    beta: float,
    tau: float,
    students: dict[int, ModelHandle],
    baselines: dict[int, ModelHandle],
    tests: dict[str, dict[int, EvaluationHandle]],
) -> list[dict]:
    """Test Pass@1 of both arms (first seed) trained on each configured fraction of the training data, the full data
    being the main run's first seed; the difference paired over items."""
    exp = ctx.cfg.experiment
    seed = exp.seeds[0]
    points = []
    for fraction in sorted({*exp.fractions, 1.0}):
        if fraction == 1.0:
            evaluation = tests[HELDOUT][seed]
            student, baseline = students[seed], baselines[seed]
        else:
            student = ctx.train(shards, "scaffold", seed, beta, fraction)
            baseline = ctx.train(shards, "baseline", seed, beta, fraction)
            evaluation = ctx.predicted(student, baseline, shards, "test", exp.test_limit, tau)
            ctx.record(seed, evaluation, tau, f"fraction-{fraction}")
        matrices = item_matrix(ctx.store, {seed: evaluation}, *PRIMARY)
        c = item_comparison(*matrices, exp.bootstrap).as_dict()
        points.append(
            {
                "fraction": fraction,
                "scaffold_tokens": student.train_tokens,
                "cot_sft_tokens": baseline.train_tokens,
                **c,
            }
        )
        ctx.log(
            f"data fraction {fraction}: predicted {100 * c['accuracy_a']:.1f} %, cot_sft {100 * c['accuracy_b']:.1f} %"
        )
    return points


# --- 7. wrong answers ------------------------------------------------------------------------------------------------


def _error_rows(store: Store, evaluations: list[EvaluationHandle]) -> list[dict]:
    ids = [e.evaluation_id for e in evaluations]
    return answers_with_questions(store.warehouse, ids, ["predicted", "cot_sft", "golden"])
