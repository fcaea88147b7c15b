"""Running the real Dagster definitions in tests: resources on a temporary store, run config built from a preset
(so a test does not depend on the instance the definitions were loaded under), and readers for results."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg

from pipelines.definitions import defs as load_defs
from pipelines.defs.resources import HandleIOManager, SecretsResource, StoreResource
from pipelines.defs.stage_assets import PARTITIONED_TEACHER
from scaffold_lib.config import PipelineConfig, load_preset
from scaffold_lib.stages import PIPELINE, stage

REPO = Path(__file__).resolve().parent.parent.parent

# the sections of PipelineConfig each asset's run config holds: the stage table's (the partitioned teacher's are the
# teacher stage's)
ASSET_SECTIONS = {s.name: s.sections for s in PIPELINE} | {PARTITIONED_TEACHER: stage("teacher_traces").sections}


def definitions() -> dg.Definitions:
    return load_defs()


def graph() -> list:
    """Every asset and check of `full_pipeline`: not the sharded teacher (one run cannot mix its partitioning with the
    others) nor the experiment (it trains a model per arm and seed)."""
    d = definitions()
    wanted = {dg.AssetKey(s.name) for s in PIPELINE}
    return [*(a for a in d.assets if set(a.keys) <= wanted), *d.asset_checks]


def resources(home: Path, **secrets) -> dict:
    return {
        "store": StoreResource(home=str(home)),
        "io_manager": HandleIOManager(home=str(home)),
        "secrets": SecretsResource(**secrets),
    }


def run_config(config: PipelineConfig, assets=None) -> dict:
    """Run config that sets every section of every selected asset (default: the graph's) to `config`'s values."""
    dump = config.model_dump(mode="json")
    assets = set(assets) if assets is not None else set(ASSET_SECTIONS) - {PARTITIONED_TEACHER}
    return {
        "ops": {
            asset: {"config": {section: dump[section] for section in sections}}
            for asset, sections in ASSET_SECTIONS.items()
            if asset in assets
        }
    }


def materialize_stages(
    selection, cfg: PipelineConfig, home: Path, instance: dg.DagsterInstance, raise_on_error: bool = True
) -> dg.ExecuteInProcessResult:
    """The `selection` of the whole graph materialised with `cfg` on `home`'s store."""
    return dg.materialize(
        graph(),
        selection=selection,
        resources=resources(home),
        run_config=run_config(cfg, selection),
        instance=instance,
        raise_on_error=raise_on_error,
    )


def micro(**overrides) -> PipelineConfig:
    """The micro preset, with overrides (`{"eval": {"limit": 3}}`)."""
    return load_preset("micro", overrides).config


def new_instance(home: Path) -> dg.DagsterInstance:
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    return dg.DagsterInstance.from_config(str(home))


def metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    (mat,) = result.asset_materializations_for_node(asset)
    return {k: v.value for k, v in mat.metadata.items()}


def check_results(result: dg.ExecuteInProcessResult) -> dict[str, bool]:
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


def failures(result: dg.ExecuteInProcessResult) -> str:
    return "; ".join(
        f"{e.step_key}: {e.event_specific_data.error.message if e.event_specific_data.error else ''}"
        for e in result.all_events
        if e.is_step_failure
    )
