"""The HTTP side: OpenAI-compatible routes over an engine loop (EngineProcess, or EngineLoop: the same
interface), the demo page, health and metrics.

Handlers run on the asyncio loop and never touch the Engine's state: they tokenize and check a request,
submit it as a RequestGroup, and turn its deltas into OpenAI JSON (or SSE chunks). A client that goes away
has its requests aborted at once, whether it streams or waits for the whole answer.
"""
import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from contextlib import asynccontextmanager
from typing import AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .mailbox import Delta, NotReady, RequestGroup, ServerBusy
from .metrics import ServerMetrics
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, parse

logger = logging.getLogger("xverse_engine.serve")
PAGE = os.path.join(os.path.dirname(__file__), "static", "index.html")
MIN_LOGPROB = -9999.0   # JSON has no -inf


def json_response(payload: dict, status: int = 200) -> Response:
    return Response(json.dumps(payload, ensure_ascii=False), status_code=status, media_type="application/json")


def error_response(error: APIError) -> Response:
    return json_response(error.body(), error.status)


def sse(payload) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class ChunkEncoder:
    """The SSE chunks of one stream. The fields every chunk repeats (id, object, created, model, and usage: null)
    are encoded once; a chunk encodes only its choices, so a token costs one small json.dumps."""

    def __init__(self, meta: dict, include_usage: bool):
        self.head = "data: " + json.dumps(meta, ensure_ascii=False)[:-1] + ', "choices": ['
        self.tail = '], "usage": null}\n\n' if include_usage else "]}\n\n"

    def chunk(self, choice: dict) -> str:
        return self.head + json.dumps(choice, ensure_ascii=False) + self.tail


