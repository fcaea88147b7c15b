"""The endpoint teacher and the LLM label validator against a real local HTTP server speaking the chat-completions
protocol (`tests/support/scripted_endpoint.py`), with injected faults, a killed generating process, and the Dagster
assets configured for an endpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from scaffold_lib.core.errors import StageFailed
from scaffold_lib.data.config import EndpointConfig, EndpointConfigError, PromptConfig
from scaffold_lib.data.label import validate_signal_labels
from scaffold_lib.data.label_stats import label_statistics
from scaffold_lib.data.label_validation import LabelValidator, ValidatorConfig
from scaffold_lib.data.llm_teachers import EndpointTeacher
from scaffold_lib.data.signals import FALLBACK, KEYWORD, LLM, LLM_AGREE, LLM_OVERRIDE, PATTERN
from scaffold_lib.data.synthetic import GeneratorConfig, generate_problems
from scaffold_lib.store.warehouse import Warehouse
from support.scripted_endpoint import FaultPlan, Reply, ScriptedEndpoint, prompt_key
from support.stages import generate_teacher_traces, label_signals, segment_traces, store_of, store_problems

FAST_RETRY = {"backoff_initial_s": 0.01, "backoff_max_s": 0.2}


def endpoint_config(server: ScriptedEndpoint, **overrides) -> EndpointConfig:
    return EndpointConfig(
        **{
            "base_urls": [server.base_url],
            "model": "scripted-r1",
            "api_key": "test-key",
            "concurrency": 8,
            "timeout_s": 5.0,
            **FAST_RETRY,
            **overrides,
        }
    )


def stored_problems(wh: Warehouse, n: int, seed: int = 0) -> list:
    problems = generate_problems(GeneratorConfig(n_problems=n, seed=seed))
    store_problems(wh, problems)
    return problems


def test_every_problem_is_traced_once_under_20_percent_faults(tmp_path: Path, warehouse_path: Path) -> None:
    wh = Warehouse(warehouse_path)
    stored_problems(wh, 80)
    faults = FaultPlan(rate=0.2, slow_s=1.5, retry_after_s=0.05, seed=1)
    with ScriptedEndpoint(faults=faults) as server:
        teacher = EndpointTeacher(endpoint_config(server, timeout_s=0.5), journal_dir=tmp_path / "j", progress=False)
        report = generate_teacher_traces(wh, teacher)
        stats = server.stats()
    assert sum(stats["faults"].values()) >= 10  # the faults really happened, of several kinds
    assert len([k for k, n in stats["faults"].items() if n]) >= 4
    assert report.new_rows == 80 and report.details["failed"] == 0
    rows = wh.query("SELECT trace_id, problem_id, attempts, text, answer_text, is_correct FROM teacher_traces")
    assert len({r["trace_id"] for r in rows}) == len({r["problem_id"] for r in rows}) == 80
    assert sum(r["attempts"] > 1 for r in rows) >= 5  # retried ones are recorded as such
    assert sum(r["is_correct"] for r in rows) / 80 >= 0.8  # the scripted teacher is right ~90 % of the time
    assert all(r["answer_text"] and r["text"] and "</think>" not in r["text"] for r in rows)
    run = report.details["run"]
    assert run["requests_answered"] == 80 and run["completion_tokens"] > 0 and run["latency_p95_s"] is not None
    # a second run asks nothing: everything is in the warehouse
    with ScriptedEndpoint() as server:
        again = generate_teacher_traces(
            wh, EndpointTeacher(endpoint_config(server), journal_dir=tmp_path / "j", progress=False)
        )
        assert server.stats()["requests"] == 0
    assert again.new_rows == 0 and again.details["asked"] == 0


def test_think_tags_streaming_and_samples(tmp_path: Path, warehouse_path: Path) -> None:
    wh = Warehouse(warehouse_path)
    stored_problems(wh, 6)
    with ScriptedEndpoint(reasoning_mode="think_tags") as server:
        teacher = EndpointTeacher(
            endpoint_config(server, stream=True), PromptConfig(samples=2), journal_dir=tmp_path / "j", progress=False
        )
        report = generate_teacher_traces(wh, teacher)
        assert server.stats()["requests"] == 12
    assert report.new_rows == 12
    rows = wh.query("SELECT problem_id, sample, text, answer_text, completion_tokens FROM teacher_traces")
    assert sorted({r["sample"] for r in rows}) == [0, 1]
    for r in rows:
        assert "<think>" not in r["text"] and "</think>" not in r["text"]
        assert r["answer_text"].split()[0] in ("The", "**Answer:**") and r["completion_tokens"] > 5
    segment_traces(wh)
    label_signals(wh)
    final = wh.query(
        "SELECT l.signal FROM signal_labels l JOIN segmented_steps s USING (step_id) "
        "JOIN (SELECT trace_id, max(idx) AS last FROM segmented_steps GROUP BY ALL) m USING (trace_id) "
        "WHERE s.idx = m.last"
    )
    assert {r["signal"] for r in final} == {"response_generation"}


def test_a_refused_key_stops_the_run_instead_of_failing_each_problem(tmp_path: Path, warehouse_path: Path) -> None:
    wh = Warehouse(warehouse_path)
    stored_problems(wh, 20)
    with ScriptedEndpoint(api_key="the-right-key") as server:
        teacher = EndpointTeacher(
            endpoint_config(server, api_key="a-wrong-key", concurrency=4), journal_dir=tmp_path / "j", progress=False
        )
        with pytest.raises(EndpointConfigError, match="401"):
            generate_teacher_traces(wh, teacher)
        assert server.stats()["requests"] <= 4  # the other workers stopped at once
    assert wh.scalar("SELECT count(*) FROM teacher_traces") == 0


def test_failures_are_recorded_and_retried_on_the_next_run(tmp_path: Path, warehouse_path: Path) -> None:
    wh = Warehouse(warehouse_path)
    stored_problems(wh, 10)
    always_500 = FaultPlan(rate=1.0, kinds=("server_error",), max_faults_per_prompt=1000)
    with ScriptedEndpoint(faults=always_500) as server:
        teacher = EndpointTeacher(endpoint_config(server, max_attempts=2), journal_dir=tmp_path / "j", progress=False)
        # nothing answered: the stage fails loudly with the reason, after recording every failure
        with pytest.raises(StageFailed, match=r"answered none of 10 problems: 10 x InternalServerError 500"):
            generate_teacher_traces(wh, teacher)
        assert server.stats()["requests"] == 20  # two attempts each, then recorded
    assert wh.scalar("SELECT count(*) FROM teacher_failures") == 10
    errors = wh.query("SELECT DISTINCT error FROM teacher_failures")
    assert len(errors) == 1 and errors[0]["error"].startswith("InternalServerError 500")
    with ScriptedEndpoint() as server:
        retry = generate_teacher_traces(
            wh, EndpointTeacher(endpoint_config(server), journal_dir=tmp_path / "j", progress=False)
        )
    assert retry.new_rows == 10 and retry.details["failed"] == 0


GENERATE = """
import sys
from scaffold_lib.cli import main
sys.exit(main(["--home", sys.argv[1], "--preset", "micro", "data", "--teacher", "openai", "--base-url", sys.argv[2],
               "--model", "scripted-r1", "--concurrency", "4", "--journal-dir", sys.argv[3]]))
