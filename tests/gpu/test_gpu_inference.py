"""CUDA checks of the inference path: the compiled decode step (inductor,
cuDNN, FlexAttention or mixattn's Triton kernel) gives the logits of a full forward, after
sliding ring buffers have wrapped, for batch rows of different lengths."""

import pytest
import torch

from mixattn.generate import compiled_decode_step, new_cache, prefill
from mixattn.model import MixAttentionLM, ModelConfig

WINDOW = 16


@pytest.mark.parametrize("attention", ["sdpa", "flex", "matmul", "triton"])
@pytest.mark.parametrize("plan", ["standard", "ma_offset", "all_sliding"])
def test_compiled_cached_decoding_matches_full_forward_on_cuda(plan, attention):
    cfg = ModelConfig(vocab_size=128, d_model=128, n_layers=8, n_heads=4, n_kv_heads=2, max_seq_len=128, plan=plan,
                      window=WINDOW)
    torch.manual_seed(0)
    model = MixAttentionLM(cfg).to("cuda", torch.bfloat16).eval()
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (90, 71)]
    prompt = [20, 9]
    cache = new_cache(model, 2, 96, attention=attention)
    step = compiled_decode_step()
    first = prefill(model, cache, [r[:n] for r, n in zip(rows, prompt)], chunk_size=8)
    got = [[first[i]] for i in range(2)]
    pos = torch.tensor(prompt, device="cuda")[:, None]
    for s in range(max(len(r) - n for r, n in zip(rows, prompt)) - 1):  # 69 steps: the 16-slot rings wrap 4+ times
        tok = torch.tensor([r[min(n + s, len(r) - 1)] for r, n in zip(rows, prompt)], device="cuda")[:, None]
        logits = step(model, cache, tok, pos).float()
        for i, (r, n) in enumerate(zip(rows, prompt)):
            if n + s < len(r) - 1:
                got[i].append(logits[i])
        pos = pos + 1
    with torch.no_grad():
        for r, n, logits in zip(rows, prompt, got):
            ref = model(torch.tensor([r], device="cuda")).logits[0, n - 1: len(r) - 1].float()
            got_t = torch.stack(logits)
            assert got_t.shape == ref.shape
            # bf16 end to end: compare the predictions and the logits' relative error
            err = (got_t - ref).norm() / ref.norm()
            assert err < 0.03, (plan, attention, err.item())
            assert (got_t.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("plan", ["standard", "ma", "ma_offset", "ma_pairs"])
def test_the_default_decode_path_matches_the_full_forward(plan, batch):
    """generate's default on CUDA (Triton attention and GEMV, the compiled step
    replayed from a CUDA graph), teacher-forced: the logits of a full forward,
    rings wrapped, rows of different lengths; batch 1 takes the GEMV."""
    from mixattn.generate import DecodePath, GraphedStep

    path = DecodePath.resolve("cuda")
    assert path == DecodePath("triton", gemv=True, compile=True, cuda_graph=True, fuse="gelu")
    cfg = ModelConfig(vocab_size=128, d_model=128, n_layers=12, n_heads=4, n_kv_heads=2, max_seq_len=128, plan=plan,
                      window=WINDOW)
    torch.manual_seed(0)
    model = path.prepare(MixAttentionLM(cfg).to("cuda", torch.bfloat16).eval())
    g = torch.Generator().manual_seed(2)
    rows = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (90, 71)][:batch]
    prompt = [20, 9][:batch]
    cache = new_cache(model, batch, 96, attention=path.attention)
    step = path.step_fn()
    assert isinstance(step, GraphedStep)
    first = prefill(model, cache, [r[:n] for r, n in zip(rows, prompt)], chunk_size=8)
    got = [[first[i]] for i in range(batch)]
    pos = torch.tensor(prompt, device="cuda")[:, None]
    for s in range(max(len(r) - n for r, n in zip(rows, prompt)) - 1):
        tok = torch.tensor([r[min(n + s, len(r) - 1)] for r, n in zip(rows, prompt)], device="cuda")[:, None]
        logits = step(model, cache, tok, pos).float().clone()
        for i, (r, n) in enumerate(zip(rows, prompt)):
            if n + s < len(r) - 1:
                got[i].append(logits[i])
        pos = pos + 1
    assert len(step._graphs) == 1  # one capture, replayed every step
    with torch.no_grad():
        for r, n, logits in zip(rows, prompt, got):
            ref = model(torch.tensor([r], device="cuda")).logits[0, n - 1: len(r) - 1].float()
            got_t = torch.stack(logits)
            err = (got_t - ref).norm() / ref.norm()
            assert err < 0.03, (plan, batch, err.item())
            assert (got_t.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("plan", ["standard", "ma_offset", "ma_pairs"])
def test_the_engine_on_the_default_path_gives_the_eager_paths_tokens(plan):
    """Continuous batching through the graphed, compiled step (rows masked in
    and out of one captured graph, rows reused) against the eager SDPA step,
    in float32 so that greedy choices do not hinge on rounding."""
    from mixattn.engine import Engine, Request
    from mixattn.generate import DecodePath

    cfg = ModelConfig(vocab_size=128, d_model=64, n_layers=12, n_heads=4, n_kv_heads=2, max_seq_len=96, plan=plan,
                      window=8)
    outs = []
    for path in (DecodePath.resolve("cuda"), DecodePath()):
        torch.manual_seed(0)
        model = MixAttentionLM(cfg).to("cuda").eval()
        engine = Engine(model, max_slots=3, max_context=80, chunk_size=16, decode=path)
        g = torch.Generator().manual_seed(3)
        prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (33, 5, 17, 40, 9, 26, 12)]
        requests = [engine.submit(Request(p, m)) for p, m in zip(prompts, [9, 30, 4, 20, 25, 7, 16])]
        engine.run()
        outs.append([r.tokens for r in requests])
    assert outs[0] == outs[1]


