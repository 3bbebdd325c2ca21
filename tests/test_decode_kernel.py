"""The split-KV Triton decode kernel against a float64 reference written from
the position rule (on the CPU it runs in Triton's interpreter; conftest turns
that on): GQA, several queries per row, sliding windows, empty slots, head
dims that are not powers of two, strided cache views, several key splits."""

import pytest
import torch

from mixattn import decode_kernel
from mixattn.decode_kernel import decode_attention, gemv, num_splits, use_gemv


def _reference(q, k, v, q_pos, k_pos, window):
    b, h, c, d = q.shape
    g = h // k.shape[1]
    k = k.double().repeat_interleave(g, dim=1)
    v = v.double().repeat_interleave(g, dim=1)
    scores = q.double() @ k.transpose(-1, -2) * d**-0.5  # [B, H, C, S]
    qp, kp = q_pos[:, None, :, None].long(), k_pos[:, None, None, :].long()
    ok = (kp >= 0) & (kp <= qp)
    if window is not None:
        ok &= qp - kp < window
    probs = scores.masked_fill(~ok, float("-inf")).softmax(-1).nan_to_num(0.0)  # a query that sees nothing: 0
    return probs @ v


CASES = [  # B, H, Hkv, C, S, D, window
    (1, 4, 4, 1, 70, 16, None),  # one query, MHA
    (2, 4, 2, 1, 70, 32, None),  # GQA
    (2, 4, 2, 3, 70, 32, 20),  # three queries, sliding
    (1, 2, 2, 5, 33, 8, None),  # head dim 8: padded to 16
    (2, 6, 3, 2, 50, 24, 9),  # head dim 24: padded to 32
    (3, 8, 1, 2, 100, 16, 7),  # all query heads on one KV head
]


@pytest.fixture(params=[False, True], ids=["combine-kernel", "fused-combine"])
def fused_combine(request, monkeypatch):
    """Both ways of combining the splits' parts: the second kernel, or the
    split kernel's last program of each (row, KV head) (FUSED_COMBINE), whose
    counters must be left at zero for the next launch (a CUDA graph replays
    the same counters)."""
    monkeypatch.setattr(decode_kernel, "FUSED_COMBINE", request.param)
    if request.param:  # one launch: the combine kernel is never run
        monkeypatch.setattr(decode_kernel, "_combine_jit", None)
    yield request.param
    if request.param:
        assert all(not c.any() for c in decode_kernel._COUNTERS.values())


@pytest.mark.parametrize("b,h,hkv,c,s,d,window", CASES)
def test_kernel_matches_the_position_rule(b, h, hkv, c, s, d, window, fused_combine):
    g = torch.Generator().manual_seed(s + d)
    q = torch.randn(b, h, c, d, generator=g)
    store = torch.randn(2, b, hkv, s + 7, d, generator=g)  # a cache store; attend to a prefix of its slots
    k, v = store[0, :, :, :s], store[1, :, :, :s]
    k_pos = torch.randint(-1, s + 5, (b, s), generator=g, dtype=torch.int32)  # -1: empty slots among them
    q_pos = torch.randint(s // 2, s + 5, (b, c), generator=g)
    assert num_splits(b, hkv, s, q.device) > 1  # the combine step is exercised
    out = decode_attention(q, k, v, q_pos, k_pos, window)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), _reference(q, k, v, q_pos, k_pos, window), rtol=1e-5, atol=1e-5)


def test_a_query_that_sees_no_key_gets_zeros_and_others_are_unaffected():
    q = torch.randn(1, 2, 2, 16)
    k, v = torch.randn(2, 1, 2, 40, 16).unbind(0)
    k_pos = torch.arange(40, dtype=torch.int32)[None].clone()
    k_pos[0, 10:] = -1  # only positions 0..9 are cached
    q_pos = torch.tensor([[5, 30]])
    out = decode_attention(q, k, v, q_pos, k_pos, window=3)  # query 30's window (27, 30] holds nothing
    assert torch.equal(out[0, :, 1], torch.zeros(2, 16))
    torch.testing.assert_close(out.double(), _reference(q, k, v, q_pos, k_pos, 3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 6])
