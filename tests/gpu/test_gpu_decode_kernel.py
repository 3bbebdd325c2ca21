"""The Triton decode kernel on CUDA, in bf16 at the benchmark's shapes (16
heads of 128, 8K keys), plain and compiled, against a float64 reference."""

import pytest
import torch

from mixattn.decode_kernel import decode_attention
from test_decode_kernel import _reference  # the float64 position-rule reference the CPU tests use


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("b,h,hkv,c,s,d,window", [
    (1, 16, 16, 1, 8192, 128, None),  # the decode benchmark's standard layer
    (4, 16, 4, 1, 8192, 128, None),  # GQA
    (2, 16, 16, 1, 1024, 128, 512),  # a sliding ring
    (2, 8, 2, 7, 3000, 64, None),  # several queries (a prefill chunk), keys not a multiple of the tile
])
def test_kernel_matches_reference_on_cuda(b, h, hkv, c, s, d, window, compiled, fused, monkeypatch):
    from mixattn import decode_kernel

    monkeypatch.setattr(decode_kernel, "FUSED_COMBINE", fused)
    torch.manual_seed(0)
    q = torch.randn(b, h, c, d, device="cuda", dtype=torch.bfloat16)
    store = torch.randn(2, b, hkv, s, d, device="cuda", dtype=torch.bfloat16)
    k_pos = torch.arange(s, device="cuda", dtype=torch.int32).repeat(b, 1)
    k_pos[0, s - 100:] = -1  # row 0: the last slots are empty
    q_pos = torch.full((b, c), s - 1, device="cuda") - torch.arange(c, device="cuda").flip(0)
    fn = torch.compile(decode_attention, fullgraph=True) if compiled else decode_attention
    out = fn(q, store[0], store[1], q_pos, k_pos, window)
    ref = _reference(q, store[0], store[1], q_pos, k_pos, window)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("n,k", [(6144, 2048), (2048, 8192), (50304, 2048), (1000, 1000)])
def test_gemv_matches_cublas_on_cuda(n, k):
    from mixattn.decode_kernel import gemv

    torch.manual_seed(0)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ w.double().T
    for fn in (gemv, torch.compile(gemv, fullgraph=True)):
        out = fn(x, w)
        assert out.dtype == torch.bfloat16 and out.shape == (1, n)
        torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("norm,act", [("layernorm", None), ("rmsnorm", None), (None, "gelu")])
def test_gemv_with_a_fused_norm_or_gelu_matches_the_unfused_ops_on_cuda(norm, act):
    """bf16, the decode model's widths, eager and compiled: the fused norm
    equals the bf16 norm output that the unfused path feeds cuBLAS; the fused
    GELU equals F.gelu of the bf16 product."""
    import torch.nn.functional as F

    from mixattn.decode_kernel import gemv

    torch.manual_seed(0)
    k, n = 2048, 6144
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16) * 2 + 0.3
    nw = torch.randn(k, device="cuda", dtype=torch.bfloat16)
    nb = torch.randn(k, device="cuda", dtype=torch.bfloat16) if norm == "layernorm" else None
    if norm == "layernorm":
        xin, kw = F.layer_norm(x, (k,), nw, nb, 1e-5), dict(norm=norm, norm_weight=nw, norm_bias=nb, eps=1e-5)
    elif norm == "rmsnorm":
        xin, kw = F.rms_norm(x, (k,), nw, 1e-5), dict(norm=norm, norm_weight=nw, eps=1e-5)
    else:
        xin, kw = x, {}
    ref = xin.double() @ w.double().T
    if act == "gelu":
        ref = F.gelu(ref)
    for fn in (gemv, torch.compile(gemv, fullgraph=True)):
        out = fn(x, w, act=act, **kw)
        torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=3e-2)


def _graphed_logits_under(plan, setting, values, monkeypatch):
    """The default path's graphed batch-1 step over 159 tokens (the sliding
    rings wrap), once for each value of the decode_kernel ``setting``, each
    with a new cache and a new graph captured under it: one logits tensor
    per value."""
    from mixattn import decode_kernel
    from mixattn.generate import DecodePath, new_cache, prefill
    from mixattn.model import MixAttentionLM, ModelConfig

    cfg = ModelConfig(vocab_size=1024, d_model=512, n_layers=12, n_heads=8, n_kv_heads=2, max_seq_len=256,
                      plan=plan, window=32)
    path = DecodePath.resolve("cuda")
    torch.manual_seed(0)
    model = path.prepare(MixAttentionLM(cfg).to("cuda", torch.bfloat16).eval())
    tokens = torch.randint(0, 1024, (200,), generator=torch.Generator().manual_seed(4)).tolist()
    runs = []
    for value in values:
        monkeypatch.setattr(decode_kernel, setting, value)
        cache = new_cache(model, 1, 224, attention=path.attention)
        step = path.step_fn()  # a new graph, captured with this setting
        prefill(model, cache, [tokens[:40]], chunk_size=16)
        out = []
        for i in range(40, 199):
            logits = step(model, cache, torch.tensor([[tokens[i]]], device="cuda"), torch.tensor([[i]], device="cuda"))
            out.append(logits.clone())
        runs.append(torch.cat(out))
    return runs


@pytest.mark.parametrize("plan", ["standard", "ma_pairs"])
def test_programmatic_dependent_launch_changes_no_number(plan, monkeypatch):
    """With programmatic dependent launch (the default on Hopper and later)
    each of mixattn's decode kernels may start while the kernel before it
    still runs; one that read its input before waiting would race. The
    default path's graphed batch-1 step gives bit-identical logits with it
    and without it, over steps that wrap the sliding rings."""
    from mixattn import decode_kernel

    if torch.cuda.get_device_capability()[0] >= 9:
        assert decode_kernel.use_pdl(torch.device("cuda"))
    off, default = _graphed_logits_under(plan, "PDL", (False, None), monkeypatch)
    assert torch.equal(off, default)


@pytest.mark.parametrize("plan", ["standard", "ma_pairs"])
def test_the_fused_combine_gives_the_default_steps_logits_over_graph_replays(plan, monkeypatch):
    """FUSED_COMBINE (the split kernel's last program of each row and KV head
    combines, counting on counters it leaves at zero): the graphed batch-1
    step's logits equal the two-kernel path's exactly, replay after replay,
    with the sliding rings wrapping; counters that were not reset, or parts
    read before the other programs' stores were visible, would show here."""
    from mixattn import decode_kernel

    two_kernels, fused = _graphed_logits_under(plan, "FUSED_COMBINE", (False, True), monkeypatch)
    assert torch.equal(two_kernels, fused)
    assert not decode_kernel._COUNTERS[torch.device("cuda", torch.cuda.current_device())].any()
