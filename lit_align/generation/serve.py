"""A small OpenAI-compatible completions server for a Hugging Face model directory, on loopback only.

    python -m lit_align.generation.serve --model DIR --port 8000     # or --model preset:tiny

It answers ``POST /v1/completions`` and ``POST /v1/chat/completions`` (non-streaming), ``GET /v1/models`` and
``GET /health`` through the ``hf`` backend, one generation at a time (requests queue on a lock), with the standard
library's threaded HTTP server. It has no authentication, so it binds loopback addresses only. It is meant for tests and for
sampling on one machine; ``vllm serve`` is the fast choice on a GPU.

What it supports of the completions API: ``prompt`` (a string or a list of strings), ``max_tokens``,
``temperature``, ``top_p``, ``n``, ``stop``, ``seed``, ``logprobs`` (0 or 1: the sampled tokens'
log-probabilities at temperature 1; ``top_logprobs`` is null) and vLLM's ``return_tokens_as_token_ids`` and
``return_token_ids``. Streaming, ``echo``, ``suffix``, ``best_of``, penalties and ``logit_bias`` are refused
with HTTP 400 rather than ignored. A chat request's ``messages`` are rendered with the model's chat template (a model
without one refuses them) and completed with the same fields (``max_completion_tokens`` is read as ``max_tokens``;
``logprobs`` and ``tools`` are refused); each choice's ``message`` is the assistant's reply. As vLLM's, a choice's
``stop_reason`` is the id of the token that ended it when that is not the tokenizer's EOS (a chat template's end of
turn, a generation config's other end token), else null (this server does not name the stop string).
"""

from __future__ import annotations

import ipaddress
import json
import socket
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from lit_align.generation.base import SamplingParams
from lit_align.generation.hf import HFBackend
from lit_align.hints import HintingArgumentParser

MAX_BODY_BYTES = 16 * 2**20


