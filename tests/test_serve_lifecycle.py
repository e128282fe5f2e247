"""The server's command line and its life: the release demo's flags, clear start-up errors, and SIGTERM/SIGINT
shutdown that stops accepting, lets requests in flight finish within the grace period (or aborts them after
it), and exits 0."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi", reason="the [test] extra installs the [serve] extra")

from serve_process import HOST, ROOT, SERVER_ENV, ServerProcess  # noqa: E402
from xverse_engine.config import ASSETS_DIR  # noqa: E402

TINY = os.path.join(ASSETS_DIR, "tiny-xverse-moe")


def read_stream(sock, data: bytes) -> list:
    """The SSE payloads of a response whose first bytes were `data`, until the server closes the connection
    (bounded by the socket timeout)."""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except OSError:
        pass
    events = data.partition(b"\r\n\r\n")[2]
    return [line[6:].decode() for line in events.split(b"\n") if line.startswith(b"data: ")]


def finish_reasons(payloads) -> list:
    return [c["choices"][0]["finish_reason"] for c in map(json.loads, payloads[:-1] if payloads[-1:] == ["[DONE]"]
                                                          else payloads) if c.get("choices")]


def test_release_demo_flags_and_served_name():
    server = ServerProcess("--model_path", TINY, "--tokenizer_path", TINY, "--served-model-name", "xverse-demo",
                           "--shutdown-timeout", "60")
    try:
        status, body = server.request("GET", "/v1/models")
        assert status == 200 and body["data"][0]["id"] == "xverse-demo"
        status, body = server.request("POST", "/v1/completions", {"model": "xverse-demo", "prompt": "Hello",
                                                                  "max_tokens": 3})
        assert status == 200 and body["model"] == "xverse-demo"

        # SIGTERM with a request in flight: it finishes, new connections are refused, the process exits 0
        sock = server.open_stream("/v1/completions", {"prompt": "The capital of France is", "max_tokens": 60,
                                                      "ignore_eos": True, "stream": True}, timeout=60)
        first = server.read_until(sock, b"data: ")
        assert first.startswith(b"HTTP/1.1 200")
        server.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        refused = False
        while time.monotonic() < deadline and not refused:
            try:
                status, _ = server.request("GET", "/health", timeout=5)
                assert status in (200, 503)
            except OSError:
                refused = True
            time.sleep(0.05)
        assert refused, "the server must stop accepting connections after SIGTERM"
        payloads = read_stream(sock, first)
        sock.close()
        assert payloads[-1] == "[DONE]" and finish_reasons(payloads)[-1] == "length", \
            "the request in flight must finish within the grace period"
        assert sum(len(json.loads(p)["choices"][0]["text"]) > 0 for p in payloads[:-1]) > 10
        server.proc.wait(60)
        assert server.proc.returncode == 0, server.log
    finally:
        server.stop()


def test_sigint_aborts_what_outlives_the_grace_period():
    server = ServerProcess("--shutdown-timeout", "1")
    try:
        sock = server.open_stream("/v1/completions", {"prompt": "Hello", "max_tokens": 1900, "ignore_eos": True,
                                                      "stream": True}, timeout=60)
        first = server.read_until(sock, b"data: ")
        assert first.startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        server.send_signal(signal.SIGINT)
        payloads = read_stream(sock, first)
        sock.close()
        server.proc.wait(60)
        assert server.proc.returncode == 0, server.log
        assert time.monotonic() - started < 30, "the grace period was 1 s"
        assert "length" not in finish_reasons(payloads), "the long request must have been cut short"
        assert "Finished server process" in server.log
    finally:
        server.stop()


def run_cli(*args, timeout=120):
    env = {**os.environ, **SERVER_ENV}
    return subprocess.run([sys.executable, "-m", "xverse_engine.serve", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_a_missing_model_fails_fast_with_a_clear_message():
    result = run_cli("--model", "/no/such/checkpoint", "--port", "0")
    assert result.returncode == 2
    assert "error:" in result.stderr and "/no/such/checkpoint" in result.stderr and "Traceback" not in result.stderr


def test_a_busy_port_fails_with_a_clear_message():
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run_cli("--port", str(port), "--device", "cpu")
    assert result.returncode == 2 and f"cannot listen on {HOST}:{port}" in result.stderr


def test_help_lists_the_release_demo_flags():
    result = run_cli("--help")
    assert result.returncode == 0
    for flag in ("--model_path", "--tokenizer_path", "--port", "--api-key", "--served-model-name",
                 "--max-waiting-requests", "--tensor-parallel-size", "--host"):
        assert flag in result.stdout



def descendants(pid) -> list:
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return children + [grandchild for child in children for grandchild in descendants(child)]


def alive(pid: str) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" not in f.read().lower()
    except FileNotFoundError:
        return False


def test_tensor_parallel_server_answers_like_offline_and_leaves_no_worker():
    from xverse_engine import Engine, SamplingParams
    (expected,) = Engine(device="cpu", show_progress=False).generate(
        ["The capital of France is"], SamplingParams(max_new_tokens=8, temperature=0.0))
    server = ServerProcess("--tensor-parallel-size", "2")
    try:
        workers = descendants(server.proc.pid)   # the engine's process, and its tensor-parallel worker
        assert len(workers) >= 2, "--tensor-parallel-size 2 must start a worker process"
        status, body = server.request("POST", "/v1/completions", {"prompt": "The capital of France is",
                                                                  "max_tokens": 8, "temperature": 0})
        assert status == 200 and body["choices"][0]["text"] == expected.text
        assert server.stop() == 0, server.log
        deadline = time.monotonic() + 30
        while any(map(alive, workers)):
            assert time.monotonic() < deadline, f"tensor-parallel workers {workers} outlived the server"
            time.sleep(0.2)
    finally:
        server.stop()


@pytest.mark.parametrize("freeze_gc", [False, True])
def test_only_a_process_of_the_servers_own_freezes_its_garbage_collector(freeze_gc):
    """`python -m xverse_engine.serve` passes freeze_gc=True: once the engine is ready, what start-up made leaves
    the collector's reach (no ~80 ms full collection mid-stream). An EngineLoop embedded in somebody else's
    program (the default) leaves that program's collector alone: freezing is process-wide."""
    import gc

    from xverse_engine import Engine
    from xverse_engine.server import EngineLoop

    gc.unfreeze()
    engine = Engine(TINY, device="cpu", kernels="cpu", num_kv_blocks=32, max_model_len=64, show_progress=False)
    loop = EngineLoop(lambda: engine, freeze_gc=freeze_gc)
    try:
        loop.start()
        assert loop.wait_ready(60)
        assert (gc.get_freeze_count() > 0) == freeze_gc
    finally:
        loop.shutdown()
        gc.unfreeze()   # the rest of the test session collects as before
