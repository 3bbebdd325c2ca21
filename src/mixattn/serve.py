"""``mixattn serve``: an HTTP server with OpenAI's completions API on the
continuous-batching engine (:mod:`mixattn.engine`).

Endpoints: ``POST /v1/completions`` and, where the tokenizer has a chat
template, ``POST /v1/chat/completions`` (both streaming with server-sent
events, or not), ``GET /v1/models``; vLLM's ``POST /tokenize``,
``POST /detokenize`` and ``GET /tokenizer_info`` (lm-eval's
``local-completions`` tokenizes through them); ``GET /health`` and
``GET /stats`` (rows in use, requests waiting, finished and cancelled, the
most tokens held at once); ``GET /metrics`` for Prometheus, in vLLM's
names. Built on FastAPI (request schemas, validation), uvicorn (the ASGI
server) and prometheus_client, as vLLM's and SGLang's OpenAI front ends are.

Requests take what OpenAI's API and vLLM's extensions offer and that changes
the output here: prompts as text or token ids, ``n`` choices, ``logprobs``
(with ``echo``, the prompt's too: log-likelihoods for lm-eval),
``temperature``/``top_p``/``top_k``, ``seed``, ``stop`` strings,
``presence_penalty``/``frequency_penalty``/``repetition_penalty``,
``logit_bias``, ``ignore_eos``, ``stop_token_ids``, ``stream`` with
``stream_options.include_usage``. What would change the output and is not
done here (``best_of`` > ``n``, ``suffix``, ``tools``, a JSON
``response_format``) is refused, not ignored.

Bad requests get a 400 in OpenAI's error shape, naming the field (``param``):
a prompt longer than the context, a token id outside the vocabulary,
``max_tokens`` that is not positive or does not fit, an unknown model, a
malformed body. With ``api_key`` the ``/v1`` routes answer 401 without it. A
client that disconnects from a stream cancels its request, and its row is
freed at the next engine step.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.metadata
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from mixattn.detokenize import TextStream
from mixattn.engine import Engine, EngineFailed
from mixattn.engine import Request as EngineRequest
from mixattn.generate import GenerationError
from mixattn.openai_api import (
    BadRequest,
    ChatBody,
    ChatMessage,
    CompletionBody,
    DetokenizeBody,
    TokenizeBody,
    chat_logprobs,
    error_body,
    error_response,
    legacy_logprobs,
    render_chat_template,
)

DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there


@dataclass
class Stats:
    finished: int = 0
    cancelled: int = 0
    started: float = field(default_factory=time.time)


class Metrics:
    """Prometheus metrics in vLLM's names (``mixattn:`` for ``vllm:``), in a
    registry of the app's own: requests running and waiting, rows in use,
    prompt and generated tokens, finished requests by reason, and histograms
    of time to first token, time per output token and end-to-end latency."""

    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry()
        gauge = lambda name, doc, fn: Gauge(f"mixattn:{name}", doc, registry=self.registry).set_function(fn)
        gauge("num_requests_running", "requests holding a row", lambda: engine.rows_in_use)
        gauge("num_requests_waiting", "requests waiting for a row", lambda: len(engine.waiting))
        gauge("kv_cache_usage_perc", "fraction of the cache's rows in use",
              lambda: engine.rows_in_use / engine.max_slots)
        gauge("max_in_flight_tokens", "the most prompt + generated tokens held in the cache at once",
              lambda: engine.max_in_flight_tokens)
        self.prompt_tokens = Counter("mixattn:prompt_tokens", "prompt tokens of finished requests", registry=self.registry)
        self.generation_tokens = Counter("mixattn:generation_tokens", "tokens generated", registry=self.registry)
        self.success = Counter("mixattn:request_success", "requests ended, by finish reason", ["finished_reason"],
                               registry=self.registry)
        seconds = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                   80.0, 160.0, 640.0)
        self.ttft = Histogram("mixattn:time_to_first_token_seconds", "submission to first token", registry=self.registry,
                              buckets=seconds)
        self.tpot = Histogram("mixattn:time_per_output_token_seconds", "mean time between a request's tokens after its "
                              "first", registry=self.registry, buckets=seconds)
        self.e2e = Histogram("mixattn:e2e_request_latency_seconds", "submission to the last token", registry=self.registry,
                             buckets=seconds)

    def finished(self, request: EngineRequest) -> None:
        """Count a request that has ended (called in the engine's thread)."""
        self.success.labels(request.finish_reason).inc()
        self.prompt_tokens.inc(len(request.prompt))
        self.generation_tokens.inc(len(request.tokens))
        if request.first_token_at is not None:
            self.ttft.observe(request.first_token_at - request.submitted)
            self.e2e.observe(request.finished_at - request.submitted)
            if len(request.tokens) > 1:
                self.tpot.observe((request.finished_at - request.first_token_at) / (len(request.tokens) - 1))


@dataclass
class Choice:
    """One completion in flight: its engine request and the queue its text
    arrives on, as ("text", piece, log-probabilities of the tokens it came
    from) items and a last ("done", finish reason, the rest of them)."""

    request: EngineRequest
    queue: asyncio.Queue

    async def collect(self) -> tuple[str, str]:
        parts = []
        while True:
            kind, value, _ = await self.queue.get()
            if kind == "done":
                return "".join(parts), value
            parts.append(value)


class Front:
    """What the routes share: the engine, the tokenizer and its chat
    template, the served model's name, counts and metrics; the checks of a
    request, and the way from a request to its choices in the engine and back."""

    def __init__(self, engine: Engine, tokenizer, model_name: str, chat_template: str | None):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.chat_template = chat_template or getattr(tokenizer.backend, "chat_template", None)
        self.vocab = engine.model.cfg.vocab_size
        self.stats, self.metrics = Stats(), Metrics(engine)
        self.token_text = functools.lru_cache(maxsize=1 << 16)(lambda t: tokenizer.decode([t]))

    # -- checks -------------------------------------------------------------------------

    def engine_failed(self) -> BadRequest:
        return BadRequest(f"the engine failed and serves no more requests: {self.engine.error!r}; restart the server", None, 503)

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise BadRequest(f"model {name!r} is not served here; this server serves {self.model_name!r}", "model")

    def check_ids(self, ids: list[int], param: str) -> None:
        bad = next((t for t in ids if not 0 <= t < self.vocab), None)
        if bad is not None:
            raise BadRequest(f"{param} has token id {bad} outside the vocabulary [0, {self.vocab})", param)

    def check_common(self, body, max_tokens: int | None) -> list[str]:
        """What completions and chat share; returns the stop strings."""
        self.check_model(body.model)
        if body.stream_options is not None and not body.stream:
            raise BadRequest("stream_options is only for stream: true", "stream_options")
        if max_tokens is not None and max_tokens < 1:
            raise BadRequest(f"max_tokens must be a positive integer, got {max_tokens}", "max_tokens")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        for i, s in enumerate(stops):
            if not s:
                raise BadRequest(f"stop[{i}] is empty: a stop string must be a non-empty string", "stop")
        self.check_ids(body.stop_token_ids or [], "stop_token_ids")
        for key, bias in (body.logit_bias or {}).items():
            if not key.lstrip("-").isdigit():
                raise BadRequest(f"logit_bias key {key!r} is not a token id: its keys are token ids as strings", "logit_bias")
            self.check_ids([int(key)], "logit_bias")
            if not -100 <= bias <= 100:
                raise BadRequest(f"logit_bias[{key}] is {bias}; a bias must be in [-100, 100]", "logit_bias")
        return stops

    def fit(self, ids: list[int], max_tokens: int | None, param: str) -> int:
        """Check a prompt's length against the context; the max_tokens it gets."""
        context = self.engine.max_context
        if not ids:
            raise BadRequest(f"{param} is empty: it needs at least one token", param)
        if len(ids) >= context:
            raise BadRequest(f"{param} is {len(ids)} tokens; this model's context is {context} tokens, "
                             f"so a prompt can have at most {context - 1}", param)
        if max_tokens is None:
            return context - len(ids)
        if len(ids) + max_tokens > context:
            raise BadRequest(f"{param} of {len(ids)} tokens + max_tokens {max_tokens} exceeds the context of "
                             f"{context} tokens; max_tokens can be at most {context - len(ids)}", "max_tokens")
        return max_tokens

    # -- text ---------------------------------------------------------------------------

    def token_name(self, t: int) -> str:
        b = self.tokenizer.backend
        return b.id_to_token(t) if hasattr(b, "id_to_token") else b.convert_ids_to_tokens(t)

    def render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise BadRequest("this model's tokenizer has no chat template; use /v1/completions, or serve with a "
                             "transformers tokenizer folder whose tokenizer_config.json has one (--tokenizer)", "messages")
        if not messages:
            raise BadRequest("messages is empty", "messages")
        turns = []
        for i, m in enumerate(messages):
            content = m.content or ""
            if not isinstance(content, str):
                other = [p.type for p in content if p.type != "text"]
                if other:
                    raise BadRequest(f"messages[{i}].content has a part of type {other[0]!r}; this model reads only "
                                     "'text' parts", f"messages[{i}].content")
                content = "".join(p.text or "" for p in content)
            turns.append({"role": m.role, "content": content})
        backend = self.tokenizer.backend
        if hasattr(backend, "apply_chat_template"):  # a transformers tokenizer: its own renderer, exactly
            try:
                return backend.apply_chat_template(turns, chat_template=self.chat_template, tokenize=False,
                                                   add_generation_prompt=add_generation_prompt)
            except jinja2.TemplateError as e:
                raise BadRequest(f"the chat template refused these messages: {e}", "messages") from None
        return render_chat_template(self.chat_template, turns, add_generation_prompt,
                                    eos_token=self.token_name(self.tokenizer.eos_id))

    # -- choices in the engine ------------------------------------------------------------

    def prepare(self, ids: list[int], body, max_tokens: int, stops: list[str], choice: int, logprobs: int | None = None,
                prompt_logprobs: int | None = None) -> Choice:
        """One completion of ``ids``, to submit; its text, and its tokens'
        log-probabilities where asked, arrive on the choice's queue."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        text = TextStream(self.tokenizer, stops)
        pending = []  # log-probabilities of tokens whose text has not been sent yet
        stop_ids = set(body.stop_token_ids or ())
        eos = self.tokenizer.eos_id

        def put(*item):
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def on_token(request, token):
            if logprobs is not None:
                pending.append(request.token_logprobs[-1])
            if (token == eos and not body.ignore_eos) or token in stop_ids:
                return True
            piece = text.push(token)
            if piece:
                put("text", piece, pending[:])
                pending.clear()
            return text.stopped is not None

        def on_done(request):
            rest = text.finish() if request.finish_reason != "cancelled" else ""
            if rest:
                put("text", rest, pending[:])
                pending.clear()
            if request.finish_reason == "cancelled":
                self.stats.cancelled += 1
            else:
                self.stats.finished += 1
            self.metrics.finished(request)
            put("done", request.finish_reason, pending[:])

        greedy = body.temperature == 0
        request = EngineRequest(
            ids, max_tokens, temperature=body.temperature, top_p=None if greedy or body.top_p == 1 else body.top_p,
            top_k=None if greedy or body.top_k in (None, 0, -1) else body.top_k,
            seed=None if body.seed is None else body.seed + choice, presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty, repetition_penalty=body.repetition_penalty,
            logit_bias={int(k): v for k, v in body.logit_bias.items()} if body.logit_bias else None,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs, on_token=on_token, on_done=on_done)
        return Choice(request, queue)

    def submit(self, seqs: list[Choice]) -> list[Choice]:
        """Queue every choice of one HTTP request together (the n choices of a prompt share its prefill)."""
        try:
            self.engine.submit_all([s.request for s in seqs])
        except EngineFailed:
            raise self.engine_failed() from None
        except GenerationError as e:
            raise BadRequest(str(e), None) from None
        return seqs

    def cancel(self, seqs: list[Choice]) -> None:
        for s in seqs:
            if s.request.state != "done":
                self.engine.cancel(s.request)

    async def results(self, seqs: list[Choice], http: Request) -> list[tuple[str, str]]:
        """Every choice's text and finish reason, once all are done. A client
        that disconnects first (a timeout, a retry) cancels them: its rows are
        freed instead of decoding for nobody (checked every DISCONNECT_POLL_S)."""
        gather = asyncio.ensure_future(asyncio.gather(*(s.collect() for s in seqs)))
        try:
            while not gather.done():
                await asyncio.wait([gather], timeout=DISCONNECT_POLL_S)
                if not gather.done() and await http.is_disconnected():
                    raise BadRequest("the client disconnected", None, 499)  # nginx's code; nobody reads it
            done = gather.result()
        except (asyncio.CancelledError, BadRequest):
            gather.cancel()
            self.cancel(seqs)
            raise
        if any(reason == "error" for _, reason in done):
            raise self.engine_failed()
        return done

    def sse(self, events: AsyncIterator[dict], seqs: list[Choice]) -> StreamingResponse:
        """Server-sent events; an engine failure mid-stream becomes an error
        event, and a client that leaves cancels what it asked for."""
        async def body():
            try:
                async for event in events:
                    if any(c.get("finish_reason") == "error" for c in event.get("choices", ())):
                        # the status line has gone: the error goes in the stream, as vLLM sends it
                        yield f"data: {json.dumps(error_body(503, self.engine_failed().message, None))}\n\n"
                        break
                    yield f"data: {json.dumps(event)}\n\n"
                yield "data: [DONE]\n\n"
            finally:  # the client went away (or we finished): nothing keeps running for it
                self.cancel(seqs)
        return StreamingResponse(body(), media_type="text/event-stream")


async def interleave(seqs: list[Choice]):
    """(choice index, kind, value, log-probabilities) as each choice's items arrive, until all are done."""
    pending = {i: asyncio.ensure_future(s.queue.get()) for i, s in enumerate(seqs)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending.values(), return_when=asyncio.FIRST_COMPLETED)
            for i, fut in sorted((i, f) for i, f in pending.items() if f in done):
                kind, value, lps = fut.result()
                yield i, kind, value, lps
                if kind == "done":
                    del pending[i]
                else:
                    pending[i] = asyncio.ensure_future(seqs[i].queue.get())
    finally:
        for fut in pending.values():
            fut.cancel()


def usage(prompt_tokens: int, seqs: list[Choice]) -> dict:
    completion = sum(len(s.request.tokens) for s in seqs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def create_app(engine: Engine, tokenizer, model_name: str, api_key: str | None = None,
               chat_template: str | None = None) -> FastAPI:
    """The FastAPI app over a started or unstarted ``engine`` (the app's
    lifespan starts and stops it). With ``api_key``, every ``/v1`` route
    wants ``Authorization: Bearer <api_key>`` (vLLM's ``--api-key``).
    ``chat_template`` (Jinja, as in a tokenizer_config.json) serves chat
    completions where the tokenizer has no template, or replaces its own."""
    front = Front(engine, tokenizer, model_name, chat_template)

    async def lifespan(app):
        if engine._thread is None:
            engine.start()
        yield
        engine.stop()

    app = FastAPI(title="mixattn", lifespan=lifespan)

    @app.exception_handler(BadRequest)
    async def _bad(request: Request, exc: BadRequest):
        return error_response(exc.status, exc.message, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return error_response(400, f"the request body is not valid JSON: {first.get('msg')} "
                                       f"(at character {loc[-1] if loc else '?'})", None)
        param = ".".join(loc) or None
        value = f" (got {first['input']!r})" if "input" in first and param else ""
        return error_response(400, f"{param or 'body'}: {first.get('msg')}{value}", param)

    if api_key:
        @app.middleware("http")
        async def _auth(request: Request, call_next):
            given = request.headers.get("authorization", "")
            if request.url.path.startswith("/v1") and not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return error_response(401, "this server wants an API key: send the header 'Authorization: Bearer <key>' "
                                           "with the key it was started with (--api-key)", None)
            return await call_next(request)

    # -- the server's own routes -------------------------------------------------------

    @app.get("/health")
    async def health():
        """200 while the engine runs, 503 once it has failed (for a load balancer or a liveness probe)."""
        if engine.error is not None:
            return error_response(503, front.engine_failed().message, None)
        return {"status": "ok"}

    @app.get("/stats")
    async def get_stats():
        return {"max_slots": engine.max_slots, "max_context": engine.max_context,
                "running": engine.rows_in_use, "waiting": len(engine.waiting),
                "finished": front.stats.finished, "cancelled": front.stats.cancelled,
                "max_in_flight_tokens": engine.max_in_flight_tokens, "kv_cache_bytes": engine.cache.nbytes,
                "prefilled_tokens": engine.prefilled_tokens, "shared_prefill_tokens": engine.shared_tokens}

    @app.get("/version")
    async def version():
        return {"version": importlib.metadata.version("mixattn")}

    @app.get("/metrics")
    async def get_metrics():
        return Response(generate_latest(front.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -- tokenizer routes (vLLM's; lm-eval's local-completions tokenizes through them) ----

    @app.post("/tokenize")
    async def tokenize(body: TokenizeBody):
        front.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise BadRequest("give exactly one of prompt (a string) or messages (a chat)", "prompt")
        text = body.prompt if body.prompt is not None else front.render_chat(body.messages, body.add_generation_prompt)
        ids = tokenizer.encode_batch([text])[0]
        return {"count": len(ids), "max_model_len": engine.max_context, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeBody):
        front.check_model(body.model)
        front.check_ids(body.tokens, "tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return {"tokenizer_class": type(tokenizer.backend).__name__, "eos_token": front.token_name(tokenizer.eos_id),
                "bos_token": None, "pad_token": None, "chat_template": front.chat_template,
                "model_max_length": engine.max_context, "vocab_size": front.vocab}

    # -- OpenAI's API -------------------------------------------------------------------

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(front.stats.started),
                                            "owned_by": "mixattn", "max_model_len": engine.max_context}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: Request):
        stops = front.check_common(body, body.max_tokens)
        if body.best_of is not None and body.best_of != body.n:
            raise BadRequest(f"best_of {body.best_of} is not supported here (only best_of = n, which is the default)", "best_of")
        if body.suffix:
            raise BadRequest("suffix (insertion) is not supported by this model", "suffix")
        if isinstance(body.prompt, str) or (body.prompt and isinstance(body.prompt[0], int)):
            prompts = [body.prompt]
        else:
            prompts = body.prompt
        if not prompts:
            raise BadRequest("prompt is an empty list", "prompt")
        params = ["prompt" if len(prompts) == 1 else f"prompt[{i}]" for i in range(len(prompts))]
        encoded = []
        for p, param in zip(prompts, params):
            if isinstance(p, str):
                encoded.append(tokenizer.encode_batch([p])[0])
            else:
                front.check_ids(p, param)
                encoded.append(list(p))
        budgets = [front.fit(ids, body.max_tokens, param) for ids, param in zip(encoded, params)]
        texts = [p if isinstance(p, str) else tokenizer.decode(p) for p in prompts]
        echo_logprobs = body.logprobs if body.echo else None
        seqs = front.submit([front.prepare(ids, body, m, stops, j, body.logprobs, echo_logprobs)
                       for ids, m in zip(encoded, budgets) for j in range(body.n)])
        source = [i // body.n for i in range(len(seqs))]  # choice i completes prompt source[i]
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": cid, "object": "text_completion", "created": created, "model": model_name}
        prompt_tokens = sum(map(len, encoded))

        def prompt_part(i: int) -> tuple[str, dict | None]:
            """Choice i's echo: the prompt's text and, with logprobs, its tokens' (ready once the prompt is prefilled)."""
            ids = encoded[source[i]]
            entries = [None, *seqs[i].request.prompt_token_logprobs]
            return texts[source[i]], legacy_logprobs(entries, ids, front.token_text) if body.logprobs is not None else None

        def choice(i: int, text: str, reason: str | None, logprobs: dict | None) -> dict:
            return {"index": i, "text": text, "finish_reason": reason, "logprobs": logprobs}

        if body.stream:
            async def events():
                echoed = set()
                offsets = [0] * len(seqs)
                async for i, kind, value, lps in interleave(seqs):
                    if body.echo and i not in echoed:  # the prompt's logprobs are complete once its first token came
                        echoed.add(i)
                        text, logprobs = prompt_part(i)
                        offsets[i] = len(text)
                        yield {**head, "choices": [choice(i, text, None, logprobs)]}
                    done = kind == "done"
                    text = "" if done else value
                    logprobs = None
                    if body.logprobs is not None:
                        logprobs = legacy_logprobs(lps, [e.token for e in lps], front.token_text, offsets[i])
                        offsets[i] += sum(len(p) for p in logprobs["tokens"])
                    yield {**head, "choices": [choice(i, text, value if done else None, logprobs)]}
                if body.stream_options and body.stream_options.include_usage:
                    yield {**head, "choices": [], "usage": usage(prompt_tokens, seqs)}
            return front.sse(events(), seqs)
        done = await front.results(seqs, http)
        choices = []
        for i, ((text, reason), s) in enumerate(zip(done, seqs)):
            logprobs = None
            echo_text, echo_logprobs = prompt_part(i) if body.echo else ("", None)
            if body.logprobs is not None:
                new = legacy_logprobs(s.request.token_logprobs, s.request.tokens, front.token_text, len(echo_text))
                logprobs = {k: (echo_logprobs or {}).get(k, []) + new[k] for k in new}
            choices.append(choice(i, echo_text + text, reason, logprobs))
        return {**head, "choices": choices, "usage": usage(prompt_tokens, seqs)}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, http: Request):
        max_tokens = body.max_completion_tokens or body.max_tokens
        stops = front.check_common(body, max_tokens)
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise BadRequest(f"response_format {body.response_format.get('type')!r} is not supported here (only 'text'): "
                             "this server does not constrain decoding", "response_format")
        if body.tools:
            raise BadRequest("tools (function calling) are not supported by this server", "tools")
        if body.top_logprobs is not None and not body.logprobs:
            raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
        ids = tokenizer.encode_batch([front.render_chat(body.messages)])[0]
        max_tokens = front.fit(ids, max_tokens or max(1, min(512, engine.max_context // 4, engine.max_context - len(ids))),
                         "messages")
        top = (body.top_logprobs or 0) if body.logprobs else None
        seqs = front.submit([front.prepare(ids, body, max_tokens, stops, j, top) for j in range(body.n)])
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_name}
        if body.stream:
            async def events():
                for j in range(body.n):
                    yield {**head, "choices": [{"index": j, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
                async for j, kind, value, lps in interleave(seqs):
                    done = kind == "done"
                    out = {"index": j, "delta": {} if done else {"content": value}, "finish_reason": value if done else None}
                    if top is not None:
                        out["logprobs"] = chat_logprobs(lps, front.token_text)
                    yield {**head, "choices": [out]}
                if body.stream_options and body.stream_options.include_usage:
                    yield {**head, "choices": [], "usage": usage(len(ids), seqs)}
            return front.sse(events(), seqs)
        done = await front.results(seqs, http)
        return {**head, "object": "chat.completion", "choices": [
            {"index": j, "message": {"role": "assistant", "content": content}, "finish_reason": reason,
             "logprobs": chat_logprobs(s.request.token_logprobs, front.token_text) if top is not None else None}
            for j, ((content, reason), s) in enumerate(zip(done, seqs))], "usage": usage(len(ids), seqs)}

    return app
