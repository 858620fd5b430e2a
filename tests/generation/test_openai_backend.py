"""The openai backend against a real server process (``python -m lit_align.generation.serve``) on loopback,
plus its retry and timeout policy against a scripted stdlib server."""

import asyncio
import contextlib
import json
import queue
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lit_align.generation import HFBackend, OpenAIBackend, SamplingParams, ServerRequestError, ServerUnreachableError
from lit_align.models import load_causal_lm, load_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["def f(x):\n", "import os\nx = 1", "abc", "class A:\n    pass", "print(1)"]
STARTUP_SECONDS = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _server(model_dir, log_dir):
    """A real completions server for ``model_dir`` in its own process on a free loopback port; yields its URL."""
    log = Path(log_dir) / "serve-stderr.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lit_align.generation.serve", "--model", model_dir, "--port", "0", "--batch-size", "8",
             "--threads", "1"],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True,
        )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
        first = lines.get(timeout=STARTUP_SECONDS)
    except queue.Empty:
        first = ""
    if "http://" not in first:
        proc.kill()
        proc.wait(10)
        pytest.fail(f"server did not start: {first!r}\n{log.read_text()[-2000:]}")
    try:
        yield first.strip().split(" at ")[-1]
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def server_url(tiny_dir, tmp_path_factory):
    """A real completions server in its own process on a free loopback port, torn down after the module."""
    with _server(tiny_dir, tmp_path_factory.mktemp("serve")) as url:
        yield url


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_greedy_through_the_server_equals_the_hf_backend(server_url, tiny, tiny_dir):
    client = OpenAIBackend(server_url, max_concurrency=3, tokenizer=tiny_dir, timeout=120)
    params = SamplingParams(max_new_tokens=16, temperature=0.0, stop=["\n\n", "A"])
    remote = client.generate(PROMPTS, params)
    assert client.model == tiny_dir  # discovered through GET /v1/models
    assert client.max_in_flight == 3  # five prompts, three at a time
    local = HFBackend(*tiny, batch_size=1).generate(PROMPTS, params)
    assert any(r[0].finish_reason == "stop" for r in local) and any(r[0].finish_reason == "length" for r in local)
    for r, h in zip(remote, local):
        assert len(r) == 1
        assert (r[0].text, r[0].token_ids, r[0].finish_reason) == (h[0].text, h[0].token_ids, h[0].finish_reason)
        assert r[0].logprobs == pytest.approx(h[0].logprobs, abs=1e-4)


def test_lit_align_sample_through_the_server_writes_the_hf_backends_greedy_samples(server_url, tiny_dir, tmp_path):
    from lit_align.sample import main

    common = ["--benchmark", "task_suite", "--num-problems", "3", "--temperature", "0", "--max-new-tokens", "10"]
    assert main([*common, "--backend", "openai", "--base-url", server_url, "--output", str(tmp_path / "remote")]) == 0
    assert main([*common, "--model", tiny_dir, "--output", str(tmp_path / "local")]) == 0
    remote, local = ((tmp_path / name).read_text().splitlines() for name in ("remote", "local"))
    assert len(remote) == 3 and remote == local


def test_seeded_samples_through_the_server_are_reproducible_and_match(server_url, tiny):
    client = OpenAIBackend(server_url, max_concurrency=2)  # no tokenizer: ids come from the server
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.95, n=3, seed=11, stop=[])
    first = asyncio.run(client.agenerate(PROMPTS[:2], params))
    again = client.generate(PROMPTS[:2], params)
    assert [[c.token_ids for c in r] for r in first] == [[c.token_ids for c in r] for r in again]
    assert [len(r) for r in first] == [3, 3]
    local = HFBackend(*tiny, batch_size=8)  # the server's batch size: one request = one batch of n rows
    for prompt, completions in zip(PROMPTS[:2], first):
        expected = local.generate([prompt], params)[0]
        assert [c.token_ids for c in completions] == [c.token_ids for c in expected]
        assert [c.text for c in completions] == [c.text for c in expected]
        for c in completions:
            assert len(c.logprobs) == len(c.token_ids) == 12 and c.finish_reason == "length"


