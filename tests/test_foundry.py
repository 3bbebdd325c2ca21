"""The llm-foundry plugin, checked against llm-foundry itself. Collected only
where llm-foundry is installed (`make test-foundry` installs it; conftest.py
leaves this file out otherwise, as for the GPU tests)."""

import json

import pytest
import torch
import yaml

from mixattn.mpt import mpt_from_plan, plan_from_mpt
from mixattn.plan import LayerPlan
from test_mpt import CHARACTER_AI


def test_llm_foundry_finds_the_model_through_its_entry_point():
    from llmfoundry import registry

    from mixattn.foundry import MixAttentionForFoundry

    assert registry.models.get("mixattn") is MixAttentionForFoundry


def _mpt_blocks(section: dict):
    """(sliding_window_size, reuse_kv_layer_idx) of every block llm-foundry builds."""
    from llmfoundry.models.mpt import MPTConfig, MPTModel

    # positions do not matter here (and llm-foundry 0.22's HF-RoPE path needs transformers < 4.52)
    attn = {**section.get("attn_config", {}), "attn_impl": "torch", "rope": False}
    config = MPTConfig(d_model=64, n_heads=4, n_layers=section["n_layers"], max_seq_len=2048, vocab_size=64,
                       attn_config=attn, block_overrides=section.get("block_overrides"))
    model = MPTModel(config)
    return [(b.attn.sliding_window_size, b.attn.reuse_kv_layer_idx) for b in model.blocks]


def _ours(plan: LayerPlan):
    return [(-1 if layer.window is None else layer.window - 1, layer.kv_source) for layer in plan]


@pytest.mark.parametrize("name", ["ma", "ma_offset", "ma_pairs", "ma_swa_shared", "gemma_5to1", "all_sliding", "standard"])
def test_llm_foundry_builds_the_layers_our_plan_describes(name):
    plan = LayerPlan.from_preset(name, 12, 128)
    assert _mpt_blocks(mpt_from_plan(plan)) == _ours(plan)


def test_character_ai_example_means_the_same_to_llm_foundry_and_to_us():
    section = yaml.safe_load(CHARACTER_AI)
    assert _mpt_blocks(section) == _ours(plan_from_mpt(section))


def test_sliding_window_size_means_one_more_key_than_our_window():
    """llm-foundry's torch attention with sliding_window_size W equals our
    attention with window W + 1 (the conversion's +1)."""
    from llmfoundry.models.layers.attention import scaled_multihead_dot_product_attention

    from mixattn.attention import attend
    from mixattn.plan import LAYER_KINDS

    b, t, h, d, w = 2, 40, 4, 8, 5
    q, k, v = (torch.randn(b, t, h * d) for _ in range(3))
    theirs, _, _ = scaled_multihead_dot_product_attention(q, k, v, n_heads=h, kv_n_heads=h, is_causal=True,
                                                          sliding_window_size=w)
    split = lambda x: x.view(b, t, h, d).transpose(1, 2)  # noqa: E731
    ours = attend(split(q), split(k), split(v), LAYER_KINDS.get("sliding"), w + 1, backend="eager")
    torch.testing.assert_close(ours.transpose(1, 2).reshape(b, t, h * d), theirs, atol=1e-5, rtol=1e-5)
    off_by_one = attend(split(q), split(k), split(v), LAYER_KINDS.get("sliding"), w, backend="eager")
    assert not torch.allclose(off_by_one.transpose(1, 2).reshape(b, t, h * d), theirs, atol=1e-3)


def _hf_tokenizer(corpus, out):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(corpus / "tok" / "tokenizer.json"))
    meta = json.loads((corpus / "mds64" / "mixattn_data.json").read_text())
    tok.eos_token = tok.convert_ids_to_tokens(meta["eos_id"])
    tok.pad_token = tok.eos_token
    tok.save_pretrained(out)
    return out


def test_build_composer_model_takes_an_mpt_style_section(corpus, tmp_path):
    from llmfoundry.utils.builders import build_composer_model
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_hf_tokenizer(corpus, tmp_path / "tok"))
    section = yaml.safe_load(CHARACTER_AI)
    section.update(d_model=64, n_heads=4, max_seq_len=64)
    section["block_overrides"]["overrides"]["sliding_window_layer"]["attn_config"]["sliding_window_size"] = 15
    section["block_overrides"]["overrides"]["sliding_window_layer_reuse"]["attn_config"]["sliding_window_size"] = 15
    del section["vocab_size"]  # taken from the tokenizer
    model = build_composer_model(name="mixattn", cfg=section, tokenizer=tokenizer)
    assert model.cfg.vocab_size == len(tokenizer)
    assert model.cfg.layer_plan == LayerPlan.from_preset("character_ai", 13, 16)
    ids = torch.randint(0, len(tokenizer), (2, 64))
    out = model({"input_ids": ids, "labels": ids})
    assert torch.isfinite(model.loss(out, {"input_ids": ids, "labels": ids}))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['n_head'\]"):
        build_composer_model(name="mixattn", cfg={**section, "n_head": 4}, tokenizer=tokenizer)


def test_llm_foundry_trains_a_mixattn_recipe(corpus, tmp_path):
    """llm-foundry's own train entry point (what scripts/train/train.py calls)
    on our MDS data, with model.name: mixattn; loss goes down, checkpoint saved."""
    from composer.core import Callback
    from llmfoundry.command_utils import train_from_yaml

    recipe = yaml.safe_load(open("yamls/foundry/mixattn-ma-tiny.yaml"))
    recipe["variables"].update(data_local=str(corpus / "mds64"), tokenizer_dir=str(_hf_tokenizer(corpus, tmp_path / "tok")),
                               save_folder=str(tmp_path / "ckpt"))
    recipe.update(max_duration="12ba", eval_interval="12ba", loggers={})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    losses = []

    class Record(Callback):
        def after_train_batch(self, state, logger):
            losses.append(state.loss.item())

    from llmfoundry import registry

    registry.callbacks.register("record_loss_for_test", func=Record)
    trainer = train_from_yaml(str(path), ["callbacks={record_loss_for_test: {}}"])
    from mixattn.foundry import MixAttentionForFoundry

    assert isinstance(trainer.state.model, MixAttentionForFoundry)
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3]), losses
    assert (tmp_path / "ckpt" / "ep0-ba12-rank0.pt").is_file()