async def wait_for_disconnect(receive):
    """Returns when the client has gone (the request body was read already, so only that message is left)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStreamResponse(StreamingResponse):
    """Server-sent events whose producer is cancelled the moment the client goes away (Starlette alone would
    notice only at the next write); `on_close` runs however the stream ends (finished, client gone, or
    cancelled at shutdown)."""

    def __init__(self, events: AsyncIterator[str], on_close):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.events, self.on_close = events, on_close

    async def __call__(self, scope, receive, send):
        async def pump():
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for event in self.events:
                await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        producer = asyncio.ensure_future(pump())
        watcher = asyncio.ensure_future(wait_for_disconnect(receive))
        try:
            await asyncio.wait({producer, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if producer.done() and not producer.cancelled() and producer.exception() is not None \
                    and not isinstance(producer.exception(), OSError):   # OSError: the client went away
                logger.error("a stream failed", exc_info=producer.exception())
        finally:
            for task in (producer, watcher):
                task.cancel()
            await asyncio.gather(producer, watcher, return_exceptions=True)
            await self.events.aclose()
            self.on_close()


def finish_reason_of(delta: Delta) -> Optional[str]:
    return delta.finish_reason if delta.finished else None


class OpenAIServer:
    """Routes of one server: the model it serves, its key, its engine loop and its metrics."""

    def __init__(self, engine_loop, metrics: ServerMetrics, served_model_name: str,
                 api_key: Optional[str] = None, stream_interval: int = 1):
        if stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {stream_interval}")
        self.loop, self.metrics = engine_loop, metrics
        self.stream_interval = stream_interval   # tokens per SSE chunk at most (the first token comes alone)
        self.model_name, self.api_key = served_model_name, api_key
        self.created = int(time.time())
        self._token_texts = {}       # token id -> its text, for logprobs (at most the vocabulary)
        self._anchor = None

    # ---- checks shared by the routes ---------------------------------------------------------------------
    def authorize(self, request: Request):
        if not self.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def engine(self):
        if not self.loop.ready:
            state = self.loop.state()
            raise APIError(503, f"the server is {state}" + (", retry shortly" if state == "loading" else ""),
                           code="not_ready")
        return self.loop.engine

    def check_model(self, model: Optional[str]):
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    @staticmethod
    async def read_json(request: Request):
        body = await request.body()
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise APIError(400, f"the request body is not valid JSON: {error}") from None

    @staticmethod
    def prompt_ids(engine, prompt, max_tokens: Optional[int], param: str) -> list:
        if isinstance(prompt, str):
            if engine.tokenizer is None:
                raise APIError(400, "this model has no tokenizer: send token ids as the prompt", param=param)
            ids = engine.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
        if not ids:
            raise APIError(400, "the prompt is empty: give at least one token", param=param)
        vocab = engine.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})", param=param)
        limit = engine.max_model_len
        if len(ids) >= limit or (max_tokens is not None and len(ids) + max_tokens > limit):
            asked = f" + {max_tokens} to generate" if max_tokens is not None else ""
            raise APIError(400, f"this model's maximum context length is {limit} tokens; the request has "
                                f"{len(ids)} prompt tokens{asked}: shorten the prompt or lower max_tokens",
                           param=param, code="context_length_exceeded")
        return ids

    def submit(self, inputs: list, stream: bool) -> RequestGroup:
        # a stream is woken every stream_interval tokens; a call that answers at once only when a choice ends
        group = RequestGroup(inputs, asyncio.get_running_loop(), self.stream_interval if stream else None)
        try:
            self.loop.submit(group)
        except ServerBusy as error:
            raise APIError(503, str(error), code="server_busy") from None
        except NotReady as error:
            raise APIError(503, str(error), code="not_ready") from None
        return group

    async def collect(self, request: Request, group: RequestGroup) -> list:
        """Waits for a whole group; aborts it if the client leaves first."""
        results = [Delta() for _ in range(len(group))]
        watcher = asyncio.ensure_future(wait_for_disconnect(request.receive))
        watcher.add_done_callback(lambda task: task.cancelled() or self.loop.abort(group))
        try:
            while not group.finished:
                for index, delta in await group.next():
                    results[index].merge(delta)
        finally:
            watcher.cancel()
            if not group.finished:
                self.loop.abort(group)
        for delta in results:
            if delta.finish_reason == "error":
                raise APIError(500, f"the request failed: {delta.error}", code="engine_error")
            if delta.finish_reason == "abort":
                raise APIError(503, "the request was aborted: the server is shutting down", code="aborted")
        return results

    def sampling_inputs(self, req, prompts_ids: list, logprobs: Optional[int]) -> list:
        inputs = []
        for ids in prompts_ids:
            for choice in range(req.n):
                try:
                    inputs.append((ids, req.sampling_params(logprobs, choice)))
                except ValueError as error:
                    raise APIError(400, str(error)) from None
        if len(inputs) > self.loop.max_waiting_requests:
            raise APIError(400, f"the request asks for {len(inputs)} completions, more than the waiting queue holds "
                                f"({self.loop.max_waiting_requests})", param="n")
        return inputs

    @staticmethod
    def usage(prompts_ids: list, completion_tokens: int) -> dict:
        prompt_tokens = sum(len(ids) for ids in prompts_ids)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def token_text(self, engine, token_id: int) -> str:
        """A token's text as it reads inside a text (so "▁Paris" is " Paris"): decoded after an anchor token,
        since a decoder strips the word-boundary space at the start of a text."""
        text = self._token_texts.get(token_id)
        if text is None:
            tokenizer = engine.tokenizer
            if tokenizer is None:
                return ""
            if self._anchor is None:
                self._anchor = tokenizer.encode("a")[-1:]
            anchor_text = tokenizer.decode(self._anchor, skip_special_tokens=False)
            text = tokenizer.decode(self._anchor + [token_id], skip_special_tokens=False)[len(anchor_text):]
            self._token_texts[token_id] = text
        return text

    # ---- /v1/completions -------------------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        self.authorize(request)
        req = parse(CompletionRequest, await self.read_json(request))
        engine = self.engine()
        self.check_model(req.model)
        prompts_ids = [self.prompt_ids(engine, p, req.max_tokens, "prompt") for p in req.prompts()]
        group = self.submit(self.sampling_inputs(req, prompts_ids, req.logprobs), req.stream)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name}
        if req.stream:
            return EventStreamResponse(self.completion_events(engine, req, group, prompts_ids, meta),
                                       lambda: group.finished or self.loop.abort(group))
        results = await self.collect(request, group)
        choices = [{"index": i, "text": d.text, "finish_reason": d.finish_reason,
                    "logprobs": self.completion_logprobs(engine, d, 0) if req.logprobs is not None else None}
                   for i, d in enumerate(results)]
        usage = self.usage(prompts_ids, sum(len(d.token_ids) for d in results))
        return json_response({**meta, "choices": choices, "usage": usage})

    async def completion_events(self, engine, req, group, prompts_ids, meta) -> AsyncIterator[str]:
        """One SSE chunk per choice per wake-up: the deltas of every step the handler missed arrive merged, so a
        stream that falls behind sends fewer, larger chunks instead of queueing one per token."""
        offsets = [0] * len(group)          # text offset of each choice, for logprobs
        completion_tokens = 0
        chunks = ChunkEncoder(meta, req.include_usage)
        while not group.finished:
            events = []
            for index, delta in await group.next():
                completion_tokens += len(delta.token_ids)
                if delta.finish_reason == "error":
                    events.append(sse(APIError(500, f"the request failed: {delta.error}", code="engine_error").body()))
                    continue
                if not (delta.text or delta.finished or (req.logprobs is not None and delta.token_ids)):
                    continue  # tokens that are not text yet (a character split across byte tokens)
                logprobs = None
                if req.logprobs is not None:
                    logprobs = self.completion_logprobs(engine, delta, offsets[index])
                    offsets[index] += sum(len(t) for t in logprobs["tokens"])
                events.append(chunks.chunk({"index": index, "text": delta.text, "logprobs": logprobs,
                                            "finish_reason": finish_reason_of(delta)}))
            if group.finished:
                events += self.stream_end(req, prompts_ids, completion_tokens, meta)
            if events:
                yield "".join(events)

    def stream_end(self, req, prompts_ids: list, completion_tokens: int, meta: dict) -> list:
        """The events after the last chunk: the usage chunk (when asked for) and [DONE]. They leave in the same
        write as the last chunk: each write to a socket is a system call and a wake-up of the client."""
        usage = [sse({**meta, "choices": [], "usage": self.usage(prompts_ids, completion_tokens)})] \
            if req.include_usage else []
        return usage + ["data: [DONE]\n\n"]

    def completion_logprobs(self, engine, delta: Delta, offset: int) -> dict:
        tokens, token_logprobs, top, text_offset = [], [], [], []
        for entry in delta.logprobs:
            text = self.token_text(engine, entry.token_id)
            tokens.append(text)
            token_logprobs.append(max(entry.logprob, MIN_LOGPROB))
            top.append({self.token_text(engine, t): max(lp, MIN_LOGPROB) for t, lp in entry.top.items()})
            text_offset.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": text_offset}

    # ---- /v1/chat/completions --------------------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        self.authorize(request)
        req = parse(ChatCompletionRequest, await self.read_json(request))
        engine = self.engine()
        self.check_model(req.model)
        prompts_ids = [self.prompt_ids(engine, req.prompt_text(), req.max_tokens, "messages")]
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        group = self.submit(self.sampling_inputs(req, prompts_ids, logprobs), req.stream)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name}
        if req.stream:
            return EventStreamResponse(self.chat_events(engine, req, group, prompts_ids,
                                                        {**meta, "object": "chat.completion.chunk"}),
                                       lambda: group.finished or self.loop.abort(group))
        results = await self.collect(request, group)
        choices = [{"index": i, "message": {"role": "assistant", "content": d.text},
                    "logprobs": self.chat_logprobs(engine, d) if req.logprobs else None,
                    "finish_reason": d.finish_reason} for i, d in enumerate(results)]
        usage = self.usage(prompts_ids, sum(len(d.token_ids) for d in results))
        return json_response({**meta, "choices": choices, "usage": usage})

    async def chat_events(self, engine, req, group, prompts_ids, meta) -> AsyncIterator[str]:
        completion_tokens = 0
        chunks = ChunkEncoder(meta, req.include_usage)
        yield "".join(chunks.chunk({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None}) for index in range(len(group)))
        while not group.finished:
            events = []
            for index, delta in await group.next():
                completion_tokens += len(delta.token_ids)
                if delta.finish_reason == "error":
                    events.append(sse(APIError(500, f"the request failed: {delta.error}", code="engine_error").body()))
                    continue
                if not (delta.text or delta.finished or (req.logprobs and delta.token_ids)):
                    continue
                events.append(chunks.chunk({"index": index, "delta": {"content": delta.text} if delta.text else {},
                                            "logprobs": self.chat_logprobs(engine, delta) if req.logprobs else None,
                                            "finish_reason": finish_reason_of(delta)}))
            if group.finished:
                events += self.stream_end(req, prompts_ids, completion_tokens, meta)
            if events:
                yield "".join(events)

    def chat_logprobs(self, engine, delta: Delta) -> dict:
        def item(token_id, logprob):
            text = self.token_text(engine, token_id)
            return {"token": text, "logprob": max(logprob, MIN_LOGPROB), "bytes": list(text.encode("utf-8"))}
        return {"content": [{**item(e.token_id, e.logprob),
                             "top_logprobs": [item(t, lp) for t, lp in e.top.items()]} for e in delta.logprobs]}

    # ---- models, health, metrics, page -----------------------------------------------------------------------
    def model_card(self, engine) -> dict:
        defaults = {k: v for k, v in engine.generation_config.items()
                    if k in ("temperature", "top_k", "top_p", "repetition_penalty", "do_sample", "max_new_tokens")}
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "xverse_engine",
                "root": engine.model_path, "max_model_len": engine.max_model_len, "generation_config": defaults}

    async def models(self, request: Request) -> Response:
        self.authorize(request)
        return json_response({"object": "list", "data": [self.model_card(self.engine())]})

    async def model(self, request: Request, model_id: str) -> Response:
        self.authorize(request)
        engine = self.engine()
        self.check_model(model_id)
        return json_response(self.model_card(engine))

    async def health(self) -> Response:
        if not self.loop.ready:
            raise APIError(503, f"the server is {self.loop.state()}", code="not_ready")
        return json_response({"status": "ok"})


def create_app(engine_loop, metrics: ServerMetrics, served_model_name: str,
               api_key: Optional[str] = None, stream_interval: int = 1) -> FastAPI:
    """The ASGI app. Its lifespan starts the engine's process or thread (the model loads while /health answers
    503) and stops it at shutdown, after uvicorn's grace period for the requests in flight."""
    server = OpenAIServer(engine_loop, metrics, served_model_name, api_key, stream_interval)
    with open(PAGE, encoding="utf-8") as f:
        page = f.read()

    @asynccontextmanager
    async def lifespan(app):
        engine_loop.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, engine_loop.shutdown)

    app = FastAPI(title="xverse_engine", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request, error: APIError):
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, error: StarletteHTTPException):
        message = f"{request.method} {request.url.path}: {error.detail}"
        return error_response(APIError(error.status_code, message,
                                       code="not_found" if error.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def internal_error(request, error: Exception):
        logger.exception("unhandled error in %s", request.url.path)
        return error_response(APIError(500, f"internal error: {type(error).__name__}: {error}"))

    app.add_api_route("/v1/completions", server.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", server.chat_completions, methods=["POST"])
    app.add_api_route("/v1/models", server.models, methods=["GET"])
    app.add_api_route("/v1/models/{model_id:path}", server.model, methods=["GET"])
    app.add_api_route("/health", server.health, methods=["GET"])
    app.add_api_route("/metrics", lambda: Response(metrics.render(), media_type=metrics.content_type),
                      methods=["GET"])
    app.add_api_route("/", lambda: HTMLResponse(page), methods=["GET"])
    return CountStatus(app, metrics)


class CountStatus:
    """ASGI wrapper counting answered API calls by endpoint and status (it wraps `send` only, so a handler's
    `receive` still sees the client's disconnect)."""
    ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models")

    def __init__(self, app: FastAPI, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    def __getattr__(self, name):   # app.state and friends
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = next((e for e in self.ENDPOINTS if path.startswith(e)), "other")

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.http_requests.labels(endpoint, str(message["status"])).inc()
            await send(message)
        await self.app(scope, receive, counting_send)

