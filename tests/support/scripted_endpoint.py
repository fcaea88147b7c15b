"""A small, real OpenAI-compatible chat-completions server with scripted answers and injectable faults.

No hosted LLM is reachable where the tests and benchmarks run, so the endpoint teacher and the label validator are
exercised against this: real HTTP on 127.0.0.1, the chat-completions wire format (non-streaming and SSE
streaming, `reasoning_content` or `<think>` tags, usage), bearer-key checks, and faults a real fleet produces —
429 with `Retry-After`, 500, responses slower than the client's timeout, dropped connections, malformed JSON and
empty completions. Counters per prompt let tests prove that nothing was asked twice.

By default it answers the built-in synthetic problems with R1-style reasoning (the programmatic teacher's
writer); tests pass their own responder for anything else.

    python tests/support/scripted_endpoint.py --port 8001 [--latency 0.2] [--fault-rate 0.2]
        [--reasoning-mode think_tags] [--host 127.0.0.1]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import select
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from scaffold_lib.data.synthetic import parse_question
from scaffold_lib.data.teachers import ProgrammaticTeacherConfig
from scaffold_lib.data.worked_traces import v1_trace_text

FAULT_KINDS = ("rate_limit", "server_error", "slow", "drop", "malformed_json", "empty_content")


@dataclass
class Reply:
    """What a responder returns for one request."""

    content: str
    reasoning_content: str | None = None  # sent as message.reasoning_content (vLLM / DeepSeek style)
    finish_reason: str = "stop"


Responder = Callable[[dict], Reply]


@dataclass
class FaultPlan:
    rate: float = 0.0  # probability that a request gets a fault
    kinds: tuple[str, ...] = FAULT_KINDS
    retry_after_s: float = 0.05  # Retry-After on 429
    slow_s: float = 5.0  # how long a "slow" response sleeps before answering
    max_faults_per_prompt: int = 2  # after this many, a prompt is always answered (so retries converge)
    seed: int = 0  # decisions are deterministic given (seed, prompt key, attempt number)

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(FAULT_KINDS)
        if unknown or not self.kinds:  # fail here, not in a server thread the test cannot see
            raise ValueError(f"fault kinds must be a non-empty subset of {FAULT_KINDS}, got {self.kinds}")


def prompt_key(body: dict) -> str:
    """A stable id of a request's prompt: the hash of its messages."""
    return hashlib.sha256(json.dumps(body.get("messages"), sort_keys=True).encode()).hexdigest()[:16]


def _words(text: str | None) -> int:
    return len((text or "").split())


def scripted_reasoning(request: dict, reasoning_mode: str = "field") -> Reply:
    """R1-style reasoning for a synthetic problem: the programmatic teacher's trace, its last paragraph (the answer
    sentence) as content and the rest as reasoning."""
    user = next((m["content"] for m in reversed(request.get("messages", [])) if m.get("role") == "user"), "")
    question = user.rsplit("Problem:", 1)[-1].strip()
    parsed = parse_question(question)
    if parsed is None:
        paragraphs = ["Let me think about this question.", "So I cannot work it out exactly.", "The answer is 0."]
    else:
        seed = int(hashlib.sha256(question.encode()).hexdigest()[:8], 16)
        paragraphs = v1_trace_text(parsed, random.Random(seed), ProgrammaticTeacherConfig()).split("\n\n")
    reasoning, answer = "\n\n".join(paragraphs[:-1]), paragraphs[-1]
    if reasoning_mode == "think_tags":
        return Reply(f"<think>\n{reasoning}\n</think>\n\n{answer}")
    return Reply(answer, reasoning)


