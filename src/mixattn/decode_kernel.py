"""A split-KV attention kernel for a few queries against a KV cache (Triton).

    decode_attention(q, k, v, q_pos, k_pos, window) -> out [B, H, C, D]

q [B, H, C, D]; k, v [B, Hkv, S, D] (any strides: cache stores or views of
them); q_pos [B, C] the queries' absolute positions (-1: a query that sees
nothing, whose output is 0); k_pos [B, S] int32 the
position each key slot holds (-1: empty), i.e. a cache group's position table;
window: None (global: a query sees keys at positions <= its own) or W
(sliding: also q_pos - k_pos < W). Same rule as :func:`mixattn.plan` kinds'
``allowed``.

Why a kernel of our own: SDPA needs a mask tensor built from the positions
(and cuDNN runs a reduction kernel after its attention kernel); this kernel
reads the position table itself. It is flash-decoding: the key range is split
across many programs (one query tile per (batch row, KV head) would occupy
only B x Hkv of the GPU's SMs), each keeps an online softmax over its part,
and a second kernel, one program per (row, KV head, query row), combines the
parts (or, with :data:`FUSED_COMBINE`, the last split program of each row and
KV head does, counting on an atomic counter: one launch a layer; the counters
are one buffer per device, so launches on one stream only). The query heads
of one KV head (GQA) and the step's queries share each key tile as rows of
one ``tl.dot``. Measured on an H100 (docs/benchmarks.md):
on par with SDPA inside a compiled decode step, faster than SDPA plus its mask
for the attention alone.

On CUDA the two kernels are one opaque torch op (``torch.library.custom_op``):
``torch.compile`` calls it as it is (inductor compiling the kernels itself, as
``torch.library.triton_op``, failed on an H100 with torch 2.11) and CUDA graphs
capture its launches. On the CPU they run only in Triton's interpreter
(``TRITON_INTERPRET=1`` set before triton is imported; the test suite does
so), slowly: that is for tests.
"""

from __future__ import annotations

import functools
import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - torch's CUDA wheels ship triton
    triton = None


def _interpreting() -> bool:
    return triton is not None and bool(triton.knobs.runtime.interpret)


