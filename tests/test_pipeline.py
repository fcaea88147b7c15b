"""The Dagster layer: definitions load; one end-to-end run of the micro preset (rows, registry, aliases, lineage,
MLflow); the CLI and Dagster write the same rows; overlapping runs each score their own model; defaults come from
one place; incremental refresh; promotion gates; the file sensor; checks that fail when they should.

One micro run of the whole graph is shared by the module (`pipeline` fixture), against a temporary DAGSTER_HOME
with its own DuckDB file, MLflow sqlite store and artifacts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from pipelines.defs import automation
from scaffold_lib.config import load_preset, save_instance_settings
from scaffold_lib.evaluation.decoding import ScaffoldDecoder
from scaffold_lib.evaluation.evaluate import load_for_eval
from scaffold_lib.evaluation.handles import EvaluationHandle
from scaffold_lib.store import registry
from scaffold_lib.store.handles import load_handle
from scaffold_lib.store.store import Store
from scaffold_lib.store.warehouse import AUDIT_COLUMNS, Warehouse
from support.dagster_kit import (
    REPO,
    check_results,
    definitions,
    failures,
    graph,
    materialize_stages,
    metadata,
    micro,
    new_instance,
    resources,
    run_config,
)
from support.stages import label_signals

pytestmark = pytest.mark.slow  # the shared end-to-end run
MODEL = "scaffold-student"
ASSETS = {
    "problems",
    "decontamination",
    "teacher_traces",
    "segmented_steps",
    "signal_labels",
    "packed_shards",
    "student_model",
    "baseline_model",
    "benchmark_scores",
    "model_promotion",
}
DATA_ASSETS = ("problems", "decontamination", "teacher_traces", "segmented_steps", "signal_labels")
CHECKS = {
    ("problems", "problems_without_quarantine"),
    ("problems", "splits_disjoint_by_group"),
    ("teacher_traces", "teacher_accuracy_above_floor"),
    ("segmented_steps", "no_empty_steps"),
    ("signal_labels", "one_row_per_step"),
    ("signal_labels", "label_coverage_in_bounds"),
    ("packed_shards", "shard_fill_on_target"),
    ("student_model", "student_loss_finite_and_falling"),
    ("baseline_model", "baseline_loss_finite_and_falling"),
    ("benchmark_scores", "scaffold_beats_baseline"),
}
STAGE_TABLES = (
    "problems",
    "teacher_traces",
    "segmented_steps",
    "signal_labels",
    "shards",
    "shard_members",
    "model_versions",
    "model_shards",
    "benchmark_scores",
    "item_scores",
)
# a value that must never reach MLflow: an API key in the environment
SECRET = "sk-test-DO-NOT-LOG-0123456789abcdef"
SECRET_KEY = re.compile(r"(api[_-]?key|secret|password|passwd|credential|auth|bearer)", re.I)
SECRET_VALUE = re.compile(r"(sk-[A-Za-z0-9-]{12,}|Bearer\s+\S+)")


@dataclass
class Pipeline:
    home: Path
    instance: dg.DagsterInstance
    result: dg.ExecuteInProcessResult
    store: Store
    wh: Warehouse
    reg: registry.RegistryConfig
    counts: dict[str, int]
    aliases: dict[str, str | None]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Iterator[Pipeline]:
    """The whole graph materialised once, in process, against a temporary DAGSTER_HOME."""
    home = tmp_path_factory.mktemp("dagster_home")
    mp = pytest.MonkeyPatch()
    mp.setenv("DAGSTER_HOME", str(home))
    mp.setenv("OPENAI_API_KEY", SECRET)
    instance = new_instance(home)
    try:
        result = dg.materialize(
            graph(), resources=resources(home), run_config=run_config(micro()), instance=instance, raise_on_error=False
        )
        assert result.success, f"micro pipeline run failed: {failures(result)}"
        store = Store.at(home)
        aliases = {a: registry.alias_version(store.registry, a) for a in (registry.CHAMPION, registry.CHALLENGER)}
        yield Pipeline(
            home, instance, result, store, store.warehouse, store.registry, store.warehouse.counts(), aliases
        )
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
    assert {"full_pipeline", "data_refresh", "retrain_and_evaluate", "trace_backfill", "experiment"} <= {
        j.name for j in d.jobs
    }
    optional = {"teacher_trace_shards": "teacher_fleet", "experiment_report": "experiment"}
    assert set(ag.get_all_asset_keys()) - {dg.AssetKey(a) for a in ASSETS} == {dg.AssetKey(a) for a in optional}
    for key in ag.get_all_asset_keys():
        node = ag.get(key)
        name = key.to_user_string()
        expected = "data" if name in DATA_ASSETS else optional.get(name, "student")
        assert node.group_name == expected, name
        assert node.kinds, f"{name} has no kinds"
        assert node.description and len(node.description) > 30, f"{name} has no docstring"
    assert {"store", "secrets", "io_manager"} <= set(d.resources or {})


def test_jobs_select_the_right_stages():
    d = definitions()

    def selected(job_name: str) -> set[str]:
        return {k.to_user_string() for k in d.resolve_job_def(job_name).asset_layer.selected_asset_keys}

    assert selected("data_refresh") == set(DATA_ASSETS)
    assert selected("retrain_and_evaluate") == ASSETS - set(DATA_ASSETS)
    assert selected("full_pipeline") == ASSETS
    assert selected("trace_backfill") == {"teacher_trace_shards"}  # partitioned: only in its own job
    assert selected("experiment") == set(DATA_ASSETS) | {"experiment_report"}  # trains many models: its own job
    schedules = {s.name: s for s in d.schedules}
    assert schedules["data_refresh_schedule"].job_name == "data_refresh"
    assert schedules["retrain_and_evaluate_schedule"].job_name == "retrain_and_evaluate"
    assert {s.name: s for s in d.sensors}["new_problem_file_sensor"].job_name == "data_refresh"


def test_dg_check_defs_cli(tmp_path):
    dg_bin = Path(sys.executable).parent / "dg"
    env = {
        **os.environ,
        "DAGSTER_HOME": str(tmp_path),
        "VIRTUAL_ENV": str(Path(sys.executable).parent.parent),
        "NO_COLOR": "1",
    }
    proc = subprocess.run(
        [str(dg_bin), "check", "defs"], cwd=REPO, env=env, capture_output=True, text=True, timeout=540
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "All definitions loaded successfully" in proc.stdout + proc.stderr


# --------------------------------------------------------------------- 2. one configuration, one code path

DUMP_DAGSTER_DEFAULTS = """
import json
from pipelines.definitions import defs
from support.dagster_kit import ASSET_SECTIONS
d = defs()
print(json.dumps({asset: d.resolve_assets_def(asset).op.config_schema.as_field().default_value
                  for asset in ASSET_SECTIONS}))
