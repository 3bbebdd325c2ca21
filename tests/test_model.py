"""The model: parameter counts, KV sharing, packing, RoPE, config errors."""

import pytest
import torch

from mixattn.model import MixAttentionLM, ModelConfig, positions_from_doc_ids
from mixattn.plan import PRESETS, PlanError

TINY = dict(vocab_size=100, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=64, window=8, mlp_hidden=256)


def tiny(**kw):
    return MixAttentionLM(ModelConfig(**{**TINY, **kw}))


def test_parameter_counts_hand_computed():
    # V=100, d=64, H=4, Hkv=2, hd=16, hidden=256, LayerNorm without bias, tied embeddings
    embed, final_norm = 100 * 64, 64
    norms, wq, wo, mlp = 2 * 64, 64 * 64, 64 * 64, 2 * 64 * 256
    kv = 2 * 64 * (2 * 16)
    owner, reuser = norms + wq + kv + wo + mlp, norms + wq + wo + mlp
    assert (owner, reuser) == (45184, 41088)
    assert tiny(plan="standard").num_params() == embed + 4 * owner + final_norm == 187200
    assert tiny(plan="G S s g").num_params() == embed + 2 * owner + 2 * reuser + final_norm == 179008
    assert tiny(plan="all_sliding").num_params() == 187200
    # untied head and SwiGLU (three matrices) on top
    assert tiny(plan="standard", tie_embeddings=False).num_params() == 187200 + 100 * 64
    assert tiny(plan="standard", mlp_type="swiglu").num_params() == 187200 + 4 * 64 * 256
    assert tiny(plan="standard", qk_norm=True).num_params() == 187200 + 4 * 2 * 16


def test_sharing_layers_have_no_kv_projections():
    model = tiny(plan="G S s g")
    for i, block in enumerate(model.blocks):
        owns = model.plan[i].owns_kv
        assert hasattr(block.attn, "wqkv") == owns and hasattr(block.attn, "wq") == (not owns)
        if not owns:
            assert block.attn.wq.weight.shape == (64, 64)  # queries only


def test_sharing_layer_reads_its_sources_kv_and_gradients_flow_back():
    model = tiny(plan="G S s g").double()
    seen = {}

    def grab(i):
        def hook(module, args, out):
            seen[i] = out
        return hook

    for i, block in enumerate(model.blocks):
        block.attn.register_forward_hook(grab(i))
    x = torch.randint(0, 100, (2, 16))
    model(x)
    assert seen[2][1][0] is seen[1][1][0] and seen[2][1][1] is seen[1][1][1]  # layer 2 reads layer 1's K, V
    assert seen[3][1][0] is seen[0][1][0]
    # the output of layer 3 (a reuser) has a gradient w.r.t. layer 0's K/V weights
    g = torch.autograd.grad(seen[3][0].sum(), model.blocks[0].attn.wqkv.weight)[0]
    assert g[64:].abs().sum() > 0  # the K and V rows of the fused projection


@pytest.mark.parametrize("plan", ["standard", "all_sliding", "G S s g", "S s G g"])
def test_packed_documents_match_separate_forwards(plan):
    model = tiny(plan=plan).double().eval()
    a, b = torch.randint(0, 100, (1, 11)), torch.randint(0, 100, (1, 20))
    packed = torch.cat([a, b], 1)
    docs = torch.tensor([[0] * 11 + [1] * 20])
    out = model(packed, doc_ids=docs).logits
    torch.testing.assert_close(out[:, :11], model(a).logits)
    torch.testing.assert_close(out[:, 11:], model(b).logits)


def test_positions_restart_per_document():
    docs = torch.tensor([[3, 3, 3, 4, 4, 9], [1, 1, 1, 1, 1, 1]])
    assert positions_from_doc_ids(docs).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]


def test_sliding_window_limits_what_a_token_sees():
    # with W=8, logits at position 20 do not depend on token 5 in an all-sliding
    # 1-layer model, but do in a global one
    for plan, depends in (("S", False), ("G", True)):
        model = tiny(plan=plan, n_layers=1).double()
        x = torch.randint(0, 100, (1, 24))
        y = x.clone()
        y[0, 5] = (x[0, 5] + 1) % 100
        same = torch.allclose(model(x).logits[0, 20], model(y).logits[0, 20])
        assert same != depends


