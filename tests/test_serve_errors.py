"""Every error of the server answers its HTTP status with OpenAI's error JSON {"error": {message, type, param,
code}}, and the server stays healthy afterwards: bad requests (400), keys (401), unknown models and paths (404),
a full waiting queue and a model still loading (503)."""
import asyncio
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the [test] extra installs the [serve] extra")

from serve_process import HOST, ServerProcess, finished_count, http_request  # noqa: E402

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG = {"prompt": "The capital of France is", "max_tokens": 1800, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def server():
    """One batch slot and one waiting slot, so the queue fills on demand; an API key."""
    process = ServerProcess("--api-key", KEY, "--max-num-seqs", "1", "--max-waiting-requests", "1")
    yield process
    assert process.stop() == 0, process.log


def assert_error(response, status, param=None, code=None, text=None):
    got_status, body = response
    assert got_status == status, body
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    if text is not None:
        assert text in error["message"], error


def completion(**fields):
    return {"model": "tiny-xverse-moe", "prompt": "Hello", "max_tokens": 2, **fields}


def chat(messages, **fields):
    return {"model": "tiny-xverse-moe", "messages": messages, "max_tokens": 2, **fields}


BAD_COMPLETIONS = [
    (completion(foo=1), "foo", "unknown parameter"),
    ({"model": "tiny-xverse-moe", "max_tokens": 2}, "prompt", "missing"),
    (completion(temperature=-0.5), "temperature", None),
    (completion(temperature=3), "temperature", None),
    (completion(top_p=0), "top_p", None),
    (completion(top_p=1.5), "top_p", None),
    (completion(max_tokens=0), "max_tokens", None),
    (completion(max_tokens="many"), "max_tokens", None),
    (completion(n=0), "n", None),
    (completion(n=1000), "n", None),
    (completion(logprobs=21), "logprobs", None),
    (completion(top_k=-2), "top_k", None),
    (completion(repetition_penalty=0), "repetition_penalty", None),
    (completion(stop=[""]), "stop", "empty"),
    (completion(presence_penalty=0.5), "presence_penalty", "not supported"),
    (completion(logit_bias={"5": 1}), "logit_bias", "not supported"),
    (completion(echo=True), "echo", "not supported"),
    (completion(stream_options={"include_usage": True}), "stream_options", "stream=true"),
    (completion(prompt=""), "prompt", "empty"),
    (completion(prompt=[]), "prompt", "empty"),
    (completion(prompt=[[1, 2], 3]), "prompt", "list"),
    (completion(prompt=[5000]), "prompt", "vocabulary"),
    (completion(prompt="word " * 2100), "prompt", "maximum context length"),
    (completion(prompt="Hello", max_tokens=2047), "prompt", "maximum context length"),
]
BAD_CHATS = [
    (chat([]), "messages", None),
    (chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]), "messages", "last message"),
    (chat([{"role": "wizard", "content": "hi"}]), "messages.0.role", None),
    (chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), None, None),
    (chat([{"role": "user", "content": "hi"}], top_logprobs=2), "top_logprobs", "logprobs=true"),
    (chat([{"role": "user", "content": "hi"}], tools=[]), "tools", "unknown parameter"),
]


@pytest.mark.parametrize("body,param,text", BAD_COMPLETIONS, ids=lambda v: None)
def test_bad_completion_requests_are_400(server, body, param, text):
    assert_error(server.request("POST", "/v1/completions", body, AUTH), 400, param=param, text=text)


@pytest.mark.parametrize("body,param,text", BAD_CHATS)
def test_bad_chat_requests_are_400(server, body, param, text):
    assert_error(server.request("POST", "/v1/chat/completions", body, AUTH), 400, param=param, text=text)


def test_too_long_prompt_has_the_context_length_code(server):
    assert_error(server.request("POST", "/v1/completions", completion(prompt="word " * 2100), AUTH), 400,
                 code="context_length_exceeded")


def test_malformed_bodies_are_400(server):
    for raw in (b"{bad json", b"\xff\xfe", b"[1, 2]", b""):
        assert_error(server.request("POST", "/v1/completions", raw, AUTH), 400)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                                     {"Authorization": KEY}])
def test_a_bad_key_is_401(server, headers):
    for method, path, body in (("POST", "/v1/completions", completion()), ("GET", "/v1/models", None),
                               ("POST", "/v1/chat/completions", chat([{"role": "user", "content": "hi"}]))):
        assert_error(server.request(method, path, body, headers), 401, code="invalid_api_key")


def test_health_metrics_and_page_need_no_key(server):
    assert server.request("GET", "/health")[0] == 200
    assert server.request("GET", "/metrics")[0] == 200
    status, page = server.request("GET", "/")
    assert status == 200 and "<title>XVERSE demo</title>" in page


def test_unknown_model_and_path_are_404(server):
    assert_error(server.request("POST", "/v1/completions", completion(model="gpt-4"), AUTH), 404, param="model",
                 code="model_not_found")
    assert_error(server.request("POST", "/v1/chat/completions",
                                chat([{"role": "user", "content": "hi"}], model="nope"), AUTH), 404,
                 code="model_not_found")
    assert_error(server.request("GET", "/v1/models/nope", None, AUTH), 404, code="model_not_found")
    assert_error(server.request("GET", "/v1/nothing-here", None, AUTH), 404)
    assert_error(server.request("GET", "/v1/completions", None, AUTH), 405)


