"""Batched generation over the plan-shaped KV cache: chunked prefill of
right-padded prompts, then one token per step (optionally a compiled,
static-shape decode step), greedy or sampled."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mixattn.attention import CACHED_ATTENTION
from mixattn.kv_cache import KVCache
from mixattn.model import MixAttentionLM


class GenerationError(ValueError):
    pass


@dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per prompt (a stop token included, nothing after it)
    cache_bytes: int  # K/V bytes of the cache used
    prompt_lengths: list[int]


def new_cache(model: MixAttentionLM, batch_size: int, max_context: int, dtype: torch.dtype | None = None,
              attention: str = "sdpa") -> KVCache:
    cfg = model.cfg
    if max_context > cfg.max_seq_len:
        raise GenerationError(f"a context of {max_context} tokens exceeds the model's max_seq_len {cfg.max_seq_len}")
    weight = model.embed.weight
    return KVCache(model.plan, batch_size=batch_size, max_context=max_context, n_kv_heads=cfg.n_kv_heads,
                   head_dim=cfg.head_dim, dtype=dtype or weight.dtype, device=weight.device, attention=attention)


@torch.no_grad()
def prefill(model: MixAttentionLM, cache: KVCache, prompts: Sequence[Sequence[int]], chunk_size: int = 512) -> torch.Tensor:
    """Run right-padded prompts through the model in chunks of ``chunk_size``
    tokens (a sliding layer then never holds more than W + chunk keys) and
    return each row's logits at its last prompt token, [B, vocab]."""
    device = cache.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    longest = int(lengths.max())
    ids = torch.zeros(len(prompts), longest, dtype=torch.long, device=device)
    for r, p in enumerate(prompts):
        ids[r, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
    last = torch.empty(len(prompts), model.cfg.vocab_size, device=device, dtype=torch.float32)
    for start in range(0, longest, chunk_size):
        end = min(start + chunk_size, longest)
        positions = torch.arange(start, end, device=device).expand(len(prompts), -1)
        valid = positions < lengths[:, None]
        logits = model.forward_cached(ids[:, start:end], positions, cache, valid, upto=end)
        rows = ((lengths - 1) >= start) & ((lengths - 1) < end)
        if rows.any():
            idx = (lengths - 1 - start).clamp(0, end - start - 1)
            picked = logits[torch.arange(len(prompts), device=device), idx].float()
            last[rows] = picked[rows]
    return last


@torch.no_grad()
def decode_step(model: MixAttentionLM, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor,
                valid: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row: tokens, positions [B, 1] -> logits [B, vocab]. Static
    shapes (the whole cache is attended with a position mask), so it can be
    wrapped in torch.compile(mode="reduce-overhead") / CUDA graphs. ``valid``
    [B, 1] (a continuous batch): rows where it is False write nothing a later
    step sees."""
    return model.forward_cached(tokens, positions, cache, valid)[:, -1]


def compiled_decode_step():
    """:func:`decode_step` through torch.compile as one graph (fullgraph: no
    breaks, a static shape per cache): inductor fuses the per-layer glue. Pass
    it as ``generate(..., step_fn=compiled_decode_step())``; the first step of
    each new batch/context shape compiles."""
    return torch.compile(decode_step, fullgraph=True, dynamic=False)


def sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
           generator: torch.Generator | None) -> torch.Tensor:
    """[B, V] logits -> [B] token ids. temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _validate(model, prompts, max_new_tokens, temperature, top_k, top_p, stop_tokens, chunk_size):
    vocab = model.cfg.vocab_size
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise GenerationError("prompts must be a non-empty list of token-id lists")
    for r, p in enumerate(prompts):
        if len(p) == 0:
            raise GenerationError(f"prompt {r} is empty; every prompt needs at least one token")
        bad = [t for t in p if not 0 <= int(t) < vocab]
        if bad:
            raise GenerationError(f"prompt {r} has token id {bad[0]} outside the vocabulary [0, {vocab})")
    if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise GenerationError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > model.cfg.max_seq_len:
        room = model.cfg.max_seq_len - longest
        fix = (f"max_new_tokens can be at most {room} for this prompt" if room > 0 else
               f"the prompt alone does not leave room for one new token: shorten it to at most {model.cfg.max_seq_len - 1} tokens")
        if room > 0 and max_new_tokens < model.cfg.max_seq_len:
            fix += f", or shorten the prompt to at most {model.cfg.max_seq_len - max_new_tokens} tokens"
        raise GenerationError(
            f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} = {longest + max_new_tokens} exceeds the model's "
            f"max_seq_len {model.cfg.max_seq_len}; {fix}")
    if temperature < 0:
        raise GenerationError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise GenerationError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise GenerationError(f"top_p must be in (0, 1], got {top_p}")
    for t in stop_tokens:
        if not 0 <= int(t) < vocab:
            raise GenerationError(f"stop token {t} is outside the vocabulary [0, {vocab})")
    if chunk_size < 1:
        raise GenerationError(f"chunk_size must be >= 1, got {chunk_size}")


@torch.no_grad()
def generate(
    model: MixAttentionLM,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] = (),
    seed: int | None = None,
    chunk_size: int = 512,
    on_token: Callable[[int, int], None] | None = None,
    step_fn: Callable | None = None,
    cache_dtype: torch.dtype | None = None,
    attention: str = "sdpa",
) -> Generation:
    """Generate up to ``max_new_tokens`` tokens for each prompt (lists of
    token ids; lengths may differ). Greedy when temperature is 0, else
    sampling with optional top-k / top-p, reproducible with ``seed``. A row
    stops after emitting one of ``stop_tokens``. ``on_token(row, token)`` is
    called for every new token as it is produced (streaming); when it returns
    True that row ends there (a stop string, :class:`mixattn.detokenize.TextStream`). ``step_fn``
    replaces :func:`decode_step` (e.g. a compiled one); ``attention`` picks how
    queries read the cache (``sdpa`` or ``matmul``, see
    :data:`mixattn.attention.CACHED_ATTENTION`). The cache is sized to
    the longest prompt + max_new_tokens; everything is validated before it is
    allocated."""
    _validate(model, prompts, max_new_tokens, temperature, top_k, top_p, stop_tokens, chunk_size)
    if attention not in CACHED_ATTENTION:
        raise GenerationError(f"unknown attention {attention!r}; valid: {', '.join(sorted(CACHED_ATTENTION.names()))}")
    model.eval()
    b = len(prompts)
    lengths = [len(p) for p in prompts]
    cache = new_cache(model, b, max(lengths) + max_new_tokens, cache_dtype, attention)
    device = cache.device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    step = step_fn or decode_step
    stops = torch.tensor(sorted({int(t) for t in stop_tokens}) or [-1], device=device)
    logits = prefill(model, cache, prompts, chunk_size)
    positions = torch.tensor(lengths, device=device)[:, None]
    done = torch.zeros(b, dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in range(b)]
    for i in range(max_new_tokens):
        token = sample(logits, temperature, top_k, top_p, generator)
        ended = []
        for r, t in enumerate(token.tolist()):
            if not done[r]:
                out[r].append(t)
                if on_token is not None and on_token(r, t):
                    ended.append(r)
        done |= torch.isin(token, stops)
        if ended:
            done[ended] = True
        if bool(done.all()) or i == max_new_tokens - 1:
            break
        logits = step(model, cache, token[:, None], positions)
        positions = positions + 1
    return Generation(out, cache.nbytes, lengths)
