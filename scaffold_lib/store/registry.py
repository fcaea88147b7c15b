"""MLflow tracking and the model registry (docs/architecture.md, "Registry and promotion").

Tracking on sqlite with an explicit artifact location. Each trained student is logged as a run (params:
config, data manifest hash, Dagster run id — never secrets; metrics per step; the model directory with
safetensors weights, tokenizer, heads and config as artifacts) and registered as a new version of
`scaffold-student` with alias `challenger`. Promotion moves `champion`; aliases, never deprecated stages.
`models:/scaffold-student@champion` downloads a directory `ScaffoldStudent.from_pretrained` loads.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import mlflow
import yaml
from filelock import FileLock
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from pydantic import BaseModel

from scaffold_lib.core.paths import REPO_ROOT
from scaffold_lib.store.handles import PromotionOutcome

CHAMPION, CHALLENGER = "champion", "challenger"
MODEL_ARTIFACT = "student"


class RegistryConfig(BaseModel):
    tracking_uri: str  # sqlite:///<absolute path>
    artifact_location: str  # absolute path or URL
    model_name: str = "scaffold-student"
    experiment: str = "reasoning-scaffold"


def client(cfg: RegistryConfig) -> MlflowClient:
    mlflow.set_tracking_uri(cfg.tracking_uri)
    mlflow.set_registry_uri(cfg.tracking_uri)
    return MlflowClient(tracking_uri=cfg.tracking_uri, registry_uri=cfg.tracking_uri)


# MLflow's UI opens an experiment with this tag on its runs (model training), not on its GenAI traces view
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def experiment_id(cfg: RegistryConfig) -> str:
    c = client(cfg)
    exp = c.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        return exp.experiment_id
    try:
        created = c.create_experiment(cfg.experiment, artifact_location=cfg.artifact_location, tags=EXPERIMENT_KIND)
    except MlflowException:  # created meanwhile by a concurrent run
        return c.get_experiment_by_name(cfg.experiment).experiment_id
    # the store creates an empty "Default" experiment of its own; nothing of ours goes there, so it is set aside
    default = c.get_experiment("0")
    if default.lifecycle_stage == "active" and not c.search_runs(["0"], max_results=1):
        c.delete_experiment("0")
    return created


def ui_url() -> str:
    """Where the MLflow UI is served (`make ui`); links in prints and Dagster metadata point there."""
    return os.environ.get("SCAFFOLD_MLFLOW_UI", "http://127.0.0.1:5000").rstrip("/")


def runs_page(cfg: RegistryConfig, ui: str | None = None) -> str:
    """The experiment's training-runs view: MLflow's own landing page is its GenAI overview, empty for this project."""
    return f"{(ui or ui_url()).rstrip('/')}/#/experiments/{experiment_id(cfg)}/runs"


def git_commit() -> str:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _flatten(prefix: str, value, out: dict) -> dict:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else k, v, out)
    else:
        out[prefix] = value
    return out


def start_run(
    cfg: RegistryConfig, run_name: str, *, params: dict, tags: dict[str, str], dataset: dict | None = None
) -> str:
    """An MLflow run opened before the work starts (so its duration is the real one and metrics appear live), with
    the params in one batch (never secrets: callers pass configs whose secrets are excluded from dumps) and the
    training data as an input dataset (`dataset`: name, digest, source, rows)."""
    from mlflow.entities import Param, RunTag

    c = client(cfg)
    run = c.create_run(experiment_id(cfg), run_name=run_name, tags={**tags, "git_commit": git_commit()})
    flat = [Param(k, str(v)[:6000]) for k, v in _flatten("", params, {}).items()]
    for start in range(0, len(flat), 100):  # MLflow takes at most 100 params per batch
        c.log_batch(run.info.run_id, params=flat[start : start + 100])
    if dataset is not None:
        _log_dataset(cfg, run.info.run_id, dataset)
    c.log_batch(
        run.info.run_id, tags=[RunTag("mlflow.source.name", "scaffold_lib"), RunTag("mlflow.source.type", "JOB")]
    )
    return run.info.run_id


def _log_dataset(cfg: RegistryConfig, run_id: str, dataset: dict) -> None:
    from mlflow.entities import Dataset, DatasetInput, InputTag

    source = _dataset_source(dataset["source"])
    entity = Dataset(
        name=dataset["name"],
        digest=dataset["digest"][:36],
        source_type=source._get_source_type(),
        source=source.to_json(),
        schema=json.dumps(
            {
                "mlflow_colspec": [
                    {"name": n, "type": "long"} for n in ("input_ids", "labels", "signal_ids", "position_ids")
                ]
            }
        ),
        profile=json.dumps({k: dataset.get(k) for k in ("rows", "tokens", "traces")}),
    )
    client(cfg).log_inputs(run_id, datasets=[DatasetInput(entity, tags=[InputTag("mlflow.data.context", "training")])])


def _dataset_source(url: str):
    """MLflow's source type for where the shards are (local, s3://, http…); a URL it has no type for is kept as a
    plain URI."""
    import warnings

    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    uri = url if "://" in url else Path(url).resolve().as_uri()
    try:
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": any of them names the folder
            warnings.simplefilter("ignore")
            return resolve_dataset_source(uri)
    except MlflowException:
        return CodeDatasetSource({"uri": uri})


def log_metrics(cfg: RegistryConfig, run_id: str, step: int, metrics: dict[str, float | None]) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client(cfg).log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None])


def finish_run(cfg: RegistryConfig, run_id: str, failed: bool = False) -> None:
    client(cfg).set_terminated(run_id, status="FAILED" if failed else "FINISHED")


STUDENT_ARTIFACT = "student"  # the model directory inside a logged pyfunc model (see scaffold_lib.serving)


def serving_signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array, Object, Property

    step = Object([Property("signal", "string"), Property("text", "string"), Property("confidence", "double", False)])
    return ModelSignature(
        inputs=Schema([ColSpec("string", "question")]),
        outputs=Schema(
            [ColSpec("string", "question"), ColSpec("string", "answer"), ColSpec(Array(step), "steps")]
            + [ColSpec("string", "response")]
        ),
        params=ParamSchema([ParamSpec("tau", "double", 0.0)]),
    )


def register_model(
    cfg: RegistryConfig,
    run_id: str,
    model_dir: str | Path,
    *,
    name: str,
    tags: dict[str, str],
    description: str = "",
    model_code: str | Path,
) -> str:
    """Log the model directory (safetensors weights, tokenizer, heads, config) as an MLflow pyfunc model — the
    `model_code` file wraps it, run as a "model from code", so nothing pickled is logged — and register it as a new
    version of `name` with alias `challenger`; returns the version."""
    c = client(cfg)
    with mlflow.start_run(run_id=run_id, log_system_metrics=False):
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            python_model=str(model_code),
            artifacts={STUDENT_ARTIFACT: str(model_dir)},
            signature=serving_signature(),
            # no input_example: MLflow would load the model and decode it at every registration to validate it
            pip_requirements=["reasoning-scaffold", "torch", "transformers", "safetensors", "pandas"],
        )
    try:
        c.create_registered_model(name)
    except MlflowException:
        pass  # already registered
    mv = c.create_model_version(
        name,
        source=info.model_uri,
        run_id=run_id,
        tags={**tags, "git_commit": git_commit()},
        description=description or None,
        model_id=info.model_id,
    )
    version = str(mv.version)
    c.set_registered_model_alias(name, CHALLENGER, version)
    return version


def resolve_version(cfg: RegistryConfig, ref: str, model_name: str | None = None) -> str:
    """'champion' / 'challenger' / '3' -> version number as a string; clear error when it does not exist."""
    c, name = client(cfg), model_name or cfg.model_name
    try:
        if ref.isdigit():
            return str(c.get_model_version(name, ref).version)
        return str(c.get_model_version_by_alias(name, ref).version)
    except MlflowException as exc:
        raise LookupError(f"model {name!r} has no version or alias {ref!r} in {cfg.tracking_uri}") from exc


def download_model(
    cfg: RegistryConfig, ref: str = CHAMPION, model_name: str | None = None, dst: str | Path | None = None
) -> Path:
    """Local student directory of `models:/NAME@alias` (or a version number), ready for
    `ScaffoldStudent.from_pretrained` (the safetensors model inside the registered pyfunc model)."""
    client(cfg)
    name = model_name or cfg.model_name
    uri = f"models:/{name}/{ref}" if ref.isdigit() else f"models:/{name}@{ref}"
    root = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst) if dst else None))
    return student_dir(root)


def student_dir(model_root: Path) -> Path:
    """The student directory inside a downloaded pyfunc model (its `MLmodel` names where the artifact was copied);
    a bare directory (no `MLmodel`) is the student itself."""
    mlmodel = model_root / "MLmodel"
    if not mlmodel.exists():
        return model_root
    flavor = yaml.safe_load(mlmodel.read_text()).get("flavors", {}).get("python_function", {})
    artifact = flavor.get("artifacts", {}).get(STUDENT_ARTIFACT)
    if artifact is None:
        raise LookupError(f"{mlmodel}: no '{STUDENT_ARTIFACT}' artifact in the python_function flavour")
    return model_root / artifact["path"]


def alias_version(cfg: RegistryConfig, alias: str, model_name: str | None = None) -> str | None:
    try:
        return resolve_version(cfg, alias, model_name)
    except LookupError:
        return None


def decide_promotion(
    candidate_accuracy: float, champion_accuracy: float | None, margin: float, failed_gates: Sequence[str]
) -> tuple[bool, str]:
    """Pure rule: every gate passed, and no champion or the candidate beats it by `margin`."""
    if failed_gates:
        return False, "blocked by failed checks: " + "; ".join(failed_gates)
    if champion_accuracy is None:
        return True, f"no champion yet; candidate accuracy {candidate_accuracy:.3f}"
    if candidate_accuracy >= champion_accuracy + margin:
        return True, f"accuracy {candidate_accuracy:.3f} beats champion {champion_accuracy:.3f} by >= {margin:.3f}"
    return False, (
        f"accuracy {candidate_accuracy:.3f} does not beat champion {champion_accuracy:.3f} by the margin {margin:.3f}"
    )


def set_champion(cfg: RegistryConfig, version: str, reason: str, who: str | None = None) -> None:
    """Move `champion` to `version` and record who and why on the version (also how a rollback is done)."""
    c = client(cfg)
    c.set_registered_model_alias(cfg.model_name, CHAMPION, version)
    c.set_model_version_tag(cfg.model_name, version, "promoted_by", who or getpass.getuser())
    c.set_model_version_tag(cfg.model_name, version, "promotion_reason", reason[:5000])


def append_description(cfg: RegistryConfig, version: str, text: str, model_name: str | None = None) -> None:
    """Add a paragraph to a version's description (what the registry UI shows first)."""
    c, name = client(cfg), model_name or cfg.model_name
    current = c.get_model_version(name, version).description or ""
    c.update_model_version(name, version, description=(current + "\n\n" + text).strip()[:20000])


