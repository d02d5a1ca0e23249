"""An LLM verifier behind any OpenAI-compatible chat-completions endpoint (vLLM, SGLang, OpenAI).

One chat completion per distinct pair, temperature 0, output held to the six labels
(see `base.GUIDED_MODES`). Work runs on a private asyncio loop in a background thread,
so `classify` is an ordinary blocking call for a training loop and the HTTP connection
pool survives from one step to the next.

Reliability:
- at most `concurrency` requests in flight;
- each request has a `timeout_s` limit;
- connection errors, timeouts, 408/409/429 and 5xx are retried up to `max_retries`
  times with exponential backoff and jitter; a Retry-After (or retry-after-ms) header
  is honoured up to `max_retry_after_s`. The openai client's own retries are switched
  off because its delays are fixed constants; ours are configurable (tests use ~ms);
- other HTTP errors (401, 403, 404, 400, ...) mean a misconfiguration and always raise;
- a reply outside the six labels is asked once more, then scored `verifier error`;
  if more than `max_invalid_fraction` of a batch ends that way the endpoint is
  probably ignoring the output constraint, and the batch raises;
- a pair that exhausts its retries raises VerifierError naming URL, model, attempts
  and the last problem, unless `allow_errors` is set: then such pairs are scored
  `verifier error`, counted in the stats and logged.

The API key is read once, from the environment variable named by `api_key_env`, and
handed to the client. It is not kept on this object, not logged (the openai client
redacts the Authorization header) and never reaches the cache.
"""
from __future__ import annotations

import asyncio
import email.utils
import json
import os
import random
import re
import threading
import time
from collections.abc import Sequence
from typing import Any

import openai
from absl import logging

from speciarl_jax.rewards import categories as cat
from speciarl_jax.verifier.base import ClassifyStats, NormalizedPair, Verifier, VerifierConfig, VerifierError
from speciarl_jax.verifier.cache import VerdictCache
from speciarl_jax.verifier.prompts import JSON_SCHEMA_RESPONSE_FORMAT, build_messages, load_prompt

_RETRYABLE_STATUS = (408, 409, 429)
_CONNECTIONS_PER_CLIENT = 16
_THINKING = re.compile(r"<think>.*?</think>", re.DOTALL)


def read_api_key(env_name: str) -> str:
    """The key from environment variable `env_name`; a placeholder when no variable is named."""
    if not env_name:
        return "EMPTY"  # local vLLM servers accept any key
    value = os.environ.get(env_name)
    if not value:
        raise VerifierError(
            f"verifier config names API-key environment variable {env_name!r}, but it is unset or empty")
    return value


def parse_reply(content: str | None) -> str | None:
    """One of the six labels from a completion's text (plain or {"category": ...}), else None."""
    if content is None:
        return None
    text = _THINKING.sub("", content).strip()
    verdict = cat.coerce_verdict(text)
    if verdict is not None or not text.startswith("{"):
        return verdict
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if isinstance(data, dict) and isinstance(data.get("category"), str):
        return cat.coerce_verdict(data["category"])
    return None


def _message_content(reply: Any) -> str | None:
    """choices[0].message.content of a chat-completion body, or None if it has another shape."""
    try:
        content = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


