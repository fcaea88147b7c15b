"""Resources: where the pipeline's state lives (the store), the secrets (from the environment only), and the IO
manager that hands each asset the handle its upstream wrote in the same run."""

import dagster as dg
from pydantic import BaseModel, Field, SecretStr

from scaffold_lib.core import paths
from scaffold_lib.stages import stage
from scaffold_lib.store.handles import load_handle, save_handle
from scaffold_lib.store.store import MODEL_NAME, Store

# what Dagster sets as the upstream run of an input that was not produced in this run
_NOT_THIS_RUN = "__EPHEMERAL_RUN_ID"


class StoreResource(dg.ConfigurableResource):
    """The store below `home` (default $DAGSTER_HOME): DuckDB warehouse, MLflow tracking and registry, artifacts.
    Each part can be placed elsewhere."""

    home: str = Field(default_factory=lambda: str(paths.dagster_home()))
    warehouse: str | None = Field(None, description="DuckDB file; default <home>/warehouse.duckdb")
    tracking_uri: str | None = Field(None, description="MLflow tracking/registry URI; default sqlite <home>/mlflow.db")
    artifact_location: str | None = Field(None, description="MLflow artifacts; default <home>/mlartifacts")
    model_name: str = MODEL_NAME

    def open(self) -> Store:
        return Store.at(
            self.home,
            warehouse=self.warehouse,
            tracking_uri=self.tracking_uri,
            artifact_location=self.artifact_location,
            model_name=self.model_name,
        )


class SecretsResource(dg.ConfigurableResource):
    """API keys, from the environment only: set them with `dg.EnvVar("OPENAI_API_KEY")`. Unset, the endpoint config's
    `api_key_env` variable is read at run time. Never logged, stored, or part of an id or an MLflow param."""

    teacher_api_key: str | None = None
    labeller_api_key: str | None = None

    def apply(self, endpoint, key: str | None):
        return endpoint.model_copy(update={"api_key": SecretStr(key)}) if key else endpoint


class HandleIOManager(dg.ConfigurableIOManager):
    """Stage handles (small pydantic documents: ids, paths, hashes, figures; their class is the stage table's) as JSON
    files below
    `<home>/handles/<asset>/<run id>.json`, the same files the `scaffold` CLI uses. An input produced in this run is
    read from this run's file, so two overlapping runs never train on or score each other's model; an input from an
    earlier run (a downstream-only materialisation) is the upstream's latest materialisation. Models are never
    pickled: they live in MLflow."""

    home: str = Field(default_factory=lambda: str(paths.dagster_home()))

    def handle_output(self, context: dg.OutputContext, obj: BaseModel) -> None:
        if obj is None:
            return
        path = save_handle(self.home, context.asset_key.to_user_string(), context.run_id, obj)
        context.add_output_metadata({"handle": dg.MetadataValue.path(str(path))})

    def load_input(self, context: dg.InputContext) -> BaseModel:
        key = context.asset_key
        upstream_run = context.upstream_output.run_id if context.upstream_output is not None else _NOT_THIS_RUN
        if upstream_run == _NOT_THIS_RUN:
            event = context.instance.get_latest_materialization_event(key)
            if event is None:
                raise dg.Failure(f"asset {key.to_user_string()!r} has never been materialised: materialise it first")
            upstream_run = event.run_id
        return load_handle(self.home, key.to_user_string(), stage(key.to_user_string()).handle, upstream_run)


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(
        resources={"store": StoreResource(), "secrets": SecretsResource(), "io_manager": HandleIOManager()}
    )