def record_refusal(cfg: RegistryConfig, version: str, reason: str) -> None:
    client(cfg).set_model_version_tag(cfg.model_name, version, "promotion_refused", reason[:5000])


def promotion_lock(cfg: RegistryConfig) -> FileLock:
    """One promotion at a time per registry: reading the champion, deciding and moving the alias are one step, so
    two racing promotions cannot both see the old champion and leave the worse candidate on top. The lock file
    sits beside a sqlite registry (else in the temp dir, keyed by the tracking URI: one host only)."""
    if cfg.tracking_uri.startswith("sqlite:///"):
        path = Path(cfg.tracking_uri.removeprefix("sqlite:///")).with_suffix(".promotion.lock")
    else:
        path = (
            Path(tempfile.gettempdir())
            / f"scaffold-promotion-{hashlib.sha256(cfg.tracking_uri.encode()).hexdigest()[:16]}.lock"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(path)


def promote_if_better(
    cfg: RegistryConfig,
    version: str,
    accuracy_of: Callable[[str], float | None],
    margin: float,
    failed_gates: Sequence[str],
    who: str,
) -> PromotionOutcome:
    """The promotion rule applied atomically: under the lock, compare `version` with whoever is champion *now*,
    then move the alias (with who and why) or record the refusal on the version."""
    with promotion_lock(cfg):
        champion = alias_version(cfg, CHAMPION)
        failed = list(failed_gates)
        candidate = accuracy_of(version)
        if candidate is None:
            failed.append("no predicted-signal score for the challenger")
        champion_acc = accuracy_of(champion) if champion and champion != version else None
        promoted, reason = decide_promotion(candidate or 0.0, champion_acc, margin, failed)
        if champion == version:
            promoted, reason = False, f"v{version} is already the champion"
        elif promoted:
            set_champion(cfg, version, reason, who=who)
        else:
            record_refusal(cfg, version, reason)
        return PromotionOutcome(promoted, reason, champion, alias_version(cfg, CHAMPION))


def log_scores(
    cfg: RegistryConfig, run_id: str, rows: Sequence[dict], table_markdown: str, name: str = "scores"
) -> None:
    """Scores onto the model's own run: one metric per benchmark/variant and the table as an artifact."""
    c = client(cfg)
    for r in rows:
        split = f".{r['split']}" if r.get("split") else ""
        c.log_metric(run_id, f"{r['benchmark']}{split}.{r['variant']}.accuracy", float(r["accuracy"]))
    c.log_text(run_id, table_markdown, f"{name}.md")
    c.log_text(run_id, json.dumps(list(rows), indent=2, default=str), f"{name}.json")
