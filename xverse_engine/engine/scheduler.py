"""Which sequences run in the next step, and how many of their tokens.

Continuous batching under a token budget per step: running sequences first (one token each in decode,
the next chunk of a long prompt in chunked prefill), then waiting ones first-come first-served while
the budget, max_num_seqs and free KV blocks allow. When a running sequence needs a block and none is
free, the newest running sequence is preempted: its blocks are freed and it waits to be recomputed.

Scheduling commits the step: each scheduled sequence's num_computed_tokens moves on at once, and a
sequence that samples gains a pending token (its value arrives later, see sequence.py). So the next
step can be planned before this one's sampled tokens reach the host (asynchronous scheduling).
"""
import time
from collections import deque

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


class ScheduledSequence:
    __slots__ = ("seq", "start", "num_new_tokens", "samples")

    def __init__(self, seq: Sequence, num_new_tokens: int):
        self.seq = seq
        self.start = seq.num_computed_tokens         # first position whose KV this step computes
        self.num_new_tokens = num_new_tokens
        self.samples = self.start + num_new_tokens == seq.num_tokens   # reaches the last token: draws the next


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque = deque()
        self.running: list = []
        self.preempted: list = []   # preempted since the last take_preempted() (their batch rows go back)
        self.num_preemptions = 0

    def add(self, seq: Sequence):
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence):
        """Takes a finished or aborted sequence out of the queues and frees its blocks."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)

    def take_preempted(self) -> list:
        preempted, self.preempted = self.preempted, []
        return preempted

    def _preempt(self, seq: Sequence):
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        self.preempted.append(seq)

    def _commit(self, seq: Sequence, n: int, scheduled: list):
        item = ScheduledSequence(seq, n)
        seq.num_computed_tokens += n
        if item.samples:
            seq.num_pending += 1
        scheduled.append(item)

    def schedule(self) -> list:
        budget = self.max_num_batched_tokens
        scheduled = []
        preempted = False
        bm = self.block_manager
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.num_tokens >= seq.max_tokens and not seq.in_prefill:
                i += 1       # its last token is drawn and on its way: nothing left to compute
                continue
            if seq.in_prefill:  # the next chunk of a prompt; its blocks were allocated on admission
                n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            else:
                while not bm.can_append(seq):
                    self._preempt(self.running[-1])  # the newest gives way; it may be seq itself
                    preempted = True
                    if seq.status != SequenceStatus.RUNNING:
                        break
                if seq.status != SequenceStatus.RUNNING:
                    break
                bm.append_slot(seq)
                n = 1
            self._commit(seq, n, scheduled)
            budget -= n
            i += 1
        now = None
        while (self.waiting and budget > 0 and not preempted and len(self.running) < self.max_num_seqs
               and not self.waiting[0].num_pending and bm.can_allocate(self.waiting[0])):
            seq = self.waiting.popleft()
            bm.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_time is None:
                now = now or time.perf_counter()
                seq.first_scheduled_time = now
            self.running.append(seq)
            self._commit(seq, min(seq.num_tokens - seq.num_computed_tokens, budget), scheduled)
            budget -= scheduled[-1].num_new_tokens
        return scheduled
