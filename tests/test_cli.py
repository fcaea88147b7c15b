"""The `scaffold` command run for real in a subprocess: `label` output and errors, `data` idempotence."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from scaffold_lib.store.warehouse import Warehouse

TRACE_A = "First, Ava has 3 apples.\n\nThen she buys 2 more, so 3 + 2 = 5.\n\nAva counts them.\n\nThe answer is 5."
TRACE_B = "Hmm, let me think.\r\n\r\n\r\nHowever, 4 - 1 = 3.\n  \nTherefore 3."


def scaffold(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scaffold_lib.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    message = proc.stderr.strip()
    assert "\n" not in message, message  # one line
    for needle in needles:
        assert needle in message, message
    return message


def test_label_success(write_jsonl):
    path = write_jsonl(
        [{"id": "a", "trace": TRACE_A}, "", {"id": 7, "trace": TRACE_B}, {"id": "empty", "trace": " \n\n "}]
    )
    proc = scaffold("label", path)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert all(set(r) == {"trace_id", "idx", "text", "signal", "labeller"} for r in rows)
    assert [(r["trace_id"], r["idx"]) for r in rows] == [
        ("a", 0),
        ("a", 1),
        ("a", 2),
        ("a", 3),
        ("7", 0),
        ("7", 1),
        ("7", 2),
    ]
    assert [(r["signal"], r["labeller"]) for r in rows] == [
        ("reasoning_analysis", "keyword"),
        ("addition_elaboration", "keyword"),
        ("reasoning_analysis", "fallback"),
        ("response_generation", "keyword"),
        ("opinion_recall", "keyword"),
        ("contrast_concession", "keyword"),
        ("response_generation", "final_step"),
    ]
    assert rows[1]["text"] == "Then she buys 2 more, so 3 + 2 = 5."
    assert rows[4]["text"] == "Hmm, let me think."


def test_label_with_custom_keywords(write_jsonl, tmp_path):
    kw = tmp_path / "kw.toml"
    kw.write_text('[examples_illustration]\nkeywords = ["first"]\n', encoding="utf-8")
    proc = scaffold("label", write_jsonl([{"id": "a", "trace": TRACE_A}]), "--keywords", kw)
    assert proc.returncode == 0, proc.stderr
    signals = [json.loads(line)["signal"] for line in proc.stdout.splitlines()]
    assert signals[0] == "examples_illustration"
    assert signals[1] == "reasoning_analysis"  # "then" is not in this file: fallback


def test_label_bad_keywords_file(write_jsonl, tmp_path):
    kw = tmp_path / "bad_kw.toml"
    kw.write_text('[moods]\nkeywords = ["x"]\n', encoding="utf-8")
    proc = scaffold("label", write_jsonl([{"id": "a", "trace": TRACE_A}]), "--keywords", kw)
    assert_user_error(proc, "bad_kw.toml", "unknown signal")


@pytest.mark.parametrize(
    "bad_line, needles",
    [
        (b'{"id": "b", "trace": "unterminated', ["invalid JSON"]),
        (b'{"trace": "So 3."}', ["missing field 'id'"]),
        (b'{"id": "b"}', ["missing field 'trace'"]),
        (b'{"id": "b", "trace": 12}', ["'trace' must be a string", "int"]),
        (b'{"id": "b", "trace": ["So", "3"]}', ["'trace' must be a string", "list"]),
        (b'"just a string"', ["expected a JSON object"]),
        (b'{"id": "b", "trace": "caf\xe9"}', ["not UTF-8"]),
        (b'{"id": "b", "trace": "bad \\ud800 escape"}', ["'trace'", "surrogate"]),
    ],
)
def test_label_errors_name_the_line(write_jsonl, bad_line, needles):
    path = write_jsonl([{"id": "a", "trace": TRACE_A}, "", bad_line])  # the bad line is line 3
    proc = scaffold("label", path)
    message = assert_user_error(proc, f"{path}:3:", *needles)
    assert message.startswith("scaffold label: error: ")


def test_label_missing_file(tmp_path):
    assert_user_error(scaffold("label", tmp_path / "nope.jsonl"), "nope.jsonl", "cannot open")


def test_label_output_piped_into_a_closed_reader_is_fine(write_jsonl):
    path = write_jsonl([{"id": str(i), "trace": TRACE_A} for i in range(3000)])
    proc = subprocess.run(
        f"{sys.executable} -m scaffold_lib.cli label {path} | head -n 1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.stdout.count("\n") == 1
    assert "Traceback" not in proc.stderr


def test_data_twice_adds_nothing_the_second_time(tmp_path):
    home = tmp_path / "home"
    warehouse = home / "warehouse.duckdb"
    first = scaffold("--home", home, "data", "--n-problems", 30)
    assert first.returncode == 0, first.stderr
    assert "problems: +30 new rows (30 total)" in first.stdout
    assert str(warehouse) in first.stdout and "# preset demo v1" in first.stdout
    counts = Warehouse(warehouse).counts()
    assert counts["problems"] == 30 and counts["teacher_traces"] == 30
    assert counts["segmented_steps"] > 4 * 30 and counts["signal_labels"] == counts["segmented_steps"]

    second = scaffold("--home", home, "data", "--n-problems", 30)
    assert second.returncode == 0, second.stderr
    assert Warehouse(warehouse).counts() == counts
    for stage in ("problems", "teacher_traces", "segmented_steps", "signal_labels"):
        assert f"{stage}: +0 new rows" in second.stdout
    assert "asked=0" in second.stdout


def test_data_with_problem_file_strict_lenient_and_loud_when_nothing_is_answered(tmp_path, write_jsonl):
    path = write_jsonl(
        [{"question": "What is 2+2?", "answer": "#### 4"}, b"{broken", {"question": "Q?", "answer": "1"}],
        name="user.jsonl",
    )
    home = tmp_path / "home"
    assert_user_error(
        scaffold("--home", home, "data", "--problems-file", path, "--no-lenient"), f"{path}:2:", "invalid JSON"
    )
    loud = scaffold("--home", home, "data", "--problems-file", path)
    # the programmatic teacher cannot solve these: every problem failed, so the run fails and says why
    assert loud.returncode == 1, (loud.stdout, loud.stderr)
    assert "Traceback" not in loud.stderr and "answered none of 2 problems" in loud.stderr
    assert "only solves the built-in synthetic problems" in loud.stderr
    counts = Warehouse(home / "warehouse.duckdb").counts()
    # what was done is kept: the problems, the quarantined row and the failures
    assert counts["problems"] == 2 and counts["quarantine"] == 1
    assert counts["teacher_traces"] == 0 and counts["teacher_failures"] == 2


def test_data_bad_setting_is_a_user_error(tmp_path):
    assert_user_error(
        scaffold("--home", tmp_path, "data", "--n-problems", 0),
        "problems.synthetic.n_problems",
        "greater than or equal to 1",
    )
    assert_user_error(
        scaffold("--home", tmp_path, "--set", "train.max_step=3", "config"),
        "unknown setting 'train.max_step' (did you mean train.max_steps?)",
    )


def test_help_lists_the_commands():
    proc = scaffold("--help")
    assert proc.returncode == 0
    assert "label" in proc.stdout and "data" in proc.stdout


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["label", "x.jsonl"], "label"),
        (["--home", "data", "--preset", "train", "--set", "a.b=1", "eval"], "eval"),
        (["--home=/h", "--pre", "micro", "data", "--n-problems", "3"], "data"),
        (["--help"], None),
    ],
)
def test_the_command_is_found_past_global_options_and_their_values(argv, command):
    from scaffold_lib.cli import command_of

    assert command_of(argv) == command


def test_only_the_command_being_run_resolves_config_flags(write_jsonl, tmp_path):
    """`scaffold label` never imports torch (resolving config flags would); `data` still has its flags, also
    after global options whose values look like commands."""
    path = write_jsonl([{"id": "a", "trace": TRACE_A}])
    probe = (
        "import sys; from scaffold_lib.cli import main; code = main(sys.argv[1:]); "
        "print('torch imported:', 'torch' in sys.modules, file=sys.stderr); sys.exit(code)"
    )
    proc = subprocess.run([sys.executable, "-c", probe, "label", path], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "torch imported: False" in proc.stderr
    assert len(proc.stdout.splitlines()) == 4
    proc = scaffold("--home", tmp_path / "label", "--set", "problems.synthetic.seed=1", "data", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--n-problems" in proc.stdout and "problems.synthetic.n_problems" in proc.stdout
