"""An asynchronous client for any OpenAI-compatible ``/v1/completions`` server (``vllm serve``, our own
``python -m lit_align.generation.serve``, ...): one request per prompt, many in flight, bounded concurrency,
retries with exponential backoff and a per-request timeout. With ``chat=True`` it asks ``/v1/chat/completions``
instead, each prompt as one user message that the server renders with its model's chat template (a hosted chat
model's API, or a server whose model's template is not available here); a reply then has no token ids or
log-probabilities from the server (``token_ids`` is the re-tokenized text with a ``tokenizer``, else ``[]``).

It needs no HTTP library beyond the standard one: each request is a blocking ``urllib`` call run on a thread
pool of ``max_concurrency`` workers, and asyncio schedules, bounds, times out and retries them.

What comes back from the server, and how a :class:`Completion` is filled:

- ``text`` is the server's text (already cut at the stop strings by the server).
- ``token_ids``: the choice's ``token_ids`` field if present, else the ``logprobs.tokens`` when they read
  ``token_id:<id>`` (vLLM's ``return_tokens_as_token_ids``, which this client asks for unless
  ``vllm_extensions=False``). vLLM reports the tokens that completed a stop string and the end-of-sequence
  token too; with a ``tokenizer`` the ids are trimmed to the fewest that cover ``text`` (the rule of the
  ``hf`` backend). When the server gives no ids at all (plain OpenAI), ``token_ids`` is the re-tokenized
  ``text`` if a ``tokenizer`` was given (not necessarily the tokens sampled), else ``[]``.
- ``end_token_id``: the choice's ``stop_reason`` when it is a token id (vLLM's report of a stop token other than
  the EOS token it ended on, such as a chat template's end of turn), else None.
- ``logprobs`` are the server's ``token_logprobs`` for those ids, or None when the server gave no ids or no
  log-probabilities. vLLM's V1 engine returns raw log-probabilities (temperature 1), the convention of
  :mod:`lit_align.generation.base`; older engines returned temperature-scaled ones.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from lit_align.generation.base import Completion, GenerationBackend, SamplingParams, check_prompts, covering_prefix

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
TOKEN_ID_PREFIX = "token_id:"


class ServerUnreachableError(ConnectionError):
    """The server could not be reached (refused, reset, timed out) within the retries."""


class ServerRequestError(RuntimeError):
    """The server answered with an error (or an unreadable body); ``status`` is the HTTP status (0: no status)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class _Retryable(Exception):
    def __init__(self, message: str, status: int = 0, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


def _server_message(raw: bytes) -> str:
    """The error message of an OpenAI-style error body, or the body itself (shortened)."""
    text = raw.decode("utf-8", "replace")
    try:
        payload = json.loads(text)
        error = payload.get("error", payload) if isinstance(payload, dict) else payload
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        if isinstance(payload, dict) and "detail" in payload:
            return str(payload["detail"])
    except ValueError:
        pass
    return text[:500]


def parse_token_ids(choice: dict) -> list[int] | None:
    """Token ids of a completion choice: its ``token_ids`` field, or ``token_id:<id>`` logprob tokens; else None."""
    ids = choice.get("token_ids")
    if isinstance(ids, list) and all(isinstance(i, int) for i in ids):
        return list(ids)
    tokens = (choice.get("logprobs") or {}).get("tokens")
    if isinstance(tokens, list) and all(isinstance(t, str) and t.startswith(TOKEN_ID_PREFIX) for t in tokens):
        try:
            return [int(t[len(TOKEN_ID_PREFIX):]) for t in tokens]
        except ValueError:
            return None
    return None


class OpenAIBackend(GenerationBackend):
    """Generate through an OpenAI-compatible completions server, many prompts concurrently."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000/v1",
        model: str | None = None,
        api_key: str | None = None,
        max_concurrency: int = 32,
        timeout: float = 300.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        tokenizer: Any = None,
        vllm_extensions: bool = True,
        extra_body: dict | None = None,
        chat: bool = False,
    ) -> None:
        """
        Args:
            base_url: the server's API root, up to and including ``/v1``.
            model: model name sent with each request; None asks the server (``GET /models``) and takes the first.
            api_key: bearer token sent with each request; None sends none (``vllm serve`` wants one only when
                started with ``--api-key``).
            max_concurrency: most requests in flight at once.
            timeout: seconds one attempt of one request may take.
            max_retries: further attempts after a connection error, a timeout, or HTTP 408/429/5xx.
            backoff: seconds before the first retry; doubled each retry (a Retry-After header wins when longer).
            tokenizer: optional tokenizer (object, or a path/hub id/preset to load) to trim and recover token ids.
            vllm_extensions: ask for token ids with vLLM's ``return_tokens_as_token_ids`` (off for strict servers).
            extra_body: more request fields sent as they are (e.g. ``{"top_k": 20}`` for vLLM).
            chat: ask ``/chat/completions`` with each prompt as one user message (the server applies its chat
                template) instead of ``/completions``.
        """
        if max_concurrency < 1:
            raise ValueError(f"OpenAIBackend max_concurrency must be a positive integer, got {max_concurrency!r}")
        if timeout <= 0:
            raise ValueError(f"OpenAIBackend timeout must be positive seconds, got {timeout!r}")
        if max_retries < 0:
            raise ValueError(f"OpenAIBackend max_retries must be >= 0, got {max_retries!r}")
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"OpenAIBackend base_url must start with http:// or https://, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key
        self.max_concurrency = max_concurrency
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.backoff = float(backoff)
        if isinstance(tokenizer, str):
            from lit_align.models import load_tokenizer

            tokenizer = load_tokenizer(tokenizer)
        self.tokenizer = tokenizer
        self.vllm_extensions = vllm_extensions
        self.extra_body = dict(extra_body or {})
        self.chat = chat
        self.max_in_flight = 0
        """The most requests that were in flight at once during the last :meth:`generate` call."""
        self._in_flight = 0

    # ---------------------------------------------------------------- public API
    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[Completion]]:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.agenerate(prompts, params))
        # Called from inside an event loop (a notebook): run ours on a helper thread.
        with ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(asyncio.run, self.agenerate(prompts, params)).result()

    async def agenerate(self, prompts: list[str], params: SamplingParams) -> list[list[Completion]]:
        """The asynchronous form of :meth:`generate`."""
        prompts = check_prompts(prompts)
        if not prompts:
            return []
        self.max_in_flight = 0
        pool = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="lit_align-openai")
        try:
            model = self.model or await self._first_model(pool)
            limit = asyncio.Semaphore(self.max_concurrency)

            async def one(prompt: str) -> list[Completion]:
                async with limit:
                    path = "/chat/completions" if self.chat else "/completions"
                    payload = await self._request(pool, "POST", path, self.request_body(prompt, params, model))
                return self.parse_completions(payload, params)

            return list(await asyncio.gather(*(one(p) for p in prompts)))
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def request_body(self, prompt: str, params: SamplingParams, model: str) -> dict:
        """The JSON body of the request for one prompt: a completions request, or with ``chat`` a chat completions
        request asking the prompt as one user message (no log-probabilities or token ids asked for)."""
        body: dict[str, Any] = {"model": model, "max_tokens": params.max_new_tokens, "temperature": params.temperature,
                                "top_p": params.top_p, "n": params.n}
        if self.chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body.update(prompt=prompt, logprobs=1)
            if self.vllm_extensions:
                body["return_tokens_as_token_ids"] = True
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        body.update(self.extra_body)
        return body

    def parse_completions(self, payload: dict, params: SamplingParams) -> list[Completion]:
        """The ``params.n`` completions of one response, in choice order."""
        choices = payload.get("choices") if isinstance(payload, dict) else None
        if not isinstance(choices, list) or len(choices) != params.n:
            got = len(choices) if isinstance(choices, list) else "no"
            raise ServerRequestError(f"server at {self.base_url} returned {got} choices for a request of n={params.n}")
        return [self._completion(c) for c in sorted(choices, key=lambda c: c.get("index", 0))]

    # ---------------------------------------------------------------- parsing
    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _completion(self, choice: dict) -> Completion:
        completion = self._choice(choice)
        stop_reason = choice.get("stop_reason")
        if isinstance(stop_reason, int) and not isinstance(stop_reason, bool) and completion.finish_reason == "stop":
            completion.end_token_id = stop_reason
        return completion

    def _choice(self, choice: dict) -> Completion:
        if self.chat:  # a chat reply: its text only
            message = choice.get("message")
            text = message.get("content") if isinstance(message, dict) else None
            if not isinstance(text, str):
                raise ServerRequestError(f"server at {self.base_url} returned a chat choice without message content: "
                                         f"{str(choice)[:200]}")
            finish = "length" if choice.get("finish_reason") == "length" else "stop"
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] if self.tokenizer is not None else []
            return Completion(text=text, token_ids=list(ids), logprobs=None, finish_reason=finish)
        text = choice.get("text")
        if not isinstance(text, str):
            raise ServerRequestError(f"server at {self.base_url} returned a choice without text: {str(choice)[:200]}")
        finish = "length" if choice.get("finish_reason") == "length" else "stop"
        ids = parse_token_ids(choice)
        token_logprobs = (choice.get("logprobs") or {}).get("token_logprobs")
        if ids is None:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] if self.tokenizer is not None else []
            return Completion(text=text, token_ids=list(ids), logprobs=None, finish_reason=finish)
        logprobs = None
        if isinstance(token_logprobs, list) and len(token_logprobs) == len(ids) and None not in token_logprobs:
            logprobs = [float(x) for x in token_logprobs]
        if self.tokenizer is not None and finish == "stop":
            kept = covering_prefix(ids, self._decode, text)
            ids = ids[:kept]
            logprobs = logprobs[:kept] if logprobs is not None else None
        return Completion(text=text, token_ids=ids, logprobs=logprobs, finish_reason=finish)

    # ---------------------------------------------------------------- transport
    async def _first_model(self, pool: ThreadPoolExecutor) -> str:
        payload = await self._request(pool, "GET", "/models", None)
        data = payload.get("data") if isinstance(payload, dict) else None
        if not data or not isinstance(data[0], dict) or "id" not in data[0]:
            raise ServerRequestError(f"server at {self.base_url} lists no model at /models; pass model=... explicitly")
        self.model = str(data[0]["id"])
        return self.model

    async def _request(self, pool: ThreadPoolExecutor, method: str, path: str, body: dict | None) -> dict:
        url = self.base_url + path
        loop = asyncio.get_running_loop()
        last: _Retryable | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                delay = self.backoff * 2 ** (attempt - 1)
                if last is not None and last.retry_after is not None:
                    delay = max(delay, min(last.retry_after, 60.0))
                await asyncio.sleep(delay)
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            try:
                call = loop.run_in_executor(pool, self._http, method, url, body)
                return await asyncio.wait_for(call, timeout=self.timeout + 1.0)
            except asyncio.TimeoutError:
                last = _Retryable(f"no answer within {self.timeout:g} s")
            except _Retryable as err:
                last = err
            finally:
                self._in_flight -= 1
        assert last is not None
        attempts = f"{self.max_retries + 1} attempt{'s' if self.max_retries else ''}"
        if last.status:
            raise ServerRequestError(f"{method} {url} failed after {attempts}: HTTP {last.status}: {last}", last.status)
        raise ServerUnreachableError(
            f"OpenAI-compatible server at {self.base_url} is unreachable ({method} {url} failed after {attempts}: "
            f"{last}). Start one (`vllm serve MODEL` or `python -m lit_align.generation.serve --model DIR --port N`) "
            "or fix base_url."
        )

    def _http(self, method: str, url: str, body: dict | None) -> dict:
        """One blocking HTTP exchange; raises _Retryable for what deserves another attempt."""
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        started = time.monotonic()
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            message = _server_message(err.read())
            if err.code in RETRY_STATUSES:
                retry_after = err.headers.get("Retry-After") if err.headers else None
                try:
                    seconds = float(retry_after) if retry_after is not None else None
                except ValueError:
                    seconds = None
                raise _Retryable(message, status=err.code, retry_after=seconds) from None
            raise ServerRequestError(f"{method} {url} returned HTTP {err.code}: {message}", err.code) from None
        except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError, http.client.HTTPException) as err:
            reason = getattr(err, "reason", err)
            if isinstance(reason, (socket.timeout, TimeoutError)):
                raise _Retryable(f"no answer within {time.monotonic() - started:.1f} s (timeout {self.timeout:g} s)") from None
            raise _Retryable(f"{type(reason).__name__}: {reason}") from None
        try:
            return json.loads(raw)
        except ValueError:
            raise ServerRequestError(f"{method} {url} returned a body that is not JSON: {raw[:200]!r}") from None

