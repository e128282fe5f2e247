"""A real `python -m xverse_engine.serve` on 127.0.0.1 (a free port the server picks itself), for the serve tests:
start, wait until healthy, read /metrics, raw HTTP helpers, stop. Every wait has a deadline."""
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from prometheus_client.parser import text_string_to_metric_families

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = "127.0.0.1"
# The same thread count as the test process (conftest), so server and offline engine compute alike.
SERVER_ENV = {"OMP_NUM_THREADS": "2", "PYTHONIOENCODING": "utf-8", "PYTHONPATH": ROOT}


def http_request(port: int, method: str, path: str, body=None, headers=None, timeout: float = 120.0):
    """(status, parsed JSON or text) of one request; body: dict (sent as JSON), bytes, or None."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        data = response.read().decode("utf-8")
        kind = response.getheader("Content-Type", "")
        return response.status, (json.loads(data) if "json" in kind else data)
    finally:
        conn.close()


class ServerProcess:
    def __init__(self, *args, start_timeout: float = 180.0):
        env = {**os.environ, **SERVER_ENV}
        env.pop("XVERSE_API_KEY", None)
        self.args = ["--port", "0", "--device", "cpu", *args]
        self.proc = subprocess.Popen([sys.executable, "-m", "xverse_engine.serve", *self.args], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     encoding="utf-8", errors="replace")
        self.lines = []
        self._reader = threading.Thread(target=self._read_output, daemon=True)
        self._reader.start()
        self.port = self._wait_for_port(start_timeout)
        self.url = f"http://{HOST}:{self.port}"
        self.wait_healthy(start_timeout)

    def _read_output(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def log(self) -> str:
        return "\n".join(self.lines[-60:])

    def _wait_for_port(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        marker = f"listening on http://{HOST}:"
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if marker in line:
                    return int(line.split(marker, 1)[1].split()[0].strip("/"))
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log}")
            time.sleep(0.1)
        raise TimeoutError(f"the server did not say where it listens within {timeout}s:\n{self.log}")

    def wait_healthy(self, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.request("GET", "/health")[0] == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log}")
            time.sleep(0.2)
        raise TimeoutError(f"/health did not answer 200 within {timeout}s:\n{self.log}")

    # ---- HTTP ------------------------------------------------------------------------------------------
    def request(self, method: str, path: str, body=None, headers=None, timeout: float = 120.0):
        return http_request(self.port, method, path, body, headers, timeout)

    def open_stream(self, path: str, body: dict, headers=None, timeout: float = 60.0) -> socket.socket:
        """Sends a request on a raw socket and returns it unread, so a test can read a little and hang up."""
        sock = socket.create_connection((HOST, self.port), timeout=timeout)
        payload = json.dumps(body).encode()
        head = [f"POST {path} HTTP/1.1", f"Host: {HOST}:{self.port}", "Content-Type: application/json",
                f"Content-Length: {len(payload)}"] + [f"{k}: {v}" for k, v in (headers or {}).items()]
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
        return sock

    @staticmethod
    def read_until(sock: socket.socket, marker: bytes, limit: int = 1 << 20) -> bytes:
        data = b""
        while marker not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            if len(data) > limit:
                raise AssertionError(f"no {marker!r} in the first {limit} bytes")
        return data

    # ---- metrics ---------------------------------------------------------------------------------------
    def metrics(self) -> dict:
        """{sample name with labels: value} from /metrics."""
        status, text = self.request("GET", "/metrics")
        assert status == 200, text
        values = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return values

    def wait_for(self, condition, timeout: float = 60.0, what: str = "the condition"):
        """Polls /metrics until condition(metrics) holds; returns those metrics."""
        deadline = time.monotonic() + timeout
        while True:
            values = self.metrics()
            if condition(values):
                return values
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} did not happen within {timeout}s; metrics: "
                                     f"{ {k: v for k, v in values.items() if k.startswith('xverse_')} }")
            time.sleep(0.1)

    def wait_idle(self, timeout: float = 60.0) -> dict:
        """No request running or waiting, and no KV block held."""
        return self.wait_for(lambda m: m["xverse_num_requests_running"] == 0 and m["xverse_num_requests_waiting"] == 0
                             and m["xverse_kv_cache_blocks_used"] == 0, timeout, "an idle engine")

    # ---- stop ------------------------------------------------------------------------------------------
    def send_signal(self, sig=signal.SIGTERM):
        self.proc.send_signal(sig)

    def stop(self, sig=signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(5)
        return self.proc.returncode


def finished_count(metrics: dict, reason: str) -> float:
    return metrics.get(f"xverse_requests_finished_total{{finish_reason={reason}}}", 0.0)
