"""``mixattn serve``: an HTTP server with OpenAI's completions API on the
continuous-batching engine (:mod:`mixattn.engine`).

Endpoints: ``POST /v1/completions`` and, where the tokenizer has a chat
template, ``POST /v1/chat/completions`` (both streaming with server-sent
events, or not), ``GET /v1/models``, ``GET /health`` and ``GET /stats`` (rows
in use, requests waiting, finished and cancelled, the most tokens held at
once). Built on FastAPI (request schemas, validation) and uvicorn (the
ASGI server), as vLLM's and SGLang's OpenAI front ends are.

Bad requests get a 400 in OpenAI's error shape, naming the field (``param``):
a prompt longer than the context, ``max_tokens`` that is not positive or does
not fit, an unknown model, a malformed body. A client that disconnects from
a stream cancels its request, and its row is freed at the next engine step.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from mixattn.detokenize import TextStream
from mixattn.engine import Engine
from mixattn.engine import Request as EngineRequest
from mixattn.generate import GenerationError


class _Body(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="ignore")  # fields of OpenAI's API that change nothing here (user, ...)

    model: str
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = 1
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None


class CompletionBody(_Body):
    prompt: str | list[str]
    max_tokens: int = 16
    logprobs: int | None = None
    echo: bool = False


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatBody(_Body):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


def _error(status: int, message: str, param: str | None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": "invalid_request_error",
                                                               "param": param, "code": None}})


@dataclass
class Stats:
    finished: int = 0
    cancelled: int = 0
    started: float = field(default_factory=time.time)


def create_app(engine: Engine, tokenizer, model_name: str) -> FastAPI:
    """The FastAPI app over a started or unstarted ``engine`` (the app's
    lifespan starts and stops it)."""
    stats = Stats()

    async def lifespan(app):
        if engine._thread is None:
            engine.start()
        yield
        engine.stop()

    app = FastAPI(title="mixattn", lifespan=lifespan)
    chat_template = getattr(tokenizer.backend, "chat_template", None)

    @app.exception_handler(BadRequest)
    async def _bad(request: Request, exc: BadRequest):
        return _error(exc.status, exc.message, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return _error(400, f"the request body is not valid JSON: {first.get('msg')} (at character {loc[-1] if loc else '?'})",
                          None)
        param = ".".join(loc) or None
        value = f" (got {first['input']!r})" if "input" in first and param else ""
        return _error(400, f"{param or 'body'}: {first.get('msg')}{value}", param)

    @app.get("/health")
    async def health():
        return {"status": "ok" if engine.error is None else f"engine failed: {engine.error!r}"}

    @app.get("/stats")
    async def get_stats():
        return {"max_slots": engine.max_slots, "max_context": engine.max_context,
                "running": sum(r is not None for r in engine.rows), "waiting": len(engine.waiting),
                "finished": stats.finished, "cancelled": stats.cancelled,
                "max_in_flight_tokens": engine.max_in_flight_tokens, "kv_cache_bytes": engine.cache.nbytes}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(stats.started),
                                            "owned_by": "mixattn", "max_model_len": engine.max_context}]}

    def check_common(body, max_tokens: int) -> list[str]:
        if body.model != model_name:
            raise BadRequest(f"model {body.model!r} is not served here; this server serves {model_name!r}", "model")
        if body.n != 1:
            raise BadRequest(f"n must be 1 here, got {body.n}", "n")
        if max_tokens < 1:
            raise BadRequest(f"max_tokens must be a positive integer, got {max_tokens}", "max_tokens")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        for i, s in enumerate(stops):
            if not s:
                raise BadRequest(f"stop[{i}] is empty: a stop string must be a non-empty string", "stop")
        return stops

    def encode(text: str, max_tokens: int, param: str) -> list[int]:
        ids = tokenizer.encode_batch([text])[0]
        if not ids:
            raise BadRequest(f"{param} is empty: it needs at least one token", param)
        if len(ids) >= engine.max_context:
            raise BadRequest(f"{param} is {len(ids)} tokens; this model's context is {engine.max_context} tokens, "
                             f"so a prompt can have at most {engine.max_context - 1}", param)
        if len(ids) + max_tokens > engine.max_context:
            raise BadRequest(f"{param} of {len(ids)} tokens + max_tokens {max_tokens} exceeds the context of "
                             f"{engine.max_context} tokens; max_tokens can be at most {engine.max_context - len(ids)}",
                             "max_tokens")
        return ids

    def launch(ids: list[int], body, max_tokens: int, stops: list[str]):
        """Submit one sequence; returns (queue of ('text', piece) / ('done', reason), the engine request)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        text = TextStream(tokenizer, stops)

        def on_token(request, token):
            if token == tokenizer.eos_id:
                return True
            piece = text.push(token)
            if piece:
                loop.call_soon_threadsafe(queue.put_nowait, ("text", piece))
            return text.stopped is not None

        def on_done(request):
            rest = text.finish() if request.finish_reason != "cancelled" else ""
            if rest:
                loop.call_soon_threadsafe(queue.put_nowait, ("text", rest))
            if request.finish_reason == "cancelled":
                stats.cancelled += 1
            else:
                stats.finished += 1
            loop.call_soon_threadsafe(queue.put_nowait, ("done", request.finish_reason))

        greedy = body.temperature == 0
        request = EngineRequest(ids, max_tokens, temperature=body.temperature, top_p=None if greedy or body.top_p == 1 else body.top_p,
                                seed=body.seed, on_token=on_token, on_done=on_done)
        try:
            engine.submit(request)
        except GenerationError as e:
            raise BadRequest(str(e), None) from None
        return queue, request

    async def collect(queue) -> tuple[str, str]:
        parts = []
        while True:
            kind, value = await queue.get()
            if kind == "done":
                return "".join(parts), value
            parts.append(value)

    def sse(events: AsyncIterator[dict], requests: list) -> StreamingResponse:
        async def body():
            try:
                async for event in events:
                    yield f"data: {json.dumps(event)}\n\n"
                yield "data: [DONE]\n\n"
            finally:  # the client went away (or we finished): nothing keeps running for it
                for r in requests:
                    if r.state != "done":
                        engine.cancel(r)
        return StreamingResponse(body(), media_type="text/event-stream")

    def usage(prompt_tokens: int, requests) -> dict:
        completion = sum(len(r.tokens) for r in requests)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        stops = check_common(body, body.max_tokens)
        if body.logprobs is not None:
            raise BadRequest("logprobs are not supported by this server", "logprobs")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise BadRequest("prompt is an empty list", "prompt")
        encoded = [encode(p, body.max_tokens, "prompt" if len(prompts) == 1 else f"prompt[{i}]") for i, p in enumerate(prompts)]
        launched = [launch(ids, body, body.max_tokens, stops) for ids in encoded]
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": cid, "object": "text_completion", "created": created, "model": model_name}
        if body.stream:
            async def events():
                pending = {i: q for i, (q, _) in enumerate(launched)}
                if body.echo:
                    for i, p in enumerate(prompts):
                        yield {**head, "choices": [{"index": i, "text": p, "finish_reason": None, "logprobs": None}]}
                while pending:
                    for i, q in list(pending.items()):
                        kind, value = await q.get()
                        done = kind == "done"
                        yield {**head, "choices": [{"index": i, "text": "" if done else value,
                                                    "finish_reason": value if done else None, "logprobs": None}]}
                        if done:
                            del pending[i]
            return sse(events(), [r for _, r in launched])
        try:
            results = [await collect(q) for q, _ in launched]
        except asyncio.CancelledError:
            for _, r in launched:
                engine.cancel(r)
            raise
        choices = [{"index": i, "text": (prompts[i] if body.echo else "") + text, "finish_reason": reason, "logprobs": None}
                   for i, (text, reason) in enumerate(results)]
        return {**head, "choices": choices, "usage": usage(sum(map(len, encoded)), [r for _, r in launched])}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody):
        max_tokens = body.max_completion_tokens or body.max_tokens or max(1, min(512, engine.max_context // 4))
        stops = check_common(body, max_tokens)
        if not chat_template:
            raise BadRequest("this model's tokenizer has no chat template; use /v1/completions, or serve with a "
                             "transformers tokenizer folder whose tokenizer_config.json has one (--tokenizer)", "messages")
        if not body.messages:
            raise BadRequest("messages is empty", "messages")
        text = tokenizer.backend.apply_chat_template([m.model_dump() for m in body.messages], tokenize=False,
                                                     add_generation_prompt=True)
        ids = encode(text, max_tokens, "messages")
        queue, request = launch(ids, body, max_tokens, stops)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_name}
        if body.stream:
            async def events():
                yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
                while True:
                    kind, value = await queue.get()
                    if kind == "done":
                        yield {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": value}]}
                        return
                    yield {**head, "choices": [{"index": 0, "delta": {"content": value}, "finish_reason": None}]}
            return sse(events(), [request])
        try:
            content, reason = await collect(queue)
        except asyncio.CancelledError:
            engine.cancel(request)
            raise
        return {**head, "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": reason}],
            "usage": usage(len(ids), [request])}

    return app
