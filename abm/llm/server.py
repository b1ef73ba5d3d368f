"""An LLM backend that asks an inference server over the OpenAI-compatible HTTP API.

vLLM, Ollama, llama.cpp's ``llama-server`` and TGI all answer this API, so a
model that needs several GPUs runs once on the server, and every run, sweep
worker and Ray actor that points at it shares it. Only the standard library is
used: a server player needs neither torch nor transformers.

The backend has the methods the LLM policy calls on the local one. Its "token
ids" are the characters of the text (the server tokenizes), so prompts and
phrasings travel as text and memoized prompts are still keyed exactly:

- generate mode and reflections, no ``chat_template``: the messages go to
  ``/chat/completions`` and the server applies the model's chat template; the
  recorded ``input`` is the messages as JSON;
- a named ``chat_template``: abm renders the text itself and sends it to
  ``/completions``; score mode always works this way, asking for each option
  phrasing appended to the prompt with ``echo`` and ``logprobs``, and sums the
  log-probabilities of the tokens that spell the phrasing. The text is what a
  local model reads less its leading BOS token, which the server adds when it
  tokenizes a completion prompt.

The first request that fails for good ends the whole batch: requests not yet
sent are cancelled and those in flight give up before their next try.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import json
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any

import numpy as np

from abm.errors import ScenarioError
from abm.llm.stats import BackendStats

# the first wait before a retry; each further retry waits twice as long, up to the cap
BACKOFF_SECONDS = 0.5
BACKOFF_CAP_SECONDS = 8.0
_SHOWN_CHARS = 300  # of an error body or a malformed answer, in messages
# stands in for the BOS token while a template renders: no prompt contains it
_BOS_MARK = "\x00abm-bos\x00"
# the BOS text of the named formats' models (Llama-2, Vicuna, Alpaca): chat_formats.render's
# default, so the server's text matches what a local Llama tokenizer renders
_NAMED_BOS = "<s>"
# user, assistant, user: where a template puts a BOS token that is not the first
_BOS_PROBE = [
    {"role": "user", "content": "a"},
    {"role": "assistant", "content": "b"},
    {"role": "user", "content": "c"},
]


class ServerError(ScenarioError):
    """The server could not be reached, refused a request, or answered without what is needed.

    A ScenarioError, so ``abm.run`` shows its one paragraph and exits with status 2.
    """


class _GivenUp(ServerError):
    """A request abandoned because another request of the same batch failed for good."""


class ServerBackend:
    """Decisions and reflections from a model an inference server already serves.

    Args:
        url: The API's base URL, e.g. ``http://127.0.0.1:8000/v1``.
        model: The served model name, as the server's ``GET /models`` lists it.
        chat: True to send messages to ``/chat/completions`` (the server's chat
            template); False to send text that abm rendered to ``/completions``.
        api_key_env: The environment variable that holds the API key, if the server
            wants one; the key is sent as a bearer token and never stored.
        concurrency: Requests in flight at once.
        timeout: Seconds to wait for one answer.
        retries: Further tries after a connection error, a timeout, an HTTP 429 or
            5xx, or an answer that is not JSON.

    Raises:
        ServerError: The key's variable is not set, the server cannot be reached, or
            it does not serve ``model``.
    """

    def __init__(
        self,
        url: str,
        model: str,
        *,
        chat: bool,
        api_key_env: str | None = None,
        concurrency: int = 8,
        timeout: float = 120.0,
        retries: int = 4,
    ) -> None:
        """Check the key and ask the server which models it serves."""
        started = time.perf_counter()
        self.url = url.rstrip("/")
        self.model = model
        self.chat = chat
        self.concurrency = concurrency
        self.timeout = timeout
        self.retries = retries
        self._key: str | None = None
        if api_key_env is not None:
            self._key = os.environ.get(api_key_env) or None
            if self._key is None:
                raise ServerError(
                    f"the LLM server {self.url} needs an API key from the environment "
                    f"variable {api_key_env} (server_api_key_env), which is not set; "
                    f"export {api_key_env}=... before the run"
                )
        host = urllib.parse.urlsplit(self.url).hostname or ""
        # a proxy from the environment must not carry requests meant for this machine
        handlers = [urllib.request.ProxyHandler({})] if _loopback(host) else []
        self._opener = urllib.request.build_opener(*handlers)
        self._lock = threading.Lock()
        self._in_flight = 0
        self._pool: ThreadPoolExecutor | None = None
        # the abort event of the batch a pool thread is working for (see _map)
        self._local = threading.local()
        self._bos_checked: set[str] = set()
        self.stats = BackendStats(extra={"requests": 0, "retries": 0, "max_in_flight": 0})
        self.reported_models: set[str] = set()
        self.fingerprints: set[str] = set()
        self.last_model: str | None = None
        self.last_fingerprint: str | None = None
        self.listed = self._listed_model()
        self.revision = str(self.listed.get("root") or self.listed.get("id") or model)
        self.load_seconds = time.perf_counter() - started
        self.claimed = False

    # ---------------------------------------------------------------- startup

    def _listed_model(self) -> dict[str, Any]:
        """The server's entry for the model; empty when the server lists none."""
        body = self._request("GET", "/models", None, missing_ok=True)
        if body is None:  # some servers do not implement GET /models
            return {}
        entries = [e for e in body.get("data") or [] if isinstance(e, dict)]
        ids = [str(e.get("id")) for e in entries]
        for entry in entries:
            # Ollama lists "name:latest" for a model it also answers to as "name"
            if entry.get("id") in (self.model, f"{self.model}:latest"):
                return entry
        raise ServerError(
            f"the LLM server {self.url} does not serve the model {self.model!r} (field "
            f"'model'); it serves: {', '.join(repr(i) for i in ids) or 'nothing'}; set "
            "model to the served name"
        )

    # ---------------------------------------------------------------- prompts

    def render(
        self,
        messages: list[dict[str, str]],
        answer_prefix: str = "",
        chat_template: str | None = None,
    ) -> str:
        """What the server is sent: the messages as JSON, or the text abm renders.

        Args:
            messages: The conversation, as role/content dictionaries.
            answer_prefix: Text that opens the assistant's answer (score mode).
            chat_template: The Jinja source of the scenario's chat format; None lets
                the server apply the model's own.

        Returns:
            JSON of the messages for ``/chat/completions``, or the rendered prompt
            followed by ``answer_prefix`` for ``/completions``: the text a local
            model reads, less a leading BOS token (the server adds that one).

        Raises:
            ServerError: An answer prefix is asked for without a chat template, or a
                template from a file puts the BOS token after the start.
        """
        if chat_template is None:
            if answer_prefix:
                raise ServerError(
                    f"score mode with the LLM server {self.url} needs a named "
                    "chat_template: the prompt is rendered by abm and the server scores "
                    "the text after it"
                )
            return json.dumps(messages, ensure_ascii=False)
        from abm.llm.chat_formats import render

        self._check_bos(chat_template)
        # the server adds the model's BOS token in front when it tokenizes a completion
        # prompt; a later one (llama-2 opens every turn with one) must stay in the text
        text = render(chat_template, messages, bos_token=_BOS_MARK).removeprefix(_BOS_MARK)
        if _BOS_MARK in text:
            if not _named(chat_template):
                raise self._inner_bos_error()
            text = text.replace(_BOS_MARK, _NAMED_BOS)
        if answer_prefix:
            joined = text[-1:].isspace() or answer_prefix[:1].isspace()
            text += answer_prefix if joined or not text else " " + answer_prefix
        return text

    def _check_bos(self, template: str) -> None:
        """Refuse a file's template that puts the BOS token after the start, at its first use.

        Without this check a run would stop only when a conversation of several turns
        (a reflection, a retry) is first rendered.

        Raises:
            ServerError: The template, not a named format, puts the BOS token between
                turns.
        """
        if template in self._bos_checked or _named(template):
            return
        import jinja2

        from abm.llm.chat_formats import render

        try:
            probe = render(template, _BOS_PROBE, bos_token=_BOS_MARK)
        except jinja2.TemplateError:  # it wants other roles: rendering the run's own decides
            probe = ""
        if _BOS_MARK in probe.removeprefix(_BOS_MARK):
            raise self._inner_bos_error()
        self._bos_checked.add(template)

    def _inner_bos_error(self) -> ServerError:
        return ServerError(
            "the chat_template file puts the BOS token (bos_token) after the start of the "
            f"prompt, between turns; the LLM server {self.url} adds only the leading one, "
            "and abm cannot know the text of this model's BOS token to write the others, so "
            "the prompt would differ from what the model reads when abm runs it itself; "
            "write the BOS token's own text into the file where it stands between turns "
            '(e.g. <s> for Llama-2), or use a named chat_template ("vicuna", "llama-2", '
            '"alpaca", "chatml", "plain")'
        )

    def tokenize(self, text: str) -> list[int]:
        """The characters of ``text`` as numbers; the server does the real tokenizing."""
        return [ord(c) for c in text]

    def continuation_ids(self, context: str, text: str) -> list[int]:
        """The characters of a phrasing; the server finds its tokens after the prompt.

        Raises:
            ScenarioError: ``text`` is empty.
        """
        if not text:
            raise ScenarioError("an answer phrasing is empty")
        return self.tokenize(text)

    def reset_prefix_cache(self) -> None:
        """Start a run's counts afresh; the server keeps its own cache.

        The LLM policy calls this when a run begins, so that ``summary()`` reports
        that run's requests, retries and reported names, not an earlier run's.
        """
        with self._lock:
            self.stats.extra.update(requests=0, retries=0, max_in_flight=0)
            self.reported_models.clear()
            self.fingerprints.clear()

    # ---------------------------------------------------------------- scoring

    def score_phrasings(
        self, prompts: list[list[int]], phrasings: list[list[int]], max_batch_size: int = 16
    ) -> np.ndarray:
        """Log P(phrasing | prompt) for every prompt and phrasing, shape (n, len(phrasings)).

        One ``/completions`` request per prompt and phrasing, the phrasing appended
        to the prompt (``echo``, ``logprobs``, one new token): a single string
        prompt, since Ollama and llama-cpp-python refuse a list; the server's
        prefix cache makes the shared prompt cheap. The tokens from the prompt's end
        to the phrasing's end are summed. ``max_batch_size`` is not used:
        ``concurrency`` requests are in flight at once.

        Raises:
            ServerError: The server returns no log-probabilities of the prompt tokens.
        """
        tails = ["".join(map(chr, p)) for p in phrasings]

        def one(item: tuple[str, str]) -> float:
            prompt, tail = item
            body = self._request(
                "POST",
                "/completions",
                {
                    "model": self.model,
                    "prompt": prompt + tail,
                    "echo": True,
                    "logprobs": 1,
                    "max_tokens": 1,
                    "temperature": 0.0,
                },
            )
            choice = _first(body)
            if not isinstance(choice, dict):
                raise ServerError(
                    f"the LLM server {self.url} answered /completions without a choice: "
                    f"{json.dumps(body)[:_SHOWN_CHARS]}"
                )
            return self._continuation_logprob(body, choice, prompt, tail)

        texts = ["".join(map(chr, p)) for p in prompts]
        items = [(text, tail) for text in texts for tail in tails]
        return np.array(self._map(one, items), dtype=float).reshape(len(texts), len(tails))

    def _continuation_logprob(
        self, body: dict[str, Any], choice: dict[str, Any], prompt: str, tail: str
    ) -> float:
        """The summed log-probability of the tokens that spell ``tail`` after ``prompt``.

        The echoed prompt ends where ``usage.prompt_tokens`` says (else where the
        text offsets pass the end of prompt and phrasing); from there, tokens are
        taken backwards until their texts cover the phrasing. Offsets alone are not
        enough: some servers (llama-cpp-python) leave special tokens out of the
        echoed text, which shifts every offset.

        Raises:
            ServerError: No log-probabilities of the prompt tokens, or token texts
                that do not spell the phrasing.
        """
        logprobs = choice.get("logprobs")
        logprobs = logprobs if isinstance(logprobs, dict) else {}
        tokens = logprobs.get("tokens") or []
        values = logprobs.get("token_logprobs") or []
        offsets = logprobs.get("text_offset") or []
        usage = body.get("usage")
        counted = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        echoed = min(len(tokens), len(values))
        if isinstance(counted, int) and counted > 0:
            # max_tokens = 1: the echo is the prompt's tokens and one new token. Fewer
            # means the server counts a token it does not echo (a BOS): the index
            # would then land on the new token, so nothing is summed
            if tokens and values and echoed != counted + 1:
                raise ServerError(
                    f"the LLM server {self.url} echoed {echoed} tokens with "
                    f"log-probabilities for a prompt of {counted} tokens and one new token; "
                    "score mode needs exactly one for every prompt token (as vLLM returns "
                    'them); use mode = "generate" with this server'
                )
            last = counted
        else:
            end = len(prompt) + len(tail)
            last = sum(1 for offset in offsets[:echoed] if offset < end)
        text, total, i = "", 0.0, min(last, echoed)
        while i > 0 and len(text) < len(tail):
            i -= 1
            if values[i] is None or not isinstance(tokens[i], str):
                break
            text = tokens[i] + text
            total += float(values[i])
        if not text or len(text) < len(tail):
            raise ServerError(
                f"the LLM server {self.url} returned no log-probabilities of the prompt "
                "tokens (a /completions request with echo = true and logprobs), which "
                'score mode needs; use mode = "generate" with this server, or a server '
                "that returns prompt logprobs (vLLM does)"
            )
        if not text.endswith(tail):
            raise ServerError(
                f"the LLM server {self.url} echoed tokens that do not spell the phrasing "
                f"{tail!r} (they end {text[-len(tail) - 10 :]!r}); score mode needs the "
                "tokens as text (start vLLM without --return-tokens-as-token-ids)"
            )
        summed = tokens[i : min(last, echoed)]
        # a token echoed without text (a piece of a multi-byte character, a special
        # token) cannot be placed on either side of the boundary: refuse, not guess
        before = tokens[i - 1] if i > 0 else None
        if any(token == "" for token in summed) or before == "":
            raise ServerError(
                f"the LLM server {self.url} echoed a token without text next to the "
                f"phrasing {tail!r}, so its log-probability cannot be assigned to the "
                "prompt or to the phrasing; use phrasings that start with a plain "
                'character, or mode = "generate"'
            )
        if len(text) > len(tail):
            # one token spans the prompt's end and the phrasing's start: its
            # log-probability includes part of the prompt, so the options would not be
            # compared on the same footing
            raise ServerError(
                f"the LLM server {self.url} tokenised the end of the prompt and the start "
                f"of the phrasing {tail!r} into one token ({text[: len(text) - len(tail) + 8]!r}"
                "...), so the phrasing's probability cannot be separated from the prompt's; "
                "end the answer prefix without a trailing space (phrasings start with one), "
                'or use mode = "generate"'
            )
        return total

    # ---------------------------------------------------------------- generation

    def generate(
        self,
        prompts: list[list[int]],
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_new_tokens: int = 32,
        seed: int = 0,
        max_batch_size: int = 16,
    ) -> list[str]:
        """Free-text answers, one request each, ``concurrency`` at a time.

        Each prompt gets the seed ``seed`` plus its position, so sampled answers are
        independent draws and a server that honours seeds repeats them.
        """

        def one(item: tuple[int, str]) -> str:
            i, text = item
            payload: dict[str, Any] = {
                "model": self.model,
                "max_tokens": max_new_tokens,
                "temperature": temperature,
                "top_p": top_p,
                "seed": seed + i,
            }
            if self.chat:
                payload["messages"] = json.loads(text)
                body = self._request("POST", "/chat/completions", payload)
                answer = _first(body, "message", "content")
            else:
                payload["prompt"] = text
                body = self._request("POST", "/completions", payload)
                answer = _first(body, "text")
            if not isinstance(answer, str):
                endpoint = "/chat/completions" if self.chat else "/completions"
                raise ServerError(
                    f"the LLM server {self.url} answered {endpoint} without a text "
                    f"(choices[0]): {json.dumps(body)[:_SHOWN_CHARS]}"
                )
            return answer.strip()

        answers = self._map(one, list(enumerate("".join(map(chr, p)) for p in prompts)))
        with self._lock:
            self.stats.generate_calls += 1
        return answers

    # ---------------------------------------------------------------- transport

    def _map(self, fn: Any, items: list[Any]) -> list[Any]:
        """``fn`` of every item, ``concurrency`` at a time, in the items' order.

        The first item that fails ends the batch at once: the items not yet started
        are cancelled, and the requests in flight give up before their next try, so
        a server that stops answering holds the run up for about one ``timeout``,
        not ``retries`` x ``timeout`` for every request.

        Raises:
            Exception: The first failure, as ``fn`` raised it.
        """
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="abm-llm-server")
        abort = threading.Event()
        failures: list[BaseException] = []

        def guarded(item: Any) -> Any:
            self._local.abort = abort
            try:
                return fn(item)
            except _GivenUp:
                raise
            except BaseException as exc:
                failures.append(exc)  # before the event: a request given up finds it
                # set here, before this thread can take up a queued item
                abort.set()
                raise
            finally:
                self._local.abort = None

        started = time.perf_counter()
        futures = [self._pool.submit(guarded, item) for item in items]
        try:
            wait(futures, return_when=FIRST_EXCEPTION)
            if failures:
                raise failures[0]
            return [future.result() for future in futures]
        finally:
            abort.set()
            for future in futures:
                future.cancel()
            self.stats.seconds += time.perf_counter() - started

    @contextlib.contextmanager
    def _flight(self) -> Iterator[None]:
        with self._lock:
            self._in_flight += 1
            self.stats.extra["requests"] += 1
            self.stats.extra["max_in_flight"] = max(
                self.stats.extra["max_in_flight"], self._in_flight
            )
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1

    def _request(
        self, method: str, path: str, payload: dict[str, Any] | None, missing_ok: bool = False
    ) -> Any:
        """One API call, retried with exponential backoff when that can help.

        Connection errors, timeouts, HTTP 429 and 5xx and answers that are not JSON are
        retried; any other HTTP error is not, and its message is shown.

        Raises:
            ServerError: Every try failed, or the server refused the request.
        """
        url = self.url + path
        data = None if payload is None else json.dumps(payload).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        last = ""
        # set when another request of the batch failed for good (see _map)
        abort = getattr(self._local, "abort", None) or threading.Event()
        for attempt in range(self.retries + 1):
            if attempt:
                wait_s = min(BACKOFF_SECONDS * 2 ** (attempt - 1), BACKOFF_CAP_SECONDS)
                if abort.wait(wait_s):
                    raise self._given_up(method, path)
                with self._lock:
                    self.stats.extra["retries"] += 1
            if abort.is_set():
                raise self._given_up(method, path)
            request = urllib.request.Request(url, data=data, headers=headers, method=method)
            if self._key is not None:
                # not carried over to the host of a redirect
                request.add_unredirected_header("Authorization", f"Bearer {self._key}")
            try:
                with self._flight(), self._opener.open(request, timeout=self.timeout) as answer:
                    raw = answer.read()
            except urllib.error.HTTPError as exc:
                detail = _error_detail(exc)
                if exc.code == 429 or exc.code >= 500:
                    last = f"HTTP {exc.code}: {detail}"
                    continue
                if missing_ok and exc.code == 404:
                    return None
                raise ServerError(
                    f"the LLM server {self.url} refused {method} {path} with HTTP "
                    f"{exc.code}: {detail}"
                ) from None
            except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out ...
                reason = getattr(exc, "reason", exc)
                last = f"{type(reason).__name__}: {reason}".rstrip(": ")
                continue
            try:
                body = json.loads(raw)
            except ValueError:
                last = f"an answer that is not JSON: {raw[:_SHOWN_CHARS]!r}"
                continue
            if not isinstance(body, dict):
                last = f"a JSON answer that is not an object: {raw[:_SHOWN_CHARS]!r}"
                continue
            self._note(body)
            return body
        raise ServerError(
            f"the LLM server {self.url} did not answer {method} {path} after "
            f"{self.retries + 1} tries (last: {last}); check that it runs and serves "
            f"{self.model!r}, or raise server_timeout / server_retries"
        )

    def _given_up(self, method: str, path: str) -> _GivenUp:
        return _GivenUp(
            f"a {method} {path} request to the LLM server {self.url} was given up because "
            "another request failed"
        )

    def _note(self, body: dict[str, Any]) -> None:
        """Keep the model name and fingerprint the server reports."""
        model, fingerprint = body.get("model"), body.get("system_fingerprint")
        with self._lock:
            usage = body.get("usage")
            if isinstance(usage, dict) and isinstance(usage.get("total_tokens"), int):
                self.stats.tokens += usage["total_tokens"]
            if isinstance(model, str) and body.get("object") != "list":
                self.reported_models.add(model)
                self.last_model = model
            if isinstance(fingerprint, str):
                self.fingerprints.add(fingerprint)
                self.last_fingerprint = fingerprint

    # ---------------------------------------------------------------- provenance

    def provenance(self) -> dict[str, Any]:
        """What each transcript record says about the server and the model it ran."""
        return {
            "server": self.url,
            "server_model": self.last_model or self.model,
            "system_fingerprint": self.last_fingerprint,
        }

    def summary(self) -> dict[str, Any]:
        """The server's part of summary.json: who answered, and the requests' work."""
        return {
            "url": self.url,
            "model": self.model,
            "listed": {k: v for k, v in self.listed.items() if isinstance(v, str | int | float)},
            "reported_models": sorted(self.reported_models),
            "system_fingerprints": sorted(self.fingerprints),
            "concurrency": self.concurrency,
            **self.stats.extra,
        }


def _first(body: dict[str, Any], *keys: str) -> Any:
    """``body["choices"][0][keys...]``, or None where anything is missing."""
    choices = body.get("choices")
    value: Any = choices[0] if isinstance(choices, list) and choices else None
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _error_detail(exc: urllib.error.HTTPError) -> str:
    """The message of an error answer: OpenAI's ``error.message``, else its text."""
    try:
        raw = exc.read()
    except OSError:
        raw = b""
    text = raw.decode("utf-8", "replace").strip()
    with contextlib.suppress(ValueError):
        body = json.loads(text)
        error = body.get("error") if isinstance(body, dict) else None
        message = error.get("message") if isinstance(error, dict) else error
        message = message or (body.get("message") if isinstance(body, dict) else None)
        if isinstance(message, str) and message:
            return message[:_SHOWN_CHARS]
    return text[:_SHOWN_CHARS] or exc.reason or "no message"


def _named(template: str) -> bool:
    """Whether ``template`` is one of the named chat formats, whose BOS text is known."""
    from abm.llm.chat_formats import NAMED

    return template in NAMED.values()


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
