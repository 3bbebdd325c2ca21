"""Layer plans: which layers attend globally or in a sliding window, and which
layers own a KV cache or reuse an earlier layer's.

A plan is data. Everything else (the model, the KV cache, memory estimates,
FLOP counts, plots) reads it; nothing re-derives it. Three ways to write one,
all producing the same frozen :class:`LayerPlan`:

* a preset name plus depth and window: ``LayerPlan.from_preset("ma", 24, 1024)``;
* an explicit per-layer list, as in YAML::

      - {kind: global}
      - {kind: sliding, window: 1024}
      - {kind: sliding, reuse: -1}      # negative: relative, like llm-foundry
      - {kind: global, reuse: 0}        # non-negative: absolute layer index

* a compact one-line pattern, one token per layer (see :func:`parse_pattern`)::

      G (S s S s s g)*3

This module imports no torch, so ``mixattn plan`` answers instantly.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mixattn import paper_layouts
from mixattn.registry import Registry


class PlanError(ValueError):
    """An impossible or malformed layer plan. The message names the offending
    layer/value and what would be valid."""


# ---------------------------------------------------------------------------
# Layer kinds: a registry, so a new kind (say, chunked attention) is added
# here or by a user without touching the model file.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerKind:
    """What distinguishes one kind of attention layer from another.

    ``allowed(q_pos, k_pos, window)`` says, elementwise on integer tensors (or
    ints), whether a query at position ``q_pos`` may see a key at ``k_pos``;
    causality is part of it. ``cache_tokens(context, window)`` is how many
    tokens of KV an owner of this kind must keep to decode at ``context``.
    ``causal``: ``allowed`` is exactly causal attention, within the last
    ``window`` keys (i - W, i] if ``windowed`` else over every earlier key:
    what the fused kernels (SDPA's causal path, flash-attn, flash-attn-4,
    mixattn's Triton decode) can express. The attention backends ask this,
    never a kind's name; a kind that is not causal in this sense runs where a
    mask is built from ``allowed`` (eager, SDPA with a mask, FlexAttention).
    """

    name: str
    windowed: bool
    letter: str  # the pattern letter (upper case = owns KV, lower case = reuses)
    allowed: Callable[[Any, Any, int | None], Any]
    cache_tokens: Callable[[int, int | None], int]
    causal: bool = False

    def __post_init__(self):
        # upper case owns KV, lower case reuses; x is the pattern's repeat mark
        if not (len(self.letter) == 1 and "A" <= self.letter <= "Z" and self.letter != "X"):
            raise PlanError(f"layer kind {self.name!r}: its pattern letter must be one upper-case letter A-Z other than X, "
                            f"got {self.letter!r}")


LAYER_KINDS: Registry[LayerKind] = Registry("layer kind")
LAYER_KINDS.register(
    "global",
    LayerKind("global", False, "G", lambda q, k, w: k <= q, lambda ctx, w: ctx, causal=True),
)
LAYER_KINDS.register(
    "sliding",
    # a query at i sees keys in (i - W, i]: exactly W keys once i >= W - 1
    LayerKind("sliding", True, "S", lambda q, k, w: (k <= q) & (q - k < w), lambda ctx, w: min(ctx, w), causal=True),
)


# ---------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    """One layer of a plan.

    kind: a name in ``LAYER_KINDS`` ("global", "sliding", or one registered later).
    window: the sliding window in tokens (sliding layers only).
    kv_source: ``None`` if the layer owns its K/V projections and cache; else the
        absolute index of the earlier KV-owning layer whose (post-RoPE) K/V it reads.
    """

    kind: str
    window: int | None = None
    kv_source: int | None = None

    @property
    def owns_kv(self) -> bool:
        return self.kv_source is None

    @property
    def spec(self) -> LayerKind:
        return LAYER_KINDS.get(self.kind)


@dataclass(frozen=True)
class LayerPlan:
    """A validated, immutable description of every layer.

    Construction validates the structure (kinds, windows > 0, reuse pointing
    backwards at a KV owner of the same kind and window). Checks that need the
    model (depth, max sequence length) are in :meth:`check`.
    ``name`` is informational and not part of equality.
    """

    layers: tuple[Layer, ...]
    name: str | None = field(default=None, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers:
            raise PlanError("a layer plan needs at least one layer")
        for i, layer in enumerate(self.layers):
            if layer.kind not in LAYER_KINDS:
                raise PlanError(f"layer {i}: unknown kind {layer.kind!r}; valid kinds: {', '.join(LAYER_KINDS.names())}")
            if layer.spec.windowed:
                if not isinstance(layer.window, int) or isinstance(layer.window, bool) or layer.window <= 0:
                    raise PlanError(f"layer {i} ({layer.kind}): window must be a positive integer number of tokens, got {layer.window!r}")
            elif layer.window is not None:
                raise PlanError(f"layer {i} ({layer.kind}): a {layer.kind} layer takes no window, got window={layer.window!r}")
            src = layer.kv_source
            if src is None:
                continue
            if not isinstance(src, int) or isinstance(src, bool):
                raise PlanError(f"layer {i}: kv_source must be a layer index, got {src!r}")
            if src == i:
                raise PlanError(f"layer {i} reuses its own KV; a reusing layer must point at an earlier layer (0..{i - 1})")
            if src > i or src < 0:
                valid = f"0..{i - 1}" if i else "none: layer 0 must own its KV"
                raise PlanError(f"layer {i} reuses the KV of layer {src}, which is not an earlier layer; valid sources: {valid}")
            target = self.layers[src]
            if not target.owns_kv:
                raise PlanError(
                    f"layer {i} reuses layer {src}, which itself reuses layer {target.kv_source}; "
                    f"point at the owner (layer {target.kv_source})"
                )
            if target.kind != layer.kind:
                raise PlanError(
                    f"layer {i} ({layer.kind}) reuses the KV of layer {src} ({target.kind}); "
                    "KV is shared only between layers of the same kind"
                )
            if target.window != layer.window:
                raise PlanError(
                    f"layer {i} (window {layer.window}) reuses the KV of layer {src} (window {target.window}); "
                    "sliding layers share KV only with the same window"
                )

    # -- construction -------------------------------------------------------

    @classmethod
    def build(cls, layers: Iterable[Layer], name: str | None = None) -> LayerPlan:
        """Like the constructor, but a reuse of a reusing layer is resolved to
        the owner (llm-foundry semantics for chained ``reuse_kv_layer_idx``)."""
        out: list[Layer] = []
        for i, layer in enumerate(layers):
            src = layer.kv_source
            if isinstance(src, int) and not isinstance(src, bool) and 0 <= src < i and not out[src].owns_kv:
                layer = Layer(layer.kind, layer.window, out[src].kv_source)
            out.append(layer)
        return cls(tuple(out), name)

    @classmethod
    def from_preset(cls, name: str, n_layers: int, window: int = 1024) -> LayerPlan:
        key = preset_key(name)
        if key is None:
            raise PlanError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS.names())} "
                            "(or the paper's names, e.g. MA-Offset)")
        preset, name = PRESETS.get(key), key
        if not isinstance(n_layers, int) or n_layers < 1:
            raise PlanError(f"n_layers must be a positive integer, got {n_layers!r}")
        return cls.build(preset.build(n_layers, window), name=name)

    @classmethod
    def from_pattern(cls, pattern: str, window: int = 1024) -> LayerPlan:
        return cls.build(parse_pattern(pattern, window), name=pattern)

    @classmethod
    def from_list(cls, items: Sequence[Any], window: int = 1024) -> LayerPlan:
        return cls.build(_parse_list(items, window))

    @classmethod
    def parse(cls, spec: Any, n_layers: int | None = None, window: int = 1024) -> LayerPlan:
        """Any of the syntaxes: a preset name (needs ``n_layers``), a pattern
        string, a list of per-layer entries, or a LayerPlan. llm-foundry's
        ``{block_overrides: ..., sliding_window_size: W}`` is
        :func:`mixattn.mpt.plan_from_spec`'s (this module imports nothing of
        mixattn's above it)."""
        if isinstance(spec, LayerPlan):
            return spec
        if isinstance(spec, str):
            if preset_key(spec) is not None:
                if n_layers is None:
                    raise PlanError(f"preset {spec!r} needs n_layers")
                return cls.from_preset(spec, n_layers, window)
            if _looks_like_pattern(spec):
                return cls.from_pattern(spec, window)  # (a pattern with a bad window gets parse_pattern's precise error)
            raise PlanError(
                f"{spec!r} is neither a preset ({', '.join(PRESETS.names())}) "
                f"nor a layer pattern (tokens {', '.join(_letters())} with optional :WINDOW and @SOURCE, groups '(...)*N')"
            )
        if isinstance(spec, (list, tuple)):
            return cls.from_list(spec, window)
        if hasattr(spec, "keys") and "block_overrides" in spec:
            raise PlanError("an llm-foundry style plan ({block_overrides: ...}) is read by mixattn.mpt.plan_from_spec "
                            "(a ModelConfig's plan reads it itself)")
        raise PlanError("a layer plan must be a preset name, a pattern string, a list of layers or "
                        f"{{block_overrides: ...}} (llm-foundry), got {type(spec).__name__}")

    # -- queries -------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> Layer:
        return self.layers[i]

    def __iter__(self):
        return iter(self.layers)

    @property
    def owners(self) -> list[int]:
        """Indices of the layers that own a KV cache."""
        return [i for i, layer in enumerate(self.layers) if layer.owns_kv]

    @property
    def sources(self) -> set[int]:
        """Owners whose KV another layer reads (must be kept during forward)."""
        return {layer.kv_source for layer in self.layers if layer.kv_source is not None}

    def check(self, n_layers: int | None = None, max_seq_len: int | None = None) -> LayerPlan:
        """Validate against the model: depth, and windows no larger than the
        maximum sequence length. Returns self."""
        if n_layers is not None and len(self) != n_layers:
            raise PlanError(f"the layer plan has {len(self)} layers but the model has n_layers={n_layers}; make them equal")
        if max_seq_len is not None:
            for i, layer in enumerate(self.layers):
                if layer.window is not None and layer.window > max_seq_len:
                    raise PlanError(
                        f"layer {i}: window {layer.window} is larger than max_seq_len {max_seq_len}; "
                        f"use a window in 1..{max_seq_len} (or a global layer)"
                    )
        return self

    def cache_tokens(self, i: int, context_len: int) -> int:
        """Tokens of KV that layer ``i`` stores to decode at ``context_len`` (0 for reusers)."""
        layer = self.layers[i]
        if not layer.owns_kv:
            return 0
        return layer.spec.cache_tokens(context_len, layer.window)

    def to_pattern(self, window: int | None = None) -> str:
        """The compact pattern; windows equal to ``window`` are left implicit."""
        tokens = []
        last_owner: dict[tuple[str, int | None], int] = {}
        for i, layer in enumerate(self.layers):
            letter = layer.spec.letter
            tok = letter if layer.owns_kv else letter.lower()
            if layer.window is not None and layer.window != window:
                tok += f":{layer.window}"
            key = (layer.kind, layer.window)
            if not layer.owns_kv and last_owner.get(key) != layer.kv_source:
                tok += f"@{layer.kv_source}"
            if layer.owns_kv:
                last_owner[key] = i
            tokens.append(tok)
        return " ".join(tokens)

    def to_list(self) -> list[dict]:
        """The explicit per-layer form (absolute ``reuse`` indices)."""
        out = []
        for layer in self.layers:
            d: dict[str, Any] = {"kind": layer.kind}
            if layer.window is not None:
                d["window"] = layer.window
            if layer.kv_source is not None:
                d["reuse"] = layer.kv_source
            out.append(d)
        return out

    def describe(self) -> list[tuple[int, str, str, str]]:
        """Rows (layer, kind, window, kv) for a table."""
        rows = []
        for i, layer in enumerate(self.layers):
            kv = "own" if layer.owns_kv else f"reuse {layer.kv_source}"
            rows.append((i, layer.kind, "" if layer.window is None else str(layer.window), kv))
        return rows


# ---------------------------------------------------------------------------
# The compact pattern
# ---------------------------------------------------------------------------

def _letters() -> str:
    """Every registered kind's pattern letter, upper (owns KV) and lower (reuses) case."""
    upper = "".join(kind.letter for _, kind in LAYER_KINDS.items())
    return upper + upper.lower()


@functools.lru_cache(maxsize=8)
def _pattern_regexes(letters: str) -> tuple[re.Pattern, re.Pattern]:
    """(the characters a pattern may hold, one token) for these layer letters:
    built from LAYER_KINDS, so a kind registered later needs no edit here."""
    cls = re.escape(letters)
    chars = re.compile(rf"[{cls}0-9:@()*x,|\s]+")
    token = re.compile(rf"\s*(?:([{cls}])(?::(\d+))?(?:@(\d+))?|(\()|(\))\s*[*x]\s*(\d+)|([,|]))")
    return chars, token


def _looks_like_pattern(spec: str) -> bool:
    chars, _ = _pattern_regexes(_letters())
    return bool(chars.fullmatch(spec) or (":" in spec and chars.fullmatch(re.sub(r":[^\s()]*", "", spec))))


def parse_pattern(pattern: str, window: int = 1024) -> list[Layer]:
    """Parse the compact one-line plan syntax.

    One token per layer:
      ``G`` global layer that owns its KV;  ``S`` sliding layer that owns its KV;
      ``g`` / ``s`` the same kinds reusing the KV of the most recent owner of the
      same kind (and window); ``g@3`` / ``s@3`` reuse layer 3 explicitly (and
      take its window);
      ``S:512`` a sliding layer with its own window (default: ``window``).
    ``( ... )*N`` (or ``xN``) repeats a group; spaces, ``,`` and ``|`` are
    separators with no meaning. Example, Character.AI's 13-layer layout:
    ``G (S s S s s g)*2``.
    """
    pos = 0
    stack: list[list[tuple[str, int | None, int | None]]] = [[]]
    text = pattern.strip()
    if not text:
        raise PlanError("empty layer pattern; write one token per layer, e.g. 'G S s S s'")
    bad_window = re.search(r":\s*(-\s*\d+|0+\b|[^\d\s]\S*|$)", text)
    if bad_window:
        raise PlanError(f"layer pattern {pattern!r}: window {bad_window.group(1) or '(missing)'!r} at character "
                        f"{bad_window.start()}: a window (S:W) is a positive number of tokens, e.g. S:512")
    letters = _letters()
    _, token = _pattern_regexes(letters)
    while pos < len(text):
        m = token.match(text, pos)
        if not m or m.end() == pos:
            raise PlanError(
                f"layer pattern {pattern!r}: cannot read {text[pos:pos + 12]!r} at character {pos}; "
                f"tokens are {', '.join(letters)} with optional :WINDOW and @SOURCE; groups '(...)*N'"
            )
        letter, win, src, open_, close, times, _sep = m.groups()
        if letter:
            if letter.isupper() and src is not None:
                raise PlanError(f"layer pattern {pattern!r}: {letter}@{src} — an upper-case layer owns its KV; write {letter.lower()}@{src} to reuse")
            stack[-1].append((letter, int(win) if win is not None else None, int(src) if src is not None else None))
        elif open_:
            stack.append([])
        elif close:
            if len(stack) == 1:
                raise PlanError(f"layer pattern {pattern!r}: ')' at character {m.start(5)} closes no group")
            group = stack.pop()
            n = int(times)
            if n < 1:
                raise PlanError(f"layer pattern {pattern!r}: a group repeats at least once, got *{n}")
            stack[-1].extend(group * n)
        pos = m.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    if len(stack) != 1:
        raise PlanError(f"layer pattern {pattern!r}: a '(' is not closed with ')*N'")
    tokens = stack[0]
    if not tokens:
        raise PlanError(f"layer pattern {pattern!r} has no layers")

    by_letter = {spec.letter: spec for _, spec in LAYER_KINDS.items()}
    layers: list[Layer] = []
    last_owner: dict[tuple[str, int | None], int] = {}
    for i, (letter, win, src) in enumerate(tokens):
        spec = by_letter.get(letter.upper())
        if spec is None:
            raise PlanError(f"layer pattern {pattern!r}: unknown layer letter {letter!r}; valid: {', '.join(sorted(by_letter))}")
        w = (win if win is not None else window) if spec.windowed else None
        if spec.windowed and win is None and src is not None and 0 <= src < i:
            w = layers[src].window  # s@N reads N's cache, so it has N's window
        if win is not None and not spec.windowed:
            raise PlanError(f"layer pattern {pattern!r}: layer {i} ({spec.name}) takes no window, got :{win}")
        key = (spec.name, w)
        if letter.isupper():
            layers.append(Layer(spec.name, w))
            last_owner[key] = i
        else:
            if src is None:
                if key not in last_owner:
                    raise PlanError(
                        f"layer pattern {pattern!r}: layer {i} ({letter!r}) reuses KV but no earlier "
                        f"{spec.name} layer{'' if w is None else f' with window {w}'} owns any; start with {letter.upper()!r}"
                    )
                src = last_owner[key]
            layers.append(Layer(spec.name, w, src))
    return layers


def _parse_list(items: Sequence[Any], window: int) -> list[Layer]:
    if items and all(isinstance(item, str) for item in items):
        # a list of pattern tokens, one per layer: ["G", "S", "s", "g@0"]
        layers = parse_pattern(" ".join(items), window)
        if len(layers) != len(items):
            raise PlanError(f"a list of tokens must have one layer per entry; {list(items)} describes {len(layers)} layers")
        return layers
    layers = []
    allowed = {"kind", "window", "reuse"}
    for i, item in enumerate(items):
        if not hasattr(item, "keys"):
            raise PlanError(f"layer {i}: expected a mapping like {{kind: sliding, window: 1024}}, got {item!r}")
        unknown = set(item.keys()) - allowed
        if unknown:
            raise PlanError(f"layer {i}: unknown key(s) {sorted(unknown)}; valid keys: kind, window, reuse")
        if "kind" not in item:
            raise PlanError(f"layer {i}: missing 'kind'; valid kinds: {', '.join(LAYER_KINDS.names())}")
        kind = item["kind"]
        if kind not in LAYER_KINDS:
            raise PlanError(f"layer {i}: unknown kind {kind!r}; valid kinds: {', '.join(LAYER_KINDS.names())}")
        spec = LAYER_KINDS.get(kind)
        w = item.get("window", window if spec.windowed else None)
        reuse = item.get("reuse")
        if reuse is not None:
            if not isinstance(reuse, int) or isinstance(reuse, bool):
                raise PlanError(f"layer {i}: reuse must be an integer layer index (negative = relative), got {reuse!r}")
            if reuse < 0:
                reuse = i + reuse
                if reuse < 0:
                    raise PlanError(f"layer {i}: reuse {item['reuse']} points before layer 0")
        layers.append(Layer(kind, w, reuse))
    return layers


# ---------------------------------------------------------------------------
# Presets: every layout of the paper, plus Character.AI's and Gemma's.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """A named family of plans, one per depth.

    global_groups(n) lists groups of global layers; the first layer of a group
    owns the KV, the others reuse it. Every other layer is sliding; each run of
    adjacent sliding layers is split into near-equal groups of at most
    ``swa_group`` layers (0: the whole run shares one KV), the first of each
    group owning the KV. ``build`` may be given instead for layouts that are
    not of this form.
    """

    doc: str
    source: str
    global_groups: Callable[[int], list[list[int]]] | None = None
    swa_group: int = 1
    min_layers: int = 1
    custom: Callable[[int, int], list[Layer]] | None = None
    paper_name: str | None = None  # the name in the paper (MA-Offset), which resolves too

    def build(self, n_layers: int, window: int) -> list[Layer]:
        if n_layers < self.min_layers:
            raise PlanError(f"this preset needs at least {self.min_layers} layers, got n_layers={n_layers}")
        if self.custom is not None:
            return self.custom(n_layers, window)
        return _mixed_layout(n_layers, window, self.global_groups(n_layers), self.swa_group)


def _mixed_layout(n: int, window: int, global_groups: list[list[int]], swa_group: int) -> list[Layer]:
    layers: list[Layer | None] = [None] * n
    for group in global_groups:
        for j, idx in enumerate(group):
            if not 0 <= idx < n or layers[idx] is not None:
                raise PlanError(f"global layer index {idx} is out of range or used twice for n_layers={n}")
            layers[idx] = Layer("global", None, None if j == 0 else group[0])
    i = 0
    while i < n:
        if layers[i] is not None:
            i += 1
            continue
        j = i
        while j < n and layers[j] is None:
            j += 1
        run = j - i
        n_groups = 1 if swa_group == 0 else math.ceil(run / swa_group)
        # near-equal groups, larger first: 11 layers in groups of <= 3 -> 3, 3, 3, 2
        sizes = [run // n_groups + (1 if g < run % n_groups else 0) for g in range(n_groups)]
        k = i
        for size in sizes:
            for m in range(size):
                layers[k + m] = Layer("sliding", window, None if m == 0 else k)
            k += size
        i = j
    return layers  # type: ignore[return-value]


def _character_ai(n: int, window: int) -> list[Layer]:
    # llm-foundry's documented layout: a first global layer, then blocks of
    # [SWA own, SWA reuse -1, SWA own, SWA reuse -1, SWA reuse -1 (chain -> -2),
    #  global reuse -6 (-> layer 0)], truncated to depth n.
    block = ["S", "s", "S", "s", "s", "g"]
    tokens = ["G"] + [block[k % 6] for k in range(n - 1)]
    return parse_pattern(" ".join(tokens), window)


PRESETS: Registry[Preset] = Registry("preset")
_SRC = "Rajput et al., 'Inference-Friendly Models With MixAttention', arXiv 2409.15012 (PMLR v262)"

PRESETS.register("standard", Preset(
    "Every layer global and owning its KV (the paper's baseline).", _SRC,
    global_groups=lambda n: [[i] for i in range(n)], paper_name="Standard"))
PRESETS.register("all_sliding", Preset(
    "Every layer sliding-window, each owning its KV (the paper's 'SWA only', Figure 2).", _SRC,
    global_groups=lambda n: [], swa_group=1, paper_name="SWA-only"))
def preset_key(name: str) -> str | None:
    """The registered preset a name means, or None: the snake_case name, the
    paper's name (``MA-Offset``) or either in any case with '-' for '_'
    (``ma-offset``)."""
    if not isinstance(name, str):
        return None
    if name in PRESETS:
        return name
    norm = name.strip().lower().replace("-", "_").replace(" ", "_")
    if norm in PRESETS:
        return norm
    for key, preset in PRESETS.items():
        if preset.paper_name and preset.paper_name.lower().replace("-", "_").replace(" ", "_") == norm:
            return key
    return None


def _paper(name: str) -> Preset:
    paper_name, figure, at24 = paper_layouts.FIGURES[name]
    return Preset(f"{paper_name} ({figure}); at 24 layers: {at24}", f"{paper_layouts.FIGURE_SOURCE}, {figure}",
                  min_layers=paper_layouts.MIN_LAYERS[name], paper_name=paper_name,
                  custom=lambda n, w: parse_pattern(paper_layouts.layout(name, n), w))


for _name in paper_layouts.FIGURES:
    PRESETS.register(_name, _paper(_name))
PRESETS.register("ma_swa_shared", Preset(
    "MA's globals with every run of adjacent sliding layers sharing one KV cache (at 24 layers the "
    "same as MA-Pairs-SlideShare's sharing, with MA's globals); not a figure of the paper.", _SRC,
    global_groups=lambda n: [sorted(paper_layouts._globals("ma", n))], swa_group=0, min_layers=2))
PRESETS.register("character_ai", Preset(
    "Character.AI's layout as llm-foundry documents it: layer 0 global, then blocks of six: "
    "SWA own, SWA reuse, SWA own, SWA reuse, SWA reuse, global reusing layer 0; truncated to depth.",
    "Character.AI, 'Optimizing AI Inference at Character.AI' (June 2024); llm-foundry docs",
    custom=_character_ai))
PRESETS.register("gemma_5to1", Preset(
    "Gemma-3 style: five sliding layers then one global, repeated, every layer owning its KV "
    "(no sharing).", "Gemma Team, 'Gemma 3 Technical Report' (2025)",
    global_groups=lambda n: [[i] for i in range(5, n, 6)], swa_group=1))


# ---------------------------------------------------------------------------
# KV-cache accounting
# ---------------------------------------------------------------------------

_DTYPE_BYTES = {
    "float32": 4, "fp32": 4, "float": 4, "float16": 2, "fp16": 2, "half": 2,
    "bfloat16": 2, "bf16": 2, "float8": 1, "fp8": 1, "int8": 1,
}


def dtype_bytes(dtype: Any) -> int:
    """Bytes per element of a dtype given by name ("bf16") or as a torch dtype."""
    itemsize = getattr(dtype, "itemsize", None)
    if isinstance(itemsize, int):
        return itemsize
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(sorted(_DTYPE_BYTES))}")
    return _DTYPE_BYTES[name]


def kv_cache_bytes(
    plan: LayerPlan,
    *,
    n_kv_heads: int,
    head_dim: int,
    context_len: int,
    batch_size: int = 1,
    dtype: Any = "bf16",
) -> int:
    """Bytes of K and V a cache for ``plan`` holds for ``batch_size`` sequences
    of ``context_len`` tokens: the sum over KV-owning layers of
    2 * n_kv_heads * head_dim * bytes * tokens kept (sliding owners keep
    min(W, context)). Sharing layers add nothing."""
    tokens = sum(plan.cache_tokens(i, context_len) for i in range(len(plan)))
    return _token_bytes(n_kv_heads, head_dim, context_len, batch_size, dtype) * tokens


def _token_bytes(n_kv_heads: int, head_dim: int, context_len: int, batch_size: int, dtype: Any) -> int:
    """K and V bytes of one cached token of one layer, times the batch (the sizes checked)."""
    if context_len < 0 or batch_size < 0:
        raise ValueError(f"context_len and batch_size must be >= 0, got {context_len}, {batch_size}")
    return batch_size * 2 * n_kv_heads * head_dim * dtype_bytes(dtype)


def kv_read_bytes(
    plan: LayerPlan,
    *,
    n_kv_heads: int,
    head_dim: int,
    context_len: int,
    batch_size: int = 1,
    dtype: Any = "bf16",
) -> int:
    """Bytes of K and V one decode step reads from a full cache for ``plan``:
    every layer reads the whole store it attends to, a sharing layer its
    owner's again (its queries come from the layer below, so layers that
    share a store cannot read it in one pass). At least
    :func:`kv_cache_bytes`; equal to it when no layer shares."""
    tokens = sum(plan.cache_tokens(i if layer.owns_kv else layer.kv_source, context_len) for i, layer in enumerate(plan))
    return _token_bytes(n_kv_heads, head_dim, context_len, batch_size, dtype) * tokens


def attended_pairs(seq_len: int, window: int | None) -> int:
    """Unmasked (query, key) pairs of one head over ``seq_len`` causal tokens:
    T(T+1)/2 for global attention; each query sees at most ``window`` keys."""
    keys = seq_len if window is None else min(seq_len, window)
    return keys * (keys + 1) // 2 + (seq_len - keys) * keys


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError  # unreachable


def plan_report(plan: LayerPlan, *, n_kv_heads: int, head_dim: int, contexts: list[int], batch_size: int, dtype: str) -> dict:
    """KV-cache bytes of ``plan`` and of the standard plan of the same depth at each context."""
    standard = LayerPlan.from_preset("standard", len(plan))
    dims = dict(n_kv_heads=n_kv_heads, head_dim=head_dim, batch_size=batch_size, dtype=dtype)
    rows = []
    for ctx in contexts:
        ours = kv_cache_bytes(plan, context_len=ctx, **dims)
        base = kv_cache_bytes(standard, context_len=ctx, **dims)
        rows.append({"context": ctx, "standard_bytes": base, "plan_bytes": ours, "reduction": base / ours})
    return {
        "plan": plan.to_pattern(),
        # one letter per layer (G/S own KV, g/s reuse; windows and sources implicit), and each layer in full
        "layout": letters(plan),
        "layers": plan.to_list(),
        "n_layers": len(plan),
        "kv_owners": len(plan.owners),
        "bytes_per_token_uncapped": kv_cache_bytes(plan, context_len=1, **{**dims, "batch_size": 1}),
        "standard_bytes_per_token": kv_cache_bytes(standard, context_len=1, **{**dims, "batch_size": 1}),
        "contexts": rows,
    }


_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int | float) -> int:
    """'80GiB', '75GB', '512MiB', '8e10' -> bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    s = str(text).strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):] or "b"
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or value <= 0:
        raise ValueError(f"cannot read {text!r} as a memory size; write e.g. 80GiB, 75GB, 512MiB or a number of bytes")
    return int(value * _UNITS[unit])


