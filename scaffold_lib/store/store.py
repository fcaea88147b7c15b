"""The store: where a pipeline's state lives (one folder, by default $DAGSTER_HOME) and the handles on it that every
stage function takes — the DuckDB warehouse, the MLflow registry, the artifacts and journals folders."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from scaffold_lib.core import paths

if TYPE_CHECKING:
    from scaffold_lib.store.warehouse import Warehouse

MODEL_NAME = "scaffold-student"


@dataclass(frozen=True)
class Store:
    home: Path
    warehouse_path: Path
    tracking_uri: str
    artifact_location: str
    model_name: str = MODEL_NAME
    lock_timeout_s: float = field(default=600.0, compare=False)

    @classmethod
    def at(
        cls,
        home: str | Path | None = None,
        *,
        warehouse: str | Path | None = None,
        tracking_uri: str | None = None,
        artifact_location: str | None = None,
        model_name: str = MODEL_NAME,
        lock_timeout_s: float = 600.0,
    ) -> Store:
        """The store below `home` (default: $DAGSTER_HOME, else ./dagster_home): `warehouse.duckdb`, MLflow on
        `mlflow.db` with artifacts in `mlartifacts/`, `artifacts/`, `journals/`. Each part can be placed elsewhere."""
        home = Path(home).resolve() if home else paths.dagster_home()
        return cls(
            home,
            Path(warehouse).resolve() if warehouse else home / "warehouse.duckdb",
            tracking_uri or f"sqlite:///{home / 'mlflow.db'}",
            artifact_location or (home / "mlartifacts").as_uri(),
            model_name,
            lock_timeout_s,
        )

    @cached_property
    def warehouse(self) -> Warehouse:
        from scaffold_lib.store.warehouse import Warehouse  # DuckDB is imported only by what uses the warehouse

        return Warehouse(self.warehouse_path, self.lock_timeout_s)

    @property
    def registry(self):
        from scaffold_lib.store.registry import RegistryConfig  # MLflow is imported only by stages that use it

        return RegistryConfig(
            tracking_uri=self.tracking_uri, artifact_location=self.artifact_location, model_name=self.model_name
        )

    @property
    def artifacts(self) -> Path:
        return self.home / "artifacts"

    @property
    def journals(self) -> Path:
        return self.home / "journals"

    @property
    def incoming(self) -> Path:
        """Problem files dropped here are loaded by the problems stage (and start a refresh under Dagster)."""
        return self.home / "incoming"

    @property
    def benchmarks(self) -> Path:
        """Benchmark suite files (gsm8k_test.jsonl, …)."""
        return self.home / "benchmarks"
