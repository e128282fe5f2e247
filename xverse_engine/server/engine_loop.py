"""The engine's own thread. It alone touches the Engine: it loads it, adds and aborts requests, and steps.

HTTP handlers (on the asyncio loop) hand it work through a small inbox and read each call's output from a
RequestGroup: one mailbox per engine request in which deltas merge until the handler takes them. So a slow
client never stalls the engine, no buffer holds more than one request's own output, and the inbox stays
bounded because admission is refused (ServerBusy -> 503) once too many requests wait.
"""
import logging
import threading
import time
from typing import Callable

from ..engine.engine import RequestError
from .engine_state import EngineState
from .mailbox import Delta, NotReady, RequestGroup, ServerBusy, delta_of  # noqa: F401 (re-exported)

logger = logging.getLogger("xverse_engine.serve")


class EngineLoop(EngineState):
    """Owns the Engine on one thread. `engine_factory` builds it there (so the server answers 503 while a
    large checkpoint loads). `on_stats(stats)`, `on_finished(output)` and `on_step(seconds in Engine.step)` feed
    the metrics; `on_load_failure(error)` lets the server stop."""

    def __init__(self, engine_factory: Callable, *, max_waiting_requests: int = 512, on_stats: Callable = None,
                 on_finished: Callable = None, on_step: Callable = None, on_load_failure: Callable = None,
                 freeze_gc: bool = False):
        super().__init__(max_waiting_requests=max_waiting_requests, on_stats=on_stats, on_finished=on_finished,
                         on_step=on_step, on_load_failure=on_load_failure, freeze_gc=freeze_gc)
        self._factory = engine_factory
        self._inbox = []                 # ("add" | "abort", RequestGroup); bounded by admission (_queued)
        self._tracked = {}               # engine request id -> (RequestGroup, choice index)
        self._thread = threading.Thread(target=self._run, name="xverse-engine", daemon=True)

    # ---- called from the HTTP side ---------------------------------------------------------------------
    def start(self):
        self._thread.start()

    def submit(self, group: RequestGroup):
        """Queues a group; raises NotReady or ServerBusy instead of letting the queue grow."""
        with self._cond:
            self._admit(group)
            self._inbox.append(("add", group))
            self._cond.notify()

    def abort(self, group: RequestGroup):
        """Stops what is left of a group (its client went away); idempotent."""
        with self._cond:
            if self._stopping:
                return
            self._inbox.append(("abort", group))
            self._cond.notify()

    def shutdown(self, timeout: float = 10.0):
        """Aborts whatever still runs and stops the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- the engine thread -------------------------------------------------------------------------------
    def _run(self):
        try:
            engine = self._factory()
        except BaseException as error:  # noqa: BLE001 (reported, and the server stops)
            logger.error("the engine failed to load: %s", error)
            with self._cond:
                self.load_error = error
                self._cond.notify_all()
            self._on_load_failure(error)
            return
        self.engine = engine
        self._publish_stats()
        self._become_ready()
        try:
            while self._iterate(engine):
                pass
        finally:
            engine.shutdown()   # tensor-parallel workers, if any

    def _iterate(self, engine) -> bool:
        """Takes the inbox, then runs one step if there is work; False once stopped. An error fails the requests
        in flight, not the server."""
        with self._cond:
            self._cond.wait_for(lambda: self._inbox or self._stopping or engine.has_unfinished())
            commands, self._inbox = self._inbox, []
            self._engine_waiting += self._queued   # they wait in the engine now
            self._queued = 0
            stopping = self._stopping
        try:
            for kind, group in commands:
                if kind == "add":
                    self._add(engine, group)
                else:
                    self._abort(engine, group)
            if stopping:
                for group in {group for group, _ in self._tracked.values()}:
                    self._abort(engine, group)
                self._publish_stats()
                return False
            if engine.has_unfinished():
                start = time.perf_counter()
                touched = engine.step()
                self._on_step(time.perf_counter() - start)
                self._deliver(engine, touched)
            self._publish_stats()
        except Exception as error:  # noqa: BLE001 (fail the requests in flight, keep serving)
            logger.exception("the engine failed; failing the requests in flight")
            self._fail_all(engine, f"the engine failed: {error}")
        return True

    def _add(self, engine, group: RequestGroup):
        for index, (prompt_token_ids, params) in enumerate(group.inputs):
            try:
                request_id = engine.add_request(None, params, prompt_token_ids=prompt_token_ids)
            except (RequestError, ValueError) as error:
                if group.put(index, Delta(finished=True, finish_reason="error", error=str(error))):
                    RequestGroup.wake_all([group])
                continue
            group.request_ids.append(request_id)
            self._tracked[request_id] = (group, index)

    def _deliver(self, engine, request_ids):
        """Hands each touched request's new output to its mailbox (only what is new: Engine.take_delta), then
        wakes the handlers with one thread-safe call for the whole step."""
        to_wake = []
        tracked = self._tracked
        for request_id in request_ids:
            target = tracked.get(request_id)
            if target is None:
                continue
            group, index = target
            delta = engine.take_delta(request_id)   # a finished request is released here
            if group.put(index, delta_of(delta)):
                to_wake.append(group)
            if delta.finished:
                del tracked[request_id]
                self._on_finished(delta)
        RequestGroup.wake_all(to_wake)

    def _abort(self, engine, group: RequestGroup):
        for request_id in group.request_ids:
            if request_id in self._tracked:
                engine.abort(request_id)
                self._deliver(engine, [request_id])

    def _fail_all(self, engine, message: str):
        for request_id, (group, index) in list(self._tracked.items()):
            try:
                engine.abort(request_id)
                engine.take_delta(request_id)   # releases it
            except Exception:  # noqa: BLE001 (the engine is already in trouble; the client still gets told)
                logger.exception("could not abort request %d", request_id)
            if group.put(index, Delta(finished=True, finish_reason="error", error=message)):
                RequestGroup.wake_all([group])
            del self._tracked[request_id]

    def _publish_stats(self):
        stats = self.engine.stats()
        with self._cond:
            self._engine_waiting = stats["waiting"]
        self._stats = stats
        self._on_stats(stats)
