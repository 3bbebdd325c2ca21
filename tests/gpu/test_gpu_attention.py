"""CUDA-only checks (run on the GPU machine with `make test-gpu`): compiled
FlexAttention forward and backward against the eager reference, and the model
training on the auto backend."""

import pytest
import torch

from mixattn.attention import attend, eager_attention
from mixattn.model import MixAttentionLM, ModelConfig
from mixattn.plan import LAYER_KINDS, PRESETS

GLOBAL, SLIDING = LAYER_KINDS.get("global"), LAYER_KINDS.get("sliding")
T = 512
CASES = [(GLOBAL, None), (SLIDING, 64), (SLIDING, T), (SLIDING, 2 * T), (SLIDING, 1)]


def _close(a, b, tol):
    """Relative error under tol; where the reference is exactly zero (a W=1
    window makes dq vanish), an absolute floor of tol per sqrt(element)."""
    err = (a.double() - b.double()).norm().item()
    return err <= tol * b.double().norm().item() + tol * 1e-2 * a.numel() ** 0.5


@pytest.mark.parametrize("backend", ["flex", "sdpa", "auto"])
@pytest.mark.parametrize("kind, window", CASES)
@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_backends_match_eager_forward_and_backward(backend, kind, window, docs, dtype):
    b, h, h_kv, d = 2, 8, 2, 64
    q, k, v = (torch.randn(b, n, T, d, device="cuda", dtype=dtype, requires_grad=True) for n in (h, h_kv, h_kv))
    doc_ids = None
    if docs:
        doc_ids = torch.zeros(b, T, dtype=torch.long, device="cuda")
        doc_ids[0, 100:] = 1
        doc_ids[0, 300:] = 2
        doc_ids[1, 37:] = 7
    # reference in float64 on the same inputs
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = eager_attention(q64, k64, v64, kind, window, doc_ids)
    grad_out = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out)
    out = attend(q, k, v, kind, window, doc_ids, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), grad_out.to(dtype))
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-3
    assert _close(out, ref, tol)
    for g, gr in zip(grads, ref_grads):
        assert _close(g, gr, tol)


@pytest.mark.parametrize("name", PRESETS.names())
def test_model_trains_on_cuda_with_auto_backend(name):
    cfg = ModelConfig(vocab_size=512, d_model=256, n_layers=8, n_heads=4, max_seq_len=512, plan=name, window=64)
    model = MixAttentionLM(cfg).cuda()
    ref = MixAttentionLM(ModelConfig(**{**cfg.to_dict(), "attn_backend": "eager"})).cuda()
    ref.load_state_dict(model.state_dict())
    x = torch.randint(0, 512, (2, 512), device="cuda")
    docs = (torch.arange(512, device="cuda") // 200).expand(2, 512)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(x, labels=x, doc_ids=docs).loss
        ref_loss = ref(x, labels=x, doc_ids=docs).loss
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - ref_loss.item()) < 2e-2


FA4_CASES = [(GLOBAL, None), (SLIDING, 64), (SLIDING, T), (SLIDING, 1)]


@pytest.mark.parametrize("kind, window", FA4_CASES)
@pytest.mark.parametrize("h_kv", [8, 2])
@pytest.mark.parametrize("docs", [None, "ids", "starts"])
def test_fa4_matches_eager_forward_and_backward_plain_and_compiled(kind, window, h_kv, docs):
    """flash-attn-4 (the fa4 backend) against the float64 reference, on
    q/k/v laid out as the model lays them out ([B, T, H, D] memory seen as
    [B, H, T, D]), eager and compiled (the custom ops in the graph; the
    forward gives the same bits; the backward sums dq in float32 with
    atomics, so its bits vary run to run). With documents through its varlen
    path: offsets from the ids (ids) or from the collator's starts (starts),
    ragged documents that begin mid-row and rows that begin mid-document."""
    from mixattn.attention import Documents, document_starts

    b, h, d = 2, 8, 64

    def view(n):
        return torch.randn(b, T, n, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()

    q, k, v = view(h), view(h_kv), view(h_kv)
    doc_ids = None if docs is None else _ragged_docs(b, T, seed=1, max_len=200)
    make_docs = (lambda: None) if docs is None else (
        (lambda: Documents(doc_ids)) if docs == "ids" else (lambda: Documents(doc_ids, document_starts(doc_ids.cpu()).cuda())))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = eager_attention(q64, k64, v64, kind, window, doc_ids)
    grad_out = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out)
    out = attend(q, k, v, kind, window, make_docs(), backend="fa4")
    grads = torch.autograd.grad(out, (q, k, v), grad_out.bfloat16())
    assert _close(out, ref, 1e-2)
    for g, gr in zip(grads, ref_grads):
        assert _close(g, gr, 1e-2)
    compiled = torch.compile(lambda q, k, v, dd: attend(q, k, v, kind, window, dd, backend="fa4"), fullgraph=docs is None)
    out_c = compiled(q, k, v, make_docs())
    grads_c = torch.autograd.grad(out_c, (q, k, v), grad_out.bfloat16())
    assert torch.equal(out_c, out)
    for g, gr in zip(grads_c, ref_grads):
        assert _close(g, gr, 1e-2)


