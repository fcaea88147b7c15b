"""The Dagster layer (DESIGN.md §2–§5): definitions load, one end-to-end run of the embedded default at micro size
(rows, registry, aliases, lineage, MLflow params), incremental refresh, promotion refused by the margin, the
file sensor, and asset checks that fail when they should.

One micro run of the whole graph is shared by the module (`pipeline` fixture). It runs against a temporary
DAGSTER_HOME with its own DuckDB file, MLflow sqlite store and artifacts; the student is shrunk and the eval
limited so that the run takes well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import dagster as dg
import pytest

from pipelines import demo
from pipelines.definitions import defs as load_defs
from pipelines.defs import automation, data_assets
from pipelines.defs.resources import (EndpointSettings, LabellerResource, MlflowResource, StudentResource,
                                     TeacherResource, WarehouseResource)
from scaffold_lib.store import registry
from scaffold_lib.student.model import ScaffoldStudent
from scaffold_lib.data.problems import GeneratorConfig, generate_problems
from scaffold_lib.data.stages import label_signals
from scaffold_lib.store.warehouse import Warehouse

REPO = Path(__file__).resolve().parent.parent
MODEL = "scaffold-student"
ASSETS = {"problems", "teacher_traces", "segmented_steps", "signal_labels", "packed_shards", "student_model",
          "baseline_model", "benchmark_scores", "model_promotion"}
DATA_ASSETS = ("problems", "teacher_traces", "segmented_steps", "signal_labels")
CHECKS = {
    ("problems", "problems_without_quarantine"), ("teacher_traces", "teacher_accuracy_above_floor"),
    ("segmented_steps", "no_empty_steps"), ("signal_labels", "label_coverage_in_bounds"),
    ("packed_shards", "shard_fill_on_target"), ("student_model", "student_loss_finite_and_falling"),
    ("baseline_model", "baseline_loss_finite_and_falling"), ("benchmark_scores", "scaffold_beats_baseline"),
}
STAGE_TABLES = ("problems", "teacher_traces", "segmented_steps", "signal_labels", "shards", "shard_members",
                "model_versions", "model_shards", "benchmark_scores")
# a value that must never reach MLflow: the teacher's API key comes from this env var
SECRET = "sk-test-DO-NOT-LOG-0123456789abcdef"
SECRET_KEY = re.compile(r"(api[_-]?key|secret|password|passwd|credential|auth|bearer)", re.I)
SECRET_VALUE = re.compile(r"(sk-[A-Za-z0-9-]{12,}|Bearer\s+\S+)")


# --------------------------------------------------------------------------------------------------- helpers


def definitions() -> dg.Definitions:
    return load_defs()


def graph() -> list:
    """Every asset and check but the sharded teacher: one run cannot mix its partitioning with the suites'."""
    d = definitions()
    return [*(a for a in d.assets if dg.AssetKey("teacher_trace_shards") not in a.keys), *d.asset_checks]


def resources(home: Path, **mlflow_kw) -> dict:
    return {
        "warehouse": WarehouseResource(path=str(home / "warehouse.duckdb")),
        "mlflow": MlflowResource(tracking_uri=f"sqlite:///{home}/mlflow.db",
                                 artifact_location=(home / "mlartifacts").as_uri(), **mlflow_kw),
        # a smaller backbone than the default keeps training at micro size to seconds
        "student": StudentResource(artifacts_dir=str(home / "artifacts"), hidden_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, intermediate_size=128),
        "teacher": TeacherResource(endpoint=EndpointSettings(api_key=dg.EnvVar("OPENAI_API_KEY"))),
        "labeller": LabellerResource(),
    }


def micro_run_config() -> dict:
    cfg = demo.run_config("micro")
    # two held-out problems and short generations are enough to exercise every variant
    cfg["ops"]["benchmark_scores"]["config"].update(limit=2, max_tokens=48, max_steps=4)
    return cfg


