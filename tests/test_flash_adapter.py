"""Our flash-attn adapter (layout, window_size, varlen cu_seqlens for packed
documents) against the eager reference.

flash-attn has no wheel for these machines, so its kernels are not run here.
The stand-in below implements flash-attn's documented API contract in plain
PyTorch (q/k/v as [B, T, H, D]; causal with window_size=(left, right)
admitting keys in [i - left, i + right]; varlen sequences delimited by
cu_seqlens), so what is tested is our translation onto that API."""

import types

import pytest
import torch

from mixattn.attention import eager_attention, flash_attention
from mixattn.plan import LAYER_KINDS

GLOBAL, SLIDING = LAYER_KINDS.get("global"), LAYER_KINDS.get("sliding")


def _contract_func(q, k, v, causal=False, window_size=(-1, -1)):
    b, t, h, d = q.shape
    rep = h // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    ok = torch.ones(t, t, dtype=torch.bool)
    if causal:
        ok &= j <= i
    left, right = window_size
    if left >= 0:
        ok &= j >= i - left
    if right >= 0:
        ok &= j <= i + right
    s = torch.einsum("bihd,bjhd->bhij", q, k) / d**0.5
    p = s.masked_fill(~ok, float("-inf")).softmax(-1)
    return torch.einsum("bhij,bjhd->bihd", p, v)


def _contract_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=False, window_size=(-1, -1)):
    assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32
    assert max_q == int((cu_q[1:] - cu_q[:-1]).max())
    out = torch.empty_like(q)
    for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        out[s:e] = _contract_func(q[None, s:e], k[None, s:e], v[None, s:e], causal, window_size)[0]
    return out


@pytest.fixture
def fake_flash(monkeypatch):
    mod = types.ModuleType("flash_attn")
    mod.flash_attn_func = _contract_func
    mod.flash_attn_varlen_func = _contract_varlen
    monkeypatch.setitem(__import__("sys").modules, "flash_attn", mod)


@pytest.mark.parametrize("kind, window", [(GLOBAL, None), (SLIDING, 1), (SLIDING, 5), (SLIDING, 40)])
@pytest.mark.parametrize("docs", [False, True])
def test_flash_adapter_matches_eager(fake_flash, kind, window, docs):
    q = torch.randn(2, 4, 24, 8, dtype=torch.float64)
    k, v = torch.randn(2, 2, 24, 8, dtype=torch.float64), torch.randn(2, 2, 24, 8, dtype=torch.float64)
    doc_ids = torch.tensor([[0] * 7 + [1] * 10 + [2] * 7, [5] * 3 + [6] * 21]) if docs else None
    torch.testing.assert_close(flash_attention(q, k, v, kind, window, doc_ids), eager_attention(q, k, v, kind, window, doc_ids))


def test_flash_adapter_rejects_other_kinds(fake_flash):
    from mixattn.plan import LayerKind

    chunked = LayerKind("chunked", True, "C", lambda q, k, w: (k <= q) & (q // w == k // w), lambda c, w: w)
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match=r"takes causal \(optionally windowed\) layers, not 'chunked'; use flex or eager"):
        flash_attention(q, q, q, chunked, 4)