@pytest.mark.parametrize("plan", ["standard", "ma_offset"])
def test_the_engine_on_the_default_path_shares_a_prompts_prefill_and_reports_its_logprobs(plan):
    """On the graphed, compiled path: n requests of one prompt (one greedy,
    two sampled, penalties on one) prefill it once (a row copied on the GPU
    while the graph holds the cache) and each equals itself alone on the
    eager SDPA step; greedy log-probabilities equal the eager path's, in
    float32."""
    from mixattn.engine import Engine, Request
    from mixattn.generate import DecodePath

    cfg = ModelConfig(vocab_size=128, d_model=64, n_layers=12, n_heads=4, n_kv_heads=2, max_seq_len=96, plan=plan,
                      window=8)
    torch.manual_seed(0)
    model = MixAttentionLM(cfg).to("cuda").eval()
    prompt = torch.randint(0, 128, (37,), generator=torch.Generator().manual_seed(5)).tolist()
    kws = [dict(logprobs=3), dict(temperature=1.0, seed=1), dict(temperature=1.0, seed=2, frequency_penalty=1.0)]
    kws = [dict(kw, prompt_logprobs=2) for kw in kws]  # twins ask the same of the prefill
    engine = Engine(model, max_slots=3, max_context=80, chunk_size=16, decode=DecodePath.resolve("cuda"))
    together = engine.submit_all([Request(prompt, 12, **kw) for kw in kws])
    engine.run()
    assert engine.shared_tokens == 2 * len(prompt) and engine.prefilled_tokens == len(prompt)
    for r, kw in zip(together, kws):
        alone = Engine(model, max_slots=1, max_context=80, chunk_size=16, decode=DecodePath())
        want = alone.submit(Request(prompt, 12, **kw))
        alone.run()
        assert r.tokens == want.tokens, kw
        if "logprobs" in kw:
            got = [e.logprob for e in r.prompt_token_logprobs + r.token_logprobs]
            ref = [e.logprob for e in want.prompt_token_logprobs + want.token_logprobs]
            assert got == pytest.approx(ref, abs=1e-3) and [e.top for e in r.token_logprobs][0][0][0] == r.tokens[0]


@pytest.mark.parametrize("backend", ["auto", "flex", "sdpa"])
@pytest.mark.parametrize("plan", ["standard", "ma", "ma_offset", "all_sliding"])
def test_ordered_prefill_gives_the_full_forwards_last_logits_on_cuda(plan, backend):
    """prefill: ordered on CUDA (SDPA's lower-right causal for global layers;
    flash-attn, FlexAttention or SDPA with a mask for sliding ones, as the
    model's backend resolves), chunks of 256 over a window of 128 (empty
    rings, then full ones, then a partial last chunk under the mask): the
    full forward's logits at every row's last prompt token, and the masked
    prefill's."""
    cfg = ModelConfig(vocab_size=256, d_model=256, n_layers=12, n_heads=4, n_kv_heads=2, max_seq_len=2048, plan=plan,
                      window=128, attn_backend=backend)
    torch.manual_seed(0)
    model = MixAttentionLM(cfg).to("cuda", torch.bfloat16).eval()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (1500, 1100)]
    last = {}
    for mode in ("masked", "ordered"):
        cache = new_cache(model, 2, 1600, prefill=mode)
        last[mode] = prefill(model, cache, prompts, chunk_size=256).float()
    with torch.no_grad():
        for i, p in enumerate(prompts):
            ref = model(torch.tensor([p], device="cuda")).logits[0, -1].float()
            for mode in ("masked", "ordered"):
                err = (last[mode][i] - ref).norm() / ref.norm()
                assert err < 0.03, (plan, backend, mode, err.item())
    err = (last["ordered"] - last["masked"]).norm() / last["masked"].norm()
    assert err < 0.03, (plan, backend, err.item())