def _client_gone(connection: socket.socket) -> bool:
    """Whether the client closed the connection while we were busy (it sends nothing else mid-request, so a
    readable socket means EOF)."""
    readable, _, _ = select.select([connection], [], [], 0)
    try:
        return bool(readable) and connection.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so the client reuses connections as with a real server
    # headers and body go out in two writes: with Nagle's algorithm the second waits for the client's delayed ACK
    # (~40 ms per request), which a real server does not add
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send_json(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> None:
        self._send_json(status, {"error": {"message": message, "type": kind, "code": status}}, headers)

    def do_GET(self) -> None:
        endpoint = self.server.endpoint
        if self.path.rstrip("/") == "/stats":
            self._send_json(200, endpoint.stats())
        elif self.path.rstrip("/") == "/v1/models":
            self._send_json(
                200,
                {
                    "object": "list",
                    "data": [{"id": endpoint.model, "object": "model", "created": 0, "owned_by": "scripted"}],
                },
            )
        else:
            self._error(404, f"no route {self.path}", "not_found_error")

    def do_POST(self) -> None:
        endpoint = self.server.endpoint
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._error(404, f"no route {self.path}", "not_found_error")
            return
        auth = self.headers.get("Authorization", "")
        key = auth[7:].strip() if auth.startswith("Bearer ") else ""
        if not key or (endpoint.api_key is not None and key != endpoint.api_key):
            self._error(401, "missing or wrong API key", "authentication_error")
            return
        try:
            body = json.loads(raw)
            if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
                raise ValueError("the body needs a 'messages' list")
        except ValueError as exc:
            self._error(400, f"bad request: {exc}", "invalid_request_error")
            return
        endpoint._serve(self, body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # the default listen backlog of 5 drops the SYNs of a burst of new connections (the client then waits a 1 s
    # retransmit); real servers accept hundreds at once
    request_queue_size = 1024
    endpoint: ScriptedEndpoint


class ScriptedEndpoint:
    """The server; a context manager (`with ScriptedEndpoint() as server: server.base_url`)."""

    def __init__(
        self,
        responder: Responder | None = None,
        faults: FaultPlan = FaultPlan(),
        latency_s: float = 0.0,
        host: str = "127.0.0.1",
        port: int = 0,
        model: str = "scripted-r1",
        reasoning_mode: str = "field",
        api_key: str | None = None,
    ) -> None:
        self.api_key = api_key  # None: any non-empty key is accepted, like a local vLLM
        self.responder = responder or (lambda request: scripted_reasoning(request, reasoning_mode))
        self.faults = faults  # read per request: a test may end an "outage" by assigning a new plan
        self.latency_s = latency_s
        self.model = model
        self._address = (host, port)
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self.base_url = ""
        self._in_flight = 0
        self.reset_stats()

    # --- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> ScriptedEndpoint:
        self._server = _Server(self._address, _Handler)
        self._server.endpoint = self
        host, port = self._server.server_address[:2]
        self.base_url = f"http://{host}:{port}/v1"
        # a short poll interval: stop() waits up to one interval, and tests start and stop many servers
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="scripted-endpoint", daemon=True
        ).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> ScriptedEndpoint:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- counters --------------------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        with self._lock:
            # requests in flight stay counted: their threads still decrement when they finish
            self._requests = self._answered = 0
            self._in_flight_max = self._in_flight
            self._faults = {kind: 0 for kind in FAULT_KINDS}
            self._per_prompt: dict[str, dict[str, int]] = {}
            self._faults_per_prompt: dict[str, int] = {}

    def stats(self) -> dict:
        with self._lock:
            return {
                "requests": self._requests,
                "answered": self._answered,
                "faults": dict(self._faults),
                "per_prompt": {k: dict(v) for k, v in self._per_prompt.items()},
                "in_flight_max": self._in_flight_max,
            }

    # --- one request -----------------------------------------------------------------------------------------
    def _prompt(self, key: str) -> dict[str, int]:
        """The counters of one prompt (call with the lock held); created on demand, as reset_stats may run while
        the prompt's request is in flight."""
        return self._per_prompt.setdefault(key, {"requests": 0, "answered": 0})

    def _fault_for(self, key: str) -> str | None:
        plan = self.faults
        with self._lock:
            attempt = self._prompt(key)["requests"]
            if plan.rate <= 0 or self._faults_per_prompt.get(key, 0) >= plan.max_faults_per_prompt:
                return None
            draw = random.Random(f"{plan.seed}:{key}:{attempt}")
            if draw.random() >= plan.rate:
                return None
            kind = draw.choice(plan.kinds)
            self._faults_per_prompt[key] = self._faults_per_prompt.get(key, 0) + 1
            self._faults[kind] += 1
            return kind

    def _serve(self, handler: _Handler, body: dict) -> None:
        key = prompt_key(body)
        with self._lock:
            self._requests += 1
            self._prompt(key)["requests"] += 1
            self._in_flight += 1
            self._in_flight_max = max(self._in_flight_max, self._in_flight)
        settled = answered = False

        def settle(is_answer: bool) -> None:
            # the counters change before the last bytes go out: a client holding its response then always reads
            # stats that include it, and its next request cannot overlap this one in in_flight_max
            nonlocal settled, answered
            with self._lock:
                self._in_flight -= 1
                if is_answer:
                    self._answered += 1
                    self._prompt(key)["answered"] += 1
            settled, answered = True, is_answer

        try:
            fault = self._fault_for(key)
            if self.latency_s:
                time.sleep(self.latency_s)
            if fault == "rate_limit":
                settle(False)
                handler._error(429, "rate limited", "rate_limit_error", {"Retry-After": f"{self.faults.retry_after_s}"})
                return
            if fault == "server_error":
                settle(False)
                handler._error(500, "scripted internal error", "server_error")
                return
            if fault == "drop":
                settle(False)
                handler.connection.shutdown(socket.SHUT_RDWR)  # no status line at all: a dropped connection
                handler.close_connection = True
                return
            if fault == "malformed_json":
                broken = b'{"id": "chatcmpl-broken", "choices": [{"message": {"content": "trunc'
                settle(False)
                handler.send_response(200)
                handler.send_header("Content-Type", "application/json")
                handler.send_header("Content-Length", str(len(broken)))
                handler.end_headers()
                handler.wfile.write(broken)
                return
            if fault == "slow":
                time.sleep(self.faults.slow_s)
                if _client_gone(handler.connection):
                    return  # it timed out: an answer nobody reads must not count as answered
            reply = Reply("") if fault == "empty_content" else self.responder(body)
            is_answer = bool(reply.content or reply.reasoning_content)
            n = int(body.get("n") or 1)
            if body.get("stream"):
                self._stream(handler, body, reply, n, before_last_write=lambda: settle(is_answer))
            else:
                completion = self._completion(body, reply, n)
                settle(is_answer)
                handler._send_json(200, completion)
        except (BrokenPipeError, ConnectionResetError):
            if answered:  # the client gave up (timeout) before it got the answer
                with self._lock:
                    self._answered -= 1
                    self._prompt(key)["answered"] -= 1
        finally:
            if not settled:
                settle(False)

    def _usage(self, body: dict, reply: Reply, n: int) -> dict:
        prompt = sum(_words(m.get("content")) for m in body["messages"] if isinstance(m, dict))
        completion = n * (_words(reply.content) + _words(reply.reasoning_content))
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _completion(self, body: dict, reply: Reply, n: int) -> dict:
        message = {"role": "assistant", "content": reply.content}
        if reply.reasoning_content is not None:
            message["reasoning_content"] = reply.reasoning_content
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", self.model),
            "choices": [{"index": i, "message": message, "finish_reason": reply.finish_reason} for i in range(n)],
            "usage": self._usage(body, reply, n),
        }

    def _stream(
        self, handler: _Handler, body: dict, reply: Reply, n: int, before_last_write: Callable[[], None]
    ) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Connection", "close")  # the end of the stream is the end of the connection
        handler.end_headers()
        handler.close_connection = True
        base = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": body.get("model", self.model),
        }

        def send(choices: list[dict], **extra: object) -> None:
            handler.wfile.write(b"data: " + json.dumps({**base, "choices": choices, **extra}).encode() + b"\n\n")

        def pieces(text: str) -> list[str]:
            size = max(1, len(text) // 3)
            return [text[i : i + size] for i in range(0, len(text), size)]

        for i in range(n):
            send([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            for piece in pieces(reply.reasoning_content or ""):
                send([{"index": i, "delta": {"reasoning_content": piece}, "finish_reason": None}])
            for piece in pieces(reply.content):
                send([{"index": i, "delta": {"content": piece}, "finish_reason": None}])
            send([{"index": i, "delta": {}, "finish_reason": reply.finish_reason}])
        if (body.get("stream_options") or {}).get("include_usage"):
            send([], usage=self._usage(body, reply, n))
        before_last_write()
        handler.wfile.write(b"data: [DONE]\n\n")
        handler.wfile.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001, help="0 = any free port")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument("--reasoning-mode", choices=["field", "think_tags"], default="field")
    args = parser.parse_args(argv)
    # stop on SIGTERM and Ctrl-C however it was started: a parent may ignore them (a background job of a script, a
    # process that ran Dagster, which maps SIGTERM to SIGINT's disposition) and an ignored signal is inherited
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    server = ScriptedEndpoint(
        faults=FaultPlan(rate=args.fault_rate),
        latency_s=args.latency,
        host=args.host,
        port=args.port,
        reasoning_mode=args.reasoning_mode,
    ).start()
    print(f"scripted OpenAI-compatible endpoint at {server.base_url} (Ctrl-C to stop)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
