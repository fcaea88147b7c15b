"""The MLflow registry layer (docs/architecture.md, "Registry and promotion") on a throwaway sqlite store: runs, versions, aliases, the promotion
rule, promotion / rollback / refusal records and downloads by alias. No model is trained here: a tiny directory
stands in for the weights (the end-to-end test in test_pipeline.py loads a real one)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from scaffold_lib.store import registry
from scaffold_lib.store.store import Store
from scaffold_lib.student.register import SERVING_MODEL_CODE

# ---------------------------------------------------------------------------------------------------- pure rule


@pytest.mark.parametrize(
    "candidate, champion, margin, failed, promoted, words",
    [
        (0.10, None, 0.0, [], True, "no champion yet"),
        (0.75, 0.50, 0.25, [], True, "beats champion"),  # exactly the margin is enough
        (0.75, 0.50, 0.0, [], True, "beats champion"),
        (0.50, 0.50, 0.0, [], True, "beats champion"),  # margin 0: a tie promotes
        (0.70, 0.50, 0.25, [], False, "does not beat"),
        (0.40, 0.50, 0.0, [], False, "does not beat"),
        (0.90, 0.10, 1.0, [], False, "margin 1.000"),
        (0.90, None, 0.0, ["student_model: loss did not fall"], False, "blocked by failed checks"),
        (0.90, 0.10, 0.0, ["a", "b"], False, "a; b"),
    ],
)
def test_decide_promotion(candidate, champion, margin, failed, promoted, words):
    ok, reason = registry.decide_promotion(candidate, champion, margin, failed)
    assert ok is promoted
    assert words in reason


def test_failed_gate_wins_over_any_score():
    ok, reason = registry.decide_promotion(1.0, 0.0, 0.0, ["label_coverage_in_bounds"])
    assert not ok and "label_coverage_in_bounds" in reason


def test_the_store_registry_is_absolute_sqlite(tmp_path):
    cfg = Store.at(tmp_path).registry
    assert cfg.tracking_uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert cfg.tracking_uri.startswith("sqlite:////")
    assert cfg.artifact_location == (tmp_path.resolve() / "mlartifacts").as_uri()
    assert cfg.model_name == "scaffold-student"


# ------------------------------------------------------------------------------------------- sqlite registry


def _fake_model(root: Path, marker: str) -> Path:
    d = root / f"model-{marker}"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"marker": marker}))
    (d / "model.safetensors").write_bytes(b"not really weights " + marker.encode())
    return d


@dataclass
class Logged:
    run_id: str
    version: str | None


def _log(cfg, root: Path, marker: str, register_as: str | None = "scaffold-student") -> Logged:
    tags = {"manifest_hash": f"manifest-{marker}", "dagster_run_id": f"run-{marker}", "kind": "scaffold"}
    run_id = registry.start_run(
        cfg,
        f"scaffold-{marker}",
        tags=tags,
        params={
            "train": {"learning_rate": 0.003, "max_steps": 2},
            "manifest_hash": f"manifest-{marker}",
            "dagster_run_id": f"run-{marker}",
        },
        dataset={
            "name": "scaffold-shards",
            "digest": f"manifest-{marker}",
            "source": str(root / "shards"),
            "rows": 4,
            "tokens": 2048,
        },
    )
    registry.log_metrics(cfg, run_id, 1, {"loss": 2.0, "tokens_per_s": 10.0})
    registry.log_metrics(cfg, run_id, 2, {"loss": 1.5, "tokens_per_s": None})
    registry.finish_run(cfg, run_id)
    version = (
        registry.register_model(
            cfg,
            run_id,
            _fake_model(root, marker),
            name=register_as,
            tags=tags,
            description=f"model {marker}",
            model_code=SERVING_MODEL_CODE,
        )
        if register_as
        else None
    )
    return Logged(run_id, version)


@pytest.fixture
def reg(tmp_path) -> registry.RegistryConfig:
    return Store.at(tmp_path / "home").registry


def test_log_register_aliases_and_lookup(reg, tmp_path):
    first = _log(reg, tmp_path, "a")
    second = _log(reg, tmp_path, "b")
    assert (first.version, second.version) == ("1", "2")
    # each new version takes `challenger`; nobody is champion until promoted
    assert registry.alias_version(reg, registry.CHALLENGER) == "2"
    assert registry.alias_version(reg, registry.CHAMPION) is None
    with pytest.raises(LookupError, match="no version or alias 'champion'"):
        registry.resolve_version(reg, "champion")
    with pytest.raises(LookupError):
        registry.resolve_version(reg, "7")
    assert registry.resolve_version(reg, "1") == "1"

    c = registry.client(reg)
    run = c.get_run(first.run_id)
    params = run.data.params
    assert params["manifest_hash"] == "manifest-a" and params["dagster_run_id"] == "run-a"
    assert params["train.learning_rate"] == "0.003"  # nested config is flattened
    assert run.data.tags["kind"] == "scaffold" and "git_commit" in run.data.tags
    assert [m.value for m in c.get_metric_history(first.run_id, "loss")] == [2.0, 1.5]
    assert len(c.get_metric_history(first.run_id, "tokens_per_s")) == 1  # None values are not logged
    mv = c.get_model_version("scaffold-student", "1")
    assert mv.run_id == first.run_id and mv.tags["manifest_hash"] == "manifest-a" and mv.description == "model a"
    # the run was opened before the work and closed after it; its training data is an input dataset
    assert run.info.status == "FINISHED" and run.info.end_time >= run.info.start_time
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.digest == "manifest-a" and dataset.dataset.name == "scaffold-shards"
    assert json.loads(dataset.dataset.profile) == {"rows": 4, "tokens": 2048, "traces": None}
    # an unregistered run gets no version
    unregistered = _log(reg, tmp_path, "c", register_as=None)
    assert unregistered.version is None
    assert registry.alias_version(reg, registry.CHALLENGER) == "2"


def test_promotion_rollback_and_refusal_are_recorded(reg, tmp_path):
    for marker in ("a", "b", "c"):
        _log(reg, tmp_path, marker)
    c = registry.client(reg)
    registry.set_champion(reg, "2", "accuracy 0.5 beats champion 0.3", who="dagster run abc")
    assert registry.alias_version(reg, registry.CHAMPION) == "2"
    v2 = c.get_model_version("scaffold-student", "2")
    assert v2.tags["promoted_by"] == "dagster run abc"
    assert v2.tags["promotion_reason"] == "accuracy 0.5 beats champion 0.3"

    registry.record_refusal(reg, "3", "accuracy 0.2 does not beat champion 0.5 by the margin 0.000")
    assert registry.alias_version(reg, registry.CHAMPION) == "2"  # a refusal moves nothing
    assert "does not beat" in c.get_model_version("scaffold-student", "3").tags["promotion_refused"]

    # rollback = set_champion on an older version, with who and why
    registry.set_champion(reg, "1", "rollback: v2 regressed in production", who="on-call")
    assert registry.alias_version(reg, registry.CHAMPION) == "1"
    v1 = c.get_model_version("scaffold-student", "1")
    assert v1.tags["promoted_by"] == "on-call"
    assert v1.tags["promotion_reason"].startswith("rollback")
    assert registry.alias_version(reg, registry.CHALLENGER) == "3"
    # without `who` the OS user is recorded
    registry.set_champion(reg, "3", "manual")
    assert c.get_model_version("scaffold-student", "3").tags["promoted_by"]


def test_download_by_alias_and_version(reg, tmp_path):
    _log(reg, tmp_path, "a")
    _log(reg, tmp_path, "b")
    registry.set_champion(reg, "1", "first")
    champ = registry.download_model(reg, registry.CHAMPION, dst=tmp_path / "dl-champion")
    assert json.loads((champ / "config.json").read_text()) == {"marker": "a"}
    assert (champ / "model.safetensors").exists()
    v2 = registry.download_model(reg, "2", dst=tmp_path / "dl-v2")
    assert json.loads((v2 / "config.json").read_text()) == {"marker": "b"}
    chall = registry.download_model(reg, registry.CHALLENGER, dst=tmp_path / "dl-challenger")
    assert json.loads((chall / "config.json").read_text()) == {"marker": "b"}
    # artifacts land below the configured artifact location
    assert any((tmp_path / "home" / "mlartifacts").rglob("config.json"))


def test_experiment_is_reused(reg):
    assert registry.experiment_id(reg) == registry.experiment_id(reg)


def test_log_scores_puts_metrics_and_tables_on_the_run(reg, tmp_path):
    logged = _log(reg, tmp_path, "a")
    rows = [
        {"benchmark": "heldout", "split": "test", "variant": "predicted", "accuracy": 0.25},
        {"benchmark": "heldout", "split": "test", "variant": "golden", "accuracy": 0.5},
    ]
    registry.log_scores(reg, logged.run_id, rows, "| table |")
    c = registry.client(reg)
    metrics = c.get_run(logged.run_id).data.metrics
    assert metrics["heldout.test.predicted.accuracy"] == 0.25
    assert metrics["heldout.test.golden.accuracy"] == 0.5
    assert {a.path for a in c.list_artifacts(logged.run_id)} == {"scores.md", "scores.json"}
    # the model itself is an MLflow 3 logged model of that run, not a run artifact
    (model,) = mlflow.search_logged_models(
        experiment_ids=[registry.experiment_id(reg)],
        filter_string=f"source_run_id = '{logged.run_id}'",
        output_format="list",
    )
    assert model.name == registry.MODEL_ARTIFACT


# ------------------------------------------------------------------------------------------------ serving input


@pytest.mark.parametrize(
    "given, questions",
    [
        ({"question": ["What is 2 + 3?"]}, ["What is 2 + 3?"]),
        ("What is 2 + 3?", ["What is 2 + 3?"]),
        (pd.DataFrame({"question": ["a?", "b?"]}), ["a?", "b?"]),
        (pd.DataFrame([{"question": ["a?", "b?"]}]), ["a?", "b?"]),  # what pyfunc makes of {"question": [...]}
    ],
)
def test_served_questions_are_read_from_every_input_shape(given, questions):
    from scaffold_lib.serving.student import questions_of

    assert questions_of(given) == questions


@pytest.mark.parametrize(
    "given, message",
    [
        (pd.DataFrame({"question": ["  "]}), "field 'question' (row 0): empty"),
        (pd.DataFrame({"question": ["ok?", ""]}), "field 'question' (row 1): empty"),
        ({"question": [None]}, "field 'question' (row 0): missing"),
        (pd.DataFrame({"question": [3]}), "field 'question' (row 0): must be text, got int"),
        (pd.DataFrame({"prompt": ["x"]}), "field 'question': missing; the input has columns ['prompt']"),
        ({"question": []}, "field 'question': no question given"),
    ],
)
def test_a_missing_or_empty_question_is_a_bad_request_naming_the_field(given, message):
    from mlflow.exceptions import MlflowException

    from scaffold_lib.serving.student import questions_of

    with pytest.raises(MlflowException) as caught:
        questions_of(given)
    assert caught.value.message == message and caught.value.get_http_status_code() == 400


def test_serving_threads_default_to_half_the_cores_and_refuse_nonsense(monkeypatch):
    from scaffold_lib.serving.student import serving_threads

    monkeypatch.delenv("SCAFFOLD_SERVE_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert serving_threads() == 4
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    assert serving_threads() == 1
    monkeypatch.setenv("SCAFFOLD_SERVE_THREADS", "3")
    assert serving_threads() == 3
    for bad in ("0", "two"):
        monkeypatch.setenv("SCAFFOLD_SERVE_THREADS", bad)
        with pytest.raises(ValueError, match=f"SCAFFOLD_SERVE_THREADS={bad!r}"):
            serving_threads()
