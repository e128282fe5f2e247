"""What the engine hands back: finished outputs, streaming deltas, and metrics."""
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class RequestMetrics:
    queue_time: Optional[float] = None        # seconds from arrival to first scheduled
    ttft: Optional[float] = None              # seconds from arrival to first token
    tpot: Optional[float] = None              # mean seconds per output token after the first
    e2e_latency: Optional[float] = None       # seconds from arrival to finish
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_prompt_tokens: int = 0         # prompt tokens found in the prefix cache
    num_preemptions: int = 0

    @property
    def tokens_per_second(self) -> Optional[float]:
        if not self.e2e_latency or not self.num_output_tokens:
            return None
        return self.num_output_tokens / self.e2e_latency


@dataclass(slots=True)
class TokenLogprob:
    """A generated token's logprob and the n best of its step. The step's output pass only wraps what it read
    from the device; the `top` mapping is built when somebody asks for it."""
    token_id: int
    logprob: float
    top_ids: tuple = ()        # the n best token ids, best first
    top_logprobs: tuple = ()   # their logprobs (tuples: the garbage collector soon stops tracking them)

    @property
    def top(self) -> dict:
        """token id -> logprob of the top-n tokens, best first."""
        return dict(zip(self.top_ids, self.top_logprobs))


@dataclass
class RequestOutput:
    request_id: int
    prompt: Optional[str]
    prompt_token_ids: list
    text: str
    token_ids: list
    finish_reason: Optional[str]              # "stop" | "length" | "abort" | "error"; None while running
    logprobs: Optional[list] = None           # list of TokenLogprob when SamplingParams.logprobs is set
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    error: Optional[str] = None               # why the request failed (finish_reason "error")

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class StreamDelta:
    """New text and tokens of one request since its previous delta."""
    request_id: int
    index: int                                # position of the request in the call that started it
    text: str
    token_ids: list
    finished: bool
    finish_reason: Optional[str] = None
    error: Optional[str] = None


@dataclass
class RequestDelta:
    """What one request produced since its previous Engine.take_delta."""
    request_id: int
    text: str                                 # new text (a tail that may start a stop string waits)
    token_ids: list                           # new tokens
    logprobs: list                            # TokenLogprob per new token when SamplingParams.logprobs is set
    finished: bool
    finish_reason: Optional[str] = None       # "stop" | "length" | "abort" | "error"; None while running
    error: Optional[str] = None
    metrics: Optional[RequestMetrics] = None  # on the finished delta only
