"""Load generator for `python -m xverse_engine.serve`: the server's throughput and latency under load, and how
close it comes to offline Engine.generate on the same requests in the same run.

1. Offline: the N requests through Engine.generate in this process (all at once, ignore_eos, greedy), --repeats
   times with fresh prompts; the best run counts (other work on a shared machine only slows runs down).
2. The engine is freed, the server is started (same engine flags) on 127.0.0.1, and the same N requests are sent
   all at once as streaming /v1/completions: "saturation" (--repeats runs, the same prompt sets). Its output
   tokens/s over offline's is the fraction the server keeps (goal: >= 0.95), as best run over best run and as
   the median over pairs of runs on the same requests (the steadier of the two where runs are noisy). The level
   saturates the server only if more requests come than run at once (--num-prompts > --max-num-seqs): then
   requests wait for the whole run and the batch stays full, as a loaded server's does; otherwise the level is
   one burst, and its arrival over HTTP (a connection each) weighs on the ratio in proportion to the run's
   brevity.
3. Then one level per --concurrency value (fixed number of requests in flight) and per --request-rate value
   (Poisson arrivals, requests/s; "inf" sends all at once), each with fresh prompts: request throughput,
   TTFT / TPOT / end-to-end percentiles. JSON (--json) and a PNG of latency against load (--plot).

The client is a small asyncio HTTP/1.1 reader (no client library) that only takes times and keeps the raw bytes
while a level runs, and parses them (text, usage) after it, so it takes little CPU from the server when both share
a machine. On a CPU each saturation run of the server follows offline's run of the same requests, and its streamed
texts must equal offline's (greedy); --torch-threads gives both sides the same intra-op threads.

  python -m benchmarks.serve_bench --device cpu --num-prompts 256 --max-num-seqs 32 --input-len 32 \\
      --output-len 128 --torch-threads 1 --concurrency 1,4,16,64 --json out/serve.json --plot out/serve.png
  python -m benchmarks.serve_bench --model /ckpt/XVERSE-MoE-A4.2B --num-prompts 512 --input-len 512 \\
      --output-len 256 --request-rate 2,8,32,inf
"""
import argparse
import asyncio
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

from benchmarks.common import machine_info, print_table, write_json
from benchmarks.throughput import add_engine_args