def test_a_chat_model_sampled_through_the_server_with_its_local_chat_template(server_url, tmp_path):
    """--chat-template --tokenizer DIR renders each prompt locally and sends the text to the completions endpoint: the
    samples equal sampling the same chat model in this process (the server's model has the same weights and vocabulary;
    only the chat template was added)."""
    from data_helpers import make_chat_model

    from lit_align.sample import main

    chat = make_chat_model(tmp_path / "chat-model")
    common = ["--benchmark", "task_suite", "--num-problems", "3", "--temperature", "0", "--max-new-tokens", "10",
              "--chat-template"]
    assert main([*common, "--backend", "openai", "--base-url", server_url, "--tokenizer", chat,
                 "--output", str(tmp_path / "remote")]) == 0
    assert main([*common, "--model", chat, "--output", str(tmp_path / "local")]) == 0
    remote, local = ((tmp_path / name).read_text().splitlines() for name in ("remote", "local"))
    assert len(remote) == 3 and remote == local
    assert all("reply" in json.loads(line) for line in remote)


def test_a_chat_model_sampled_through_the_servers_chat_endpoint(tmp_path_factory):
    """--chat-template through --backend openai without --tokenizer: the server's /v1/chat/completions renders each
    prompt with its model's chat template; the samples equal sampling the same chat model in this process."""
    from data_helpers import make_chat_model

    from lit_align.sample import main

    tmp_path = tmp_path_factory.mktemp("chat-endpoint")
    chat = make_chat_model(tmp_path / "chat-model")
    common = ["--benchmark", "task_suite", "--num-problems", "3", "--temperature", "0", "--max-new-tokens", "10",
              "--chat-template"]
    with _server(chat, tmp_path) as url:
        assert main([*common, "--backend", "openai", "--base-url", url, "--output", str(tmp_path / "remote")]) == 0
        client = OpenAIBackend(url, chat=True)
        [[reply]] = client.generate(["def f(x):\n"], SamplingParams(max_new_tokens=6, temperature=0.0))
    assert main([*common, "--model", chat, "--output", str(tmp_path / "local")]) == 0
    remote, local = ((tmp_path / name).read_text().splitlines() for name in ("remote", "local"))
    assert len(remote) == 3 and remote == local
    local_reply = HFBackend(load_causal_lm(chat).eval(), load_tokenizer(chat)).generate(
        ["<user>def f(x):\n<assistant>"], SamplingParams(max_new_tokens=6, temperature=0.0))[0][0]
    assert (reply.text, reply.finish_reason, reply.logprobs) == (local_reply.text, local_reply.finish_reason, None)


def test_sync_generate_works_inside_a_running_event_loop(server_url):
    client = OpenAIBackend(server_url)

    async def inside():
        return client.generate(["abc"], SamplingParams(max_new_tokens=3, temperature=0.0))

    out = asyncio.run(inside())
    assert len(out[0][0].token_ids) == 3


def test_unreachable_server_fails_fast_naming_the_url():
    url = f"http://127.0.0.1:{free_port()}/v1"
    client = OpenAIBackend(url, model="m", timeout=2.0, max_retries=1, backoff=0.1)
    started = time.monotonic()
    with pytest.raises(ServerUnreachableError, match=rf"server at {url} is unreachable .*after 2 attempts"):
        client.generate(["x"], SamplingParams(max_new_tokens=2))
    assert time.monotonic() - started < 5


