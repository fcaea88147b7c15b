"""The stage table (`scaffold_lib.stages`) is the one declaration of the pipeline: the Dagster definitions, the
in-process runner and the `scaffold` commands list exactly its stages and checks, with the same blocking flags,
dependencies and settings; and a stage added to the table alone runs under all three."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from scaffold_lib import stages
from scaffold_lib.checks import Finding
from scaffold_lib.config import load_preset
from scaffold_lib.runner import GateFailed, run_stages
from scaffold_lib.stages import PIPELINE, STAGES, Gate, Stage, StageCall
from scaffold_lib.store.handles import StageReport
from scaffold_lib.store.store import Store

REPO = Path(__file__).resolve().parent.parent
TABLE_GATES = {(s.name, g.name): g.blocking for s in STAGES for g in s.gates}

DEFINITIONS = """
import json
import dagster as dg
from pipelines.definitions import defs
d = defs()
ag = d.resolve_asset_graph()
assets = {}
for key in ag.get_all_asset_keys():
    node, op = ag.get(key), d.resolve_assets_def(key).op
    assets[key.to_user_string()] = {
        "parents": sorted(k.to_user_string() for k in node.parent_keys),
        "group": node.group_name,
        "pools": sorted(node.pools or []),
        "sections": sorted(op.config_schema.as_field().config_type.fields),
    }
checks = {f"{k.asset_key.to_user_string()}.{k.name}": ag.get(k).blocking for k in ag.asset_check_keys}
pipeline = sorted(k.to_user_string() for k in d.resolve_job_def("full_pipeline").asset_layer.selected_asset_keys)
print(json.dumps({"assets": assets, "checks": checks, "full_pipeline": pipeline}))
"""


@pytest.fixture(scope="module")
def dagster_definitions(tmp_path_factory) -> dict:
    """What Dagster loads from `pipelines/defs/` under a fresh instance (in a subprocess: the definitions read the
    instance's preset when they are imported)."""
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path_factory.mktemp("home"))}
    proc = subprocess.run(
        [sys.executable, "-c", DEFINITIONS], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_dagster_has_an_asset_per_stage_and_a_check_per_gate(dagster_definitions):
    assets, checks = dagster_definitions["assets"], dagster_definitions["checks"]
    fleet = "teacher_trace_shards"  # Dagster's partitioned twin of the teacher stage, for a fleet's backfills
    assert set(assets) - {fleet} == {s.name for s in STAGES}
    assert checks == {f"{stage}.{gate}": blocking for (stage, gate), blocking in TABLE_GATES.items()}
    assert dagster_definitions["full_pipeline"] == sorted(s.name for s in PIPELINE)
    for s in STAGES:
        asset = assets[s.name]
        twin = [fleet] if "teacher_traces" in s.upstream else []
        assert asset["parents"] == sorted([*s.upstream, *twin]), s.name
        assert asset["sections"] == sorted(s.sections) and asset["group"] == s.group, s.name
        assert asset["pools"] == ([{"warehouse": "duckdb_writer", "accelerator": "gpu"}[s.pool]] if s.pool else [])
    assert assets[fleet]["sections"] == sorted(stages.stage("teacher_traces").sections)


def test_the_cli_has_a_command_per_stage_command_with_the_stages_settings(tmp_path):
    from scaffold_lib.cli import build_parser
    from scaffold_lib.cli.flags import FLAG_PREFIX

    commands = build_parser(["--home", str(tmp_path), "presets"])._subparsers._group_actions[0].choices
    assert set(stages.commands()) | {"run"} <= set(commands)
    for name in stages.commands():
        dests = {a.dest for a in commands[name]._actions if isinstance(a, argparse.Action)}
        for s in stages.of_command(name):
            assert {FLAG_PREFIX + path for path in s.flags} <= dests, (name, s.name)


def test_the_runner_runs_the_table_with_its_checks_and_a_failed_gate_stops_what_depends_on_it(tmp_path):
    lines: list[str] = []
    data = list(stages.of_command("data"))
    small = {"problems": {"synthetic": {"n_problems": 12}, "ood": {"n_problems": 0}}}
    good = load_preset("micro", small).config
    result = run_stages(Store.at(tmp_path / "good"), good, data, log=lines.append)
    assert list(result.outputs) == [s.name for s in data]
    assert {(c.asset, c.name): c.blocking for c in result.checks} == {
        k: v for k, v in TABLE_GATES.items() if k[0] in result.outputs
    }
    assert [line for line in lines if line.startswith("[")] == [c.line() for c in result.checks]

    bad = load_preset("micro", {**small, "teacher": {"programmatic": {"wrong_fraction": 1.0}}}).config
    lines.clear()
    with pytest.raises(GateFailed, match=r"teacher_traces\.teacher_accuracy_above_floor failed"):
        run_stages(Store.at(tmp_path / "bad"), bad, data, log=lines.append)
    # the steps and labels depend on the traces and do not run; decontamination does not, and did
    assert "segmented_steps: not run (teacher_traces.teacher_accuracy_above_floor failed)" in lines
    assert "signal_labels: not run (teacher_traces.teacher_accuracy_above_floor failed)" in lines
    assert any(line.startswith("decontamination: +") for line in lines)


def _count_problems(call: StageCall) -> StageReport:
    n = call.store.warehouse.count("problems")
    return StageReport("problem_count", 0, n, {"problems": n})


EXTRA = Stage(
    "problem_count",
    _count_problems,
    sections=("problems",),
    group="data",
    command="count",
    description="How many problems the warehouse holds: a stage that exists only in this test.",
    after=("problems",),
    gates=(
        Gate("some_problems", lambda store, _: Finding(store.warehouse.count("problems") > 0), True, "some problems"),
    ),
)


def test_a_stage_added_to_the_table_alone_runs_under_dagster_the_runner_and_the_cli(tmp_path, monkeypatch):
    """One edit: the table entry. Dagster's asset and check, the runner and a `scaffold` command come from it."""
    from pipelines.defs.resources import StoreResource
    from pipelines.defs.stage_assets import stage_asset, stage_check
    from scaffold_lib.cli import main

    monkeypatch.setattr(stages, "STAGES", (*STAGES, EXTRA))
    monkeypatch.setattr(stages, "BY_NAME", {**stages.BY_NAME, EXTRA.name: EXTRA})
    cfg = load_preset("micro", {"problems": {"synthetic": {"n_problems": 5}, "ood": {"n_problems": 0}}}).config
    home = tmp_path / "home"
    result = run_stages(Store.at(home), cfg, [stages.stage("problems"), EXTRA], log=lambda _: None)
    assert result.outputs["problem_count"].total_rows == 5 and result.checks[-1].passed

    monkeypatch.setenv("DAGSTER_HOME", str(home))
    run_config = {"ops": {"problem_count": {"config": {"problems": cfg.problems.model_dump(mode="json")}}}}
    materialized = dg.materialize(
        [stage_asset(EXTRA), stage_check(EXTRA, EXTRA.gates[0])],
        resources={"store": StoreResource(home=str(home))},
        run_config=run_config,
        selection=["problem_count"],
    )
    assert materialized.success
    (evaluation,) = materialized.get_asset_check_evaluations()
    assert evaluation.check_name == "some_problems" and evaluation.passed

    assert main(["--home", str(home), "--preset", "micro", "count"]) == 0
