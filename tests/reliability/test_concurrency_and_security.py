"""Guarantees 4–6: concurrent runs neither fail on the DuckDB lock nor lose or duplicate rows; promotions are safe
under races; secrets, pickles, UI bindings, SQL and config paths are handled safely."""

from __future__ import annotations

import ast
import json
import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from scaffold_lib.core.paths import REPO_ROOT, PathOutsideRoot, inside
from scaffold_lib.store import registry
from scaffold_lib.store.warehouse import Warehouse, WarehouseBusyError, WarehouseMemoryError

pytestmark = pytest.mark.timeout(600)
CONCURRENT_RUNS = 3


@pytest.mark.slow
def test_concurrent_data_runs_all_finish_with_the_rows_of_one_run(tmp_path: Path) -> None:
    from test_crashes import DATA_TABLES, data_cmd, env_for, run_ok, table_fingerprint

    data = ("--n-problems", "800", "--seed", "5")
    run_ok(data_cmd(tmp_path / "reference", *data), env_for(tmp_path))
    shared = tmp_path / "shared"
    procs = [
        subprocess.Popen(
            data_cmd(shared, *data), env=env_for(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(CONCURRENT_RUNS)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-2000:]
        assert "lock" not in err.lower()  # no lock error reached the user: writers waited their turn
    reference = Warehouse(tmp_path / "reference" / "warehouse.duckdb")
    result = Warehouse(shared / "warehouse.duckdb")
    for table in DATA_TABLES:
        assert table_fingerprint(result, table) == table_fingerprint(reference, table), table
    print(
        f"\n[reliability] {CONCURRENT_RUNS} concurrent data runs on one warehouse: all finished, tables identical "
        "to one run's"
    )


def test_a_lock_held_too_long_is_a_clear_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "wh.duckdb"
    Warehouse(path)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import duckdb, time; c = duckdb.connect({str(path)!r}); print('holding', flush=True); time.sleep(30)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        started = time.monotonic()
        with pytest.raises(WarehouseBusyError, match=f"{re.escape(str(path))} stayed locked by another process for 1s"):
            Warehouse(path, lock_timeout_s=1.0).scalar("SELECT 1")
        assert time.monotonic() - started >= 1.0  # it waited before giving up
    finally:
        holder.kill()
        holder.wait()


def test_a_query_beyond_duckdbs_memory_limit_names_the_setting_and_keeps_the_rows(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "wh.duckdb"
    Warehouse(path).insert_new("quarantine", [{"quarantine_id": "q1", "stage": "problems", "error": "kept"}])
    monkeypatch.setenv("SCAFFOLD_DUCKDB_MEMORY", "2MB")
    small = Warehouse(path)
    big = "SELECT list(i::VARCHAR || repeat('x', 100)) FROM range(200000) t(i)"
    with pytest.raises(WarehouseMemoryError, match=r"memory limit of 2MB; set SCAFFOLD_DUCKDB_MEMORY higher"):
        small.scalar(big)
    with small.session(), pytest.raises(WarehouseMemoryError, match="SCAFFOLD_DUCKDB_MEMORY"):
        small.scalar(big)
    assert small.scalar("SELECT error FROM quarantine") == "kept"


RACE = """
import json, sys, time
from scaffold_lib.store import registry
cfg = registry.RegistryConfig(tracking_uri=sys.argv[1], artifact_location=sys.argv[2])
scores = {"1": 0.2, "2": 0.3, "3": 0.5}
def accuracy(v):
    time.sleep(0.3)  # a slow read: without the lock both racers would see the old champion
    return scores.get(v)
out = registry.promote_if_better(cfg, sys.argv[3], accuracy, 0.0, [], who="race test")
print(json.dumps({"version": sys.argv[3], "saw": out.previous_champion, "promoted": out.promoted}))
"""


def test_racing_promotions_leave_exactly_one_champion_the_better_one(tmp_path: Path) -> None:
    cfg = registry.RegistryConfig(
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_location=(tmp_path / "art").as_uri()
    )
    c = registry.client(cfg)
    races = 4
    for race in range(races):
        name = f"race-{race}"
        race_cfg = cfg.model_copy(update={"model_name": name})
        c.create_registered_model(name)
        for _ in range(3):
            c.create_model_version(name, source=(tmp_path / "art" / "m").as_uri())
        registry.set_champion(race_cfg, "1", "initial", who="test")
        script = RACE.replace("tracking_uri=sys.argv[1]", f"tracking_uri=sys.argv[1], model_name={name!r}")
        # the worse candidate starts first half the time
        order = ("2", "3") if race % 2 == 0 else ("3", "2")
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", script, cfg.tracking_uri, cfg.artifact_location, v],
                stdout=subprocess.PIPE,
                text=True,
                cwd=REPO_ROOT,
            )
            for v in order
        ]
        results = [p.communicate(timeout=120)[0].strip() for p in procs]
        assert all(p.returncode == 0 for p in procs), results
        seen = {r["version"]: r for r in (json.loads(line.splitlines()[-1]) for line in results)}
        first, second = sorted(seen, key=lambda v: seen[v]["saw"] != "1")
        # serialised: the second racer decided against the first's promotion (unlocked, both would see v1)
        assert seen[first] == {"version": first, "saw": "1", "promoted": True}, seen
        assert seen[second]["saw"] == first, seen
        assert registry.alias_version(race_cfg, registry.CHAMPION) == "3"
        v2 = MlflowClient(cfg.tracking_uri).get_model_version(name, "2")
        # v2 wins only when it decides first, against v1; after v3 it is refused
        assert ("promoted_by" in v2.tags) == (first == "2") and ("promotion_refused" in v2.tags) == (first == "3")
    print(f"\n[reliability] {races} promotion races: champion always the better version")


def test_a_blocked_model_never_becomes_champion_and_a_rollback_records_who_and_why(tmp_path: Path) -> None:
    cfg = registry.RegistryConfig(
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_location=(tmp_path / "art").as_uri()
    )
    c = registry.client(cfg)
    c.create_registered_model(cfg.model_name)
    for _ in range(2):
        c.create_model_version(cfg.model_name, source=(tmp_path / "art" / "m").as_uri())
    registry.set_champion(cfg, "1", "initial", who="test")
    outcome = registry.promote_if_better(
        cfg,
        "2",
        {"1": 0.1, "2": 0.9}.get,
        0.0,
        ["signal_labels.label_coverage_in_bounds failed in run r1"],
        who="dagster",
    )
    assert not outcome.promoted and outcome.champion == "1"
    assert "blocked by failed checks" in c.get_model_version(cfg.model_name, "2").tags["promotion_refused"]
    # the CLI rollback path
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path)}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "scaffold_lib.cli",
            "promote",
            "--version",
            "2",
            "--reason",
            "manual override after review",
            "--who",
            "alice",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    tags = c.get_model_version(cfg.model_name, "2").tags
    assert registry.alias_version(cfg, registry.CHAMPION) == "2"
    assert tags["promoted_by"] == "alice" and tags["promotion_reason"] == "manual override after review"