def only_ops(cfg: dict, names) -> dict:
    return {"ops": {k: v for k, v in cfg["ops"].items() if k in names}}


def metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    (mat,) = result.asset_materializations_for_node(asset)
    return {k: v.value for k, v in mat.metadata.items()}


def check_results(result: dg.ExecuteInProcessResult) -> dict[str, bool]:
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


def failures(result: dg.ExecuteInProcessResult) -> str:
    return "; ".join(f"{e.step_key}: {e.event_specific_data.error.message if e.event_specific_data.error else ''}"
                     for e in result.all_events if e.is_step_failure)


@dataclass
class Pipeline:
    home: Path
    instance: dg.DagsterInstance
    result: dg.ExecuteInProcessResult
    wh: Warehouse
    reg: registry.RegistryConfig
    counts: dict[str, int]
    aliases: dict[str, str | None]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Iterator[Pipeline]:
    """The whole graph materialised once, in process, against a temporary DAGSTER_HOME."""
    home = tmp_path_factory.mktemp("dagster_home")
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    mp = pytest.MonkeyPatch()
    mp.setenv("DAGSTER_HOME", str(home))
    mp.setenv("OPENAI_API_KEY", SECRET)
    instance = dg.DagsterInstance.from_config(str(home))
    try:
        result = dg.materialize(graph(), resources=resources(home), run_config=micro_run_config(), instance=instance,
                                raise_on_error=False)
        assert result.success, f"micro pipeline run failed: {failures(result)}"
        reg = registry.RegistryConfig(tracking_uri=f"sqlite:///{home}/mlflow.db",
                                      artifact_location=(home / "mlartifacts").as_uri())
        wh = Warehouse(home / "warehouse.duckdb")
        aliases = {a: registry.alias_version(reg, a) for a in (registry.CHAMPION, registry.CHALLENGER)}
        yield Pipeline(home, instance, result, wh, reg, wh.counts(), aliases)
    finally:
        instance.dispose()
        mp.undo()


# ------------------------------------------------------------------------------------------ 1. definitions


def test_definitions_load_every_asset_check_schedule_and_sensor():
    d = definitions()
    ag = d.resolve_asset_graph()
    assert {(k.asset_key.to_user_string(), k.name) for k in ag.asset_check_keys} == CHECKS
    assert {s.name for s in d.schedules} == {"data_refresh_schedule", "retrain_and_evaluate_schedule"}
    assert {s.name for s in d.sensors} == {"new_problem_file_sensor"}
    assert {"full_pipeline", "data_refresh", "retrain_and_evaluate", "trace_backfill"} <= {j.name for j in d.jobs}
    assert set(ag.get_all_asset_keys()) - {dg.AssetKey(a) for a in ASSETS} == {dg.AssetKey("teacher_trace_shards")}
    for key in ag.get_all_asset_keys():
        node = ag.get(key)
        name = key.to_user_string()
        assert node.group_name == ("data" if name in (*DATA_ASSETS, "teacher_trace_shards") else "student"), name
        assert node.kinds, f"{name} has no kinds"
        assert node.description and len(node.description) > 30, f"{name} has no docstring"
    # resources every asset needs are bound
    assert {"warehouse", "mlflow", "teacher", "student", "labeller"} <= set(d.resources or {})


def test_jobs_select_the_right_stages():
    d = definitions()

    def selected(job_name: str) -> set[str]:
        return {k.to_user_string() for k in d.resolve_job_def(job_name).asset_layer.selected_asset_keys}

    assert selected("data_refresh") == set(DATA_ASSETS)
    assert selected("retrain_and_evaluate") == ASSETS - set(DATA_ASSETS)
    assert selected("full_pipeline") == ASSETS
    assert selected("trace_backfill") == {"teacher_trace_shards"}  # partitioned: only in its own job
    schedules = {s.name: s for s in d.schedules}
    assert schedules["data_refresh_schedule"].job_name == "data_refresh"
    assert schedules["retrain_and_evaluate_schedule"].job_name == "retrain_and_evaluate"
    assert {s.name: s for s in d.sensors}["new_problem_file_sensor"].job_name == "data_refresh"