HOST = "127.0.0.1"
FIRST_ID = 10   # random prompts avoid the special tokens (ids 0..5) and a little margin


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve_bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 2)[2])
    w = p.add_argument_group("workload")
    w.add_argument("--num-prompts", type=int, default=64, help="requests per level")
    w.add_argument("--input-len", type=int, default=32)
    w.add_argument("--output-len", type=int, default=64)
    w.add_argument("--concurrency", default="1,4,16,64",
                   help="comma-separated levels of requests in flight ('' for none)")
    w.add_argument("--request-rate", default="", help="comma-separated Poisson rates in requests/s; 'inf' = all at "
                   "once ('' for none)")
    w.add_argument("--repeats", type=int, default=3, help="offline and saturation runs each; the best counts (other "
                   "work on the machine only ever slows a run down)")
    w.add_argument("--timeout", type=float, default=1800, help="seconds a level may take before it is abandoned")
    add_engine_args(p, title="engine (passed to the server as well)", compare_reference=False)
    p.add_argument("--stream-interval", type=int, default=1, help="the server's --stream-interval: tokens per SSE "
                   "chunk (default 1, every token)")
    p.add_argument("--engine-in-thread", action="store_true", help="the server's --engine-in-thread: its engine on a "
                   "thread of the HTTP process instead of its own process (to compare the two)")
    p.add_argument("--torch-threads", type=int, default=None, help="intra-op threads of torch on both sides (offline "
                   "here, OMP_NUM_THREADS for the server); default: torch's own choice here, passed on to the server. "
                   "On a small CPU machine 1 leaves a core for the server's HTTP loop and the client")
    p.add_argument("--plot", default=None, metavar="PNG", help="plot latency against load")
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    args.request_rate = [float(r) for r in args.request_rate.split(",") if r.strip()]
    for name in ("num_prompts", "input_len", "output_len", "repeats", "stream_interval"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.torch_threads is not None and args.torch_threads < 1:
        p.error("--torch-threads must be >= 1")
    if any(c < 1 for c in args.concurrency) or any(r <= 0 for r in args.request_rate):
        p.error("concurrency levels must be >= 1 and request rates > 0")
    return args


def engine_flags(args) -> list:
    flags = ["--load-format", args.load_format, "--device", args.device, "--dtype", args.dtype,
             "--kernels", args.kernels, "--max-num-seqs", str(args.max_num_seqs), "--seed", str(args.seed),
             "--gpu-memory-utilization", str(args.gpu_memory_utilization),
             "--tensor-parallel-size", str(args.tensor_parallel_size)]
    for name in ("model", "max_model_len", "num_kv_blocks"):
        if getattr(args, name) is not None:
            flags += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return flags + (["--enforce-eager"] if args.enforce_eager else [])


def make_prompts(n: int, length: int, vocab: int, seed: int) -> list:
    rng = random.Random(seed)
    return [[rng.randrange(FIRST_ID, vocab) for _ in range(length)] for _ in range(n)]


# ---- offline -----------------------------------------------------------------------------------------------
class Offline:
    """Engine.generate on the benchmark's requests, in this process (greedy, ignore_eos, all at once)."""

    def __init__(self, args, warm_up_prompts: list):
        from xverse_engine import Engine, SamplingParams
        self.engine = Engine(args.model, dtype=args.dtype, device=args.device, kernels=args.kernels,
                             load_format=args.load_format, max_num_seqs=args.max_num_seqs,
                             max_model_len=args.max_model_len, num_kv_blocks=args.num_kv_blocks,
                             gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
                             tensor_parallel_size=args.tensor_parallel_size, seed=args.seed, show_progress=False)
        self.device = self.engine.device
        self.params = SamplingParams(max_new_tokens=args.output_len, temperature=0.0, ignore_eos=True)
        warm_up = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
        self.engine.generate(prompt_token_ids=warm_up_prompts, sampling_params=warm_up, use_tqdm=False)
        self._sync()

    def _sync(self):
        if self.device.type == "cuda":
            import torch
            torch.cuda.synchronize()

    def run(self, prompts: list) -> tuple:
        """One run: its summary, and the output texts (to check the server's against)."""
        start = time.perf_counter()
        outputs = self.engine.generate(prompt_token_ids=prompts, sampling_params=self.params, use_tqdm=False)
        self._sync()
        return summarize_offline(outputs, time.perf_counter() - start), [o.text for o in outputs]

    def close(self):
        """Frees the engine (the server process needs a GPU's memory); idempotent."""
        if self.engine is None:
            return
        self.engine.shutdown()   # tensor-parallel workers, if any
        self.engine = None
        gc.collect()
        if self.device.type == "cuda":
            import torch
            torch.cuda.empty_cache()


def summarize_offline(outputs, elapsed: float) -> dict:
    tokens = sum(len(o.token_ids) for o in outputs)
    return {"requests": len(outputs), "output_tokens": tokens, "elapsed_s": elapsed,
            "requests_per_s": len(outputs) / elapsed, "output_tokens_per_s": tokens / elapsed}


# ---- the server ------------------------------------------------------------------------------------------------
class Server:
    """`python -m xverse_engine.serve` on a free loopback port, until stop()."""

    def __init__(self, flags: list, start_timeout: float = 1800, torch_threads: int = None):
        env = dict(os.environ)
        if torch_threads is not None:
            env["OMP_NUM_THREADS"] = str(torch_threads)
        self.proc = subprocess.Popen([sys.executable, "-m", "xverse_engine.serve", "--host", HOST, "--port", "0",
                                      "--log-level", "warning", *flags], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, errors="replace", env=env)
        self.lines = []
        port = threading.Event()
        threading.Thread(target=self._read, args=(port,), daemon=True).start()
        if not port.wait(start_timeout) or self.port is None:
            self.stop()
            raise RuntimeError("the server did not start:\n" + "\n".join(self.lines[-30:]))
        deadline = time.monotonic() + start_timeout
        while not self.healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the server did not become healthy:\n" + "\n".join(self.lines[-30:]))
            time.sleep(0.5)

    def _read(self, port_found: threading.Event):
        self.port = None
        marker = f"listening on http://{HOST}:"
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            if marker in line and self.port is None:
                self.port = int(line.split(marker, 1)[1].split()[0])
                port_found.set()
        port_found.set()

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.port}/health", timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    def engine_step_seconds(self) -> float:
        """The server's xverse_engine_step_seconds_total: time its engine spent in Engine.step."""
        with urllib.request.urlopen(f"http://{HOST}:{self.port}/metrics", timeout=30) as response:
            for line in response.read().decode().splitlines():
                if line.startswith("xverse_engine_step_seconds_total "):
                    return float(line.split()[1])
        raise RuntimeError("the server's /metrics has no xverse_engine_step_seconds_total")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


