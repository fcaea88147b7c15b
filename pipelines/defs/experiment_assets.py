"""The experiment as an asset of its own job: both arms trained over seeds on the data the pipeline holds, τ (and β)
chosen on validation, test scored once, paired tests and error analysis (scaffold_lib.experiment). Not part of
`full_pipeline`: it trains six models or more."""

import dagster as dg

from pipelines.defs.common import (
    EXPERIMENT_GROUP,
    GPU_POOL,
    instance_config,
    library_config,
    png_markdown,
    run_id,
    section_config,
    stage_failure,
)
from pipelines.defs.resources import StoreResource
from scaffold_lib.core.errors import UserError
from scaffold_lib.experiment import run_experiment

SECTIONS = ("shards", "student", "train", "eval", "experiment")
ExperimentRunConfig = section_config(*SECTIONS)


@dg.asset(
    group_name=EXPERIMENT_GROUP,
    kinds={"pytorch", "duckdb", "mlflow"},
    deps=["signal_labels", "decontamination"],
    pool=GPU_POOL,
)
def experiment_report(
    context: dg.AssetExecutionContext, config: ExperimentRunConfig, store: StoreResource
) -> dg.MaterializeResult:
    """Does scaffolding beat CoT distillation? Both arms over the configured seeds, settings chosen on validation, every
    variant scored once on test and the OOD suites, compared with the item as the unit (bootstrap over items, sign-flip
    test; McNemar per seed), the bed's diagnostics, sample efficiency and an error analysis; the report and the τ plot
    go to MLflow and the artifacts folder."""
    base = instance_config()
    cfg = base.config.model_copy(update={s: library_config(config, s) for s in SECTIONS})
    try:
        result = run_experiment(store.open(), cfg, run_id(context), preset=base.preset, log=context.log.info)
    except UserError as exc:
        raise stage_failure(exc) from exc
    headline = result.primary
    return dg.MaterializeResult(
        metadata={
            "experiment_id": result.experiment_id,
            "tau": result.tau,
            "beta": result.beta,
            "signal_injection": result.injection,
            "scaffold_minus_cot_sft_points": round(100 * headline.get("difference", 0.0), 2),
            "ci_low_points": round(100 * headline.get("ci_low", 0.0), 2),
            "ci_high_points": round(100 * headline.get("ci_high", 0.0), 2),
            "p_value": round(headline.get("p_value", 1.0), 4),
            "report": dg.MetadataValue.md(result.report),
            "report_file": dg.MetadataValue.path(result.report_path),
            "tau_plot": dg.MetadataValue.md(png_markdown(result.plot_path, "Pass@1 on validation against τ")),
            "minutes": round(result.minutes, 1),
        }
    )
