"""The device check (`bench/device_check.py`, issue 30) runs end to end as `--tiny` on the CPU with duckdb, mlflow,
dagster and datasets unimportable, as on the GPU machine, and its report holds what a GPU run is judged on: the loss
and gradients of the attention kernels equal to the masked reference (and a control that breaks the mask caught),
positive throughput and decoding ratios, both arms of the bed trained and scored. Also: the configuration the bed is
read from imports none of those, and a preset file of one's own is read like a named preset."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scaffold_lib.config import load_preset
from scaffold_lib.data.problems import SPLITS

REPO = Path(__file__).resolve().parent.parent

ABSENT_ON_DEVICE = ("duckdb", "mlflow", "dagster", "datasets")
# `import x` of a None entry raises ImportError and importlib.util.find_spec says it is not installed: what the GPU
# machine does. Everything else runs as `python bench/device_check.py ...` would.
BLOCKED_RUN = f"""
import runpy, sys
for name in {ABSENT_ON_DEVICE!r}:
    sys.modules[name] = None
sys.argv = ["bench/device_check.py", *sys.argv[1:]]
try:
    runpy.run_path("bench/device_check.py", run_name="__main__")
finally:
    loaded = [n for n in sys.modules if n.split(".")[0] in {ABSENT_ON_DEVICE!r} and sys.modules[n] is not None]
    print("LOADED_ABSENT", loaded)
"""


@pytest.fixture(scope="module")
def device_parts():
    if str(REPO) not in sys.path:  # bench/ is not an installed package
        sys.path.insert(0, str(REPO))
    return importlib.import_module("bench.device_parts")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[dict, str]:
    work = tmp_path_factory.mktemp("device-check")
    out = work / "device_check.json"
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKED_RUN, "--tiny", "--out", str(out), "--workdir", str(work / "models")],
        cwd=REPO,
        capture_output=True,
        text=True,
        # one thread: on busy cores, torch's threads spinning against other processes' cost more than they give
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    return json.loads(out.read_text()), proc.stdout


def _finite_positive(value) -> bool:
    return isinstance(value, float | int) and math.isfinite(value) and value > 0


@pytest.mark.slow  # an end-to-end run of every part, about 45 s on 2 busy cores
def test_tiny_run_needs_none_of_the_packages_the_gpu_machine_lacks(tiny):
    report, stdout = tiny
    assert "LOADED_ABSENT []" in stdout
    assert report["ok"] and report["errors"] == {} and report["skipped"] == []
    assert report["mode"] == "tiny" and report["environment"]["device"] == "cpu"
    assert set(report["parts"]) == {"attention", "training", "decoding", "bed"}
    assert "loss and gradients equal to the masked reference: yes" in stdout


@pytest.mark.slow
def test_attention_kernels_give_the_masked_references_loss_and_gradients(tiny):
    attention = tiny[0]["parts"]["attention"]
    tol = attention["tolerance"]
    assert attention["ok"] and attention["chosen"] == "packed_documents"
    for size, model in attention["models"].items():
        kernels = model["kernels"]
        assert {"packed_documents", "sdpa"} <= set(kernels), size
        for name, row in kernels.items():
            assert row["loss_rel"] <= tol["loss_rel"], (size, name, row)
            if name != "flex_documents":  # FlexAttention has no CPU backward: forward only here
                assert row["grad_rel"] <= tol["grad_rel"] and row["grad_cos"] > 0.9999, (size, name, row)
        # attending across the examples of a row must be told from the reference, or the check could not fail
        control = model["control_row_causal"]
        assert control["loss_rel"] > tol["loss_rel"] or control["grad_rel"] > tol["grad_rel"]
        assert model["control_detected"]
    assert "flex_documents" in attention["models"]["gpu"]["kernels"]
    for kind, step in attention["train_steps"].items():
        assert step["finite"] and _finite_positive(step["loss"]) and step["label_tokens"] > 0, kind
    assert attention["train_steps"]["scaffold"]["signal_loss"] > 0  # the baseline has no signal term
    assert attention["train_steps"]["baseline"]["signal_loss"] == 0


@pytest.mark.slow
def test_throughput_and_decoding_ratios_are_measured(tiny):
    parts = tiny[0]["parts"]
    for size, row in parts["training"]["sizes"].items():
        assert _finite_positive(row["ratio"]) and _finite_positive(row["ratio_scaffold"]), size
        assert row["ours_baseline"]["tokens"] > 0 and row["hf_trainer"]["tokens"] > 0
        assert row["mfu"] is None  # no peak is assumed for a CPU
    assert parts["training"]["sizes"]["gpu"]["parameters"] < parts["training"]["sizes"]["embedded"]["parameters"]
    for size, row in parts["decoding"]["sizes"].items():
        assert _finite_positive(row["ratio_reply"]) and _finite_positive(row["ratio_generated"]), size
        assert row["scaffold"]["generated"] > 0 and row["generate"]["generated"] > 0


@pytest.mark.slow
def test_both_arms_of_the_bed_are_trained_and_scored(tiny):
    report = tiny[0]
    bed = report["parts"]["bed"]
    assert bed["preset"] == "experiment" and bed["data"]["problems"] == report["scale"]["problems"]
    for kind in ("scaffold", "baseline"):
        arm = bed["arms"][kind]
        assert arm["steps"] == report["scale"]["bed_steps"]
        assert math.isfinite(arm["final_loss"]) and arm["final_loss"] < arm["first_loss"], kind
        for split in ("validation", "test"):
            assert 0.0 <= arm[split]["pass_at_1"] <= 1.0
            assert arm[split]["n"] == report["scale"][f"{split}_limit"]
    assert bed["arms"]["scaffold"]["validation"]["next_signal_acc"] is not None
    assert _finite_positive(bed["wall_s"])


def test_the_configuration_reads_without_the_packages_the_gpu_machine_lacks():
    """`scaffold_lib.config` (which the device check reads its bed from) imports no database, registry, orchestrator,
    dataset, HTTP client or model library: the GPU machine has none of the first five, and `scaffold --help` should
    not wait for the last."""
    lacking = (*ABSENT_ON_DEVICE, "openai", "tenacity", "torch", "transformers")
    probe = (
        f"import sys\nfor name in {ABSENT_ON_DEVICE!r}:\n    sys.modules[name] = None\n"
        "from scaffold_lib.config import load_preset\nload_preset('experiment')\n"
        f"print(sorted(n for n in {lacking!r} if sys.modules.get(n) is not None))"
    )
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"


def test_the_bed_takes_a_preset_file_of_ones_own(device_parts, tmp_path):
    """`--preset FILE.toml`: a file that extends a named preset, read by the library's own `load_preset`."""
    path = tmp_path / "mine.toml"
    path.write_text('extends = "experiment"\n\n[train]\nbeta = 0.7\n\n[eval]\nlimit = 5\n', encoding="utf-8")
    bed, named = device_parts.load_bed(str(path)), device_parts.load_bed("experiment")
    assert bed.train.beta == 0.7 and bed.test_limit == 5
    assert bed.generator == named.generator and bed.student == named.student and bed.segmenter == named.segmenter
    assert bed.teacher_splits == [s for s in load_preset("experiment").config.teacher.splits if s in SPLITS]
