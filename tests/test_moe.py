"""The mixture-of-experts MLP: routing, the grouped GEMMs against a plain
per-expert reference, the load-balancing loss on a hand-made example, every
layer plan (cached decoding included), and training (one process and FSDP)."""

import math

import pytest
import torch

from mixattn.model import MixAttentionLM, ModelConfig, MoE, grouped_matmul, next_token_loss
from mixattn.plan import PRESETS


def _cfg(**kw):
    base = dict(vocab_size=61, d_model=32, n_layers=4, n_heads=4, max_seq_len=64, plan="ma", window=8,
                mlp_type="moe", moe_experts=4, moe_top_k=2, mlp_hidden=48)
    return ModelConfig(**{**base, **kw})


def _moe(**kw):
    torch.manual_seed(0)
    model = MixAttentionLM(_cfg(**kw))
    return model.blocks[0].mlp


def test_each_token_goes_to_k_distinct_experts_weighted_by_renormalised_probs():
    moe = _moe(moe_experts=6, moe_top_k=3)
    x = torch.randn(50, 32)
    weights, experts, probs = moe.route(x)
    assert experts.shape == (50, 3)
    assert all(len(set(row.tolist())) == 3 for row in experts)
    # the k largest router probabilities, renormalised to sum to one
    top = probs.topk(3, dim=-1)
    assert torch.equal(experts, top.indices)
    torch.testing.assert_close(weights, top.values / top.values.sum(-1, keepdim=True))
    torch.testing.assert_close(weights.sum(-1), torch.ones(50))


def _reference_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert: sum_j w_j * SwiGLU_{e_j}(x)."""
    weights, experts, _ = moe.route(x)
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for w, e in zip(weights[n], experts[n]):
            h = torch.nn.functional.silu(x[n] @ moe.w_gate[e]) * (x[n] @ moe.w_up[e])
            out[n] += w * (h @ moe.w_down[e])
    return out


@pytest.mark.parametrize("impl", ["fused", "padded"])
def test_grouped_experts_match_the_per_token_reference(impl):
    moe = _moe()
    moe.impl = impl
    x = torch.randn(2, 19, 32, requires_grad=True)
    out = moe(x)
    ref = _reference_moe(moe, x.detach().view(-1, 32)).view(2, 19, 32)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in (moe.w_gate, moe.w_up, moe.w_down, moe.router.weight)]
    x2 = x.detach().clone().requires_grad_()
    for p in moe.parameters():
        p.grad = None
    moe.impl = "padded" if impl == "fused" else "fused"
    out2 = moe(x2)
    (out2 * g).sum().backward()
    grads2 = [x2.grad] + [p.grad for p in (moe.w_gate, moe.w_up, moe.w_down, moe.router.weight)]
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_grouped_matmul_handles_empty_groups_and_rejects_an_unknown_impl():
    x, w = torch.randn(7, 8), torch.randn(4, 8, 4)
    counts = torch.tensor([0, 3, 0, 4])
    ref = torch.cat([x[:3] @ w[1], x[3:] @ w[3]])
    for impl in ("fused", "padded", "auto"):
        torch.testing.assert_close(grouped_matmul(x, w, counts, impl), ref)
    # rows the fused kernel cannot take (not 16-byte aligned): auto pads instead
    x, w = torch.randn(7, 5), torch.randn(4, 5, 3)
    torch.testing.assert_close(grouped_matmul(x, w, counts), torch.cat([x[:3] @ w[1], x[3:] @ w[3]]))
    with pytest.raises(ValueError, match="impl must be auto, fused or padded, got 'loop'"):
        grouped_matmul(x, w, counts, "loop")


def test_load_balancing_loss_on_a_hand_made_example():
    """Two experts, top-1, router = identity: tokens [ln 3, 0] go to expert 0
    with probabilities (3/4, 1/4), [0, ln 3] to expert 1 with (1/4, 3/4).
    Three tokens, two to expert 0: f = (2/3, 1/3), P = (1.75/3, 1.25/3),
    loss = 2 * (2/3 * 1.75/3 + 1/3 * 1.25/3) = 9.5/9."""
    moe = _moe(d_model=2, n_heads=1, moe_experts=2, moe_top_k=1, mlp_hidden=4)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(2))
    ln3 = math.log(3)
    x = torch.tensor([[ln3, 0.0], [0.0, ln3], [ln3, 0.0]])
    moe(x)
    assert moe.aux_loss.item() == pytest.approx(9.5 / 9, rel=1e-6)
    # perfectly balanced, uniform router: exactly 1
    with torch.no_grad():
        moe.router.weight.zero_()
    moe(torch.randn(8, 2))
    assert moe.aux_loss.item() == pytest.approx(1.0, rel=1e-6)


def test_training_loss_adds_the_weighted_mean_balancing_loss():
    torch.manual_seed(0)
    model = MixAttentionLM(_cfg(moe_aux_weight=0.25))
    ids = torch.randint(0, 61, (2, 32))
    out = model(ids, labels=ids)
    auxes = [block.mlp.aux_loss for block in model.blocks]
    assert len(model.moe_layers) == 4 and all(a.dim() == 0 for a in auxes)
    torch.testing.assert_close(out.aux_loss, torch.stack(auxes).mean())
    torch.testing.assert_close(out.loss, next_token_loss(out.logits, ids) + 0.25 * out.aux_loss)
    out.loss.backward()
    assert model.blocks[0].mlp.router.weight.grad.abs().sum() > 0  # the router learns (through weights and aux)


def test_flops_count_only_the_experts_a_token_uses():
    dense = MixAttentionLM(_cfg(mlp_type="swiglu"))
    moe = MixAttentionLM(_cfg(moe_experts=4, moe_top_k=2))
    # per layer the MoE runs 2 SwiGLU experts (2x the dense MLP) plus a 32x4 router
    extra = 3 * 2 * 4 * (3 * 32 * 48 + 32 * 4) * 10  # 3x (fwd+bwd), 2 FLOPs, 4 layers, 10 tokens
    assert moe.flops_per_sequence(10) - dense.flops_per_sequence(10) == extra


@pytest.mark.parametrize("preset", sorted(PRESETS.names()))
def test_every_plan_takes_an_moe_mlp_and_decodes_from_its_cache(preset):
    from mixattn.generate import decode_step, new_cache, prefill

    torch.manual_seed(0)
    model = MixAttentionLM(_cfg(plan=preset, n_layers=8, window=4)).eval()
    row = torch.randint(0, 61, (30,)).tolist()
    cache = new_cache(model, 1, 40)
    got = [prefill(model, cache, [row[:9]], chunk_size=4)[0]]
    for pos in range(9, 29):
        got.append(decode_step(model, cache, torch.tensor([[row[pos]]]), torch.tensor([[pos]]))[0])
    ref = model(torch.tensor([row])).logits[0, 8:29]
    torch.testing.assert_close(torch.stack(got), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kw, message", [
    ({"moe_experts": 0}, "moe_experts must be a positive integer, got 0"),
    ({"moe_top_k": 5}, r"moe_top_k must be in 1..moe_experts=4, got 5"),
    ({"moe_aux_weight": -1}, "moe_aux_weight must be a number >= 0, got -1"),
])
def test_bad_moe_settings_are_named(kw, message):
    with pytest.raises(ValueError, match=message):
        _cfg(**kw)
