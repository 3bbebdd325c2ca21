"""The inference path: cached incremental decoding equals a full forward for
every preset (ring buffers wrapped many times, batch rows of different
lengths, any prefill chunk size); cache bytes equal the plan's formula;
generation is deterministic/reproducible; bad requests are rejected before
anything is allocated."""

import re

import pytest
import torch

from mixattn import generate as gen
from mixattn.generate import GenerationError, decode_step, generate, new_cache, prefill
from mixattn.model import MixAttentionLM, ModelConfig
from mixattn.plan import PRESETS, kv_cache_bytes

WINDOW = 4


def _model(plan="ma", n_layers=8, max_seq_len=96, vocab=61, **kw):
    cfg = ModelConfig(vocab_size=vocab, d_model=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, max_seq_len=max_seq_len,
                      plan=plan, window=WINDOW, **kw)
    torch.manual_seed(0)
    return MixAttentionLM(cfg).eval()


def _teacher_forced_logits(model, rows, prompt_lens, chunk, attention="sdpa", prefill_mode="masked"):
    """Prefill each row's prompt, then feed the rest of the row one token per
    step; returns per-row logits [len-1... ] for positions prompt_len-1 .. len-2."""
    b = len(rows)
    steps = max(len(r) - n for r, n in zip(rows, prompt_lens)) - 1
    cache = new_cache(model, b, max(prompt_lens) + steps + 1, attention=attention, prefill=prefill_mode)  # finished rows keep stepping
    first = prefill(model, cache, [r[:n] for r, n in zip(rows, prompt_lens)], chunk_size=chunk)
    got = [[first[i]] for i in range(b)]
    pos = torch.tensor(prompt_lens)[:, None]
    for s in range(steps):
        tok = torch.tensor([r[min(n + s, len(r) - 1)] for r, n in zip(rows, prompt_lens)])[:, None]
        logits = decode_step(model, cache, tok, pos)
        for i, (r, n) in enumerate(zip(rows, prompt_lens)):
            if n + s < len(r) - 1:
                got[i].append(logits[i])
        pos = pos + 1
    return [torch.stack(g) for g in got]


@pytest.mark.parametrize("preset", sorted(PRESETS.names()))
def test_cached_decoding_matches_full_forward_for_every_preset(preset):
    model = _model(preset)
    g = torch.Generator().manual_seed(1)
    lens = [40, 33, 37]
    rows = [torch.randint(0, 61, (n,), generator=g).tolist() for n in lens]
    prompt_lens = [5, 23, 14]  # the W=4 rings wrap 5-9 times
    got = _teacher_forced_logits(model, rows, prompt_lens, chunk=6)
    for r, n, logits in zip(rows, prompt_lens, got):
        ref = model(torch.tensor([r])).logits[0, n - 1: len(r) - 1]
        torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("attention,preset", [(a, p) for a in ("matmul", "flex") for p in ("standard", "ma", "all_sliding")]
                         + [("triton", "ma")])  # triton runs in Triton's interpreter here: slow, one preset
def test_other_cached_attention_matches_full_forward(preset, attention):
    # GQA (4 query heads over 2 KV heads): for matmul the group's heads become extra query rows.
    # ma at 8 layers (G S s S s s g g) has a global owner, sliding owners (rings that wrap) and sharers of both.
    model = _model(preset)
    g = torch.Generator().manual_seed(4)
    lens = (36, 29) if attention != "triton" else (22, 17)
    rows = [torch.randint(0, 61, (n,), generator=g).tolist() for n in lens]
    got = _teacher_forced_logits(model, rows, [11, 6], chunk=5, attention=attention)
    for r, n, logits in zip(rows, [11, 6], got):
        ref = model(torch.tensor([r])).logits[0, n - 1: len(r) - 1]
        torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)


def test_unknown_cached_attention_is_rejected_before_allocation():
    model = _model("ma")
    with pytest.raises(KeyError, match="unknown cached attention implementation 'flash'; valid: flex, matmul, sdpa, triton"):
        new_cache(model, 1, 8, attention="flash")
    with pytest.raises(GenerationError, match="unknown attention 'flash'; valid: auto, flex, matmul, sdpa, triton"):
        generate(model, [[1, 2]], 3, attention="flash")


