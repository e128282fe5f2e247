"""The engine in its own process (EngineProcess, the server's default): what comes through the pipe equals offline
generation; an abort frees the request's KV blocks; a core that dies fails the requests in flight with an error and
leaves the server answering 503 "failed", never hanging; a core that cannot load says why; the waiting queue is
bounded (ServerBusy); and the core never outlives the server."""
import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the [test] extra installs the [serve] extra")

from serve_process import ROOT, SERVER_ENV, ServerProcess  # noqa: E402
from xverse_engine import Engine, SamplingParams  # noqa: E402
from xverse_engine.config import resolve_model_path  # noqa: E402
from xverse_engine.server import EngineProcess, NotReady, RequestGroup, ServerBusy  # noqa: E402
from xverse_engine.server.mailbox import Delta  # noqa: E402

PROMPTS = ["北京的景点：", "The capital of France is", "Hello", "深圳的景点："]
TINY = resolve_model_path(None)
OPTIONS = dict(model=TINY, device="cpu", kernels="cpu", num_kv_blocks=128, block_size=8, max_model_len=256)


def greedy(max_tokens=24, **extra):
    return SamplingParams(max_new_tokens=max_tokens, temperature=0, **extra)


class CoreOnALoop:
    """An EngineProcess started on an asyncio loop of its own thread, as the server's lifespan starts it."""

    def __init__(self, options=OPTIONS, **kwargs):
        self.finished, self.load_failures = [], []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.core = EngineProcess(options, on_finished=self.finished.append,
                                  on_load_failure=self.load_failures.append, **kwargs)
        self.run(self._start())

    async def _start(self):
        self.core.start()

    def run(self, coroutine, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def submit(self, inputs, wake_every=1) -> RequestGroup:
        async def submit():
            group = RequestGroup(inputs, asyncio.get_running_loop(), wake_every)
            self.core.submit(group)
            return group
        return self.run(submit())

    def collect(self, group: RequestGroup, timeout: float = 120) -> list:
        """Every delta of a group, merged per choice, until all its choices finished."""
        async def collect():
            results = [Delta() for _ in range(len(group))]
            while not group.finished:
                for index, delta in await group.next():
                    results[index].merge(delta)
            return results
        return self.run(collect(), timeout)

    def first_tokens(self, group: RequestGroup) -> list:
        async def first():
            return await group.next()
        return self.run(first())

    def abort(self, group: RequestGroup):
        async def abort():
            self.core.abort(group)
        self.run(abort())

    def wait_stats(self, condition, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while not condition(stats := self.core.stats()):
            assert time.monotonic() < deadline, f"the engine's stats never got there: {stats}"
            time.sleep(0.02)
        return stats

    def close(self):
        self.core.shutdown()   # off the loop, as the lifespan calls it
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


@pytest.fixture(scope="module")
def offline():
    return Engine(show_progress=False, **{k: v for k, v in OPTIONS.items() if k != "model"})


@pytest.fixture(scope="module")
def core():
    process = CoreOnALoop()
    assert process.core.wait_ready(120), process.core.load_error
    yield process
    process.close()
    assert not process.core._process.is_alive(), "shutdown must stop the engine process"


def idle(stats: dict) -> bool:
    return stats["running"] == stats["waiting"] == 0 and stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_outputs_through_the_process_equal_offline_greedy(core, offline):
    """Text is decoded on the API side from the token ids, except for a request with stop strings, whose text
    the engine's core decodes (to stop on time): both equal offline."""
    expected = offline.generate(PROMPTS, greedy())
    with_logprobs = offline.generate([PROMPTS[1]], greedy(8, logprobs=2))[0]
    with_stop = offline.generate([PROMPTS[1]], greedy(24, stop=[" is", "Tower"]))[0]
    assert with_stop.finish_reason == "stop", "the stop string must be reached for this to say anything"
    group = core.submit([(out.prompt_token_ids, greedy()) for out in expected]
                        + [(with_logprobs.prompt_token_ids, greedy(8, logprobs=2)),
                           (with_stop.prompt_token_ids, greedy(24, stop=[" is", "Tower"]))])
    results = core.collect(group)
    assert len(results) == len(expected) + 2
    for got, want in zip(results, expected + [with_logprobs, with_stop]):
        assert got.finished and got.finish_reason == want.finish_reason
        assert (got.text, got.token_ids) == (want.text, want.token_ids)
        assert got.metrics.num_output_tokens == len(want.token_ids)
    logprobs = results[-2].logprobs
    assert [lp.token_id for lp in logprobs] == with_logprobs.token_ids
    assert [lp.logprob for lp in logprobs] == pytest.approx([lp.logprob for lp in with_logprobs.logprobs])
    assert all(len(lp.top) == 2 for lp in logprobs)
    info = core.core.engine   # what the HTTP handlers read, loaded on this side
    assert (info.max_model_len, info.config.vocab_size) == (offline.max_model_len, offline.config.vocab_size)
    assert info.tokenizer.encode(PROMPTS[1]) == expected[1].prompt_token_ids
    assert info.generation_config == offline.generation_config
    assert core.wait_stats(idle)


def test_a_request_the_engine_refuses_fails_alone(core, offline):
    (expected,) = offline.generate([PROMPTS[2]], greedy(6))
    group = core.submit([([offline.config.vocab_size + 5], greedy(6)), (expected.prompt_token_ids, greedy(6))])
    bad, good = core.collect(group)
    assert bad.finish_reason == "error" and "outside the vocabulary" in bad.error
    assert good.text == expected.text


def test_abort_frees_the_blocks_at_once(core):
    before = len(core.finished)
    group = core.submit([([11, 12, 13], greedy(200, ignore_eos=True)), ([14, 15], greedy(200, ignore_eos=True))])
    assert core.first_tokens(group), "the requests must be running before the abort"
    core.abort(group)
    results = core.collect(group, timeout=30)
    assert [d.finish_reason for d in results] == ["abort", "abort"]
    assert all(len(d.token_ids) < 200 for d in results)
    stats = core.wait_stats(idle, timeout=30)
    assert stats["running"] == 0 and stats["kv_blocks_free"] == stats["kv_blocks_total"]
    assert [d.finish_reason for d in core.finished[before:]] == ["abort", "abort"]   # the metrics saw them


def test_a_full_waiting_queue_raises_server_busy():
    process = CoreOnALoop({**OPTIONS, "max_num_seqs": 1}, max_waiting_requests=1)
    try:
        assert process.core.wait_ready(120)
        long = ([11, 12, 13], greedy(500, ignore_eos=True))
        running = process.submit([long])
        process.wait_stats(lambda s: s["running"] == 1 and s["waiting"] == 0)
        waiting = process.submit([long])            # the one waiting slot
        with pytest.raises(ServerBusy, match="busy"):
            process.submit([long])
        process.wait_stats(lambda s: s["waiting"] == 1)
        with pytest.raises(ServerBusy):             # still full once the core has it
            process.submit([long])
        for group in (waiting, running):
            process.abort(group)
            assert [d.finish_reason for d in process.collect(group, timeout=30)] == ["abort"]
        process.wait_stats(idle, timeout=30)
        assert process.collect(process.submit([([11], greedy(2))]))[0].finish_reason == "length"
    finally:
        process.close()


def test_a_core_that_dies_fails_the_requests_in_flight_and_reports_failed():
    process = CoreOnALoop()
    try:
        assert process.core.wait_ready(120)
        group = process.submit([([11, 12, 13], greedy(500, ignore_eos=True))])
        assert process.first_tokens(group)
        os.kill(process.core.pid, signal.SIGKILL)
        (result,) = process.collect(group, timeout=30)   # ends, instead of waiting forever
        assert result.finish_reason == "error" and "exited unexpectedly" in result.error
        assert process.core.state() == "failed" and not process.core.ready
        with pytest.raises(NotReady, match="failed"):
            process.submit([([11], greedy(2))])
    finally:
        process.close()


def test_a_load_failure_reports_the_core_message():
    process = CoreOnALoop({**OPTIONS, "max_model_len": 1_000_000})
    try:
        assert process.core.wait_ready(120)
        assert process.core.state() == "failed"
        (error,) = process.load_failures
        assert "max_model_len=1000000 exceeds" in str(error)
        with pytest.raises(NotReady, match="failed"):
            process.submit([([11], greedy(2))])
    finally:
        process.close()
    assert not process.core._process.is_alive()


# ---- through the real server ------------------------------------------------------------------------------------
def core_pid(server: ServerProcess) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in list(server.lines):
            if found := re.search(r"the engine runs in process (\d+)", line):
                return int(found.group(1))
        time.sleep(0.1)
    raise AssertionError(f"the server did not say where its engine runs:\n{server.log}")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" not in f.read().lower()
    except FileNotFoundError:
        return False


def test_the_server_answers_503_failed_when_its_engine_dies():
    server = ServerProcess()
    try:
        pid = core_pid(server)
        sock = server.open_stream("/v1/completions", {"prompt": "Hello", "max_tokens": 1900, "ignore_eos": True,
                                                      "stream": True}, timeout=60)
        assert server.read_until(sock, b"data: ").startswith(b"HTTP/1.1 200")
        os.kill(pid, signal.SIGKILL)
        body = server.read_until(sock, b"data: [DONE]").decode()
        sock.close()
        assert "exited unexpectedly" in body and '"engine_error"' in body
        status, error = server.request("GET", "/health")
        assert status == 503 and "failed" in error["error"]["message"]
        status, error = server.request("POST", "/v1/completions", {"prompt": "Hello", "max_tokens": 2})
        assert status == 503 and error["error"]["code"] == "not_ready"
    finally:
        assert server.stop() == 0, server.log


def test_the_engine_process_never_outlives_the_server():
    server = ServerProcess()
    pid = core_pid(server)
    assert alive(pid)
    server.proc.kill()        # no shutdown at all: the core sees its pipe close and exits
    server.proc.wait(30)
    deadline = time.monotonic() + 30
    while alive(pid):
        assert time.monotonic() < deadline, f"the engine process {pid} outlived the killed server"
        time.sleep(0.1)


def test_a_model_that_fails_to_load_stops_the_server_with_the_core_message():
    result = subprocess.run([sys.executable, "-m", "xverse_engine.serve", "--port", "0", "--device", "cpu",
                             "--max-model-len", "1000000"], cwd=ROOT, env={**os.environ, **SERVER_ENV},
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 1, result.stderr
    assert "error: the model failed to load: max_model_len=1000000 exceeds" in result.stderr


def test_engine_in_thread_serves_the_same_answers():
    (expected,) = Engine(device="cpu", show_progress=False).generate([PROMPTS[1]], greedy(8))
    server = ServerProcess("--engine-in-thread")
    try:
        assert not any("the engine runs in process" in line for line in server.lines)
        status, body = server.request("POST", "/v1/completions", {"prompt": PROMPTS[1], "max_tokens": 8,
                                                                  "temperature": 0})
        assert status == 200 and body["choices"][0]["text"] == expected.text
    finally:
        assert server.stop() == 0, server.log
