"""Continuous batching over the plan-shaped KV cache: many requests of
different lengths, admitted as rows free up, prefilled in chunks between
decode steps, each streaming its tokens.

The cache is one :class:`~mixattn.kv_cache.KVCache` of ``max_slots`` rows
(each row: ``max_context`` tokens for every global owner, a ring of the
window for every sliding owner, nothing for sharers), so its size is the
plan's: a MixAttention model fits many more rows in the same memory than
standard attention (``max_slots_for``). A request takes a row when one is free
and waits otherwise; a finished or cancelled request's row is emptied and
reused at the next step. Rows are fixed-size slots, as in gpt-fast and
transformers' static cache; vLLM-style paging of the global layers (rows
sized by each request's own length) is not done.

One :meth:`Engine.step` does, in order:

1. admit waiting requests into free rows (first come, first served);
2. prefill: chunks of at most ``chunk_size`` prompt tokens, oldest
   prefilling request first, until ``prefill_budget`` tokens (default
   ``PREFILL_BUDGET`` = 8192, or one chunk if that is larger, as vLLM's
   ``max_num_batched_tokens``) have been prefilled this step; each chunk on its
   request's row alone (``KVCache.rows``), the same chunks ``generate``
   uses (the budget never cuts one); the chunk that ends a prompt gives its
   first token. A larger budget spends fewer decode steps while rows are
   still prefilling (vLLM's ``max_num_batched_tokens`` trade: throughput
   for the decoding rows' time per token). Rows that wait with the same
   prompt (``n`` choices, queued together by ``submit_all``) are not
   prefilled: when the first finishes its prompt, its row is copied to
   theirs (``KVCache.copy_row``) and each samples its own first token;
3. decode: one token for every decoding row in one batched forward of static
   shape (rows that are not decoding are masked out of the cache writes), so
   the step can be compiled once.

Greedy outputs equal ``mixattn.generate.generate`` on each prompt alone
(tests/test_engine.py, every preset). ``Engine.start()`` runs the loop in a
thread for a server; ``run()`` runs it to completion in the caller's.
"""

from __future__ import annotations

import itertools
import math
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from mixattn.generate import DecodePath, GenerationError, new_cache, sample
from mixattn.model import MixAttentionLM
from mixattn.plan import kv_cache_bytes

WAITING, PREFILL, DECODE, DONE = "waiting", "prefill", "decode", "done"
PREFILL_BUDGET = 8192  # prompt tokens prefilled per engine step by default (benchmarks/serving.py measures it)
_ids = itertools.count()


class EngineFailed(GenerationError):
    """The engine's loop died on an error: no request can be served."""


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability at its step, and the ``top`` most likely
    tokens there as (id, log-probability), most likely first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(eq=False)
class Request:
    """One sequence to complete. ``on_token(request, token)`` is called, in
    the engine's thread, for every new token; returning True ends the request
    there (a stop string). ``on_done(request)`` is called once at the end."""

    prompt: Sequence[int]
    max_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_tokens: Sequence[int] = ()
    # what changes the next-token distribution before sampling (OpenAI's and vLLM's): logit_bias adds to
    # a token's logit; repetition_penalty divides a positive logit (multiplies a negative one) of every token
    # of the prompt or the output; frequency_penalty subtracts per time a token was generated, presence_penalty
    # once if it was
    logit_bias: dict[int, float] | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    # log-probabilities, of the model's own distribution (before the changes above, temperature or top-k/p,
    # as vLLM's default): ``logprobs=k`` gives each new token's and the k most likely tokens' at its step
    # (``token_logprobs``, appended before ``on_token`` sees the token); ``prompt_logprobs=k`` the same for
    # every prompt token after the first (``prompt_token_logprobs``), computed as the prompt is prefilled
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    on_token: Callable[[Request, int], bool | None] | None = None
    on_done: Callable[[Request], None] | None = None
    id: int = field(default_factory=lambda: next(_ids))
    # filled in by the engine
    state: str = WAITING
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS, stop token or string), "length", "cancelled"
    row: int | None = None
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    token_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_token_logprobs: list[TokenLogprob] = field(default_factory=list)
    _prefilled: int = 0
    _key: int = 0  # hash of the prompt (twins: _fork)
    _counts: torch.Tensor | None = None  # [vocab] times each token was generated (frequency/presence penalty)
    _seen: torch.Tensor | None = None  # [vocab] bool: in the prompt or the output (repetition penalty)
    _cancel: bool = False
    _generator: torch.Generator | None = None
    _done_event: threading.Event = field(default_factory=threading.Event)

    @property
    def reshapes_logits(self) -> bool:
        """Whether a bias or a penalty changes this request's logits before sampling."""
        return bool(self.logit_bias) or self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 \
            or self.presence_penalty != 0.0

    def cancel(self) -> None:
        """Stop this request; its row is freed at the engine's next step."""
        self._cancel = True

    def wait(self, timeout: float | None = None) -> bool:
        return self._done_event.wait(timeout)


