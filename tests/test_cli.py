"""The `scaffold` command run for real in a subprocess: `label` output and errors, `data` idempotence."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from scaffold_lib.store.warehouse import Warehouse

TRACE_A = "First, Ava has 3 apples.\n\nThen she buys 2 more, so 3 + 2 = 5.\n\nAva counts them.\n\nThe answer is 5."
TRACE_B = "Hmm, let me think.\r\n\r\n\r\nHowever, 4 - 1 = 3.\n  \nTherefore 3."


def scaffold(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    # an empty instance unless --home says otherwise: a developer's own dagster_home must not change the results
    home = {"DAGSTER_HOME": tempfile.mkdtemp(prefix="scaffold-cli-")}
    return subprocess.run(
        [sys.executable, "-m", "scaffold_lib.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={**os.environ, **home, **(env or {})},
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
    no_ood = ("--set", "problems.ood.n_problems=0")  # the demo's OOD suites would add 450 problems
    first = scaffold("--home", home, *no_ood, "data", "--n-problems", 30)
    assert first.returncode == 0, first.stderr
    assert "problems: +30 new rows (30 total)" in first.stdout
    assert str(warehouse) in first.stdout and "# preset demo v2" in first.stdout
    counts = Warehouse(warehouse).counts()
    assert counts["problems"] == 30 and counts["teacher_traces"] == 30
    assert counts["segmented_steps"] > 4 * 30 and counts["signal_labels"] == counts["segmented_steps"]

    second = scaffold("--home", home, *no_ood, "data", "--n-problems", 30)
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
    loud = scaffold("--home", home, "data", "--problems-file", path, "--teacher", "programmatic")
    # the programmatic teacher cannot solve these: every problem failed, so the run fails and says why (the default
    # teacher, chosen per source, would trace the '#### 4' row from its solution: tests/test_trace_formats.py)
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
    from scaffold_lib.cli.flags import command_of

    assert command_of(argv) == command


def test_help_imports_no_model_library_or_database_and_every_command_has_its_flags(tmp_path):
    """`scaffold … --help` resolves the configuration to show each flag's default, and the configuration and the
    stage table import no torch, transformers, DuckDB or MLflow: help answers at once. `data` still has its flags after
    global options whose values look like commands."""
    probe = (
        "import sys; from scaffold_lib.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "print('heavy:', sorted(m for m in ('torch', 'transformers', 'duckdb', 'mlflow') if m in sys.modules), "
        "file=sys.stderr)"
    )
    for command in ("import-model", "train", "data"):
        proc = subprocess.run(
            [sys.executable, "-c", probe, command, "--help"], capture_output=True, text=True, timeout=120
        )
        assert f"usage: scaffold {command}" in proc.stdout and "heavy: []" in proc.stderr, (
            command,
            proc.stderr[-2000:],
        )
    proc = scaffold("--home", tmp_path / "label", "--set", "problems.synthetic.seed=1", "data", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--n-problems" in proc.stdout and "problems.synthetic.n_problems" in proc.stdout


# --- every default is the configuration's ---------------------------------------------------------------------------

# options whose default is a choice of what the command does, not a setting of the pipeline (the reason is the value)
NOT_SETTINGS = {
    ("train", "--kind"): "which arms to train",
    ("ask", "--model"): "which model answers",
    ("scores", "--model"): "whose table to print",
    ("promote", "--reason"): "the text recorded beside a manual move",
}
# what each command needs to parse at all
REQUIRED = {
    "label": ["traces.jsonl"],
    "ask": ["a question"],
    "score": ["--suite", "gsm8k", "--predictions", "p.jsonl"],
    "import-model": ["src", "out"],
    "lineage": ["--trace", "t"],
}


def subcommands() -> dict[str, argparse.ArgumentParser]:
    from scaffold_lib.cli import build_parser

    return build_parser(["presets"])._subparsers._group_actions[0].choices


def test_every_cli_default_is_the_resolved_configuration(tmp_path):
    """Walks every subcommand's options on an instance whose settings differ from the library's (preset micro, τ
    overridden): a config flag's default is left to the configuration (argparse.SUPPRESS) and its help shows the
    resolved value; any other option defaults to "not given" unless listed in NOT_SETTINGS with its reason."""
    from scaffold_lib.cli import build_parser
    from scaffold_lib.cli.flags import FLAG_PREFIX, config_value, settings
    from scaffold_lib.config import resolve, save_instance_settings

    save_instance_settings(
        tmp_path, "micro", {"eval": {"decode": {"tau": 0.25}}, "segmentation": {"segmenter": "line"}}
    )
    resolved = resolve(tmp_path).config
    config_flags = 0
    for name in subcommands():
        argv = ["--home", str(tmp_path), name, *REQUIRED.get(name, [])]
        parser = build_parser(argv)
        for action in parser._subparsers._group_actions[0].choices[name]._actions:
            if isinstance(action, argparse._HelpAction) or not action.option_strings:
                continue
            flag = (name, action.option_strings[0])
            if action.dest.startswith(FLAG_PREFIX):
                config_flags += 1
                assert action.default is argparse.SUPPRESS, flag
                value = config_value(resolved, action.dest.removeprefix(FLAG_PREFIX))
                assert f"default: {value!r}" in action.help.replace("%%", "%"), (flag, action.help)
            else:
                assert action.default in (None, False, []) or flag in NOT_SETTINGS, (flag, action.default)
        args = parser.parse_args(argv)
        assert settings(args).config == resolved, name  # no flag given: exactly the instance's configuration
    assert config_flags > 40
    # the ones this round fixed: label's segmenter and keyword file, ask's τ, all the configuration's
    label = build_parser(["--home", str(tmp_path), "label", "x"])._subparsers._group_actions[0].choices["label"]
    dests = {a.option_strings[0]: a.dest for a in label._actions if a.option_strings}
    assert dests["--segmenter"] == FLAG_PREFIX + "segmentation.segmenter"
    assert dests["--keywords"] == FLAG_PREFIX + "labeller.keywords_path"


def test_help_works_for_every_subcommand(tmp_path, capsys):
    from scaffold_lib.cli import main

    for name in subcommands():
        try:
            main(["--home", str(tmp_path), name, "--help"])
        except SystemExit as exc:
            assert exc.code == 0, name
        out = capsys.readouterr().out
        assert out.startswith(f"usage: scaffold {name}"), (name, out[:200])
    main_help = scaffold("train", "--help")  # the subcommand whose description has a '%' (~30 % more compute)
    assert main_help.returncode == 0 and "~30 % more compute" in main_help.stdout, main_help.stderr


GSM8K_STYLE = "Tom has 3 apples.\nHe buys 4 more, so 3 + 4 = 7.\nThe answer is 7."


def test_label_takes_segmenter_and_keyword_file_from_the_configuration(write_jsonl, tmp_path):
    path = write_jsonl([{"id": "g", "trace": GSM8K_STYLE}])
    default = scaffold("--home", tmp_path / "plain", "label", path)  # library default: auto, a step per line here
    assert default.returncode == 0, default.stderr
    assert [json.loads(line)["idx"] for line in default.stdout.splitlines()] == [0, 1, 2]
    kw = tmp_path / "kw.toml"
    kw.write_text('[examples_illustration]\nkeywords = ["he buys"]\n', encoding="utf-8")
    home = tmp_path / "configured"
    assert scaffold("--home", home, "--set", "segmentation.segmenter=blank_line", "init").returncode == 0
    one_step = scaffold("--home", home, "label", path)
    assert [json.loads(line)["idx"] for line in one_step.stdout.splitlines()] == [0]
    configured = scaffold("--home", home, "--set", f"labeller.keywords_path={kw}", "label", path, "--segmenter", "line")
    assert [json.loads(line)["signal"] for line in configured.stdout.splitlines()][1] == "examples_illustration"


def test_score_checks_the_predictions_first_and_fails_fast_without_the_hub(tmp_path, write_jsonl):
    missing = scaffold("--home", tmp_path, "score", "--suite", "gsm8k", "--predictions", tmp_path / "nope.jsonl")
    assert_user_error(missing, "nope.jsonl: no such file")  # the user's own file, before the suite's
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens here once the socket closes
    predictions = write_jsonl([{"question": "q", "output": "#### 1"}], name="preds.jsonl")
    offline = scaffold(
        "--home",
        tmp_path,
        "score",
        "--suite",
        "gsm8k",
        "--predictions",
        predictions,
        env={"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HUB_OFFLINE": "", "HF_DATASETS_OFFLINE": ""},
    )
    assert_user_error(offline, "gsm8k_test.jsonl: no such file", f"127.0.0.1:{port} is not reachable")


def test_score_quarantines_a_bad_suite_row_unless_strict(tmp_path, write_jsonl):
    suite = write_jsonl(
        [{"question": "What is half of 1?", "answer": "#### .5"}, {"question": "Bad?", "answer": "no number"}],
        name="suite.jsonl",
    )
    predictions = write_jsonl([{"question": "What is half of 1?", "output": "The answer is 1/2."}], name="p.jsonl")
    common = ("--home", tmp_path, "score", "--suite", "gsm8k", "--suite-file", suite, "--predictions", predictions)
    lenient = scaffold(*common)
    assert lenient.returncode == 0, lenient.stderr
    assert "Pass@1 100.0 % (1/1" in lenient.stdout
    assert f"1 suite rows quarantined (first: {suite}:2, field 'answer'" in lenient.stdout
    assert_user_error(scaffold(*common, "--no-lenient"), f"{suite}:2: field 'answer' has no '#### N' number")
