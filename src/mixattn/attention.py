"""Attention backends behind one signature.

    attend(q, k, v, kind, window, doc_ids=None, backend="auto") -> out

q: [B, H, T, D]; k, v: [B, Hkv, T, D] with H a multiple of Hkv (grouped KV);
out: [B, H, T, D] in q's dtype. ``kind`` is a :class:`~mixattn.plan.LayerKind`
(its ``allowed`` predicate defines the mask, causality included), ``window``
its window in tokens or None, ``docs`` the packed sequences' documents
(attention never crosses them): a :class:`Documents`, built once per forward
and shared by every layer, or its ids [B, T] as a tensor, or None.

Backends:
  eager  the reference: explicit boolean mask, float32 softmax. Tests compare
         every other backend to it.
  sdpa   torch's scaled_dot_product_attention; ``is_causal`` for plain global
         layers (flash/cuDNN kernels on GPU), an explicit mask otherwise.
  flex   FlexAttention with block masks (sliding windows and documents skip
         whole masked blocks); compiled on CUDA. Block masks without documents
         are cached per shape; with documents they are built from the ids
         per block (no dense mask) once per forward, per (kind, window).
         On the CPU it runs uncompiled and forward only (torch has no CPU
         backward for it). Below 128 query tokens it runs sdpa with the
         explicit mask (FLEX_MIN_QUERY_LEN).
  flash  flash-attn's kernels with ``window_size`` (varlen for documents),
         when the package is importable.
  fa4    flash-attn-4's CuTe kernels (Hopper/Blackwell), global and sliding
         layers; documents through its varlen path (every (row, document) run
         one sequence, offsets from the collator); torch custom ops, so
         compiled graphs keep them.
  auto   CUDA: global and sliding layers -> fa4 where flash-attn-4 is
         installed and the GPU is Hopper or Blackwell (documents or not;
         bf16/fp16, head dimension 64, 96 or 128);
         else global layers without documents -> sdpa; otherwise flash if
         installed, else flex. CPU: sdpa.
"""

from __future__ import annotations

import enum
import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mixattn.plan import LAYER_KINDS, LayerKind
from mixattn.registry import Registry

AttnFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Backend:
    fn: AttnFn
    available: Callable[[torch.device | None], str | None]  # None if usable (device None: if installed), else why not


BACKENDS: Registry[Backend] = Registry("attention backend")


def build_mask(kind: LayerKind, window: int | None, q_len: int, k_len: int, doc_ids: torch.Tensor | None, device) -> torch.Tensor:
    """Boolean mask [B or 1, 1, q_len, k_len]; True where the query may see the key.
    Queries are the last ``q_len`` of ``k_len`` positions."""
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    mask = kind.allowed(q_pos, k_pos, window)
    if doc_ids is not None:
        same_doc = doc_ids[:, -q_len:, None] == doc_ids[:, None, :]
        return (mask[None] & same_doc)[:, None]
    return mask[None, None]


# -- documents of a packed batch ------------------------------------------------


