"""A scripted stand-in for an OpenAI-compatible inference server (vLLM, Ollama ...).

It answers the part of the API the server backend uses: ``GET /v1/models``,
``POST /v1/completions`` (with ``echo`` and ``logprobs`` for score mode, plain text
for reflections) and ``POST /v1/chat/completions``. Its model plays like
Tit-for-tat: it prefers to remain silent unless the opponent's last remembered move
was to testify. Faults are queued on demand, one per completion request, or
chosen per request by a function of its body.

Like vLLM serving a Llama model, it puts a BOS token in front of every
completion prompt it tokenizes: the echo starts with it (without a
log-probability) and ``usage.prompt_tokens`` counts it.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from fake_llm import labels_in, last_history_line

MODEL = "stub-model"
ROOT = "/models/stub-weights"
FINGERPRINT = "fp-stub-1"
REFLECTION = "I think it went as planned."
ANSWER_PREFIX = "I want to"
# the model's probability of each police phrasing; any other gets RARE
CALM = {"remain silent": 0.7, "stay silent": 0.1, "testify": 0.1}
PROVOKED = {"testify": 0.8, "remain silent": 0.1}
RARE = 0.001
PROMPT_LOGPROB = -0.5  # every echoed prompt token
BOS = "<s>"
_TOKEN = re.compile(r"\s*\S+")


def provoked(text: str) -> bool:
    """The opponent's last remembered move was D (as the prompt words it)."""
    last = last_history_line(text)
    _, d = labels_in(text)
    return bool(last) and last.split(";")[1].split("(")[0].strip().endswith(": " + d)


def phrase_probability(prompt: str, phrase: str) -> float:
    """The scripted probability of ``phrase`` after ``prompt``."""
    table = PROVOKED if provoked(prompt) else CALM
    return table.get(phrase.strip(), RARE)


