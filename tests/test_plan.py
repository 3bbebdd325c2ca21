"""Layer plans: presets, the three syntaxes, validation errors, KV accounting."""

import pytest

from mixattn.cli import main as cli_main
from mixattn.plan import PRESETS, Layer, LayerPlan, PlanError, kv_cache_bytes, kv_read_bytes, parse_pattern

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


# The paper's figures at 24 layers (issue #17's table, read from the PMLR v262
# figures bottom to top), and each global's KV source: written out here, not
# taken from the code under test.
PAPER_24 = {
    "MA": ("G S s S s s g S s S s s g S s S s s g S s S s g", {6: 0, 12: 0, 18: 0, 23: 0}),
    "MA-EndSlide": ("G S s S s s g S s S s s g S s S s s g S s S s s", {6: 0, 12: 0, 18: 0}),
    "MA-Offset": ("S s S s s G S s S s s g S s S s s g S s S s s g", {11: 5, 17: 5, 23: 5}),
    "MA-Pairs": ("G S s S s s g S s S s s G S s S s s g S s S s s", {6: 0, 18: 12}),
    "MA-Offset-SlideShare": ("S s s s s G S s s s s g S s s s s g S s s s s g", {11: 5, 17: 5, 23: 5}),
    "MA-Pairs-SlideShare": ("G S s s s s g S s s s s G S s s s s g S s s s s", {6: 0, 18: 12}),
    "MA-Successive-1": ("G g S s S s s S s S s s G g S s S s s S s S s s", {1: 0, 13: 12}),
    "MA-Successive-2": ("S s S s s G g S s S s s G g S s S s s S s S s s", {6: 5, 13: 12}),
    "MA-Successive-3": ("S s S s s S s S s s G g S s S s s G g S s S s s", {11: 10, 18: 17}),
    "MA-Successive-4": ("S s S s s S s S s s G g S s S s s S s S s s G g", {11: 10, 23: 22}),
    "MA-NoShare-1": ("S s S G S s s S s S s s S s S s s S s S s s S s", {}),
    "MA-NoShare-2": ("S s S s s S s S s s G S s S s s S s S s s S s S", {}),
    "MA-NoShare-3": ("S s S s s S s S s s S s S s s S s S s s G S S s", {}),
}


def _letters(plan):
    return " ".join(l.spec.letter if l.owns_kv else l.spec.letter.lower() for l in plan)


@pytest.mark.parametrize("paper_name", PAPER_24)
def test_paper_presets_are_the_figures_at_24_layers(paper_name):
    layout, global_reuse = PAPER_24[paper_name]
    for name in (paper_name, paper_name.lower(), paper_name.lower().replace("-", "_")):
        plan = LayerPlan.from_preset(name, 24, 1024)
        assert _letters(plan) == layout, name
        assert {i: l.kv_source for i, l in enumerate(plan) if l.kind == G and not l.owns_kv} == global_reuse
        # every sharing sliding layer reads the nearest sliding owner below it
        for i, layer in enumerate(plan):
            if layer.kind == S and not layer.owns_kv:
                assert layer.kv_source == max(j for j in range(i) if plan[j].kind == S and plan[j].owns_kv)
        assert all(l.window == 1024 for l in plan if l.kind == S)