@functools.cache
def _pdl_supported(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9 and hasattr(tl.extra.cuda, "gdc_wait")


def use_pdl(device: torch.device) -> bool:
    """Whether this module's kernels launch on ``device`` with programmatic
    dependent launch (:data:`PDL`; never on the CPU or in the interpreter)."""
    device = torch.device(device)
    if triton is None or device.type != "cuda" or _interpreting():
        return False
    if PDL is not None:
        return bool(PDL)
    return _pdl_supported(device.index if device.index is not None else torch.cuda.current_device())


def available(device: torch.device) -> str | None:
    """None if the kernel can run on ``device``, else why not."""
    if triton is None:
        return "triton is not installed"
    if torch.device(device).type != "cuda" and not _interpreting():
        return "the Triton kernel runs on CUDA GPUs (on the CPU only under TRITON_INTERPRET=1, for tests)"
    return None


# Launch settings (module attributes, so that benchmarks/decode.py --kernel can vary them)
BLOCK_N = 64  # keys per tile
BLOCK_N_CPU = 16  # small in the interpreter, so tests cover several tiles and splits
PROGRAMS_PER_SM = 2  # split the keys until B x Hkv x splits reaches this many programs per SM (2: measured best at B=1)
MAX_SPLITS = 64  # bounds the combine kernel's one load (splits x head dim floats per query row)
NUM_WARPS = 4
NUM_STAGES = 3
MIN_ROWS = 16  # tl.dot needs at least 16 rows (and 16 columns: head dims are padded); the padding is masked
# The combine step inside the split kernel: each program counts itself done on an atomic counter
# of its (row, KV head), and the last one combines every split's part, so a layer's attention is one
# launch instead of two. Opt-in until measured (benchmarks/decode.py --kernel FUSED_COMBINE=true).
FUSED_COMBINE = False
# Programmatic dependent launch (Hopper and later): each kernel is launched so that it may start
# while the kernel before it finishes, reads only what no earlier kernel writes (a GEMV's weights)
# before it waits for that kernel (griddepcontrol.wait), and lets the next kernel start as soon
# as it has passed that wait. None: where the GPU and Triton have it; True/False force it
# (benchmarks/decode.py --kernel PDL=false).
PDL: bool | None = None


if triton is not None:

    def _combine_row_fn(PO, PML, OUT, bh, row, so_b, so_c, so_h, so_d, C, HKV, SPLITS,
                        G: tl.constexpr, ROWS: tl.constexpr, D, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                        LOAD: tl.constexpr):
        # one query row of one (batch row, KV head): every split's part is loaded at once (a loop
        # over the splits waited on one load after another: 16 us per layer on an H100), weighted
        # by its softmax maximum and summed. LOAD: the loads' cache modifier (".cg" where the parts
        # were written by other programs of the same kernel: past the SM's L1, which is not coherent)
        b = bh // HKV
        hkv = bh % HKV
        sp = tl.arange(0, BLOCK_S)
        smask = sp < SPLITS
        d = tl.arange(0, BLOCK_D)
        part = bh * SPLITS + sp
        pm = tl.load(PML + part * 2 * ROWS + row, mask=smask, other=-1.0e30, cache_modifier=LOAD)
        pl = tl.load(PML + part * 2 * ROWS + ROWS + row, mask=smask, other=0.0, cache_modifier=LOAD)
        po = tl.load(PO + part[:, None] * ROWS * BLOCK_D + row * BLOCK_D + d[None, :], mask=smask[:, None], other=0.0,
                     cache_modifier=LOAD)
        w = tl.exp(pm - tl.max(pm, axis=0))
        l = tl.sum(w * pl, axis=0)
        out = tl.sum(po * w[:, None], axis=0) / tl.where(l > 0, l, 1.0)  # l = 0: a (padding) query that sees nothing
        g = row // C
        c = row % C
        tl.store(OUT + b * so_b + c * so_c + (hkv * G + g) * so_h + d * so_d, out.to(OUT.dtype.element_ty), mask=d < D)

    _combine_row = triton.jit(_combine_row_fn)

    def _attend_tiles_fn(q, qp, q_lo, q_hi, K, V, KPOS, sk_n, sk_d, sv_n, sv_d, skp_n, start, end, window, scale,
                         ROWS: tl.constexpr, D, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, WINDOWED: tl.constexpr,
                         IEEE: tl.constexpr, LOAD: tl.constexpr):
        # the online softmax of queries q [ROWS, BLOCK_D] at positions qp [ROWS] over key slots
        # [start, end) of one (row, KV head): K, V, KPOS point at its slot 0. Returns the running
        # maximum m, sum l and unnormalised output acc. LOAD: the cache modifier of the key, value
        # and position loads (".cg" where this kernel itself wrote some of them)
        d = tl.arange(0, BLOCK_D)
        dmask = d < D
        m = tl.full([ROWS], -1.0e30, dtype=tl.float32)  # finite: a tile with nothing visible gives exp(-inf) = 0
        l = tl.full([ROWS], 0.0, dtype=tl.float32)
        acc = tl.full([ROWS, BLOCK_D], 0.0, dtype=tl.float32)
        for n0 in range(start, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            nmask = n < end
            kp = tl.load(KPOS + n * skp_n, mask=nmask, other=-1, cache_modifier=LOAD)
            seen = nmask & (kp >= 0) & (kp > q_lo) & (kp <= q_hi)
            k = tl.load(K + n[:, None] * sk_n + d[None, :] * sk_d, mask=seen[:, None] & dmask[None, :], other=0.0,
                        cache_modifier=LOAD)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = s * scale
            ok = (kp[None, :] >= 0) & (kp[None, :] <= qp[:, None])
            if WINDOWED:
                ok = ok & (qp[:, None] - kp[None, :] < window)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            v = tl.load(V + n[:, None] * sv_n + d[None, :] * sv_d, mask=seen[:, None] & dmask[None, :], other=0.0,
                        cache_modifier=LOAD)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        return m, l, acc

    _attend_tiles = triton.jit(_attend_tiles_fn)

    def _split_fn(Q, K, V, QPOS, KPOS, PO, PML, OUT, CNT,
                  sq_b, sq_h, sq_c, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
                  sqp_b, sqp_c, skp_b, skp_n, so_b, so_c, so_h, so_d,
                  S, C, HKV, KEYS_PER_SPLIT, SPLITS, window, scale,
                  G: tl.constexpr, ROWS: tl.constexpr, D, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  WINDOWED: tl.constexpr, IEEE: tl.constexpr, USE_GDC: tl.constexpr, FUSED: tl.constexpr,
                  BLOCK_S: tl.constexpr):
        if USE_GDC:  # every input (the queries, the key just written, the positions) is an earlier kernel's
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        bh = tl.program_id(0).to(tl.int64)  # 64-bit offsets: a store of B x Hkv x S x D passes 2^31 elements
        split = tl.program_id(1)  # (MA's global store at 350 rows of 32K: an illegal address in 32 bits)
        b = bh // HKV
        hkv = bh % HKV
        r = tl.arange(0, ROWS)  # row r = (query head g of this KV head, query c): g * C + c
        d = tl.arange(0, BLOCK_D)  # head dims padded to a power of two >= 16, the padding masked
        dmask = d < D
        g = r // C
        c = r % C
        rmask = r < G * C
        q = tl.load(Q + b * sq_b + (hkv * G + g)[:, None] * sq_h + c[:, None] * sq_c + d[None, :] * sq_d,
                    mask=rmask[:, None] & dmask[None, :], other=0.0)
        qp = tl.load(QPOS + b * sqp_b + c * sqp_c, mask=rmask, other=-1).to(tl.int32)
        # the keys any query of this program may see lie in (q_lo, q_hi]: a key outside is not
        # loaded at all (a predicated-off load moves no bytes), so empty slots and rows whose
        # queries see nothing (position -1: a continuous batch's idle or prefilling row) cost
        # no memory traffic; the exact mask below still decides each score
        q_hi = tl.max(qp, axis=0)
        q_lo = -1
        if WINDOWED:
            q_lo = tl.min(tl.where(rmask, qp, 2147483647), axis=0) - window
        start = split * KEYS_PER_SPLIT
        m, l, acc = _attend_tiles(q, qp, q_lo, q_hi, K + b * sk_b + hkv * sk_h, V + b * sv_b + hkv * sv_h,
                                  KPOS + b * skp_b, sk_n, sk_d, sv_n, sv_d, skp_n, start,
                                  tl.minimum(start + KEYS_PER_SPLIT, S), window, scale, ROWS, D, BLOCK_D, BLOCK_N,
                                  WINDOWED, IEEE, "")
        part = bh * SPLITS + split  # only the real rows go out: the combine step's traffic is G x C rows, not ROWS
        tl.store(PO + part * ROWS * BLOCK_D + r[:, None] * BLOCK_D + d[None, :], acc, mask=rmask[:, None])
        tl.store(PML + part * 2 * ROWS + r, m, mask=rmask)
        tl.store(PML + part * 2 * ROWS + ROWS + r, l, mask=rmask)
        if FUSED:  # the last of this (row, KV head)'s programs to get here combines all their parts
            tl.debug_barrier()  # every thread's stores of this program's part are issued ...
            done = tl.atomic_add(CNT + bh, 1, sem="acq_rel", scope="gpu")  # ... and released before the count
            if done == SPLITS - 1:
                for row in range(0, G * C):
                    _combine_row(PO, PML, OUT, bh, row, so_b, so_c, so_h, so_d, C, HKV, SPLITS, G, ROWS, D, BLOCK_D,
                                 BLOCK_S, ".cg")
                tl.atomic_xchg(CNT + bh, 0, sem="relaxed", scope="gpu")  # zero again for the next launch (graph replays)

    def _combine_fn(PO, PML, OUT, so_b, so_c, so_h, so_d, C, HKV, SPLITS,
                    G: tl.constexpr, ROWS: tl.constexpr, D, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                    USE_GDC: tl.constexpr):
        # one program per (batch row, KV head, query row)
        if USE_GDC:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        _combine_row(PO, PML, OUT, tl.program_id(0).to(tl.int64), tl.program_id(1), so_b, so_c, so_h, so_d, C, HKV, SPLITS,
                     G, ROWS, D, BLOCK_D, BLOCK_S, "")

    _split_jit = triton.jit(_split_fn)  # under TRITON_INTERPRET=1: interpreted
    _combine_jit = triton.jit(_combine_fn)


def _pdl_args(device: torch.device) -> dict:
    """A launch's USE_GDC constexpr and, where it is on, launch_pdl (the interpreter takes no launch_pdl)."""
    return {"USE_GDC": True, "launch_pdl": True} if use_pdl(device) else {"USE_GDC": False}


def _block_n(device: torch.device) -> int:
    return BLOCK_N if device.type == "cuda" else BLOCK_N_CPU


def num_splits(b: int, hkv: int, s: int, device: torch.device) -> int:
    """How many programs share one (row, KV head)'s keys: enough for
    PROGRAMS_PER_SM programs per SM, each with at least one tile of keys."""
    tiles = math.ceil(s / _block_n(device))
    if device.type != "cuda":
        return min(4, tiles)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(math.ceil(PROGRAMS_PER_SM * sms / (b * hkv)), tiles, MAX_SPLITS))


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """int32 zeros, at least ``n``, that the fused combine counts on: one per
    (row, KV head), kept for the process (each launch leaves them zero; a
    new buffer only when a launch needs more, so graph captures reuse one)."""
    have = _COUNTERS.get(device)
    if have is None or have.numel() < n:
        have = _COUNTERS[device] = torch.zeros(max(4096, triton.next_power_of_2(n)), dtype=torch.int32, device=device)
    return have


def _launch(q, k, v, q_pos, k_pos, window):
    """Runs the kernels (both, or the split kernel alone with its combine
    fused: :data:`FUSED_COMBINE`); returns the output as [B, C, H, D]."""
    b, h, c, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = h // hkv
    rows = max(MIN_ROWS, triton.next_power_of_2(g * c))
    block_d = max(16, triton.next_power_of_2(d))
    block_n = _block_n(q.device)
    per_split = math.ceil(math.ceil(s / num_splits(b, hkv, s, q.device)) / block_n) * block_n
    splits = math.ceil(s / per_split)
    po = torch.empty((b * hkv * splits, rows, block_d), dtype=torch.float32, device=q.device)
    pml = torch.empty((b * hkv * splits, 2, rows), dtype=torch.float32, device=q.device)
    out = torch.empty((b, c, h, d), dtype=q.dtype, device=q.device)  # [B, C, H, D]: the output projection's layout
    fused = bool(FUSED_COMBINE)
    cnt = _counters(q.device, b * hkv) if fused else pml  # (an unused pointer when not fused)
    block_s = triton.next_power_of_2(splits)
    _split_jit[(b * hkv, splits)](
        q, k, v, q_pos, k_pos, po, pml, out, cnt,
        *q.stride(), *k.stride(), *v.stride(), *q_pos.stride(), *k_pos.stride(), *out.stride(),
        s, c, hkv, per_split, splits, window or 0, d**-0.5,
        G=g, ROWS=rows, D=d, BLOCK_D=block_d, BLOCK_N=block_n, WINDOWED=window is not None, IEEE=q.dtype == torch.float32,
        FUSED=fused, BLOCK_S=block_s, num_warps=NUM_WARPS, num_stages=NUM_STAGES, **_pdl_args(q.device),
    )
    if not fused:
        _combine_jit[(b * hkv, g * c)](po, pml, out, *out.stride(), c, hkv, splits, G=g, ROWS=rows, D=d,
                                       BLOCK_D=block_d, BLOCK_S=block_s, **_pdl_args(q.device))
    return out


def _check(q, k, v, q_pos, k_pos):
    b, h, c, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d or h % k.shape[1]:
        raise ValueError(f"decode_attention: q {tuple(q.shape)} and k/v {tuple(k.shape)}/{tuple(v.shape)} do not fit "
                         "([B, H, C, D] and [B, Hkv, S, D] with H a multiple of Hkv)")
    if tuple(q_pos.shape) != (b, c) or tuple(k_pos.shape) != (b, k.shape[2]):
        raise ValueError(f"decode_attention: positions {tuple(q_pos.shape)} / {tuple(k_pos.shape)} do not fit "
                         f"queries [{b}, {c}] / keys [{b}, {k.shape[2]}]")


if triton is not None:

    @torch.library.custom_op("mixattn::decode_attention", mutates_args=(), device_types="cuda")
    def _decode_attention_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                               k_pos: torch.Tensor, window: int) -> torch.Tensor:
        # window 0 = global (a custom op's int argument cannot be None)
        return _launch(q, k, v, q_pos, k_pos, window or None)

    @_decode_attention_cuda.register_fake
    def _(q, k, v, q_pos, k_pos, window):
        b, h, c, d = q.shape
        return q.new_empty((b, c, h, d))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                     window: int | None = None) -> torch.Tensor:
    """Attention of q [B, H, C, D] over cached k, v [B, Hkv, S, D] under the
    position rule above; returns [B, H, C, D] in q's dtype."""
    why = available(q.device)
    if why is not None:
        raise RuntimeError(f"decode_attention cannot run on {q.device}: {why}")
    _check(q, k, v, q_pos, k_pos)
    if q.is_cuda:
        out = _decode_attention_cuda(q, k, v, q_pos, k_pos, window or 0)
    else:
        out = _launch(q, k, v, q_pos, k_pos, window)
    return out.transpose(1, 2)  # [B, H, C, D], a view of [B, C, H, D]: the output projection reads it as is


