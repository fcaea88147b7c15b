"""The scripted endpoint speaks the real protocol: the official `openai` client reads its answers and streams, and
each injected fault reaches the client as the exception a real server's fault would raise (the ones the endpoint
client's retry policy classifies)."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import openai
import pytest

from scaffold_lib.endpoint import is_retryable
from scaffold_lib.problems import GeneratorConfig, generate_problems
from scaffold_lib.scripted_endpoint import FaultPlan, ScriptedEndpoint, prompt_key
from scaffold_lib.teachers import DEFAULT_PROMPT

PROBLEM = generate_problems(GeneratorConfig(n_problems=1, seed=5))[0]
MESSAGES = [{"role": "user", "content": DEFAULT_PROMPT.replace("{question}", PROBLEM.question)}]


def client(server: ScriptedEndpoint, timeout: float = 5.0) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="test", max_retries=0, timeout=timeout)


def test_a_completion_carries_reasoning_answer_and_usage() -> None:
    with ScriptedEndpoint() as server:
        response = client(server).chat.completions.create(model="scripted-r1", messages=MESSAGES)
    message = response.choices[0].message
    reasoning = message.model_extra["reasoning_content"]
    assert PROBLEM.answer in message.content and len(reasoning.split("\n\n")) >= 2
    assert response.usage.prompt_tokens == len(MESSAGES[0]["content"].split())
    assert response.usage.completion_tokens == len(message.content.split()) + len(reasoning.split())


def test_streaming_deltas_add_up_to_the_same_answer_and_usage_comes_last() -> None:
    with ScriptedEndpoint() as server:
        whole = client(server).chat.completions.create(model="m", messages=MESSAGES).choices[0].message
        chunks = list(client(server).chat.completions.create(model="m", messages=MESSAGES, stream=True,
                                                              stream_options={"include_usage": True}))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks if c.choices)
    assert content == whole.content and reasoning == whole.model_extra["reasoning_content"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_think_tags_mode_puts_the_reasoning_in_the_content() -> None:
    with ScriptedEndpoint(reasoning_mode="think_tags") as server:
        message = client(server).chat.completions.create(model="m", messages=MESSAGES).choices[0].message
    assert message.content.startswith("<think>\n") and "</think>\n\n" in message.content
    assert message.model_extra.get("reasoning_content") is None


@pytest.mark.parametrize("kind, error", [
    ("rate_limit", openai.RateLimitError), ("server_error", openai.InternalServerError),
    ("slow", openai.APITimeoutError), ("drop", openai.APIConnectionError),
    ("malformed_json", json.JSONDecodeError)])  # the client does not wrap a body it cannot parse
def test_each_fault_reaches_the_client_as_a_retryable_error(kind: str, error: type) -> None:
    plan = FaultPlan(rate=1.0, kinds=(kind,), slow_s=1.0, max_faults_per_prompt=1, retry_after_s=0.25)
    with ScriptedEndpoint(faults=plan) as server:
        with pytest.raises(Exception) as caught:
            client(server, timeout=0.4).chat.completions.create(model="m", messages=MESSAGES)
        # after max_faults_per_prompt faults the same prompt is answered
        answer = client(server, timeout=3.0).chat.completions.create(model="m", messages=MESSAGES)
        stats = server.stats()
    assert isinstance(caught.value, error), repr(caught.value)
    assert is_retryable(caught.value)
    if kind == "rate_limit":
        assert caught.value.response.headers["retry-after"] == "0.25"
    assert PROBLEM.answer in answer.choices[0].message.content
    assert stats["faults"][kind] == 1 and stats["requests"] == 2


def test_empty_content_is_a_valid_but_empty_completion() -> None:
    with ScriptedEndpoint(faults=FaultPlan(rate=1.0, kinds=("empty_content",), max_faults_per_prompt=1)) as server:
        message = client(server).chat.completions.create(model="m", messages=MESSAGES).choices[0].message
        assert server.stats()["answered"] == 0
    assert message.content == "" and message.model_extra.get("reasoning_content") is None


def test_fault_decisions_are_reproducible_and_near_the_rate() -> None:
    prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(200)]
    counts = []
    for _ in range(2):
        with ScriptedEndpoint(faults=FaultPlan(rate=0.2, kinds=("server_error",), seed=7)) as server:
            for messages in prompts:
                try:
                    client(server).chat.completions.create(model="m", messages=messages)
                except openai.InternalServerError:
                    pass
            counts.append(server.stats()["faults"]["server_error"])
    assert counts[0] == counts[1] and 20 <= counts[0] <= 60


def test_wrong_key_and_bad_body_get_openai_errors_and_stats_are_served() -> None:
    with ScriptedEndpoint(api_key="right") as server:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0).chat.completions.create(
                model="m", messages=MESSAGES)
        bad = httpx.post(server.base_url + "/chat/completions", content=b"not json",
                         headers={"Authorization": "Bearer right"})
        client_ok = openai.OpenAI(base_url=server.base_url, api_key="right", max_retries=0)
        client_ok.chat.completions.create(model="m", messages=MESSAGES)
        over_http = httpx.get(server.base_url.removesuffix("/v1") + "/stats").json()
        assert over_http == server.stats()
        assert [m.id for m in client_ok.models.list()] == ["scripted-r1"]
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    assert over_http["per_prompt"][prompt_key({"messages": MESSAGES})] == {"requests": 1, "answered": 1}


def test_the_command_line_server_answers_and_stops() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "scaffold_lib.scripted_endpoint", "--port", "0"],
                            stdout=subprocess.PIPE, text=True)
    try:
        url = next(w for w in proc.stdout.readline().split() if w.startswith("http://"))
        response = openai.OpenAI(base_url=url, api_key="k", max_retries=0).chat.completions.create(
            model="m", messages=MESSAGES)
        assert PROBLEM.answer in response.choices[0].message.content
    finally:
        proc.terminate()
        proc.wait(timeout=10)
