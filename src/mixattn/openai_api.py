"""OpenAI's API as ``mixattn serve`` takes and answers it: the request
bodies (pydantic schemas, with vLLM's extensions), errors in OpenAI's shape,
chat templates rendered as transformers renders them, and the
``logprobs`` objects of completions and chat completions."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jinja2
from fastapi.responses import JSONResponse
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import BaseModel, ConfigDict, Field

from mixattn.engine import TokenLogprob

MAX_LOGPROBS = 20  # the most alternatives a token's log-probabilities may list (OpenAI's top_logprobs limit)
MAX_N = 16  # the most completions one request may ask for per prompt
DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Body(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="ignore")  # fields of OpenAI's API that change no output here (user, metadata, ...)

    model: str
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # vLLM's: None, 0 or -1 = off
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0)  # vLLM's
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False  # vLLM's: generate max_tokens whatever the model says
    stop_token_ids: list[int] | None = None  # vLLM's: tokens that end the request (their text is not sent)


class CompletionBody(_Body):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16  # None: the rest of the context, as vLLM
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class TextPart(BaseModel):
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    role: str
    content: str | list[TextPart] | None = None


class ChatBody(_Body):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: dict | None = None
    tools: list | None = None


class TokenizeBody(BaseModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = False  # nothing is added either way: the tokenizers here add no BOS


class DetokenizeBody(BaseModel):
    model: str | None = None
    tokens: list[int]


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool, **special) -> str:
    """A chat template rendered as transformers renders it, for a tokenizer
    that is not a transformers one (a tokenizer.json): Jinja in a sandbox,
    with ``messages``, ``add_generation_prompt``, the special tokens and
    ``raise_exception``; a template that raises answers 400."""
    def raise_exception(message):
        raise BadRequest(f"the chat template refused these messages: {message}", "messages")

    try:
        compiled = chat_template_env().from_string(template)
    except jinja2.TemplateError as e:
        raise BadRequest(f"the chat template does not compile: {e}", "messages") from None
    return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, raise_exception=raise_exception,
                           **special)


@functools.cache
def chat_template_env():
    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])


class BadRequest(Exception):
    """A request the server refuses: its status (400 unless said), message and the field at fault."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


def error_body(status: int, message: str, param: str | None) -> dict:
    kind = {401: "authentication_error"}.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_body(status, message, param))


def legacy_logprobs(entries: list[TokenLogprob | None], tokens: list[int], token_text: Callable[[int], str],
                    offset: int = 0) -> dict:
    """OpenAI's completions ``logprobs`` object: each token's text, its
    log-probability (None for a prompt's first token), the most likely
    tokens' (the token's own always among them) and its character offset."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t, e in zip(tokens, entries):
        piece = token_text(t)
        out["tokens"].append(piece)
        out["text_offset"].append(offset)
        offset += len(piece)
        out["token_logprobs"].append(None if e is None else e.logprob)
        out["top_logprobs"].append(None if e is None else {**{token_text(i): v for i, v in e.top}, piece: e.logprob})
    return out


def chat_logprobs(entries: list[TokenLogprob], token_text: Callable[[int], str]) -> dict:
    """OpenAI's chat ``logprobs`` object: each token with its bytes and its ``top_logprobs``."""
    def one(t, v):
        piece = token_text(t)
        return {"token": piece, "logprob": v, "bytes": list(piece.encode())}
    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(i, v) for i, v in e.top]} for e in entries]}
