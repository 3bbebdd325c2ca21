"""The MixAttention paper's layer layouts, as data, and the rule that draws
each of them at other depths.

Source: Rajput, Sheng, Owen, Chiley, "Inference-Friendly Models With
MixAttention" (PMLR v262; arXiv 2409.15012), Figures 1, 2, 3, 5, 9 and 11,
read bottom to top (layer 0 is the bottom bar: the only reading that fits the
text, where MA-Pairs keeps standard KV caches "at the first and thirteenth
layer" and MA-EndSlide's "last layer is a sliding window attention layer").

Letters, one per layer: ``G`` global, owns its KV; ``g`` global, reuses the KV
of the nearest ``G`` below it; ``S`` sliding, owns its KV; ``s`` sliding,
reuses the nearest ``S`` below it (the project's pattern syntax). Window 1024.

**At 24 layers a preset is its figure** (``FIGURES``). At other depths
``layout(name, n)`` keeps the figure's structure:

* *where the globals sit* (``_globals``), per family: MA-EndSlide and
  MA-Pairs a global at the start of every six-layer block (0, 6, 12, ...);
  MA the same plus the last layer; MA-Offset one at the end of every block,
  so the last layer is global and layer 0 sliding (the n mod 6 layers left
  over go first, sliding; below six layers, one block whose last layer is
  the global); Successive a pair of adjacent globals at each of
  two positions and NoShare one global, both at the figure's positions scaled
  to the depth (position p of 24 -> round(p (n - 2) / 22) for pairs, round(p
  (n - 1) / 23) for the single global);
* *which global owns the cache*: the first (the figure's ``G``), and in
  MA-Pairs also the global that starts the second half of the blocks (block
  n // 12, at least block 1); in Successive the first of each pair;
* *how sliding layers share* (``_fill_sliding``): in units alternating a pair
  (``S s``) and a triple (``S s s``), starting with a pair, one KV per unit
  (the Character.AI pattern); a global that interrupts a unit ends it, and
  that unit starts again after the global; SlideShare variants use units of
  five (``S s s s s``).

The rule reproduces every figure at 24 layers but MA-NoShare-3's, whose
figure (a raster one) reads ``... G S S s`` where the rule gives
``... G S s S``; the figure's reading is used at 24 layers. The NoShare
figures are the only raster ones; the others were read from the vector
drawing and the rendered image, which agree.
"""

from __future__ import annotations

FIGURE_SOURCE = "Rajput et al., MixAttention, PMLR v262 (arXiv 2409.15012)"

# name: (paper name, figure, layout at 24 layers)
FIGURES: dict[str, tuple[str, str, str]] = {
    "ma": ("MA", "Figures 1, 2", "G S s S s s g S s S s s g S s S s s g S s S s g"),
    "ma_endslide": ("MA-EndSlide", "Figure 2", "G S s S s s g S s S s s g S s S s s g S s S s s"),
    "ma_offset": ("MA-Offset", "Figures 1, 2", "S s S s s G S s S s s g S s S s s g S s S s s g"),
    "ma_pairs": ("MA-Pairs", "Figures 1, 2", "G S s S s s g S s S s s G S s S s s g S s S s s"),
    "ma_offset_slideshare": ("MA-Offset-SlideShare", "Figure 3", "S s s s s G S s s s s g S s s s s g S s s s s g"),
    "ma_pairs_slideshare": ("MA-Pairs-SlideShare", "Figure 3", "G S s s s s g S s s s s G S s s s s g S s s s s"),
    "ma_successive_1": ("MA-Successive-1", "Figure 9", "G g S s S s s S s S s s G g S s S s s S s S s s"),
    "ma_successive_2": ("MA-Successive-2", "Figure 9", "S s S s s G g S s S s s G g S s S s s S s S s s"),
    "ma_successive_3": ("MA-Successive-3", "Figure 9", "S s S s s S s S s s G g S s S s s G g S s S s s"),
    "ma_successive_4": ("MA-Successive-4", "Figure 9", "S s S s s S s S s s G g S s S s s S s S s s G g"),
    "ma_noshare_1": ("MA-NoShare-1", "Figure 11 (raster)", "S s S G S s s S s S s s S s S s s S s S s s S s"),
    "ma_noshare_2": ("MA-NoShare-2", "Figure 11 (raster)", "S s S s s S s S s s G S s S s s S s S s s S s S"),
    "ma_noshare_3": ("MA-NoShare-3", "Figure 11 (raster)", "S s S s s S s S s s S s S s s S s S s s G S S s"),
}

# the least depth at which each family's structure exists
MIN_LAYERS = {"ma": 2, "ma_endslide": 1, "ma_offset": 2, "ma_pairs": 7, "ma_offset_slideshare": 2,
              "ma_pairs_slideshare": 7, "ma_successive_1": 6, "ma_successive_2": 6, "ma_successive_3": 6,
              "ma_successive_4": 6, "ma_noshare_1": 2, "ma_noshare_2": 2, "ma_noshare_3": 2}

_SUCCESSIVE = {1: (0, 12), 2: (5, 12), 3: (10, 17), 4: (10, 22)}  # the pairs' first layers at 24
_NOSHARE = {1: 3, 2: 10, 3: 20}  # the global layer at 24


def _globals(name: str, n: int) -> dict[int, str]:
    """The global layers of family ``name`` at depth n: index -> 'G' (owner) or 'g'."""
    family = name.removesuffix("_slideshare")
    if family in ("ma", "ma_endslide", "ma_pairs"):
        out = {i: "g" for i in range(0, n, 6)}
        out[0] = "G"
        if family == "ma_pairs":
            out[6 * max(1, n // 6 // 2)] = "G"  # the second cache: the block that starts the second half
        if family == "ma":
            out.setdefault(n - 1, "g")
        return out
    if family == "ma_offset":
        first = n % 6 + 5 if n >= 6 else n - 1  # below six layers: one block, its global last
        return {i: "G" if i == first else "g" for i in range(first, n, 6)}
    if family.startswith("ma_successive_"):
        out = {}
        for p in _SUCCESSIVE[int(family[-1])]:
            start = round(p * (n - 2) / 22)
            out[start], out[start + 1] = "G", "g"
        return out
    if family.startswith("ma_noshare_"):
        return {round(_NOSHARE[int(family[-1])] * (n - 1) / 23): "G"}
    raise KeyError(name)


def _fill_sliding(globals_: dict[int, str], n: int, shared: bool) -> list[str]:
    """Letters for n layers: the given globals, every other layer sliding in
    units (pair, triple, pair, ...; or fives when ``shared``), one KV each."""
    out, unit, left = [], 0, 0  # unit: how many units started; left: layers still to come in the current one
    for i in range(n):
        if i in globals_:
            out.append(globals_[i])
            if left:  # an interrupted unit starts again after the global
                unit, left = unit - 1, 0
            continue
        if left == 0:
            left = 5 if shared else (2 if unit % 2 == 0 else 3)
            unit += 1
            out.append("S")
        else:
            out.append("s")
        left -= 1
    return out


def rule_layout(name: str, n: int) -> str:
    """The layout the rule gives at depth n (see the module doc)."""
    return " ".join(_fill_sliding(_globals(name, n), n, name.endswith("_slideshare")))


def layout(name: str, n: int) -> str:
    """Preset ``name``'s layout at depth n: the figure at 24 layers, the rule elsewhere."""
    if n < MIN_LAYERS[name]:
        raise ValueError(f"{FIGURES[name][0]} needs at least {MIN_LAYERS[name]} layers, got n_layers={n}")
    return FIGURES[name][2] if n == 24 else rule_layout(name, n)