# ---- the client ------------------------------------------------------------------------------------------------
async def stream_completion(port: int, prompt: list, max_tokens: int) -> dict:
    """One streaming /v1/completions, read as raw bytes: only its start, first-text and end times are taken while
    it runs (the client shares the CPU with the server); read_stream parses it after the level."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        status = (await reader.readline()).split()
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        if len(status) < 2 or status[1] != b"200":
            return {"error": f"HTTP {status[1:2]}: {(await reader.read())[:200]!r}"}
        first_text, raw = None, bytearray()
        while chunk := await reader.read(1 << 16):   # Connection: close, so the body ends with the connection
            if first_text is None and has_text(bytes(raw[-16:]) + chunk):
                first_text = time.perf_counter()
            raw += chunk
    finally:
        writer.close()
    return {"start": start, "first_text": first_text, "end": time.perf_counter(), "raw": bytes(raw)}


def has_text(data: bytes) -> bool:
    """Whether a completion chunk with non-empty text is in `data`."""
    at = data.find(b'"text": "')
    while at != -1:
        if data[at + 9:at + 10] not in (b'"', b""):
            return True
        at = data.find(b'"text": "', at + 1)
    return False


def read_stream(result: dict) -> dict:
    """Parses a finished stream (chunked transfer encoding carrying server-sent events): its text, its usage's
    token count, TTFT / TPOT / end-to-end latency, or its error."""
    if "error" in result:
        return result
    raw, body, at = result["raw"], [], 0
    while True:
        eol = raw.find(b"\r\n", at)
        size = int(raw[at:eol], 16) if eol > at else 0
        if size == 0:
            break
        body.append(raw[eol + 2:eol + 2 + size])
        at = eol + 2 + size + 2
    text, usage = [], None
    for event in b"".join(body).split(b"\n\n"):
        data = event[len(b"data: "):]
        if not data or data == b"[DONE]":
            continue
        payload = json.loads(data)
        if "error" in payload:
            return {"error": payload["error"]["message"]}
        text += [choice["text"] for choice in payload["choices"]]
        usage = payload.get("usage") or usage
    start, end = result["start"], result["end"]
    first = result["first_text"] or end
    tokens = usage["completion_tokens"] if usage else 0
    return {"ttft": first - start, "e2e": end - start, "tpot": (end - first) / (tokens - 1) if tokens > 1 else None,
            "output_tokens": tokens, "start": start, "end": end, "text": "".join(text)}


async def run_level(port: int, prompts: list, max_tokens: int, *, concurrency=None, rate=None, seed=0,
                    timeout=1800.0) -> list:
    """All prompts under one load: at most `concurrency` in flight, or Poisson arrivals at `rate` per second."""
    limit = asyncio.Semaphore(concurrency or len(prompts))
    rng = random.Random(seed)

    async def one(prompt, delay):
        await asyncio.sleep(delay)
        async with limit:
            return await stream_completion(port, prompt, max_tokens)

    delays, t = [], 0.0
    for _ in prompts:
        delays.append(t)
        if rate and rate != float("inf"):
            t += rng.expovariate(rate)
    # No garbage collection while the level runs: this process also holds the offline engine, and a full
    # collection over its objects (~0.1 s on a small VM) would stall every stream and the arrivals of the burst.
    gc.collect()
    gc.disable()
    try:
        results = await asyncio.wait_for(asyncio.gather(*(one(p, d) for p, d in zip(prompts, delays))), timeout)
    finally:
        gc.enable()
    return [read_stream(r) for r in results]   # parsed once all are done, so parsing takes no CPU from the server


def percentiles(values: list) -> dict:
    values = sorted(v for v in values if v is not None)
    if not values:
        return {}
    pick = lambda q: values[min(len(values) - 1, int(round(q * (len(values) - 1))))]  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "mean": statistics.fmean(values)}


def summarize_level(results: list, label: dict) -> dict:
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    duration = (max(r["end"] for r in ok) - min(r["start"] for r in ok)) if ok else float("nan")
    tokens = sum(r["output_tokens"] for r in ok)
    return {**label, "requests": len(results), "errors": len(errors), "first_error": errors[0] if errors else None,
            "duration_s": duration, "requests_per_s": len(ok) / duration, "output_tokens": tokens,
            "output_tokens_per_s": tokens / duration,
            "ttft_s": percentiles([r["ttft"] for r in ok]), "tpot_s": percentiles([r["tpot"] for r in ok]),
            "e2e_s": percentiles([r["e2e"] for r in ok])}


# ---- report ------------------------------------------------------------------------------------------------------
def print_report(payload: dict):
    off, sat = payload["offline"], payload["saturation"]
    pairs = sat["all_fraction_of_paired_offline"]
    q1, q3 = quartiles(pairs)
    print(f"\noffline Engine.generate: {off['requests']} requests, {off['output_tokens_per_s']:.1f} output tok/s, "
          f"{off['requests_per_s']:.2f} req/s")
    print(f"server at saturation:    {sat['output_tokens_per_s']:.1f} output tok/s, {sat['requests_per_s']:.2f} req/s"
          f" -> {100 * payload['saturation_fraction_of_offline']:.1f}% of offline; the engine was stepping "
          f"{100 * sat['engine_busy_fraction']:.1f}% of that time; median over {len(pairs)} pairs of runs on the same "
          f"requests: {100 * payload['saturation_fraction_median_of_pairs']:.1f}% (quartiles {100 * q1:.1f}-"
          f"{100 * q3:.1f}%); streamed texts equal to offline: "
          f"{sat['all_outputs_equal_offline']} of {sat['requests']} per run\n")
    rows = []
    for level in [sat] + payload["levels"]:
        rows.append({"load": level["load"], "rps": level["requests_per_s"], "tps": level["output_tokens_per_s"],
                     **{f"{m}_{q}": level[f"{m}_s"].get(q, float("nan")) * 1e3 for m in ("ttft", "tpot", "e2e")
                        for q in ("p50", "p99")}, "err": level["errors"]})
    print_table(rows, [("load", "load", "{}"), ("rps", "req/s", "{:.2f}"), ("tps", "out tok/s", "{:.1f}"),
                       ("ttft_p50", "TTFT p50 ms", "{:.0f}"), ("ttft_p99", "p99", "{:.0f}"),
                       ("tpot_p50", "TPOT p50 ms", "{:.1f}"), ("tpot_p99", "p99", "{:.1f}"),
                       ("e2e_p50", "e2e p50 ms", "{:.0f}"), ("e2e_p99", "p99", "{:.0f}"), ("err", "errors", "{}")])


def quartiles(values: list) -> tuple:
    """(first, third) quartile; both the value itself for a single one."""
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def in_flight(level: dict) -> float:
    """Mean requests in flight (Little's law: achieved requests/s x mean latency): one load axis for fixed
    concurrency and Poisson levels alike."""
    return level["requests_per_s"] * level["e2e_s"]["mean"]


def plot(payload: dict, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.6))
    levels = payload["levels"] + [payload["saturation"]]
    for kind, marker in (("concurrency", "o"), ("request_rate", "s"), ("saturation", "*")):
        chosen = sorted((lv for lv in levels if lv["mode"] == kind), key=in_flight)
        if not chosen:
            continue
        x = [in_flight(lv) for lv in chosen]
        for ax, metric, title in zip(axes, ("ttft_s", "tpot_s", "e2e_s"),
                                     ("time to first token", "time per output token", "end-to-end latency")):
            for q, style in (("p50", "-"), ("p99", "--")):
                ax.plot(x, [lv[metric][q] * 1e3 for lv in chosen], style, marker=marker, label=f"{q}, {kind}")
            ax.set_title(title)
            ax.set_ylabel("ms")
        axes[3].plot(x, [lv["output_tokens_per_s"] for lv in chosen], "-", marker=marker, label=kind)
        for ax in axes:
            for lv, xi in zip(chosen, x):
                y = lv["output_tokens_per_s"] if ax is axes[3] else \
                    lv[("ttft_s", "tpot_s", "e2e_s")[list(axes).index(ax)]]["p50"] * 1e3
                ax.annotate(lv["load"], (xi, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
    axes[3].axhline(payload["offline"]["output_tokens_per_s"], color="gray", linestyle=":",
                    label="offline Engine.generate")
    axes[3].set_title("output tokens/s")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("load: mean requests in flight")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[3].legend(fontsize=7)
    w, m = payload["workload"], payload["machine"]
    fig.suptitle(f"xverse_engine.serve on {m.get('gpu') or m.get('cpu')} ({m.get('cpu_count')} CPUs): "
                 f"{w['num_prompts']} requests/level, {w['input_len']} in / {w['output_len']} out tokens; "
                 f"saturation: {100 * payload['saturation_fraction_median_of_pairs']:.1f}% of offline throughput "
                 f"(median over {len(payload['saturation']['all_fraction_of_paired_offline'])} pairs of runs; best "
                 f"over best {100 * payload['saturation_fraction_of_offline']:.1f}%)",
                 fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    from xverse_engine.config import ModelConfig, resolve_model_path
    config = ModelConfig.from_pretrained(resolve_model_path(args.model))
    vocab = config.vocab_size - 300 if config.vocab_size > 400 else config.vocab_size   # not the byte tokens
    n, seed = args.num_prompts, args.seed
    # one fresh prompt set per repeat (the same sets offline and served), so no run finds another's prefix cache
    saturation_sets = [make_prompts(n, args.input_len, vocab, 1000 * (seed + 1) + r) for r in range(args.repeats)]

    saturates = n > args.max_num_seqs
    if not saturates:
        print(f"note: --num-prompts {n} <= --max-num-seqs {args.max_num_seqs}: all requests run at once and none "
              f"waits, so the saturation level measures one burst, not a server kept full (use --num-prompts "
              f"above --max-num-seqs for that)", file=sys.stderr)
    load_before = os.getloadavg()   # a shared machine: say how busy it was
    import torch
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    threads = torch.get_num_threads()   # the server gets the same (OMP_NUM_THREADS)

    print(f"offline engine ({threads} torch threads) ...", file=sys.stderr)
    offline = Offline(args, saturation_sets[0][:2])
    device = str(offline.device)
    # On a CPU both engines fit in memory, so each offline run goes just before the server's run of the same
    # requests: the pair sees the same load from whatever else shares the machine. A GPU holds one engine, so
    # there the offline runs come first and the engine is freed before the server starts.
    interleaved = offline.device.type == "cpu"
    offline_runs = [] if interleaved else [offline.run(prompts) for prompts in saturation_sets]
    if not interleaved:
        offline.close()
    print("starting the server ...", file=sys.stderr)
    server = Server(engine_flags(args) + ["--max-waiting-requests", str(max(512, 2 * n)),
                                          "--stream-interval", str(args.stream_interval)]
                    + (["--engine-in-thread"] if args.engine_in_thread else []), torch_threads=threads)
    try:
        asyncio.run(run_level(server.port, saturation_sets[0][:2], 4))   # warm-up, as offline
        print(f"offline and server at saturation (all requests at once), {args.repeats} times ...", file=sys.stderr)
        runs = []
        for r, prompts in enumerate(saturation_sets):
            if interleaved:
                offline_runs.append(offline.run(prompts))
            busy = server.engine_step_seconds()
            results = asyncio.run(run_level(server.port, prompts, args.output_len, timeout=args.timeout))
            run = summarize_level(results, {"mode": "saturation", "load": f"all {n}"})
            # the share of the wall time the engine spent stepping: what the server leaves idle
            run["engine_busy_fraction"] = (server.engine_step_seconds() - busy) / run["duration_s"]
            # greedy: every streamed text must equal offline's for the same prompt
            run["outputs_equal_offline"] = sum("error" not in res and res["text"] == text
                                               for res, text in zip(results, offline_runs[r][1]))
            run["fraction_of_paired_offline"] = run["output_tokens_per_s"] / offline_runs[r][0]["output_tokens_per_s"]
            runs.append(run)
        offline.close()
        off = [summary for summary, _ in offline_runs]
        offline_best = {**max(off, key=lambda o: o["output_tokens_per_s"]),
                        "all_output_tokens_per_s": [o["output_tokens_per_s"] for o in off], "device": device}
        saturation = {**max(runs, key=lambda r: r["output_tokens_per_s"]),
                      "all_output_tokens_per_s": [r["output_tokens_per_s"] for r in runs],
                      "all_engine_busy_fraction": [r["engine_busy_fraction"] for r in runs],
                      "all_outputs_equal_offline": [r["outputs_equal_offline"] for r in runs],
                      "all_fraction_of_paired_offline": [r["fraction_of_paired_offline"] for r in runs]}
        levels = []
        plan = [("concurrency", c) for c in args.concurrency] + [("request_rate", r) for r in args.request_rate]
        for i, (mode, value) in enumerate(plan):
            print(f"level {mode}={value} ...", file=sys.stderr)
            prompts = make_prompts(n, args.input_len, vocab, seed + 1 + i)   # fresh: no prefix-cache hits
            kwargs = {"concurrency": value} if mode == "concurrency" else {"rate": value, "seed": seed + i}
            results = asyncio.run(run_level(server.port, prompts, args.output_len, timeout=args.timeout, **kwargs))
            load = f"c={value}" if mode == "concurrency" else f"{value:g} req/s"
            levels.append(summarize_level(results, {"mode": mode, "value": value, "load": load}))
    finally:
        server.stop()
        offline.close()

    payload = {
        "benchmark": "serve_bench",
        "machine": {**machine_info(device), "cpu_count": os.cpu_count(),
                    "load_average_1_5_15min": {"before": load_before, "after": os.getloadavg()}},
        "engine": {"model": args.model or "tiny-xverse-moe (embedded)", "load_format": args.load_format,
                   "device": device, "dtype": args.dtype, "kernels": args.kernels, "max_num_seqs": args.max_num_seqs,
                   "torch_threads": {"offline": threads, "server": threads}},
        "server": {"stream_interval": args.stream_interval,
                   "engine": "a thread of the HTTP process" if args.engine_in_thread else "its own process"},
        "workload": {"num_prompts": n, "input_len": args.input_len, "output_len": args.output_len,
                     "repeats": args.repeats, "saturates": saturates,
                     "sampling": "greedy, ignore_eos", "client": "asyncio HTTP/1.1, streaming /v1/completions, raw bytes parsed after each level"},
        "offline": offline_best,
        "saturation": saturation,
        "runs": "offline and server interleaved, pair by pair" if interleaved else "offline first, then the server",
        # best server run over best offline run; and the median over pairs of (server / offline on the same requests)
        "saturation_fraction_of_offline": saturation["output_tokens_per_s"] / offline_best["output_tokens_per_s"],
        "saturation_fraction_median_of_pairs": statistics.median(saturation["all_fraction_of_paired_offline"]),
        "levels": levels,
    }
    print_report(payload)
    write_json(args.json, payload)
    if args.plot:
        plot(payload, args.plot)
    return payload


if __name__ == "__main__":
    main()