def test_keys_no_query_can_see_are_never_read(window, fused_combine):
    # NaN in every slot the step's queries cannot see (empty, in the future, outside the window,
    # and all of row 1, whose queries have position -1: a continuous batch's idle row): the
    # kernel must not load them (0 * NaN would reach the output), and the rest is exact
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 2, 16, generator=g)
    k, v = torch.randn(2, 2, 2, 96, 16, generator=g).unbind(0)
    k_pos = torch.arange(96, dtype=torch.int32).repeat(2, 1)
    k_pos[0, 50:] = -1  # row 0 holds positions 0..49
    q_pos = torch.tensor([[40, 41], [-1, -1]])
    seen = (k_pos[0] >= 0) & (k_pos[0] <= 41) & ((k_pos[0] > 40 - window) if window else True)
    k_nan, v_nan = k.clone(), v.clone()
    k_nan[0, :, ~seen], v_nan[0, :, ~seen] = float("nan"), float("nan")
    k_nan[1], v_nan[1] = float("nan"), float("nan")
    out = decode_attention(q, k_nan, v_nan, q_pos, k_pos, window)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out[:1].double(), _reference(q, k, v, q_pos, k_pos, window)[:1], rtol=1e-5, atol=1e-5)


def test_the_fused_combine_gives_the_combine_kernels_output_exactly_launch_after_launch(monkeypatch):
    # the same parts, combined by the same code in the last split program instead of a second kernel;
    # run twice, as a graph replays it: the counters went back to zero, so the second launch combines again
    g = torch.Generator().manual_seed(9)
    q = torch.randn(2, 6, 3, 24, generator=g)
    k, v = torch.randn(2, 2, 3, 90, 24, generator=g).unbind(0)
    k_pos = torch.arange(90, dtype=torch.int32).repeat(2, 1)
    q_pos = torch.tensor([[87, 88, 89], [60, 61, 62]])
    outs = []
    for fused in (False, True, True):
        monkeypatch.setattr(decode_kernel, "FUSED_COMBINE", fused)
        outs.append(decode_attention(q, k, v, q_pos, k_pos, 40))
    assert num_splits(2, 3, 90, q.device) > 1
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])
    assert not decode_kernel._COUNTERS[q.device].any()


def test_half_precision_inputs_give_half_output_close_to_the_reference():
    # fp16: Triton's interpreter computes bf16 dots wrongly (triton 3.8); bf16 is checked on CUDA in tests/gpu
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 1, 32, generator=g).half()
    k, v = torch.randn(2, 1, 2, 64, 32, generator=g).half().unbind(0)
    k_pos = torch.arange(64, dtype=torch.int32)[None]
    out = decode_attention(q, k, v, torch.tensor([[63]]), k_pos)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), _reference(q, k, v, torch.tensor([[63]]), k_pos, None), rtol=5e-3, atol=5e-3)


def test_shapes_that_do_not_fit_are_rejected():
    q, k = torch.randn(1, 3, 1, 16), torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match=r"q \(1, 3, 1, 16\) and k/v \(1, 2, 8, 16\).*H a multiple of Hkv"):
        decode_attention(q, k, k, torch.zeros(1, 1), torch.zeros(1, 8, dtype=torch.int32))
    q = torch.randn(1, 2, 1, 16)
    with pytest.raises(ValueError, match=r"positions \(1, 1\) / \(1, 7\) do not fit queries \[1, 1\] / keys \[1, 8\]"):
        decode_attention(q, k, k, torch.zeros(1, 1), torch.zeros(1, 7, dtype=torch.int32))