def test_dg_check_defs_cli(tmp_path):
    dg_bin = Path(sys.executable).parent / "dg"
    if not dg_bin.exists():
        pytest.skip(f"the dg CLI is not installed next to {sys.executable}")
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path), "VIRTUAL_ENV": str(Path(sys.executable).parent.parent),
           "NO_COLOR": "1"}
    try:
        proc = subprocess.run([str(dg_bin), "check", "defs"], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=240)
    except subprocess.TimeoutExpired:
        pytest.skip("`dg check defs` took longer than 4 minutes on this machine")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "All definitions loaded successfully" in proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------ 2. end to end


def test_micro_run_materialises_everything_and_gates_pass(pipeline):
    materialised = {e.asset_key.to_user_string() for e in pipeline.result.get_asset_materialization_events()}
    assert materialised == ASSETS
    checks = check_results(pipeline.result)
    assert set(checks) == {name for _, name in CHECKS}
    # every blocking gate passed (scaffold_beats_baseline is a warning and may go either way at micro size)
    assert all(passed for name, passed in checks.items() if name != "scaffold_beats_baseline"), checks


def test_rows_in_every_stage_table(pipeline):
    counts = pipeline.counts
    for table in STAGE_TABLES:
        assert counts[table] > 0, f"{table} is empty"
    assert counts["problems"] == 60 and counts["teacher_traces"] == 60
    assert counts["signal_labels"] == counts["segmented_steps"]
    assert counts["quarantine"] == 0
    # two students (scaffold + baseline), each with its own shards
    assert pipeline.wh.query("SELECT kind, count(*) AS n FROM model_versions GROUP BY kind ORDER BY kind") == [
        {"kind": "baseline", "n": 1}, {"kind": "scaffold", "n": 1}]
    # every row records the Dagster run that wrote it
    run_id = pipeline.result.run_id
    for table in STAGE_TABLES:
        assert pipeline.wh.scalar(f"SELECT count(*) FROM {table} WHERE dagster_run_id IS DISTINCT FROM ?",
                                  [run_id]) == 0, table


def test_first_model_is_registered_challenger_and_champion(pipeline):
    assert pipeline.aliases == {"champion": "1", "challenger": "1"}
    promo = metadata(pipeline.result, "model_promotion")
    assert promo["promoted"] is True and promo["previous_champion"] == "none"
    assert promo["champion_version"] == "1" and promo["champion_uri"] == f"models:/{MODEL}@champion"
    c = registry.client(pipeline.reg)
    v1 = c.get_model_version(MODEL, "1")
    assert v1.tags["promoted_by"] == f"dagster run {pipeline.result.run_id}"
    assert "no champion yet" in v1.tags["promotion_reason"]
    assert registry.alias_version(pipeline.reg, registry.CHAMPION, model_name=MODEL + "-baseline") is None
    assert str(c.get_model_version(MODEL + "-baseline", "1").version) == "1"


def test_champion_downloads_and_loads(pipeline, tmp_path):
    model_dir = registry.download_model(pipeline.reg, registry.CHAMPION, dst=tmp_path / "champion")
    assert (model_dir / "model.safetensors").exists() or list(model_dir.glob("*.safetensors"))
    model = ScaffoldStudent.from_pretrained(model_dir)
    assert isinstance(model, ScaffoldStudent)
    assert sum(p.numel() for p in model.parameters()) > 0
    # the same directory the registry points at for version 1
    assert registry.resolve_version(pipeline.reg, "champion") == "1"


