"""What the HTTP side sees of an engine wherever it runs (on a thread: EngineLoop; in a process: EngineProcess):
whether it is loading, ready, shutting down or failed, its stats after its last step, the metrics callbacks, and
admission. Admission keeps every queue bounded: requests handed to the engine but not yet taken by it, plus the
engine's own waiting queue, stay within max_waiting_requests; beyond that a call is refused (ServerBusy -> 503).
"""
import gc
import threading
from typing import Callable, Optional

from .mailbox import NotReady, RequestGroup, ServerBusy


def freeze_startup_objects():
    """Called once a process of the server's own has loaded what it keeps for its lifetime (the model, the app, the
    tokenizer): those objects move out of the garbage collector's reach, so no full collection rescans them. With
    the embedded model they are ~200k objects and a full collection over them pauses the process ~80 ms (2-core
    VM), mid-step or mid-stream; after this it takes microseconds. Process-wide, so never done to a process that
    merely embeds the server (freeze_gc=False, the default of EngineLoop and EngineProcess)."""
    gc.collect()
    gc.freeze()


class EngineState:
    """The state shared by both ways of running the engine; `_cond` guards it. Subclasses call _become_ready() once
    the engine has loaded, set `load_error` when it could not and `failure` when it died afterwards, keep `_queued`
    (handed over, not yet taken) and `_engine_waiting` (the engine's waiting queue) up to date, and start / stop it.
    freeze_gc: the process is the server's own (`python -m xverse_engine.serve`): once the engine is ready, its
    start-up objects are frozen out of the garbage collector (freeze_startup_objects)."""

    def __init__(self, *, max_waiting_requests: int = 512, on_stats: Callable = None, on_finished: Callable = None,
                 on_step: Callable = None, on_load_failure: Callable = None, freeze_gc: bool = False):
        if max_waiting_requests < 1:
            raise ValueError(f"max_waiting_requests must be >= 1, got {max_waiting_requests}")
        self.max_waiting_requests = max_waiting_requests
        self.freeze_gc = freeze_gc
        self._on_stats = on_stats or (lambda stats: None)
        self._on_finished = on_finished or (lambda output: None)
        self._on_step = on_step or (lambda seconds: None)
        self._on_load_failure = on_load_failure or (lambda error: None)
        self.engine = None
        self.load_error: Optional[BaseException] = None
        self.failure: Optional[str] = None   # why the engine died after it had loaded
        self._cond = threading.Condition()
        self._ready = self._draining = self._stopping = False
        self._queued = 0                     # requests handed to the engine that it has not taken yet
        self._engine_waiting = 0             # the engine's waiting queue after its last step
        self._stats = {}

    @property
    def ready(self) -> bool:
        return self._ready and self.failure is None and not self._draining and not self._stopping

    def state(self) -> str:
        if self.load_error is not None or self.failure is not None:
            return "failed"
        if self._draining or self._stopping:
            return "shutting down"
        return "ready" if self._ready else "loading"

    def stats(self) -> dict:
        """The engine's stats after its last step (running, waiting, kv blocks, ...)."""
        return dict(self._stats)

    def wait_ready(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._ready or self.load_error is not None, timeout)

    def begin_drain(self):
        """Refuse new requests; the ones in flight go on."""
        with self._cond:
            self._draining = True

    def _become_ready(self):
        """The engine has loaded: freeze what start-up made (freeze_gc), then let requests in."""
        if self.freeze_gc:
            freeze_startup_objects()
        with self._cond:
            self._ready = True
            self._cond.notify_all()

    def _admit(self, group: RequestGroup):
        """Counts a group in, or raises NotReady / ServerBusy instead of letting a queue grow. Call under _cond."""
        if not self.ready:
            raise NotReady(f"the server is {self.state()}")
        queued = self._queued + self._engine_waiting
        if queued + len(group) > self.max_waiting_requests:
            raise ServerBusy(f"the server is busy: {queued} requests are waiting (at most "
                             f"{self.max_waiting_requests}); retry later")
        self._queued += len(group)
