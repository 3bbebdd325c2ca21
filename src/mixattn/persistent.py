"""A batch-1 decode step's layers as one persistent kernel (Triton).

    PersistentStep(fallback)(model, cache, tokens, positions) -> logits [1, vocab]

At batch 1 the default decode path runs about eleven kernels a layer (264
for the 24-layer decode model); each reads little, and their launches, ramps
and tails cost more than their bytes (docs/benchmarks.md). Here one launch
runs every layer: one program per SM, each looping over the layers' five
phases and taking its share of each:

1. the attention norm, the Q/K/V projection (Q alone in a layer that reuses
   another's K/V), RoPE, and the new key and value written to the cache
   (units of rows: a query or key head's dims i and i + head_dim / 2 together,
   as RoPE pairs them);
2. split-KV attention over the layer's cache store and position table (units:
   a KV head's split of the slots), the last split of each KV head combining
   the parts (an atomic counter, left at zero);
3. the output projection and the residual add (units of rows);
4. the MLP norm, the up projection and its exact GELU (units of rows);
5. the down projection and the residual add (units of rows).

A grid-wide barrier separates the phases: an atomic counter that only grows
during a launch (each program adds one and waits for all of them); the last
program out sets it back to zero for the next launch or graph replay. Every
program must be resident at once, so there are no more programs than SMs.
Data that other programs wrote in the same launch is read past L1 (``.cg``).

Numbers are rounded to the model's dtype where the unfused step stores them:
each projection's output, the norms' outputs, RoPE's and GELU's results, the
residual stream, the attention output. The embedding, the position tables,
the final norm and the logits stay outside the kernel (the tables are what
``KVCache.step`` writes; the logits go through the batch-1 GEMV).

What it covers (:func:`unsupported` says why not, and the step runs
``fallback`` instead): one row with no ``valid`` mask; global and sliding
layers, any sharing; LayerNorm or RMSNorm without bias, GELU MLP, no biases,
no QK norm; d_model, head_dim (>= 16) and the MLP width powers of two,
n_heads x head_dim = d_model; float32 RoPE tables; a cache in the model's
dtype with contiguous stores. On the CPU it runs in Triton's interpreter,
one launch per phase (the interpreter runs programs one after another, so a
barrier inside a launch would never open): the same code, for tests.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mixattn.decode_kernel import available, gemv, triton

if triton is not None:
    import triton.language as tl

    from mixattn.decode_kernel import _attend_tiles, _combine_row

PHASES = 5  # per layer: Q/K/V, attention, output projection, MLP up, MLP down
FIELDS = 16  # int64 fields per layer in the metadata table (14 used; see _meta)
NUM_WARPS = 8
BLOCK_N = 64  # keys per attention tile
BLOCK_N_CPU = 16
TILE_ELEMENTS = 16384  # weights per program per load: rows x K (32 KB of bf16)
CPU_PROGRAMS = 3  # programs in the interpreter: a number that divides none of the units evenly
PREFETCH = True  # each program loads its next unit's weights while it sums the current one's
POLL_LOAD = True  # programs wait at a barrier polling with relaxed loads, then one acquire (see _grid_sync)
HEAD_FLAGS = False  # attention waits for its KV head's Q/K/V units (counters), not a barrier after that phase
L2_PREFETCH = False  # before a barrier, each program asks the L2 for the weights it reads first after it (bf16)


if triton is not None:

    @triton.jit
    def _grid_sync(BAR, target, POLL_LOAD: tl.constexpr):
        # this program's stores are issued (CTA barrier) and released with its arrival; then it
        # waits until all programs have arrived (BAR reaches target) and acquires their stores.
        # POLL_LOAD: it polls with volatile (relaxed) loads and acquires once, when the count is
        # reached; else every poll is an acquire (Triton emits an atomic add of zero as an acquire
        # load: seen in the sm_90 PTX, so neither way is a read-modify-write per poll)
        tl.debug_barrier()
        tl.atomic_add(BAR, 1, sem="release", scope="gpu")
        if POLL_LOAD:
            c = tl.load(BAR, volatile=True)
            while c < target:
                c = tl.load(BAR, volatile=True)
            tl.atomic_add(BAR, 0, sem="acquire", scope="gpu")
        else:
            c = tl.atomic_add(BAR, 0, sem="acquire", scope="gpu")
            while c < target:
                c = tl.atomic_add(BAR, 0, sem="acquire", scope="gpu")
        tl.debug_barrier()

    @triton.jit
    def _l2_prefetch(P, N: tl.constexpr):
        # ask the L2 for N elements from P on (contiguous, 16-bit), one 128-byte line per thread: the
        # loads that read them later find them there. A side effect only (GPU; not in the interpreter)
        if N >= 64:
            lines = P + tl.arange(0, N // 64) * 64
            tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [lines], dtype=tl.int32,
                                      is_pure=False, pack=1)

    @triton.jit
    def _prefetch_task(META, t, pid, D: tl.constexpr, HQ: tl.constexpr, HD: tl.constexpr, FF: tl.constexpr,
                       R: tl.constexpr, RD: tl.constexpr, NPROG: tl.constexpr):
        # the weights task t's phase reads first in this program (its first two units of rows, which
        # it loads at once with PREFETCH), into L2, while this program waits at the barrier before it
        layer = t // 5
        phase = t % 5
        m = META + layer * 16
        dt = tl.bfloat16
        if phase == 0:
            HALF: tl.constexpr = HD // 2
            RP: tl.constexpr = R // 2
            PER_HEAD: tl.constexpr = HALF // RP
            W = _ptr(m, 0, dt)
            for k in tl.static_range(2):
                u = pid + k * NPROG
                row = (u // PER_HEAD) * HD + (u % PER_HEAD) * RP
                if u // PER_HEAD < HQ:  # (a unit past the last is not fetched: Q rows always exist)
                    _l2_prefetch(W + row * D, RP * D)
                    _l2_prefetch(W + (row + HALF) * D, RP * D)
        elif phase == 2:
            _l2_prefetch(_ptr(m, 1, dt) + pid * R * D, 2 * R * D)
        elif phase == 3:
            _l2_prefetch(_ptr(m, 2, dt) + pid * R * D, 2 * R * D)
        elif phase == 4:
            _l2_prefetch(_ptr(m, 3, dt) + pid * RD * FF, 2 * RD * FF)

    @triton.jit
    def _normed(H, NW, eps, D: tl.constexpr, NORM: tl.constexpr):
        # the residual stream's one row, layer-normed (NORM 1) or RMS-normed (2), scaled by NW,
        # rounded to the model's dtype as the norm module's output is
        k = tl.arange(0, D)
        x = tl.load(H + k, cache_modifier=".cg").to(tl.float32)
        if NORM == 1:
            xc = x - tl.sum(x, axis=0) / D
            y = xc / tl.sqrt(tl.sum(xc * xc, axis=0) / D + eps)
        else:
            y = x / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
        y = y * tl.load(NW + k).to(tl.float32)
        return y.to(H.dtype.element_ty).to(tl.float32)

    @triton.jit
    def _tile(W, rows, ok, K: tl.constexpr):
        # rows [R] of W [N, K] (row-major); none read where not ok (a unit past the last)
        k = tl.arange(0, K)
        return tl.load(W + rows[:, None] * K + k[None, :], mask=ok, other=0.0)

    @triton.jit
    def _dot(w, x):
        # a tile [R, K] times x [K] (float32): float32 [R]
        return tl.sum(w.to(tl.float32) * x[None, :], axis=1)

    @triton.jit
    def _ptr(m, field, dtype):
        # a pointer from the metadata table, 16-byte aligned (unsupported() checks): without the
        # hint the compiler cannot vectorise loads through it (one 2-byte load per element)
        return tl.multiple_of(tl.load(m + field).to(tl.pointer_type(dtype)), 16)

    @triton.jit
    def _qkv_phase(H, QB, READY, m, pos, COS, SIN, eps, pid, D: tl.constexpr, HQ: tl.constexpr,
                   HKV: tl.constexpr, HD: tl.constexpr, R: tl.constexpr, NPROG: tl.constexpr, NORM: tl.constexpr,
                   PREFETCH: tl.constexpr, HEAD_FLAGS: tl.constexpr):
        dt = H.dtype.element_ty
        W = _ptr(m, 0, dt)
        KV = _ptr(m, 8, dt)
        cap = tl.load(m + 9)
        slot = tl.where(tl.load(m + 12) != 0, pos % cap, pos)  # a ring stores position mod capacity
        heads = tl.where(tl.load(m + 13) != 0, HQ + 2 * HKV, HQ)  # Q, K, V heads; Q alone in a sharing layer
        xn = _normed(H, _ptr(m, 4, dt), eps, D, NORM)
        HALF: tl.constexpr = HD // 2
        RP: tl.constexpr = R // 2  # rows from each half of a head
        PER_HEAD: tl.constexpr = HALF // RP
        j = tl.arange(0, RP)
        n = heads * PER_HEAD
        # each unit's two tiles are loaded one unit ahead (PREFETCH), while the unit before is summed
        w1 = _tile(W, (pid // PER_HEAD) * HD + (pid % PER_HEAD) * RP + j, pid < n, D)
        w2 = _tile(W, (pid // PER_HEAD) * HD + HALF + (pid % PER_HEAD) * RP + j, pid < n, D)
        for u in range(pid, n, NPROG):
            hh = u // PER_HEAD
            i = (u % PER_HEAD) * RP + j  # dims i and i + HALF of head hh
            if PREFETCH:
                nu = u + NPROG
                n1 = _tile(W, (nu // PER_HEAD) * HD + (nu % PER_HEAD) * RP + j, nu < n, D)
                n2 = _tile(W, (nu // PER_HEAD) * HD + HALF + (nu % PER_HEAD) * RP + j, nu < n, D)
            else:
                w1 = _tile(W, hh * HD + i, u < n, D)
                w2 = _tile(W, hh * HD + HALF + i, u < n, D)
            y1 = _dot(w1, xn).to(dt).to(tl.float32)
            y2 = _dot(w2, xn).to(dt).to(tl.float32)
            if PREFETCH:
                w1 = n1
                w2 = n2
            if hh < HQ + HKV:  # queries and keys: RoPE at the step's position
                c1 = tl.load(COS + pos * HD + i)
                s1 = tl.load(SIN + pos * HD + i)
                c2 = tl.load(COS + pos * HD + HALF + i)
                s2 = tl.load(SIN + pos * HD + HALF + i)
                r1 = y1 * c1 - y2 * s1
                y2 = y2 * c2 + y1 * s2
                y1 = r1
            if hh < HQ:
                dst = QB + hh * HD
            else:  # the store is [2, 1, Hkv, cap, HD]: keys, then values
                dst = KV + ((hh - HQ) * cap + slot) * HD
            tl.store(dst + i, y1.to(dt))
            tl.store(dst + HALF + i, y2.to(dt))
            if HEAD_FLAGS:  # this unit of KV head kvh's queries, key or value is written: count it
                kvh = tl.where(hh < HQ, hh // (HQ // HKV), (hh - HQ) % HKV)
                tl.debug_barrier()
                tl.atomic_add(READY + kvh, 1, sem="release", scope="gpu")

    @triton.jit
    def _attention_phase(QB, AO, PO, PML, ACNT, READY, m, pos, scale, pid, HQ: tl.constexpr, HKV: tl.constexpr,
                         HD: tl.constexpr, R: tl.constexpr, SPLITS: tl.constexpr, ROWS: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, NPROG: tl.constexpr, IEEE: tl.constexpr,
                         HEAD_FLAGS: tl.constexpr):
        dt = QB.dtype.element_ty
        KV = _ptr(m, 8, dt)
        cap = tl.load(m + 9)
        KPOS = _ptr(m, 10, tl.int32)
        window = tl.load(m + 11).to(tl.int32)
        win = tl.where(window > 0, window, 1 << 30)  # a global layer: a window no position reaches
        G: tl.constexpr = HQ // HKV
        per_split = tl.cdiv(tl.cdiv(cap, SPLITS), BLOCK_N) * BLOCK_N
        r = tl.arange(0, ROWS)  # row r: query head r of the KV head (rows >= G are padding for tl.dot)
        d = tl.arange(0, HD)
        rmask = r < G
        qp = tl.where(rmask, pos, -1)
        # HEAD_FLAGS: the units of rows the Q/K/V phase writes for one KV head: its query heads' (and,
        # in a layer that owns its K/V, its key's and value's), HD / R units per head
        units = tl.where(tl.load(m + 13) != 0, G + 2, G) * (HD // R)
        for it in range(pid, HKV * SPLITS, NPROG):
            kvh = it // SPLITS
            start = (it % SPLITS) * per_split
            if HEAD_FLAGS:  # wait for this KV head's queries, key and value, not for the whole phase
                c = tl.load(READY + kvh, volatile=True)
                while c < units:
                    c = tl.load(READY + kvh, volatile=True)
                tl.atomic_add(READY + kvh, 0, sem="acquire", scope="gpu")
                tl.debug_barrier()
            q = tl.load(QB + (kvh * G + r)[:, None] * HD + d[None, :], mask=rmask[:, None], other=0.0,
                        cache_modifier=".cg")
            mx, l, acc = _attend_tiles(q, qp, pos - win, pos, KV + kvh * cap * HD, KV + (HKV + kvh) * cap * HD, KPOS,
                                       HD, 1, HD, 1, 1, start, tl.minimum(start + per_split, cap), win, scale,
                                       ROWS, HD, HD, BLOCK_N, True, IEEE, ".cg")
            tl.store(PO + it * ROWS * HD + r[:, None] * HD + d[None, :], acc, mask=rmask[:, None])
            tl.store(PML + it * 2 * ROWS + r, mx, mask=rmask)
            tl.store(PML + it * 2 * ROWS + ROWS + r, l, mask=rmask)
            tl.debug_barrier()  # every thread's stores of this part are issued, then released with the count
            done = tl.atomic_add(ACNT + kvh, 1, sem="acq_rel", scope="gpu")
            if done == SPLITS - 1:  # the last split of this KV head combines them all
                for g in range(0, G):
                    _combine_row(PO, PML, AO, kvh, g, 0, 0, HD, 1, 1, HKV, SPLITS, G, ROWS, HD, HD, BLOCK_S, ".cg")
                tl.atomic_xchg(ACNT + kvh, 0, sem="relaxed", scope="gpu")

    @triton.jit
    def _rows_phase(W, x, Y, pid, N: tl.constexpr, K: tl.constexpr, R: tl.constexpr, NPROG: tl.constexpr,
                    EPILOGUE: tl.constexpr, PREFETCH: tl.constexpr):
        # W [N, K] @ x (float32 [K]) into Y, each program its units of R rows, each unit's tile
        # loaded one unit ahead (PREFETCH). EPILOGUE 1: Y[rows] += the product (the residual add);
        # 2: Y[rows] = GELU(product). Each rounded to Y's dtype where the unfused step rounds
        dt = Y.dtype.element_ty
        ar = tl.arange(0, R)
        w = _tile(W, pid * R + ar, pid < N // R, K)
        for u in range(pid, N // R, NPROG):
            rows = u * R + ar
            if PREFETCH:
                nxt = _tile(W, (u + NPROG) * R + ar, u + NPROG < N // R, K)
            else:
                w = _tile(W, rows, u < N // R, K)
            y = _dot(w, x).to(dt).to(tl.float32)
            if PREFETCH:
                w = nxt
            if EPILOGUE == 1:
                y += tl.load(Y + rows, cache_modifier=".cg").to(tl.float32)
            else:
                y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
            tl.store(Y + rows, y.to(dt))

    def _step_fn(H, QB, AO, U, PO, PML, ACNT, BAR, READY, META, POS, COS, SIN, T0, T1, eps, scale,
                 D: tl.constexpr, HQ: tl.constexpr, HKV: tl.constexpr, HD: tl.constexpr, FF: tl.constexpr,
                 NORM: tl.constexpr, NPROG: tl.constexpr, R: tl.constexpr, RD: tl.constexpr, SPLITS: tl.constexpr,
                 ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, SYNC: tl.constexpr,
                 IEEE: tl.constexpr, PREFETCH: tl.constexpr, POLL_LOAD: tl.constexpr, HEAD_FLAGS: tl.constexpr,
                 L2_PREFETCH: tl.constexpr):
        # tasks [T0, T1): task t is phase t % 5 of layer t // 5 (one launch runs them all, with a
        # barrier after each; the interpreter runs one per launch)
        pid = tl.program_id(0)
        pos = tl.load(POS).to(tl.int64)
        dt = H.dtype.element_ty
        for t in range(T0, T1):
            layer = t // 5
            phase = t % 5
            m = META + layer * 16  # FIELDS int64 per layer
            if phase == 0:
                _qkv_phase(H, QB, READY + layer * HKV, m, pos, COS, SIN, eps, pid, D, HQ, HKV, HD, R, NPROG, NORM,
                           PREFETCH, HEAD_FLAGS)
            elif phase == 1:
                _attention_phase(QB, AO, PO, PML, ACNT, READY + layer * HKV, m, pos, scale, pid, HQ, HKV, HD, R,
                                 SPLITS, ROWS, BLOCK_N, BLOCK_S, NPROG, IEEE, HEAD_FLAGS)
            elif phase == 2:  # output projection + residual (a name per branch: Triton types names across branches)
                x_o = tl.load(AO + tl.arange(0, D), cache_modifier=".cg").to(tl.float32)
                _rows_phase(_ptr(m, 1, dt), x_o, H, pid, D, D, R, NPROG, 1, PREFETCH)
            elif phase == 3:  # MLP norm, up projection, GELU
                x_u = _normed(H, _ptr(m, 6, dt), eps, D, NORM)
                _rows_phase(_ptr(m, 2, dt), x_u, U, pid, FF, D, R, NPROG, 2, PREFETCH)
            else:  # down projection + residual
                x_d = tl.load(U + tl.arange(0, FF), cache_modifier=".cg").to(tl.float32)
                _rows_phase(_ptr(m, 3, dt), x_d, H, pid, D, FF, RD, NPROG, 1, PREFETCH)
            if SYNC and L2_PREFETCH and t + 1 < T1:  # the next task's first weights, while this one waits
                _prefetch_task(META, t + 1, pid, D, HQ, HD, FF, R, RD, NPROG)
            if HEAD_FLAGS:  # no barrier after a Q/K/V phase: the attention waits per KV head instead
                if SYNC and phase != 0:
                    _grid_sync(BAR, (t - layer) * NPROG, POLL_LOAD)  # the barriers so far: t + 1 less layer + 1
            elif SYNC:
                _grid_sync(BAR, (t + 1) * NPROG, POLL_LOAD)
        if SYNC:  # the last program out sets the barrier back to zero: every program has passed its last wait
            out = tl.atomic_add(BAR + 1, 1, sem="acq_rel", scope="gpu")
            if out == NPROG - 1:
                tl.atomic_xchg(BAR, 0, sem="relaxed", scope="gpu")
                tl.atomic_xchg(BAR + 1, 0, sem="relaxed", scope="gpu")

    _step_jit = triton.jit(_step_fn)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def unsupported(model, cache) -> str | None:
    """None if :class:`PersistentStep` runs this model and cache's batch-1
    steps in its kernel, else why not (the step then runs its fallback)."""
    from mixattn.model import GeluMLP

    why = available(cache.device)
    if why is not None:
        return why
    cfg = model.cfg
    if cache.batch_size != 1:
        return f"it decodes one row, and the cache has {cache.batch_size}"
    if not all(isinstance(b.mlp, GeluMLP) for b in model.blocks):
        return "it runs GELU MLPs"
    if cfg.bias or cfg.qk_norm:
        return "it runs projections without bias and no QK norm"
    if cfg.norm_type not in ("layernorm", "rmsnorm"):
        return f"it runs layernorm or rmsnorm, not {cfg.norm_type}"
    if not (_pow2(cfg.d_model) and _pow2(cfg.head_dim) and cfg.head_dim >= 16 and _pow2(cfg.hidden)):
        return (f"it needs d_model, head_dim (>= 16) and the MLP width to be powers of two "
                f"({cfg.d_model}, {cfg.head_dim}, {cfg.hidden})")
    if cfg.n_heads * cfg.head_dim != cfg.d_model:
        return "it needs n_heads x head_dim = d_model"
    if any(layer.spec.name not in ("global", "sliding") for layer in model.plan):
        return "it runs global and sliding layers only"
    dtype = model.embed.weight.dtype
    if any(p.dtype != dtype for p in model.parameters()) or cache.dtype != dtype:
        return "its weights and cache must share one dtype"
    if model.rope_cos.dtype != torch.float32:
        return "its RoPE tables must be float32"
    if any(not s.kv.is_contiguous() for s in cache.stores.values()):
        return "its cache stores must be contiguous (not a view of rows of a bigger cache)"
    if any(t.data_ptr() % 16 for t in _meta_tensors(model, cache)):
        return "its weights and cache stores must start at 16-byte aligned addresses"
    return None


@dataclass
class _Buffers:
    """What one (model, cache) pair's launches use: the per-layer metadata
    table, the activations and the counters (kept, so a CUDA graph replays
    the same pointers)."""

    tensors: list  # the weights and stores whose pointers the table holds
    ptrs: list  # ... and those pointers (checked before reuse)
    meta: torch.Tensor
    h: torch.Tensor
    qb: torch.Tensor
    ao: torch.Tensor
    u: torch.Tensor
    po: torch.Tensor
    pml: torch.Tensor
    acnt: torch.Tensor
    bar: torch.Tensor
    ready: torch.Tensor  # [layers, Hkv] int32: HEAD_FLAGS' counts, zeroed before each launch
    const: dict


def _layer_tensors(model, cache, i: int) -> list[torch.Tensor]:
    # layer i's Q/K/V (or Q) weight, output weight, MLP up and down, its two norms' weights, the K/V
    # store it reads ([2, 1, Hkv, cap, HD]) and that store's group's position table
    layer, block = model.plan[i], model.blocks[i]
    a = block.attn
    store = cache.stores[i if layer.owns_kv else layer.kv_source]
    return [a.wqkv.weight if layer.owns_kv else a.wq.weight, a.wo.weight, block.mlp.up.weight, block.mlp.down.weight,
            block.norm_attn.weight, block.norm_mlp.weight, store.kv, cache.groups[store.group].pos]


def _meta_tensors(model, cache) -> list[torch.Tensor]:
    return [t for i in range(len(model.plan)) for t in _layer_tensors(model, cache, i)]


def _meta(model, cache) -> tuple[torch.Tensor, list]:
    # per layer, int64: 0 the Q/K/V (or Q) weight, 1 output weight, 2 MLP up, 3 MLP down,
    # 4 attention norm weight, 6 MLP norm weight, 8 the K/V store it reads, 9 its capacity,
    # 10 its group's position table, 11 window (0: global), 12 ring, 13 owns K/V
    rows, tensors = [], []
    for i, layer in enumerate(model.plan):
        ts = _layer_tensors(model, cache, i)
        tensors += ts
        ptr = [t.data_ptr() for t in ts]
        group = cache.groups[cache.stores[i if layer.owns_kv else layer.kv_source].group]
        row = [ptr[0], ptr[1], ptr[2], ptr[3], ptr[4], 0, ptr[5], 0, ptr[6], group.cap, ptr[7],
               layer.window if layer.spec.windowed else 0, int(group.ring), int(layer.owns_kv)]
        rows.append(row + [0] * (FIELDS - len(row)))
    return torch.tensor(rows, dtype=torch.int64, device=cache.device), tensors


def _buffers(model, cache) -> _Buffers:
    cfg, dev, dtype = model.cfg, cache.device, cache.dtype
    meta, tensors = _meta(model, cache)
    nprog = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else CPU_PROGRAMS
    hq, hkv, hd, d, ff = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model, cfg.hidden
    splits = max(1, nprog // hkv) if dev.type == "cuda" else 2
    rows = max(16, triton.next_power_of_2(hq // hkv))
    r = min(hd, max(2, TILE_ELEMENTS // d), d)  # rows per unit of a K = d_model matrix (<= head_dim: RoPE pairs)
    rd = min(d, max(1, TILE_ELEMENTS // ff))  # of the down projection (K = MLP width)
    const = dict(D=d, HQ=hq, HKV=hkv, HD=hd, FF=ff, NORM=1 if cfg.norm_type == "layernorm" else 2, NPROG=nprog, R=r,
                 RD=rd, SPLITS=splits, ROWS=rows, BLOCK_N=BLOCK_N if dev.type == "cuda" else BLOCK_N_CPU,
                 BLOCK_S=triton.next_power_of_2(splits), IEEE=dtype == torch.float32, PREFETCH=bool(PREFETCH),
                 POLL_LOAD=bool(POLL_LOAD), HEAD_FLAGS=bool(HEAD_FLAGS),
                 L2_PREFETCH=bool(L2_PREFETCH) and dtype == torch.bfloat16)
    return _Buffers(
        tensors=tensors, ptrs=[t.data_ptr() for t in tensors], meta=meta, h=torch.empty(d, dtype=dtype, device=dev),
        qb=torch.empty(hq * hd, dtype=dtype, device=dev), ao=torch.empty(hq * hd, dtype=dtype, device=dev),
        u=torch.empty(ff, dtype=dtype, device=dev),
        po=torch.empty(hkv * splits, rows, hd, dtype=torch.float32, device=dev),
        pml=torch.empty(hkv * splits, 2, rows, dtype=torch.float32, device=dev),
        acnt=torch.zeros(hkv, dtype=torch.int32, device=dev), bar=torch.zeros(2, dtype=torch.int32, device=dev),
        ready=torch.zeros(len(model.plan), hkv, dtype=torch.int32, device=dev),
        const=const)


def _launch(model, buf: _Buffers, positions: torch.Tensor) -> None:
    cfg = model.cfg
    if buf.const["HEAD_FLAGS"]:
        buf.ready.zero_()
    args = (buf.h, buf.qb, buf.ao, buf.u, buf.po, buf.pml, buf.acnt, buf.bar, buf.ready, buf.meta, positions,
            model.rope_cos, model.rope_sin)
    scalars = (float(cfg.norm_eps), cfg.head_dim ** -0.5)
    tasks = PHASES * len(model.plan)
    nprog = buf.const["NPROG"]
    if buf.h.is_cuda:
        _step_jit[(nprog,)](*args, 0, tasks, *scalars, **buf.const, SYNC=True, num_warps=NUM_WARPS)
    else:  # the interpreter: one launch per phase, the launch boundary as the barrier
        for t in range(tasks):
            _step_jit[(nprog,)](*args, t, t + 1, *scalars, **buf.const, SYNC=False)


_SAID: set[str] = set()


class PersistentStep:
    """A decode step (``decode_step``'s signature) whose batch-1 steps run
    the layers in one persistent kernel (module doc), and every other step
    (more rows, a ``valid`` mask, a model or cache it does not cover) through
    ``fallback``. Keeps its buffers per (model, cache); capture it in a
    CUDA graph (``GraphedStep``) like any step."""

    def __init__(self, fallback: Callable):
        self.fallback = fallback
        self._buffers: dict[tuple[int, int], _Buffers] = {}

    @property
    def in_kernel(self) -> bool:
        """Whether any step so far ran in the kernel (buffers are built only
        for a model and cache it covers): what a benchmark records beside its
        timing, so a run that fell back says so."""
        return bool(self._buffers)

    def covers(self, model, cache, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> bool:
        """Whether this step runs in the kernel. Steps of more than one row
        or with a row mask go to the fallback by design; a one-row step of a
        model or cache the kernel does not cover does too, and says why once
        (on stderr)."""
        if tuple(tokens.shape) != (1, 1) or valid is not None or cache.batch_size != 1:
            return False
        why = unsupported(model, cache)
        if why is not None and why not in _SAID:
            _SAID.add(why)
            print(f"mixattn: batch-1 steps take the other decode path, not the persistent kernel: {why}", file=sys.stderr)
        return why is None

    def __call__(self, model, cache, tokens: torch.Tensor, positions: torch.Tensor,
                 valid: torch.Tensor | None = None) -> torch.Tensor:
        key = (id(model), id(cache))
        buf = self._buffers.get(key)
        # buffers are made only for a pair it covers: while their weights and stores stay where they
        # were, a one-row step needs no new check (unsupported() walks every parameter)
        if (buf is None or tuple(tokens.shape) != (1, 1) or valid is not None
                or [t.data_ptr() for t in buf.tensors] != buf.ptrs):
            if not self.covers(model, cache, tokens, valid):
                return self.fallback(model, cache, tokens, positions, valid)
            buf = self._buffers[key] = _buffers(model, cache)
        cache.step(positions)  # the groups' position tables: this step's slots
        buf.h.copy_(model.embed(tokens).view(-1))
        _launch(model, buf, positions)
        hidden = model.norm_f(buf.h.view(1, 1, -1))
        return gemv(hidden.view(1, -1), model.output_weight)
