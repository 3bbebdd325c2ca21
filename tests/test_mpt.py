"""llm-foundry MPT configs <-> layer plans (mixattn.mpt): the Character.AI
example from llm-foundry's documentation, round trips for every preset, and
the errors. No llm-foundry needed (tests/test_foundry.py checks against it)."""

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from mixattn.model import ModelConfig
from mixattn.mpt import expand_order, model_config_from_mpt, mpt_from_model_config, mpt_from_plan, plan_from_mpt
from mixattn.plan import PRESETS, Layer, LayerPlan, PlanError

# verbatim from the MPTConfig docstring of llm-foundry 0.22 (block_overrides),
# with the model dimensions a user would put around it
CHARACTER_AI = """
d_model: 256
n_heads: 4
n_layers: 13
max_seq_len: 4096
vocab_size: 1024
attn_config:
  rope: true
  rope_theta: 10000
block_overrides:
    order:
    - name: default
    - repeat: 2
      order:
      - name: sliding_window_layer
      - name: sliding_window_layer_reuse
      - name: sliding_window_layer
      - repeat: 2
        name: sliding_window_layer_reuse
      - name: reuse_kv_layer
    overrides:
        sliding_window_layer:
            attn_config:
                sliding_window_size: 1024
        sliding_window_layer_reuse:
            attn_config:
                sliding_window_size: 1024
                reuse_kv_layer_idx: -1 # Relative index of the layer whose kv cache to reuse
        reuse_kv_layer:
            attn_config:
                reuse_kv_layer_idx: -6 # Relative index of the layer whose kv cache to reuse
"""


def test_character_ai_example_reads_as_the_documented_layout():
    plan = plan_from_mpt(yaml.safe_load(CHARACTER_AI))
    # layer 0 global; blocks of [S, s->-1, S, s->-1, s->-1 (chain), g->-6 (chain to 0)];
    # MPT's sliding_window_size 1024 lets a query see 1025 keys: our window 1025
    w = 1025
    expected = [Layer("global")]
    for start in (1, 7):
        expected += [Layer("sliding", w), Layer("sliding", w, start), Layer("sliding", w),
                     Layer("sliding", w, start + 2), Layer("sliding", w, start + 2), Layer("global", None, 0)]
    assert list(plan) == expected
    assert plan == LayerPlan.from_preset("character_ai", 13, w)
    assert plan.owners == [0, 1, 3, 7, 9]


def test_every_preset_round_trips_through_block_overrides():
    for name in PRESETS.names():
        for n in (8, 13, 24):
            plan = LayerPlan.from_preset(name, n, 512)
            section = mpt_from_plan(plan)
            assert plan_from_mpt(yaml.safe_load(yaml.safe_dump(section))) == plan, (name, n)


def test_written_block_overrides_are_run_length_encoded():
    section = mpt_from_plan(LayerPlan.from_pattern("G S s s g S s g", 256))
    assert section["attn_config"] == {"sliding_window_size": -1}
    bo = section["block_overrides"]
    # layers 4 and 7 both read layer 0, at different relative offsets
    assert [(o["name"], o.get("repeat", 1)) for o in bo["order"]] == [
        ("default", 1), ("sliding_256", 1), ("sliding_256_reuse-1", 1), ("sliding_256_reuse-2", 1),
        ("global_reuse-4", 1), ("sliding_256", 1), ("sliding_256_reuse-1", 1), ("global_reuse-7", 1)]
    runs = mpt_from_plan(LayerPlan.from_pattern("G S S S s s", 256))["block_overrides"]["order"]
    assert runs == [{"name": "default"}, {"name": "sliding_256", "repeat": 3}, {"name": "sliding_256_reuse-1"},
                    {"name": "sliding_256_reuse-2"}]
    assert bo["overrides"]["sliding_256"] == {"attn_config": {"sliding_window_size": 255}}  # 256 keys in MPT's terms
    assert bo["overrides"]["global_reuse-4"] == {"attn_config": {"sliding_window_size": -1, "reuse_kv_layer_idx": -4}}
    assert mpt_from_plan(LayerPlan.from_preset("standard", 4)) == {"n_layers": 4, "attn_config": {"sliding_window_size": -1}}
    all_sliding = mpt_from_plan(LayerPlan.from_preset("all_sliding", 4, 64))
    assert all_sliding == {"n_layers": 4, "attn_config": {"sliding_window_size": 63}}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.sampled_from([None, 16, 32]), st.integers(0, 30)), min_size=1, max_size=16))
