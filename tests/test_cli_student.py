"""The student commands of the `scaffold` CLI, run as real subprocesses on a tiny warehouse."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)


def scaffold(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DAGSTER_HOME": str(home), "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "scaffold_lib.cli", *args], capture_output=True, text=True,
                          env=env, timeout=240)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("cli-home")
    wh = home / "warehouse.duckdb"
    assert scaffold("data", "--warehouse", str(wh), "--n-problems", "40", home=home).returncode == 0
    packed = scaffold("pack", "--warehouse", str(wh), "--artifacts", str(home / "art"), "--row-len", "512", home=home)
    assert packed.returncode == 0, packed.stderr
    info = json.loads(packed.stdout)
    out = scaffold("train", "--warehouse", str(wh), "--artifacts", str(home / "art"), "--base-model", info["base_model"],
                   "--steps", "3", "--batch-size", "2", home=home)
    assert out.returncode == 0, out.stderr
    model_dir = out.stdout.strip().splitlines()[-1].removeprefix("model: ")
    return {"home": home, "wh": wh, "info": info, "model": model_dir, "train_stdout": out.stdout}


def test_pack_reports_manifests_and_fill(trained):
    info = trained["info"]
    assert set(info["manifests"]) == {"scaffold", "baseline"}
    assert 0.5 < info["stats"]["scaffold"]["fill_ratio"] <= 1.0
    assert Path(info["base_model"], "tokenizer.json").exists()


def test_train_prints_loss_and_writes_a_loadable_student(trained):
    assert "trained scaffold for 3 steps" in trained["train_stdout"]
    assert Path(trained["model"], "scaffold_heads.safetensors").exists()
    assert Path(trained["model"], "model.safetensors").exists()


def test_eval_prints_a_score_table_and_exports_samples(trained, tmp_path):
    samples = tmp_path / "samples.jsonl"
    out = scaffold("eval", "--warehouse", str(trained["wh"]), "--model", trained["model"], "--limit", "2",
                   "--variants", "predicted,random", "--samples", str(samples), home=trained["home"])
    assert out.returncode == 0, out.stderr
    assert "| predicted | 2 |" in out.stdout and "| random | 2 |" in out.stdout
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(records) == 4 and {"doc_id", "prompt", "response", "extracted", "gold", "correct"} <= set(records[0])


def test_ask_prints_tagged_steps_and_an_answer(trained):
    out = scaffold("ask", "Ava has 3 apples. Ava buys 2 more apples. How many apples does Ava have now?",
                   "--model", trained["model"], "--tau", "0", home=trained["home"])
    assert out.returncode == 0, out.stderr
    assert "[response_generation]" in out.stdout and "answer:" in out.stdout


def test_registry_commands_explain_a_missing_registry(trained):
    for args in (("ask", "q", "--model", "champion"), ("promote", "--version", "1"), ("lineage", "--model", "champion")):
        out = scaffold(*args, "--warehouse", str(trained["wh"]), home=trained["home"])
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert "Traceback" not in out.stderr and "scaffold" in out.stderr


def test_lineage_of_an_unknown_trace_is_empty(trained):
    out = scaffold("lineage", "--trace", "nope", "--warehouse", str(trained["wh"]), home=trained["home"])
    assert out.returncode == 0 and "reached 0 model version(s)" in out.stdout