class Documents:
    """The documents of a packed batch: ``ids`` [B, T] (equal ids = one
    document; attention never crosses documents) and the masks backends
    derive from them, each built once and shared by every layer that asks
    (:meth:`prepare` builds them before the layer loop, so compiled blocks
    only read them)."""

    def __init__(self, ids: torch.Tensor, starts: torch.Tensor | None = None):
        self.ids = ids
        self.starts = starts  # [B, K] (document_starts), from the collator where there is one
        self._cu_seqlens = None
        self._block_masks: dict = {}

    def cu_seqlens(self) -> torch.Tensor:
        """int32 offsets of every (row, document) run in the flattened
        [B * T] batch (:func:`varlen_offsets`): the varlen kernels'
        sequences. From the collator's ``starts`` (computed on the host,
        nothing waits), else from the ids (one host sync)."""
        if self._cu_seqlens is None:
            starts = self.starts if self.starts is not None else document_starts(self.ids)
            self._cu_seqlens = varlen_offsets(starts.to(self.ids.device), self.ids.shape[1])
        return self._cu_seqlens

    def block_mask(self, kind: LayerKind, window: int | None, q_len: int, k_len: int):
        key = (kind.name, window, q_len, k_len)
        if key not in self._block_masks:
            if q_len == k_len == self.ids.shape[1]:
                self._block_masks[key] = document_block_mask(kind, window, self.ids)
            else:  # queries are the last q_len of k_len positions (not a training forward)
                self._block_masks[key] = _dense_document_block_mask(kind, window, q_len, k_len, self.ids)
        return self._block_masks[key]

    def prepare(self, layers, backend: str, device: torch.device) -> Documents:
        """Build, for every distinct (kind, window) of ``layers`` (objects with
        ``spec`` and ``window``) whose resolved backend is flex, its block
        mask; where one resolves to fa4, the varlen offsets."""
        t = self.ids.shape[1]
        for kind, window in dict.fromkeys((layer.spec, layer.window) for layer in layers):
            resolved = select_backend(backend, device, kind, True)
            if resolved == "flex" and t >= FLEX_MIN_QUERY_LEN:
                self.block_mask(kind, window, t, t)
            elif resolved == "fa4":
                self.cu_seqlens()
        return self


def document_start_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """bool [B, T]: True where a document starts (every row's first token too)."""
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return starts


def document_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """int32 [B, K]: where each row's documents start (0 first), padded
    with T. K is the power of two (at least 2) at or above the most
    documents a row holds: every padding start is an empty sequence the
    varlen kernel still schedules, so K stays tight; a compiled graph sees a
    few shapes (torch.compile makes the dimension dynamic on the second).
    Per row, so Composer's microbatching splits it with the batch."""
    b, t = doc_ids.shape
    starts = document_start_mask(doc_ids)
    counts = starts.sum(1)
    k = 1 << (max(int(counts.max()), 2) - 1).bit_length()
    pos = torch.arange(t, device=doc_ids.device).expand(b, t)
    # each row's start positions first (ascending), then T
    ordered = torch.where(starts, pos, t).sort(dim=1).values
    if k > t:
        ordered = torch.cat([ordered, ordered.new_full((b, k - t), t)], dim=1)
    return ordered[:, :k].to(torch.int32)


def varlen_offsets(starts: torch.Tensor, t: int) -> torch.Tensor:
    """int32 [B * K + 1]: ``starts`` [B, K] (:func:`document_starts`) as
    offsets into the flattened [B * T] batch, ending with B * T. Padding
    starts become empty sequences. Static shapes, no host sync."""
    b = starts.shape[0]
    rows = torch.arange(b, device=starts.device, dtype=torch.int32)[:, None] * t
    return torch.cat([(starts + rows).flatten(), starts.new_full((1,), b * t)])


def as_documents(docs) -> Documents | None:
    """A :class:`Documents` from one, from ids [B, T], or None."""
    return docs if docs is None or isinstance(docs, Documents) else Documents(docs)


def _doc_ids(docs) -> torch.Tensor | None:
    return docs.ids if isinstance(docs, Documents) else docs


def _dense_blocks(num: torch.Tensor, indices: torch.Tensor, n_cols: int) -> torch.Tensor:
    """[..., rows, n_cols] bool from a BlockMask's (num_blocks, indices) form."""
    used = torch.arange(indices.shape[-1], device=indices.device) < num[..., None]
    dense = torch.zeros(*indices.shape[:-1], n_cols + 1, dtype=torch.bool, device=indices.device)
    return dense.scatter_(-1, torch.where(used, indices.long(), n_cols), True)[..., :n_cols]


