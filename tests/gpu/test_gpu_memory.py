"""A max batch that is true (issue #18): mixattn.memory.decode_memory against
the peak a real generation allocates on the GPU (prefill of every row, then
graphed, compiled decode steps), for several presets at their planned max
batch under a budget: never below the peak, at most 5% above it."""

import pytest
import torch

from mixattn.generate import DecodePath, new_cache, prefill
from mixattn.memory import decode_memory, max_decode_batch, model_bytes
from mixattn.model import MixAttentionLM, ModelConfig
from mixattn.plan import kv_cache_bytes

CONTEXT = 4096
BUDGET = 12 * 2**30


@pytest.mark.parametrize("plan", ["standard", "ma", "ma_offset", "ma_pairs"])
def test_the_planned_max_batch_runs_and_the_estimate_is_within_5_percent(plan):
    torch.cuda.empty_cache()
    cfg = ModelConfig(vocab_size=32000, d_model=1024, n_layers=12, n_heads=8, n_kv_heads=8, max_seq_len=CONTEXT, plan=plan,
                      window=512)
    torch.manual_seed(0)
    path = DecodePath.resolve("cuda")
    base = torch.cuda.memory_allocated()
    model = path.prepare(MixAttentionLM(cfg).to("cuda", torch.bfloat16).eval())
    weights = model_bytes(model)
    per_row = kv_cache_bytes(model.plan, n_kv_heads=8, head_dim=128, context_len=CONTEXT, batch_size=1, dtype="bf16")
    batch = max_decode_batch(BUDGET, cfg, model.plan, context=CONTEXT, weight_bytes=weights, kv_bytes_per_row=per_row,
                             attention=path.attention)
    assert batch > 1
    torch.cuda.reset_peak_memory_stats()
    cache = new_cache(model, batch, CONTEXT, attention=path.attention)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 32000, (CONTEXT - 8,), generator=g).tolist() for _ in range(batch)]
    logits = prefill(model, cache, prompts)
    step = path.step_fn()
    tokens = logits.argmax(-1)[:, None]
    positions = torch.full((batch, 1), CONTEXT - 8, device="cuda")
    for _ in range(4):
        tokens = step(model, cache, tokens, positions).argmax(-1)[:, None]
        positions = positions + 1
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    est = decode_memory(cfg, model.plan, batch=batch, context=CONTEXT, weight_bytes=weights, kv_bytes=cache.nbytes,
                        attention=path.attention)
    print(plan, batch, est.as_dict(), peak)
    assert est.peak <= BUDGET
    assert peak <= est.peak <= 1.05 * peak, (plan, batch, est.as_dict(), peak)
