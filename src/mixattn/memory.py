"""Training memory, estimated from the model config, and the activation
checkpointing that ``activation_checkpointing: auto`` chooses from it.

No torch import: the estimate is arithmetic on the config, so it is tested
against hand-computed numbers and runs before any model exists.

Per microbatch token, a compiled block keeps for its backward pass (bytes,
bf16 autocast; the residual stream in bf16 unless ``fp32_residual:
true``; inductor recomputes pointwise results such as norm outputs and the
GELU rather than saving them):
  the two norm inputs (residual dtype),
  Q (post-RoPE) and the attention output (bf16),
  K and V where the layer owns them (a sharing layer has none),
  the MLP's pre-activation (GELU: up; SwiGLU/MoE: gate and up, times top_k).
A checkpointed block keeps only its input (the residual stream) and
recomputes the rest in the backward pass, one block at a time. The logits
cost 8 bytes per vocabulary entry per token (bf16 logits and gradient, the
float32 cross-entropy input). Against peaks measured through the Trainer on
an H200 (32K tokens per microbatch, float32 residual stream,
benchmarks/results/recipes_*.json) the
estimate is 14-17% low: standard 35.5 GiB estimated vs 41.0-42.7 measured, MA
33.2 vs 38.5 (allocator slack and workspaces it does not count); the 85%
headroom of :func:`choose_checkpointing` is what covers that.
"""

from __future__ import annotations

from dataclasses import dataclass

BF16 = 2
GIB = 2**30


def block_activation_bytes_per_token(cfg, layer) -> int:
    """What one block saves for backward, per token (see the module doc)."""
    d, kv = cfg.d_model, cfg.n_kv_heads * cfg.head_dim
    norms = 2 * residual_bytes_per_token(cfg)
    attn = BF16 * 2 * d + (BF16 * 2 * kv if layer.owns_kv else 0)
    if cfg.mlp_type == "gelu":
        mlp = BF16 * cfg.hidden
    else:
        mlp = BF16 * 2 * cfg.hidden * (cfg.moe_top_k if cfg.mlp_type == "moe" else 1)
    return norms + attn + mlp


def residual_bytes_per_token(cfg) -> int:
    return (4 if cfg.fp32_residual else BF16) * cfg.d_model


def logits_bytes_per_token(cfg) -> int:
    """bf16 logits and their gradient, the float32 cross-entropy input."""
    return cfg.vocab_size * (BF16 + BF16 + 4)


def state_bytes(n_params: int, optimizer: str, shards: int = 1) -> int:
    """float32 weights and gradients plus the optimizer's state (AdamW two
    moments, Lion one), sharded ``shards`` ways under FSDP."""
    per_param = 4 + 4 + (8 if optimizer in ("decoupled_adamw", "adamw") else 4)
    return n_params * per_param // shards


@dataclass(frozen=True)
class Checkpointing:
    """The blocks to checkpoint (``blocks``: their indices), what the peak was
    estimated at with that choice, and why it was chosen."""

    mode: str  # none, selective or full
    blocks: tuple[int, ...]
    estimate_bytes: int
    budget_bytes: int
    reason: str

    def describe(self) -> str:
        which = {"none": "none", "full": "full (every block)"}.get(
            self.mode, f"selective ({len(self.blocks)} of the blocks: {', '.join(map(str, self.blocks))})")
        return f"activation checkpointing: {which}; {self.reason}"


def spread(count: int, n: int) -> tuple[int, ...]:
    """``count`` block indices of ``n`` spread evenly (every k-th block)."""
    return tuple(sorted({round(j * n / count) for j in range(count)})) if count else ()


def peak_bytes(cfg, plan, tokens: int, checkpointed: set[int], static: int) -> int:
    """Estimated peak: static state + every block's saved activations (a
    checkpointed block only its input) + one block's recompute + logits."""
    acts = [block_activation_bytes_per_token(cfg, layer) * tokens for layer in plan]
    kept = sum(residual_bytes_per_token(cfg) * tokens if i in checkpointed else a for i, a in enumerate(acts))
    recompute = max(acts) if checkpointed else 0
    return static + kept + recompute + logits_bytes_per_token(cfg) * tokens