def _ordered_blocks(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(num_blocks int32 [..., rows], indices int32 [..., rows, cols]) of a
    dense block bool: each row's set columns first, in ascending order."""
    num = dense.sum(-1, dtype=torch.int32)
    indices = dense.to(torch.int8).sort(dim=-1, descending=True, stable=True).indices.to(torch.int32)
    return num, indices


def document_block_mask(kind: LayerKind, window: int | None, doc_ids: torch.Tensor, block: int = 128):
    """FlexAttention's BlockMask for a training forward (queries = keys = the
    T tokens of each row) under ``kind``'s mask and documents ``doc_ids``
    [B, T], built per 128 x 128 block from each block's smallest and largest
    document id: O(B (T/128)^2) tensor work on the ids' device, no dense
    T x T evaluation and no host sync. A pair of blocks is skipped when their
    id ranges do not overlap (no shared document, whatever the ids' order),
    full when both hold one and the same document and the kind's mask is full
    there, partial (mask_mod decides per element) otherwise."""
    from torch.nn.attention.flex_attention import BlockMask

    b, t = doc_ids.shape
    n = -(-t // block)
    base = _cached_block_mask(kind.name, window, t, t, str(doc_ids.device))  # the kind's blocks, [1, 1, n, n]
    kind_any = _dense_blocks(base.kv_num_blocks, base.kv_indices, n)
    kind_full = (_dense_blocks(base.full_kv_num_blocks, base.full_kv_indices, n) if base.full_kv_num_blocks is not None
                 else torch.zeros_like(kind_any))
    kind_any = kind_any | kind_full
    ids = F.pad(doc_ids, (0, n * block - t), mode="replicate") if n * block != t else doc_ids  # no new document
    per_block = ids.view(b, n, block)
    lo, hi = per_block.amin(-1), per_block.amax(-1)  # [B, n]
    one_doc = lo == hi
    if n * block != t:
        one_doc[:, -1] = False  # the padded last block stays partial: mask_mod sees its bounds
    shared = (lo[:, :, None] <= hi[:, None, :]) & (lo[:, None, :] <= hi[:, :, None])  # [B, n(q), n(kv)]
    same_doc = one_doc[:, :, None] & one_doc[:, None, :] & (lo[:, :, None] == lo[:, None, :])
    full = kind_full[0] & same_doc
    partial = kind_any[0] & shared & ~full
    num, idx = _ordered_blocks(partial[:, None])
    full_num, full_idx = _ordered_blocks(full[:, None])

    def mask_mod(bi, h, q_idx, kv_idx):
        return kind.allowed(q_idx, kv_idx, window) & (ids[bi, q_idx] == ids[bi, kv_idx])

    return BlockMask.from_kv_blocks(num, idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(t, t))


def _dense_document_block_mask(kind: LayerKind, window, q_len, k_len, doc_ids):
    """create_block_mask over the dense grid (every element evaluated): for
    query lengths other than the keys' (not a training forward)."""
    from torch.nn.attention.flex_attention import create_block_mask

    offset = k_len - q_len

    def mask_mod(b, h, q_idx, kv_idx):
        return kind.allowed(q_idx + offset, kv_idx, window) & (doc_ids[b, q_idx + offset] == doc_ids[b, kv_idx])

    return create_block_mask(mask_mod, doc_ids.shape[0], None, q_len, k_len, device=doc_ids.device)


# -- eager reference ----------------------------------------------------------


def eager_attention(q, k, v, kind: LayerKind, window, doc_ids=None):
    doc_ids = _doc_ids(doc_ids)
    h, h_kv = q.shape[1], k.shape[1]
    if h != h_kv:
        k = k.repeat_interleave(h // h_kv, dim=1)
        v = v.repeat_interleave(h // h_kv, dim=1)
    acc = torch.promote_types(q.dtype, torch.float32)  # at least float32 softmax
    scores = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * q.shape[-1] ** -0.5
    mask = build_mask(kind, window, q.shape[2], k.shape[2], doc_ids, q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v.to(acc)).to(q.dtype)


BACKENDS.register("eager", Backend(eager_attention, lambda device: None))


# -- SDPA ---------------------------------------------------------------------


def sdpa_attention(q, k, v, kind: LayerKind, window, doc_ids=None):
    doc_ids = _doc_ids(doc_ids)
    gqa = q.shape[1] != k.shape[1]
    if kind.causal and not kind.windowed and doc_ids is None:
        if q.shape[2] == k.shape[2]:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        # the queries are the last of the keys (a prefill chunk over its cached prefix): causal aligned to
        # the lower right, which SDPA's flash and memory-efficient kernels take without a mask tensor
        from torch.nn.attention.bias import causal_lower_right

        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q.shape[2], k.shape[2]), enable_gqa=gqa)
    mask = build_mask(kind, window, q.shape[2], k.shape[2], doc_ids, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


BACKENDS.register("sdpa", Backend(sdpa_attention, lambda device: None))


# -- FlexAttention --------------------------------------------------------------

# Block sizes for the compiled kernel; None lets torch choose. The attention
# benchmark sweeps these.
FLEX_KERNEL_OPTIONS: dict | None = None


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=64)
def _cached_block_mask(kind_name: str, window: int | None, q_len: int, k_len: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    kind = LAYER_KINDS.get(kind_name)
    offset = k_len - q_len

    def mask_mod(b, h, q_idx, kv_idx):
        return kind.allowed(q_idx + offset, kv_idx, window)

    return create_block_mask(mask_mod, None, None, q_len, k_len, device=device)


def _block_mask(kind: LayerKind, window, q_len, k_len, docs, device):
    if docs is None:
        return _cached_block_mask(kind.name, window, q_len, k_len, str(device))
    return as_documents(docs).block_mask(kind, window, q_len, k_len)


# Shorter query lengths go through SDPA with an explicit mask: on CUDA (torch
# 2.11, H100) inductor's flex template had no valid configuration for 90
# query tokens (NoValidChoicesError; 1, 128, 200 and 512 compiled), and at
# this length the explicit mask costs nothing.
FLEX_MIN_QUERY_LEN = 128


def flex_attention(q, k, v, kind: LayerKind, window, doc_ids=None):
    from torch.nn.attention.flex_attention import flex_attention as flex_eager

    if q.shape[2] < FLEX_MIN_QUERY_LEN:
        return sdpa_attention(q, k, v, kind, window, doc_ids)
    block_mask = _block_mask(kind, window, q.shape[2], k.shape[2], doc_ids, q.device)
    gqa = q.shape[1] != k.shape[1]
    if q.device.type == "cuda":
        return _compiled_flex()(q, k, v, block_mask=block_mask, enable_gqa=gqa, kernel_options=FLEX_KERNEL_OPTIONS)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise RuntimeError(
            "the flex attention backend has no backward pass on the CPU (a torch limitation); "
            "use attn_backend 'sdpa' or 'eager' to train on the CPU"
        )
    return flex_eager(q, k, v, block_mask=block_mask, enable_gqa=gqa)


def _flex_available(device) -> str | None:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError as e:  # pragma: no cover - torch < 2.5
        return f"torch {torch.__version__} has no FlexAttention ({e})"
    return None


BACKENDS.register("flex", Backend(flex_attention, _flex_available))


# -- flash-attn -----------------------------------------------------------------


def _flash_available(device: torch.device | None) -> str | None:
    # flash_attn_2_cuda: flash-attn 2's extension. flash-attn-4 installs only
    # flash_attn.cute (the fa4 backend), not flash_attn_func.
    if importlib.util.find_spec("flash_attn") is None or importlib.util.find_spec("flash_attn_2_cuda") is None:
        return "flash-attn is not installed (pip install flash-attn --no-build-isolation, or use the docker image)"
    if device is not None and device.type != "cuda":
        return "flash-attn runs only on CUDA devices"
    return None


def flash_attention(q, k, v, kind: LayerKind, window, doc_ids=None):
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    doc_ids = _doc_ids(doc_ids)
    if not kind.causal:
        raise ValueError(f"the flash backend takes causal (optionally windowed) layers, not {kind.name!r}; use flex or eager")
    # flash-attn's window (left, right) admits keys in [i - left, i + right]: (i - W, i] is left = W - 1
    window_size = (window - 1, 0) if kind.windowed else (-1, -1)
    b, h, t, d = q.shape
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # [B, T, H, D]
    if doc_ids is None:
        out = flash_attn_func(qt, kt, vt, causal=True, window_size=window_size)
        return out.transpose(1, 2)
    # documents: every (row, document) run becomes one varlen sequence
    flat_starts = document_start_mask(doc_ids).flatten().nonzero().flatten()
    cu = torch.cat([flat_starts, flat_starts.new_tensor([b * t])]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    out = flash_attn_varlen_func(
        qt.reshape(b * t, h, d), kt.reshape(b * t, -1, d), vt.reshape(b * t, -1, d),
        cu, cu, max_len, max_len, causal=True, window_size=window_size,
    )
    return out.view(b, t, h, d).transpose(1, 2)


BACKENDS.register("flash", Backend(flash_attention, _flash_available))


# -- flash-attn-4 (CuTe DSL kernels, Hopper/Blackwell) ------------------------------
#
# flash-attn-4 ships Python (CuTe DSL, compiled on first use), so it installs
# from a wheel where flash-attn 2 needs a CUDA build. Its kernels are wrapped
# as torch custom ops (forward, backward), so torch.compile keeps them in the
# graph: out and lse are allocated here, in the [B, T, H, D] layout the model's
# projections write, so their fake shapes and strides are exact.


def _fa4_window(window_left: int):
    return (None, None) if window_left < 0 else (window_left, 0)


def _fa4_varlen(cu_seqlens: torch.Tensor | None, max_seqlen: int) -> dict:
    """flash-attn-4's varlen arguments: every (row, document) run one
    sequence of a flattened batch, ``max_seqlen`` a host bound (the row
    length) so nothing waits on the device."""
    if cu_seqlens is None:
        return {}
    return {"cu_seqlens_q": cu_seqlens, "cu_seqlens_k": cu_seqlens, "max_seqlen_q": max_seqlen, "max_seqlen_k": max_seqlen}


@torch.library.custom_op("mixattn::fa4_forward", mutates_args=())
def _fa4_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window_left: int,
                 cu_seqlens: torch.Tensor | None = None, max_seqlen: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    from flash_attn.cute.interface import _flash_attn_fwd

    out, lse = _fa4_forward_fake(q, k, v, window_left, cu_seqlens, max_seqlen)
    left, right = _fa4_window(window_left)
    _flash_attn_fwd(q, k, v, causal=True, window_size_left=left, window_size_right=right, return_lse=True, out=out, lse=lse,
                    **_fa4_varlen(cu_seqlens, max_seqlen))
    return out, lse


@_fa4_forward.register_fake
def _fa4_forward_fake(q, k, v, window_left, cu_seqlens=None, max_seqlen=0):
    """q [B, T, H, D] -> out [B, T, H, Dv], lse [B, H, T]; varlen (cu_seqlens
    given): q [N, H, D] -> out [N, H, Dv], lse [H, N]."""
    out = q.new_empty(q.shape[:-1] + v.shape[-1:])
    if cu_seqlens is not None:
        n, h, _ = q.shape
        return out, q.new_empty((h, n), dtype=torch.float32)
    b, t, h, _ = q.shape
    return out, q.new_empty((b, h, t), dtype=torch.float32)


@torch.library.custom_op("mixattn::fa4_backward", mutates_args=())
def _fa4_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, window_left: int, cu_seqlens: torch.Tensor | None = None,
                  max_seqlen: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from flash_attn.cute.interface import _flash_attn_bwd

    dq, dk, dv = _fa4_backward_fake(dout, q, k, v, out, lse, window_left, cu_seqlens, max_seqlen)
    left, right = _fa4_window(window_left)
    _flash_attn_bwd(q, k, v, out, dout.contiguous(), lse, causal=True, window_size_left=left, window_size_right=right,
                    dq=dq, dk=dk, dv=dv, **_fa4_varlen(cu_seqlens, max_seqlen))
    return dq, dk, dv


@_fa4_backward.register_fake
def _fa4_backward_fake(dout, q, k, v, out, lse, window_left, cu_seqlens=None, max_seqlen=0):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _fa4_setup_context(ctx, inputs, output):
    q, k, v, window_left, cu_seqlens, max_seqlen = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.window_left, ctx.max_seqlen = window_left, max_seqlen


def _fa4_grad(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _fa4_backward(dout, q, k, v, out, lse, ctx.window_left, cu_seqlens, ctx.max_seqlen)
    return dq, dk, dv, None, None, None


_fa4_forward.register_autograd(_fa4_grad, setup_context=_fa4_setup_context)


def _fa4_available(device: torch.device | None) -> str | None:
    if importlib.util.find_spec("flash_attn") is None or importlib.util.find_spec("flash_attn.cute") is None:
        return "flash-attn-4 is not installed (pip install flash-attn-4)"
    if device is None:
        return None
    if device.type != "cuda":
        return "flash-attn-4 runs only on CUDA devices"
    if torch.cuda.get_device_capability(device)[0] not in (9, 10):
        return f"flash-attn-4 runs on Hopper and Blackwell GPUs (sm90, sm100), not on {torch.cuda.get_device_name(device)}"
    return None


def fa4_attention(q, k, v, kind: LayerKind, window, doc_ids=None):
    if not kind.causal:
        raise ValueError(f"the fa4 backend takes causal (optionally windowed) layers, not {kind.name!r}; use flex or eager")
    if q.device.type != "cuda":
        raise BackendUnavailable(f"the fa4 backend runs only on CUDA devices, got tensors on {q.device}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"the fa4 backend attends a training forward (as many queries as keys), got {q.shape[2]} "
                         f"queries over {k.shape[2]} keys; cached steps use the cache's attention")
    window_left = window - 1 if kind.windowed else -1  # keys (i - W, i]
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # [B, T, H, D]: the projections' layout, no copy
    if doc_ids is None:
        out, _ = _fa4_forward(qt, kt, vt, window_left)
        return out.transpose(1, 2)
    # documents: every (row, document) run one sequence of the flattened batch
    b, t, h, d = qt.shape
    cu = as_documents(doc_ids).cu_seqlens()
    out, _ = _fa4_forward(qt.reshape(b * t, h, d), kt.reshape(b * t, -1, d), vt.reshape(b * t, -1, vt.shape[-1]),
                          window_left, cu, t)
    return out.view(b, t, h, -1).transpose(1, 2)


BACKENDS.register("fa4", Backend(fa4_attention, _fa4_available))


# -- dispatch -------------------------------------------------------------------


class BackendUnavailable(RuntimeError):
    pass


def check_backend_name(name: str) -> None:
    """A config's check: ``name`` is auto or a registered backend (whether it
    is installed or runs on a device is checked where the model is built)."""
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; valid: auto, {', '.join(BACKENDS.names())}")


def check_backend(name: str, device=None) -> None:
    """Raise a clear error if backend ``name`` cannot run on ``device``
    (device None: only that the name is known and its package importable,
    as a config is checked before there is a device)."""
    if name == "auto":
        return
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; valid: auto, {', '.join(BACKENDS.names())}")
    device = None if device is None else torch.device(device)
    why = BACKENDS.get(name).available(device)
    if why is not None:
        usable = [n for n, b in BACKENDS.items() if b.available(device) is None]
        raise BackendUnavailable(f"attention backend {name!r} is unavailable: {why}; usable here: auto, {', '.join(usable)}")


# what flash-attn-4's kernels take; auto routes anything else elsewhere
FA4_DTYPES = (torch.bfloat16, torch.float16)
FA4_HEAD_DIMS = (64, 96, 128)


def select_backend(requested: str, device: torch.device, kind: LayerKind, has_docs: bool,
                   dtype: torch.dtype | None = None, head_dim: int | None = None) -> str:
    """The backend that ``requested`` resolves to for one call (``dtype`` and
    ``head_dim``: the call's, where known; fa4 takes bf16/fp16 and head
    dimensions 64, 96, 128 only)."""
    if requested != "auto":
        return requested
    if device.type != "cuda":
        return "sdpa"
    fa4_fits = (dtype is None or dtype in FA4_DTYPES) and (head_dim is None or head_dim in FA4_HEAD_DIMS)
    if kind.causal and fa4_fits and _fa4_usable(device.index):
        return "fa4"
    if kind.causal and not kind.windowed and not has_docs:
        return "sdpa"
    if kind.causal and _flash_usable(device.index):
        return "flash"
    return "flex"


def select_chunk_backend(requested: str, device: torch.device, kind: LayerKind, dtype: torch.dtype | None = None,
                         head_dim: int | None = None) -> str:
    """The backend for a chunk of queries that are the last of their keys
    (an ordered prefill chunk over its cached prefix: fewer queries than
    keys, aligned to the lower right): :func:`select_backend`'s choice, but
    never fa4, whose wrapper takes as many queries as keys; there SDPA for
    global layers (flash through a lower-right causal bias), flash-attn or
    FlexAttention for sliding ones."""
    name = select_backend(requested, device, kind, False, dtype, head_dim)
    if name != "fa4":
        return name
    if not kind.windowed:
        return "sdpa"
    return "flash" if _flash_usable(device.index) else "flex"


# Asked once per device, and constants to torch.compile: the probes call
# torch.cuda and importlib, which Dynamo cannot trace, and a graph break
# inside every attention call splits a compiled model into three graphs
# per layer (the tangents crossing them copied, their gradients summed
# eagerly).
@functools.cache
@torch.compiler.assume_constant_result
def _fa4_usable(index: int | None) -> bool:
    """flash-attn-4 installed and this CUDA device Hopper or Blackwell."""
    return _fa4_available(torch.device("cuda", index)) is None


@functools.cache
@torch.compiler.assume_constant_result
def _flash_usable(index: int | None) -> bool:
    """flash-attn 2 installed (for this CUDA device)."""
    return _flash_available(torch.device("cuda", index)) is None


def attend(q, k, v, kind: LayerKind, window: int | None, docs: Documents | torch.Tensor | None = None,
           backend: str = "auto"):
    name = select_backend(backend, q.device, kind, docs is not None, q.dtype, q.shape[-1])
    return BACKENDS.get(name).fn(q, k, v, kind, window, docs)


# -- attention over a KV cache (inference) ------------------------------------------


def position_mask(kind: LayerKind, window: int | None, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """[B, 1, C, S] bool from query positions [B, C] and key positions [B, S]
    (-1 = an empty cache slot)."""
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    return ((k >= 0) & kind.allowed(q, k, window))[:, None]


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as an additive bias: 0 where allowed, -inf elsewhere."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def _attend_cached_sdpa(q, k, v, bias):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=q.shape[1] != k.shape[1])


def _attend_cached_matmul(q, k, v, mask):
    """Two batched matmuls and a float32 softmax. For a handful of queries
    against a long cache this is two GEMVs that cuBLAS spreads over the key
    length, where a fused kernel that tiles over (batch, head, query block)
    occupies only B x H blocks of the GPU. GQA without copying K/V: the query
    heads of one KV group become extra query rows."""
    b, h, c, d = q.shape
    hkv = k.shape[1]
    g = h // hkv
    qg = q.reshape(b, hkv, g * c, d)  # head h = kv head h // g, as SDPA's enable_gqa
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * d**-0.5  # [B, Hkv, G*C, S]
    m = mask[:, :, None].expand(b, 1, g, c, mask.shape[-1]).reshape(b, 1, g * c, mask.shape[-1])
    probs = scores.masked_fill(~m, float("-inf")).softmax(dim=-1).to(v.dtype)
    return torch.matmul(probs, v).reshape(b, h, c, d)


def _attend_cached_flex(q, k, v, bias):
    """FlexAttention with the position mask as an additive score bias, read
    inside the kernel. Correct, but measured 5.7x slower than ``sdpa`` for a
    compiled batch-1 decode step on an H100 (docs/benchmarks.md); eager,
    torch runs its reference implementation."""
    from torch.nn.attention.flex_attention import flex_attention as flex

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[b, 0, q_idx, kv_idx]

    return flex(q, k, v, score_mod=score_mod, enable_gqa=q.shape[1] != k.shape[1])


@dataclass(frozen=True)
class KeyPositions:
    """The mask of a cached step in the form a kernel reads itself: query
    positions [B, C], the position each key slot holds [B, S] (-1: empty),
    and the layer's kind and window."""

    q_pos: torch.Tensor
    k_pos: torch.Tensor
    kind: LayerKind
    window: int | None


def _attend_cached_triton(q, k, v, mask: KeyPositions):
    """mixattn's split-KV Triton kernel (:mod:`mixattn.decode_kernel`): reads
    the position table itself, so a step builds no mask tensor."""
    from mixattn.decode_kernel import decode_attention

    if not mask.kind.causal:
        raise ValueError(f"the triton cached attention takes causal (optionally windowed) layers, not {mask.kind.name!r}; "
                         "use attention='sdpa'")
    return decode_attention(q, k, v, mask.q_pos, mask.k_pos, mask.window if mask.kind.windowed else None)


def _triton_available(device) -> str | None:
    from mixattn.decode_kernel import available

    return available(torch.device(device))


class MaskForm(enum.Enum):
    """The form of a cached step's mask that a cached attention reads."""

    BOOL = "bool"  # [B, 1, C, S] True = may attend (from position_mask)
    ADDITIVE = "additive"  # the same as a 0 / -inf bias in the queries' dtype
    POSITIONS = "positions"  # a KeyPositions: the kernel reads the position table itself


@dataclass(frozen=True)
class CachedAttention:
    """How queries [B, H, C, D] read cached keys/values [B, Hkv, S, D]:
    fn(q, k, v, mask) -> out, under a mask that the cache step computes once
    per layer kind (one static shape per cache, so decoding compiles and
    captures into CUDA graphs), in the :class:`MaskForm` ``mask`` names.
    ``available(device)``: None if usable there, else why not.
    ``max_queries``: the most queries per row a call takes (a kernel for
    decoding); a longer chunk (prefill) goes to ``sdpa`` instead."""

    fn: AttnFn
    mask: MaskForm
    available: Callable[[torch.device], str | None] = lambda device: None
    max_queries: int | None = None


CACHED_ATTENTION: Registry[CachedAttention] = Registry("cached attention implementation")
CACHED_ATTENTION.register("sdpa", CachedAttention(_attend_cached_sdpa, MaskForm.ADDITIVE))
CACHED_ATTENTION.register("matmul", CachedAttention(_attend_cached_matmul, MaskForm.BOOL))
CACHED_ATTENTION.register("flex", CachedAttention(_attend_cached_flex, MaskForm.ADDITIVE))
# the split-KV kernel puts a KV head's queries (query heads x step tokens) in one tile of rows: a few
# tokens per step (decoding, draft verification), not a prefill chunk
CACHED_ATTENTION.register("triton", CachedAttention(_attend_cached_triton, MaskForm.POSITIONS, _triton_available,
                                                    max_queries=16))