def test_a_full_waiting_queue_is_503_and_hanging_up_frees_it(server):
    before = server.wait_idle()
    running = server.open_stream("/v1/completions", LONG, AUTH)
    assert server.read_until(running, b"data: ").startswith(b"HTTP/1.1 200")
    server.wait_for(lambda m: m["xverse_num_requests_running"] == 1, what="one running request")
    waiting = server.open_stream("/v1/completions", LONG, AUTH)   # headers come once it is queued
    assert server.read_until(waiting, b"\r\n\r\n").startswith(b"HTTP/1.1 200")
    server.wait_for(lambda m: m["xverse_num_requests_waiting"] == 1, what="one waiting request")
    assert_error(server.request("POST", "/v1/completions", completion(), AUTH), 503, code="server_busy")
    assert_error(server.request("POST", "/v1/chat/completions", chat([{"role": "user", "content": "hi"}]), AUTH),
                 503, code="server_busy")
    waiting.close()      # a queued request whose client left is dropped from the queue
    server.wait_for(lambda m: m["xverse_num_requests_waiting"] == 0, what="an empty queue")
    running.close()
    after = server.wait_idle(timeout=30)
    assert finished_count(after, "abort") - finished_count(before, "abort") == 2
    status, body = server.request("POST", "/v1/completions", completion(), AUTH)
    assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length")


def test_the_server_stays_healthy_after_all_errors(server):
    assert server.request("GET", "/health")[0] == 200
    status, body = server.request("POST", "/v1/chat/completions", chat([{"role": "user", "content": "hi"}]), AUTH)
    assert status == 200 and body["usage"]["completion_tokens"] >= 1
    assert server.proc.poll() is None


# ---- 503 while the model loads: an in-process server whose engine factory waits for the test ----------------
class InProcessServer:
    """uvicorn in a thread on a free loopback port, over an EngineLoop built by the given factory."""

    def __init__(self, factory):
        import uvicorn

        from xverse_engine.server import EngineLoop, ServerMetrics, create_app
        metrics = ServerMetrics()
        self.loop = EngineLoop(factory, max_waiting_requests=8, on_stats=metrics.observe_stats,
                               on_finished=metrics.observe_finished, on_step=metrics.observe_step)
        app = create_app(self.loop, metrics, "tiny-xverse-moe")
        self.sock = socket.socket()
        self.sock.bind((HOST, 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])),
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline, "the in-process server did not start"
            time.sleep(0.05)

    def request(self, method, path, body=None, headers=None):
        return http_request(self.port, method, path, body, headers)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(60)
        assert not self.thread.is_alive()


def test_503_while_the_model_loads_then_ready():
    from xverse_engine import Engine
    release = threading.Event()

    def slow_factory():
        assert release.wait(120), "the test never released the engine"
        return Engine(device="cpu", show_progress=False)

    server = InProcessServer(slow_factory)
    try:
        for method, path, body in (("GET", "/health", None), ("GET", "/v1/models", None),
                                   ("POST", "/v1/completions", completion())):
            assert_error(server.request(method, path, body), 503, code="not_ready", text="loading")
        assert server.request("GET", "/")[0] == 200          # the page loads and waits for the model
        release.set()
        assert server.loop.wait_ready(120)
        assert server.request("GET", "/health")[0] == 200
        status, body = server.request("POST", "/v1/completions", completion())
        assert status == 200 and body["usage"]["completion_tokens"] >= 1
    finally:
        release.set()
        server.stop()
    assert not server.loop._thread.is_alive(), "shutdown must stop the engine thread"


def test_a_model_that_fails_to_load_answers_503_failed():
    def broken_factory():
        raise OSError("no such checkpoint")

    server = InProcessServer(broken_factory)
    try:
        assert server.loop.wait_ready(30)
        assert_error(server.request("GET", "/health"), 503, code="not_ready", text="failed")
        assert_error(server.request("POST", "/v1/completions", completion()), 503, text="failed")
    finally:
        server.stop()


def test_an_engine_failure_fails_the_requests_in_flight_not_the_server():
    from xverse_engine import Engine

    class FailsOnce(Engine):
        failed = False

        def step(self):
            if not self.failed:
                self.failed = True
                raise RuntimeError("injected fault")
            return super().step()

    server = InProcessServer(lambda: FailsOnce(device="cpu", show_progress=False))
    try:
        assert server.loop.wait_ready(120)
        assert_error(server.request("POST", "/v1/completions", completion()), 500, code="engine_error",
                     text="injected fault")
        assert server.request("GET", "/health")[0] == 200
        status, body = server.request("POST", "/v1/completions", completion())
        assert status == 200 and body["usage"]["completion_tokens"] >= 1
        deadline = time.monotonic() + 30      # the stats are published right after the step that finished it
        while not (stats := server.loop.stats())["kv_blocks_free"] == stats["kv_blocks_total"]:
            assert time.monotonic() < deadline, stats
            time.sleep(0.05)
        assert stats["running"] == stats["waiting"] == 0
    finally:
        server.stop()