def choose_checkpointing(cfg, plan, tokens: int, n_params: int, optimizer: str, shards: int, free_bytes: int,
                         headroom: float = 0.85) -> Checkpointing:
    """The least checkpointing whose estimated peak fits in ``headroom`` of
    ``free_bytes``: none, else the fewest blocks (spread evenly), else all.
    ``tokens`` per microbatch on one device."""
    budget = int(free_bytes * headroom)
    static = state_bytes(n_params, optimizer, shards)
    n = len(plan)

    def fits(blocks):
        return peak_bytes(cfg, plan, tokens, set(blocks), static)

    def gib(x):
        return f"{x / GIB:.1f} GiB"

    peak = fits(())
    if peak <= budget:
        return Checkpointing("none", (), peak, budget, f"estimated peak {gib(peak)} fits in {gib(budget)} "
                             f"({headroom:.0%} of {gib(free_bytes)} free)")
    for count in range(1, n):
        blocks = spread(count, n)
        peak = fits(blocks)
        if peak <= budget:
            return Checkpointing("selective", blocks, peak, budget,
                                 f"without checkpointing about {gib(fits(()))}; with {count} of {n} blocks "
                                 f"{gib(peak)} fits in {gib(budget)} ({headroom:.0%} of {gib(free_bytes)} free)")
    peak = fits(tuple(range(n)))
    why = "fits" if peak <= budget else "does not fit either (lower device_train_microbatch_size or shard with fsdp)"
    return Checkpointing("full", tuple(range(n)), peak, budget,
                         f"without checkpointing about {gib(fits(()))}; with every block {gib(peak)} {why} "
                         f"in {gib(budget)} ({headroom:.0%} of {gib(free_bytes)} free)")


def divisors_descending(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


# Measured peak over the estimate, for the part that grows with the tokens
# (the peak less the static state): 1.235 standard-350m at 8 x 4K, 1.245 at
# 16 x 4K, 1.33 standard-1b at 8 x 4K (H200, float32 residual,
# benchmarks/results/recipes/recipes_4k_workers.json, recipes_4k_sliding_backends.json,
# recipes_1b.json). The microbatch choice scales the estimate by the largest.
MEASURED_OVER_ESTIMATE = 1.35


def calibrated_peak(cfg, plan, tokens: int, static: int) -> int:
    """The estimated peak without checkpointing, its per-token part scaled to
    what the GPU measured (:data:`MEASURED_OVER_ESTIMATE`)."""
    return static + int(MEASURED_OVER_ESTIMATE * (peak_bytes(cfg, plan, tokens, set(), static) - static))


def choose_microbatch(cfg, plan, per_device: int, n_params: int, optimizer: str, shards: int, free_bytes: int,
                      headroom: float = 0.90) -> tuple[int, str]:
    """``device_train_microbatch_size: auto``: the largest divisor of the
    per-device batch whose calibrated peak (:func:`calibrated_peak`) fits in
    ``headroom`` of ``free_bytes`` without activation checkpointing (larger
    microbatches launch fewer, larger kernels; a divisor keeps every
    microbatch the same shape, so nothing recompiles). Where not even one
    sequence fits, 1, and ``activation_checkpointing: auto`` decides what to
    recompute. Returns (microbatch, why)."""
    budget = int(free_bytes * headroom)
    static = state_bytes(n_params, optimizer, shards)
    for micro in divisors_descending(per_device):
        peak = calibrated_peak(cfg, plan, micro * cfg.max_seq_len, static)
        if peak <= budget:
            return micro, (f"microbatch {micro} of the per-device batch {per_device}: the largest divisor whose "
                           f"peak without checkpointing (about {peak / GIB:.1f} GiB) fits in {budget / GIB:.1f} GiB "
                           f"({headroom:.0%} of {free_bytes / GIB:.1f} GiB free)")
    return 1, (f"microbatch 1 of the per-device batch {per_device}: one sequence does not fit in {budget / GIB:.1f} GiB "
               f"without checkpointing, so activation checkpointing decides what to recompute")


# -- decoding ---------------------------------------------------------------------

SMS = 132  # streaming multiprocessors of an H100/H200, for the split-KV kernel's partial results
SPLIT_PROGRAMS_PER_SM, MAX_SPLITS = 2, 64  # mixattn.decode_kernel's launch rule


@dataclass(frozen=True)
class DecodeMemory:
    """Bytes a generation (prefill, then decode steps) allocates on the GPU,
    by part. ``peak`` is what the allocator must hand out at once: the static
    parts plus the larger of the prefill's and a decode step's working set."""

    weights: int  # parameters and buffers (RoPE tables)
    kv: int  # the cache's keys and values (KVCache.nbytes)
    positions: int  # the cache's slot-position tables (KVCache.metadata_bytes)
    prefill: int  # one prefill forward: activations, masks, the ring chunk's keys, last-token logits
    step: int  # one decode step: its logits and activations (the CUDA graph's pool), masks or split-KV partials

    @property
    def peak(self) -> int:
        return self.weights + self.kv + self.positions + max(self.prefill, self.step)

    def as_dict(self) -> dict[str, int]:
        return {"weights": self.weights, "kv": self.kv, "positions": self.positions, "prefill": self.prefill,
                "step": self.step, "peak": self.peak}


def model_bytes(model) -> int:
    """What a model holds on its device: parameters and buffers (RoPE tables
    and the like), the ``weight_bytes`` of :func:`decode_memory`."""
    return sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())


