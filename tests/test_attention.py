"""Every attention backend against the eager reference; masks brute-forced."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from mixattn.attention import BACKENDS, BackendUnavailable, attend, build_mask, check_backend, eager_attention
from mixattn.plan import LAYER_KINDS

GLOBAL, SLIDING = LAYER_KINDS.get("global"), LAYER_KINDS.get("sliding")
T = 24


def _qkv(b=2, h=4, h_kv=2, t=T, d=16, dtype=torch.float64, grad=True):
    q, k, v = (torch.randn(b, n, t, d, dtype=dtype, requires_grad=grad) for n in (h, h_kv, h_kv))
    return q, k, v


def _docs(b=2, t=T):
    # row 0: documents of 7, 10, 7 tokens; row 1: 3 then 21
    return torch.tensor([[0] * 7 + [1] * 10 + [2] * 7, [5] * 3 + [6] * 21])[:b, :t]


CASES = [
    (GLOBAL, None),
    (SLIDING, 5),    # W < T
    (SLIDING, T),    # W = T: same as global
    (SLIDING, 2 * T),  # W > T
    (SLIDING, 1),    # only itself
]


def test_sliding_mask_allows_exactly_the_window():
    for t, w in itertools.product([1, 7, 13], [1, 2, 5, 13, 20]):
        mask = build_mask(SLIDING, w, t, t, None, "cpu")[0, 0]
        for i in range(t):
            for j in range(t):
                assert bool(mask[i, j]) == (i - w < j <= i), (t, w, i, j)
    g = build_mask(GLOBAL, None, 9, 9, None, "cpu")[0, 0]
    assert torch.equal(g, torch.ones(9, 9, dtype=torch.bool).tril())


def test_document_mask_never_crosses_documents():
    docs = _docs()
    mask = build_mask(SLIDING, 4, T, T, docs, "cpu")[:, 0]
    for b, i, j in itertools.product(range(2), range(T), range(T)):
        expected = (i - 4 < j <= i) and docs[b, i] == docs[b, j]
        assert bool(mask[b, i, j]) == expected


def test_flex_block_mask_matches_predicate():
    from torch.nn.attention.flex_attention import create_mask

    from mixattn.attention import _block_mask

    for kind, w in CASES:
        bm = _block_mask(kind, w, T, T, None, "cpu")
        dense = create_mask(bm.mask_mod, 1, 1, T, T, device="cpu")
        assert torch.equal(dense, build_mask(kind, w, T, T, None, "cpu"))


def test_eager_matches_explicit_softmax_formula():
    q, k, v = _qkv(h=2, h_kv=2, grad=False)
    out = eager_attention(q, k, v, SLIDING, 3)
    for b, h, i in itertools.product(range(2), range(2), [0, 2, 10, T - 1]):
        keys = range(max(0, i - 2), i + 1)
        s = torch.stack([q[b, h, i] @ k[b, h, j] / 4.0 for j in keys])
        p = s.softmax(0)
        ref = sum(p[n] * v[b, h, j] for n, j in enumerate(keys))
        torch.testing.assert_close(out[b, h, i], ref)


@pytest.mark.parametrize("kind, window", CASES)
@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("h_kv", [4, 2, 1])
def test_sdpa_matches_eager_forward_and_gradients(kind, window, docs, h_kv):
    doc_ids = _docs() if docs else None
    q, k, v = _qkv(h_kv=h_kv)
    ref = eager_attention(q, k, v, kind, window, doc_ids)
    grads_ref = torch.autograd.grad(ref.pow(2).sum(), (q, k, v))
    out = attend(q, k, v, kind, window, doc_ids, backend="sdpa")
    grads = torch.autograd.grad(out.pow(2).sum(), (q, k, v))
    torch.testing.assert_close(out, ref)
    for g, gr in zip(grads, grads_ref):
        torch.testing.assert_close(g, gr)


@pytest.fixture
def flex_at_any_length(monkeypatch):
    """These tests use T=24: let flex run below its SDPA fallback length."""
    import mixattn.attention as attention

    monkeypatch.setattr(attention, "FLEX_MIN_QUERY_LEN", 0)


@pytest.mark.usefixtures("flex_at_any_length")
@pytest.mark.parametrize("kind, window", CASES)
@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("h_kv", [4, 2])
def test_flex_matches_eager_forward_on_cpu(kind, window, docs, h_kv):
    # torch has no CPU backward for FlexAttention: gradients are checked on the
    # GPU in tests/gpu/test_gpu_attention.py.
    doc_ids = _docs() if docs else None
    q, k, v = _qkv(h_kv=h_kv, dtype=torch.float32, grad=False)
    ref = eager_attention(q, k, v, kind, window, doc_ids)
    torch.testing.assert_close(attend(q, k, v, kind, window, doc_ids, backend="flex"), ref, atol=2e-5, rtol=1e-4)


def test_flex_below_its_minimum_length_is_sdpa_with_a_mask(monkeypatch):
    """Under FLEX_MIN_QUERY_LEN (128) query tokens the flex backend runs
    SDPA with the explicit mask (inductor's flex template failed to compile
    for 90 tokens on an H100); from 128 on it is FlexAttention."""
    import mixattn.attention as attention

    calls = []
    real = attention.sdpa_attention
    monkeypatch.setattr(attention, "sdpa_attention", lambda *a: calls.append(a[0].shape[2]) or real(*a))
    for t in (90, 127, 128):
        q, k, v = _qkv(t=t, dtype=torch.float32, grad=False)
        out = attend(q, k, v, SLIDING, 16, None, backend="flex")
        torch.testing.assert_close(out, eager_attention(q, k, v, SLIDING, 16), atol=2e-5, rtol=1e-4)
    assert calls == [90, 127]


@pytest.mark.usefixtures("flex_at_any_length")
def test_flex_refuses_cpu_backward_with_clear_error():
    q, k, v = _qkv(dtype=torch.float32)
    with pytest.raises(RuntimeError, match="no backward pass on the CPU.*'sdpa' or 'eager'"):
        attend(q, k, v, SLIDING, 4, backend="flex")


def test_auto_backend_on_cpu_matches_eager():
    q, k, v = _qkv()
    for kind, w in CASES:
        torch.testing.assert_close(attend(q, k, v, kind, w, _docs()), eager_attention(q, k, v, kind, w, _docs()))


def test_unavailable_or_unknown_backend_errors():
    with pytest.raises(ValueError, match="unknown attention backend 'xformers'; valid: auto, eager, sdpa, flex, flash, fa4$"):
        check_backend("xformers", "cpu")
    if BACKENDS.get("flash").available(torch.device("cuda")) is not None:  # flash-attn not installed here
        with pytest.raises(BackendUnavailable, match="'flash' is unavailable: flash-attn is not installed"):
            check_backend("flash", "cuda")
    with pytest.raises(BackendUnavailable, match="flash-attn"):
        check_backend("flash", "cpu")


def test_fa4_backend_names_what_is_missing_and_refuses_what_it_cannot_run(monkeypatch):
    """flash-attn-4 is not installed on CPU machines: a config may name it
    (planning needs no kernel), the model built from it fails naming the
    package, an unknown name fails in the config; installed (simulated), a CPU device is refused
    naming why, and CPU tensors are refused before any kernel."""
    import importlib.util

    import mixattn.attention as attention
    from mixattn.model import MixAttentionLM, ModelConfig

    def fake_find_spec(installed):
        real = importlib.util.find_spec
        return lambda name, *a: (real("torch") if installed else None) if name.startswith("flash_attn") else real(name, *a)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec(False))
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=16, attn_backend="fa4")  # a config: a name
    with pytest.raises(BackendUnavailable, match=r"'fa4' is unavailable: flash-attn-4 is not installed \(pip install flash-attn-4\)"):
        MixAttentionLM(cfg)  # the model needs the package
    with pytest.raises(ValueError, match="unknown attention backend 'fa5'; valid: auto, "):
        ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=16, attn_backend="fa5")
    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec(True))
    MixAttentionLM(cfg)  # installed: accepted
    with pytest.raises(BackendUnavailable, match="'fa4' is unavailable: flash-attn-4 runs only on CUDA devices"):
        check_backend("fa4", "cpu")
    q, k, v = _qkv()
    with pytest.raises(BackendUnavailable, match="runs only on CUDA devices, got tensors on cpu"):
        attention.fa4_attention(q, k, v, GLOBAL, None, _docs())
    with pytest.raises(BackendUnavailable, match="runs only on CUDA devices, got tensors on cpu"):
        attend(q, k, v, SLIDING, 4, backend="fa4")


def test_fa4_custom_ops_describe_their_outputs_exactly():
    """The fake (meta) implementations torch.compile plans with: out like q in
    the [B, T, H, D] layout, lse [B, H, T] float32, gradients like their inputs."""
    from mixattn.attention import _fa4_backward_fake, _fa4_forward_fake

    q = torch.empty(2, 16, 8, 64, device="meta", dtype=torch.bfloat16)
    kv = torch.empty(2, 16, 3, 64 * 3, device="meta", dtype=torch.bfloat16)[..., :64]  # a strided slice, as v is
    out, lse = _fa4_forward_fake(q, kv, kv, -1)
    assert out.shape == q.shape and out.stride() == q.stride() and out.dtype == torch.bfloat16
    assert lse.shape == (2, 8, 16) and lse.dtype == torch.float32 and lse.is_contiguous()
    dq, dk, dv = _fa4_backward_fake(out, q, kv, kv, out, lse, 5)
    assert dq.shape == q.shape and dk.shape == dv.shape == kv.shape and dv.is_contiguous()
    assert hasattr(torch.ops.mixattn, "fa4_forward") and hasattr(torch.ops.mixattn, "fa4_backward")
    # varlen (documents): the flattened [B * T, H, D] batch, lse [H, B * T]
    qf, kvf = q.reshape(32, 8, 64), torch.empty(32, 3, 64, device="meta", dtype=torch.bfloat16)
    cu = torch.empty(9, device="meta", dtype=torch.int32)
    out, lse = _fa4_forward_fake(qf, kvf, kvf, 7, cu, 16)
    assert out.shape == (32, 8, 64) and lse.shape == (8, 32) and lse.dtype == torch.float32
    dq, dk, dv = _fa4_backward_fake(out, qf, kvf, kvf, out, lse, 7, cu, 16)
    assert dq.shape == qf.shape and dk.shape == dv.shape == kvf.shape


# -- document block masks (built per block from the ids, once per forward) -------------


def _random_docs(b, t, seed, max_len=400):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, max_len, (b, t), generator=g)
    return torch.stack([torch.repeat_interleave(torch.arange(t), lens[i])[:t] for i in range(b)])


@pytest.mark.parametrize("t", [128, 300, 512, 1000])
@pytest.mark.parametrize("kind, window", [(GLOBAL, None), (SLIDING, 64), (SLIDING, 200), (SLIDING, 1), (SLIDING, 5000)])
def test_document_block_mask_is_exactly_the_document_mask(t, kind, window):
    """Element by element the block mask is build_mask's, and its blocks are
    classified soundly: a skipped block holds no allowed pair, a full block
    only allowed pairs (T not a multiple of 128 included)."""
    from torch.nn.attention.flex_attention import create_mask

    from mixattn.attention import _dense_blocks, document_block_mask

    ids = _random_docs(3, t, seed=t)
    ids[2] = 7  # one document over the whole row
    bm = document_block_mask(kind, window, ids)
    ref = build_mask(kind, window, t, t, ids, "cpu")[:, 0]
    assert torch.equal(create_mask(bm.mask_mod, 3, 1, t, t, device="cpu")[:, 0], ref)
    n = -(-t // 128)
    partial = _dense_blocks(bm.kv_num_blocks, bm.kv_indices, n)[:, 0]
    full = _dense_blocks(bm.full_kv_num_blocks, bm.full_kv_indices, n)[:, 0]
    assert not (partial & full).any()
    pad = (0, n * 128 - t, 0, n * 128 - t)
    any_allowed = F.pad(ref, pad).view(3, n, 128, n, 128).any(-1).any(2)
    all_allowed = F.pad(ref, pad).view(3, n, 128, n, 128).all(-1).all(2)
    assert torch.equal(partial | full, any_allowed)  # nothing allowed is skipped, nothing skipped is computed
    assert not (full & ~all_allowed).any()
    if t % 128 == 0:
        assert torch.equal(full, all_allowed)  # every fully allowed block is marked full (no mask_mod there)
    # the row of one document is the kind's own mask
    kind_only = build_mask(kind, window, t, t, None, "cpu")[0, 0]
    assert torch.equal(ref[2], kind_only)


def test_document_block_mask_handles_unsorted_ids():
    """Ids need not increase along the row: documents are runs of equal ids
    here, but non-adjacent equal ids still see each other (the mask is
    'same id'), and block skipping stays sound."""
    from torch.nn.attention.flex_attention import create_mask

    from mixattn.attention import document_block_mask

    ids = torch.tensor([[3] * 200 + [1] * 100 + [3] * 84])
    bm = document_block_mask(GLOBAL, None, ids)
    assert torch.equal(create_mask(bm.mask_mod, 1, 1, 384, 384, device="cpu")[:, 0],
                       build_mask(GLOBAL, None, 384, 384, ids, "cpu")[:, 0])


def test_flex_with_documents_matches_eager_at_block_scale():
    q, k, v = _qkv(b=2, h=4, h_kv=2, t=384, d=16, dtype=torch.float32, grad=False)
    ids = _random_docs(2, 384, seed=3, max_len=150)
    for kind, w in [(GLOBAL, None), (SLIDING, 100)]:
        ref = eager_attention(q, k, v, kind, w, ids)
        torch.testing.assert_close(attend(q, k, v, kind, w, ids, backend="flex"), ref, atol=2e-5, rtol=1e-4)


def test_documents_build_each_block_mask_once_per_forward(monkeypatch):
    """A model forward builds one block mask per distinct (kind, window),
    not one per layer."""
    import mixattn.attention as attention
    from mixattn.model import MixAttentionLM, ModelConfig

    built = []
    real = attention.document_block_mask
    monkeypatch.setattr(attention, "document_block_mask", lambda kind, w, ids: built.append((kind.name, w)) or real(kind, w, ids))
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=6, n_heads=2, max_seq_len=256, plan="ma", window=64,
                      attn_backend="flex")
    model = MixAttentionLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 256))
    with torch.no_grad():
        out = model(ids, doc_ids=_random_docs(2, 256, seed=1, max_len=90)).logits
    assert sorted(built) == [("global", None), ("sliding", 64)]
    cfg_ref = ModelConfig(**{**cfg.to_dict(), "attn_backend": "eager"})
    ref_model = MixAttentionLM(cfg_ref).eval()
    ref_model.load_state_dict(model.state_dict())
    with torch.no_grad():
        ref = ref_model(ids, doc_ids=_random_docs(2, 256, seed=1, max_len=90)).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


# -- varlen offsets (fa4 with documents) ---------------------------------------------


def test_document_starts_are_each_rows_starts_padded_to_a_power_of_two():
    from mixattn.attention import document_starts, varlen_offsets

    ids = _docs()  # row 0: 7, 10, 7 tokens; row 1: 3, 21
    starts = document_starts(ids)
    # the most documents in a row (3), rounded up to a power of two: 4
    assert starts.dtype == torch.int32 and starts.tolist() == [[0, 7, 17, 24], [0, 3, 24, 24]]
    cu = varlen_offsets(starts, 24)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 7, 17, 24, 24, 27, 48, 48, 48]  # empty runs pad
    # a row of one document gets two starts, the second an empty run; five documents get eight
    assert document_starts(torch.zeros(3, 600, dtype=torch.long)).tolist() == [[0, 600]] * 3
    assert document_starts(torch.arange(10)[None] // 2).tolist() == [[0, 2, 4, 6, 8, 10, 10, 10]]
    # every token its own document: K = T
    assert document_starts(torch.arange(8)[None]).tolist() == [list(range(8))]


def test_document_starts_split_with_the_batch_as_composer_microbatches_it():
    from mixattn.attention import document_starts

    ids = _random_docs(6, 1000, seed=3, max_len=300)
    whole = document_starts(ids)
    for part in range(3):  # microbatches of 2 rows: the same starts, as long as K agrees
        rows = document_starts(ids[2 * part:2 * part + 2])
        assert torch.equal(whole[2 * part:2 * part + 2, :rows.shape[1]], rows)
        assert (whole[2 * part:2 * part + 2, rows.shape[1]:] == 1000).all()


def _varlen_reference(q, k, v, kind, window, cu):
    """Attention over the flattened batch's runs, one run at a time (eager,
    each run a document from its own position 0): what a varlen kernel given
    these offsets computes."""
    b, h, t, d = q.shape
    flat = [x.transpose(1, 2).reshape(b * t, x.shape[1], d) for x in (q, k, v)]
    out = torch.zeros_like(flat[0])
    bounds = cu.tolist()
    for lo, hi in zip(bounds, bounds[1:]):
        if hi > lo:
            qs, ks, vs = (x[lo:hi].transpose(0, 1)[None] for x in flat)
            out[lo:hi] = eager_attention(qs, ks, vs, kind, window)[0].transpose(0, 1)
    return out.view(b, t, h, d).transpose(1, 2)


@pytest.mark.parametrize("kind, window", [(GLOBAL, None), (SLIDING, 5), (SLIDING, 64)])
def test_varlen_offsets_encode_exactly_the_document_mask(kind, window):
    """The runs the fa4 backend hands its varlen kernel, attended one by
    one, equal the eager document-masked attention over the packed rows:
    documents that begin mid-row, rows that begin mid-document, padding runs."""
    from mixattn.attention import Documents, document_starts

    ids = torch.cat([_random_docs(3, 300, seed=5, max_len=120), torch.zeros(1, 300, dtype=torch.long)])
    q, k, v = _qkv(b=4, h=4, h_kv=4, t=300, grad=False)
    cu = Documents(ids).cu_seqlens()
    assert cu.shape[0] == 4 * document_starts(ids).shape[1] + 1
    torch.testing.assert_close(_varlen_reference(q, k, v, kind, window, cu), eager_attention(q, k, v, kind, window, ids))


def test_auto_picks_fa4_where_it_is_usable_and_fits_the_call(monkeypatch):
    """auto on a Hopper/Blackwell GPU with flash-attn-4 installed (simulated):
    fa4 for global and sliding layers, documents or not, in bf16/fp16 with
    head dimension 64/96/128; fp32 or another head dimension, or no fa4,
    gets the old choice (SDPA for plain global layers, else flex)."""
    import mixattn.attention as attention
    from mixattn.attention import select_backend

    cuda = torch.device("cuda")
    monkeypatch.setattr(attention, "_fa4_usable", lambda index: True)
    for kind in (GLOBAL, SLIDING):
        for docs in (False, True):
            assert select_backend("auto", cuda, kind, docs, torch.bfloat16, 64) == "fa4"
            assert select_backend("auto", cuda, kind, docs, torch.float16, 128) == "fa4"
    assert select_backend("auto", cuda, GLOBAL, False, torch.float32, 64) == "sdpa"
    assert select_backend("auto", cuda, SLIDING, True, torch.float32, 64) == "flex"
    assert select_backend("auto", cuda, GLOBAL, True, torch.bfloat16, 80) == "flex"
    assert select_backend("auto", torch.device("cpu"), GLOBAL, False, torch.bfloat16, 64) == "sdpa"
    assert select_backend("flex", cuda, GLOBAL, False, torch.bfloat16, 64) == "flex"  # asked for by name
    monkeypatch.setattr(attention, "_fa4_usable", lambda index: False)
    assert select_backend("auto", cuda, GLOBAL, False, torch.bfloat16, 64) == "sdpa"
    assert select_backend("auto", cuda, SLIDING, False, torch.bfloat16, 64) == "flex"


def test_backends_route_a_kind_by_what_it_is_not_by_its_name(monkeypatch):
    """Issue #20: a kind registered later is routed by ``LayerKind.causal``
    and ``windowed``: a causal windowed kind under a new name ("local") takes
    the fused kernels exactly like sliding, and its flash-style window is its
    own; a kind that is not causal in that sense (chunked) goes to flex where
    a mask can say it, and the fused kernels refuse it naming it."""
    import mixattn.attention as attention
    from mixattn.attention import _attend_cached_triton, fa4_attention, sdpa_attention, select_backend
    from mixattn.plan import LayerKind

    local = LayerKind("local", True, "L", SLIDING.allowed, SLIDING.cache_tokens, causal=True)
    chunked = LayerKind("chunked", True, "C", lambda q, k, w: (k <= q) & (q // w == k // w), lambda c, w: w)
    cuda = torch.device("cuda")
    monkeypatch.setattr(attention, "_fa4_usable", lambda index: True)
    assert select_backend("auto", cuda, local, True, torch.bfloat16, 64) == "fa4"
    assert select_backend("auto", cuda, chunked, False, torch.bfloat16, 64) == "flex"
    monkeypatch.setattr(attention, "_fa4_usable", lambda index: False)
    assert select_backend("auto", cuda, local, False, torch.bfloat16, 64) == "flex"  # windowed: not SDPA's causal path
    q, k, v = _qkv()
    torch.testing.assert_close(sdpa_attention(q, k, v, local, 4), eager_attention(q, k, v, SLIDING, 4))
    with pytest.raises(ValueError, match="the fa4 backend takes causal \\(optionally windowed\\) layers, not 'chunked'"):
        fa4_attention(q, k, v, chunked, 4)
    with pytest.raises(ValueError, match="the triton cached attention takes causal .* not 'chunked'"):
        _attend_cached_triton(q, k, v, attention.KeyPositions(None, None, chunked, 4))


@pytest.mark.parametrize("fa4, flash, kind, want", [
    (True, True, "global", "sdpa"), (True, True, "sliding", "flash"), (True, False, "sliding", "flex"),
    (False, True, "sliding", "flash"), (False, False, "sliding", "flex"), (False, False, "global", "sdpa"),
])
def test_a_prefill_chunk_never_goes_to_fa4_whose_wrapper_takes_as_many_queries_as_keys(monkeypatch, fa4, flash, kind, want):
    import mixattn.attention as A
    from mixattn.plan import LAYER_KINDS

    monkeypatch.setattr(A, "_fa4_usable", lambda index: fa4)
    monkeypatch.setattr(A, "_flash_usable", lambda index: flash)
    cuda = torch.device("cuda", 0)
    for requested in ("auto", "fa4"):
        assert A.select_chunk_backend(requested, cuda, LAYER_KINDS.get(kind), torch.bfloat16, 128) == want
    assert A.select_chunk_backend("auto", torch.device("cpu"), LAYER_KINDS.get(kind)) == "sdpa"
    assert A.select_chunk_backend("flex", cuda, LAYER_KINDS.get(kind)) == "flex"  # what was asked, where it is not fa4


@pytest.mark.parametrize("fa4", [True, False])
def test_choosing_a_backend_never_breaks_a_compiled_graph(monkeypatch, fa4):
    """The device probes behind ``auto`` (torch.cuda, importlib) are not
    traceable: Dynamo must take their answers as constants. A break there,
    inside every attention call, split each layer of a compiled model into
    three graphs on the GPU (and copied every tangent between them). Here
    the probes themselves break the graph, so a choice that traced them
    fails the count."""
    import mixattn.attention as A

    def probe(answer):
        def available(device):
            torch._dynamo.graph_break()
            return answer
        return available

    monkeypatch.setattr(A, "_fa4_available", probe(None if fa4 else "no fa4"))
    monkeypatch.setattr(A, "_flash_available", probe(None))
    A._fa4_usable.cache_clear()
    A._flash_usable.cache_clear()
    try:
        def f(x):
            name = A.select_backend("auto", torch.device("cuda", 0), SLIDING, False, torch.bfloat16, 64)
            return x * {"fa4": 2.0, "flash": 3.0}.get(name, 5.0)

        torch._dynamo.reset()
        explained = torch._dynamo.explain(f)(torch.ones(2))
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
        want = [2.0, 2.0] if fa4 else [3.0, 3.0]
        assert torch.compile(f, fullgraph=True, backend="eager")(torch.ones(2)).tolist() == want
    finally:
        A._fa4_usable.cache_clear()
        A._flash_usable.cache_clear()