def test_row_level_lineage_joins(pipeline):
    wh = pipeline.wh
    members = {r["trace_id"] for r in wh.query("SELECT DISTINCT trace_id FROM shard_members")}
    correct_train = {r["trace_id"] for r in wh.query(
        "SELECT t.trace_id FROM teacher_traces t JOIN problems p USING (problem_id) "
        "WHERE p.split = 'train' AND t.is_correct")}
    assert members and members <= correct_train
    # no test-split problem leaks into training shards
    assert wh.scalar("SELECT count(*) FROM shard_members m JOIN teacher_traces t USING (trace_id) "
                     "JOIN problems p USING (problem_id) WHERE p.split <> 'train'") == 0
    # each model version lists shards that exist, of its own kind and manifest
    assert wh.scalar("SELECT count(*) FROM model_shards ms ANTI JOIN shards s USING (shard_id)") == 0
    for mv in wh.query("SELECT * FROM model_versions"):
        shards = wh.query("SELECT s.kind, s.manifest_hash FROM model_shards ms JOIN shards s USING (shard_id) "
                          "WHERE ms.model_name = ? AND ms.version = ?", [mv["model_name"], mv["version"]])
        assert shards and {(s["kind"], s["manifest_hash"]) for s in shards} == {(mv["kind"], mv["manifest_hash"])}
    # "which teacher traces trained the champion?" is one query
    champion_traces = {r["trace_id"] for r in wh.query(
        "SELECT DISTINCT m.trace_id FROM model_shards ms JOIN shard_members m USING (shard_id) "
        "WHERE ms.model_name = ? AND ms.version = ?", [MODEL, pipeline.aliases["champion"]])}
    assert champion_traces and champion_traces <= correct_train
    # every score row names a registered model version and its MLflow run
    c = registry.client(pipeline.reg)
    scores = wh.query("SELECT DISTINCT s.model_name, s.version, s.mlflow_run_id, v.mlflow_run_id AS mv_run "
                      "FROM benchmark_scores s LEFT JOIN model_versions v USING (model_name, version) "
                      "WHERE s.variant != 'base'")
    assert {(r["model_name"], r["version"]) for r in scores} == {(MODEL, "1"), (MODEL + "-baseline", "1")}
    for r in scores:
        assert r["mlflow_run_id"] == r["mv_run"]
        assert c.get_model_version(r["model_name"], r["version"]).run_id == r["mlflow_run_id"]
    # the untuned backbone is scored too, named by its path, with no MLflow run
    base = wh.query("SELECT model_name, version, mlflow_run_id FROM benchmark_scores WHERE variant = 'base'")
    assert len(base) == 1 and base[0]["model_name"].startswith("base:") and base[0]["mlflow_run_id"] is None
    # one evaluation, one id, one eval config: the comparison table's rows
    rows = wh.query("SELECT * FROM benchmark_scores")
    assert len({r["evaluation_id"] for r in rows}) == 1 and len({r["eval_config_hash"] for r in rows}) == 1
    assert {r["variant"] for r in rows} == {"base", "cot_sft", "predicted", "golden", "random", "summaries_only"}


def test_mlflow_runs_record_lineage_and_no_secrets(pipeline):
    c = registry.client(pipeline.reg)
    manifests = {r["mlflow_run_id"]: r["manifest_hash"] for r in pipeline.wh.query("SELECT * FROM model_versions")}
    assert len(manifests) == 2
    for run_id, manifest in manifests.items():
        run = c.get_run(run_id)
        params, tags = run.data.params, run.data.tags
        assert params["manifest_hash"] == manifest
        assert params["dagster_run_id"] == pipeline.result.run_id
        assert tags["dagster_run_id"] == pipeline.result.run_id
        assert any(k.startswith("train.") for k in params)
        for key, value in {**params, **{k: v for k, v in tags.items() if not k.startswith("mlflow.")}}.items():
            assert not SECRET_KEY.search(key), f"secret-looking key {key!r} logged"
            assert SECRET not in str(value) and not SECRET_VALUE.search(str(value)), f"{key}={value!r}"
        # scores were logged onto the model's own run
        assert any(k.endswith(".accuracy") for k in run.data.metrics)
    for mv in c.search_model_versions(f"name='{MODEL}'"):
        assert not any(SECRET in str(v) for v in mv.tags.values())


