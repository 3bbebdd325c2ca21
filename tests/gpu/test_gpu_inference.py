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