def test_the_cli_offers_every_cached_attention():
    from mixattn.attention import CACHED_ATTENTION
    from mixattn.cli import CACHED_ATTENTION_NAMES

    assert CACHED_ATTENTION_NAMES == sorted(CACHED_ATTENTION.names())


@pytest.mark.parametrize("chunk", [1, 3, 4, 5, 64])
def test_prefill_chunk_size_does_not_change_the_result(chunk):
    model = _model("ma_offset")
    g = torch.Generator().manual_seed(2)
    rows = [torch.randint(0, 61, (n,), generator=g).tolist() for n in (30, 25)]
    got = _teacher_forced_logits(model, rows, [17, 9], chunk=chunk)
    for r, n, logits in zip(rows, [17, 9], got):
        ref = model(torch.tensor([r])).logits[0, n - 1: len(r) - 1]
        torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunk", [3, 6])
@pytest.mark.parametrize("preset", sorted(PRESETS.names()))
def test_ordered_prefill_matches_full_forward_for_every_preset(preset, chunk, monkeypatch):
    """prefill: ordered (keys in position order, the training attention, no
    mask) for the full chunks that every row fills, masked for the rest: the
    logits of a full forward. With W = 4: chunks of 6 see an empty ring, then
    full ones; chunks of 3 also a ring filled part-way (start 3), read under
    the mask; the chunk at 12 (or 15) is not filled by the 13-token row."""
    import dataclasses

    import mixattn.kv_cache as kvc

    seen = []
    real = kvc.select_chunk_backend

    def spy(backend, device, kind, dtype, head_dim):
        seen.append(kind.name)
        return real(backend, device, kind, dtype, head_dim)

    monkeypatch.setattr(kvc, "select_chunk_backend", spy)
    sdpa = kvc.BACKENDS.get("sdpa")
    shapes = []

    def sdpa_spy(q, k, v, kind, window, docs=None):
        shapes.append((kind.name, q.shape[2], k.shape[2]))
        return sdpa.fn(q, k, v, kind, window, docs)

    monkeypatch.setitem(kvc.BACKENDS._items, "sdpa", dataclasses.replace(sdpa, fn=sdpa_spy))
    model = _model(preset)
    g = torch.Generator().manual_seed(5)
    prompt_lens = [25, 19, 13]
    rows = [torch.randint(0, 61, (n + 7,), generator=g).tolist() for n in prompt_lens]
    got = _teacher_forced_logits(model, rows, prompt_lens, chunk=chunk, prefill_mode="ordered")
    backends, calls = list(seen), list(shapes)  # what the cached steps did (the full forwards below use sdpa too)
    for r, n, logits in zip(rows, prompt_lens, got):
        ref = model(torch.tensor([r])).logits[0, n - 1: len(r) - 1]
        torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
    kinds = {layer.spec.name for layer in model.plan}
    assert set(backends) == kinds and len(calls) == len(backends)  # on the CPU auto is sdpa for both kinds
    if "global" in kinds:  # [0, c) and [c, 2c) ... up to 12: every global layer, keys = the whole prefix
        assert {("global", chunk, end) for end in range(chunk, 13, chunk)} <= set(calls)
    if "sliding" in kinds:
        ring = {k for name, q, k in calls if name == "sliding"}
        assert chunk in ring and chunk + WINDOW in ring  # an empty ring (the chunk alone) and a full one, then the chunk
        assert ring == {chunk, chunk + WINDOW}  # never a ring filled part-way


def test_ordered_prefill_is_what_the_engine_and_generate_use_when_asked():
    from mixattn.engine import Engine, Request
    from mixattn.generate import DecodePath

    model = _model("ma")
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, 61, (n,), generator=g).tolist() for n in (21, 9, 14)]
    masked = generate(model, prompts, 6, chunk_size=4, decode=DecodePath(prefill="masked")).tokens
    ordered = generate(model, prompts, 6, chunk_size=4, decode=DecodePath(prefill="ordered")).tokens
    assert ordered == masked
    engine = Engine(model, max_slots=2, max_context=40, chunk_size=4, decode=DecodePath(prefill="ordered"))
    assert engine.cache.prefill == "ordered"
    requests = [engine.submit(Request(p, 6)) for p in prompts]
    engine.run()
    assert [r.tokens for r in requests] == masked
    with pytest.raises(GenerationError, match="unknown prefill 'sorted'; valid: masked, ordered"):
        DecodePath.resolve("cpu", prefill="sorted")
    assert DecodePath.resolve("cpu").prefill == "masked"  # opt-in until measured on a GPU