# ---------------------------------------------------------------------------------- 3. incremental refresh


def data_graph() -> list:
    return [a for a in graph() if {k.to_user_string() for k in getattr(a, "keys", set())} & set(DATA_ASSETS)
            or any(k.asset_key.to_user_string() in DATA_ASSETS for k in getattr(a, "check_keys", set()))]


def test_second_data_refresh_makes_no_teacher_calls(pipeline):
    before = pipeline.wh.counts()
    result = dg.materialize(data_graph(), resources=resources(pipeline.home), instance=pipeline.instance,
                            run_config={"ops": {"problems": {"config": {"n_problems": 60}}}})
    assert result.success
    teacher = metadata(result, "teacher_traces")
    assert teacher["asked"] == 0 and teacher["skipped_existing"] == 60
    for asset in DATA_ASSETS:
        assert metadata(result, asset)["new_rows"] == 0, asset
    assert pipeline.wh.counts() == before


def test_growing_the_problem_set_adds_only_the_new_ones(pipeline, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    # a copy of the warehouse so the shared run's tables stay as they were
    for f in pipeline.home.glob("warehouse.duckdb*"):
        shutil.copy(f, home / f.name)
    wh = Warehouse(home / "warehouse.duckdb")
    before = wh.counts()
    old_ids = {r["problem_id"] for r in wh.query("SELECT problem_id FROM problems")}
    grown = {p.problem_id for p in generate_problems(GeneratorConfig(n_problems=70, seed=0))}
    assert old_ids < grown
    result = dg.materialize(data_graph(), resources=resources(home),
                            run_config={"ops": {"problems": {"config": {"n_problems": 70}}}})
    assert result.success
    assert metadata(result, "problems")["new_rows"] == 10
    teacher = metadata(result, "teacher_traces")
    assert teacher["asked"] == 10 and teacher["new_rows"] == 10 and teacher["skipped_existing"] == 60
    after = wh.counts()
    assert after["problems"] == before["problems"] + 10
    assert after["teacher_traces"] == before["teacher_traces"] + 10
    new_traced = {r["problem_id"] for r in wh.query("SELECT problem_id FROM teacher_traces WHERE dagster_run_id = ?",
                                                    [result.run_id])}
    assert new_traced == grown - old_ids
    # steps and labels only for the new traces
    assert wh.scalar("SELECT count(*) FROM segmented_steps s JOIN teacher_traces t USING (trace_id) "
                     "WHERE s.dagster_run_id = ? AND t.dagster_run_id IS DISTINCT FROM ?",
                     [result.run_id, result.run_id]) == 0
    new_steps = after["segmented_steps"] - before["segmented_steps"]
    assert new_steps > 0 and metadata(result, "segmented_steps")["new_rows"] == new_steps
    assert after["signal_labels"] - before["signal_labels"] == new_steps


# ------------------------------------------------------------------------------------------ 4. promotion


def test_promotion_refused_when_margin_not_met(pipeline):
    """Retrain the scaffold student and evaluate it again with a promotion margin no model can meet: a new version
    becomes challenger, champion stays on version 1 and the refusal is recorded on the new version."""
    selection = ["student_model", "benchmark_scores", "model_promotion"]
    result = dg.materialize(graph(), selection=selection, resources=resources(pipeline.home, promotion_margin=1.0),
                            run_config=only_ops(micro_run_config(), selection), instance=pipeline.instance,
                            raise_on_error=False)
    assert result.success, failures(result)
    student = metadata(result, "student_model")
    assert student["model_version"] == "2"
    promo = metadata(result, "model_promotion")
    assert promo["promoted"] is False
    assert promo["challenger_version"] == "2" and promo["previous_champion"] == "1"
    assert promo["champion_version"] == "1"
    assert "margin 1.000" in promo["reason"]
    assert registry.alias_version(pipeline.reg, registry.CHAMPION) == "1"
    assert registry.alias_version(pipeline.reg, registry.CHALLENGER) == "2"
    c = registry.client(pipeline.reg)
    v2 = c.get_model_version(MODEL, "2")
    assert "does not beat champion" in v2.tags["promotion_refused"]
    assert "promoted_by" not in v2.tags
    # the new version's scores are in the warehouse next to the champion's
    assert pipeline.wh.scalar("SELECT count(*) FROM benchmark_scores WHERE model_name = ? AND version = '2'",
                              [MODEL]) > 0
    # and the champion still loads by alias
    assert ScaffoldStudent.from_pretrained(registry.download_model(pipeline.reg, registry.CHAMPION))


def test_promotion_refused_when_a_blocking_check_failed_in_an_earlier_run(pipeline, tmp_path):
    """With margin 0, v2 (same weights as v1, so the same score) would be promoted; a blocking data check that
    failed in a later data refresh must stop it, even though that failure happened in another run."""
    assert registry.alias_version(pipeline.reg, registry.CHALLENGER) == "2", "runs after the margin test"
    bad = dg.materialize(
        [a for a in graph() if {k.to_user_string() for k in getattr(a, "keys", set())} & {"problems", "teacher_traces"}
         or any(k.name == "teacher_accuracy_above_floor" for k in getattr(a, "check_keys", set()))],
        resources={"warehouse": WarehouseResource(path=str(tmp_path / "bad.duckdb")),
                   "teacher": TeacherResource(wrong_fraction=1.0)},
        run_config={"ops": {"problems": {"config": {"n_problems": 12}}}}, instance=pipeline.instance,
        raise_on_error=False)
    assert check_results(bad)["teacher_accuracy_above_floor"] is False
    result = dg.materialize(graph(), selection=["model_promotion"], resources=resources(pipeline.home),
                            instance=pipeline.instance, raise_on_error=False)
    assert result.success, failures(result)
    promo = metadata(result, "model_promotion")
    assert promo["promoted"] is False and promo["champion_version"] == "1"
    assert "blocked by failed checks" in promo["reason"] and "teacher_accuracy_above_floor" in promo["reason"]
    assert bad.run_id in promo["reason"]
    assert registry.alias_version(pipeline.reg, registry.CHAMPION) == "1"
    refused = registry.client(pipeline.reg).get_model_version(MODEL, "2").tags["promotion_refused"]
    assert "teacher_accuracy_above_floor" in refused

    # once the check passes again (a good data refresh), the same challenger is promoted (margin 0, equal score)
    good = dg.materialize(
        [a for a in graph() if {k.to_user_string() for k in getattr(a, "keys", set())} & {"teacher_traces"}
         or any(k.name == "teacher_accuracy_above_floor" for k in getattr(a, "check_keys", set()))],
        selection=dg.AssetSelection.checks_for_assets("teacher_traces"),
        resources={"warehouse": WarehouseResource(path=str(pipeline.wh.path)), "teacher": TeacherResource()},
        instance=pipeline.instance)
    assert check_results(good)["teacher_accuracy_above_floor"] is True
    result = dg.materialize(graph(), selection=["model_promotion"], resources=resources(pipeline.home),
                            instance=pipeline.instance)
    promo = metadata(result, "model_promotion")
    assert promo["promoted"] is True and promo["champion_version"] == "2", promo["reason"]
    v2 = registry.client(pipeline.reg).get_model_version(MODEL, "2")
    assert v2.tags["promoted_by"] == f"dagster run {result.run_id}"


    # rollback goes through the same call and records who and why; the rolled-back champion loads by alias
    registry.set_champion(pipeline.reg, "1", "rollback: v2 was promoted by mistake", who="on-call")
    assert registry.alias_version(pipeline.reg, registry.CHAMPION) == "1"
    v1 = registry.client(pipeline.reg).get_model_version(MODEL, "1")
    assert v1.tags["promoted_by"] == "on-call" and v1.tags["promotion_reason"].startswith("rollback")
    assert ScaffoldStudent.from_pretrained(registry.download_model(pipeline.reg, registry.CHAMPION, dst=tmp_path / "c"))


# --------------------------------------------------------------------------------------------- 5. sensor


def evaluate_sensor() -> dg.SensorResult:
    return automation.new_problem_file_sensor(dg.build_sensor_context())


def test_sensor_skips_without_incoming_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    result = evaluate_sensor()
    assert not result.run_requests
    assert result.skip_reason is not None and "does not exist" in result.skip_reason.skip_message


def test_sensor_requests_a_run_per_new_or_changed_file(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    assert not evaluate_sensor().run_requests
    (incoming / "notes.txt").write_text("not a problem file")
    assert not evaluate_sensor().run_requests
    path = incoming / "gsm8k_extra.jsonl"
    path.write_text('{"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = 7\\n#### 7"}\n')
    os.utime(path, (1_700_000_000, 1_700_000_000))
    (first,) = evaluate_sensor().run_requests
    assert first.tags["problem_file"] == "gsm8k_extra.jsonl"
    assert first.run_key.startswith("gsm8k_extra.jsonl:")
    # unchanged file: the same run key, so Dagster does not launch it twice
    (again,) = evaluate_sensor().run_requests
    assert again.run_key == first.run_key
    # changed content (and mtime): a new run key
    with path.open("a") as fh:
        fh.write('{"question": "Ann has 5 pens and loses 2. How many?", "answer": "#### 3"}\n')
    os.utime(path, (1_700_000_100, 1_700_000_100))
    (changed,) = evaluate_sensor().run_requests
    assert changed.run_key != first.run_key
    # touched only (same size, new mtime): also picked up again
    os.utime(path, (1_700_000_200, 1_700_000_200))
    (touched,) = evaluate_sensor().run_requests
    assert touched.run_key not in {first.run_key, changed.run_key}


# ------------------------------------------------------------------------------------ 6. failing checks


def _steps_warehouse(path: Path, texts: list[list[str]]) -> Warehouse:
    wh = Warehouse(path)
    wh.insert_new("segmented_steps", [{"step_id": f"t{t}-s{i}", "trace_id": f"t{t}", "idx": i, "text": s}
                                      for t, steps in enumerate(texts) for i, s in enumerate(steps)])
    return wh


def test_label_coverage_check_fails_without_keywords(warehouse_path):
    wh = _steps_warehouse(warehouse_path, [["Zebra quux flibber.", "Purple wombat dances.", "Blorp 7."]] * 3)
    label_signals(wh)
    result = data_assets.label_coverage_in_bounds(warehouse=WarehouseResource(path=str(warehouse_path)))
    assert result.passed is False
    assert result.metadata["keyword_coverage"].value < 0.5
    assert result.metadata["fallback_share"].value > 0.3


def test_label_coverage_check_passes_with_keywords(pipeline):
    result = data_assets.label_coverage_in_bounds(warehouse=WarehouseResource(path=str(pipeline.wh.path)))
    assert result.passed is True


def test_no_empty_steps_check(warehouse_path):
    _steps_warehouse(warehouse_path, [["First, add 3 and 4.", "So the answer is 7."]])
    res = WarehouseResource(path=str(warehouse_path))
    assert data_assets.no_empty_steps(warehouse=res).passed is True
    # whitespace of any kind (DuckDB's trim() alone strips spaces only)
    Warehouse(warehouse_path).insert_new("segmented_steps", [
        {"step_id": "blank", "trace_id": "t9", "idx": 0, "text": "   "},
        {"step_id": "newlines", "trace_id": "t9", "idx": 1, "text": "  \n\t "},
        {"step_id": "nbsp", "trace_id": "t9", "idx": 2, "text": "\u00a0\n"}])
    failed = data_assets.no_empty_steps(warehouse=res)
    assert failed.passed is False and failed.metadata["empty_steps"].value == 3


def test_teacher_accuracy_check_fails_and_blocks_downstream(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    picked = {"problems", "teacher_traces", "segmented_steps"}
    selection = [a for a in graph() if {k.to_user_string() for k in getattr(a, "keys", set())} & picked
                 or any(k.asset_key.to_user_string() == "teacher_traces" for k in getattr(a, "check_keys", set()))]
    result = dg.materialize(
        selection, raise_on_error=False,
        resources={"warehouse": WarehouseResource(path=str(tmp_path / "w.duckdb")),
                   "teacher": TeacherResource(wrong_fraction=1.0)},
        run_config={"ops": {"problems": {"config": {"n_problems": 12}}}})
    checks = check_results(result)
    assert checks["teacher_accuracy_above_floor"] is False
    evaluation = next(e for e in result.get_asset_check_evaluations()
                      if e.check_name == "teacher_accuracy_above_floor")
    assert evaluation.metadata["teacher_accuracy"].value < 0.5
    # the check is blocking: segmented_steps is not materialised on top of a bad teacher
    materialised = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert "teacher_traces" in materialised and "segmented_steps" not in materialised


def test_a_user_gsm8k_file_runs_through_its_suite_partition(pipeline, tmp_path, capsys):
    """The benchmark_scores partition `gsm8k` scores the student, the baseline and the base model on a GSM8K-format
    file the user supplied; `scaffold scores` then prints the comparison table with a column per suite."""
    suites = tmp_path / "benchmarks"
    suites.mkdir()
    (suites / "gsm8k_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"question": "Tom has 3 apples and buys 4 more. How many apples does Tom have?", "answer": "3 + 4 = 7\n#### 7"},
        {"question": "A box holds 12 pens. How many pens are in 2 boxes?", "answer": "#### 24"},
        {"question": "Sam had 1,000 coins and spent 1. How many are left?", "answer": "#### 999"}]))
    cfg = {"ops": {"benchmark_scores": {"config": {**micro_run_config()["ops"]["benchmark_scores"]["config"],
                                                   "suites_dir": str(suites), "limit": 3}}}}
    result = dg.materialize(graph(), selection=["benchmark_scores"], partition_key="gsm8k", run_config=cfg,
                            resources=resources(pipeline.home), instance=pipeline.instance, raise_on_error=False)
    assert result.success, failures(result)
    meta = metadata(result, "benchmark_scores")
    assert meta["suites"] == "gsm8k" and "| variant | gsm8k |" in meta["comparison_table"]
    samples = json.loads(json.dumps(meta["samples"]))
    first = Path(next(iter(samples.values()))).read_text().splitlines()
    assert {"doc_id", "prompt", "response", "extracted", "gold", "correct"} <= set(json.loads(first[0]))
    rows = pipeline.wh.query("SELECT variant, n FROM benchmark_scores WHERE benchmark = 'gsm8k'")
    assert {r["variant"] for r in rows} == {"base", "cot_sft", "predicted", "random", "summaries_only"}  # no golden:
    assert {r["n"] for r in rows} == {3}  # the user file has no teacher traces
    # a suite whose file is missing fails with where to put it, and nothing is written
    missing = dg.materialize(graph(), selection=["benchmark_scores"], partition_key="math500", run_config=cfg,
                             resources=resources(pipeline.home), instance=pipeline.instance, raise_on_error=False)
    assert not missing.success and "math500_test.jsonl: no such file" in failures(missing)
    from scaffold_lib.cli import main as scaffold

    version = str(meta["challenger_version"])
    assert scaffold(["scores", "--model", version, "--warehouse", str(pipeline.home / "warehouse.duckdb")]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("| variant | gsm8k | synthetic-arith |")
    assert "| cot_sft |" in printed and "| base |" in printed
