"""One request's state as the engine sees it: its tokens, where its KV lives, and how far it got.

With asynchronous scheduling a sampled token reaches the host one step after it was drawn. Until then it
is *pending*: it counts in num_tokens (the scheduler plans the next step with it, and the model reads it
straight from the device), but it is not yet in token_ids.
"""
import enum
import time
from dataclasses import dataclass, field
from typing import Optional

from ..sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"     # queued, or preempted (its KV dropped, to be recomputed)
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)   # identity: `seq in running` and list.remove must not compare fields
class Sequence:
    request_id: int
    prompt: Optional[str]
    prompt_token_ids: list
    params: SamplingParams                  # resolved: no field left None
    seed: int                               # params.seed, or one drawn for this request by the engine
    max_tokens: int                         # prompt + output may not exceed this (max_model_len)
    token_ids: list = field(default_factory=list)   # prompt + generated tokens known on the host
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list = field(default_factory=list)  # KV block ids, in token order
    num_computed_tokens: int = 0            # tokens whose KV is in the cache, or written by a launched step
    num_cached_prompt_tokens: int = 0       # of those, found in the prefix cache (not computed)
    num_hashed_blocks: int = 0              # leading blocks registered in the prefix cache
    num_pending: int = 0                    # sampled tokens still on their way to the host (0 or 1)
    row: int = -1                           # row in the persistent input batch while it has one
    num_synced_blocks: int = 0              # block_table entries already copied to that row
    sample_index: int = -1                  # where its last sampled token sits in that step's output
    logprobs: list = field(default_factory=list)
    finish_reason: Optional[str] = None     # "stop" | "length" | "abort" | "error"
    error: Optional[str] = None
    arrival_time: float = field(default_factory=time.perf_counter)
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None
    finish_time: Optional[float] = None
    num_preemptions: int = 0

    def __post_init__(self):
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    def append_token(self, token_id: int):
        self.token_ids.append(token_id)

    @property
    def num_tokens(self) -> int:
        """Tokens so far, pending ones included: what the scheduler plans with."""
        return len(self.token_ids) + self.num_pending

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def in_prefill(self) -> bool:
        """More than one token still lacks KV (prompt, or everything after a preemption)."""
        return self.num_tokens - self.num_computed_tokens > 1