class Stub:
    """The server's script, faults and what it saw.

    Attributes:
        model: The one model it serves.
        faults: Consumed one per POST: "500", "slow", "malformed", "400", or "stall"
            (answer 500 once ``release`` is set, or after ``stall_seconds``).
        fault_for: When set, chooses each POST's fault from its JSON body instead.
        bos: The token put in front of every completion prompt; None for none.
        logprobs: False makes /v1/completions answer without log-probabilities.
        usage: False leaves ``usage`` out of the answers.
        offset_shift: Subtracted from every text offset, as a server does that leaves
            special tokens out of the echoed text.
        drop_first: Leave out this many leading entries of the echo (llama-cpp-python
            leaves out a BOS token).
        hold: Hold the first requests until this many are in flight at once (or
            ``hold_seconds`` pass), then let everything through.
        requests: (path, Authorization header, JSON body) of each POST.
        max_in_flight: The most POST requests it was answering at once.
    """

    def __init__(self, model: str = MODEL) -> None:
        self.model = model
        self.faults: list[str] = []
        self.fault_for: Callable[[dict[str, Any]], str | None] | None = None
        self.release = threading.Event()
        self.stall_seconds = 30.0
        self.bos: str | None = BOS
        self.logprobs = True
        self.usage = True
        self.offset_shift = 0
        self.drop_first = 0
        self.slow_seconds = 1.5
        self.hold: int | None = None
        self.hold_seconds = 5.0
        self.requests: list[tuple[str, str | None, dict[str, Any]]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Condition()
        self.url = ""

    def next_fault(self, body: dict[str, Any]) -> str | None:
        if self.fault_for is not None:
            return self.fault_for(body)
        with self.lock:
            return self.faults.pop(0) if self.faults else None

    # ---------------------------------------------------------------- answers

    def completions(self, body: dict[str, Any]) -> dict[str, Any]:
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        choices = []
        for i, text in enumerate(prompts):
            if body.get("echo"):
                choices.append({"index": i, "text": text + " .", "logprobs": self._echo(text)})
            else:
                choices.append({"index": i, "text": " " + REFLECTION, "logprobs": None})
        answer = self._answer("text_completion", choices)
        if body.get("echo") and len(prompts) == 1:
            counted = len(_TOKEN.findall(prompts[0])) + (self.bos is not None)
            answer["usage"]["prompt_tokens"] = counted
        if not self.usage:
            del answer["usage"]
        return answer

    def _echo(self, text: str) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        start = text.rindex(ANSWER_PREFIX) + len(ANSWER_PREFIX)
        tokens, offsets = [], []
        for match in _TOKEN.finditer(text):
            tokens.append(match.group())
            offsets.append(match.start())
        phrase = [i for i, offset in enumerate(offsets) if offset >= start]
        # the phrasing's log-probability is spread over its tokens: their sum is what counts
        share = math.log(phrase_probability(text[:start], text[start:])) / len(phrase)
        values: list[float | None] = [
            share if offset >= start else PROMPT_LOGPROB for offset in offsets
        ]
        values[0] = None  # nothing precedes the first token
        if self.bos is not None:
            # as vLLM echoes it: the offsets run over the token texts, BOS included
            tokens, values = [self.bos, *tokens], [None, PROMPT_LOGPROB, *values[1:]]
            offsets = [0, *(o + len(self.bos) for o in offsets)]
        end = offsets[-1] + len(tokens[-1])
        skip = self.drop_first
        return {
            "tokens": [*tokens, " ."][skip:],
            "token_logprobs": [*values, -0.1][skip:],
            "text_offset": [o - self.offset_shift for o in [*offsets, end]][skip:],
            "top_logprobs": None,
        }

    def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        last = body["messages"][-1]["content"]
        if "reflect on your decision" in last:
            answer = REFLECTION
        else:
            c, d = labels_in(last)
            answer = f"Answer: {d if provoked(last) else c}"
        message = {"role": "assistant", "content": answer}
        return self._answer("chat.completion", [{"index": 0, "message": message}])

    def _answer(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": "cmpl-stub",
            "object": kind,
            "created": 0,
            "model": self.model,
            "system_fingerprint": FINGERPRINT,
            "choices": choices,
            "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11},
        }

    # ---------------------------------------------------------------- concurrency

    def enter(self) -> None:
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.lock.notify_all()
            if self.hold is not None:
                reached = self.lock.wait_for(
                    lambda: self.hold is None or self.in_flight >= self.hold, self.hold_seconds
                )
                if reached:
                    self.hold = None

    def leave(self) -> None:
        with self.lock:
            self.in_flight -= 1


def make_handler(stub: Stub) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to ``stub``."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def send(self, status: int, payload: Any) -> None:
            raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up waiting (a timeout test)

        def do_GET(self) -> None:
            if self.path != "/v1/models":
                self.send(404, {"error": {"message": f"no route {self.path}"}})
                return
            entry = {"id": stub.model, "object": "model", "owned_by": "stub", "root": ROOT}
            self.send(200, {"object": "list", "data": [entry]})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with stub.lock:
                stub.requests.append((self.path, self.headers.get("Authorization"), body))
            stub.enter()
            try:
                fault = stub.next_fault(body)
                if fault == "stall":
                    stub.release.wait(stub.stall_seconds)
                if fault in ("500", "stall"):
                    self.send(500, {"error": {"message": "engine overloaded"}})
                elif fault == "400":
                    self.send(400, {"error": {"message": "max_tokens is too large"}})
                elif fault == "malformed":
                    self.send(200, b'{"choices": [')
                else:
                    if fault == "slow":
                        time.sleep(stub.slow_seconds)
                    if self.path == "/v1/completions":
                        self.send(200, stub.completions(body))
                    elif self.path == "/v1/chat/completions":
                        self.send(200, stub.chat(body))
                    else:
                        self.send(404, {"error": {"message": f"no route {self.path}"}})
            finally:
                stub.leave()

    return Handler


def serve(stub: Stub) -> ThreadingHTTPServer:
    """Start the stub on 127.0.0.1, a free port, in a daemon thread; sets ``stub.url``."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(stub))
    server.daemon_threads = True
    stub.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