@pytest.mark.parametrize("name", ["standard", "ma", "ma_offset"])
def test_model_trains_on_fa4_like_eager(name):
    cfg = ModelConfig(vocab_size=512, d_model=256, n_layers=8, n_heads=4, max_seq_len=512, plan=name, window=64,
                      attn_backend="fa4")
    model = MixAttentionLM(cfg).cuda()
    ref = MixAttentionLM(ModelConfig(**{**cfg.to_dict(), "attn_backend": "eager"})).cuda()
    ref.load_state_dict(model.state_dict())
    x = torch.randint(0, 512, (2, 512), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(x, labels=x).loss
        ref_loss = ref(x, labels=x).loss
        docs = _ragged_docs(2, 512, seed=2, max_len=300)
        doc_loss = model(x, labels=x, doc_ids=docs).loss
        doc_ref = ref(x, labels=x, doc_ids=docs).loss
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - ref_loss.item()) < 2e-2
    assert abs(doc_loss.item() - doc_ref.item()) < 2e-2 and abs(doc_loss.item() - loss.item()) > 1e-3  # documents change it


def _ragged_docs(b, t, seed, max_len):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, max_len, (b, t), generator=g)
    return torch.stack([torch.repeat_interleave(torch.arange(t), lens[i])[:t] for i in range(b)]).cuda()


@pytest.mark.parametrize("kind, window", [(GLOBAL, None), (SLIDING, 256)])
def test_flex_document_block_mask_forward_and_backward_vs_float64(kind, window):
    """The per-block document mask (built from the ids) at 2K tokens with
    ragged documents: forward and gradients against the float64 reference."""
    b, h, h_kv, d, t = 2, 8, 2, 64, 2048
    q, k, v = (torch.randn(b, n, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for n in (h, h_kv, h_kv))
    ids = _ragged_docs(b, t, seed=5, max_len=700)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = eager_attention(q64, k64, v64, kind, window, ids)
    grad_out = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out)
    out = attend(q, k, v, kind, window, ids, backend="flex")
    grads = torch.autograd.grad(out, (q, k, v), grad_out.bfloat16())
    assert _close(out, ref, 1e-2)
    for g_, gr in zip(grads, ref_grads):
        assert _close(g_, gr, 1e-2)


@pytest.mark.parametrize("per_block", [False, True])
def test_compiled_model_with_documents_matches_eager_and_never_recompiles(per_block):
    """Whole-model compile (DDP recipes) and per-block compile (FSDP recipes)
    with document masks: loss and gradients equal the eager backend's, and
    batches with other numbers of documents reuse the compiled code."""
    import torch._dynamo

    cfg = ModelConfig(vocab_size=512, d_model=256, n_layers=6, n_heads=4, n_kv_heads=2, max_seq_len=1024, plan="ma",
                      window=128)
    torch.manual_seed(0)
    model = MixAttentionLM(cfg).cuda()
    ref = MixAttentionLM(ModelConfig(**{**cfg.to_dict(), "attn_backend": "eager"})).cuda()
    ref.load_state_dict(model.state_dict())
    if per_block:
        for block in model.blocks:
            block.compile()
        run = model
    else:
        run = torch.compile(model)
    torch._dynamo.reset()
    x = torch.randint(0, 512, (2, 1024), device="cuda")
    for step, max_len in enumerate((300, 50, 1000, 7)):
        ids = _ragged_docs(2, 1024, seed=step, max_len=max_len)
        if step == 1:
            torch._dynamo.config.error_on_recompile = True
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = run(x, labels=x, doc_ids=ids).loss
                ref_loss = ref(x, labels=x, doc_ids=ids).loss
        finally:
            torch._dynamo.config.error_on_recompile = False
        grads = torch.autograd.grad(loss, list(model.parameters()))
        ref_grads = torch.autograd.grad(ref_loss, list(ref.parameters()))
        assert abs(loss.item() - ref_loss.item()) < 2e-2
        for g_, gr in zip(grads, ref_grads):
            assert _close(g_, gr, 5e-2)


@pytest.mark.parametrize("plan", ["standard", "ma"])
@pytest.mark.parametrize("docs", [False, True])
def test_a_compiled_model_on_the_auto_backend_is_one_graph(plan, docs):
    """torch.compile of the whole model (the recipes' scope) on CUDA with
    ``auto`` gives one graph and no breaks: the backend choice inside each
    attention call is a constant to Dynamo (a break there once cut every
    layer into three graphs and copied the tangents between them). With
    documents, the starts come from the collator, as in training."""
    import torch._dynamo

    from mixattn.attention import document_starts

    cfg = ModelConfig(vocab_size=512, d_model=256, n_layers=6, n_heads=4, max_seq_len=1024, plan=plan, window=128)
    model = MixAttentionLM(cfg).cuda()
    x = torch.randint(0, 512, (2, 1024), device="cuda")
    ids = _ragged_docs(2, 1024, seed=0, max_len=300) if docs else None
    starts = document_starts(ids) if docs else None  # as the collator hands them over (ids alone: one host sync)
    torch._dynamo.reset()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(lambda: model(x, labels=x, doc_ids=ids, doc_starts=starts).loss)()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