def test_server_rejects_bad_requests_naming_the_field(server_url, tiny_dir):
    completions = server_url + "/completions"
    cases = [
        ({"prompt": "x", "temperature": -1}, 400, "temperature"),
        ({"prompt": "x", "n": 0}, 400, "n"),
        ({"prompt": "x", "max_tokens": 10**6}, 400, "max_tokens"),
        ({"prompt": [1, 2, 3]}, 400, "prompt"),
        ({"prompt": "x", "stream": True}, 400, "stream"),
        ({"prompt": "x", "logprobs": 5}, 400, "logprobs"),
        ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ]
    for body, status, param in cases:
        code, payload = post(completions, body)
        assert (code, payload["error"]["param"]) == (status, param), body
    code, payload = post(server_url + "/embeddings", {"input": "x"})
    assert code == 404 and "use /v1/completions or /v1/chat/completions" in payload["error"]["message"]
    chat = server_url + "/chat/completions"
    code, payload = post(chat, {"prompt": "x"})
    assert (code, payload["error"]["param"]) == (400, "messages")
    code, payload = post(chat, {"messages": [{"role": "user", "content": "x"}]})  # the tiny preset has no template
    assert code == 400 and "has no chat template" in payload["error"]["message"]
    code, payload = post(chat, {"messages": [{"role": "user", "content": "x"}], "logprobs": True})
    assert (code, payload["error"]["param"]) == (400, "logprobs")
    code, payload = post(completions, {"prompt": ["ab", "cd"], "max_tokens": 2, "temperature": 0, "n": 2, "logprobs": 1,
                                       "model": tiny_dir})
    assert code == 200 and [c["index"] for c in payload["choices"]] == [0, 1, 2, 3]
    assert payload["usage"] == {"prompt_tokens": 4, "completion_tokens": 8, "total_tokens": 12}
    client = OpenAIBackend(server_url, model="not-served", max_retries=3, backoff=5.0)
    started = time.monotonic()
    with pytest.raises(ServerRequestError, match="HTTP 404: model 'not-served' does not exist") as err:
        client.generate(["x"], SamplingParams(max_new_tokens=2))
    assert err.value.status == 404 and time.monotonic() - started < 4  # a 4xx is not retried


# ----------------------------------------------------------------- retry policy against a scripted server
class Scripted(BaseHTTPRequestHandler):
    """Answers POSTs from a script of (status, delay) steps, then successes; counts the requests."""

    def log_message(self, *args):
        pass

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        server = self.server
        with server.lock:
            step = server.script[server.calls] if server.calls < len(server.script) else (200, 0.0)
            server.calls += 1
        status, delay = step
        time.sleep(delay)
        if status == 200:
            choice = {"index": 0, "text": "ab", "finish_reason": "stop",
                      "logprobs": {"tokens": ["token_id:101", "token_id:102", "token_id:14", "token_id:2"],
                                   "token_logprobs": [-0.5, -0.25, -1.0, -2.0]}}
            raw = json.dumps({"choices": [choice]}).encode()
        else:
            raw = json.dumps({"error": {"message": f"scripted {status}"}}).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (the timeout test)
            pass


@pytest.fixture
def scripted():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    server.daemon_threads = True
    server.lock, server.calls, server.script = threading.Lock(), 0, []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def scripted_client(server, **kwargs):
    return OpenAIBackend(f"http://127.0.0.1:{server.server_address[1]}/v1", model="m", backoff=0.01, **kwargs)


def test_retries_5xx_and_429_then_succeeds(scripted):
    scripted.script = [(503, 0.0), (429, 0.0)]
    out = scripted_client(scripted, max_retries=2).generate(["p"], SamplingParams(max_new_tokens=4, stop=["\n"]))
    assert scripted.calls == 3
    # Without a tokenizer the server's ids come back as they are (vLLM includes the stop and eos tokens).
    assert out[0][0].token_ids == [101, 102, 14, 2] and out[0][0].logprobs == [-0.5, -0.25, -1.0, -2.0]


def test_gives_up_after_max_retries_with_the_status(scripted):
    scripted.script = [(500, 0.0)] * 5
    with pytest.raises(ServerRequestError, match="after 3 attempts: HTTP 500: scripted 500") as err:
        scripted_client(scripted, max_retries=2).generate(["p"], SamplingParams(max_new_tokens=4))
    assert err.value.status == 500 and scripted.calls == 3


def test_a_slow_answer_times_out(scripted):
    scripted.script = [(200, 3.0)]
    started = time.monotonic()
    with pytest.raises(ServerUnreachableError, match="no answer within"):
        scripted_client(scripted, max_retries=0, timeout=0.5).generate(["p"], SamplingParams(max_new_tokens=4))
    assert time.monotonic() - started < 2.5


def test_tokenizer_trims_stop_and_eos_tokens_the_server_reported(scripted, tiny_dir):
    tokenizer = load_tokenizer(tiny_dir)
    assert tokenizer.decode([101, 102, 14]) == "ab\n" and tokenizer.eos_token_id == 2  # byte b is id b + 4
    out = scripted_client(scripted, tokenizer=tokenizer).generate(["p"], SamplingParams(max_new_tokens=4, stop=["\n"]))
    completion = out[0][0]
    assert (completion.text, completion.token_ids, completion.logprobs) == ("ab", [101, 102], [-0.5, -0.25])
    assert completion.finish_reason == "stop"