class _Marker:
    def __reduce__(self):  # unpickling this would run code: create a file
        return (Path.touch, (Path(os.environ["PICKLE_MARKER"]),))


def test_model_loading_refuses_pickled_weights_without_running_them(tmp_path: Path, monkeypatch) -> None:
    from transformers import Qwen2Config

    from scaffold_lib.student.model import ScaffoldStudent

    marker = tmp_path / "pwned"
    monkeypatch.setenv("PICKLE_MARKER", str(marker))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    Qwen2Config(
        vocab_size=300,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    ).save_pretrained(model_dir)
    (model_dir / "pytorch_model.bin").write_bytes(pickle.dumps({"weights": _Marker()}))
    with pytest.raises(Exception) as caught:
        ScaffoldStudent.from_pretrained(model_dir)
    assert "safetensors" in str(caught.value).lower() or "model.safetensors" in str(caught.value)
    assert not marker.exists()


def test_the_uis_the_readme_starts_bind_to_localhost(tmp_path) -> None:
    from pipelines.ui import commands

    makefile = (REPO_ROOT / "Makefile").read_text()
    ui = makefile.split("\nui:", 1)[1].split("\n\n", 1)[0]
    assert "python -m pipelines.ui" in ui
    started = commands(tmp_path, 3000, 5000)
    mlflow, dagster = started["mlflow"], started["dagster"]
    assert mlflow[1] == "server" and mlflow[mlflow.index("--host") + 1] == "127.0.0.1"
    assert dagster[1] == "dev" and dagster[dagster.index("-h") + 1] == "127.0.0.1"
    assert "0.0.0.0" not in makefile


SQL = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|ALTER|CREATE|DROP|PRAGMA)\b")
# what may be interpolated into SQL text
ALLOWED_INTERPOLATIONS = {
    # tables and columns from our own schema constants, never user values
    "table",
    "columns",
    "AUDIT_COLUMNS",
    "name",
    "type_",
    "t",
    "column",
    # SQL fragments written in the library itself (no value from outside reaches them)
    "PROBLEM_COLUMNS",
    "contamination",
    "eligible_traces_sql(drop_contaminated)",
    "members",
    "eligible",
}


def test_every_sql_statement_takes_user_values_as_parameters() -> None:
    offenders = []
    for path in [*(REPO_ROOT / "scaffold_lib").rglob("*.py"), *(REPO_ROOT / "pipelines").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.JoinedStr):
                text = "".join(v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str))
                if not SQL.search(text) or not re.search(r"\b(FROM|INTO|TABLE|SET|WHERE|pragma|PRAGMA)\b", text):
                    continue
                for value in node.values:
                    if isinstance(value, ast.FormattedValue):
                        expr = ast.unparse(value.value)
                        if expr not in ALLOWED_INTERPOLATIONS:
                            offenders.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}: {{{expr}}}")
    assert not offenders, "SQL built with interpolated values (use parameters):\n" + "\n".join(offenders)


def test_paths_built_from_names_cannot_leave_their_root(tmp_path: Path) -> None:
    assert inside(tmp_path, "samples", "gsm8k", "m-v1.jsonl") == (tmp_path / "samples/gsm8k/m-v1.jsonl").resolve()
    for escape in (("..", "etc", "passwd"), ("/etc/passwd",), ("a", "../../b")):
        with pytest.raises(PathOutsideRoot, match="would leave"):
            inside(tmp_path, *escape)
    (tmp_path / "link").symlink_to("/")
    with pytest.raises(PathOutsideRoot):
        inside(tmp_path, "link", "tmp")