def test_loss_is_shifted_cross_entropy_and_ignores_minus_100():
    model = tiny()
    x = torch.randint(0, 100, (2, 16))
    out = model(x, labels=x)
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 100), x[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ref)
    labels = x.clone()
    labels[:, :8] = -100
    ref = torch.nn.functional.cross_entropy(out.logits[:, 7:-1].reshape(-1, 100), x[:, 8:].reshape(-1))
    torch.testing.assert_close(model(x, labels=labels).loss, ref)


def test_rope_scaling_and_theta_change_outputs_but_not_shapes():
    x = torch.randint(0, 100, (1, 32))
    base = tiny()
    for kw in ({"rope_theta": 500000.0}, {"rope_scaling": {"type": "linear", "factor": 4}}):
        other = tiny(**kw)
        other.load_state_dict(base.state_dict())
        assert not torch.allclose(other(x).logits, base(x).logits)
    # position interpolation by 4 at position 4p equals no scaling at position p
    scaled = tiny(rope_scaling={"type": "linear", "factor": 4.0})
    scaled.load_state_dict(base.state_dict())
    pos = torch.arange(8)[None] * 4
    torch.testing.assert_close(scaled(x[:, :8], position_ids=pos).logits, base(x[:, :8], position_ids=pos // 4).logits)


@pytest.mark.parametrize("name", PRESETS.names())
def test_every_preset_trains_a_step(name):
    model = tiny(plan=name, n_layers=8)
    x = torch.randint(0, 100, (2, 32))
    loss = model(x, labels=x).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("kw, message", [
    (dict(n_heads=5), "d_model=64 is not divisible by n_heads=5"),
    (dict(n_kv_heads=3), "n_kv_heads=3 must divide n_heads=4"),
    (dict(mlp_type="relu"), "unknown model.mlp_type 'relu'; valid: gelu, swiglu"),
    (dict(norm_type="batchnorm"), "unknown model.norm_type 'batchnorm'"),
    (dict(rope_scaling={"type": "yarn", "factor": 2}), "rope_scaling must be"),
    (dict(attn_backend="xformers"), "unknown attention backend 'xformers'"),
    (dict(n_layers=0), "model.n_layers must be a positive integer"),
    (dict(fp32_residual="no"), "model.fp32_residual must be true or false, got 'no'"),
    (dict(tie_embeddings=1), "model.tie_embeddings must be true or false, got 1"),
])
def test_bad_config_values_raise(kw, message):
    with pytest.raises(ValueError, match=message.replace("(", "\\(").replace("[", "\\[")):
        ModelConfig(**{**TINY, **kw})


def test_plan_model_mismatch_raises():
    with pytest.raises(PlanError, match="has 3 layers but the model has n_layers=4"):
        ModelConfig(**{**TINY, "plan": "G S s"})
    with pytest.raises(PlanError, match="window 128 is larger than max_seq_len 64"):
        ModelConfig(**{**TINY, "plan": "all_sliding", "window": 128})


def test_sequence_longer_than_max_rejected():
    with pytest.raises(ValueError, match="sequence length 65 exceeds max_seq_len 64"):
        tiny()(torch.zeros(1, 65, dtype=torch.long))


def test_config_dict_round_trip_keeps_plan():
    cfg = ModelConfig(**{**TINY, "plan": "ma"})
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again.layer_plan == cfg.layer_plan and again.to_dict() == cfg.to_dict()
    with pytest.raises(ValueError, match=r"model config: unknown key\(s\) model.n_layer; valid keys of model: "):
        ModelConfig.from_dict({**cfg.to_dict(), "n_layer": 3})


def test_new_layer_kind_plugs_in_without_touching_the_model():
    from mixattn.plan import LAYER_KINDS, LayerKind

    # chunked attention (Llama-4 style): a query sees earlier keys of its own chunk of W tokens
    LAYER_KINDS.register("chunked", LayerKind("chunked", True, "C", lambda q, k, w: (k <= q) & (q // w == k // w), lambda c, w: min(c, w)))
    try:
        plan = [{"kind": "chunked", "window": 4}]
        eager = tiny(plan=plan, n_layers=1, attn_backend="eager").double()
        sdpa = tiny(plan=plan, n_layers=1, attn_backend="sdpa").double()
        sdpa.load_state_dict(eager.state_dict())
        x = torch.randint(0, 100, (1, 12))
        torch.testing.assert_close(eager(x).logits, sdpa(x).logits)
        y = x.clone()
        y[0, 3] = (x[0, 3] + 1) % 100  # chunk 0; position 5 is in chunk 1
        torch.testing.assert_close(eager(x).logits[0, 4:], eager(y).logits[0, 4:])
        assert not torch.allclose(eager(x).logits[0, 3], eager(y).logits[0, 3])
    finally:
        LAYER_KINDS.unregister("chunked")


def test_training_flops_follow_the_plan():
    t = 32
    std, ma = tiny(plan="G G G G"), tiny(plan="G S s g")
    d, hd, h, V, hidden = 64, 16, 4, 100, 256
    per_layer_owner = 2 * (d * d + 2 * d * 32 + d * d + 2 * d * hidden)  # wq, wk+wv, wo, mlp
    per_layer_reuser = 2 * (d * d + d * d + 2 * d * hidden)
    global_pairs = t * (t + 1) // 2
    sliding_pairs = 8 * 9 // 2 + (t - 8) * 8  # W = 8
    attn = 4 * hd * h
    expected_std = 3 * (t * (4 * per_layer_owner + 2 * V * d) + 4 * attn * global_pairs)
    expected_ma = 3 * (t * (2 * per_layer_owner + 2 * per_layer_reuser + 2 * V * d) + attn * (2 * global_pairs + 2 * sliding_pairs))
    assert std.flops_per_sequence(t) == expected_std
    assert ma.flops_per_sequence(t) == expected_ma


def test_rope_tables_equal_the_formula_and_survive_a_cast():
    from mixattn.model import rope_cos_sin

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=128, rope_theta=5000.0,
                      rope_scaling={"type": "linear", "factor": 2.0})
    model = MixAttentionLM(cfg)
    pos = torch.tensor([[0, 5, 127, 64], [1, 2, 3, 100]])
    cos, sin = model.rope(pos)
    ref_cos, ref_sin = rope_cos_sin(cfg, pos)
    assert cos.shape == (2, 4, 1, 16) and cos.dtype == torch.float32
    torch.testing.assert_close(cos, ref_cos, rtol=0, atol=0)
    torch.testing.assert_close(sin, ref_sin, rtol=0, atol=0)
    model.to(torch.bfloat16)  # casts the weights; the tables stay float32, as computed
    assert model.embed.weight.dtype == torch.bfloat16
    assert model.rope_cos.dtype == model.rope_sin.dtype == torch.float32
    cos16, _ = model.rope(pos)
    assert cos16.dtype == torch.float32
    torch.testing.assert_close(cos16, ref_cos, rtol=0, atol=0)
    model.rope_cos, model.rope_sin = model.rope_cos.half(), model.rope_sin.half()  # cast past _apply: recomputed
    cos16, sin16 = model.rope(pos)
    torch.testing.assert_close(cos16, ref_cos, rtol=0, atol=0)
    torch.testing.assert_close(sin16, ref_sin, rtol=0, atol=0)
    assert "rope_cos" not in model.state_dict()  # derived, not saved


def test_rope_is_the_complex_rotation_and_attention_gets_views_of_the_projection(monkeypatch):
    """apply_rope on [B, T, H, hd] equals rotating each (x_i, x_{i+hd/2}) pair
    by position * theta^(-2i/hd) as a complex number, and attention receives
    q/k/v as [B, H, T, hd] views of that layout (no transposing copy before
    the attention kernel, none in its backward)."""
    import mixattn.model as model_module
    from mixattn.model import apply_rope

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=16, rope_theta=100.0)
    model = MixAttentionLM(cfg)
    pos = torch.arange(16)[None].expand(3, 16)
    cos, sin = model.rope(pos)
    x = torch.randn(3, 16, 2, 16, dtype=torch.float64)
    half = 8
    angle = pos[..., None, None].double() * 100.0 ** (-torch.arange(half, dtype=torch.float64) / half)
    ref = torch.view_as_real(torch.complex(x[..., :half], x[..., half:]) * torch.polar(torch.ones_like(angle), angle))
    ref = torch.cat([ref[..., 0], ref[..., 1]], dim=-1)
    torch.testing.assert_close(apply_rope(x, cos, sin), ref, rtol=0, atol=1e-6)

    seen = []
    real_attend = model_module.attend

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.shape, q.stride(), k.stride(), v.stride()))
        return real_attend(q, k, v, *args, **kwargs)

    monkeypatch.setattr(model_module, "attend", spy)
    model(torch.randint(0, 64, (3, 16)))
    hd, d = cfg.head_dim, cfg.d_model
    assert seen and all(shape == (3, 2, 16, hd) for shape, *_ in seen)
    for _, qs, ks, vs in seen:  # [B, H, T, hd] with T's stride = H * hd: the [B, T, H, hd] memory order
        assert qs == (16 * d, hd, d, 1) and ks == qs and vs == (16 * 3 * d, hd, 3 * d, 1)


def test_chunked_cross_entropy_equals_the_full_loss_and_gradients():
    from mixattn.model import chunked_cross_entropy

    cfg = ModelConfig(vocab_size=100, d_model=32, n_layers=4, n_heads=4, max_seq_len=64, plan="ma", window=8)
    model = MixAttentionLM(cfg)
    x = torch.randint(0, 100, (2, 64))
    labels = x.clone()
    labels[0, :10] = -100
    full = model(x, labels=labels).loss
    full.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    chunked = chunked_cross_entropy(model.hidden_states(x), model.output_weight, labels, chunk_tokens=17)
    chunked.backward()
    torch.testing.assert_close(chunked, full)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], msg=n)