def test_random_valid_plans_round_trip(spec):
    layers: list[Layer] = []
    for reuse, window, pick in spec:
        kind = "sliding" if window else "global"
        owners = [j for j, layer in enumerate(layers) if layer.owns_kv and layer.kind == kind and layer.window == window]
        source = owners[pick % len(owners)] if reuse and owners else None
        layers.append(Layer(kind, window, source))
    plan = LayerPlan(tuple(layers))
    assert plan_from_mpt(mpt_from_plan(plan)) == plan


def test_a_recipe_may_give_the_plan_as_block_overrides():
    bo = yaml.safe_load(CHARACTER_AI)["block_overrides"]
    cfg = ModelConfig(d_model=64, n_heads=4, n_layers=13, max_seq_len=2048, vocab_size=128,
                      plan={"block_overrides": bo}, window=64)
    assert cfg.layer_plan == LayerPlan.from_preset("character_ai", 13, 1025)
    # to_dict keeps the explicit list, so a checkpoint records the resolved plan
    assert ModelConfig.from_dict(cfg.to_dict()).layer_plan == cfg.layer_plan
    with pytest.raises(PlanError, match="block_overrides.order describes 13 layers but n_layers=12"):
        ModelConfig(d_model=64, n_heads=4, n_layers=12, max_seq_len=2048, plan={"block_overrides": bo})
    with pytest.raises(PlanError, match=r"takes block_overrides and sliding_window_size, got \['window'\]"):
        ModelConfig(d_model=64, n_heads=4, n_layers=13, max_seq_len=2048, plan={"block_overrides": bo, "window": 3})


def test_full_mpt_sections_convert_both_ways():
    section = yaml.safe_load(CHARACTER_AI)
    kwargs = model_config_from_mpt(section)
    cfg = ModelConfig(**kwargs)
    assert cfg.layer_plan == LayerPlan.from_preset("character_ai", 13, 1025)
    assert (cfg.d_model, cfg.n_heads, cfg.max_seq_len, cfg.vocab_size) == (256, 4, 4096, 1024)
    assert cfg.bias and cfg.hidden == 1024 and cfg.mlp_type == "gelu"  # MPT's defaults: biases, expansion 4
    back = mpt_from_model_config(cfg)
    assert back["name"] == "mpt_causal_lm" and back["attn_config"]["rope"] and back["no_bias"] is False
    again = ModelConfig(**model_config_from_mpt(back))
    assert _arch(again) == _arch(cfg)
    gqa = ModelConfig(d_model=64, n_heads=4, n_kv_heads=2, n_layers=8, max_seq_len=512, vocab_size=128, plan="ma_pairs",
                      window=64, mlp_type="swiglu", norm_type="rmsnorm", qk_norm=True, rope_theta=5e5)
    assert _arch(ModelConfig(**model_config_from_mpt(mpt_from_model_config(gqa)))) == _arch(gqa)


def _arch(cfg):
    """Everything that defines the network (the MLP width as built, not as written)."""
    return {**cfg.to_dict(), "mlp_hidden": cfg.hidden}


@pytest.mark.parametrize("change, message", [
    (lambda s: s["block_overrides"]["overrides"].pop("reuse_kv_layer"),
     "layer 6: block_overrides.order names 'reuse_kv_layer', which is not in overrides; valid names: default, sliding_window_layer"),
    (lambda s: s["block_overrides"]["overrides"]["reuse_kv_layer"]["attn_config"].update(reuse_kv_layer_idx=2),
     "reuse_kv_layer_idx must be a negative relative index, got 2"),
    (lambda s: s["block_overrides"]["overrides"]["reuse_kv_layer"]["attn_config"].update(reuse_kv_layer_idx=-7),
     r"layer 6 \('reuse_kv_layer'\): reuse_kv_layer_idx -7 points before layer 0"),
    # a global layer reading a sliding layer's KV: llm-foundry builds it, mixattn refuses it
    (lambda s: s["block_overrides"]["overrides"]["reuse_kv_layer"]["attn_config"].update(reuse_kv_layer_idx=-1),
     r"layer 6 \(global\) reuses the KV of layer 3 \(sliding\); KV is shared only between layers of the same kind"),
    (lambda s: s["block_overrides"]["overrides"]["sliding_window_layer"]["attn_config"].update(sliding_window_size=-2),
     "sliding_window_size must be -1 .global. or a non-negative number of tokens, got -2"),
    (lambda s: s["block_overrides"]["overrides"]["sliding_window_layer"]["attn_config"].update(nope=True),
     r"override 'sliding_window_layer': attn_config key\(s\) \['nope'\] have no mixattn equivalent"),
    (lambda s: s["block_overrides"]["overrides"]["sliding_window_layer"].update(norm_type="rmsnorm"),
     r"override 'sliding_window_layer' sets \['norm_type'\]; mixattn translates only attn_config"),
    (lambda s: s["block_overrides"]["order"][1].update(name="x"), r"order\[1\]: exactly one of 'name' or 'order'"),
    (lambda s: s["block_overrides"]["order"][1].update(repeat=0), r"order\[1\]: repeat must be a positive integer, got 0"),
    (lambda s: s.update(n_layers=14), "block_overrides.order describes 13 layers but n_layers=14"),
])
def test_bad_block_overrides_are_named(change, message):
    section = yaml.safe_load(CHARACTER_AI)
    change(section)
    with pytest.raises(PlanError, match=message):
        plan_from_mpt(section)


