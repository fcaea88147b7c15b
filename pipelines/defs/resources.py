"""Resources: where the warehouse, the MLflow registry and the artifacts live, which teacher and which student.
Defaults are the embedded default below $DAGSTER_HOME; secrets come only from the environment (`EnvVar`)."""

from pathlib import Path

import dagster as dg
from pydantic import Field

from scaffold_lib import paths
from scaffold_lib.model import EMBEDDED, StudentConfig
from scaffold_lib.registry import RegistryConfig, sqlite_config
from scaffold_lib.teachers import ProgrammaticTeacher, ProgrammaticTeacherConfig, Teacher
from scaffold_lib.warehouse import Warehouse


class WarehouseResource(dg.ConfigurableResource):
    """The DuckDB file holding every stage table and the row-level lineage."""

    path: str = Field(default_factory=lambda: str(paths.default_warehouse()))
    lock_timeout_s: float = 600.0

    def open(self) -> Warehouse:
        return Warehouse(self.path, self.lock_timeout_s)


class MlflowResource(dg.ConfigurableResource):
    """MLflow tracking + registry (sqlite under DAGSTER_HOME by default) and the registered model name."""

    tracking_uri: str = Field(default_factory=lambda: sqlite_config(paths.dagster_home()).tracking_uri)
    artifact_location: str = Field(default_factory=lambda: sqlite_config(paths.dagster_home()).artifact_location)
    model_name: str = "scaffold-student"
    promotion_margin: float = Field(0.0, description="accuracy a challenger must add over the champion")

    def config(self) -> RegistryConfig:
        return RegistryConfig(tracking_uri=self.tracking_uri, artifact_location=self.artifact_location,
                              model_name=self.model_name)


class TeacherResource(dg.ConfigurableResource):
    """Which teacher writes the traces. `programmatic` is the offline embedded default."""

    backend: str = "programmatic"
    seed: int = 0
    wrong_fraction: float = 0.1
    base_url: str | None = None
    model: str | None = None
    api_key: str | None = Field(None, description="set with dg.EnvVar('OPENAI_API_KEY'); never logged")

    def build(self) -> Teacher:
        if self.backend == "programmatic":
            return ProgrammaticTeacher(ProgrammaticTeacherConfig(seed=self.seed, wrong_fraction=self.wrong_fraction))
        raise dg.Failure(f"teacher backend {self.backend!r} is not available in this build; use 'programmatic'")


class StudentResource(dg.ConfigurableResource):
    """The student's backbone (embedded default, hub id or local path), device and artifacts folder."""

    base_model: str = EMBEDDED
    device: str = "auto"
    artifacts_dir: str = Field(default_factory=lambda: str(paths.dagster_home() / "artifacts"))
    hidden_size: int = 192
    num_hidden_layers: int = 4
    num_attention_heads: int = 6
    intermediate_size: int = 512

    def student_config(self) -> StudentConfig:
        return StudentConfig(base_model=self.base_model, hidden_size=self.hidden_size,
                             num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                             intermediate_size=self.intermediate_size)

    def artifacts(self) -> Path:
        return Path(self.artifacts_dir)


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(resources={
        "warehouse": WarehouseResource(),
        "mlflow": MlflowResource(),
        "teacher": TeacherResource(),
        "student": StudentResource(),
    })