def max_slots_for(model: MixAttentionLM, max_context: int, budget_bytes: int, dtype: torch.dtype | None = None) -> int:
    """How many rows of ``max_context`` tokens the plan-shaped cache fits in
    ``budget_bytes`` (K/V only: weights, activations and logits are the
    caller's to leave room for)."""
    cfg = model.cfg
    per_row = kv_cache_bytes(model.plan, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, context_len=max_context,
                             batch_size=1, dtype=dtype or model.embed.weight.dtype)
    return max(0, budget_bytes // per_row)


class Engine:
    def __init__(self, model: MixAttentionLM, *, max_slots: int, max_context: int | None = None, chunk_size: int = 512,
                 prefill_budget: int | None = None, attention: str = "auto", step_fn: Callable | None = None,
                 cache_dtype: torch.dtype | None = None, decode: DecodePath | None = None):
        if max_slots < 1:
            raise GenerationError(f"max_slots must be >= 1, got {max_slots}")
        if chunk_size < 1:
            raise GenerationError(f"chunk_size must be >= 1, got {chunk_size}")
        if prefill_budget is not None and prefill_budget < 1:
            raise GenerationError(f"prefill_budget must be >= 1 prompt token per step, got {prefill_budget}")
        self.decode_path = decode or DecodePath.resolve(model.embed.weight.device, attention=attention)
        self.model = self.decode_path.prepare(model.eval())
        self.max_context = max_context or model.cfg.max_seq_len
        self.max_slots, self.chunk_size = max_slots, chunk_size
        self.prefill_budget = prefill_budget or max(chunk_size, PREFILL_BUDGET)
        self.cache = new_cache(model, max_slots, self.max_context, cache_dtype, self.decode_path.attention,
                               self.decode_path.prefill)
        self.device = self.cache.device
        self.step_fn = step_fn or self.decode_path.step_fn()  # the decode step: static shape, one graph on a GPU
        self.waiting: deque[Request] = deque()
        self.rows: list[Request | None] = [None] * max_slots
        self.max_in_flight_tokens = 0  # the most prompt + generated tokens held in the cache at once
        self.prefilled_tokens = 0  # prompt tokens run through the model
        self.shared_tokens = 0  # prompt tokens copied from a twin's row instead (``_fork``)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stop = False
        self.error: BaseException | None = None

    # -- requests -----------------------------------------------------------------

    def submit(self, request: Request) -> Request:
        """Queue ``request`` (checked first: a request that can never fit is
        refused, naming why; one that fits waits for a free row)."""
        return self.submit_all([request])[0]

    def submit_all(self, requests: Sequence[Request]) -> list[Request]:
        """Queue ``requests`` together, or none of them if one is refused: the
        ``n`` choices of a prompt are admitted in one step where rows are
        free, so its prefill is shared (``_fork``)."""
        for request in requests:
            self._check(request)
        with self._wake:
            if self.error is not None:  # under the lock: the failing loop fails every queued request under it too
                raise EngineFailed(f"the engine stopped after an error and takes no more requests: {self.error!r}")
            self.waiting.extend(requests)
            self._wake.notify()
        return list(requests)

    def _check(self, request: Request) -> None:
        """Refuse a request that can never be served, naming why; set up its sampling state."""
        vocab = self.model.cfg.vocab_size
        if len(request.prompt) == 0:
            raise GenerationError("the prompt is empty; it needs at least one token")
        ids = tuple(int(t) for t in request.prompt)  # read once: the id check, the twin key, the repetition mask
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise GenerationError(f"the prompt has token id {bad[0]} outside the vocabulary [0, {vocab})")
        if not isinstance(request.max_tokens, int) or request.max_tokens < 1:
            raise GenerationError(f"max_tokens must be a positive integer, got {request.max_tokens!r}")
        total = len(request.prompt) + request.max_tokens
        if total > self.max_context:
            room = self.max_context - len(request.prompt)
            fix = f"max_tokens can be at most {room}" if room > 0 else f"the prompt must be shorter than {self.max_context} tokens"
            raise GenerationError(f"a prompt of {len(request.prompt)} tokens + max_tokens {request.max_tokens} = {total} "
                                  f"exceeds the context of {self.max_context} tokens; {fix}")
        if request.temperature < 0:
            raise GenerationError(f"temperature must be >= 0, got {request.temperature}")
        if request.top_p is not None and not 0 < request.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {request.top_p}")
        if request.top_k is not None and request.top_k < 1:
            raise GenerationError(f"top_k must be >= 1, got {request.top_k}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(request, name)
            if k is not None and not (isinstance(k, int) and 0 <= k <= vocab):
                raise GenerationError(f"{name} must be an integer in [0, {vocab}] (how many most likely tokens to "
                                      f"report with each token's own), got {k!r}")
        if not (math.isfinite(request.repetition_penalty) and request.repetition_penalty > 0):
            raise GenerationError(f"repetition_penalty must be a positive number (1 = none), got {request.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not math.isfinite(getattr(request, name)):
                raise GenerationError(f"{name} must be a finite number (0 = none), got {getattr(request, name)}")
        for t, bias in (request.logit_bias or {}).items():
            if not (isinstance(t, int) and 0 <= t < vocab):
                raise GenerationError(f"logit_bias has token id {t!r} outside the vocabulary [0, {vocab})")
            if not math.isfinite(bias):
                raise GenerationError(f"logit_bias[{t}] must be a finite number, got {bias}")
        request._key = hash(ids)
        if request.seed is not None:
            request._generator = torch.Generator(device=self.device).manual_seed(request.seed)
        if request.frequency_penalty or request.presence_penalty:
            request._counts = torch.zeros(vocab, dtype=torch.float32, device=self.device)
        if request.repetition_penalty != 1.0:
            request._seen = torch.zeros(vocab, dtype=torch.bool, device=self.device)
            request._seen[torch.tensor(ids, dtype=torch.long, device=self.device)] = True

    def cancel(self, request: Request) -> None:
        request.cancel()
        with self._wake:
            self._wake.notify()

    @property
    def rows_in_use(self) -> int:
        """Rows held by a request (prefilling or decoding)."""
        return sum(r is not None for r in self.rows)

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.rows)

    # -- the loop -----------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> bool:
        """One round of admit, prefill and decode; False when there was nothing to do."""
        with self._lock:
            self._reap_cancelled()
            self._admit()
        prefilling = [r for r in self.rows if r is not None and r.state == PREFILL]
        decoding = [r for r in self.rows if r is not None and r.state == DECODE]
        if not prefilling and not decoding:
            return False
        self.max_in_flight_tokens = max(self.max_in_flight_tokens, sum(
            r._prefilled + len(r.tokens) for r in self.rows if r is not None))
        budget = self.prefill_budget
        for request in sorted(prefilling, key=lambda r: r.submitted):
            if self._twin_prefilling(request):
                continue  # its prompt is being prefilled on another row: it gets a copy at the end (_fork)
            while budget > 0 and request.state == PREFILL and not request._cancel:
                budget -= self._prefill_chunk(request)
            if budget <= 0:
                break
        if decoding:
            self._decode(decoding)
        return True

    def run(self) -> None:
        """Step until every submitted request has finished."""
        while self.busy:
            self.step()

    def start(self) -> Engine:
        """Run the loop in a daemon thread (for a server); ``stop()`` ends it."""
        self._thread = threading.Thread(target=self._loop, name="mixattn-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._stop and not self.busy:
                        self._wake.wait()
                    if self._stop:
                        return
                self.step()
        except BaseException as e:  # noqa: BLE001 - every waiting request must hear of it
            with self._wake:
                self.error = e
                for r in [*self.waiting, *(r for r in self.rows if r is not None)]:
                    self._finish(r, "error")
            print("mixattn engine: the loop stopped on this error; every request in it ended with 'error', and new ones "
                  "are refused (EngineFailed):", file=sys.stderr)
            traceback.print_exception(e, file=sys.stderr)

    # -- internals ------------------------------------------------------------------

    def _admit(self) -> None:
        for row, held in enumerate(self.rows):
            if held is not None:
                continue
            while self.waiting and self.waiting[0]._cancel:
                self._finish(self.waiting.popleft(), "cancelled")
            if not self.waiting:
                return
            request = self.waiting.popleft()
            self.cache.clear_row(row)
            request.row, request.state = row, PREFILL
            self.rows[row] = request

    def _reap_cancelled(self) -> None:
        for request in self.rows:
            if request is not None and request._cancel:
                self._finish(request, "cancelled")

    def _finish(self, request: Request, reason: str) -> None:
        if request.state == DONE:
            return
        request.state, request.finish_reason, request.finished_at = DONE, reason, time.perf_counter()
        if request.row is not None and self.rows[request.row] is request:
            self.rows[request.row] = None  # the row is emptied when the next request takes it
        try:
            self.waiting.remove(request)
        except ValueError:
            pass
        if request.on_done is not None:
            request.on_done(request)
        request._done_event.set()

    def _sample(self, requests: list[Request], logits: torch.Tensor) -> list[tuple[int, TokenLogprob | None]]:
        """Each request's next token from its row of ``logits`` [len(requests),
        vocab], with its log-probability where it asked: the greedy rows that
        nothing reshapes by one argmax and one copy to the host, the others one
        by one (each has its own generator, bias and penalties)."""
        tokens: list[int | None] = [None] * len(requests)
        greedy = [i for i, r in enumerate(requests) if r.temperature == 0 and not r.reshapes_logits]
        if greedy:
            picked = logits if len(greedy) == len(requests) else logits[torch.tensor(greedy, device=logits.device)]
            for i, t in zip(greedy, picked.argmax(dim=-1).tolist()):
                tokens[i] = t
        for i, r in enumerate(requests):
            if tokens[i] is None:
                row = _reshape(r, logits[i][None].float()) if r.reshapes_logits else logits[i][None].float()
                tokens[i] = int(sample(row, r.temperature, r.top_k, r.top_p, r._generator)[0])
        logprobs: list[TokenLogprob | None] = [None] * len(requests)
        asked = [i for i, r in enumerate(requests) if r.logprobs is not None]
        if asked:
            rows = logits if len(asked) == len(requests) else logits[torch.tensor(asked, device=logits.device)]
            for i, lp in zip(asked, _token_logprobs(rows, [tokens[i] for i in asked], [requests[i].logprobs for i in asked])):
                logprobs[i] = lp
        return list(zip(tokens, logprobs))

    def _emit(self, request: Request, token: int, logprob: TokenLogprob | None = None) -> None:
        """Deliver the request's next token."""
        if request.first_token_at is None:
            request.first_token_at = time.perf_counter()
        request.tokens.append(token)
        if logprob is not None:
            request.token_logprobs.append(logprob)
        if request._counts is not None:
            request._counts[token] += 1
        if request._seen is not None:
            request._seen[token] = True
        ended = request.on_token is not None and bool(request.on_token(request, token))
        if ended or token in request.stop_tokens:
            self._finish(request, "stop")
        elif len(request.tokens) >= request.max_tokens:
            self._finish(request, "length")
        else:
            request.state = DECODE

    def _prefill_chunk(self, request: Request) -> int:
        """Prefill the request's next chunk (generate's chunking); returns its
        length. The output head runs only at the prompt's last token."""
        start = request._prefilled
        end = min(start + self.chunk_size, len(request.prompt))
        ids = torch.tensor(list(request.prompt[start:end]), dtype=torch.long, device=self.device)[None]
        positions = torch.arange(start, end, device=self.device)[None]
        row = self.cache.rows(request.row, request.row + 1)
        # a full chunk continues the row's cached prefix (cleared, then prefilled from position 0 in order)
        hidden = self.model.hidden_states(ids, positions, cache=row, upto=end, contiguous=end - start == self.chunk_size)
        request._prefilled = end
        if request.prompt_logprobs is not None:
            # positions start..end-1 predict prompt tokens start+1..end; the prompt's last position predicts
            # the first new token instead (sampled below)
            n = min(end, len(request.prompt) - 1) - start
            if n > 0:
                targets = [int(t) for t in request.prompt[start + 1:start + 1 + n]]
                request.prompt_token_logprobs.extend(
                    _token_logprobs(self.model.logits(hidden[0, :n]), targets, [request.prompt_logprobs] * n))
        self.prefilled_tokens += end - start
        if end == len(request.prompt):
            group = [request, *self._fork(request)]
            logits = self.model.logits(hidden[:, -1])
            for r, (token, logprob) in zip(group, self._sample(group, logits.expand(len(group), -1))):
                self._emit(r, token, logprob)
        return end - start

    def _twin_prefilling(self, request: Request) -> bool:
        """Whether another row is part-way through prefilling the same prompt
        (so this one, not started, waits for its copy)."""
        return request._prefilled == 0 and any(
            q is not request and q.state == PREFILL and q._prefilled > 0 and _twins(q, request) for q in self.rows if q is not None)

    def _fork(self, request: Request) -> list[Request]:
        """The rows that wait with the prompt ``request`` has just prefilled
        (``n`` choices of one prompt, or the same prompt sent twice) get its
        row's cache copied, instead of a prefill of their own; they sample
        their first token from the same logits. Like vLLM's prefix sharing
        for parallel sampling, it changes no output: a copy holds exactly what
        the same prefill would write."""
        twins = [q for q in self.rows if q is not None and q is not request and q.state == PREFILL and q._prefilled == 0
                 and not q._cancel and _twins(request, q)]
        for q in twins:
            self.cache.copy_row(request.row, q.row, len(request.prompt))
            q._prefilled = len(q.prompt)
            q.prompt_token_logprobs = list(request.prompt_token_logprobs)
            self.shared_tokens += len(q.prompt)
        return twins

    def _decode(self, decoding: list[Request]) -> None:
        # the step's inputs are built on the host and copied once each (not one tiny copy per row)
        b = self.max_slots
        tokens, positions, valid = [0] * b, [0] * b, [False] * b
        for r in self.rows:
            # every held row points at its next slot, not yet written, so the rows that do not
            # decode this step touch nothing they hold (position 0 would blank a global layer's
            # first key: a row whose prompt was finished by this step's prefill is one of them)
            if r is not None:
                positions[r.row] = r._prefilled if r.state == PREFILL else len(r.prompt) + len(r.tokens) - 1
        for r in decoding:
            tokens[r.row], valid[r.row] = r.tokens[-1], True
        dev = self.device
        logits = self.step_fn(self.model, self.cache, torch.tensor(tokens, device=dev)[:, None],
                              torch.tensor(positions, device=dev)[:, None], torch.tensor(valid, device=dev)[:, None])
        live = [r for r in decoding if r.state == DECODE and not r._cancel]
        if live:
            rows = torch.tensor([r.row for r in live], device=dev)
            for r, (t, lp) in zip(live, self._sample(live, logits[rows])):
                self._emit(r, t, lp)


def _twins(a: Request, b: Request) -> bool:
    """Same prompt, and the same prompt log-probabilities asked for (what a prefill computes)."""
    return a._key == b._key and a.prompt_logprobs == b.prompt_logprobs and list(a.prompt) == list(b.prompt)


def _reshape(request: Request, logits: torch.Tensor) -> torch.Tensor:
    """[1, vocab] float32 logits after the request's logit bias and penalties
    (vLLM's order: bias, then repetition, frequency and presence penalties)."""
    if request.logit_bias:
        ids = torch.tensor(list(request.logit_bias), dtype=torch.long, device=logits.device)
        logits = logits.index_add(1, ids, torch.tensor([list(request.logit_bias.values())], dtype=logits.dtype,
                                                        device=logits.device))
    if request._seen is not None:
        p = request.repetition_penalty
        logits = torch.where(request._seen, torch.where(logits > 0, logits / p, logits * p), logits)
    if request._counts is not None:
        logits = logits - request.frequency_penalty * request._counts - request.presence_penalty * (request._counts > 0)
    return logits


def _token_logprobs(logits: torch.Tensor, tokens: Sequence[int], top: Sequence[int]) -> list[TokenLogprob]:
    """For each row of ``logits`` [n, vocab]: the log-probability (float32
    log-softmax) of ``tokens[i]`` and the ``top[i]`` most likely tokens',
    computed for all rows at once (three copies to the host, not three a row)."""
    logp = logits.float().log_softmax(-1)
    chosen = logp.gather(1, torch.tensor(list(tokens), dtype=torch.long, device=logp.device)[:, None])[:, 0].tolist()
    k = max(top)
    values, ids = (logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long()))
    values, ids = values.tolist(), ids.tolist()
    return [TokenLogprob(t, c, tuple(zip(i[:n], v[:n]))) for t, c, i, v, n in zip(tokens, chosen, ids, values, top)]