class RequestError(Exception):
    """A request the server refuses: HTTP ``status`` and an OpenAI-style error naming the ``param`` at fault."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.status = status

    def payload(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.status}}


def _integer(body: dict, name: str, default: int | None, low: int, high: int | None = None) -> int | None:
    value = body.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise RequestError(f"{name} must be an integer {bound}, got {value!r}", name)
    return value


def _number(body: dict, name: str, default: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{name} must be a number, got {value!r}", name)
    return float(value)


class CompletionService:
    """Turns completions requests (parsed JSON) into responses with an :class:`HFBackend`; thread-safe."""

    def __init__(self, backend: HFBackend, model_name: str, max_tokens_limit: int = 4096, max_n: int = 256) -> None:
        """
        Args:
            backend: the generation backend that does the work.
            model_name: the name listed at /v1/models and accepted in the ``model`` field.
            max_tokens_limit: largest ``max_tokens`` a request may ask for.
            max_n: largest ``n`` a request may ask for.
        """
        self.backend = backend
        self.model_name = model_name
        self.max_tokens_limit = max_tokens_limit
        self.max_n = max_n
        self.created = int(time.time())
        self._lock = threading.Lock()

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "lit_align"}]}

    def parse(self, body: Any) -> tuple[list[str], SamplingParams, dict]:
        """Validate a request body: (prompts, sampling parameters, output options)."""
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise RequestError(f"model {model!r} does not exist; this server serves {self.model_name!r}", "model", 404)
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = list(prompt)
        else:
            raise RequestError("prompt must be a string or a non-empty list of strings (token-id prompts are not "
                               "supported)", "prompt")
        for name, refused in (("stream", True), ("echo", True)):
            if body.get(name) is refused:
                raise RequestError(f"{name}=true is not supported by this server", name)
        if body.get("suffix"):
            raise RequestError("suffix is not supported by this server", "suffix")
        for name in ("presence_penalty", "frequency_penalty"):
            if body.get(name) not in (None, 0, 0.0):
                raise RequestError(f"{name} is not supported by this server (only 0)", name)
        if body.get("repetition_penalty") not in (None, 1, 1.0):
            raise RequestError("repetition_penalty is not supported by this server (only 1)", "repetition_penalty")
        if body.get("top_k") not in (None, -1, 0):
            raise RequestError("top_k is not supported by this server (use top_p)", "top_k")
        if body.get("logit_bias"):
            raise RequestError("logit_bias is not supported by this server", "logit_bias")
        n = _integer(body, "n", 1, 1, self.max_n)
        best_of = body.get("best_of")
        if best_of is not None and best_of != n:
            raise RequestError("best_of is not supported by this server (leave it unset or equal to n)", "best_of")
        logprobs = _integer(body, "logprobs", None, 0, 1)
        stop = body.get("stop")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise RequestError(f"stop must be a non-empty string or a list of them, got {stop!r}", "stop")
        fields = {
            "max_new_tokens": ("max_tokens", _integer(body, "max_tokens", 16, 1, self.max_tokens_limit)),
            "temperature": ("temperature", _number(body, "temperature", 1.0)),
            "top_p": ("top_p", _number(body, "top_p", 1.0)),
            "seed": ("seed", _integer(body, "seed", None, -(2**63), 2**63 - 1)),
        }
        try:
            params = SamplingParams(n=n, stop=stop, **{key: value for key, (_, value) in fields.items()})
        except ValueError as err:  # name the request field, not the dataclass field
            message = str(err)
            param = next((name for key, (name, _) in fields.items() if f".{key} " in message), None)
            for key, (name, _) in fields.items():
                message = message.replace(f"SamplingParams.{key}", name)
            raise RequestError(message, param) from None
        options = {
            "logprobs": logprobs,
            "as_token_ids": bool(body.get("return_tokens_as_token_ids", False)),
            "token_ids": bool(body.get("return_token_ids", False)),
        }
        return prompts, params, options

    def complete(self, body: Any) -> dict:
        """The response to one completions request (raises :class:`RequestError` for a bad one)."""
        prompts, params, options = self.parse(body)
        with self._lock:
            results = self.backend.generate(prompts, params)
            prompt_tokens = sum(len(self.backend.encode_prompt(p)) for p in prompts)
        choices, completion_tokens = [], 0
        for i, completions in enumerate(results):
            for j, completion in enumerate(completions):
                completion_tokens += len(completion.token_ids)
                choice: dict[str, Any] = {"index": i * params.n + j, "text": completion.text, "logprobs": None,
                                          "finish_reason": completion.finish_reason,
                                          "stop_reason": self._stop_reason(completion)}
                if options["logprobs"] is not None:
                    choice["logprobs"] = self._logprobs(completion.token_ids, completion.logprobs, options["as_token_ids"])
                if options["token_ids"]:
                    choice["token_ids"] = list(completion.token_ids)
                choices.append(choice)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": self.model_name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }

    def chat(self, body: Any) -> dict:
        """The response to one chat completions request: its messages through the model's chat template, completed
        as :meth:`complete` completes a prompt (raises :class:`RequestError` for a bad one)."""
        from lit_align.data_modules.chat import as_conversation, render_chat_prompt
        from lit_align.data_modules.sources import DataError

        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        for name in ("logprobs", "top_logprobs", "tools", "tool_choice", "response_format"):
            if body.get(name) not in (None, False):
                raise RequestError(f"{name} is not supported by this server's chat completions", name)
        try:
            prompt = render_chat_prompt(self.backend.tokenizer, as_conversation(body.get("messages"), "messages"))
        except DataError as err:
            raise RequestError(str(err), "messages") from None
        request = {k: v for k, v in body.items() if k not in ("messages", "max_completion_tokens", "logprobs")}
        if body.get("max_completion_tokens") is not None:
            request["max_tokens"] = body["max_completion_tokens"]
        response = self.complete({**request, "prompt": prompt})
        choices = [{"index": c["index"], "message": {"role": "assistant", "content": c["text"]},
                    "finish_reason": c["finish_reason"], "stop_reason": c["stop_reason"]} for c in response["choices"]]
        return {**response, "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "choices": choices}

    def _stop_reason(self, completion) -> int | None:
        end = completion.end_token_id
        return end if end is not None and end != self.backend.tokenizer.eos_token_id else None

    def _logprobs(self, token_ids: Sequence[int], logprobs: Sequence[float] | None, as_token_ids: bool) -> dict:
        decode = self.backend.decode
        tokens = [f"token_id:{t}" if as_token_ids else decode([t]) for t in token_ids]
        offsets = [len(decode(list(token_ids[:k]))) for k in range(len(token_ids))]
        return {"tokens": tokens, "token_logprobs": list(logprobs or []), "top_logprobs": None, "text_offset": offsets}


class _Handler(BaseHTTPRequestHandler):
    server_version = "lit_align-serve/1"
    timeout = 60  # seconds a client may take to send its request

    @property
    def service(self) -> CompletionService:
        return self.server.service  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        if getattr(self.server, "verbose", False):
            super().log_message(format, *args)

    def _send(self, status: int, payload: dict) -> None:
        raw = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def _path(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/")

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self._path()
        if path == "/health":
            self._send(200, {"status": "ok"})
        elif path == "/v1/models":
            self._send(200, self.service.models())
        else:
            self._send(404, RequestError(f"no route GET {self.path}", status=404).payload())

    def do_POST(self) -> None:  # noqa: N802
        routes = {"/v1/completions": self.service.complete, "/v1/chat/completions": self.service.chat}
        answer = routes.get(self._path())
        if answer is None:
            self._send(404, RequestError(f"no route POST {self.path}; use /v1/completions or /v1/chat/completions",
                                         status=404).payload())
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._send(411, RequestError("a Content-Length header is required", status=411).payload())
            return
        if not 0 <= length <= MAX_BODY_BYTES:
            self._send(413, RequestError(f"request body over {MAX_BODY_BYTES} bytes", status=413).payload())
            return
        try:
            body = json.loads(self.rfile.read(length) or b"null")
        except ValueError as err:
            self._send(400, RequestError(f"the request body is not valid JSON: {err}").payload())
            return
        try:
            self._send(200, answer(body))
        except RequestError as err:
            self._send(err.status, err.payload())
        except Exception as err:  # the model failed: report it, keep serving
            self._send(500, RequestError(f"generation failed: {type(err).__name__}: {err}", status=500).payload())


def check_loopback(host: str) -> None:
    """Refuse any address that is not loopback: the server has no authentication."""
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror as err:
        raise ValueError(f"--host {host!r} does not resolve: {err}") from None
    if not infos or not all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos):
        raise ValueError(f"--host {host!r} is not a loopback address; this server has no authentication, so it "
                         "binds 127.0.0.1, ::1 or localhost only")


def make_server(service: CompletionService, host: str = "127.0.0.1", port: int = 0, verbose: bool = False) -> ThreadingHTTPServer:
    """A threaded HTTP server for ``service`` bound to a loopback ``host`` (port 0: a free port)."""
    check_loopback(host)
    families = {info[0] for info in socket.getaddrinfo(host, port)}
    family = socket.AF_INET if socket.AF_INET in families else socket.AF_INET6  # "localhost": prefer 127.0.0.1
    server_cls = type("LoopbackServer", (ThreadingHTTPServer,), {"address_family": family, "daemon_threads": True})
    server = server_cls((host, port), _Handler)
    server.service = service  # type: ignore[attr-defined]
    server.verbose = verbose  # type: ignore[attr-defined]
    return server


def build_service(model: str, dtype: str = "float32", device: str = "auto", batch_size: int = 16,
                  served_model_name: str | None = None, max_tokens_limit: int = 4096) -> CompletionService:
    """Load ``model`` (a directory, hub id or preset) and wrap it in a :class:`CompletionService`."""
    import torch

    from lit_align.models import load_causal_lm, load_tokenizer

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    policy = load_causal_lm(model, dtype=dtype).to(device)
    backend = HFBackend(policy, load_tokenizer(model), batch_size=batch_size)
    return CompletionService(backend, served_model_name or model, max_tokens_limit=max_tokens_limit)


def main(argv: list[str] | None = None) -> None:
    parser = HintingArgumentParser(prog="python -m lit_align.generation.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model directory, hub id or preset (e.g. preset:tiny)")
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to bind")
    parser.add_argument("--port", type=int, default=8000, help="port to bind; 0 picks a free one (printed at start)")
    parser.add_argument("--served-model-name", default=None, help="name listed at /v1/models (default: --model)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    parser.add_argument("--device", default="auto", help="torch device; auto picks cuda when available")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences decoded together")
    parser.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op CPU threads (default: torch's)")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)
    try:
        check_loopback(args.host)
    except ValueError as err:
        parser.error(str(err))
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    service = build_service(args.model, args.dtype, args.device, args.batch_size, args.served_model_name,
                            args.max_tokens_limit)
    server = make_server(service, args.host, args.port, args.verbose)
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"lit_align serve: {service.model_name} at http://{shown}:{port}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    sys.exit(main())
