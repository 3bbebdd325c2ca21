"""Property: any list of random layer entries either builds a valid plan whose
KV accounting is exact (and a model whose K/V parameters match the plan), or
raises PlanError — never anything else."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixattn.model import MixAttentionLM, ModelConfig
from mixattn.plan import LayerPlan, PlanError, kv_cache_bytes

entry = st.fixed_dictionaries(
    {"kind": st.sampled_from(["global", "sliding", "local"])},
    optional={"window": st.integers(-2, 40), "reuse": st.integers(-6, 6)},
)


@settings(max_examples=150, deadline=None)
@given(st.lists(entry, min_size=0, max_size=6), st.integers(1, 8), st.integers(1, 64))
def test_random_plans_validate_or_raise_plan_error(items, context, max_seq_len):
    try:
        plan = LayerPlan.from_list(items, window=8).check(len(items), max_seq_len)
    except PlanError:
        return
    # exact accounting: brute force over layers
    expected = 0
    for layer in plan:
        if layer.kv_source is None:
            expected += context if layer.kind == "global" else min(context, layer.window)
    assert kv_cache_bytes(plan, n_kv_heads=2, head_dim=4, context_len=context, dtype="fp32") == expected * 2 * 2 * 4 * 4
    model = MixAttentionLM(ModelConfig(vocab_size=11, d_model=8, n_layers=len(plan), n_heads=2, max_seq_len=max_seq_len, plan=plan))
    for layer, block in zip(plan, model.blocks):
        assert hasattr(block.attn, "wqkv") == (layer.kv_source is None)
    out = model(torch.zeros(1, min(max_seq_len, 5), dtype=torch.long)).logits
    assert torch.isfinite(out).all()