def decode_memory(cfg, plan, *, batch: int, context: int, weight_bytes: int, kv_bytes: int, chunk_size: int = 512,
                  tokens_per_forward: int = 8192, attention: str = "triton", dtype_bytes: int = BF16) -> DecodeMemory:
    """The memory of generating for ``batch`` rows in a cache of ``context``
    tokens (mixattn.generate: prefill in groups of ``tokens_per_forward //
    chunk_size`` rows, then static-shape decode steps), from the config
    alone. ``weight_bytes``: the model's parameters and buffers; ``kv_bytes``:
    plan.kv_cache_bytes of that cache. Upper bounds, pinned against peaks
    measured on an H200 in tests/gpu/test_gpu_memory.py."""
    d, ffn, vocab = cfg.d_model, cfg.hidden, cfg.vocab_size
    heads, kv_heads, head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    groups: dict[tuple[int, bool], int] = {}  # (capacity, ring) -> group, as KVCache builds them
    for i in plan.owners:
        groups.setdefault((plan.cache_tokens(i, context), plan[i].spec.windowed), len(groups))
    positions = sum(batch * cap * 4 for cap, _ in groups)
    group_of = {}
    for i, layer in enumerate(plan):
        owner = i if layer.owns_kv else layer.kv_source
        group_of[i] = groups[plan.cache_tokens(owner, context), plan[owner].spec.windowed]
    masks = {(layer.kind, layer.window, group_of[i]) for i, layer in enumerate(plan)}  # one per step each
    caps = {g: cap for (cap, _), g in groups.items()}
    last = batch * vocab * 4  # prefill's float32 logits at each row's last prompt token, alive while decoding
    # a prefill forward: R rows x C tokens
    rows, c = min(batch, max(1, tokens_per_forward // chunk_size)), min(chunk_size, context)
    acts = rows * c * (6 * d + 3 * ffn) * 4
    keys = {g: (caps[g] + c if ring else caps[g]) for (cap, ring), g in groups.items()}
    prefill_masks = sum(rows * c * keys[g] * 3 for _, _, g in masks)  # bool + additive bf16, memoised per step
    gqa_scores = rows * heads * c * max(keys.values()) * 4 * 2 if kv_heads != heads else 0  # SDPA's math fallback
    ring_keys = max((rows * kv_heads * (cap + c) * head_dim * dtype_bytes * 2 for (cap, ring) in groups if ring), default=0)
    prefill = last + acts + prefill_masks + gqa_scores + ring_keys + rows * vocab * 4
    # a decode step
    step_acts = batch * (vocab * dtype_bytes + (7 * d + 2 * ffn) * 4)
    if attention == "triton":
        splits = max(1, min(MAX_SPLITS, -(-SPLIT_PROGRAMS_PER_SM * SMS // (batch * kv_heads))))
        work = batch * heads * splits * (head_dim + 2) * 4
    else:
        work = sum(batch * keys[g] * 3 for _, _, g in masks)
    return DecodeMemory(weights=weight_bytes, kv=kv_bytes, positions=positions, prefill=prefill, step=last + step_acts + work)


def max_decode_batch(budget_bytes: int, cfg, plan, *, context: int, weight_bytes: int, kv_bytes_per_row: int,
                     reserve: float = 0.05, **kw) -> int:
    """The largest batch whose :func:`decode_memory` peak fits ``budget_bytes``
    less a ``reserve`` fraction (allocator rounding and fragmentation); 0 if
    not even one row does."""
    usable = budget_bytes * (1 - reserve)

    def fits(b: int) -> bool:
        return decode_memory(cfg, plan, batch=b, context=context, weight_bytes=weight_bytes, kv_bytes=b * kv_bytes_per_row,
                             **kw).peak <= usable

    lo, hi = 0, 1
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def decode_budget(plans: dict, cfg, *, budget_bytes: int, context: int, weight_bytes: dict, dtype: str = "bf16",
                  reserve: float = 0.05, **kw) -> list[dict]:
    """``mixattn plan --budget``: for each of ``plans`` (name -> LayerPlan of
    ``cfg``'s depth), given its ``weight_bytes[name]`` (parameters and
    buffers: a plan's sharing layers have no K/V projections), the KV bytes
    of one sequence of ``context`` tokens, the most sequences a generation
    fits in ``budget_bytes`` (:func:`max_decode_batch`: weights and buffers,
    the cache, its position tables and the larger working set of prefill and
    decode, less ``reserve``) and that batch's estimate by part. ``kw``:
    chunk_size, tokens_per_forward, attention, as for :func:`decode_memory`."""
    from mixattn.plan import dtype_bytes, format_bytes, kv_cache_bytes

    kw = dict(kw, dtype_bytes=dtype_bytes(dtype))
    rows = []
    for name, plan in plans.items():
        weights = weight_bytes[name]
        if weights >= budget_bytes * (1 - reserve):
            raise ValueError(f"{name}'s weights ({format_bytes(weights)}) alone fill the {format_bytes(budget_bytes)} budget "
                             f"less its {reserve:.0%} reserve")
        per_seq = kv_cache_bytes(plan, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, context_len=context, batch_size=1,
                                 dtype=dtype)
        batch = max_decode_batch(budget_bytes, cfg, plan, context=context, weight_bytes=weights, kv_bytes_per_row=per_seq,
                                 reserve=reserve, **kw)
        est = decode_memory(cfg, plan, batch=batch, context=context, weight_bytes=weights, kv_bytes=batch * per_seq,
                            **kw) if batch else None
        rows.append({"plan": name, "weight_bytes": weights, "kv_bytes_per_sequence": per_seq, "max_sequences": batch,
                     "estimate_at_max": est.as_dict() if est else None})
    base = next((r["max_sequences"] for r in rows if r["plan"] == "standard"), None)
    for r in rows:
        r["vs_standard"] = r["max_sequences"] / base if base else None
    return rows

