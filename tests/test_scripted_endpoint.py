"""The scripted endpoint speaks the real protocol: the official `openai` client reads its answers and streams, and
each injected fault reaches the client as the exception a real server's fault would raise (the ones the endpoint
client's retry policy classifies)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from scaffold_lib.core.answers import extract_number, is_correct
from scaffold_lib.data.endpoint import is_retryable
from scaffold_lib.data.synthetic import GeneratorConfig, generate_problems
from scaffold_lib.data.teachers import DEFAULT_PROMPT
from support.scripted_endpoint import FaultPlan, ScriptedEndpoint, prompt_key

PROBLEMS = generate_problems(GeneratorConfig(n_problems=3))
PROBLEM = PROBLEMS[0]


def messages_for(question: str) -> list[dict]:
    return [
        {"role": "system", "content": "You are a careful solver."},
        {"role": "user", "content": DEFAULT_PROMPT.format(question=question)},
    ]


MESSAGES = messages_for(PROBLEM.question)


def client(server: ScriptedEndpoint, timeout: float = 5.0) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="test", max_retries=0, timeout=timeout)


def words(messages: list[dict]) -> int:
    return sum(len(m["content"].split()) for m in messages)


def test_a_completion_carries_reasoning_answer_and_usage() -> None:
    with ScriptedEndpoint() as server:
        chat = client(server)
        for problem in PROBLEMS:
            messages = messages_for(problem.question)
            response = chat.chat.completions.create(model="scripted-r1", messages=messages)
            message = response.choices[0].message
            reasoning = message.reasoning_content  # openai keeps unknown fields: also in message.model_extra
            assert is_correct(extract_number(message.content), problem.answer, problem.answer_type)
            assert "\n\n" not in message.content and len(reasoning.split("\n\n")) >= 2
            assert response.choices[0].finish_reason == "stop" and response.object == "chat.completion"
            assert response.usage.prompt_tokens == words(messages)
            assert response.usage.completion_tokens == len(message.content.split()) + len(reasoning.split())
            assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
        single = chat.chat.completions.create(model="scripted-r1", messages=MESSAGES)
        several = chat.chat.completions.create(model="scripted-r1", messages=MESSAGES, n=3)
    assert [c.index for c in several.choices] == [0, 1, 2]
    assert {c.message.content for c in several.choices} == {single.choices[0].message.content}
    assert several.usage.completion_tokens == 3 * single.usage.completion_tokens


def test_streaming_deltas_add_up_to_the_same_answer_and_usage_comes_last() -> None:
    with ScriptedEndpoint() as server:
        chat = client(server)
        whole = chat.chat.completions.create(model="m", messages=MESSAGES)
        chunks = list(
            chat.chat.completions.create(
                model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
            )
        )
        without_usage = list(chat.chat.completions.create(model="m", messages=MESSAGES, stream=True))
    deltas = [c.choices[0] for c in chunks if c.choices]
    assert deltas[0].delta.role == "assistant" and deltas[-1].finish_reason == "stop"
    content = "".join(d.delta.content or "" for d in deltas)
    reasoning = "".join((d.delta.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    assert content == whole.choices[0].message.content
    assert reasoning == whole.choices[0].message.reasoning_content
    assert sum(bool(d.delta.content) for d in deltas) > 1  # really streamed in pieces
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in without_usage)
    assert "".join(c.choices[0].delta.content or "" for c in without_usage) == content


def test_think_tags_mode_puts_the_reasoning_in_the_content() -> None:
    with ScriptedEndpoint() as plain, ScriptedEndpoint(reasoning_mode="think_tags") as tagged:
        field = client(plain).chat.completions.create(model="m", messages=MESSAGES).choices[0].message
        message = client(tagged).chat.completions.create(model="m", messages=MESSAGES).choices[0].message
    assert message.content == f"<think>\n{field.reasoning_content}\n</think>\n\n{field.content}"
    assert message.model_extra.get("reasoning_content") is None


def test_a_question_it_cannot_parse_gets_a_generic_answer() -> None:
    with ScriptedEndpoint() as server:
        message = (
            client(server)
            .chat.completions.create(
                model="m", messages=[{"role": "user", "content": "What is the capital of France?"}]
            )
            .choices[0]
            .message
        )
    assert message.content == "The answer is 0." and len(message.reasoning_content.split("\n\n")) == 2


@pytest.mark.parametrize(
    "kind, error",
    [
        ("rate_limit", openai.RateLimitError),
        ("server_error", openai.InternalServerError),
        ("slow", openai.APITimeoutError),
        ("drop", openai.APIConnectionError),
        ("malformed_json", json.JSONDecodeError),
    ],
)  # the client does not wrap a body it cannot parse
def test_each_fault_reaches_the_client_as_a_retryable_error(kind: str, error: type) -> None:
    plan = FaultPlan(rate=1.0, kinds=(kind,), slow_s=2.0, max_faults_per_prompt=1, retry_after_s=0.25)
    with ScriptedEndpoint(faults=plan) as server:
        with pytest.raises(error) as caught:
            client(server, timeout=0.3).chat.completions.create(model="m", messages=MESSAGES)
        # after max_faults_per_prompt faults the same prompt is answered
        answer = client(server).chat.completions.create(model="m", messages=MESSAGES)
        stats = server.stats()
    assert is_retryable(caught.value)
    if kind == "rate_limit":
        assert caught.value.response.headers["retry-after"] == "0.25"
        assert caught.value.body == {"message": "rate limited", "type": "rate_limit_error", "code": 429}
    if kind == "drop":  # openai 3.x runs on httpx2, not httpx: match the cause by name
        assert type(caught.value.__cause__).__name__ == "RemoteProtocolError"
    assert PROBLEM.answer in answer.choices[0].message.content
    assert stats["faults"] == {k: int(k == kind) for k in stats["faults"]}
    assert stats["requests"] == 2 and stats["answered"] == 1


def test_a_slow_answer_the_client_gave_up_on_is_not_counted() -> None:
    with ScriptedEndpoint(faults=FaultPlan(rate=1.0, kinds=("slow",), slow_s=0.4, max_faults_per_prompt=1)) as server:
        with pytest.raises(openai.APITimeoutError):
            client(server, timeout=0.1).chat.completions.create(model="m", messages=MESSAGES)
        time.sleep(0.5)  # the slow request's thread wakes up, finds the client gone and writes nothing
        assert server.stats()["answered"] == 0 and server.stats()["requests"] == 1


def test_empty_content_is_a_valid_but_empty_completion() -> None:
    with ScriptedEndpoint(faults=FaultPlan(rate=1.0, kinds=("empty_content",), max_faults_per_prompt=1)) as server:
        chat = client(server)
        empty = chat.chat.completions.create(model="m", messages=MESSAGES).choices[0].message
        assert server.stats()["answered"] == 0  # an empty completion is not an answer
        full = chat.chat.completions.create(model="m", messages=MESSAGES).choices[0].message
        assert server.stats()["answered"] == 1
    assert empty.content == "" and empty.model_extra.get("reasoning_content") is None
    assert full.content and full.reasoning_content


def test_fault_decisions_are_reproducible_and_near_the_rate() -> None:
    prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(200)]
    kinds = ("rate_limit", "server_error", "malformed_json", "empty_content")  # the fast ones
    counts = []
    for _ in range(2):
        plan = FaultPlan(rate=0.2, kinds=kinds, seed=7)
        with ScriptedEndpoint(faults=plan) as server:
            chat = client(server)
            for messages in prompts:
                try:
                    chat.chat.completions.create(model="m", messages=messages)
                except (openai.APIStatusError, json.JSONDecodeError):
                    pass
            stats = server.stats()
        counts.append(stats["faults"])
        assert stats["answered"] == 200 - sum(stats["faults"].values())
    assert counts[0] == counts[1]
    assert 20 <= sum(counts[0].values()) <= 60  # 10-30 %
    assert all(counts[0][k] for k in kinds) and not any(counts[0][k] for k in counts[0] if k not in kinds)
    with pytest.raises(ValueError):
        FaultPlan(kinds=("meteor_strike",))


def test_counters_per_prompt_and_over_http() -> None:
    plan = FaultPlan(rate=1.0, kinds=("server_error",), max_faults_per_prompt=2)
    with ScriptedEndpoint(faults=plan) as server:
        chat = client(server)
        for _ in range(2):
            with pytest.raises(openai.InternalServerError):
                chat.chat.completions.create(model="m", messages=MESSAGES)
        chat.chat.completions.create(model="m", messages=MESSAGES)  # the third attempt is answered
        chat.chat.completions.create(model="m", messages=MESSAGES)  # and so is every later one
        over_http = httpx.get(server.base_url.removesuffix("/v1") + "/stats").json()
        assert over_http == server.stats()
        models = [m.id for m in chat.models.list()]
        server.reset_stats()
        assert server.stats()["requests"] == 0 and server.stats()["per_prompt"] == {}
    assert models == ["scripted-r1"]
    assert over_http["per_prompt"] == {prompt_key({"messages": MESSAGES}): {"requests": 4, "answered": 2}}
    assert over_http["requests"] == 4 and over_http["answered"] == 2 and over_http["faults"]["server_error"] == 2


def test_concurrent_requests_are_served_in_parallel() -> None:
    with ScriptedEndpoint(latency_s=0.2) as server:
        chat = client(server)
        prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(8)]
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda m: chat.chat.completions.create(model="m", messages=m), prompts))
        stats = server.stats()
    assert all(r.choices[0].message.content for r in replies)
    assert stats["in_flight_max"] > 1 and stats["answered"] == 8 and len(stats["per_prompt"]) == 8


def test_keys_and_bad_bodies_get_openai_errors() -> None:
    with ScriptedEndpoint() as open_server, ScriptedEndpoint(api_key="right") as locked:
        url = open_server.base_url + "/chat/completions"
        body = {"model": "m", "messages": MESSAGES}
        no_key = httpx.post(url, json=body)
        empty_key = httpx.post(url, json=body, headers={"Authorization": "Bearer"})
        not_json = httpx.post(url, content=b"not json", headers={"Authorization": "Bearer k"})
        no_messages = httpx.post(url, json={"model": "m"}, headers={"Authorization": "Bearer k"})
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=locked.base_url, api_key="wrong", max_retries=0).chat.completions.create(
                model="m", messages=MESSAGES
            )
        with pytest.raises(openai.BadRequestError):
            client(open_server).chat.completions.create(model="m", messages="not a list")  # type: ignore[arg-type]
        assert open_server.stats()["requests"] == 0  # refused requests never reach the responder
    assert no_key.status_code == empty_key.status_code == 401
    assert not_json.status_code == no_messages.status_code == 400
    for response in (no_key, not_json, no_messages):
        assert set(response.json()["error"]) == {"message", "type", "code"}
    assert no_key.json()["error"]["type"] == "authentication_error"
    assert not_json.json()["error"]["type"] == "invalid_request_error"


def test_the_command_line_server_answers_and_stops() -> None:
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve().parent / "support" / "scripted_endpoint.py"), "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        url = next(w for w in proc.stdout.readline().split() if w.startswith("http://"))
        response = openai.OpenAI(base_url=url, api_key="k", max_retries=0).chat.completions.create(
            model="m", messages=MESSAGES
        )
        assert PROBLEM.answer in response.choices[0].message.content
    finally:
        proc.terminate()
        proc.wait(timeout=10)
