"""Batched generation over the plan-shaped KV cache: chunked prefill of
right-padded prompts, then one token per step (optionally a compiled,
static-shape decode step), greedy or sampled."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mixattn.attention import CACHED_ATTENTION
from mixattn.kv_cache import PREFILL_MODES, KVCache
from mixattn.model import GeluMLP, MixAttentionLM, SwiGLU


class GenerationError(ValueError):
    pass


@dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per prompt (a stop token included, nothing after it)
    cache_bytes: int  # K/V bytes of the cache used
    prompt_lengths: list[int]


def new_cache(model: MixAttentionLM, batch_size: int, max_context: int, dtype: torch.dtype | None = None,
              attention: str = "sdpa", prefill: str = "masked") -> KVCache:
    cfg = model.cfg
    if max_context > cfg.max_seq_len:
        raise GenerationError(f"a context of {max_context} tokens exceeds the model's max_seq_len {cfg.max_seq_len}")
    weight = model.embed.weight
    return KVCache(model.plan, batch_size=batch_size, max_context=max_context, n_kv_heads=cfg.n_kv_heads,
                   head_dim=cfg.head_dim, dtype=dtype or weight.dtype, device=weight.device, attention=attention,
                   prefill=prefill)


PREFILL_TOKENS = 8192  # prompt tokens per prefill forward (rows x chunk): bounds its activations and masks


@torch.no_grad()
def prefill(model: MixAttentionLM, cache: KVCache, prompts: Sequence[Sequence[int]], chunk_size: int = 512,
            tokens_per_forward: int = PREFILL_TOKENS) -> torch.Tensor:
    """Run right-padded prompts through the model in chunks of ``chunk_size``
    tokens (a sliding layer then never holds more than W + chunk keys), a
    group of ``tokens_per_forward // chunk_size`` rows at a time (their own
    rows of the cache), and return each row's logits at its last prompt
    token, [B, vocab] float32. The output head runs only at those tokens, so
    a prefill's memory is bounded whatever the batch."""
    device = cache.device
    b = len(prompts)
    last = torch.empty(b, model.cfg.vocab_size, device=device, dtype=torch.float32)
    group = max(1, tokens_per_forward // chunk_size)
    for r0 in range(0, b, group):
        rows = prompts[r0: r0 + group]
        view = cache if len(rows) == b else cache.rows(r0, r0 + len(rows))
        lengths = torch.tensor([len(p) for p in rows], device=device)
        longest = max(len(p) for p in rows)
        ids = torch.zeros(len(rows), longest, dtype=torch.long, device=device)
        for r, p in enumerate(rows):
            ids[r, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
        for start in range(0, longest, chunk_size):
            end = min(start + chunk_size, longest)
            positions = torch.arange(start, end, device=device).expand(len(rows), -1)
            valid = positions < lengths[:, None]
            # a full chunk that every row fills continues each row's cached prefix (ordered prefill: no mask)
            whole = end - start == chunk_size and all(len(p) >= end for p in rows)
            hidden = model.hidden_states(ids[:, start:end], positions, cache=view, valid=None if whole else valid, upto=end,
                                         contiguous=whole)
            ending = [r for r, p in enumerate(rows) if start < len(p) <= end]  # rows whose prompt ends in this chunk
            if ending:
                at = torch.tensor([len(rows[r]) - 1 - start for r in ending], device=device)
                picked = torch.tensor(ending, device=device)
                last[r0 + picked] = model.logits(hidden[picked, at]).float()
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


_COMPILED: list[Callable] = []


def compiled_decode_step():
    """:func:`decode_step` through torch.compile as one graph (fullgraph: no
    breaks): inductor fuses the per-layer glue. One per process, so every
    caller shares its compiled code; the first step of a batch/context shape
    compiles (a second shape recompiles with symbolic sizes, then no more)."""
    if not _COMPILED:
        # no autotuning of pointwise kernels: inductor benchmarks their configs on clones of the
        # buffers they mutate, and the cache-write kernel mutates the whole KV store (a
        # 90 GB clone at a planned max batch is what ran out of memory)
        _COMPILED.append(torch.compile(decode_step, fullgraph=True, options={"triton.autotune_pointwise": False}))
    return _COMPILED[0]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    cache: KVCache
    tokens: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor | None
    logits: torch.Tensor


class GraphedStep:
    """A decode step replayed from a CUDA graph: one kernel launch of the
    whole step instead of hundreds. The first call for a (cache, batch shape)
    runs ``step`` twice on a side stream (compiling it, if it is compiled) and
    captures a third call; every call then copies its tokens/positions/valid
    into the graph's inputs and replays it. A step writes the same keys at the
    same slots however often it runs with the same inputs, so the warm-up
    leaves the cache exactly as one step would. The logits returned are the
    graph's own buffer: read them before the next call."""

    def __init__(self, step: Callable | None = None):
        self.step = step or decode_step
        self._graphs: dict[tuple, _Graph] = {}
        self._pool = None

    def __call__(self, model: MixAttentionLM, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor,
                 valid: torch.Tensor | None = None) -> torch.Tensor:
        key = (id(model), id(cache), tuple(tokens.shape), valid is None)
        g = self._graphs.get(key)
        if g is None or g.cache is not cache:
            g = self._graphs[key] = self._capture(model, cache, tokens, positions, valid)
        g.tokens.copy_(tokens)
        g.positions.copy_(positions)
        if valid is not None:
            g.valid.copy_(valid)
        g.graph.replay()
        return g.logits

    def _capture(self, model, cache, tokens, positions, valid) -> _Graph:
        tokens, positions = tokens.clone(), positions.clone()
        valid = None if valid is None else valid.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.step(model, cache, tokens, positions, valid)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()  # one memory pool for every graph of this step
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self.step(model, cache, tokens, positions, valid)
        return _Graph(graph, cache, tokens, positions, valid, logits)


_SAID: set[str] = set()


def fast_path_missing(device: torch.device | str) -> str | None:
    """None if the fast decode path (mixattn's Triton kernels, inductor, CUDA
    graphs) runs on ``device``, else why not."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"it runs on CUDA GPUs, and this is {device.type}"
    from mixattn.decode_kernel import available

    return available(device)


@dataclass(frozen=True)
class DecodePath:
    """How decode steps run. :meth:`resolve` picks the fastest correct
    combination measured (docs/benchmarks.md): on CUDA with Triton, mixattn's
    split-KV attention, its GEMV for one-row projections, the step compiled by
    inductor and replayed from a CUDA graph; elsewhere SDPA and the eager step
    (in a CUDA graph still, on a GPU without Triton). Prefill chunks read the
    cache through SDPA under a position mask (``prefill: masked``) or, with
    ``prefill: ordered``, the training attention over keys in position order
    for each full chunk (mixattn.kv_cache's module doc), whatever the path."""

    attention: str = "sdpa"
    gemv: bool = False
    compile: bool = False
    cuda_graph: bool = False
    fuse: str = "none"  # with gemv, fuse_gemv_inputs: "gelu" (into the up GEMV; resolve's default), "all" (and the norms)
    prefill: str = "masked"  # how prefill chunks read the cache: masked, or ordered (opt-in: slower for MA-Offset on an H200)
    persistent: bool = False  # batch-1 steps' layers in one persistent kernel (mixattn.persistent), others as above

    @classmethod
    def resolve(cls, device: torch.device | str, *, attention: str = "auto", gemv: bool | None = None,
                compile: bool | None = None, cuda_graph: bool | None = None, fuse: str | bool | None = None,
                prefill: str = "masked", persistent: bool | None = None, flag: str = "") -> DecodePath:
        """``auto``/None for a setting means the fast choice where it runs.
        Asking for a part where it cannot run is an error that says why
        (``flag``: how the caller names its settings, ``--`` for the CLI).
        ``fuse`` ("none", "gelu": the GELU in the up projection's GEMV, "all":
        the norms in their consumers' GEMVs too; True is "all") defaults to
        "gelu" where the GEMV runs: on an H200 the epilogue GELU made MA's
        batch-1 step 2% faster at 8K and 32K, and "all" made it slower
        (benchmarks/results/decode/decode_fuse_*.json, docs/benchmarks.md)."""
        device = torch.device(device)
        why = fast_path_missing(device)
        fast = why is None
        if attention == "auto":
            attention = "triton" if fast else "sdpa"
        if attention not in CACHED_ATTENTION:
            raise GenerationError(f"unknown {flag}attention {attention!r}; valid: auto, "
                                  f"{', '.join(sorted(CACHED_ATTENTION.names()))}")
        if gemv:  # explicitly: the kernel's own rule (CUDA, or Triton's interpreter in tests)
            from mixattn.decode_kernel import available

            if (no := available(device)) is not None:
                raise GenerationError(f"{flag}gemv cannot run on {device}: {no}")
        if cuda_graph and device.type != "cuda":
            raise GenerationError(f"{flag}{'cuda-graph' if flag else 'cuda_graph'} cannot run on {device}: "
                                  "CUDA graphs need a CUDA GPU")
        gemv = fast if gemv is None else gemv
        fuse = {None: "gelu" if gemv else "none", False: "none", True: "all"}.get(fuse, fuse)
        if fuse not in FUSE_LEVELS:
            raise GenerationError(f"unknown {flag}fuse {fuse!r}; valid: {', '.join(FUSE_LEVELS)}")
        if fuse != "none" and not gemv:
            raise GenerationError(f"{flag}fuse puts the norms and GELU inside the GEMV kernels: it needs {flag}gemv")
        if prefill not in PREFILL_MODES:
            raise GenerationError(f"unknown {flag}prefill {prefill!r}; valid: {', '.join(PREFILL_MODES)}")
        if persistent:  # explicitly: the kernel's own rule (CUDA, or Triton's interpreter in tests)
            from mixattn.decode_kernel import available

            if (no := available(device)) is not None:
                raise GenerationError(f"{flag}persistent cannot run on {device}: {no}")
        path = cls(attention=attention, gemv=gemv, compile=fast if compile is None else compile,
                   cuda_graph=device.type == "cuda" if cuda_graph is None else cuda_graph, fuse=fuse, prefill=prefill,
                   persistent=bool(persistent))
        if device.type == "cuda" and not fast and why not in _SAID:  # a GPU without the fast path: said once
            _SAID.add(why)
            print(f"mixattn: decoding without the fast path ({why}): {path.describe()}", file=sys.stderr)
        return path

    def describe(self) -> str:
        fused = {"gelu": " (GELU fused)", "all": " (norms and GELU fused)"}.get(self.fuse, "")
        gemv = "Triton GEMV" + fused if self.gemv else "cuBLAS/torch"
        return (f"{'one persistent kernel for batch-1 layers, else ' if self.persistent else ''}"
                f"{self.attention} attention, {gemv} projections, "
                f"{'compiled' if self.compile else 'eager'} step{' in a CUDA graph' if self.cuda_graph else ''}"
                f"{', ordered prefill' if self.prefill == 'ordered' else ''}")

    def prepare(self, model: MixAttentionLM) -> MixAttentionLM:
        """Apply what lives on the model (the GEMV layers; in place, weights
        untouched, training unaffected). Returns the model."""
        if self.gemv:
            from mixattn.decode_kernel import use_gemv

            use_gemv(model)
            if self.fuse != "none":
                fuse_gemv_inputs(model, norms=self.fuse == "all")
        return model

    def step_fn(self) -> Callable:
        """A new decode step of this path (a graphed one holds its graphs
        and their caches: make one per engine or generation)."""
        step = compiled_decode_step() if self.compile else decode_step
        if self.persistent:
            from mixattn.persistent import PersistentStep

            step = PersistentStep(step)
        return GraphedStep(step) if self.cuda_graph else step


FUSE_LEVELS = ("none", "gelu", "all")


class _FusedGeluMLP(GeluMLP):
    """A GELU MLP whose up projection applies the GELU to its output."""

    def forward(self, x):
        return self.down(self.up(x))


def fuse_gemv_inputs(model: MixAttentionLM, norms: bool = True) -> MixAttentionLM:
    """After :func:`~mixattn.decode_kernel.use_gemv`, in place: a GELU MLP's
    activation moves into its up projection's GEMV (one erf per output, in
    the epilogue) and, with ``norms``, each block's two norms into the GEMVs
    that read them (the attention's Q/K/V or Q projection, the MLP's input
    projections), so a batch-1 layer runs one or three kernels fewer.
    Parameters, the state dict and (but for rounding in a different order)
    every output stay; an MoE block keeps its MLP norm. For inputs of more
    than one row the projections apply the norm and GELU unfused."""
    from mixattn.decode_kernel import DEFERRED, GemvLinear

    for block in model.blocks:
        a = block.attn
        pairs = [(block.norm_attn, [a.wqkv if a.layer.owns_kv else a.wq])]
        mlp = block.mlp
        if type(mlp) is GeluMLP and type(mlp.up) is GemvLinear:
            pairs.append((block.norm_mlp, [mlp.up]))
            mlp.up.act = "gelu"
            mlp.__class__ = _FusedGeluMLP
        elif type(mlp) is SwiGLU:
            pairs.append((block.norm_mlp, [mlp.gate, mlp.up]))
        for norm, consumers in pairs if norms else []:
            if type(norm) in DEFERRED and all(type(c) is GemvLinear for c in consumers):
                for c in consumers:
                    c.prenorm = (norm,)
                norm.__class__ = DEFERRED[type(norm)]
    return model


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
    attention: str = "auto",
    decode: DecodePath | None = None,
) -> Generation:
    """Generate up to ``max_new_tokens`` tokens for each prompt (lists of
    token ids; lengths may differ). Greedy when temperature is 0, else
    sampling with optional top-k / top-p, reproducible with ``seed``. A row
    stops after emitting one of ``stop_tokens``. ``on_token(row, token)`` is
    called for every new token as it is produced (streaming); when it returns
    True that row ends there (a stop string, :class:`mixattn.detokenize.TextStream`).
    ``decode`` says how decode steps run (default: :meth:`DecodePath.resolve`
    for the model's device, the fast path on CUDA with Triton, whose GEMV
    layers it puts on the model); ``attention`` picks how queries read the
    cache when ``decode`` is not given (``auto``, ``sdpa``, ``triton``, ...,
    see :data:`mixattn.attention.CACHED_ATTENTION`); ``step_fn`` replaces the
    path's step. The cache is sized to the longest prompt + max_new_tokens;
    everything is validated before it is allocated."""
    _validate(model, prompts, max_new_tokens, temperature, top_k, top_p, stop_tokens, chunk_size)
    path = decode or DecodePath.resolve(model.embed.weight.device, attention=attention)
    model.eval()
    path.prepare(model)
    b = len(prompts)
    lengths = [len(p) for p in prompts]
    cache = new_cache(model, b, max(lengths) + max_new_tokens, cache_dtype, path.attention, path.prefill)
    device = cache.device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    step = step_fn or path.step_fn()
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
