"""The client for OpenAI-compatible chat endpoints (vLLM, SGLang, Ollama, OpenAI, …), shared by the endpoint
teacher and the LLM label validator.

It is the official `openai` async client with our own retry policy (tenacity), because the client's built-in
retries neither honour fractional `Retry-After` values nor treat an empty or malformed completion as retryable:

- retried with exponential backoff and jitter: 429 (waiting `Retry-After` when the server sends it), 408/409,
  5xx, timeouts, dropped connections, malformed JSON and empty completions;
- not retried: other 4xx (a bad request cannot succeed by repeating it); 401/403/404 abort the whole run with
  `EndpointConfigError`, since every request would fail the same way;
- bounded concurrency (`concurrency` requests in flight over all base URLs, round-robin between them).

Reasoning models return their thinking either in a separate field (`reasoning_content`, or `reasoning` in
newer vLLM) or inside `<think>…</think>` at the start of the content; `split_reasoning` handles both.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import openai
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, wait_exponential_jitter
from tqdm.auto import tqdm

from scaffold_lib.data.config import EndpointConfig, EndpointConfigError
from scaffold_lib.data.trace_formats import split_reasoning

T = TypeVar("T")


class EmptyCompletion(RuntimeError):
    """The server answered 200 with neither content nor reasoning; worth another try."""


@dataclass(frozen=True)
class Completion:
    thinking: str
    answer: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    attempts: int
    endpoint: str


def _retry_after_s(exc: BaseException) -> float | None:
    response = getattr(exc, "response", None)
    if response is None:
        return None
    value = response.headers.get("retry-after-ms")
    if value is not None:
        try:
            return float(value) / 1000
        except ValueError:
            return None
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our backoff


def is_retryable(exc: BaseException) -> bool:
    # transport failures reach us as APIConnectionError / APITimeoutError (openai 3 wraps its own httpx2 errors);
    # a body it cannot parse comes through as a bare JSONDecodeError
    if isinstance(
        exc,
        (
            openai.APITimeoutError,
            openai.APIConnectionError,
            EmptyCompletion,
            openai.APIResponseValidationError,
            json.JSONDecodeError,
        ),
    ):
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in (408, 409, 429) or exc.status_code >= 500
    return False


# how error_summary names the errors that say "the endpoint is down or overloaded", not "this prompt is bad"
TRANSPORT_ERRORS = (
    "APIConnectionError",
    "APITimeoutError",
    "InternalServerError",
    "RateLimitError",
    "APIStatusError 5",
    "ServiceUnavailableError",
)


def error_summary(exc: BaseException) -> str:
    """One line for the failures table: the kind and the message, never headers (they may carry the key)."""
    status = getattr(exc, "status_code", None)
    kind = type(exc).__name__ + (f" {status}" if status else "")
    return f"{kind}: {str(exc)[:300]}"


class EndpointClient:
    """Chat completions with retries over one or more base URLs; `map` runs many at bounded concurrency."""

    def __init__(self, config: EndpointConfig) -> None:
        self.config = config
        # retries are ours (see module docstring); one client (and connection pool) per base URL
        self._clients = [
            openai.AsyncOpenAI(
                base_url=url, api_key=config.require("endpoint").secret(), timeout=config.timeout_s, max_retries=0
            )
            for url in config.base_urls
        ]
        self._next = itertools.cycle(range(len(self._clients)))
        self._wait_backoff = wait_exponential_jitter(initial=config.backoff_initial_s, max=config.backoff_max_s)

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        after = _retry_after_s(exc) if exc is not None else None
        return min(after, self.config.backoff_max_s) if after is not None else self._wait_backoff(state)

    async def complete(self, messages: list[dict[str, str]], **overrides: Any) -> Completion:
        """One chat completion, retried per the policy; raises the last error when every attempt failed."""
        attempts = 0
        started = time.perf_counter()
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(is_retryable),
            stop=stop_after_attempt(self.config.max_attempts),
            wait=self._wait,
            reraise=True,
        ):
            with attempt:
                attempts += 1
                index = next(self._next)
                try:
                    thinking, answer, finish, usage = await self._request(self._clients[index], messages, overrides)
                except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as exc:
                    raise EndpointConfigError(
                        f"{self.config.base_urls[index]} refused model {self.config.model!r}: {error_summary(exc)}"
                    ) from exc
        prompt_tokens = usage.get("prompt_tokens") or sum(len(m["content"].split()) for m in messages)
        completion_tokens = usage.get("completion_tokens") or len((thinking + " " + answer).split())
        return Completion(
            thinking,
            answer,
            finish,
            prompt_tokens,
            completion_tokens,
            time.perf_counter() - started,
            attempts,
            self.config.base_urls[index],
        )

    async def _request(
        self, client: openai.AsyncOpenAI, messages: list[dict[str, str]], overrides: dict[str, Any]
    ) -> tuple[str, str, str | None, dict]:
        cfg = self.config
        params: dict[str, Any] = {
            "model": cfg.model,
            "messages": messages,
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
            "max_tokens": cfg.max_tokens,
            **overrides,
        }
        if cfg.seed is not None:
            params.setdefault("seed", cfg.seed)
        if cfg.stream:
            content, reasoning, finish, usage = [], [], None, {}
            stream = await client.chat.completions.create(**params, stream=True, stream_options={"include_usage": True})
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage.model_dump()
                for choice in chunk.choices:
                    content.append(choice.delta.content or "")
                    reasoning.append(_reasoning_of(choice.delta) or "")
                    finish = choice.finish_reason or finish
            raw_content, raw_reasoning = "".join(content), "".join(reasoning)
        else:
            response = await client.chat.completions.create(**params)
            if not response.choices:
                raise EmptyCompletion("the response had no choices")
            message = response.choices[0].message
            raw_content, raw_reasoning = message.content or "", _reasoning_of(message) or ""
            finish = response.choices[0].finish_reason
            usage = response.usage.model_dump() if response.usage is not None else {}
        if not raw_content.strip() and not raw_reasoning.strip():
            raise EmptyCompletion("the completion was empty")
        thinking, answer = split_reasoning(raw_content, raw_reasoning)
        return thinking, answer, finish, usage

    async def map(
        self, items: Sequence[T], work: Callable[[T], Awaitable[bool]], desc: str, show_progress: bool = True
    ) -> Progress:
        """Run `work` on every item with at most `concurrency` in flight (a pool of workers, so a million items
        do not become a million pending tasks), with a progress bar of done / failed / in flight / req/s.
        `work` returns whether the item succeeded; it records its own failures."""
        progress = Progress(total=len(items))
        queue = iter(items)
        with tqdm(total=len(items), desc=desc, disable=not show_progress or not items) as bar:

            async def worker() -> None:
                for item in queue:  # one shared iterator: each item is taken by exactly one worker
                    progress.in_flight += 1
                    try:
                        ok = await work(item)
                    finally:
                        progress.in_flight -= 1
                    progress.done += ok
                    progress.failed += not ok
                    bar.update(1)
                    bar.set_postfix(progress.postfix(), refresh=False)

            try:  # a task group cancels the other workers when one raises (e.g. EndpointConfigError)
                async with asyncio.TaskGroup() as group:
                    for _ in range(self.config.concurrency):
                        group.create_task(worker())
            except BaseExceptionGroup as errors:
                raise errors.exceptions[0] from None
        return progress

    async def aclose(self) -> None:
        for client in self._clients:
            await client.close()


def _reasoning_of(message: Any) -> str | None:
    # not in the OpenAI schema: vLLM/DeepSeek put it in extra fields ("reasoning" in newer vLLM)
    extra = getattr(message, "model_extra", None) or {}
    return getattr(message, "reasoning_content", None) or extra.get("reasoning_content") or extra.get("reasoning")


@dataclass
class Progress:
    """done / failed / in flight and requests/s, for the progress bar and the asset metadata."""

    total: int
    done: int = 0
    failed: int = 0
    in_flight: int = 0
    started: float = field(default_factory=time.perf_counter)

    def postfix(self) -> dict[str, Any]:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        return {
            "ok": self.done,
            "failed": self.failed,
            "in_flight": self.in_flight,
            "req/s": f"{(self.done + self.failed) / elapsed:.1f}",
        }