def identify(plan: LayerPlan) -> str | None:
    """The preset ``plan`` equals at its depth and window, or None for a hand-written plan: what titles and tables call a
    model whose checkpoint stores only the layers."""
    window = next((layer.window for layer in plan if layer.window), 1024)
    for name in PRESETS.names():
        try:
            if LayerPlan.from_preset(name, len(plan), window) == plan:
                return name
        except PlanError:  # a preset deeper than this plan
            continue
    return None


def letters(plan: LayerPlan) -> str:
    """One letter per layer: G/S own their KV, g/s reuse (windows and sources implicit)."""
    return " ".join(layer.spec.letter if layer.owns_kv else layer.spec.letter.lower() for layer in plan)


def preset_rows(n_layers: int = 24, window: int = 1024, context: int = 32768, n_kv_heads: int = 16, head_dim: int = 128,
                dtype: str = "bf16") -> list[dict]:
    """Every preset at one depth: its paper name, layout, KV owners and KV
    bytes for one sequence of ``context`` tokens, against standard's (the
    tables docs/layer-plans.md and docs/recipes.md are generated from)."""
    dims = dict(n_kv_heads=n_kv_heads, head_dim=head_dim, context_len=context, batch_size=1, dtype=dtype)
    base = kv_cache_bytes(LayerPlan.from_preset("standard", n_layers), **dims)
    rows = []
    for name, preset in PRESETS.items():
        plan = LayerPlan.from_preset(name, n_layers, window)
        kv = kv_cache_bytes(plan, **dims)
        rows.append({"preset": name, "paper_name": preset.paper_name, "layout": letters(plan), "kv_owners": len(plan.owners),
                     "kv_bytes": kv, "reduction": base / kv, "doc": preset.doc})
    return rows