def test_plan_json_gives_the_figures(capsys):
    import json

    for paper_name, (layout, _) in PAPER_24.items():
        assert cli_main(["plan", paper_name, "--n-layers", "24", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["layout"] == layout and report["n_layers"] == 24
        assert report["preset"] == paper_name.lower().replace("-", "_")


def test_character_ai_equals_ma_endslide_at_24_but_keeps_its_name():
    assert LayerPlan.from_preset("character_ai", 24) == LayerPlan.from_preset("ma_endslide", 24)
    assert {"character_ai", "ma_endslide"} <= set(PRESETS.names())
    assert LayerPlan.from_preset("character_ai", 24).name == "character_ai"


def _blocks_of(plan):
    """Sliding runs between globals, as lists of group sizes (owner + its sharers)."""
    groups, current = [], None
    for i, layer in enumerate(plan):
        if layer.kind == S and layer.owns_kv:
            current = [i]
            groups.append(current)
        elif layer.kind == S:
            assert current is not None and layer.kv_source == current[0]
            current.append(i)
    return [len(g) for g in groups]


@pytest.mark.parametrize("n", [8, 12, 18, 30, 48])
def test_paper_presets_keep_the_figures_structure_at_other_depths(n):
    """The documented rule (mixattn.paper_layouts): globals where each
    family puts them, the first global owning the cache, sliding layers in
    pairs and triples (fives for SlideShare)."""
    def globals_of(name):
        plan = LayerPlan.from_preset(name, n, 1024)
        return {i: l.kv_source for i, l in enumerate(plan) if l.kind == G}, plan

    blocks = list(range(0, n, 6))
    end, _ = globals_of("ma_endslide")
    assert end == {i: (None if i == 0 else 0) for i in blocks}
    ma, plan = globals_of("ma")
    assert ma == {**{i: (None if i == 0 else 0) for i in blocks}, n - 1: 0} and plan[n - 1].kind == G
    off, plan = globals_of("ma_offset")
    first = n % 6 + 5
    assert off == {i: (None if i == first else first) for i in range(first, n, 6)} and plan[0].kind == S and plan[n - 1].kind == G
    pairs, _ = globals_of("ma_pairs")
    second = 6 * max(1, n // 12)
    assert [i for i, src in pairs.items() if src is None] == [0, second]
    assert all(src == (0 if i < second else second) for i, src in pairs.items() if src is not None)
    for k in (1, 2, 3, 4):
        succ, _ = globals_of(f"ma_successive_{k}")
        owners = [i for i, src in succ.items() if src is None]
        assert len(owners) == 2 and all(succ[o + 1] == o for o in owners) and len(succ) == 4
    for k in (1, 2, 3):
        single, _ = globals_of(f"ma_noshare_{k}")
        assert list(single.values()) == [None]
    for name in ("ma", "ma_endslide", "ma_offset", "ma_pairs", "ma_successive_2", "ma_noshare_2"):
        sizes = _blocks_of(LayerPlan.from_preset(name, n, 1024))
        assert set(sizes) <= {1, 2, 3} and (sizes.count(3) >= 1 or n < 12)
    for name in ("ma_offset_slideshare", "ma_pairs_slideshare"):
        sizes = _blocks_of(LayerPlan.from_preset(name, n, 1024))
        assert max(sizes) == 5 or n < 12


def test_paper_presets_exact_at_12_layers():
    assert _letters(LayerPlan.from_preset("MA-EndSlide", 12)) == "G S s S s s g S s S s s"
    assert _letters(LayerPlan.from_preset("MA", 12)) == "G S s S s s g S s S s g"
    assert _letters(LayerPlan.from_preset("MA-Offset", 12)) == "S s S s s G S s S s s g"
    assert _letters(LayerPlan.from_preset("MA-Pairs", 12)) == "G S s S s s G S s S s s"


def test_the_rule_draws_every_figure_but_the_raster_noshare_3():
    from mixattn.paper_layouts import FIGURES, rule_layout

    differ = [name for name, (_, _, at24) in FIGURES.items() if rule_layout(name, 24) != at24]
    assert differ == ["ma_noshare_3"]


def test_other_presets():
    shared = LayerPlan.from_preset("ma_swa_shared", 24, 1024)
    assert shared.owners == [0, 1, 7, 13, 19]
    gemma = LayerPlan.from_preset("gemma_5to1", 12, 1024)
    assert gemma.to_pattern(1024) == "S S S S S G S S S S S G"
    assert all(l.owns_kv for l in LayerPlan.from_preset("standard", 24)) and all(
        l.kind == S and l.owns_kv for l in LayerPlan.from_preset("all_sliding", 24))
    assert LayerPlan.from_preset("SWA-only", 24) == LayerPlan.from_preset("all_sliding", 24)


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
    pattern = LayerPlan.from_pattern("G S s S s s g g", 64)
    listed = LayerPlan.from_list(
        [{"kind": G}, {"kind": S, "window": 64}, {"kind": S, "reuse": 1}, {"kind": S}, {"kind": S, "reuse": -1},
         {"kind": S, "reuse": -2}, {"kind": G, "reuse": 0}, {"kind": G, "reuse": 0}], 64)
    assert preset == pattern == listed
    assert LayerPlan.parse("ma", 8, 64) == LayerPlan.parse("G S s S s s g g", 8, 64) == LayerPlan.parse(listed.to_list())
    assert LayerPlan.from_list(["G", "S", "s", "S", "s", "s", "g", "g"], 64) == preset


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
    (lambda: LayerPlan.from_preset("ma_pairs", 6), "at least 7 layers"),
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


def test_kv_read_bytes_count_every_layers_reads_of_a_shared_store():
    dims = dict(n_kv_heads=16, head_dim=128, context_len=32768, batch_size=64, dtype="bf16")
    # MA-Offset (the paper's figure): 4 global layers read the one global store, 20 sliding layers a ring each
    assert kv_read_bytes(LayerPlan.from_preset("ma_offset", 24, 1024), **dims) == 64 * 8192 * (4 * 32768 + 20 * 1024)
    assert kv_read_bytes(LayerPlan.from_preset("ma_offset", 24, 1024), **dims) == 79_456_894_976
    # without sharing, a step reads what the cache holds
    for preset in ("standard", "all_sliding"):
        plan = LayerPlan.from_preset(preset, 24, 1024)
        assert kv_read_bytes(plan, **dims) == kv_cache_bytes(plan, **dims)
    # a context shorter than the window: a ring holds (and a sharer reads) only what exists
    assert kv_read_bytes(LayerPlan(tuple(parse_pattern("G g S s", window=16))), **dict(dims, context_len=10, batch_size=1)) == 8192 * 40
    with pytest.raises(ValueError, match="context_len and batch_size must be >= 0"):
        kv_read_bytes(LayerPlan.from_preset("ma", 24), **dict(dims, batch_size=-1))


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


def test_a_layer_kind_registered_later_is_a_pattern_letter_without_other_edits():
    """The pattern syntax reads its letters from LAYER_KINDS (issue #20): a
    kind registered by a user (here a chunked-attention stand-in, letter C)
    parses, reuses and names itself in errors; bad letters are refused."""
    from mixattn.plan import LAYER_KINDS, LayerKind, PlanError

    chunked = LayerKind("chunked_test", True, "C", lambda q, k, w: (k <= q) & (q // w == k // w), lambda ctx, w: min(ctx, w))
    LAYER_KINDS.register("chunked_test", chunked)
    try:
        plan = LayerPlan.parse("G C:64 c:64 S s", 5, 1024)
        assert [layer.spec.name for layer in plan] == ["global", "chunked_test", "chunked_test", "sliding", "sliding"]
        assert plan[2].kv_source == 1 and plan[2].window == 64
        with pytest.raises(PlanError, match="tokens G, S, C, g, s, c with"):
            LayerPlan.parse("G C ?", 3, 1024)
    finally:
        LAYER_KINDS.unregister("chunked_test")
    with pytest.raises(PlanError, match="neither a preset"):
        LayerPlan.parse("G C c", 3, 1024)  # gone again
    for bad in ("X", "c", "CC", "1"):
        with pytest.raises(PlanError, match=f"pattern letter must be one upper-case letter A-Z other than X, got {bad!r}"):
            LayerKind("bad", False, bad, lambda q, k, w: k <= q, lambda ctx, w: ctx)
