"""The engine core: the child process that owns the Engine when the server runs it in a process of its own (the
default; EngineProcess is the API side). The HTTP work then runs on another core in parallel instead of sharing
the engine's GIL.

Protocol over two one-way pipes (channel.py; pickled tuples; request ids are the API side's own):
  API -> core   a list of commands: ("add", [(request_id, prompt_token_ids, SamplingParams, decode), ...]),
                ("abort", [request_id, ...]), ("stop",); decode: the core hands out text too (a request with
                stop strings, which the engine decodes anyway); otherwise the API side decodes the token ids, so
                detokenizing takes nothing from the steps (as in vLLM's V1)
  core -> API   ("ready", {"model_path", "max_model_len", "generation_config", "stats"}) once loaded, or
                ("load_failed", message); then one ("step", deltas, accepted, stats, step_seconds) per loop turn
                that did anything: deltas = [(request_id, text, token_ids, logprobs, finished, finish_reason,
                error, metrics)] (text "" where the API side decodes), accepted = requests added this turn,
                step_seconds = None when no step ran.

The core blocks on the command pipe while it has nothing to run, takes every pending command before each step,
and exits when told to stop or when that pipe closes (the API process is gone), so it never outlives it.
"""
import logging
import os
import signal
import time

from .channel import Channel
from .engine_state import freeze_startup_objects

logger = logging.getLogger("xverse_engine.serve")


def build_engine(options: dict):
    """The Engine of serve's options (a plain dict, so it crosses to a spawned process): "model" (a resolved
    path), an optional "tokenizer_path" whose tokenizer replaces the checkpoint's, and Engine keyword arguments."""
    from .. import Engine
    from ..tokenizer import Tokenizer
    options = dict(options)
    model_path, tokenizer_path = options.pop("model"), options.pop("tokenizer_path", None)
    engine = Engine(model_path, show_progress=False, **options)
    if tokenizer_path and os.path.realpath(tokenizer_path) != os.path.realpath(model_path):
        tokenizer = Tokenizer(tokenizer_path)
        if tokenizer.vocab_size > engine.config.vocab_size:
            engine.shutdown()
            raise ValueError(f"--tokenizer_path {tokenizer_path} has {tokenizer.vocab_size} tokens, more than the "
                             f"model's vocab_size {engine.config.vocab_size}: is it the right one?")
        engine.tokenizer = tokenizer
    return engine


def run_engine_core(commands_conn, steps_conn, options: dict, log_level: int = logging.INFO):
    """Entry point of the spawned process: load, say ready (or why not), then serve commands until stopped.
    commands_conn / steps_conn: the reading end of the API's command pipe, the writing end of the step pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C reaches the whole group: the API side drives shutdown
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
    commands, steps = Channel(commands_conn), Channel(steps_conn)
    try:
        engine = build_engine(options)
    except BaseException as error:  # noqa: BLE001 (reported to the API side, which stops the server)
        logger.error("the engine failed to load: %s", error)
        try:
            steps.send(("load_failed", str(error) or type(error).__name__))
        except OSError:
            pass
        return
    freeze_startup_objects()
    try:
        steps.send(("ready", {"model_path": engine.model_path, "max_model_len": engine.max_model_len,
                              "generation_config": engine.generation_config, "stats": engine.stats()}))
        EngineCore(engine, commands, steps).run()
    except (EOFError, OSError):
        pass   # the API process is gone: nobody is left to serve
    finally:
        engine.shutdown()   # tensor-parallel workers, if any


class EngineCore:
    """The loop of the core process: commands in, one step, one message out."""

    def __init__(self, engine, commands: Channel, steps: Channel):
        self.engine, self.commands, self.steps = engine, commands, steps
        self.engine_ids = {}   # API request id -> engine request id
        self.api_ids = {}      # engine request id -> (API request id, whether the core decodes its text)

    def run(self):
        engine, commands, steps = self.engine, self.commands, self.steps
        while True:
            if not engine.has_unfinished():
                commands.wait()      # idle: sleep until a command comes (or the API side closes its end)
            deltas, accepted, stop = [], 0, False
            while not stop and commands.ready():
                for command in commands.recv():
                    if command[0] == "add":
                        accepted += self.add(command[1], deltas)
                    elif command[0] == "abort":
                        self.abort(command[1], deltas)
                    else:
                        stop = True
            if stop:
                self.abort(list(self.engine_ids), deltas)
                steps.send(("step", deltas, accepted, engine.stats(), None))
                return
            seconds = None
            if engine.has_unfinished():
                try:
                    start = time.perf_counter()
                    touched = engine.step()
                    seconds = time.perf_counter() - start
                    self.take(touched, deltas)
                except Exception as error:  # noqa: BLE001 (fail the requests in flight, keep serving)
                    logger.exception("the engine failed; failing the requests in flight")
                    self.fail_all(f"the engine failed: {error}", deltas)
            if deltas or accepted or seconds is not None:
                steps.send(("step", deltas, accepted, engine.stats(), seconds))

    def add(self, requests: list, deltas: list) -> int:
        for api_id, prompt_token_ids, params, decode in requests:
            try:
                engine_id = self.engine.add_request(None, params, prompt_token_ids=prompt_token_ids)
            except ValueError as error:   # RequestError included: this request fails alone
                deltas.append((api_id, "", [], [], True, "error", str(error), None))
                continue
            self.engine_ids[api_id] = engine_id
            self.api_ids[engine_id] = (api_id, decode)
        return len(requests)

    def take(self, engine_ids, deltas: list):
        """Each touched request's new output (Engine.take_delta: only what is new), as a plain tuple."""
        api_ids, take_delta = self.api_ids, self.engine.take_delta
        for engine_id in engine_ids:
            target = api_ids.get(engine_id)
            if target is None:
                continue
            api_id, decode = target
            d = take_delta(engine_id, text=decode)   # a finished request is released here
            deltas.append((api_id, d.text, d.token_ids, d.logprobs, d.finished, d.finish_reason, d.error, d.metrics))
            if d.finished:
                del api_ids[engine_id], self.engine_ids[api_id]

    def abort(self, api_ids: list, deltas: list):
        for api_id in api_ids:
            engine_id = self.engine_ids.get(api_id)
            if engine_id is not None:
                self.engine.abort(engine_id)
                self.take([engine_id], deltas)

    def fail_all(self, message: str, deltas: list):
        for api_id, engine_id in list(self.engine_ids.items()):
            try:
                self.engine.abort(engine_id)
                self.engine.take_delta(engine_id)   # releases it
            except Exception:  # noqa: BLE001 (the engine is already in trouble; the client still gets told)
                logger.exception("could not abort request %d", engine_id)
            deltas.append((api_id, "", [], [], True, "error", message, None))
        self.engine_ids.clear()
        self.api_ids.clear()
