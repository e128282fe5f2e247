"""SamplingParams: how one request is decoded. Unset fields (None) take the checkpoint's
generation_config.json values, then the defaults below (ENGINE.md)."""
from dataclasses import dataclass, field, replace
from typing import Optional

INT64_MIN, UINT64 = -(1 << 63), 1 << 64


def seed_as_int64(seed: int) -> int:
    """Any Python integer seed, folded to the signed 64 bits the sampler keeps per request (seeds equal
    modulo 2**64 draw the same tokens), so no seed can overflow a tensor inside a step."""
    return (seed - INT64_MIN) % UINT64 + INT64_MIN


# The value a field takes when neither the request nor generation_config.json sets it.
BUILTIN_DEFAULTS = {"max_new_tokens": 64, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0}


@dataclass
class SamplingParams:
    max_new_tokens: Optional[int] = None
    temperature: Optional[float] = None     # 0: greedy
    top_k: Optional[int] = None             # 0: off
    top_p: Optional[float] = None           # 1.0: off
    repetition_penalty: Optional[float] = None   # HF semantics: 1.0 off, > 1 discourages seen tokens
    stop: list = field(default_factory=list)     # strings; matched across token boundaries, not returned
    stop_token_ids: list = field(default_factory=list)
    ignore_eos: bool = False
    seed: Optional[int] = None              # per request: the same seed gives the same tokens in any batch;
                                            # any integer (folded to 64 bits)
    logprobs: Optional[int] = None          # return the chosen token's logprob and the top-n per step

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self):
        def need(condition, message):
            if not condition:
                raise ValueError(f"SamplingParams: {message}")
        if self.max_new_tokens is not None:
            need(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
                 f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if self.temperature is not None:
            need(self.temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None:
            need(isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be an integer >= 0, got {self.top_k!r}")
        if self.top_p is not None:
            need(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty is not None:
            need(self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        need(all(isinstance(s, str) and s for s in self.stop), f"stop must be non-empty strings, got {self.stop!r}")
        need(all(isinstance(t, int) for t in self.stop_token_ids), "stop_token_ids must be integers")
        if self.logprobs is not None:
            need(isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20,
                 f"logprobs must be an integer in [0, 20], got {self.logprobs!r}")
        if self.seed is not None:
            need(isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}")

    def resolved(self, generation_config: dict) -> "SamplingParams":
        """A copy with every unset field filled: generation_config.json first, then the built-in defaults.
        generation_config's do_sample=false means greedy (temperature 0), as transformers does."""
        fills = {}
        greedy = generation_config.get("do_sample") is False
        for name, builtin in BUILTIN_DEFAULTS.items():
            if getattr(self, name) is not None:
                continue
            if name == "temperature" and greedy:
                fills[name] = 0.0
            elif name == "max_new_tokens":
                fills[name] = generation_config.get("max_new_tokens", builtin)
            else:
                fills[name] = generation_config.get(name, builtin)
        return replace(self, **fills)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