def test_fp32_residual_off_keeps_the_stream_in_the_autocast_dtype():
    """fp32_residual=False: under autocast every block adds to a bf16 stream
    (Megatron's default, and the default here); with it on the stream is
    float32 (MPT's); without autocast the option changes nothing."""
    torch.manual_seed(0)
    assert ModelConfig().fp32_residual is False
    on = MixAttentionLM(ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4, max_seq_len=32, plan="ma", window=8,
                                    fp32_residual=True))
    off = MixAttentionLM(ModelConfig(**{**on.cfg.to_dict(), "fp32_residual": False}))
    off.load_state_dict(on.state_dict())
    ids = torch.randint(0, 64, (2, 32))
    seen = {}
    for name, model in (("on", on), ("off", off)):
        model.blocks[1].register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, (args[0].dtype, out[0].dtype)))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
        seen[name + "_loss"] = loss.item()
    assert seen["on"] == (torch.float32, torch.float32)
    assert seen["off"] == (torch.bfloat16, torch.bfloat16)
    assert seen["on_loss"] != seen["off_loss"] and abs(seen["on_loss"] - seen["off_loss"]) < 0.05
    with torch.no_grad():  # no autocast: the same computation
        torch.testing.assert_close(on(ids).logits, off(ids).logits, rtol=0, atol=0)


def test_rope_tables_rebuilt_after_loading_on_the_meta_device():
    """A loader that builds the model on the meta device and restores only saved
    tensors (transformers 5's from_pretrained) leaves the unsaved RoPE tables
    uninitialised; reset_rope_tables rebuilds them exactly."""
    cfg = ModelConfig(**TINY)
    ref = MixAttentionLM(cfg)
    with torch.device("meta"):
        model = MixAttentionLM(cfg)
    model.to_empty(device="cpu")
    model.load_state_dict(ref.state_dict())
    model.rope_cos.fill_(float("nan"))
    model.reset_rope_tables()
    assert torch.equal(model.rope_cos, ref.rope_cos) and torch.equal(model.rope_sin, ref.rope_sin)
    ids = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)