def test_outside_the_interpreter_the_cpu_is_refused_with_the_reason(monkeypatch):
    from mixattn.generate import new_cache
    from mixattn.model import MixAttentionLM, ModelConfig

    monkeypatch.setattr(decode_kernel, "_interpreting", lambda: False)
    model = MixAttentionLM(ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=2, max_seq_len=16, plan="standard"))
    with pytest.raises(ValueError, match="cached attention 'triton' cannot run on cpu: the Triton kernel runs on CUDA GPUs"):
        new_cache(model, 1, 8, attention="triton")
    with pytest.raises(ValueError, match="use_gemv: the model is on cpu: the Triton kernel runs on CUDA GPUs"):
        use_gemv(model)
    assert not any(type(m).__name__ == "GemvLinear" for m in model.modules())  # nothing half-changed
    with pytest.raises(RuntimeError, match="gemv cannot run on cpu"):
        gemv(torch.randn(1, 8), torch.randn(4, 8))
    with pytest.raises(RuntimeError, match="decode_attention cannot run on cpu"):
        decode_attention(torch.randn(1, 2, 1, 16), *torch.randn(2, 1, 2, 4, 16), torch.zeros(1, 1),
                         torch.zeros(1, 4, dtype=torch.int32))


@pytest.mark.parametrize("n,k", [(100, 300), (7, 64), (33, 1030), (1, 16)])
def test_gemv_matches_a_float64_product(n, k):
    g = torch.Generator().manual_seed(n * k)
    w, x = torch.randn(n, k, generator=g), torch.randn(1, k, generator=g)
    out = gemv(x, w)
    assert out.shape == (1, n) and out.dtype == x.dtype
    torch.testing.assert_close(out.double(), x.double() @ w.double().T, rtol=1e-5, atol=1e-5)


def test_gemv_rejects_shapes_that_do_not_fit():
    with pytest.raises(ValueError, match=r"gemv: x \(2, 8\) and w \(4, 8\) do not fit"):
        gemv(torch.randn(2, 8), torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"gemv: x \(1, 8\) and w \(4, 9\) do not fit"):
        gemv(torch.randn(1, 8), torch.randn(4, 9))


def test_use_gemv_keeps_the_weights_and_the_decoded_logits(monkeypatch):
    from mixattn.generate import decode_step, new_cache, prefill
    from mixattn.model import MixAttentionLM, ModelConfig

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=32, plan="ma_offset", window=4)
    torch.manual_seed(0)
    plain = MixAttentionLM(cfg).eval()
    fast = MixAttentionLM(cfg).eval()
    fast.load_state_dict(plain.state_dict())
    before = {k: v.clone() for k, v in fast.state_dict().items()}
    assert use_gemv(fast) is fast
    after = fast.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    calls = []
    monkeypatch.setattr(decode_kernel, "gemv", lambda x, w, **kw: calls.append(w.shape) or x @ w.T)

    def run(model, rows):
        cache = new_cache(model, len(rows), 16)
        prefill(model, cache, rows)
        pos = torch.tensor([[len(r)] for r in rows])
        return decode_step(model, cache, torch.tensor([[5]] * len(rows)), pos)

    for rows in ([[1, 2, 3]], [[1, 2, 3], [4, 5, 6]]):
        calls.clear()
        torch.testing.assert_close(run(fast, rows), run(plain, rows), rtol=1e-5, atol=1e-5)
        # one-row steps take the GEMV for every projection and the head; batches and prefill never do
        n_linear = sum(1 for m in fast.modules() if isinstance(m, torch.nn.Linear))
        assert len(calls) == (n_linear if len(rows) == 1 else 0)


@pytest.mark.parametrize("norm,bias,act", [("layernorm", True, None), ("layernorm", False, None), ("rmsnorm", False, None),
                                           (None, False, "gelu")])
