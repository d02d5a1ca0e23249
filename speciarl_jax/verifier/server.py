"""A small OpenAI-compatible chat-completions server on loopback, graded by a Taxonomy.

It stands in for a vLLM verifier in tests, benchmarks and the demo: the real client
talks real HTTP to it. The server reads the (ground truth, prediction) pair out of
the JSON block that `prompts.build_messages` writes, grades it with
`Taxonomy.grade`, and answers in the shape the request asked for (a bare label, or
{"category": ...} for a JSON-schema response format).

Switches:
- `latency_s`: every request waits this long before it is answered;
- `faults`: a FaultPlan. Request number i (in arrival order, from 0) suffers
  `plan.first[i]`; requests for a prediction listed in `plan.by_prediction` always
  suffer that fault. Faults: "500" (server error), "429" (rate limited, with a
  Retry-After header), "hang" (no reply for `hang_s`), "drop" (connection closed
  without a reply), "garbage" (HTTP 200 with text that is no label);
- `api_key`: if set, requests without `Authorization: Bearer <api_key>` get 401.

    with LoopbackVerifierServer(taxonomy, latency_s=0.05) as server:
        verifier = make_verifier({"kind": "openai", "base_url": server.url, ...})

From a shell: python -m speciarl_jax.verifier.server --taxonomy tax.json --port 8000
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from speciarl_jax.verifier.prompts import read_pair
from speciarl_jax.verifier.rules import Taxonomy

FAULTS = ("500", "429", "hang", "drop", "garbage")
GARBAGE_REPLY = "Hard to say; it could be several things."


@dataclasses.dataclass
class FaultPlan:
    first: Sequence[str] = ()  # fault for request 0, 1, ... in arrival order; "" or None = no fault
    by_prediction: Mapping[str, str] = dataclasses.field(default_factory=dict)  # normalised prediction -> fault
    retry_after: str = "1"  # Retry-After header value sent with 429
    hang_s: float = 30.0

    def __post_init__(self):
        for fault in [*self.first, *self.by_prediction.values()]:
            if fault and fault not in FAULTS:
                raise ValueError(f"unknown fault {fault!r}; known faults are {FAULTS}")


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # a hanging handler must not stall shutdown
    request_queue_size = 1024  # many clients connect at once at high concurrency
    allow_reuse_address = True
    owner: "LoopbackVerifierServer"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: one connection serves many requests
    disable_nagle_algorithm = True  # headers and body leave at once, no delayed-ACK stalls
    server: _HTTPServer

    def log_message(self, format, *args):  # quiet: tests and benchmarks send thousands
        pass

    def _send_json(self, status: int, payload: Any, headers: Mapping[str, str] | None = None) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        self._send_json(status, {"error": {"message": message, "type": "loopback_error", "code": status}},
                        headers)

    def do_GET(self):
        owner = self.server.owner
        if self.path.rstrip("/") in ("/v1/models", "/models"):
            self._send_json(200, {"object": "list", "data": [{"id": owner.model, "object": "model"}]})
        elif self.path.rstrip("/") == "/health":
            self._send_json(200, {"status": "ok"})
        else:
            self._error(404, f"no route {self.path}")

    def do_POST(self):
        owner = self.server.owner
        body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
        index = owner._enter()
        try:
            self._answer(owner, index, body)
        finally:
            owner._leave()

    def _answer(self, owner: "LoopbackVerifierServer", index: int, body: bytes) -> None:
        if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            return self._error(404, f"no route {self.path}")
        if owner.api_key is not None and self.headers.get("Authorization") != f"Bearer {owner.api_key}":
            return self._error(401, "missing or wrong API key")
        try:
            request = json.loads(body)
            owner._record(request)
            truth, prediction = read_pair(request["messages"])
        except (ValueError, KeyError, TypeError) as error:
            return self._error(400, f"cannot read the pair to grade: {error}")

        plan = owner.faults
        fault = plan.first[index] if index < len(plan.first) else None
        fault = fault or plan.by_prediction.get(prediction)
        if owner.latency_s:
            owner._stopping.wait(owner.latency_s)
        if fault:
            owner._count_fault(fault)
        if fault == "500":
            return self._error(500, "injected server error")
        if fault == "429":
            return self._error(429, "injected rate limit", {"Retry-After": plan.retry_after})
        if fault in ("hang", "drop"):
            if fault == "hang":
                owner._stopping.wait(plan.hang_s)
            self.close_connection = True  # leave without a reply
            return

        verdict = owner.taxonomy.grade(truth, prediction, unknown_ground_truth="wrong")
        choices = _allowed_choices(request)
        if choices is not None and verdict not in choices:
            return self._error(400, f"verdict {verdict!r} is not among the allowed choices")
        if fault == "garbage":
            content = GARBAGE_REPLY
        elif (request.get("response_format") or {}).get("type") == "json_schema":
            content = json.dumps({"category": verdict})
        else:
            content = verdict
        self._send_json(200, {
            "id": f"chatcmpl-loopback-{index}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.get("model", owner.model),
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 1, "total_tokens": 1},
        })


def _allowed_choices(request: Mapping[str, Any]) -> list[str] | None:
    """The label set the request constrains output to (vLLM's two spellings), if any."""
    structured = request.get("structured_outputs") or {}
    return structured.get("choice") or request.get("guided_choice")


class LoopbackVerifierServer:
    """Serves chat completions on 127.0.0.1 in a background thread; see the module docstring."""

    def __init__(self, taxonomy: Taxonomy, *, latency_s: float = 0.0, faults: FaultPlan | None = None,
                 api_key: str | None = None, model: str = "loopback-rule-verifier",
                 host: str = "127.0.0.1", port: int = 0, keep_requests: int = 100):
        self.taxonomy = taxonomy
        self.latency_s = latency_s
        self.faults = faults or FaultPlan()
        self.api_key = api_key
        self.model = model
        self._address = (host, port)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.requests = 0  # chat-completion requests received
        self.in_flight = 0
        self.max_in_flight = 0  # most requests handled at the same moment
        self.fault_counts: collections.Counter[str] = collections.Counter()
        self.recent_requests: collections.deque[dict] = collections.deque(maxlen=keep_requests)

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("server is not running")
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        """Base URL for an OpenAI client, e.g. http://127.0.0.1:41234/v1."""
        return f"http://{self._address[0]}:{self.port}/v1"

    def start(self) -> "LoopbackVerifierServer":
        self._stopping.clear()
        self._httpd = _HTTPServer(self._address, _Handler)
        self._httpd.owner = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="loopback-verifier", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._stopping.set()  # wakes handlers sleeping on latency or a hang
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
        self._httpd = None

    def __enter__(self) -> "LoopbackVerifierServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _enter(self) -> int:
        with self._lock:
            index = self.requests
            self.requests += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return index

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def _count_fault(self, fault: str) -> None:
        with self._lock:
            self.fault_counts[fault] += 1

    def _record(self, request: dict) -> None:
        self.recent_requests.append(request)  # deque appends are thread-safe


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--taxonomy", required=True, help="taxonomy JSON file (see verifier/rules.py)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--latency_s", type=float, default=0.0)
    parser.add_argument("--api_key_env", default="", help="if set, require the key held in this variable")
    args = parser.parse_args(argv)

    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    if args.api_key_env and not api_key:
        parser.error(f"environment variable {args.api_key_env} is unset or empty")
    server = LoopbackVerifierServer(Taxonomy.from_json(args.taxonomy), latency_s=args.latency_s,
                                    api_key=api_key, host=args.host, port=args.port)
    server.start()
    print(f"listening on {server.url}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
