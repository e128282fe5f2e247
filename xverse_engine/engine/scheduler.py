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

    def __init__(self, seq: Sequence, num_new_tokens: int, start: int = None, samples: bool = None):
        self.seq = seq
        self.start = seq.num_computed_tokens if start is None else start   # first position computed now
        self.num_new_tokens = num_new_tokens
        # reaches the last token, so it draws the next one
        self.samples = self.start + num_new_tokens == seq.num_tokens if samples is None else samples


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
        block_size = bm.block_size
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_tokens = len(seq.token_ids) + seq.num_pending
            if num_tokens - seq.num_computed_tokens > 1:  # the next chunk of a prompt; its blocks are allocated
                self._commit(seq, min(num_tokens - seq.num_computed_tokens, budget), scheduled)
                budget -= scheduled[-1].num_new_tokens
                i += 1
                continue
            if num_tokens >= seq.max_tokens:
                i += 1       # its last token is drawn and on its way: nothing left to compute
                continue
            if len(seq.block_table) * block_size < num_tokens:   # the new token starts a block
                while not bm.num_free_blocks:
                    self._preempt(self.running[-1])  # the newest gives way; it may be seq itself
                    preempted = True
                    if seq.status != SequenceStatus.RUNNING:
                        break
                if seq.status != SequenceStatus.RUNNING:
                    break
                bm.append_slot(seq)
            # decode, inlined (this loop runs for every running sequence every step)
            scheduled.append(ScheduledSequence(seq, 1, num_tokens - 1, True))
            seq.num_computed_tokens = num_tokens
            seq.num_pending += 1
            budget -= 1
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
