"""The API side of an engine in its own process (engine_core.py is the other side): the same interface as
EngineLoop, so the app does not care which one it has.

The engine core is a spawned child (CUDA needs spawn) joined by two one-way pipes (channel.py): commands go out
on one, the core's messages come back on the other. Its per-step messages are read on the asyncio loop itself
(loop.add_reader on the pipe): the deltas go into the RequestGroup mailboxes and wake the handlers directly, with
no thread and no lock contention on this side. The text of a request without stop strings is decoded here from
its token ids (the same OutputText the engine uses), so the core's time goes to the steps. Commands (add, abort,
stop) go out through one small sender thread, so the event loop never blocks on a full pipe (and the two
processes can never both wait on each other's full buffer). Admission is bounded as with EngineLoop: requests
sent but not yet taken by the core, plus the engine's waiting queue, stay within max_waiting_requests
(ServerBusy -> 503).

If the core dies, the requests in flight end with an error and the server reports "failed" (503); a core that
fails to load reports its own message through on_load_failure.
"""
import asyncio
import atexit
import logging
import multiprocessing
import threading
from dataclasses import dataclass
from typing import Callable, Optional

from ..engine.detokenizer import OutputText
from .channel import channel_pair
from .engine_core import run_engine_core
from .engine_state import EngineState
from .mailbox import Delta, RequestGroup

logger = logging.getLogger("xverse_engine.serve")


class EngineLoadError(RuntimeError):
    """The engine core could not load the model; the message is the core's own."""


@dataclass(frozen=True)
class EngineInfo:
    """What the HTTP handlers read about an engine that runs in another process."""
    model_path: str
    config: object            # ModelConfig
    tokenizer: object         # Tokenizer, or None for a checkpoint without one
    max_model_len: int
    generation_config: dict


def load_engine_info(ready: dict, tokenizer_path: Optional[str]) -> EngineInfo:
    """The core's ready message, plus the config and tokenizer this process loads itself (for token counts and
    the vocabulary check of prompts)."""
    from ..config import ModelConfig
    from ..tokenizer import Tokenizer
    model_path = ready["model_path"]
    try:
        tokenizer = Tokenizer(tokenizer_path or model_path)
    except FileNotFoundError:
        tokenizer = None   # token ids in and out still work
    return EngineInfo(model_path, ModelConfig.from_pretrained(model_path), tokenizer, ready["max_model_len"],
                      ready["generation_config"])


