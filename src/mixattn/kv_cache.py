"""The inference KV cache, built from the layer plan.

Only KV-owning layers get storage. A global owner keeps up to
``max_context`` tokens, at slot = position. A windowed owner (sliding) keeps
exactly ``cache_tokens(max_context, W)`` = min(W, max_context) tokens as a
ring buffer, at slot = position mod capacity. Sharing layers store nothing:
they attend to their source's keys in the same step.

Every slot records the absolute position it holds (-1: empty), so masks are
computed from positions: RoPE is applied before caching (keys keep their
absolute rotation), wrap-around needs no re-rotation, and batch rows may be at
different positions (prompts of different lengths).

``nbytes`` is the K/V storage and equals ``plan.kv_cache_bytes(...)``
exactly; the slot-position table (int32, ``metadata_bytes``) is the only
other allocation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixattn.attention import CACHED_ATTENTION
from mixattn.plan import LayerPlan, format_bytes


@dataclass
class _Store:
    k: torch.Tensor  # [B, Hkv, cap, D]
    v: torch.Tensor
    pos: torch.Tensor  # [B, cap] int32, -1 = empty
    ring: bool


class KVCache:
    def __init__(self, plan: LayerPlan, *, batch_size: int, max_context: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, attention: str = "sdpa"):
        if batch_size < 1 or max_context < 1:
            raise ValueError(f"batch_size and max_context must be >= 1, got {batch_size} and {max_context}")
        CACHED_ATTENTION.get(attention)  # an unknown name fails here, naming the valid ones
        self.attention = attention  # how queries attend to this cache (mixattn.attention.CACHED_ATTENTION)
        self.plan, self.batch_size, self.max_context = plan, batch_size, max_context
        self.dtype, self.device = dtype, torch.device(device)
        self.stores: dict[int, _Store] = {}
        for i in plan.owners:
            cap = plan.cache_tokens(i, max_context)
            shape = (batch_size, n_kv_heads, cap, head_dim)
            self.stores[i] = _Store(
                k=torch.zeros(shape, dtype=dtype, device=self.device),
                v=torch.zeros(shape, dtype=dtype, device=self.device),
                pos=torch.full((batch_size, cap), -1, dtype=torch.int32, device=self.device),
                ring=plan[i].spec.windowed,
            )

    # -- accounting --------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Bytes of K and V storage (what ``kv_cache_bytes`` predicts)."""
        return sum(s.k.nbytes + s.v.nbytes for s in self.stores.values())

    @property
    def metadata_bytes(self) -> int:
        """Bytes of the slot-position tables."""
        return sum(s.pos.nbytes for s in self.stores.values())

    def capacity(self, layer: int) -> int:
        return self.stores[layer].k.shape[2]

    def __repr__(self) -> str:
        return (f"KVCache({len(self.stores)} owners of {len(self.plan)} layers, batch {self.batch_size}, "
                f"context {self.max_context}, {format_bytes(self.nbytes)} K/V + {format_bytes(self.metadata_bytes)} positions)")

    def reset(self) -> None:
        for s in self.stores.values():
            s.pos.fill_(-1)

    # -- the step ------------------------------------------------------------------

    @staticmethod
    def _write(s: _Store, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        """Store k, v [B, Hkv, C, D] and positions [B, C] at ``slots`` [B, C].
        Indexed assignment (index_put_), which torch.compile keeps in place; a
        scatter_ into the store was compiled into a copy of the whole cache."""
        rows = torch.arange(slots.shape[0], device=slots.device)[:, None]  # [B, 1]
        s.k[rows, :, slots] = k.transpose(1, 2)  # advanced indices first: [B, C, Hkv, D]
        s.v[rows, :, slots] = v.transpose(1, 2)
        s.pos[rows, slots] = pos

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor | None,
               upto: int | None = None):
        """Store this step's keys/values of owner ``layer`` and return what its
        queries (and its sharers') attend to: (keys, values, key positions).

        k, v: [B, Hkv, C, D] (post-RoPE); positions: [B, C] absolute and
        consecutive per row; valid: [B, C] bool (False: right padding, never
        cached) or None. ``upto``: global layers attend only to slots < upto
        (prefill; None = all slots, a static shape for compiled decoding)."""
        s = self.stores[layer]
        k, v = k.to(s.k.dtype), v.to(s.v.dtype)
        pos = positions.to(torch.int32)
        if not s.ring:
            # slot = position; padded positions are written but marked empty, and a
            # later real token at that position overwrites them
            self._write(s, positions, k, v, pos if valid is None else torch.where(valid, pos, torch.full_like(pos, -1)))
            if upto is None:
                return s.k, s.v, s.pos
            return s.k[:, :, :upto], s.v[:, :, :upto], s.pos[:, :upto]
        cap = s.k.shape[2]
        if pos.shape[1] == 1 and valid is None:
            # one token per row (decoding): write it into slot position mod cap, then
            # attend to the ring itself; it now holds the last cap positions, all
            # a window of W <= cap can see. No copy of the ring, one static shape.
            self._write(s, torch.remainder(positions, cap), k, v, pos)
            return s.k, s.v, s.pos
        # a chunk: attend to the old window plus this chunk (at most cap + C keys),
        # then keep the newest cap valid positions
        keys = torch.cat([s.k, k], dim=2)
        values = torch.cat([s.v, v], dim=2)
        key_pos = torch.cat([s.pos, pos], dim=1)  # in-chunk keys keep their positions: padded queries see themselves
        first = pos[:, :1]  # [B, 1]
        last_valid = first - 1 + (pos.shape[1] if valid is None else valid.sum(dim=1, keepdim=True, dtype=torch.int32))
        slots = torch.arange(cap, device=pos.device, dtype=torch.int32)[None]  # [1, cap]
        cand = last_valid - torch.remainder(last_valid - slots, cap)  # newest position landing in each slot
        write = cand >= first  # [B, cap]
        j = (cand - first).clamp(min=0).long()  # its index in the chunk
        b, h, _, d = k.shape
        gidx = j[:, None, :, None].expand(b, h, cap, d)
        w4 = write[:, None, :, None]
        s.k.copy_(torch.where(w4, torch.gather(k, 2, gidx), s.k))
        s.v.copy_(torch.where(w4, torch.gather(v, 2, gidx), s.v))
        s.pos.copy_(torch.where(write, cand, s.pos))
        return keys, values, key_pos
