"""The inference KV cache, built from the layer plan.

Only KV-owning layers get storage. A global owner keeps up to
``max_context`` tokens, at slot = position. A windowed owner (sliding) keeps
exactly ``cache_tokens(max_context, W)`` = min(W, max_context) tokens as a
ring buffer, at slot = position mod capacity. Sharing layers store nothing:
they attend to their source's keys in the same step.

Every slot records the absolute position it holds (-1: empty), so masks are
computed from positions: RoPE is applied before caching (keys keep their
absolute rotation), wrap-around needs no re-rotation, and batch rows may be at
different positions (prompts of different lengths). Owners of one capacity
and kind hold the same positions at the same slots, so they share one
position table (a *group*): a step writes each group's table once and
computes each (layer kind, window, group) mask once, not once per layer. Keys
and values of an owner live in one tensor and are written by one kernel.

``nbytes`` is the K/V storage and equals ``plan.kv_cache_bytes(...)``
exactly; the groups' slot-position tables (int32, ``metadata_bytes``) are the
only other allocation.

A prefill chunk reads the cache one of two ways (``KVCache.prefill``).
``masked``: SDPA over every slot it may see under a mask built from the
position tables (any chunk: padded rows, rows at different positions).
``ordered``: for a chunk the caller marks *contiguous* (every row's tokens are
positions [upto - C, upto), none padded, every earlier position cached), the
keys are put in position order (a global store's first ``upto`` slots; a
ring rolled to oldest-first, then the chunk) and the layer attends with the
model's training attention backend (``mixattn.attention.select_chunk_backend``:
causal or sliding window aligned to the last query, no mask tensor; on a GPU
SDPA's flash kernel for global layers, flash-attn or FlexAttention for
sliding ones, never fa4). A ring that is only partly filled takes the masked
way.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch

from mixattn.attention import BACKENDS, CACHED_ATTENTION, KeyPositions, MaskForm, additive_mask, position_mask, select_chunk_backend
from mixattn.plan import LayerKind, LayerPlan, format_bytes


@dataclass
class _Store:
    kv: torch.Tensor  # [2, B, Hkv, cap, D]: keys, values
    group: int  # index into KVCache.groups

    @property
    def k(self) -> torch.Tensor:
        return self.kv[0]

    @property
    def v(self) -> torch.Tensor:
        return self.kv[1]


@dataclass
class _Group:
    """The owners of one capacity and kind (ring or not) and their one
    position table."""

    cap: int
    ring: bool
    pos: torch.Tensor  # [B, cap] int32, -1 = empty


PREFILL_MODES = ("masked", "ordered")


class KVCache:
    def __init__(self, plan: LayerPlan, *, batch_size: int, max_context: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, attention: str = "sdpa", prefill: str = "masked"):
        if batch_size < 1 or max_context < 1:
            raise ValueError(f"batch_size and max_context must be >= 1, got {batch_size} and {max_context}")
        if prefill not in PREFILL_MODES:
            raise ValueError(f"unknown prefill attention {prefill!r}; valid: {', '.join(PREFILL_MODES)}")
        self.prefill = prefill  # how prefill chunks read the cache (see the module doc)
        why = CACHED_ATTENTION.get(attention).available(torch.device(device))  # an unknown name fails here, naming the valid ones
        if why is not None:
            raise ValueError(f"cached attention {attention!r} cannot run on {device}: {why}")
        self.attention = attention  # how queries attend to this cache (mixattn.attention.CACHED_ATTENTION)
        self.plan, self.batch_size, self.max_context = plan, batch_size, max_context
        self.dtype, self.device = dtype, torch.device(device)
        self.stores: dict[int, _Store] = {}
        self.groups: list[_Group] = []
        index: dict[tuple[int, bool], int] = {}
        for i in plan.owners:
            cap, ring = plan.cache_tokens(i, max_context), plan[i].spec.windowed
            if (cap, ring) not in index:
                index[cap, ring] = len(self.groups)
                pos = torch.full((batch_size, cap), -1, dtype=torch.int32, device=self.device)
                self.groups.append(_Group(cap, ring, pos))
            kv = torch.zeros((2, batch_size, n_kv_heads, cap, head_dim), dtype=dtype, device=self.device)
            self.stores[i] = _Store(kv, index[cap, ring])

    # -- accounting --------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Bytes of K and V storage (what ``kv_cache_bytes`` predicts)."""
        return sum(s.kv.nbytes for s in self.stores.values())

    @property
    def metadata_bytes(self) -> int:
        """Bytes of the slot-position tables (one per group)."""
        return sum(g.pos.nbytes for g in self.groups)

    def capacity(self, layer: int) -> int:
        return self.stores[layer].kv.shape[3]

    def __repr__(self) -> str:
        return (f"KVCache({len(self.stores)} owners of {len(self.plan)} layers, batch {self.batch_size}, "
                f"context {self.max_context}, {format_bytes(self.nbytes)} K/V + {format_bytes(self.metadata_bytes)} positions)")

    def reset(self) -> None:
        for g in self.groups:
            g.pos.fill_(-1)

    def clear_row(self, row: int) -> None:
        """Empty one row (a finished sequence's slot, before another takes it):
        its keys are never seen again, since every mask comes from positions."""
        for g in self.groups:
            g.pos[row].fill_(-1)

    def copy_row(self, src: int, dst: int, tokens: int) -> None:
        """Make row ``dst`` hold what row ``src`` holds, where ``src`` holds
        positions 0..tokens-1 and nothing past them: a prompt prefilled once
        for several sequences. A global owner copies only the slots those
        positions fill, a ring all of it."""
        if src == dst:
            return
        for store in self.stores.values():
            g = self.groups[store.group]
            n = g.cap if g.ring else min(tokens, g.cap)
            store.kv[:, dst, :, :n].copy_(store.kv[:, src, :, :n])
        for g in self.groups:
            n = g.cap if g.ring else min(tokens, g.cap)
            g.pos[dst, :n].copy_(g.pos[src, :n])
            g.pos[dst, n:].fill_(-1)

    def rows(self, start: int, stop: int) -> KVCache:
        """Rows [start, stop) as a cache of their own that shares this one's
        storage (views, no copy): a prefill chunk of one sequence runs on its
        row alone while the others wait."""
        view = object.__new__(KVCache)
        view.__dict__.update(self.__dict__)
        view.batch_size = stop - start
        view.groups = [_Group(g.cap, g.ring, g.pos[start:stop]) for g in self.groups]
        view.stores = {i: _Store(s.kv[:, start:stop], s.group) for i, s in self.stores.items()}
        return view

    def step(self, positions: torch.Tensor, valid: torch.Tensor | None = None, upto: int | None = None,
             contiguous: bool = False) -> CacheStep:
        """Begin one forward over the cache: records the step's positions in
        every group's table and returns the :class:`CacheStep` the layers
        write their keys/values through.

        positions: [B, C] absolute and consecutive per row; valid: [B, C] bool
        (False: right padding, never cached) or None. ``upto``: global layers
        attend only to slots < upto (prefill; None = all slots, a static shape
        for compiled decoding). ``contiguous``: the caller vouches that every
        row's positions are exactly [upto - C, upto), all valid, with every
        earlier position of the row in the cache (a prefill that runs its
        rows from position 0 in order): ``prefill: ordered`` then needs no
        mask (module doc)."""
        return CacheStep(self, positions, valid, upto, contiguous)