"""


@pytest.mark.parametrize("preset", [None, "micro"])
def test_every_default_comes_from_the_library_and_the_instance_preset(tmp_path, preset):
    """Dagster's run-config defaults and the CLI's resolved settings are the library's preset, section by section:
    nothing is typed twice, and an instance keeps the preset it was set up with."""
    from support.dagster_kit import ASSET_SECTIONS

    home = tmp_path / "home"
    if preset:
        save_instance_settings(home, preset)
    expected = load_preset(preset or "demo").config.model_dump(mode="json")
    env = {**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    dagster = subprocess.run(
        [sys.executable, "-c", DUMP_DAGSTER_DEFAULTS], env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert dagster.returncode == 0, dagster.stderr[-2000:]
    for asset, defaults in json.loads(dagster.stdout.strip().splitlines()[-1]).items():
        for section in ASSET_SECTIONS[asset]:
            assert defaults[section] == json.loads(json.dumps(expected[section])), (asset, section)
    cli = subprocess.run(
        [sys.executable, "-m", "scaffold_lib.cli", "--home", str(home), "config"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout.split("\n", 1)[1]) == expected
    assert cli.stdout.startswith(f"# preset {preset or 'demo'} v{load_preset(preset or 'demo').preset_version}")


TABLE_KEYS = {
    "problems": ["problem_id"],
    "teacher_traces": ["trace_id"],
    "segmented_steps": ["step_id"],
    "signal_labels": ["step_id"],
    "shards": ["shard_id"],
    "shard_members": ["shard_id", "trace_id"],
    "model_versions": ["model_name", "version"],
    "model_shards": ["model_name", "version", "shard_id"],
    "benchmark_scores": ["score_id"],
    "item_scores": ["model_name", "version", "benchmark", "variant", "doc_id"],
}
# columns that name where or by whom a row was written, not what it holds
VOLATILE = {c.split()[0] for c in AUDIT_COLUMNS.split(",")} | {"mlflow_run_id", "path", "evaluation_id"}


def table_rows(wh: Warehouse, table: str) -> list[dict]:
    rows = wh.query(f"SELECT * FROM {table}")
    return sorted(
        ({k: v for k, v in r.items() if k not in VOLATILE} for r in rows),
        key=lambda r: tuple(str(r[k]) for k in TABLE_KEYS[table]),
    )


def test_the_cli_and_dagster_write_the_same_rows(pipeline, tmp_path):
    """`scaffold run --preset micro` (no Dagster) and the Dagster run of the same preset call the same stage
    functions: every stage table holds the same rows, scores included."""
    home = tmp_path / "cli"
    env = {**os.environ, "DAGSTER_HOME": str(home), "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
    import torch

    # the same number of threads as this process's in-process Dagster run: float sums in another order would differ
    # in the last bits
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    proc = subprocess.run(
        [sys.executable, "-m", "scaffold_lib.cli", "--home", str(home), "--preset", "micro", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    cli = Warehouse(home / "warehouse.duckdb")
    for table in STAGE_TABLES:
        ours, theirs = table_rows(cli, table), table_rows(pipeline.wh, table)
        assert len(ours) == len(theirs) > 0, table
        assert ours == theirs, table
    # the same table layout as the demo prints
    assert "The comparison table (Pass@1):" in proc.stdout and "| variant | heldout (test) |" in proc.stdout
    # and the same checks, with the same verdicts, as the Dagster run evaluated
    evaluated = re.findall(r"^\[(ok |FAIL|warn)\] (\w+)\.(\w+):", proc.stdout, re.M)
    dagster = {
        (e.asset_key.to_user_string(), e.check_name): e.passed for e in pipeline.result.get_asset_check_evaluations()
    }
    assert {(asset, name): mark == "ok " for mark, asset, name in evaluated} == dagster


def test_overlapping_runs_each_score_their_own_model(tmp_path, monkeypatch):
    """Run A trains v_a and, while it is about to evaluate, run B trains v_b (now the latest student_model). A's
    benchmark_scores still scores v_a: assets take their upstream's output from their own run."""
    from scaffold_lib.evaluation import evaluate

    home = tmp_path / "home"
    instance = new_instance(home)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    cfg = micro()
    original = evaluate.evaluate_models
    a_waiting, b_done = threading.Event(), threading.Event()

    def evaluate_after_b(*args, **kwargs):
        a_waiting.set()
        assert b_done.wait(300), "run B did not finish"
        return original(*args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_models", evaluate_after_b)
    upstream = [*DATA_ASSETS, "packed_shards"]
    shards_run = [materialize_stages(upstream, cfg, home, instance)]
    results: dict[str, dg.ExecuteInProcessResult] = {}

    def run_a() -> None:
        selection = ["student_model", "baseline_model", "benchmark_scores"]
        results["a"] = materialize_stages(selection, cfg, home, instance, raise_on_error=False)

    a = threading.Thread(target=run_a)
    a.start()
    assert a_waiting.wait(300), "run A never reached its evaluation"
    other_seed = micro(train={"seed": 1})
    results["b"] = materialize_stages(["student_model"], other_seed, home, instance)
    b_done.set()
    a.join(300)
    assert shards_run[0].success and results["b"].success and results["a"].success, failures(results["a"])
    version_a = metadata(results["a"], "student_model")["model_version"]
    version_b = metadata(results["b"], "student_model")["model_version"]
    assert int(version_b) == int(version_a) + 1
    latest = instance.get_latest_materialization_event(dg.AssetKey("student_model"))
    assert latest.run_id == results["b"].run_id  # B's student is the instance-wide latest ...
    evaluation = load_handle(home, "benchmark_scores", EvaluationHandle, results["a"].run_id)
    assert evaluation.version == version_a  # ... and A scored its own
    scored = Store.at(home).warehouse.query(
        "SELECT DISTINCT version FROM benchmark_scores WHERE model_name = ? AND dagster_run_id = ?",
        [MODEL, results["a"].run_id],
    )
    assert scored == [{"version": version_a}]
    instance.dispose()


# ------------------------------------------------------------------------------------------ 3. end to end


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
    assert {r["split"] for r in pipeline.wh.query("SELECT DISTINCT split FROM problems")} == {
        "train",
        "validation",
        "test",
    }
    # two students (scaffold + baseline), each with its own shards
    assert pipeline.wh.query("SELECT kind, count(*) AS n FROM model_versions GROUP BY kind ORDER BY kind") == [
        {"kind": "baseline", "n": 1},
        {"kind": "scaffold", "n": 1},
    ]
    # every row records the Dagster run that wrote it
    run_id = pipeline.result.run_id
    for table in STAGE_TABLES:
        assert (
            pipeline.wh.scalar(f"SELECT count(*) FROM {table} WHERE dagster_run_id IS DISTINCT FROM ?", [run_id]) == 0
        ), table


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


def test_the_metadata_reads_well_on_a_first_visit(pipeline):
    """Floats rounded everywhere (no 0.14666666666666667), the loss curve shown inline as text with the plot one click
    away, links to the experiment's training runs, and how to list every trace that trained the student."""
    from pipelines.defs.common import rounded

    floats = 0
    for mat in pipeline.result.get_asset_materialization_events():
        for key, value in mat.step_materialization_data.materialization.metadata.items():
            if isinstance(value.value, float):
                floats += 1
                assert value.value == rounded(value.value), (mat.asset_key, key, value.value)
    for check in pipeline.result.get_asset_check_evaluations():
        for key, value in check.metadata.items():
            assert not isinstance(value.value, float) or value.value == rounded(value.value), (check.check_name, key)
    assert floats > 3
    meta = metadata(pipeline.result, "student_model")
    assert re.fullmatch(r"\d+\.\d{3} [▁▂▃▄▅▆▇█]{2,32} \d+\.\d{3}", meta["loss_curve"]), meta["loss_curve"]
    assert re.fullmatch(r"http://127.0.0.1:5000/get-artifact\?path=\w+\.png&run_uuid=\w+", meta["loss_plot"])
    assert re.fullmatch(r"http://127.0.0.1:5000/#/experiments/\d+/runs", meta["mlflow_runs"])
    assert meta["all_traces_command"] == f"scaffold lineage --model {meta['model_version']} --all"


def test_the_champion_loads_and_answers_exactly_as_the_trained_student(pipeline, tmp_path):
    """The registered artifact is the trained student: same weights, same heads, same answer to a question."""
    model_dir = registry.download_model(pipeline.reg, registry.CHAMPION, dst=tmp_path / "champion")
    champion, fmt = load_for_eval(model_dir)
    handle = metadata(pipeline.result, "student_model")
    trained, _ = load_for_eval(Path(json.loads(Path(handle["handle"]).read_text())["handle"]["path"]))
    for (name, a), b in zip(champion.state_dict().items(), trained.state_dict().values()):
        assert (a == b).all(), name
    question = pipeline.wh.scalar("SELECT question FROM problems WHERE split = 'test' ORDER BY problem_id LIMIT 1")
    cfg = micro().eval.decode.model_copy(update={"tau": 0.0})
    a = ScaffoldDecoder(champion, fmt.tokenizer, cfg, fmt).generate(question)
    b = ScaffoldDecoder(trained, fmt.tokenizer, cfg, fmt).generate(question)
    assert a.render() == b.render() and a.steps  # it decodes signal-tagged steps, identically


def test_row_level_lineage_joins(pipeline):
    wh = pipeline.wh
    members = {r["trace_id"] for r in wh.query("SELECT DISTINCT trace_id FROM shard_members")}
    correct_train = {
        r["trace_id"]
        for r in wh.query(
            "SELECT t.trace_id FROM teacher_traces t JOIN problems p USING (problem_id) "
            "WHERE p.split = 'train' AND t.is_correct"
        )
    }
    assert members and members == correct_train
    # no held-out problem leaks into training shards
    assert (
        wh.scalar(
            "SELECT count(*) FROM shard_members m JOIN teacher_traces t USING (trace_id) "
            "JOIN problems p USING (problem_id) WHERE p.split <> 'train'"
        )
        == 0
    )
    # each model version lists shards that exist, of its own kind and manifest
    assert wh.scalar("SELECT count(*) FROM model_shards ms ANTI JOIN shards s USING (shard_id)") == 0
    for mv in wh.query("SELECT * FROM model_versions"):
        shards = wh.query(
            "SELECT s.kind, s.manifest_hash FROM model_shards ms JOIN shards s USING (shard_id) "
            "WHERE ms.model_name = ? AND ms.version = ?",
            [mv["model_name"], mv["version"]],
        )
        assert shards and {(s["kind"], s["manifest_hash"]) for s in shards} == {(mv["kind"], mv["manifest_hash"])}
    # every score row names a registered model version and its MLflow run
    c = registry.client(pipeline.reg)
    scores = wh.query(
        "SELECT DISTINCT s.model_name, s.version, s.mlflow_run_id, v.mlflow_run_id AS mv_run "
        "FROM benchmark_scores s LEFT JOIN model_versions v USING (model_name, version) "
        "WHERE s.variant != 'base'"
    )
    assert {(r["model_name"], r["version"]) for r in scores} == {(MODEL, "1"), (MODEL + "-baseline", "1")}
    for r in scores:
        assert r["mlflow_run_id"] == r["mv_run"]
        assert c.get_model_version(r["model_name"], r["version"]).run_id == r["mlflow_run_id"]
    base = wh.query("SELECT model_name, version, mlflow_run_id FROM benchmark_scores WHERE variant = 'base'")
    assert len(base) == 1 and base[0]["model_name"].startswith("base:") and base[0]["mlflow_run_id"] is None
    rows = wh.query("SELECT * FROM benchmark_scores")
    assert len({r["evaluation_id"] for r in rows}) == 1 and len({r["eval_config_hash"] for r in rows}) == 1
    assert {r["variant"] for r in rows} == {"base", "cot_sft", "predicted", "golden", "random", "summaries_only"}
    # paired: every variant answered the same items
    items = wh.query("SELECT variant, list(doc_id ORDER BY doc_id) AS docs FROM item_scores GROUP BY variant")
    assert len({tuple(r["docs"]) for r in items}) == 1


def test_mlflow_runs_are_live_record_lineage_and_no_secrets(pipeline):
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
        # opened before training and closed after registration: a real duration, with the step metrics in between
        history = c.get_metric_history(run_id, "loss")
        assert history and run.info.start_time <= min(m.timestamp for m in history) <= run.info.end_time
        assert run.inputs.dataset_inputs[0].dataset.digest == manifest
        for key, value in {**params, **{k: v for k, v in tags.items() if not k.startswith("mlflow.")}}.items():
            assert not SECRET_KEY.search(key), f"secret-looking key {key!r} logged"
            assert SECRET not in str(value) and not SECRET_VALUE.search(str(value)), f"{key}={value!r}"
        assert any(k.endswith(".accuracy") for k in run.data.metrics)
    for mv in c.search_model_versions(f"name='{MODEL}'"):
        assert not any(SECRET in str(v) for v in mv.tags.values())


# ---------------------------------------------------------------------------------- 4. incremental refresh


def data_graph() -> list:
    return [
        a
        for a in graph()
        if {k.to_user_string() for k in getattr(a, "keys", set())} & set(DATA_ASSETS)
        or any(k.asset_key.to_user_string() in DATA_ASSETS for k in getattr(a, "check_keys", set()))
    ]


def test_second_data_refresh_makes_no_teacher_calls(pipeline):
    before = pipeline.wh.counts()
    result = dg.materialize(
        data_graph(),
        resources=resources(pipeline.home),
        instance=pipeline.instance,
        run_config=run_config(micro(), DATA_ASSETS),
    )
    assert result.success
    teacher = metadata(result, "teacher_traces")
    assert teacher["asked"] == 0 and teacher["skipped_existing"] == 60
    for asset in DATA_ASSETS:
        assert metadata(result, asset)["new_rows"] == 0, asset
    assert pipeline.wh.counts() == before


def test_growing_the_problem_set_adds_only_the_new_ones(pipeline, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    for f in pipeline.home.glob("warehouse.duckdb*"):  # a copy, so the shared run's tables stay as they were
        shutil.copy(f, home / f.name)
    wh = Warehouse(home / "warehouse.duckdb")
    before = wh.counts()
    old_ids = {r["problem_id"] for r in wh.query("SELECT problem_id FROM problems")}
    grown_cfg = micro(problems={"synthetic": {"n_problems": 70}})
    from scaffold_lib.data.synthetic import generate_problems

    grown = {p.problem_id for p in generate_problems(grown_cfg.problems.synthetic, grown_cfg.problems.split)}
    assert old_ids < grown
    result = dg.materialize(data_graph(), resources=resources(home), run_config=run_config(grown_cfg, DATA_ASSETS))
    assert result.success
    assert metadata(result, "problems")["new_rows"] == 10
    teacher = metadata(result, "teacher_traces")
    assert teacher["asked"] == 10 and teacher["new_rows"] == 10 and teacher["skipped_existing"] == 60
    after = wh.counts()
    assert after["problems"] == before["problems"] + 10
    assert after["teacher_traces"] == before["teacher_traces"] + 10
    new_traced = {
        r["problem_id"]
        for r in wh.query("SELECT problem_id FROM teacher_traces WHERE dagster_run_id = ?", [result.run_id])
    }
    assert new_traced == grown - old_ids
    assert (
        wh.scalar(
            "SELECT count(*) FROM segmented_steps s JOIN teacher_traces t USING (trace_id) "
            "WHERE s.dagster_run_id = ? AND t.dagster_run_id IS DISTINCT FROM ?",
            [result.run_id, result.run_id],
        )
        == 0
    )
    new_steps = after["segmented_steps"] - before["segmented_steps"]
    assert new_steps > 0 and metadata(result, "segmented_steps")["new_rows"] == new_steps
    assert after["signal_labels"] - before["signal_labels"] == new_steps


# ------------------------------------------------------------------------------------------ 5. promotion


def test_promotion_refused_when_margin_not_met(pipeline):
    """Retrain and evaluate again with a promotion margin no model can meet: a new version becomes challenger,
    champion stays on version 1 and the refusal is recorded on the new version."""
    selection = ["student_model", "baseline_model", "benchmark_scores", "model_promotion"]
    cfg = micro(promotion={"margin": 1.0})
    result = materialize_stages(selection, cfg, pipeline.home, pipeline.instance, raise_on_error=False)
    assert result.success, failures(result)
    assert metadata(result, "student_model")["model_version"] == "2"
    promo = metadata(result, "model_promotion")
    assert promo["promoted"] is False
    assert promo["challenger_version"] == "2" and promo["previous_champion"] == "1"
    assert promo["champion_version"] == "1"
    assert "margin 1.000" in promo["reason"]
    assert registry.alias_version(pipeline.reg, registry.CHAMPION) == "1"
    assert registry.alias_version(pipeline.reg, registry.CHALLENGER) == "2"
    v2 = registry.client(pipeline.reg).get_model_version(MODEL, "2")
    assert "does not beat champion" in v2.tags["promotion_refused"]
    assert "promoted_by" not in v2.tags
    assert (
        pipeline.wh.scalar("SELECT count(*) FROM benchmark_scores WHERE model_name = ? AND version = '2'", [MODEL]) > 0
    )


def test_promotion_refused_when_a_blocking_check_failed_in_an_earlier_run(pipeline, tmp_path):
    """With margin 0, v2 (same data and seed as v1, so the same score) would be promoted; a blocking data check that
    failed in a later data refresh must stop it, even though that failure happened in another run."""
    assert registry.alias_version(pipeline.reg, registry.CHALLENGER) == "2", "runs after the margin test"
    teacher_graph = [
        a
        for a in graph()
        if {k.to_user_string() for k in getattr(a, "keys", set())} & {"problems", "teacher_traces"}
        or any(k.name == "teacher_accuracy_above_floor" for k in getattr(a, "check_keys", set()))
    ]
    bad_home = tmp_path / "bad"
    bad_cfg = micro(problems={"synthetic": {"n_problems": 12}}, teacher={"programmatic": {"wrong_fraction": 1.0}})
    bad = dg.materialize(
        teacher_graph,
        resources=resources(bad_home),
        run_config=run_config(bad_cfg, ["problems", "teacher_traces"]),
        instance=pipeline.instance,
        raise_on_error=False,
    )
    assert check_results(bad)["teacher_accuracy_above_floor"] is False
    promote = ["model_promotion"]
    result = materialize_stages(promote, micro(), pipeline.home, pipeline.instance, raise_on_error=False)
    assert result.success, failures(result)
    promo = metadata(result, "model_promotion")
    assert promo["promoted"] is False and promo["champion_version"] == "1"
    assert "blocked by failed checks" in promo["reason"] and "teacher_accuracy_above_floor" in promo["reason"]
    assert bad.run_id in promo["reason"]
    refused = registry.client(pipeline.reg).get_model_version(MODEL, "2").tags["promotion_refused"]
    assert "teacher_accuracy_above_floor" in refused

    # once the check passes again (a good data refresh), the same challenger is promoted (margin 0, equal score)
    good = dg.materialize(
        teacher_graph,
        selection=dg.AssetSelection.checks_for_assets("teacher_traces"),
        resources=resources(pipeline.home),
        instance=pipeline.instance,
    )
    assert check_results(good)["teacher_accuracy_above_floor"] is True
    result = materialize_stages(promote, micro(), pipeline.home, pipeline.instance)
    promo = metadata(result, "model_promotion")
    assert promo["promoted"] is True and promo["champion_version"] == "2", promo["reason"]
    assert (
        registry.client(pipeline.reg).get_model_version(MODEL, "2").tags["promoted_by"]
        == f"dagster run {result.run_id}"
    )

    # rollback goes through the same call and records who and why; the rolled-back champion loads by alias
    registry.set_champion(pipeline.reg, "1", "rollback: v2 was promoted by mistake", who="on-call")
    assert registry.alias_version(pipeline.reg, registry.CHAMPION) == "1"
    v1 = registry.client(pipeline.reg).get_model_version(MODEL, "1")
    assert v1.tags["promoted_by"] == "on-call" and v1.tags["promotion_reason"].startswith("rollback")
    model, _ = load_for_eval(registry.download_model(pipeline.reg, registry.CHAMPION, dst=tmp_path / "c"))
    assert model.kind == "scaffold"


# --------------------------------------------------------------------------------------------- 6. sensor


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
    empty = evaluate_sensor()
    assert not empty.run_requests and "no problem file (.jsonl, " in empty.skip_reason.skip_message
    path = incoming / "gsm8k_extra.jsonl"
    path.write_text('{"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = 7\\n#### 7"}\n')
    os.utime(path, (1_700_000_000, 1_700_000_000))
    (first,) = evaluate_sensor().run_requests
    assert first.tags["problem_file"] == "gsm8k_extra.jsonl"
    assert first.run_key.startswith("gsm8k_extra.jsonl:")
    (again,) = evaluate_sensor().run_requests
    assert again.run_key == first.run_key  # unchanged file: the same run key, so Dagster does not launch it twice
    with path.open("a") as fh:
        fh.write('{"question": "Ann has 5 pens and loses 2. How many?", "answer": "#### 3"}\n')
    os.utime(path, (1_700_000_100, 1_700_000_100))
    (changed,) = evaluate_sensor().run_requests
    assert changed.run_key != first.run_key
    os.utime(path, (1_700_000_200, 1_700_000_200))
    (touched,) = evaluate_sensor().run_requests
    assert touched.run_key not in {first.run_key, changed.run_key}


# ------------------------------------------------------------------------------------ 7. failing checks


def _steps_warehouse(path: Path, texts: list[list[str]]) -> Warehouse:
    wh = Warehouse(path)
    wh.insert_new(
        "segmented_steps",
        [
            {"step_id": f"t{t}-s{i}", "trace_id": f"t{t}", "idx": i, "text": s}
            for t, steps in enumerate(texts)
            for i, s in enumerate(steps)
        ],
    )
    return wh


def check(name: str, home: Path) -> dg.AssetCheckResult:
    from pipelines.defs.resources import StoreResource
    from pipelines.defs.stage_assets import CHECKS

    return CHECKS[name](store=StoreResource(home=str(home)))


def test_label_coverage_check_fails_without_keywords(tmp_path):
    wh = _steps_warehouse(
        tmp_path / "warehouse.duckdb", [["Zebra quux flibber.", "Purple wombat dances.", "Blorp 7."]] * 3
    )
    label_signals(wh)
    result = check("label_coverage_in_bounds", tmp_path)
    assert result.passed is False
    assert result.metadata["keyword_coverage"].value < 0.5
    assert result.metadata["fallback_share"].value > 0.3


def test_label_coverage_check_passes_with_keywords(pipeline):
    assert check("label_coverage_in_bounds", pipeline.home).passed is True


def test_no_empty_steps_check(tmp_path):
    _steps_warehouse(tmp_path / "warehouse.duckdb", [["First, add 3 and 4.", "So the answer is 7."]])
    assert check("no_empty_steps", tmp_path).passed is True
    Warehouse(tmp_path / "warehouse.duckdb").insert_new(
        "segmented_steps",
        [
            {"step_id": "blank", "trace_id": "t9", "idx": 0, "text": "   "},
            {"step_id": "newlines", "trace_id": "t9", "idx": 1, "text": "  \n\t "},
            {"step_id": "nbsp", "trace_id": "t9", "idx": 2, "text": "\u00a0\n"},
        ],
    )
    failed = check("no_empty_steps", tmp_path)
    assert failed.passed is False and failed.metadata["empty_steps"].value == 3


def test_one_row_per_step_check(tmp_path):
    """The step tables have no unique index: the stages keep one row per step, re-running writes nothing twice, and
    the check counts what a writer outside the stages duplicated."""
    wh = _steps_warehouse(tmp_path / "warehouse.duckdb", [["First, add 3 and 4.", "So the answer is 7."]] * 2)
    label_signals(wh)
    steps = wh.query("SELECT step_id, trace_id, idx, text FROM segmented_steps")
    assert wh.insert_new("segmented_steps", steps + steps[:1]) == 0 and label_signals(wh).new_rows == 0
    assert check("one_row_per_step", tmp_path).passed is True
    with duckdb.connect(str(tmp_path / "warehouse.duckdb")) as con:
        con.execute("INSERT INTO segmented_steps SELECT * FROM segmented_steps LIMIT 1")
        con.execute("INSERT INTO signal_labels (step_id, signal, labeller, confidence) VALUES ('gone', 'x', 'y', 1)")
    failed = check("one_row_per_step", tmp_path)
    assert failed.passed is False
    assert failed.metadata["duplicate_step_ids"].value == 1 and failed.metadata["labels_without_step"].value == 1


def test_teacher_accuracy_check_fails_and_blocks_downstream(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    picked = {"problems", "teacher_traces", "segmented_steps"}
    selection = [
        a
        for a in graph()
        if {k.to_user_string() for k in getattr(a, "keys", set())} & picked
        or any(k.asset_key.to_user_string() == "teacher_traces" for k in getattr(a, "check_keys", set()))
    ]
    cfg = micro(problems={"synthetic": {"n_problems": 12}}, teacher={"programmatic": {"wrong_fraction": 1.0}})
    result = dg.materialize(
        selection, raise_on_error=False, resources=resources(tmp_path), run_config=run_config(cfg, picked)
    )
    checks = check_results(result)
    assert checks["teacher_accuracy_above_floor"] is False
    evaluation = next(e for e in result.get_asset_check_evaluations() if e.check_name == "teacher_accuracy_above_floor")
    assert evaluation.metadata["teacher_accuracy"].value < 0.5
    # the check is blocking: segmented_steps is not materialised on top of a bad teacher
    materialised = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert "teacher_traces" in materialised and "segmented_steps" not in materialised


def test_a_user_gsm8k_file_is_scored_as_its_own_suite(pipeline, tmp_path, capsys):
    """benchmark_scores scores the student, the baseline and the base model on a GSM8K-format file the user supplied
    (the eval config's `suite_files`, as `scaffold eval --suite-file`); `scaffold scores` then prints the comparison
    table with a column per suite."""
    suites = tmp_path / "benchmarks"
    suites.mkdir()
    (tmp_path / "my_gsm8k.jsonl").write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in [
                {
                    "question": "Tom has 3 apples and buys 4 more. How many apples does Tom have?",
                    "answer": "3 + 4 = 7\n#### 7",
                },
                {"question": "A box holds 12 pens. How many pens are in 2 boxes?", "answer": "#### 24"},
                {"question": "Sam had 1,000 coins and spent 1. How many are left?", "answer": "#### 999"},
            ]
        )
    )
    selection = ["benchmark_scores"]
    cfg = micro(eval={"suites": ["gsm8k"], "suite_files": {"gsm8k": str(tmp_path / "my_gsm8k.jsonl")}, "limit": 3})
    result = materialize_stages(selection, cfg, pipeline.home, pipeline.instance, raise_on_error=False)
    assert result.success, failures(result)
    meta = metadata(result, "benchmark_scores")
    assert meta["suites"] == "gsm8k" and "| variant | gsm8k |" in meta["comparison_table"]
    assert meta["samples"].startswith("| suite | model | file |")  # a table, not JSON of paths
    assert "| gsm8k | base:embedded (untuned) | `" in meta["samples"]
    assert meta["scores"].startswith("| model | suite | variant | n | Pass@1 (95 % CI) |")  # two narrow tables
    assert meta["process_metrics"].startswith("| model | suite | variant | next-signal acc |")
    first = Path(re.search(r"`([^`]+\.jsonl)`", meta["samples"]).group(1)).read_text().splitlines()
    assert {"doc_id", "prompt", "response", "extracted", "gold", "correct"} <= set(json.loads(first[0]))
    rows = pipeline.wh.query("SELECT variant, n FROM benchmark_scores WHERE benchmark = 'gsm8k'")
    assert {r["variant"] for r in rows} == {"base", "cot_sft", "predicted", "random", "summaries_only"}  # no golden:
    assert {r["n"] for r in rows} == {3}  # the user file has no teacher traces
    # a suite whose file is missing fails with where to put it
    missing = dg.materialize(
        graph(),
        selection=selection,
        instance=pipeline.instance,
        raise_on_error=False,
        run_config=run_config(micro(eval={"suites": ["math500"], "suites_dir": str(suites)}), selection),
        resources=resources(pipeline.home),
    )
    assert not missing.success and "math500_test.jsonl: no such file" in failures(missing)
    from scaffold_lib.cli import main as scaffold

    version = str(meta["challenger_version"])
    assert scaffold(["--home", str(pipeline.home), "scores", "--model", version]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("| variant | gsm8k | heldout (test) |")
    assert "| cot_sft |" in printed and "| base |" in printed