@pytest.mark.parametrize("preset", sorted(PRESETS.names()))
def test_cache_bytes_equal_the_plan_formula(preset):
    model = _model(preset, max_seq_len=96)
    for batch, context in [(1, 96), (3, 50), (2, 3)]:
        cache = new_cache(model, batch, context, torch.bfloat16)
        expected = kv_cache_bytes(model.plan, n_kv_heads=2, head_dim=8, context_len=context, batch_size=batch, dtype="bf16")
        assert cache.nbytes == expected, (preset, batch, context)
        assert set(cache.stores) == set(model.plan.owners)  # sharing layers allocate nothing
        for i, store in cache.stores.items():
            cap = min(WINDOW, context) if model.plan[i].window else context
            assert store.k.shape == (batch, 2, cap, 8) and store.k.dtype == torch.bfloat16
        # one int32 position table per distinct (capacity, ring) among the owners
        groups = {(cache.capacity(i), model.plan[i].spec.windowed) for i in cache.stores}
        assert len(cache.groups) == len(groups)
        assert cache.metadata_bytes == 4 * batch * sum(cap for cap, _ in groups)


def test_sliding_cache_is_window_sized_even_at_long_context():
    model = _model("all_sliding", max_seq_len=4096)
    cache = new_cache(model, 1, 4096)
    assert {cache.capacity(i) for i in cache.stores} == {WINDOW}
    std = new_cache(_model("standard", max_seq_len=4096), 1, 4096)
    assert std.nbytes == cache.nbytes * 4096 // WINDOW


def _naive_greedy(model, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


def test_greedy_generation_equals_naive_decoding_and_is_deterministic():
    model = _model("ma_pairs")
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [3] * 12]
    a = generate(model, prompts, 20, chunk_size=5)
    b = generate(model, prompts, 20, chunk_size=5)
    assert a.tokens == b.tokens
    for p, out in zip(prompts, a.tokens):
        assert out == _naive_greedy(model, p, 20)
    assert a.prompt_lengths == [7, 2, 12]


def test_sampling_is_reproducible_with_a_seed_and_top_k_1_is_greedy():
    model = _model("ma")
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    s1 = generate(model, prompts, 15, temperature=1.0, seed=7)
    s2 = generate(model, prompts, 15, temperature=1.0, seed=7)
    s3 = generate(model, prompts, 15, temperature=1.0, seed=8)
    assert s1.tokens == s2.tokens and s1.tokens != s3.tokens
    assert generate(model, prompts, 10, temperature=0.7, top_k=1, seed=3).tokens == generate(model, prompts, 10).tokens
    assert generate(model, prompts, 10, temperature=0.7, top_p=1e-6, seed=3).tokens == generate(model, prompts, 10).tokens


def test_stop_tokens_and_streaming_callback():
    model = _model("ma")
    prompts = [[1, 2, 3], [4, 5]]
    free = generate(model, prompts, 12).tokens
    stop = free[0][3]
    seen = []
    out = generate(model, prompts, 12, stop_tokens=[stop], on_token=lambda r, t: seen.append((r, t)))
    assert out.tokens[0] == free[0][: free[0].index(stop) + 1]  # the stop token is kept, nothing after it
    for r in range(2):
        assert [t for rr, t in seen if rr == r] == out.tokens[r]


