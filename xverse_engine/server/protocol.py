"""The OpenAI request bodies we accept (pydantic), their translation to SamplingParams, and OpenAI's error shape.

Unknown fields are refused (400 naming the field) rather than silently ignored; OpenAI fields we cannot honour
are accepted only at their neutral value. Our extras `top_k`, `repetition_penalty`, `ignore_eos` and
`stop_token_ids` are accepted in the body as vLLM does. Unset sampling fields take the checkpoint's
generation_config.json values (the engine fills them), not OpenAI's defaults.
"""
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..sampling_params import SamplingParams
from ..tokenizer import DEFAULT_CHAT_TEMPLATE, DEFAULT_SYSTEM_TEMPLATE

MAX_CHOICES = 128          # n x prompts per call
EOS_TEXT = "<|endoftext|>"  # ends each assistant turn in XVERSE-Chat's template
UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             500: "server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingFields(_Strict):
    """Fields common to both endpoints."""
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    n: Optional[int] = Field(1, ge=1, le=MAX_CHOICES)
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    user: Optional[str] = None
    presence_penalty: Optional[float] = Field(0.0, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(0.0, ge=-2, le=2)
    logit_bias: Optional[dict] = None
    # extras, as vLLM accepts them
    top_k: Optional[int] = Field(None, ge=-1)
    repetition_penalty: Optional[float] = Field(None, gt=0, le=2)
    ignore_eos: Optional[bool] = False
    stop_token_ids: Optional[list[int]] = None

    def model_post_init(self, context):
        """An explicit null means the default, as clients that send every field expect."""
        self.n = 1 if self.n is None else self.n
        self.stream, self.ignore_eos = bool(self.stream), bool(self.ignore_eos)

    def check_supported(self):
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported; use repetition_penalty (an extra field) instead",
                               param=name)
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if any(not s for s in stops):
            raise APIError(400, "stop strings must not be empty", param="stop")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed with stream=true", param="stream_options")

    def sampling_params(self, logprobs: Optional[int], choice: int) -> SamplingParams:
        """Choice i of n gets seed+i, so the n samples of a seeded request differ and are reproducible."""
        return SamplingParams(
            max_new_tokens=self.max_tokens, temperature=self.temperature,
            top_k=0 if self.top_k == -1 else self.top_k, top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos,
            seed=None if self.seed is None else self.seed + choice, logprobs=logprobs)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    prompt: Any = None       # str | list[str] | list[int] | list[list[int]], checked in prompts()
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    echo: Optional[bool] = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    def check_supported(self):
        super().check_supported()
        if self.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if self.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "best_of other than n is not supported", param="best_of")

    def prompts(self) -> list:
        """The prompts: each a string or a list of token ids."""
        p = self.prompt
        if p is None:
            raise APIError(400, "missing required parameter 'prompt'", param="prompt")
        if isinstance(p, str) or (isinstance(p, list) and p and all(_is_token(x) for x in p)):
            return [p]
        if isinstance(p, list) and p and all(isinstance(x, str) or (isinstance(x, list) and all(map(_is_token, x)))
                                             for x in p):
            return list(p)
        if p == []:
            raise APIError(400, "the prompt is empty: give at least one token", param="prompt")
        raise APIError(400, "prompt must be a string, a list of strings, a list of token ids, or a list of lists "
                            "of token ids", param="prompt")


def _is_token(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)

    def check_supported(self):
        super().check_supported()
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise APIError(400, "give max_tokens or max_completion_tokens, not both", param="max_tokens")
            self.max_tokens = self.max_completion_tokens
        if self.messages[-1].role != "user":
            raise APIError(400, "the last message must come from the user", param="messages")

    def prompt_text(self) -> str:
        """XVERSE-Chat's template: "{system}\\n\\n", then "Human: ..\\n\\nAssistant: .." turns, each answer
        ended by <|endoftext|>; the last user turn is left open for the model."""
        system = "\n\n".join(m.text() for m in self.messages if m.role in ("system", "developer"))
        text = DEFAULT_SYSTEM_TEMPLATE.format(system=system) if system else ""
        for message in self.messages:
            if message.role == "user":
                text += DEFAULT_CHAT_TEMPLATE.format(query=message.text())
            elif message.role == "assistant":
                text += message.text() + EOS_TEXT
        return text


def parse(model_class, payload) -> BaseModel:
    """Validates a JSON body; a bad one is a 400 naming the first offending field."""
    if not isinstance(payload, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        request = model_class.model_validate(payload)
    except ValidationError as error:
        first = error.errors()[0]
        # a union's error names the member it tried ('str', 'list[TextPart]'): not a field, leave it out
        param = ".".join(str(part) for part in first["loc"]
                         if isinstance(part, int) or part.isidentifier() and part not in UNION_TAGS) or None
        if first["type"] == "extra_forbidden":
            message = f"unknown parameter {param!r}"
        elif first["type"] == "missing":
            message = f"missing required parameter {param!r}"
        else:
            message = f"invalid value for {param!r}: {first['msg']}"
        raise APIError(400, message, param=param) from None
    request.check_supported()
    return request
