"""python -m xverse_engine.serve: an OpenAI-compatible HTTP server, and the model's web demo page at /.

Examples:
  python -m xverse_engine.serve                                     # the embedded tiny model, on CPU
  python -m xverse_engine.serve --model /ckpt/XVERSE-MoE-A4.2B-Chat --port 8000 --api-key secret
  python -m xverse_engine.serve --model_path /ckpt/XVERSE-MoE-A4.2B --tokenizer_path /ckpt/XVERSE-MoE-A4.2B \\
      --port 5005                                                   # the release demo's own flags

Then open http://127.0.0.1:8000/ in a browser, or:
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
      -d '{"model": "tiny-xverse-moe", "prompt": "The capital of France is", "max_tokens": 32}'
"""
import argparse
import functools
import logging
import os
import signal
import socket
import sys

logger = logging.getLogger("xverse_engine.serve")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m xverse_engine.serve",
        description="Serve an XVERSE model over the OpenAI HTTP API (/v1/completions, /v1/chat/completions, "
                    "/v1/models), with /health, /metrics (Prometheus) and a chat page at /. With no --model, "
                    "serves the tiny model embedded in the package.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one, printed at start)")
    s.add_argument("--served-model-name", default=None,
                   help="the model name clients send (default: the checkpoint directory's name)")
    s.add_argument("--api-key", default=os.environ.get("XVERSE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $XVERSE_API_KEY, else off)")
    s.add_argument("--max-waiting-requests", type=int, default=512,
                   help="requests allowed to wait for a batch slot; more are refused with 503 (default 512)")
    s.add_argument("--stream-interval", type=int, default=1,
                   help="stream every N tokens (the first at once): fewer, larger SSE chunks leave the engine more "
                        "of the CPU under heavy load; the text is the same (default 1: every token)")
    s.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGINT/SIGTERM, seconds to let requests in flight finish before aborting them")
    s.add_argument("--engine-in-thread", action="store_true",
                   help="for debugging: run the engine on a thread of the server process (one process to attach a "
                        "debugger or profiler to) instead of its own process; slower under load, since the HTTP "
                        "work then shares the engine's GIL")
    s.add_argument("--access-log", action="store_true", help="log every HTTP request")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    demo = p.add_argument_group("the release demo's flags (text_generation_demo.py)")
    demo.add_argument("--model_path", dest="model", default=None, help="same as --model")
    demo.add_argument("--tokenizer_path", default=None,
                      help="directory of tokenizer.json when it is not the checkpoint's own")
    e = p.add_argument_group("engine (as python -m xverse_engine.generate)")
    e.add_argument("--model", dest="model", default=None, help="checkpoint directory or preset name; default: the "
                   "embedded tiny model")
    e.add_argument("--device", default="auto", help="cuda, cuda:N, cpu, or auto (default)")
    e.add_argument("--dtype", default="auto", help="bfloat16, float16, float32, or auto")
    e.add_argument("--kernels", default="auto", choices=["auto", "cuda", "cpu", "torch"])
    e.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "pt", "dummy"])
    e.add_argument("--max-model-len", type=int, default=None)
    e.add_argument("--max-num-seqs", type=int, default=256)
    e.add_argument("--max-num-batched-tokens", type=int, default=None)
    e.add_argument("--num-kv-blocks", type=int, default=None)
    e.add_argument("--block-size", type=int, default=16)
    e.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    e.add_argument("--no-prefix-caching", action="store_true")
    e.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    e.add_argument("--tensor-parallel-size", type=int, default=1)
    e.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def engine_options(args, model_path: str) -> dict:
    """The Engine's arguments as a plain dict (server/engine_core.build_engine builds it, in the engine's own
    process or thread)."""
    return dict(model=model_path, tokenizer_path=args.tokenizer_path, dtype=args.dtype, device=args.device,
                kernels=args.kernels, load_format=args.load_format, max_model_len=args.max_model_len,
                max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                num_kv_blocks=args.num_kv_blocks, block_size=args.block_size,
                gpu_memory_utilization=args.gpu_memory_utilization, enable_prefix_caching=not args.no_prefix_caching,
                enforce_eager=args.enforce_eager, tensor_parallel_size=args.tensor_parallel_size, seed=args.seed)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {error.strerror}; pick another --port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def draining_server(config, on_exit_signal):
    """uvicorn's Server, except that a stop signal first makes the engine refuse new work (503) while the
    requests in flight finish within --shutdown-timeout."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            on_exit_signal()
            super().handle_exit(sig, frame)
    return DrainingServer(config)


def run(args) -> int:
    import uvicorn

    from .config import ModelConfig, resolve_model_path
    from .server import EngineLoop, EngineProcess, ServerMetrics, create_app
    from .server.engine_core import build_engine

    model_path = resolve_model_path(args.model)
    ModelConfig.from_pretrained(model_path)   # a wrong path or config fails now, not after the server is up
    if args.max_waiting_requests < 1:
        raise ValueError(f"--max-waiting-requests must be >= 1, got {args.max_waiting_requests}")
    if args.stream_interval < 1:
        raise ValueError(f"--stream-interval must be >= 1, got {args.stream_interval}")
    name = args.served_model_name or os.path.basename(os.path.normpath(model_path))
    sock = bind(args.host, args.port)

    metrics = ServerMetrics()
    server = None

    def stop_on_load_failure(error):
        if server is not None:
            server.should_exit = True

    options = engine_options(args, model_path)
    loop_options = dict(max_waiting_requests=args.max_waiting_requests, on_stats=metrics.observe_stats,
                        on_finished=metrics.observe_finished, on_step=metrics.observe_step,
                        on_load_failure=stop_on_load_failure, freeze_gc=True)   # this process is the server's own
    if args.engine_in_thread:
        loop = EngineLoop(functools.partial(build_engine, options), **loop_options)
    else:
        loop = EngineProcess(options, **loop_options)
    app = create_app(loop, metrics, name, api_key=args.api_key, stream_interval=args.stream_interval)
    config = uvicorn.Config(app, log_level=args.log_level, access_log=args.access_log,
                            timeout_graceful_shutdown=args.shutdown_timeout, timeout_keep_alive=5)
    server = draining_server(config, on_exit_signal=loop.begin_drain)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"xverse_engine.serve: listening on http://{shown}:{port} (model {name!r} from {model_path}; "
          f"the page is at /, the API under /v1)", file=sys.stderr, flush=True)
    # uvicorn re-raises the signal that stopped it once it is done; by then there is nothing left to stop.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])
    if loop.load_error is not None:
        print(f"error: the model failed to load: {loop.load_error}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import fastapi, prometheus_client, uvicorn  # noqa: F401,E401
    except ImportError as error:
        print(f"error: serving needs the [serve] extra ({error.name} is missing): "
              f"pip install 'xverse_engine[serve]'", file=sys.stderr)
        return 2
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except (ValueError, OSError) as error:
        if os.environ.get("XVERSE_DEBUG"):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