@pytest.mark.parametrize("change, message", [
    (lambda s: s["attn_config"].update(alibi=True, rope=False), "alibi: mixattn models use RoPE"),
    (lambda s: s["attn_config"].pop("rope"), "learned_pos_emb: mixattn models use RoPE"),
    (lambda s: s.update(ffn_config={"ffn_type": "mb_moe"}), r"ffn_type 'mb_moe' has no mixattn equivalent"),
    (lambda s: s.update(expansion_ratio=2.3), r"expansion_ratio 2.3 x d_model 256 is not an integer"),
    (lambda s: s.update(final_logit_softcapping=30.0), r"MPT key\(s\) \['final_logit_softcapping'\] have no mixattn equivalent"),
])
def test_mpt_settings_without_an_equivalent_are_refused(change, message):
    section = yaml.safe_load(CHARACTER_AI)
    change(section)
    with pytest.raises(PlanError, match=message):
        model_config_from_mpt(section)


def test_expand_order_nests_and_repeats():
    assert expand_order([{"name": "a"}, {"order": [{"name": "b"}, {"name": "c", "repeat": 2}], "repeat": 2}]) == \
        ["a", "b", "c", "c", "b", "c", "c"]
    with pytest.raises(PlanError, match=r"order\[0\]: unknown key\(s\) \['nmae'\]"):
        expand_order([{"nmae": "a"}])


def test_shipped_llm_foundry_recipes_describe_valid_models():
    """yamls/foundry/: llm-foundry's recipe format with model.name: mixattn;
    their model sections build a ModelConfig (without llm-foundry installed)."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from mixattn.foundry import foundry_model_config

    recipes = sorted((Path(__file__).resolve().parents[1] / "yamls" / "foundry").glob("*.yaml"))
    assert len(recipes) >= 2
    for path in recipes:
        model = OmegaConf.to_container(OmegaConf.load(path), resolve=True)["model"]
        assert model.pop("name") == "mixattn", path
        cfg = foundry_model_config({**model, "vocab_size": model.get("vocab_size", 512)})
        assert len(cfg.layer_plan) == cfg.n_layers
    cai = OmegaConf.to_container(OmegaConf.load(recipes[0]), resolve=True)["model"]
    assert foundry_model_config({k: v for k, v in cai.items() if k != "name"}).layer_plan == \
        LayerPlan.from_preset("character_ai", 13, 1025)


def test_plan_cli_reads_and_writes_mpt_sections(tmp_path, capsys):
    from mixattn.cli import main

    path = tmp_path / "mpt.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "mpt_causal_lm", **yaml.safe_load(CHARACTER_AI)}}))
    assert main(["plan", "--mpt", str(path), "--context", "4096"]) == 0
    out = capsys.readouterr().out
    assert "13 layers, 5 own a KV cache" in out and "pattern: G S s S s s g S s S s s g" in out
    assert main(["plan", "--mpt", str(path), "--to-mpt"]) == 0
    written = yaml.safe_load(capsys.readouterr().out)["model"]
    assert plan_from_mpt(written) == LayerPlan.from_preset("character_ai", 13, 1025)
    assert written["d_model"] == 256 and written["attn_config"]["rope"] is True
    assert main(["plan", "ma_pairs", "--n-layers", "12", "--window", "128", "--to-mpt"]) == 0
    assert plan_from_mpt(yaml.safe_load(capsys.readouterr().out)["model"]) == LayerPlan.from_preset("ma_pairs", 12, 128)
    assert main(["plan", "--mpt", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
