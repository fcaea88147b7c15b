"""Guarantees 1 and 2: a `kill -9` at a random point of any stage loses nothing. The next run completes, the stage
tables hold exactly the rows an uninterrupted run writes (same ids, same contents, no duplicates), no file under a
final name is half-written, and training resumes from its last checkpoint to the same loss."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file

from scaffold_lib.store.warehouse import AUDIT_COLUMNS, Warehouse

pytestmark = pytest.mark.timeout(600)
DATA_TABLES = ("problems", "teacher_traces", "teacher_failures", "segmented_steps", "signal_labels", "quarantine")
AUDIT = {c.split()[0] for c in AUDIT_COLUMNS.split(",")}


def scaffold_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "scaffold_lib.cli", *args]


def env_for(home: Path) -> dict:
    return {**os.environ, "DAGSTER_HOME": str(home), "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}


def table_fingerprint(wh: Warehouse, table: str) -> tuple[int, str]:
    """(rows, hash of every row's content without the audit columns): equal iff the tables hold the same rows."""
    columns = [r["column_name"] for r in wh.query("SELECT column_name FROM information_schema.columns "
                                                  "WHERE table_name = ? ORDER BY ordinal_position", [table])
               if r["column_name"] not in AUDIT]
    rows = wh.query(f"SELECT {', '.join(columns)} FROM {table}")
    digest = hashlib.sha256("\n".join(sorted(json.dumps(r, sort_keys=True, default=str) for r in rows)).encode())
    return len(rows), digest.hexdigest()


def kill_after(cmd: list[str], env: dict, delay_s: float) -> bool:
    """Start `cmd`, SIGKILL it after `delay_s`; True if it was still running (the kill landed mid-run)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=delay_s)
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True


def run_ok(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


CRASH_POINTS = 6  # kill points for the data stages, spread over the whole run (seeded)


def test_kill_9_during_the_data_stages_then_rerun_gives_the_uninterrupted_tables(tmp_path: Path) -> None:
    data = ("data", "--n-problems", "1500", "--seed", "3")
    reference = tmp_path / "reference.duckdb"
    started = time.perf_counter()
    run_ok(scaffold_cmd(*data, "--warehouse", str(reference)), env_for(tmp_path))
    duration = time.perf_counter() - started
    expected = {t: table_fingerprint(Warehouse(reference), t) for t in DATA_TABLES}
    assert expected["teacher_traces"][0] > 1000 and expected["signal_labels"][0] > 5000
    rng = random.Random(7)
    landed = 0
    for point in range(CRASH_POINTS):
        warehouse = tmp_path / f"crash-{point}.duckdb"
        # from just after start-up (imports) to the end: every stage gets hit
        landed += kill_after(scaffold_cmd(*data, "--warehouse", str(warehouse)), env_for(tmp_path),
                             rng.uniform(0.25, 1.0) * duration)
        run_ok(scaffold_cmd(*data, "--warehouse", str(warehouse)), env_for(tmp_path))
        wh = Warehouse(warehouse)
        for table in DATA_TABLES:
            assert table_fingerprint(wh, table) == expected[table], (point, table)
    assert landed >= CRASH_POINTS - 1  # the kills really interrupted runs
    print(f"\n[reliability] data stages: {landed} kill -9 points mid-run, tables identical to the reference")


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("train-crash")
    wh = home / "wh.duckdb"
    run_ok(scaffold_cmd("data", "--warehouse", str(wh), "--n-problems", "120"), env_for(home))
    info = json.loads(run_ok(scaffold_cmd("pack", "--warehouse", str(wh), "--artifacts", str(home / "art"),
                                          "--row-len", "512"), env_for(home)).stdout)
    return {"home": home, "wh": wh, "info": info}


def test_kill_9_during_packing_leaves_no_half_written_shard(packed, tmp_path: Path) -> None:
    home, info = packed["home"], packed["info"]
    art = tmp_path / "art"
    # the embedded base model is shared: the crash hits tokenizer training / packing / shard writing
    for point, delay in enumerate((1.5, 2.5, 3.5)):
        kill_after(scaffold_cmd("pack", "--warehouse", str(packed["wh"]), "--artifacts", str(art), "--row-len", "512"),
                   env_for(home), delay)
        for shard in art.rglob("*.parquet"):  # every file under a final name is whole
            pq.read_table(shard)
    again = json.loads(run_ok(scaffold_cmd("pack", "--warehouse", str(packed["wh"]), "--artifacts", str(art),
                                           "--row-len", "512"), env_for(home)).stdout)
    assert again["manifests"] == info["manifests"]  # the same shards, by content hash, as the uninterrupted run
    wh = Warehouse(packed["wh"])
    assert wh.scalar("SELECT count(*) FROM shards") == wh.scalar("SELECT count(DISTINCT shard_id) FROM shards")
    for row in wh.query("SELECT path, n_rows FROM shards WHERE path LIKE ?", [f"{art}%"]):
        assert pq.read_table(row["path"]).num_rows == row["n_rows"]


def _train(packed: dict, art: Path, steps: int) -> list[str]:
    return scaffold_cmd("train", "--warehouse", str(packed["wh"]), "--artifacts", str(art), "--base-model",
                        packed["info"]["base_model"], "--steps", str(steps), "--batch-size", "2",
                        "--checkpoint-every", "5", "--lr", "3e-3")


def _final_loss(stdout: str) -> float:
    return float(stdout.split("loss ")[1].split(" -> ")[1].split(",")[0])


def test_kill_9_during_training_resumes_from_the_last_checkpoint_to_the_same_loss(packed, tmp_path: Path) -> None:
    steps = 30
    reference = run_ok(_train(packed, tmp_path / "ref", steps), env_for(packed["home"]))
    art = tmp_path / "crash"
    proc = subprocess.Popen(_train(packed, art, steps), env=env_for(packed["home"]), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        done = [p for p in art.rglob("step-*") if (p / "trainer_state.json").exists()]
        if any(int(p.name.split("-")[1]) >= 10 for p in done):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    checkpoints = sorted(p for p in art.rglob("step-*") if p.is_dir())
    for ckpt in checkpoints:  # every checkpoint under a final name loads
        load_file(str(ckpt / "model.safetensors"))
        json.loads((ckpt / "trainer_state.json").read_text())
    last = max(int(p.name.split("-")[1]) for p in checkpoints)
    resumed = run_ok(_train(packed, art, steps), env_for(packed["home"]))
    assert f"(resumed from {last})" in resumed.stdout  # from the checkpoint, not from zero
    # batches are a pure function of (seed, step) and the RNG is restored: the same final loss
    difference = abs(_final_loss(resumed.stdout) - _final_loss(reference.stdout))
    assert difference < 1e-3, (resumed.stdout, reference.stdout)
    print(f"\n[reliability] training: killed after step {last}, resumed from it; final loss difference "
          f"{difference:.2e} (tolerance 1e-3)")
