"""Layer plans: presets, the three syntaxes, validation errors, KV accounting."""

import pytest

from mixattn.cli import main as cli_main
from mixattn.plan import PRESETS, Layer, LayerPlan, PlanError, kv_cache_bytes, parse_pattern

G, S = "global", "sliding"


@pytest.mark.parametrize("name", PRESETS.names())
@pytest.mark.parametrize("depth", [8, 13, 24, 32])
def test_every_preset_builds_and_validates(name, depth):
    plan = LayerPlan.from_preset(name, depth, 256)
    assert len(plan) == depth
    plan.check(depth, 4096)
    # round trips through the other two syntaxes give the same object
    assert LayerPlan.from_pattern(plan.to_pattern(256), 256) == plan
    assert LayerPlan.from_pattern(plan.to_pattern()) == plan
    assert LayerPlan.from_list(plan.to_list()) == plan


def test_paper_layouts_at_24_layers():
    ma = LayerPlan.from_preset("ma", 24, 1024)
    assert [i for i, l in enumerate(ma) if l.kind == G] == [0, 12, 23]
    assert ma.owners == [0, 1, 4, 7, 10, 13, 16, 19, 21]
    assert ma[12].kv_source == 0 and ma[23].kv_source == 0
    off = LayerPlan.from_preset("ma_offset", 24, 1024)
    assert [i for i, l in enumerate(off) if l.kind == G] == [6, 12, 23]
    assert off[0].kind == S and off[12].kv_source == 6
    end = LayerPlan.from_preset("ma_endslide", 24, 1024)
    assert end[23].kind == S and [i for i, l in enumerate(end) if l.kind == G] == [0, 12]
    pairs = LayerPlan.from_preset("ma_pairs", 24, 1024)
    assert [(i, l.kv_source) for i, l in enumerate(pairs) if l.kind == G] == [(0, None), (1, 0), (12, None), (13, 12), (22, None), (23, 22)]
    shared = LayerPlan.from_preset("ma_swa_shared", 24, 1024)
    assert shared.owners == [0, 1, 13]
    gemma = LayerPlan.from_preset("gemma_5to1", 12, 1024)
    assert gemma.to_pattern(1024) == "S S S S S G S S S S S G"
    assert all(l.owns_kv for l in LayerPlan.from_preset("standard", 24)) and all(
        l.kind == S and l.owns_kv for l in LayerPlan.from_preset("all_sliding", 24))


def test_character_ai_matches_llm_foundry_documented_layout():
    # llm-foundry docs: first layer global, then twice [SWA, SWA reuse -1, SWA,
    # SWA reuse -1 (x2), global reuse -6]; chained reuse resolves to the owner.
    plan = LayerPlan.from_preset("character_ai", 13, 1024)
    expected = [
        Layer(G), Layer(S, 1024), Layer(S, 1024, 1), Layer(S, 1024), Layer(S, 1024, 3), Layer(S, 1024, 3), Layer(G, None, 0),
        Layer(S, 1024), Layer(S, 1024, 7), Layer(S, 1024), Layer(S, 1024, 9), Layer(S, 1024, 9), Layer(G, None, 0),
    ]
    assert plan.layers == tuple(expected)
    # the relative-index list form from llm-foundry's YAML gives the same plan
    block = [{"kind": S}, {"kind": S, "reuse": -1}, {"kind": S}, {"kind": S, "reuse": -1}, {"kind": S, "reuse": -1}, {"kind": G, "reuse": -6}]
    assert LayerPlan.from_list([{"kind": G}] + block * 2, 1024) == plan


def test_three_syntaxes_agree():
    preset = LayerPlan.from_preset("ma", 8, 64)
    pattern = LayerPlan.from_pattern("G S s s g S s g", 64)
    listed = LayerPlan.from_list(
        [{"kind": G}, {"kind": S, "window": 64}, {"kind": S, "reuse": 1}, {"kind": S, "reuse": -2}, {"kind": G, "reuse": 0},
         {"kind": S}, {"kind": S, "reuse": -1}, {"kind": G, "reuse": 0}], 64)
    assert preset == pattern == listed
    assert LayerPlan.parse("ma", 8, 64) == LayerPlan.parse("G S s s g S s g", 8, 64) == LayerPlan.parse(listed.to_list())
    assert LayerPlan.from_list(["G", "S", "s", "s", "g", "S", "s", "g"], 64) == preset


def test_pattern_features():
    assert parse_pattern("(G g)*2", 8) == [Layer(G), Layer(G, None, 0), Layer(G), Layer(G, None, 2)]
    assert parse_pattern("S:16 S:32 s:16 s@1 s:32@1", 8)[2:] == [Layer(S, 16, 0), Layer(S, 32, 1), Layer(S, 32, 1)]
    assert len(parse_pattern("G ((S s)x2 g)*3", 8)) == 1 + 3 * 5
    assert parse_pattern("G,S|s", 4) == [Layer(G), Layer(S, 4), Layer(S, 4, 1)]


