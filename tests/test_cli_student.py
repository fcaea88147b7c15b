"""The student commands of the `scaffold` CLI, run as real subprocesses on a tiny instance: pack, train (registers
versions with lineage), eval (stores scores), ask, scores, lineage, promote."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from scaffold_lib.store.store import Store

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def scaffold(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DAGSTER_HOME": str(home), "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "scaffold_lib.cli", "--preset", "micro", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("cli-home")
    assert scaffold("data", "--n-problems", "40", home=home).returncode == 0
    packed = scaffold("pack", home=home)
    assert packed.returncode == 0, packed.stderr
    info = json.loads(packed.stdout)
    out = scaffold("train", "--steps", "3", "--batch-size", "2", home=home)
    assert out.returncode == 0, out.stderr
    model_dir = [line for line in out.stdout.splitlines() if line.startswith("model: ")][0].removeprefix("model: ")
    return {"home": home, "info": info, "model": model_dir, "train_stdout": out.stdout}


def test_pack_reports_manifests_fill_and_budget(trained):
    info = trained["info"]
    assert set(info["manifests"]) == {"scaffold", "baseline"}
    assert 0.5 < info["stats"]["scaffold"]["fill_ratio"] <= 1.0
    assert Path(info["base_model"], "tokenizer.json").exists() and Path(info["handle"]).exists()
    assert info["budget"]["reply_tokens_p99"] > info["budget"]["answer_tokens_p99"] > 0


def test_train_registers_both_arms_with_lineage(trained):
    stdout = trained["train_stdout"]
    assert "trained scaffold for 3 steps" in stdout and "trained baseline for 3 steps" in stdout
    assert "registered: models:/scaffold-student/1" in stdout
    assert "registered: models:/scaffold-student-baseline/1" in stdout
    assert Path(trained["model"], "model.safetensors").exists()
    wh = Store.at(trained["home"]).warehouse
    versions = wh.query("SELECT model_name, version, kind FROM model_versions ORDER BY kind")
    assert versions == [
        {"model_name": "scaffold-student-baseline", "version": "1", "kind": "baseline"},
        {"model_name": "scaffold-student", "version": "1", "kind": "scaffold"},
    ]
    assert wh.scalar("SELECT count(*) FROM model_shards") == wh.scalar("SELECT count(*) FROM shards")
    # every row names the CLI run that wrote it
    assert {r["dagster_run_id"][:4] for r in wh.query("SELECT dagster_run_id FROM model_versions")} == {"cli-"}


def test_train_registers_the_serving_decode_settings_the_asset_does(trained):
    """The same function builds them for `scaffold train`, the Dagster asset and the in-process runner: the preset's
    τ (0.0 in micro, from demo; the library's is 0.96) and the caps resolved from the shards' budget."""
    from scaffold_lib.config import resolve
    from scaffold_lib.evaluation.metrics import serving_decode

    written = json.loads(Path(trained["model"], "decode.json").read_text())
    expected = serving_decode(resolve(trained["home"], "micro").config.eval, trained["info"]["budget"])
    assert written == expected and written["tau"] == 0.0


def test_eval_stores_scores_and_prints_the_tables(trained):
    out = scaffold("eval", "--limit", "2", "--variants", "predicted", "random", "--samples", home=trained["home"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("| variant | heldout (test) |")  # the comparison table: a column per suite
    assert re.search(r"^\| predicted \| \d+\.\d % \(n=2, \d+–\d+\) \|$", out.stdout, re.M)
    wh = Store.at(trained["home"]).warehouse
    rows = wh.query("SELECT model_name, variant, n FROM benchmark_scores ORDER BY model_name, variant")
    assert {(r["model_name"], r["variant"]) for r in rows} == {
        ("scaffold-student", "predicted"),
        ("scaffold-student", "random"),
        ("scaffold-student-baseline", "cot_sft"),
        ("base:embedded", "base"),
    }
    assert {r["n"] for r in rows} == {2}
    assert wh.scalar("SELECT count(*) FROM item_scores") == 2 * 4
    sample_files = [line.split(": ", 2)[-1] for line in out.stdout.splitlines() if line.endswith(".jsonl")]
    records = [json.loads(line) for line in Path(sample_files[0]).read_text().splitlines()]
    assert {"doc_id", "prompt", "response", "extracted", "gold", "correct"} <= set(records[0])
    scores = scaffold("scores", "--model", "1", home=trained["home"])
    assert scores.returncode == 0 and scores.stdout.startswith("| variant | heldout (test) |")
    assert "| base:embedded (untuned) | heldout (test) | base |" in scores.stdout and "vuntuned" not in scores.stdout


def test_ask_prints_tagged_steps_and_an_answer(trained):
    out = scaffold(
        "ask",
        "Ava has 3 apples. Ava buys 2 more apples. How many apples does Ava have now?",
        "--model",
        trained["model"],
        "--tau",
        "0",
        home=trained["home"],
    )
    assert out.returncode == 0, out.stderr
    assert "[response_generation]" in out.stdout and "answer:" in out.stdout


def test_promote_applies_the_rule_and_lineage_lists_the_traces(trained):
    out = scaffold("promote", home=trained["home"])
    assert out.returncode == 0, out.stderr
    assert "promotion of v1: yes" in out.stdout
    lineage = scaffold("lineage", "--model", "champion", home=trained["home"])
    assert lineage.returncode == 0 and "scaffold-student v1: trained on" in lineage.stdout
    total = int(re.search(r"trained on (\d+) teacher traces", lineage.stdout).group(1))
    assert total > 10 and lineage.stdout.count("  trace ") == 10
    assert f"… 10 of {total:,} traces shown; --limit N for more, --all for every one" in lineage.stdout
    every = scaffold("lineage", "--model", "champion", "--all", home=trained["home"])
    assert every.stdout.count("  trace ") == total and "traces shown" not in every.stdout


def test_registry_commands_explain_a_missing_registry(tmp_path):
    for args in (
        ("ask", "q", "--model", "champion"),
        ("promote", "--version", "1"),
        ("lineage", "--model", "champion"),
        ("train",),
        ("eval",),
    ):
        out = scaffold(*args, home=tmp_path)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert "Traceback" not in out.stderr and "scaffold" in out.stderr


def test_lineage_of_an_unknown_trace_is_empty(trained):
    out = scaffold("lineage", "--trace", "nope", home=trained["home"])
    assert out.returncode == 0 and "reached 0 model version(s)" in out.stdout


# last: its evaluation (gsm8k only) becomes the newest, which `scaffold promote` would apply the rule to
def test_eval_scores_a_benchmark_file_given_on_the_command_line(trained, tmp_path):
    suite = tmp_path / "my_gsm8k.jsonl"
    rows = [
        {
            "question": "Ava has 3 apples. Ava buys 2 more apples. How many apples does Ava have now?",
            "answer": "#### 5",
        },
        {"question": "Ben has 7 pens. He gives away 3. How many pens are left?", "answer": "7 - 3 = 4\n#### 4"},
        {"question": "Broken?", "answer": "no number here"},
        {"question": "What is a quarter?", "answer": "#### .25"},
    ]
    suite.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = scaffold(
        "eval", "--suite", "gsm8k", "--suite-file", str(suite), "--limit", "3", "--no-baseline", home=trained["home"]
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("| variant | gsm8k |")
    assert "gsm8k: 1 rows of its file quarantined" in out.stdout
    wh = Store.at(trained["home"]).warehouse
    scored = wh.query(
        "SELECT DISTINCT doc_id, gold FROM item_scores WHERE benchmark = 'gsm8k' AND variant = 'predicted' ORDER BY gold"
    )
    assert [r["gold"] for r in scored] == ["0.25", "4", "5"]  # the file's items, '.25' read as 0.25
    (bad,) = wh.query("SELECT source_file, line, field FROM quarantine WHERE stage = 'suite:gsm8k'")
    assert (bad["source_file"], bad["line"], bad["field"]) == (str(suite), 3, "answer")
    # another file for the same suite is another column: its scores are never compared with these
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps(rows[0]) + "\n")
    again = scaffold(
        "eval",
        "--suite",
        "gsm8k",
        "--suite-file",
        f"gsm8k={other}",
        "--limit",
        "3",
        "--no-baseline",
        home=trained["home"],
    )
    assert again.returncode == 0, again.stderr
    hashes = wh.query("SELECT DISTINCT eval_config_hash FROM benchmark_scores WHERE benchmark = 'gsm8k'")
    assert len(hashes) == 2  # same settings, same limit: only the file's items differ
    wrong = scaffold("eval", "--suite-file", str(other), home=trained["home"])  # micro scores heldout only
    assert wrong.returncode == 2 and "say which suite it is for (--suite-file SUITE=FILE)" in wrong.stderr