"""


def _journal_ids(path: Path) -> set[str]:
    if not path.exists():
        return set()
    ids = set()
    for line in path.read_bytes().splitlines():
        try:
            ids.add(json.loads(line)["trace_id"])
        except (json.JSONDecodeError, KeyError):
            pass  # a torn last line
    return ids


def test_kill_9_mid_run_keeps_every_completed_trace_and_resends_none(tmp_path: Path) -> None:
    home, journals = tmp_path / "home", tmp_path / "journals"
    warehouse = home / "warehouse.duckdb"
    env = {**os.environ, "OPENAI_API_KEY": "test-key", "TQDM_DISABLE": "1"}
    with ScriptedEndpoint(latency_s=0.05) as server:
        proc = subprocess.Popen([sys.executable, "-c", GENERATE, str(home), server.base_url, str(journals)], env=env)
        journal = journals / "openai_scripted-r1.jsonl"
        deadline = time.monotonic() + 60
        while len(_journal_ids(journal)) < 15 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done_before = _journal_ids(journal)
        first_run = server.stats()
        assert 15 <= len(done_before) < 60, "the kill must land mid-run"
        server.reset_stats()
        second = subprocess.run(
            [sys.executable, "-c", GENERATE, str(home), server.base_url, str(journals)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 0, second.stderr
        second_run = server.stats()
    wh = Warehouse(warehouse)
    traces = wh.query("SELECT trace_id, problem_id FROM teacher_traces")
    assert len(traces) == 60 and len({t["problem_id"] for t in traces}) == 60
    assert done_before <= {t["trace_id"] for t in traces}  # every completed trace was kept
    # the server saw no request in the second run for a prompt whose answer the first run had journalled
    teacher = EndpointTeacher(EndpointConfig(base_urls=["http://unused/v1"], model="scripted-r1"))
    from scaffold_lib.config import load_preset

    problems = {p.problem_id: p for p in generate_problems(load_preset("micro").config.problems.synthetic)}
    key_of = {teacher.trace_id_for(p): prompt_key({"messages": teacher.prompt.messages(p)}) for p in problems.values()}
    journalled_keys = {key_of[t] for t in done_before}
    assert not journalled_keys & set(second_run["per_prompt"])
    assert second_run["requests"] == 60 - len(done_before)
    assert first_run["requests"] - len(done_before) <= 4  # only the requests in flight at the kill were lost


def validator_responder(request: dict) -> Reply:
    """A scripted validator: disagrees with every keyword label on steps opening with 'Hmm', answers garbage first
    for steps mentioning 'distraction' (valid after a re-ask), never validly for 'ignore', agrees otherwise."""
    messages = request["messages"]
    user = messages[1]["content"]
    step = user.split("<<<\n", 1)[1].rsplit("\n>>>", 1)[0]
    proposed = user.split("proposes: ", 1)[1].split(".", 1)[0] if "proposes: " in user else None
    if "ignore" in step:
        return Reply("I would call it a distraction step.")
    if "distraction" in step and len(messages) == 2:
        return Reply("Maybe conclusion? Or contrast.")
    if step.startswith("Hmm"):
        return Reply("contrast_concession")
    return Reply(f"`{proposed or 'reasoning_analysis'}`")


def test_llm_label_validation_confirms_corrects_reasks_and_caches(tmp_path: Path, warehouse_path: Path) -> None:
    wh = Warehouse(warehouse_path)
    stored_problems(wh, 40)
    with ScriptedEndpoint() as server:
        generate_teacher_traces(
            wh, EndpointTeacher(endpoint_config(server), journal_dir=tmp_path / "j", progress=False)
        )
    segment_traces(wh)
    label_signals(wh)
    before = {
        r["step_id"]: r
        for r in wh.query("SELECT l.*, s.text FROM signal_labels l JOIN segmented_steps s USING (step_id)")
    }
    to_check = [r for r in before.values() if r["labeller"] in (KEYWORD, PATTERN, FALLBACK)]
    with ScriptedEndpoint(responder=validator_responder) as server:
        validator = LabelValidator(
            ValidatorConfig(endpoint=endpoint_config(server, max_tokens=16)), tmp_path / "j", progress=False
        )
        report = validate_signal_labels(store_of(wh), validator)
        stats = server.stats()
    distinct = len({(r["text"], r["keyword_signal"]) for r in to_check})
    reasked = len({r["text"] for r in to_check if "distraction" in r["text"] and "ignore" not in r["text"]})
    never = {(r["text"], r["keyword_signal"]) for r in to_check if "ignore" in r["text"]}
    assert report["distinct_steps"] == distinct and reasked > 0 and never
    # one request per distinct step, one more for each re-asked one, three for each never-valid one
    assert stats["requests"] == distinct + reasked + 2 * len(never)
    assert report["unparseable_after_reasks"] == sum(1 for r in to_check if "ignore" in r["text"])
    after = {r["step_id"]: r for r in wh.query("SELECT * FROM signal_labels")}
    for step_id, old in before.items():
        new = after[step_id]
        if old["labeller"] not in (KEYWORD, PATTERN, FALLBACK) or "ignore" in old["text"]:
            assert (new["signal"], new["labeller"]) == (old["signal"], old["labeller"])
        elif old["text"].startswith("Hmm"):
            expected = (
                LLM_AGREE
                if old["signal"] == "contrast_concession" and old["labeller"] in (KEYWORD, PATTERN)
                else (LLM_OVERRIDE if old["labeller"] in (KEYWORD, PATTERN) else LLM)
            )
            assert (new["signal"], new["labeller"]) == ("contrast_concession", expected)
        elif old["labeller"] in (KEYWORD, PATTERN):
            assert (new["signal"], new["labeller"]) == (old["signal"], LLM_AGREE)
        else:
            assert (new["signal"], new["labeller"]) == ("reasoning_analysis", LLM)
    stats_after = label_statistics(store_of(wh))
    overrides = sum(1 for r in after.values() if r["labeller"] == LLM_OVERRIDE)
    agrees = sum(1 for r in after.values() if r["labeller"] == LLM_AGREE)
    assert overrides > 0 and stats_after["llm_agreement"] == round(agrees / (agrees + overrides), 4)
    assert stats_after["keyword_coverage"] == label_statistics(store_of(wh))["keyword_coverage"] > 0.5
    # a re-run asks nothing: verdicts come from the warehouse cache, even with a fresh journal folder
    with ScriptedEndpoint(responder=validator_responder) as server:
        again = validate_signal_labels(
            store_of(wh),
            LabelValidator(ValidatorConfig(endpoint=endpoint_config(server)), tmp_path / "fresh", progress=False),
        )
        assert server.stats()["requests"] == 0
    assert again["verdicts_from_cache"] == len(never)  # only the never-valid ones are still keyword/fallback
    # the keyword labelling stage run again (same table) keeps the LLM's verdicts
    assert label_signals(wh).new_rows == 0
    assert {r["step_id"]: r["labeller"] for r in wh.query("SELECT * FROM signal_labels")} == {
        k: r["labeller"] for k, r in after.items()
    }


SENTINEL = "sk-sentinel-7f3a9c1e-never-log-me"


def dagster_resources(home: Path, **secrets) -> dict:
    from pipelines.defs.resources import HandleIOManager, SecretsResource, StoreResource

    return {
        "store": StoreResource(home=str(home)),
        "io_manager": HandleIOManager(home=str(home)),
        "secrets": SecretsResource(**secrets),
    }


def test_dagster_assets_run_against_a_configured_endpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.defs.stage_assets import ASSETS

    home = tmp_path / "home"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("SCAFFOLD_TEST_API_KEY", SENTINEL)
    home.mkdir()

    # the servers accept only the key the environment holds: a run that did not deliver it fails with a 401
    with (
        ScriptedEndpoint(api_key=SENTINEL) as teacher_server,
        ScriptedEndpoint(responder=validator_responder, api_key=SENTINEL) as label_server,
    ):
        endpoint = {"model": "scripted-r1", "concurrency": 8}
        run_config = {
            "ops": {
                "problems": {"config": {"problems": {"synthetic": {"n_problems": 30}, "ood": {"n_problems": 0}}}},
                "teacher_traces": {
                    "config": {
                        "teacher": {
                            "backend": "openai",
                            "journal_dir": str(tmp_path / "j"),
                            "progress": False,
                            "endpoint": {"base_urls": [teacher_server.base_url], **endpoint},
                        }
                    }
                },
                "signal_labels": {
                    "config": {
                        "labeller": {
                            "validate_with_llm": True,
                            "progress": False,
                            "endpoint": {"base_urls": [label_server.base_url], **endpoint},
                        }
                    }
                },
            }
        }
        instance = dg.DagsterInstance.ephemeral()
        result = dg.materialize(
            [ASSETS["problems"], ASSETS["teacher_traces"], ASSETS["segmented_steps"], ASSETS["signal_labels"]],
            resources=dagster_resources(
                home,
                teacher_api_key=dg.EnvVar("SCAFFOLD_TEST_API_KEY"),
                labeller_api_key=dg.EnvVar("SCAFFOLD_TEST_API_KEY"),
            ),
            instance=instance,
            run_config=run_config,
        )
        assert teacher_server.stats()["requests"] == 30 and label_server.stats()["requests"] > 0
    assert result.success
    traces = result.asset_materializations_for_node("teacher_traces")[0].metadata
    assert traces["new_rows"].value == 30 and traces["teacher"].value == "openai:scripted-r1"
    assert traces["completion_tokens"].value > 0
    labels = result.asset_materializations_for_node("signal_labels")[0].metadata
    assert 0 < labels["llm_agreement"].value < 1 and labels["validation"].value["asked"] > 0
    # the key never reaches the event log, metadata, tables or journals
    logs = "".join(str(e) for e in instance.all_logs(result.run_id))
    assert SENTINEL not in logs
    wh = Warehouse(home / "warehouse.duckdb")
    for table in wh.counts():
        assert SENTINEL not in json.dumps(wh.query(f"SELECT * FROM {table}"), default=str)
    for journal in (tmp_path / "j").iterdir():
        assert SENTINEL not in journal.read_text()


def test_a_partition_backfill_fans_out_over_two_endpoints_and_a_failed_partition_reruns_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines.defs.stage_assets import ASSETS, TRACE_PARTITIONS
    from scaffold_lib.data.problems import partition_of

    home = tmp_path / "home"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    home.mkdir()
    instance = dg.DagsterInstance.ephemeral()
    keys = TRACE_PARTITIONS.get_partition_keys()
    down = FaultPlan(rate=1.0, kinds=("server_error",), max_faults_per_prompt=10_000)
    with ScriptedEndpoint() as even, ScriptedEndpoint(faults=down) as odd:

        def run(assets: list, partition: str | None = None) -> dg.ExecuteInProcessResult:
            teacher = {
                "backend": "openai",
                "journal_dir": str(tmp_path / "j"),
                "progress": False,
                "endpoint": {"base_urls": [even.base_url, odd.base_url], "model": "scripted-r1", "max_attempts": 2},
            }
            config = (
                {"problems": {"config": {"problems": {"synthetic": {"n_problems": 64}, "ood": {"n_problems": 0}}}}}
                if ASSETS["problems"] in assets
                else {"teacher_trace_shards": {"config": {"teacher": teacher}}}
            )
            return dg.materialize(
                assets,
                partition_key=partition,
                instance=instance,
                raise_on_error=False,
                resources=dagster_resources(home),
                run_config={"ops": config},
            )

        assert run([ASSETS["problems"]]).success
        results = {key: run([ASSETS["teacher_trace_shards"]], key) for key in keys}
        # odd partitions hit the server that is down: they fail, with their problems recorded
        assert {k for k, r in results.items() if not r.success} == set(keys[1::2])
        odd.faults = FaultPlan()  # the outage ends
        before = Warehouse(home / "warehouse.duckdb").query("SELECT trace_id FROM teacher_traces")
        even.reset_stats()
        assert run([ASSETS["teacher_trace_shards"]], keys[1]).success  # one failed partition re-runs alone
        assert even.stats()["requests"] == 0  # nothing asked of the other partitions' server
    wh = Warehouse(home / "warehouse.duckdb")
    rows = wh.query("SELECT t.problem_id, t.endpoint FROM teacher_traces t")
    assert len(rows) == len(before) + sum(
        1 for p in wh.query("SELECT problem_id FROM problems") if partition_of(p["problem_id"], 8) == 1
    )
    for r in rows:  # every trace names the server of its partition
        assert r["endpoint"] == (even.base_url if partition_of(r["problem_id"], 8) % 2 == 0 else odd.base_url)
    failed = wh.scalar("SELECT count(DISTINCT problem_id) FROM teacher_failures")
    assert failed == sum(1 for p in wh.query("SELECT problem_id FROM problems") if partition_of(p["problem_id"], 8) % 2)