def retry_after_seconds(headers: Any) -> float | None:
    """Seconds a server asked us to wait, from retry-after-ms or Retry-After (seconds or a date)."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) * scale)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError, OverflowError):
            return None
    return None


class _GaveUp(Exception):
    """A pair whose requests kept failing until the retries ran out."""

    def __init__(self, problem: str, attempts: int):
        super().__init__(problem)
        self.problem = problem
        self.attempts = attempts


class _LoopThread:
    """An asyncio loop running forever in a daemon thread; `run` blocks until a coroutine is done."""

    def __init__(self):
        try:  # uvloop (installed with orbax-checkpoint) roughly halves the loop's own overhead
            import uvloop

            self.loop = uvloop.new_event_loop()
        except ImportError:
            self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="verifier-loop", daemon=True)
        self._thread.start()

    def run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class OpenAIVerifier(Verifier):
    """Grades pairs with an LLM; see the module docstring for the reliability rules."""

    def __init__(self, config: VerifierConfig, cache: VerdictCache | None = None):
        super().__init__(config)
        self.prompt = load_prompt(config.prompt)
        api_key = read_api_key(config.api_key_env)
        if cache is None and config.cache_path:
            cache = VerdictCache(config.cache_path, config.model, self.prompt.cache_name)
        self.cache = cache
        self._body_extras = self._constraint_fields()
        self._runner = _LoopThread()
        self._clients, self._slots = self._runner.run(self._make_clients(api_key))

    def __repr__(self) -> str:
        return f"OpenAIVerifier(base_url={self.config.base_url!r}, model={self.config.model!r})"

    async def _make_clients(self, api_key: str) -> tuple[list[openai.AsyncOpenAI], asyncio.Queue]:
        """Clients with small connection pools, and a queue holding one slot per allowed request.

        Built on the loop thread, so pools and queue belong to the loop that uses them.
        The HTTP pool scans all its connections for every request, which costs more
        than the request itself at a few hundred connections; several small pools keep
        that scan short. Taking a slot from the queue both bounds concurrency and
        picks a client with a free connection.
        """
        shards = -(-self.config.concurrency // _CONNECTIONS_PER_CLIENT)
        sizes = [len(range(i, self.config.concurrency, shards)) for i in range(shards)]
        limits_type = type(openai.DEFAULT_CONNECTION_LIMITS)  # httpx(2).Limits, whichever openai ships
        clients = []
        slots: asyncio.Queue = asyncio.Queue()
        for size in sizes:
            http_client = openai.DefaultAsyncHttpxClient(
                limits=limits_type(max_connections=size, max_keepalive_connections=size),
                timeout=self.config.timeout_s)
            client = openai.AsyncOpenAI(base_url=self.config.base_url, api_key=api_key, max_retries=0,
                                        timeout=self.config.timeout_s, http_client=http_client)
            clients.append(client)
            for _ in range(size):
                slots.put_nowait(client)
        return clients, slots

    def _constraint_fields(self) -> dict[str, Any]:
        """Request fields that hold the output to the six labels and switch thinking off."""
        fields: dict[str, Any] = {}
        labels = list(cat.VERDICTS)
        if self.config.guided == "structured_choice":
            fields["structured_outputs"] = {"choice": labels}
        elif self.config.guided == "guided_choice":
            fields["guided_choice"] = labels
        elif self.config.guided == "json_schema":
            fields["response_format"] = JSON_SCHEMA_RESPONSE_FORMAT
        if self.config.disable_thinking:
            fields["chat_template_kwargs"] = {"enable_thinking": False}
        return fields

    def close(self) -> None:
        if self._runner is None:
            return
        for client in self._clients:
            self._runner.run(client.close())
        self._runner.stop()
        self._runner = None
        if self.cache is not None:
            self.cache.close()

    # --- deciding pairs ----------------------------------------------------------------------
    def _decide(self, pairs: Sequence[NormalizedPair], stats: ClassifyStats) -> dict[NormalizedPair, str]:
        if self._runner is None:
            raise VerifierError("this verifier has been closed")
        verdicts: dict[NormalizedPair, str] = {}
        if self.cache is not None:
            verdicts.update(self.cache.get_many(pairs))
            stats.cache_hits = len(verdicts)
        missing = [p for p in pairs if p not in verdicts]
        if not missing:
            return verdicts

        invalid: list[tuple[NormalizedPair, str | None]] = []  # (pair, last reply)
        answers: dict[NormalizedPair, str] = {}  # filled as replies arrive
        try:
            self._runner.run(self._ask_all(missing, stats, answers, invalid))
        finally:  # keep what was learned even when the batch fails
            if self.cache is not None:
                self.cache.put_many({p: a for p, a in answers.items() if a in cat.VERDICTS})
        verdicts.update(answers)
        self._check_failures(missing, answers, invalid)
        return verdicts

    def _where(self) -> str:
        return f"verifier at {self.config.base_url} (model {self.config.model!r})"

    def _check_failures(self, asked, answers, invalid) -> None:
        failed = [p for p in asked if answers[p] == cat.VERIFIER_ERROR]
        if not failed:
            return
        logging.warning("%s: %d of %d pairs scored 'verifier error' this batch, e.g. %s",
                        self._where(), len(failed), len(asked), failed[:3])
        if self.config.allow_errors:
            return
        if len(invalid) > self.config.max_invalid_fraction * len(asked):
            raise VerifierError(
                f"{self._where()} replied with something other than the six labels for "
                f"{len(invalid)} of {len(asked)} pairs even when asked twice (e.g. "
                f"{invalid[0][1]!r:.100}); check that the endpoint supports guided mode "
                f"{self.config.guided!r}, or set allow_errors=True to score them 'verifier error'")

    async def _ask_all(self, pairs: Sequence[NormalizedPair], stats: ClassifyStats,
                       answers: dict[NormalizedPair, str], invalid: list) -> None:
        async def ask(pair: NormalizedPair) -> None:
            answers[pair] = await self._ask(pair, stats, invalid)

        try:
            async with asyncio.TaskGroup() as group:  # the first VerifierError cancels the rest
                for pair in pairs:
                    group.create_task(ask(pair))
        except ExceptionGroup as errors:
            first = next((e for e in errors.exceptions if isinstance(e, VerifierError)), None)
            if first is None:
                raise
            raise first from None

    async def _ask(self, pair: NormalizedPair, stats: ClassifyStats, invalid: list) -> str:
        """The verdict for one pair, `verifier error`, or VerifierError."""
        messages = build_messages(self.prompt, *pair)
        reply = None
        for _ in range(2):  # a reply outside the labels gets one second chance
            try:
                reply = await self._complete(messages, stats)
            except _GaveUp as gave_up:
                if not self.config.allow_errors:
                    raise VerifierError(
                        f"{self._where()} gave up on pair {pair!r} after {gave_up.attempts} attempts "
                        f"({gave_up.attempts - 1} retries): {gave_up.problem}. Set allow_errors=True "
                        "to score such pairs 'verifier error' instead of stopping") from None
                logging.warning("%s: pair %r scored 'verifier error' after %d attempts: %s",
                                self._where(), pair, gave_up.attempts, gave_up.problem)
                return cat.VERIFIER_ERROR
            verdict = parse_reply(reply)
            if verdict is not None:
                return verdict
            stats.invalid_replies += 1
        invalid.append((pair, reply))
        return cat.VERIFIER_ERROR

    async def _complete(self, messages: list[dict[str, str]], stats: ClassifyStats) -> str | None:
        """One completion's text, retrying transient failures; raises _GaveUp when they run out."""
        body = {"model": self.config.model, "messages": messages, "temperature": 0.0,
                "max_tokens": self.config.max_tokens, **self._body_extras}
        attempt = 0
        while True:
            wait = None
            client = await self._slots.get()  # waits while `concurrency` requests are in flight
            try:
                stats.llm_requests += 1
                # `post` is the client's documented route for raw requests: same auth, errors
                # and timeouts as chat.completions.create, without re-validating the request
                # and response through typed models, which costs more CPU than the HTTP itself.
                reply = await client.post("/chat/completions", body=body, cast_to=dict)
                return _message_content(reply)
            except openai.APIStatusError as error:
                status = error.status_code
                if status not in _RETRYABLE_STATUS and status < 500:
                    raise VerifierError(self._fatal_message(error)) from None
                problem = f"HTTP {status}"
                wait = retry_after_seconds(error.response.headers)
            except openai.APITimeoutError:
                problem = f"no reply within timeout_s={self.config.timeout_s}"
            except openai.APIConnectionError as error:
                cause = error.__cause__
                problem = f"connection failed ({type(cause).__name__ if cause else 'unknown'}: {cause})"
            except (openai.APIResponseValidationError, ValueError):
                return None  # a body that is not a chat completion counts as an invalid reply
            finally:
                self._slots.put_nowait(client)

            if attempt >= self.config.max_retries:
                raise _GaveUp(problem, attempt + 1)
            delay = self._backoff(attempt) if wait is None else min(wait, self.config.max_retry_after_s)
            attempt += 1
            stats.retries += 1
            await asyncio.sleep(delay)

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with jitter: a random delay in [base/2, base]."""
        base = min(self.config.backoff_max_s, self.config.backoff_initial_s * 2.0 ** attempt)
        return base * (0.5 + 0.5 * random.random())

    def _fatal_message(self, error: openai.APIStatusError) -> str:
        status = error.status_code
        hint = ""
        if status in (401, 403):
            hint = (f"; check the API key in environment variable {self.config.api_key_env!r}"
                    if self.config.api_key_env else "; the endpoint wants an API key: set api_key_env")
        elif status == 404:
            hint = "; check base_url (it usually ends in /v1) and that the server serves this model"
        elif status in (400, 422):
            hint = f"; check that the endpoint accepts guided mode {self.config.guided!r}"
        body = error.body if error.body is not None else error.message
        return f"{self._where()} refused the request with HTTP {status}: {str(body)[:300]}{hint}"