class EngineProcess(EngineState):
    """Owns the engine core process. `options` are build_engine's (a plain dict: "model", "tokenizer_path" and
    Engine keyword arguments). The callbacks are EngineLoop's; here they run on the asyncio loop."""

    def __init__(self, options: dict, *, max_waiting_requests: int = 512, on_stats: Callable = None,
                 on_finished: Callable = None, on_step: Callable = None, on_load_failure: Callable = None,
                 freeze_gc: bool = False):
        super().__init__(max_waiting_requests=max_waiting_requests, on_stats=on_stats, on_finished=on_finished,
                         on_step=on_step, on_load_failure=on_load_failure, freeze_gc=freeze_gc)
        self._options = dict(options)
        self.engine: Optional[EngineInfo] = None
        self._outbox = []                    # commands for the sender thread (under _cond); bounded by admission
        self._targets = {}                   # request id -> (RequestGroup, choice index, OutputText or None when
                                             # the core decodes); event loop only
        self._next_id = 0
        self._loop = self._process = self._commands = self._steps = None
        self._closed = threading.Event()     # the core's pipe is closed and every request answered
        self._sender = threading.Thread(target=self._send_loop, name="xverse-engine-sender", daemon=True)

    # ---- called from the HTTP side ---------------------------------------------------------------------
    def start(self):
        """Spawns the core; call it on the event loop that serves the requests (the app's lifespan does)."""
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError("EngineProcess.start() must run on the asyncio loop of the HTTP handlers") from None
        context = multiprocessing.get_context("spawn")
        core_commands, self._commands = channel_pair(context)
        self._steps, core_steps = channel_pair(context)
        # not a daemon: a daemon may not have children, and tensor-parallel workers are the core's children
        self._process = context.Process(target=run_engine_core, name="xverse-engine-core",
                                        args=(core_commands.conn, core_steps.conn, self._options,
                                              logging.getLogger().getEffectiveLevel()))
        self._process.start()
        core_commands.close()   # the core's ends live in the core only, so its exit reads as end-of-file here
        core_steps.close()
        logger.info("the engine runs in process %d", self._process.pid)
        atexit.register(self._close_at_exit)   # runs before multiprocessing's exit handler joins the core
        self._loop.add_reader(self._steps.fileno(), self._on_readable)
        self._sender.start()

    @property
    def pid(self) -> Optional[int]:
        return self._process.pid if self._process is not None else None

    def submit(self, group: RequestGroup):
        """Queues a group (on the event loop); raises NotReady or ServerBusy instead of letting the queue grow."""
        with self._cond:
            self._admit(group)
            requests = []
            for index, (prompt_token_ids, params) in enumerate(group.inputs):
                request_id, self._next_id = self._next_id, self._next_id + 1
                group.request_ids.append(request_id)
                # stop strings need the engine's own decoder; any other text is decoded here, off the core (from
                # the prompt's last tokens: the decoder's context, so its first word keeps its leading space)
                decoder = None if params.stop else OutputText(self.engine.tokenizer, [],
                                                              prompt_token_ids[-OutputText.CONTEXT_TOKENS:])
                self._targets[request_id] = (group, index, decoder)
                requests.append((request_id, prompt_token_ids, params, decoder is None))
            self._outbox.append(("add", requests))
            self._cond.notify_all()

    def abort(self, group: RequestGroup):
        """Stops what is left of a group (its client went away); idempotent."""
        with self._cond:
            if self._stopping or self._closed.is_set():
                return
            live = [request_id for request_id in group.request_ids if request_id in self._targets]
            if live:
                self._outbox.append(("abort", live))
                self._cond.notify_all()

    def shutdown(self, timeout: float = 10.0):
        """Aborts whatever still runs and stops the core (called off the event loop, which delivers the aborts)."""
        with self._cond:
            self._stopping = True
            self._outbox.append(("stop",))
            self._cond.notify_all()
        if self._process is None:
            return
        self._process.join(timeout)
        if self._process.is_alive():
            logger.warning("the engine process did not stop within %.0f s; terminating it", timeout)
            self._process.terminate()
            self._process.join(5)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(5)
        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            on_loop = False
        if not on_loop and self._loop.is_running():
            self._closed.wait(timeout)   # the loop has read the core's last message and closed its pipe
        atexit.unregister(self._close_at_exit)

    # ---- the sender thread -------------------------------------------------------------------------------
    def _send_loop(self):
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._outbox or self._closed.is_set())
                    commands, self._outbox = self._outbox, []
                if self._closed.is_set():
                    return
                try:
                    self._commands.send(commands)
                except (OSError, ValueError):   # the core is gone; the reader reports it
                    return
                if commands[-1][0] == "stop":
                    return
        finally:
            self._commands.close()   # nothing more goes to the core (idempotent)

    def _close_at_exit(self):
        """An interpreter exit without shutdown(): closing our end makes the core exit, so nothing waits on it."""
        if self._commands is not None and not self._closed.is_set():
            self._commands.close()

    # ---- the event loop's reader ---------------------------------------------------------------------------
    def _on_readable(self):
        """Every message the core has sent so far; each handler is woken once for all of them."""
        to_wake = set()
        try:
            while self._steps.ready():
                message = self._steps.recv()
                if message[0] == "step":
                    self._deliver(message, to_wake)
                elif message[0] == "ready":
                    self._on_ready(message[1])
                else:
                    self._fail_to_load(EngineLoadError(message[1]))
        except (EOFError, OSError):
            self._on_core_exit(to_wake)
        RequestGroup.wake_all(to_wake, self._loop)

    def _deliver(self, message, to_wake: set):
        _, deltas, accepted, stats, seconds = message
        targets = self._targets
        for request_id, text, token_ids, logprobs, finished, finish_reason, error, metrics in deltas:
            target = targets.get(request_id)
            if target is None:
                continue
            group, index, decoder = target
            if decoder is not None:
                decoder.source += token_ids
                text = decoder.take_delta(final=finished)
            delta = Delta(text, token_ids, logprobs, finished, finish_reason, error, metrics)
            if group.put(index, delta):
                to_wake.add(group)
            if finished:
                del targets[request_id]
                if metrics is not None:
                    self._on_finished(delta)
        with self._cond:
            self._queued -= accepted
            self._engine_waiting = stats["waiting"]
        self._stats = stats
        if seconds is not None:
            self._on_step(seconds)
        self._on_stats(stats)

    def _on_ready(self, ready: dict):
        try:
            info = load_engine_info(ready, self._options.get("tokenizer_path"))
        except Exception as error:  # noqa: BLE001 (the server cannot answer without it: a load failure)
            self._fail_to_load(error)
            return
        self.engine = info
        self._stats = ready["stats"]
        self._on_stats(self._stats)
        self._become_ready()   # the core freezes its own objects (engine_core.py)

    def _fail_to_load(self, error: BaseException):
        logger.error("the engine failed to load: %s", error)
        with self._cond:
            self.load_error = error
            self._cond.notify_all()
        self._on_load_failure(error)

    def _on_core_exit(self, to_wake: set):
        """The core's pipe closed: it stopped (shutdown) or died. Every request still open gets its end."""
        self._loop.remove_reader(self._steps.fileno())
        self._steps.close()
        if not self._stopping:
            self._process.join(5)   # it is exiting: its exit code says how
            why = f"the engine process exited unexpectedly (exit code {self._process.exitcode})"
            if not self._ready and self.load_error is None:
                self._fail_to_load(EngineLoadError(why))
            elif self._ready:
                logger.error("%s; failing the requests in flight", why)
                self.failure = why
        for group, index, _ in self._targets.values():
            reason = "abort" if self._stopping else "error"
            if group.put(index, Delta(finished=True, finish_reason=reason, error=self.failure)):
                to_wake.add(group)
        self._targets.clear()
        with self._cond:
            self._closed.set()
            self._cond.notify_all()
