"""The persistent batch-1 decode kernel (mixattn.persistent) on CUDA: one
launch with grid barriers between the phases, bf16, graphed, against the
default path's step."""

import pytest
import torch

# a barrier that never opens hangs the GPU: fail the test (the thread method exits the process)
pytestmark = pytest.mark.timeout(300, method="thread")


def _logits(plan, persistent, d_model=512, n_heads=8, n_kv_heads=2, n_layers=12, steps=159):
    """A graphed batch-1 step over ``steps`` tokens after a 40-token prefill
    (the 32-token sliding rings wrap), the tokens fixed in advance; returns
    the logits of every step, the cache and the step."""
    from mixattn.generate import DecodePath, new_cache, prefill
    from mixattn.model import MixAttentionLM, ModelConfig

    cfg = ModelConfig(vocab_size=1024, d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                      max_seq_len=256, plan=plan, window=32)
    # the reference: the default path's kernels, the step not compiled (the same numbers, minutes less)
    path = DecodePath.resolve("cuda", persistent=persistent, compile=False)
    torch.manual_seed(0)
    model = path.prepare(MixAttentionLM(cfg).to("cuda", torch.bfloat16).eval())
    tokens = torch.randint(0, 1024, (256,), generator=torch.Generator().manual_seed(4)).tolist()
    cache = new_cache(model, 1, 40 + steps + 1, attention=path.attention)
    step = path.step_fn()
    prefill(model, cache, [tokens[:40]], chunk_size=16)
    out = []
    for i in range(40, 40 + steps):
        logits = step(model, cache, torch.tensor([[tokens[i]]], device="cuda"), torch.tensor([[i]], device="cuda"))
        out.append(logits.clone())
    return torch.cat(out).float(), cache, step


def _agree(got, want):
    # bf16 throughout, summed in another order: close, and the same greedy token almost everywhere
    assert (got - want).abs().mean() < 0.02 * want.abs().mean()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.97


@pytest.mark.parametrize("plan", ["standard", "ma", "ma_offset", "ma_pairs"])
def test_the_persistent_step_gives_the_default_steps_logits(plan):
    from mixattn.persistent import PersistentStep

    got, cache, step = _logits(plan, True)
    want, want_cache, _ = _logits(plan, False)
    _agree(got, want)
    for i, s in cache.stores.items():  # the keys and values it wrote, rings wrapped
        torch.testing.assert_close(s.kv.float(), want_cache.stores[i].kv.float(), rtol=0.05, atol=0.05)
    persistent = step.step
    assert isinstance(persistent, PersistentStep) and persistent.in_kernel
    (buf,) = persistent._buffers.values()
    assert not buf.bar.any() and not buf.acnt.any()  # the counters are left at zero for the next replay


def test_the_persistent_step_at_the_decode_benchmarks_widths():
    """d_model 2048, 16 heads of 128 (the decode benchmark's layer), MHA:
    the units of rows and splits of the real model."""
    got, _, _ = _logits("ma_offset", True, d_model=2048, n_heads=16, n_kv_heads=16, n_layers=6, steps=40)
    want, _, _ = _logits("ma_offset", False, d_model=2048, n_heads=16, n_kv_heads=16, n_layers=6, steps=40)
    _agree(got, want)


@pytest.mark.parametrize("setting", [{"HEAD_FLAGS": True}, {"L2_PREFETCH": True}, {"PREFETCH": False, "POLL_LOAD": False}])
def test_the_kernels_options_change_no_number(setting, monkeypatch):
    """The options change only when loads are issued and how programs wait
    for each other, never the arithmetic: the graphed logits over 159 steps
    are bit for bit the defaults'. A wait that lets a program read what
    another has not yet written would show here."""
    from mixattn import persistent

    want, _, _ = _logits("ma_pairs", True)
    for key, value in setting.items():
        monkeypatch.setattr(persistent, key, value)
    got, _, _ = _logits("ma_pairs", True)
    assert torch.equal(got, want)
