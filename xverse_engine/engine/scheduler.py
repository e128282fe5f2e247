"""Which sequences run in the next step, and how many of their tokens.

Continuous batching under a token budget per step: running sequences first (one token each in decode,
the next chunk of a long prompt in chunked prefill), then waiting ones first-come first-served while
the budget, max_num_seqs and free KV blocks allow. When a running sequence needs a block and none is
free, the newest running sequence is preempted: its blocks are freed and it waits to be recomputed.
"""
from collections import deque
from dataclasses import dataclass

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int          # tokens whose KV this step computes, from seq.num_computed_tokens on

    @property
    def samples(self) -> bool:
        """This step reaches the sequence's last token, so it yields the next one."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque = deque()
        self.running: list = []
        self.num_preemptions = 0

    def add(self, seq: Sequence):
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence):
        """Takes a finished or aborted sequence out of the queues and frees its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)

    def _preempt(self, seq: Sequence):
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> list:
        budget = self.max_num_batched_tokens
        scheduled = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.in_prefill:  # the next chunk of a prompt; its blocks were allocated on admission
                n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            else:
                while not self.block_manager.can_append(seq):
                    self._preempt(self.running[-1])  # the newest gives way; it may be seq itself
                    preempted = True
                    if seq.status != SequenceStatus.RUNNING:
                        break
                if seq.status != SequenceStatus.RUNNING:
                    break
                self.block_manager.append_slot(seq)
                n = 1
            scheduled.append(ScheduledSequence(seq, n))
            budget -= n
            i += 1
        while (self.waiting and budget > 0 and not preempted and len(self.running) < self.max_num_seqs
               and self.block_manager.can_allocate(self.waiting[0])):
            seq = self.waiting.popleft()
            self.block_manager.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            scheduled.append(ScheduledSequence(seq, n))
            budget -= n
        return scheduled