def test_sample_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(gen.sample(logits, 1.0, None, 0.75, g)) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.75; 2 and 3 are cut


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts=[list(range(60))], max_new_tokens=40), "prompt of 60 tokens \\+ max_new_tokens 40 = 100 exceeds the model's max_seq_len 96"),
    (dict(prompts=[[1, 2], []], max_new_tokens=4), "prompt 1 is empty"),
    (dict(prompts=[], max_new_tokens=4), "non-empty list"),
    (dict(prompts=[[1, 2]], max_new_tokens=0), "max_new_tokens must be a positive integer, got 0"),
    (dict(prompts=[[1, 99]], max_new_tokens=2), "token id 99 outside the vocabulary \\[0, 61\\)"),
    (dict(prompts=[[1, 2]], max_new_tokens=2, stop_tokens=[500]), "stop token 500 is outside the vocabulary"),
    (dict(prompts=[[1, 2]], max_new_tokens=2, temperature=-1.0), "temperature must be >= 0"),
    (dict(prompts=[[1, 2]], max_new_tokens=2, top_p=0.0), "top_p must be in \\(0, 1\\]"),
])
def test_bad_requests_are_rejected_before_allocating(kwargs, message, monkeypatch):
    model = _model("ma")

    def no_alloc(*a, **k):
        raise AssertionError("allocated a cache for a bad request")

    monkeypatch.setattr(gen, "KVCache", no_alloc)
    with pytest.raises(GenerationError, match=message):
        generate(model, **kwargs)


def test_compiled_decode_step_is_one_graph_and_matches_eager():
    from mixattn.generate import compiled_decode_step

    model = _model("ma_offset")
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [3] * 12]
    cache_e, cache_c = new_cache(model, 3, 40), new_cache(model, 3, 40)
    prefill(model, cache_e, prompts, 5)
    prefill(model, cache_c, prompts, 5)
    step = compiled_decode_step()  # fullgraph=True: a graph break would raise
    pos = torch.tensor([[7], [2], [12]])
    for t in range(12):  # past several ring wrap-arounds
        tok = torch.tensor([[t % 61], [(3 * t) % 61], [5]])
        with torch.no_grad():
            ref = decode_step(model, cache_e, tok, pos)
            got = step(model, cache_c, tok, pos)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        pos = pos + 1


def test_compiled_decode_step_writes_the_cache_in_place():
    """torch.compile functionalizes in-place updates and must turn them back into
    in-place writes: a compiled step that allocates a buffer of a store's shape
    copies the whole cache every token (a scatter_ did: 2.4x slower at 32K)."""
    from torch._inductor.utils import run_and_get_code

    model = _model("ma_offset", n_layers=4)
    cache = new_cache(model, 2, 64)
    prefill(model, cache, [[1, 2, 3], [4, 5]], 8)
    step = torch.compile(decode_step, fullgraph=True, dynamic=False)
    with torch.no_grad():
        _, codes = run_and_get_code(step, model, cache, torch.tensor([[1], [2]]), torch.tensor([[3], [2]]))
    code = "\n".join(codes)
    stores = {(tuple(s.kv.shape), str(s.kv.dtype)) for s in cache.stores.values()}
    stores |= {(tuple(g.pos.shape), str(g.pos.dtype)) for g in cache.groups}
    assert stores == {((2, 2, 2, 64, 8), "torch.float32"), ((2, 2, 2, WINDOW, 8), "torch.float32"), ((2, 64), "torch.int32"),
                      ((2, WINDOW), "torch.int32")}  # global and ring stores, their position tables
    for shape, dtype in stores:
        assert not re.search(rf"empty_strided_cpu\({re.escape(str(shape))}, \([^)]*\), {dtype}\)", code), (shape, dtype)


@pytest.mark.parametrize("plan, groups, masks", [("standard", 1, 1), ("all_sliding", 1, 1), ("ma", 2, 2),
                                                 ("G S S G", 2, 2)])
def test_a_step_writes_each_position_table_and_computes_each_mask_once(monkeypatch, plan, groups, masks):
    """Owners of one capacity share a position table, and a step builds one
    mask per (layer kind, window, group), not one per layer: 8 layers, at
    most 2 masks."""
    import mixattn.kv_cache as kv_cache

    model = _model(plan, n_layers=8 if plan != "G S S G" else 4)
    cache = new_cache(model, 2, 40)
    assert len(cache.groups) == groups
    calls = []
    real = kv_cache.position_mask
    monkeypatch.setattr(kv_cache, "position_mask", lambda *a: calls.append(a[:2]) or real(*a))
    prefill(model, cache, [[1, 2, 3, 4, 5], [6, 7]], chunk_size=4)  # two chunks
    assert len(calls) == 2 * masks
    calls.clear()
    decode_step(model, cache, torch.tensor([[1], [2]]), torch.tensor([[5], [2]]))
    assert len(calls) == masks