@pytest.mark.parametrize("build, message", [
    (lambda: LayerPlan((Layer(G), Layer(G, None, 1))), "reuses its own KV"),
    (lambda: LayerPlan((Layer(G, None, 1), Layer(G))), "not an earlier layer"),
    (lambda: LayerPlan((Layer(G), Layer(S, 8, 0))), "same kind"),
    (lambda: LayerPlan((Layer(S, 8), Layer(S, 16, 0))), "same window"),
    (lambda: LayerPlan((Layer(S, 0),)), "window must be a positive integer"),
    (lambda: LayerPlan((Layer(S, -4),)), "window must be a positive integer"),
    (lambda: LayerPlan((Layer(G, 8),)), "takes no window"),
    (lambda: LayerPlan((Layer("chunky"),)), "unknown kind 'chunky'; valid kinds: global, sliding"),
    (lambda: LayerPlan(()), "at least one layer"),
    (lambda: LayerPlan.from_preset("mixattention", 24), "unknown preset 'mixattention'; valid presets: standard, all_sliding, ma"),
    (lambda: LayerPlan.from_preset("ma_pairs", 6), "at least 8 layers"),
    (lambda: LayerPlan.from_pattern("G s"), "no earlier sliding layer"),
    (lambda: LayerPlan.from_pattern("G S@0"), "write s@0 to reuse"),
    (lambda: LayerPlan.from_pattern("G (S s"), "not closed"),
    (lambda: LayerPlan.from_pattern("G S s)*2"), "closes no group"),
    (lambda: LayerPlan.from_pattern("G Q"), "cannot read 'Q'"),
    (lambda: LayerPlan.from_pattern("G:8"), "takes no window"),
    (lambda: LayerPlan.from_list([{"kind": G}, {"kind": S, "size": 3}]), "layer 1: unknown key(s) ['size']"),
    (lambda: LayerPlan.from_list([{"kind": G}, {"kind": G, "reuse": -5}]), "points before layer 0"),
    (lambda: LayerPlan.from_list([{"window": 3}]), "missing 'kind'"),
    (lambda: LayerPlan.parse("nonsense!"), "neither a preset"),
    (lambda: LayerPlan.from_preset("ma", 24).check(n_layers=12), "has 24 layers but the model has n_layers=12"),
    (lambda: LayerPlan.from_preset("ma", 24, 4096).check(24, max_seq_len=2048), "window 4096 is larger than max_seq_len 2048"),
])
def test_invalid_plans_raise_clear_errors(build, message):
    with pytest.raises(PlanError) as info:
        build()
    assert message in str(info.value)


def test_chained_reuse_resolves_to_owner_but_direct_construction_is_strict():
    assert LayerPlan.from_list([{"kind": G}, {"kind": G, "reuse": 0}, {"kind": G, "reuse": 1}])[2].kv_source == 0
    with pytest.raises(PlanError, match="point at the owner \\(layer 0\\)"):
        LayerPlan((Layer(G), Layer(G, None, 0), Layer(G, None, 1)))


def test_kv_cache_bytes_hand_computed():
    dims = dict(n_kv_heads=16, head_dim=128, context_len=32768, batch_size=1, dtype="bf16")
    per_token_layer = 2 * 16 * 128 * 2  # K and V, bf16
    assert per_token_layer == 8192
    assert kv_cache_bytes(LayerPlan.from_preset("standard", 24), **dims) == 24 * 8192 * 32768 == 6_442_450_944
    # MA: one global owner (32768 tokens) + 8 sliding owners of 1024 tokens
    assert kv_cache_bytes(LayerPlan.from_preset("ma", 24, 1024), **dims) == (32768 + 8 * 1024) * 8192 == 335_544_320
    assert kv_cache_bytes(LayerPlan.from_preset("all_sliding", 24, 1024), **dims) == 24 * 1024 * 8192 == 201_326_592
    # context below the window: sliding owners keep only what exists; batch and dtype scale linearly
    small = dict(dims, context_len=100, batch_size=3, dtype="fp32")
    assert kv_cache_bytes(LayerPlan.from_preset("all_sliding", 24, 1024), **small) == 3 * 24 * 100 * 2 * 16 * 128 * 4
    with pytest.raises(ValueError, match="unknown dtype 'int3'"):
        kv_cache_bytes(LayerPlan.from_preset("ma", 24), **dict(dims, dtype="int3"))


def test_plan_cli_prints_table_and_ratio(capsys):
    assert cli_main(["plan", "ma", "--n-layers", "24", "--context", "32768"]) == 0
    out = capsys.readouterr().out
    assert "9 own a KV cache" in out and "reuse 0" in out
    assert "6.00 GiB" in out and "320.00 MiB" in out and "19.20x" in out
    assert cli_main(["plan", "ma", "--json", "--context", "4096", "32768"]) == 0
    import json

    report = json.loads(capsys.readouterr().out)
    assert report["contexts"][1] == {"context": 32768, "standard_bytes": 6442450944, "plan_bytes": 335544320, "reduction": 19.2}
    assert cli_main(["plan", "--list"]) == 0 and "ma_offset" in capsys.readouterr().out
    assert cli_main(["plan", "nope"]) == 2 and "neither a preset" in capsys.readouterr().err