# -- batch-1 linear layers ----------------------------------------------------------
#
# A decode step at batch 1 multiplies one row by every weight matrix: a GEMV,
# bound by reading the weights. cuBLAS's kernels for these shapes read them at
# ~2.2 TB/s on an H100; this plain kernel (one program per GEMV_BLOCK_N output
# rows, looping over K) at ~2.5 (benchmarks/gemv.py, docs/benchmarks.md).

GEMV_BLOCK_N = 2
GEMV_BLOCK_K = 1024
GEMV_NUM_WARPS = 4
# what a GEMV can do to its one row of input before the product, and to its outputs after it
# (constexpr codes in the kernel)
NORMS = {None: 0, "layernorm": 1, "rmsnorm": 2}
ACTS = {None: 0, "gelu": 1}

if triton is not None:

    def _gemv_tile_fn(X, NW, NB, w, k, K, mean, rstd, NORM: tl.constexpr, HAS_NB: tl.constexpr):
        # one tile's products: w [BLOCK_N, BLOCK_K] times the (normed) input at k, summed over k
        kmask = k < K
        x = tl.load(X + k, mask=kmask, other=0.0).to(tl.float32)
        if NORM != 0:
            x = (x - mean) * rstd * tl.load(NW + k, mask=kmask, other=0.0).to(tl.float32)
            if HAS_NB:
                x += tl.load(NB + k, mask=kmask, other=0.0).to(tl.float32)
            x = x.to(X.dtype.element_ty).to(tl.float32)
        return tl.sum(w.to(tl.float32) * x[None, :], axis=1)

    _gemv_tile = triton.jit(_gemv_tile_fn)

    def _gemv_fn(X, W, Y, NW, NB, N, K, eps, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 NORM: tl.constexpr, HAS_NB: tl.constexpr, ACT: tl.constexpr, USE_GDC: tl.constexpr):
        # NORM 1/2: the input row is layer/RMS-normed first (every program computes the row's
        # statistics itself: K values, from L2), scaled by NW (and shifted by NB), each value
        # rounded to X's dtype as the unfused norm would store it. ACT 1: exact GELU of each
        # output, in the epilogue (one erf per output; the product rounded to Y's dtype first,
        # as the unfused projection would store it for the GELU to read).
        # USE_GDC: the first tile of weights (no kernel writes them) is read while the kernel before
        # this one may still run; the input row only after waiting for it
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < N
        k_first = tl.arange(0, BLOCK_K)
        w0 = tl.load(W + n[:, None] * K + k_first[None, :], mask=nmask[:, None] & (k_first < K)[None, :], other=0.0)
        if USE_GDC:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        mean = 0.0
        rstd = 1.0
        if NORM != 0:
            s1 = tl.full([BLOCK_K], 0.0, dtype=tl.float32)
            s2 = tl.full([BLOCK_K], 0.0, dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(X + k, mask=k < K, other=0.0).to(tl.float32)
                s1 += x
                s2 += x * x
            if NORM == 1:
                mean = tl.sum(s1, axis=0) / K
                rstd = 1.0 / tl.sqrt(tl.maximum(tl.sum(s2, axis=0) / K - mean * mean, 0.0) + eps)
            else:
                rstd = 1.0 / tl.sqrt(tl.sum(s2, axis=0) / K + eps)
        acc = _gemv_tile(X, NW, NB, w0, k_first, K, mean, rstd, NORM, HAS_NB)
        for k0 in range(BLOCK_K, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            w = tl.load(W + n[:, None] * K + k[None, :], mask=nmask[:, None] & (k < K)[None, :], other=0.0)
            acc += _gemv_tile(X, NW, NB, w, k, K, mean, rstd, NORM, HAS_NB)
        if ACT == 1:
            acc = acc.to(Y.dtype.element_ty).to(tl.float32)
            acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
        tl.store(Y + n, acc.to(Y.dtype.element_ty), mask=nmask)

    _gemv_jit = triton.jit(_gemv_fn)

    def _launch_gemv(x, w, norm_weight=None, norm_bias=None, eps=0.0, norm=0, act=0):
        n, k = w.shape
        y = torch.empty((1, n), dtype=x.dtype, device=x.device)
        block_n = GEMV_BLOCK_N if x.is_cuda else 16
        nw = x if norm_weight is None else norm_weight  # an unused pointer where there is no norm
        nb = x if norm_bias is None else norm_bias
        _gemv_jit[(triton.cdiv(n, block_n),)](x, w, y, nw, nb, n, k, float(eps), BLOCK_N=block_n,
                                               BLOCK_K=GEMV_BLOCK_K if x.is_cuda else 64, NORM=norm,
                                               HAS_NB=norm_bias is not None, ACT=act, num_warps=GEMV_NUM_WARPS,
                                               **_pdl_args(x.device))
        return y

    @torch.library.custom_op("mixattn::gemv", mutates_args=(), device_types="cuda")
    def _gemv_cuda(x: torch.Tensor, w: torch.Tensor, norm_weight: torch.Tensor | None = None,
                   norm_bias: torch.Tensor | None = None, eps: float = 0.0, norm: int = 0, act: int = 0) -> torch.Tensor:
        return _launch_gemv(x, w, norm_weight, norm_bias, eps, norm, act)

    @_gemv_cuda.register_fake
    def _(x, w, norm_weight=None, norm_bias=None, eps=0.0, norm=0, act=0):
        return x.new_empty((1, w.shape[0]))


def gemv(x: torch.Tensor, w: torch.Tensor, *, norm: str | None = None, norm_weight: torch.Tensor | None = None,
         norm_bias: torch.Tensor | None = None, eps: float = 1e-5, act: str | None = None) -> torch.Tensor:
    """x [1, K] @ w[N, K].T -> [1, N] in x's dtype (float32 accumulation);
    both contiguous. ``norm`` ("layernorm", "rmsnorm"; with ``norm_weight``
    [K], optional ``norm_bias``) normalises x first, ``act`` ("gelu") applies
    GELU to the product: one kernel instead of the norm's or activation's own
    (``F.linear(F.layer_norm(x, ...), w)`` and ``F.gelu(F.linear(x, w))``
    in one launch)."""
    why = available(x.device)
    if why is not None:
        raise RuntimeError(f"gemv cannot run on {x.device}: {why}")
    if x.dim() != 2 or x.shape[0] != 1 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"gemv: x {tuple(x.shape)} and w {tuple(w.shape)} do not fit ([1, K] and [N, K])")
    if norm not in NORMS or act not in ACTS:
        raise ValueError(f"gemv: norm {norm!r} / act {act!r}; valid: {sorted(map(str, NORMS))} / {sorted(map(str, ACTS))}")
    if (norm is None) != (norm_weight is None) or (norm_weight is not None and norm_weight.shape != (x.shape[1],)):
        raise ValueError(f"gemv: norm {norm!r} needs norm_weight of shape [{x.shape[1]}] (and only then)")
    x, w = x.contiguous(), w.contiguous()
    args = (x, w, norm_weight, norm_bias, eps, NORMS[norm], ACTS[act])
    return _gemv_cuda(*args) if x.is_cuda else _launch_gemv(*args)


class GemvLinear(torch.nn.Linear):
    """An nn.Linear whose forward runs :func:`gemv` when its input is one row
    (batch-1 decoding), else F.linear. Made by :func:`use_gemv`; same
    parameters and state dict. :func:`mixattn.generate.fuse_gemv_inputs` may give it the norm
    before it (``prenorm``), applied to its input, or an activation
    (``act``), applied to its output, in the same kernel; for other inputs
    (and with a bias, for the activation) it applies them unfused."""

    prenorm: tuple = ()  # (the norm module,): a tuple, so the norm is not registered a second time
    act: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() != x.shape[-1] or x.dtype != self.weight.dtype:
            if self.prenorm:
                x = self.prenorm[0].apply(x)
            y = torch.nn.functional.linear(x, self.weight, self.bias)
            return torch.nn.functional.gelu(y) if self.act == "gelu" else y
        kw = {}
        if self.prenorm:
            m = self.prenorm[0]
            kind = "layernorm" if isinstance(m, torch.nn.LayerNorm) else "rmsnorm"
            eps = m.eps if m.eps is not None else torch.finfo(x.dtype).eps
            kw = dict(norm=kind, norm_weight=m.weight, norm_bias=getattr(m, "bias", None), eps=eps)
        fused_act = self.act if self.bias is None else None  # the bias comes before the activation
        y = gemv(x.reshape(1, -1), self.weight, act=fused_act, **kw).reshape(*x.shape[:-1], -1)
        if self.bias is None:
            return y
        y = y + self.bias
        return torch.nn.functional.gelu(y) if self.act == "gelu" else y


class _DeferredLayerNorm(torch.nn.LayerNorm):
    """A norm whose consumers (GEMVs given it as ``prenorm``) apply it: its
    own forward passes x on; ``apply`` is the norm."""

    def forward(self, x):
        return x

    def apply(self, x):
        return torch.nn.LayerNorm.forward(self, x)


class _DeferredRMSNorm(torch.nn.RMSNorm):
    def forward(self, x):
        return x

    def apply(self, x):
        return torch.nn.RMSNorm.forward(self, x)


DEFERRED = {torch.nn.LayerNorm: _DeferredLayerNorm, torch.nn.RMSNorm: _DeferredRMSNorm}  # a norm's class -> its deferred one


def use_gemv(model: torch.nn.Module) -> torch.nn.Module:
    """Turn every nn.Linear of ``model`` into a :class:`GemvLinear`, in place
    (parameters untouched): one-row inputs then take the Triton GEMV. Returns
    the model. Applied from outside, for decoding; training never sees it."""
    device = next(model.parameters()).device
    why = available(device)
    if why is not None:
        raise ValueError(f"use_gemv: the model is on {device}: {why}")
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = GemvLinear
    return model