def _write(kv: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Store k, v [B, Hkv, C, D] at ``slots`` [B, C] of kv [2, B, Hkv, cap, D]
    by one indexed assignment (index_put_), which torch.compile keeps in place;
    a scatter_ into the store was compiled into a copy of the whole cache."""
    rows = torch.arange(slots.shape[0], device=slots.device)[:, None]  # [B, 1]
    # advanced indices first: [B, C, 2, Hkv, D]
    kv[:, rows, :, slots] = torch.stack([k, v]).permute(1, 3, 0, 2, 4).to(kv.dtype)


@dataclass
class _GroupStep:
    """One group's part of a step: where this step's tokens go and the key
    positions its layers' queries see."""

    key_pos: torch.Tensor  # [B, S]
    slots: torch.Tensor | None = None  # [B, C]: index writes (global layers; ring layers when decoding)
    write: torch.Tensor | None = None  # [B, cap] bool: ring slots a chunk overwrites
    take: torch.Tensor | None = None  # [B, cap] long: which chunk token lands in each slot
    keep: torch.Tensor | None = None  # [B, 1] bool: rows whose ring slot is written (None: all)
    ordered: bool = False  # the keys the layers get are in position order, ending at the last query (no mask needed)
    roll: int | None = None  # ordered ring: the slot holding the oldest position (None: the ring is empty, the chunk alone)


class CachedKV(NamedTuple):
    """What an owner layer's queries, and its sharers', attend to in a cached
    step: the keys and values [B, Hkv, S, D] of its position group."""

    keys: torch.Tensor
    values: torch.Tensor
    group: int


class CacheStep:
    """One forward over a :class:`KVCache`: the group position tables are
    written when it is made; each owner layer then calls :meth:`update` and
    every layer :meth:`mask` (memoised per layer kind, window and group)."""

    def __init__(self, cache: KVCache, positions: torch.Tensor, valid: torch.Tensor | None, upto: int | None,
                 contiguous: bool = False):
        self.cache, self.positions, self.valid = cache, positions, valid
        self.upto = upto
        ordered = contiguous and cache.prefill == "ordered" and upto is not None and positions.shape[1] > 1
        start = upto - positions.shape[1] if ordered else 0
        pos = positions.to(torch.int32)
        rows = torch.arange(pos.shape[0], device=pos.device)[:, None]
        self.groups: list[_GroupStep] = []
        self._masks: dict[tuple, torch.Tensor] = {}
        for g in cache.groups:
            if not g.ring:
                # slot = position; padded positions are written but marked empty, and a
                # later real token at that position overwrites them
                g.pos[rows, positions] = pos if valid is None else torch.where(valid, pos, torch.full_like(pos, -1))
                self.groups.append(_GroupStep(g.pos if upto is None else g.pos[:, :upto], slots=positions, ordered=ordered))
            elif pos.shape[1] == 1:
                # one token per row (decoding): slot position mod cap; the ring then holds
                # the last cap positions, all a window of W <= cap can see. A row that is
                # not decoding (valid False: a continuous batch's idle or prefilling row)
                # keeps its slot's old position and keys
                slots = torch.remainder(positions, g.cap)
                g.pos[rows, slots] = pos if valid is None else torch.where(valid, pos, g.pos[rows, slots])
                self.groups.append(_GroupStep(g.pos, slots=slots, keep=None if valid is None else valid))
            else:
                # a chunk: its queries see the old window plus the chunk (at most
                # cap + C keys); then the ring keeps the newest cap valid positions
                key_pos = torch.cat([g.pos, pos], dim=1)  # in-chunk keys keep their positions: padded queries see themselves
                first = pos[:, :1]  # [B, 1]
                n_valid = pos.shape[1] if valid is None else valid.sum(dim=1, keepdim=True, dtype=torch.int32)
                last_valid = first - 1 + n_valid
                slot_ids = torch.arange(g.cap, device=pos.device, dtype=torch.int32)[None]  # [1, cap]
                cand = last_valid - torch.remainder(last_valid - slot_ids, g.cap)  # newest position landing in each slot
                write = cand >= first  # [B, cap]
                take = (cand - first).clamp(min=0).long()  # its index in the chunk
                g.pos.copy_(torch.where(write, cand, g.pos))
                # ordered: an empty ring (the first chunk) or a full one (positions start - cap .. start - 1,
                # the oldest at slot start mod cap); a ring filled part-way is read under the mask
                full = ordered and start >= g.cap
                self.groups.append(_GroupStep(key_pos, write=write, take=take, ordered=ordered and (start == 0 or full),
                                              roll=start % g.cap if full else None))

    @functools.cached_property
    def _kernel_q_pos(self) -> torch.Tensor:
        """The query positions a kernel that reads the position table gets: a
        query that is not real (valid False: a row that does not decode this
        step) gets -1, so it sees nothing and none of that row's keys are read."""
        return self.positions if self.valid is None else torch.where(self.valid, self.positions, -1)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> CachedKV:
        """Store owner ``layer``'s keys/values [B, Hkv, C, D] (post-RoPE) and
        return what its queries and its sharers' attend to."""
        s = self.cache.stores[layer]
        gs = self.groups[s.group]
        if gs.slots is not None:
            if gs.keep is not None:  # a decode step in which some rows do not decode: their ring slot stays
                rows = torch.arange(gs.slots.shape[0], device=gs.slots.device)[:, None]
                old = s.kv[:, rows, :, gs.slots].permute(2, 0, 3, 1, 4)  # [B, C, 2, Hkv, D] -> [2, B, Hkv, C, D]
                keep = gs.keep[:, None, :, None]  # [B, 1, C, 1]
                k, v = torch.where(keep, k.to(s.kv.dtype), old[0]), torch.where(keep, v.to(s.kv.dtype), old[1])
            _write(s.kv, gs.slots, k, v)
            if self.upto is None or self.cache.groups[s.group].ring:
                return CachedKV(s.k, s.v, s.group)
            return CachedKV(s.k[:, :, : self.upto], s.v[:, :, : self.upto], s.group)
        if gs.ordered:  # oldest first: the ring rolled to its oldest slot, then the chunk (the ring is written below)
            if gs.roll is None:
                keys, values = k.to(s.kv.dtype), v.to(s.kv.dtype)
            else:
                keys = torch.cat([s.k.roll(-gs.roll, dims=2), k.to(s.kv.dtype)], dim=2)
                values = torch.cat([s.v.roll(-gs.roll, dims=2), v.to(s.kv.dtype)], dim=2)
        else:
            keys = torch.cat([s.k, k.to(s.kv.dtype)], dim=2)
            values = torch.cat([s.v, v.to(s.kv.dtype)], dim=2)
        b, h, _, d = k.shape
        idx = gs.take[None, :, None, :, None].expand(2, b, h, gs.take.shape[1], d)
        new = torch.gather(torch.stack([k, v]).to(s.kv.dtype), 3, idx)  # [2, B, Hkv, cap, D]
        s.kv.copy_(torch.where(gs.write[None, :, None, :, None], new, s.kv))
        return CachedKV(keys, values, s.group)

    def attend(self, q: torch.Tensor, kv: CachedKV, kind: LayerKind, window: int | None,
               backend: str = "auto") -> torch.Tensor:
        """Queries ``q`` [B, H, C, D] of a layer of ``kind`` and ``window`` over
        ``kv``, with the cache's attention implementation
        (:data:`~mixattn.attention.CACHED_ATTENTION`) under this step's mask
        in the form that implementation takes; an ordered prefill chunk
        (module doc) with the training attention ``backend`` instead, no mask.
        Returns [B, H, C, D]."""
        if self.groups[kv.group].ordered and kind.causal:
            name = select_chunk_backend(backend, q.device, kind, q.dtype, q.shape[-1])
            return BACKENDS.get(name).fn(q, kv.keys, kv.values, kind, window, None)
        impl = CACHED_ATTENTION.get(self.cache.attention)
        if impl.max_queries is not None and q.shape[2] > impl.max_queries:  # a prefill chunk
            impl = CACHED_ATTENTION.get("sdpa")
        return impl.fn(q, kv.keys, kv.values, self.mask(kind, window, kv.group, impl.mask, q.dtype))

    def mask(self, kind: LayerKind, window: int | None, group: int, form: MaskForm = MaskForm.BOOL,
             dtype: torch.dtype | None = None):
        """Which of ``group``'s keys each query of a layer of ``kind`` and
        ``window`` may see, in the :class:`~mixattn.attention.MaskForm` a
        cached attention takes. Computed once per step for all such layers."""
        key = (kind.name, window, group, form, dtype if form is MaskForm.ADDITIVE else None)
        if key not in self._masks:
            if form is MaskForm.BOOL:
                self._masks[key] = position_mask(kind, window, self.positions, self.groups[group].key_pos)
            elif form is MaskForm.ADDITIVE:
                self._masks[key] = additive_mask(self.mask(kind, window, group), dtype)
            elif form is MaskForm.POSITIONS:
                self._masks[key] = KeyPositions(self._kernel_q_pos, self.groups[group].key_pos, kind, window)
            else:
                raise ValueError(f"unknown mask form {form!r}; valid: {', '.join(f.name for f in MaskForm)}")
        return self._masks[key]
