"""What the engine's output travels in to an HTTP handler, whichever side runs the engine (a thread: EngineLoop, or
its own process: EngineProcess): one RequestGroup per HTTP call, with one mailbox per engine request in which
Deltas merge until the handler takes them, and the two refusals of admission (NotReady, ServerBusy)."""
import asyncio
import threading
from dataclasses import dataclass, field
from typing import Optional

from ..engine.outputs import RequestMetrics


class NotReady(RuntimeError):
    """The engine is still loading, failed to load, or the server is shutting down."""


class ServerBusy(RuntimeError):
    """The waiting queue is full."""


@dataclass
class Delta:
    """What one engine request produced since its handler last looked."""
    text: str = ""
    token_ids: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)      # TokenLogprob per new token, when asked for
    finished: bool = False
    finish_reason: Optional[str] = None               # "stop" | "length" | "abort" | "error"
    error: Optional[str] = None
    metrics: Optional[RequestMetrics] = None          # set on the final delta

    def merge(self, later: "Delta"):
        self.text += later.text
        self.token_ids += later.token_ids
        self.logprobs += later.logprobs
        self.finished, self.finish_reason = later.finished, later.finish_reason
        self.error, self.metrics = later.error, later.metrics


class RequestGroup:
    """The engine requests of one HTTP call (prompts x n choices) and the one wake-up its handler waits on.

    put() runs on the engine thread (or on the asyncio loop, for an engine in its own process), next() on the
    asyncio loop; a lock guards the mailboxes, and at most one wake-up is asked for until the handler has looked.
    `wake_every` tokens: the handler is woken when a choice has its first token, or this many new tokens, or
    finished (a stream's chunk size: fewer wake-ups and SSE writes per token); None wakes it only when a choice
    finished (a call that answers all at once)."""

    def __init__(self, inputs: list, loop: asyncio.AbstractEventLoop, wake_every: Optional[int] = 1):
        if wake_every is not None and wake_every < 1:
            raise ValueError(f"wake_every must be >= 1 or None, got {wake_every}")
        self.inputs = inputs                    # [(prompt_token_ids, SamplingParams)] in choice order
        self.request_ids = []                   # engine ids, filled by the engine thread
        self.wake_every = wake_every
        self._loop = loop
        self._lock = threading.Lock()
        self._event = asyncio.Event()
        self._wake_pending = False
        self._mailboxes = [None] * len(inputs)  # index -> merged Delta not yet taken
        self._started = [False] * len(inputs)   # index -> its first token was announced
        self._open = len(inputs)                # choices not yet finished, as seen by next()

    def __len__(self):
        return len(self.inputs)

    @property
    def finished(self) -> bool:
        return self._open == 0

    def put(self, index: int, delta: Delta) -> bool:
        """Leaves a delta in choice `index`'s mailbox; True if the handler needs a wake-up (wake_all)."""
        with self._lock:
            box = self._mailboxes[index]
            if box is None:
                self._mailboxes[index] = box = delta
            else:
                box.merge(delta)
            due = box.finished
            if not due and self.wake_every is not None and box.token_ids:
                due = len(box.token_ids) >= self.wake_every or not self._started[index]
                self._started[index] = True
            wake = due and not self._wake_pending
            self._wake_pending = self._wake_pending or due
        return wake

    @staticmethod
    def wake_all(groups: list, current_loop: Optional[asyncio.AbstractEventLoop] = None):
        """Wakes the handlers of these groups: one thread-safe call per event loop, not one per group (each such
        call is a system call, and a step may touch hundreds of requests). A caller running on the thread of
        `current_loop` wakes that loop's groups directly."""
        by_loop = {}
        for group in groups:
            by_loop.setdefault(group._loop, []).append(group._event)
        for loop, events in by_loop.items():
            if loop is current_loop:
                _set_all(events)
                continue
            try:
                loop.call_soon_threadsafe(_set_all, events)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass

    async def next(self) -> list:
        """Waits for news; returns [(index, Delta)] in choice order."""
        await self._event.wait()
        with self._lock:
            self._event.clear()
            self._wake_pending = False
            ready = [(i, d) for i, d in enumerate(self._mailboxes) if d is not None]
            self._mailboxes = [None] * len(self.inputs)
        self._open -= sum(1 for _, d in ready if d.finished)
        return ready


def _set_all(events: list):
    for event in events:
        event.set()


def delta_of(engine_delta) -> Delta:
    """The mailbox form of an Engine.take_delta result."""
    d = engine_delta
    return Delta(d.text, d.token_ids, d.logprobs, d.finished, d.finish_reason, d.error, d.metrics)