def test_gemv_with_its_input_normed_or_output_activated_equals_the_unfused_ops(norm, bias, act):
    """The norm (its statistics from the whole row, in every program) and
    the GELU (of each output, in the epilogue) run inside the GEMV: the same
    numbers as the norm then the product, or the product then F.gelu,
    float32, several K tiles."""
    torch.manual_seed(0)
    k, n = 200, 37  # three 64-wide K tiles on the CPU, the last one partial
    x, w = torch.randn(1, k) * 3 + 0.5, torch.randn(n, k)
    nw, nb = torch.randn(k), (torch.randn(k) if bias else None)
    if norm == "layernorm":
        want = torch.nn.functional.layer_norm(x, (k,), nw, nb, eps=1e-5) @ w.T
    elif norm == "rmsnorm":
        want = torch.nn.functional.rms_norm(x, (k,), nw, eps=1e-5) @ w.T
    else:
        want = torch.nn.functional.gelu(x @ w.T)
    kw = dict(norm=norm, norm_weight=nw, norm_bias=nb, eps=1e-5) if norm else {}
    torch.testing.assert_close(gemv(x, w, act=act, **kw), want, rtol=1e-5, atol=1e-4)


def test_gemv_refuses_a_norm_without_its_weight_and_unknown_names():
    x, w = torch.randn(1, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"norm 'layernorm' needs norm_weight of shape \[8\]"):
        gemv(x, w, norm="layernorm")
    with pytest.raises(ValueError, match=r"norm_weight of shape \[8\]"):
        gemv(x, w, norm="rmsnorm", norm_weight=torch.ones(7))
    with pytest.raises(ValueError, match="norm 'batchnorm' / act None; valid"):
        gemv(x, w, norm="batchnorm", norm_weight=torch.ones(8))
    with pytest.raises(ValueError, match="act 'relu'; valid"):
        gemv(x, w, act="relu")


@pytest.mark.parametrize("mlp,norm", [("gelu", "layernorm"), ("swiglu", "rmsnorm"), ("moe", "layernorm")])
def test_fused_gemv_inputs_keep_the_state_dict_and_every_output(mlp, norm):
    """fuse_gemv_inputs moves each block's norms into the GEMVs that read
    them and GELU into the up projection's epilogue: the state dict is the same
    tensors, a full forward (many rows: the norms applied unfused) is bit
    for bit the unfused model's, and batch-1 decode steps (one row: the
    fused kernels) give the unfused GEMV model's logits. MoE keeps its MLP
    norm. Applying it twice changes nothing more."""
    from mixattn.generate import decode_step, fuse_gemv_inputs, new_cache, prefill
    from mixattn.model import MixAttentionLM, ModelConfig

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=6, n_heads=4, n_kv_heads=2, max_seq_len=32, plan="ma_offset",
                      window=4, mlp_type=mlp, norm_type=norm, bias=norm == "layernorm", moe_experts=4)
    torch.manual_seed(0)
    plain = use_gemv(MixAttentionLM(cfg).eval())
    fused = MixAttentionLM(cfg).eval()
    fused.load_state_dict(plain.state_dict())
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    fuse_gemv_inputs(fuse_gemv_inputs(use_gemv(fused)))
    after = fused.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    deferred = [type(m).__name__ for m in fused.modules() if type(m).__name__.startswith("_Deferred")]
    assert len(deferred) == (12 if mlp != "moe" else 6)  # both norms of every block; MoE keeps its MLP norm
    assert (type(fused.blocks[0].mlp).__name__ == "_FusedGeluMLP") == (mlp == "gelu")
    ids = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        assert torch.equal(fused(ids).logits, plain(ids).logits)

    def run(model):
        cache = new_cache(model, 1, 24)
        prefill(model, cache, [[1, 2, 3, 4, 5, 6, 7]])  # the ring of 4 wraps
        out = []
        for t, tok in enumerate([5, 9, 2]):
            out.append(decode_step(model, cache, torch.tensor([[tok]]), torch.tensor([[7 + t]])))
        return torch.stack(out)

    with torch.no_grad():
        torch.testing.assert_close(run(fused), run(plain), rtol=1e-4, atol=1e-4)
