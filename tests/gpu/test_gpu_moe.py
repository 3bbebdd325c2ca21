"""CUDA-only MoE checks: the fused grouped GEMM (bf16, Hopper) against the
padded batched-matmul path and a float32 reference, forward and backward,
and an MoE model training compiled in bf16 autocast."""

import pytest
import torch

from mixattn.model import MixAttentionLM, ModelConfig, _fused_grouped_mm_ok, grouped_matmul


def test_fused_grouped_gemm_is_taken_and_matches_padded_and_fp32():
    torch.manual_seed(0)
    x = torch.randn(1000, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(8, 256, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    counts = torch.tensor([0, 300, 10, 0, 290, 100, 200, 100], device="cuda")
    if torch.cuda.get_device_capability()[0] >= 9:
        assert _fused_grouped_mm_ok(x, w)
    g = torch.randn(1000, 512, device="cuda", dtype=torch.bfloat16)
    outs, grads = [], []
    for impl in ("fused", "padded"):
        x.grad = w.grad = None
        y = grouped_matmul(x, w, counts, impl)
        (y.float() * g.float()).sum().backward()
        outs.append(y.float())
        grads.append((x.grad.float(), w.grad.float()))
    starts = [0] + counts.cumsum(0).tolist()
    ref = torch.cat([x.float()[a:b] @ w.float()[e] for e, (a, b) in enumerate(zip(starts, starts[1:]))])
    for y in outs:
        assert (y - ref).norm() / ref.norm() < 1e-2
    assert (outs[0] - outs[1]).norm() / ref.norm() < 1e-2
    for a, b in zip(grads[0], grads[1]):
        assert (a - b).norm() / b.norm() < 1e-2


@pytest.mark.parametrize("compile", [False, True])
def test_moe_model_trains_on_cuda(compile):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, d_model=256, n_layers=6, n_heads=4, max_seq_len=256, plan="ma", window=64,
                      mlp_type="moe", moe_experts=8, moe_top_k=2)
    model = MixAttentionLM(cfg).cuda()
    step = torch.compile(model) if compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.randint(0, 64, (16, 256), device="cuda")  # a small alphabet: learnable quickly
    losses = []
    for _ in range(30):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = step(data, labels=data)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 1.0, losses
    assert 1.0 <= out.aux_loss.item() < 2.0  # balanced-ish routing (1.0 = perfectly uniform)
