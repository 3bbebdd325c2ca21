"""llm-foundry MPT configs <-> mixattn.

llm-foundry describes MixAttention models with MPT's ``attn_config.sliding_window_size``
and ``block_overrides`` (``order`` / ``overrides`` / ``reuse_kv_layer_idx``; see
the MPTConfig docstring). This module reads such a ``model:`` section into a
:class:`~mixattn.plan.LayerPlan` (and the rest of a :class:`~mixattn.model.ModelConfig`),
and writes a plan back as ``block_overrides``, so existing MixAttention YAMLs keep working:

    plan = plan_from_mpt(yaml_model_section)          # -> LayerPlan
    section = mpt_from_plan(plan)                      # -> {attn_config..., block_overrides}

Windows: MPT's ``sliding_window_size: W`` lets a query see W + 1 keys (itself
and W before it); a mixattn window counts the keys seen, so it is W + 1 here
(``sliding_window_size: 1024`` reads as ``window: 1025``, and back).

Semantics follow llm-foundry's ``MPTModel._get_override_block_args_list``:
``order`` entries are ``{name, repeat}`` or nested ``{order, repeat}``, the
expanded order times ``block_overrides.repeat`` must have ``n_layers`` entries,
``default`` is a layer with no override, ``reuse_kv_layer_idx`` is negative
and relative, and a reuse of a reusing layer resolves to that layer's source.

No torch, no llm-foundry import: conversion works without either installed.
"""

from __future__ import annotations

import copy
from typing import Any

from mixattn.plan import Layer, LayerPlan, PlanError

# attn_config keys a block override may carry that we translate
_OVERRIDE_ATTN_KEYS = {"sliding_window_size", "reuse_kv_layer_idx"}
# MPT attention settings that have no effect on our model (implementation choices)
_IGNORED_ATTN_KEYS = {"attn_impl", "attn_type", "fused_qkv", "rope_impl", "rope_dail_config", "rope_hf_config",
                      "attn_uses_sequence_id", "attn_pdrop", "softmax_scale", "flex_attn_mod_list"}


def _window(attn: dict) -> int | None:
    """Our window for an MPT ``sliding_window_size``. MPT's query i sees keys
    i - W .. i (W + 1 keys: flash-attn's ``window_size=(W, W)`` and the torch
    path's ``triu(diagonal=-W)``); ours sees W keys, i - W + 1 .. i."""
    w = attn.get("sliding_window_size", -1)
    if w is None or w == -1:
        return None
    if not isinstance(w, int) or isinstance(w, bool) or w < 0:
        raise PlanError(f"sliding_window_size must be -1 (global) or a non-negative number of tokens, got {w!r}")
    return w + 1


def _mpt_window(window: int | None) -> int:
    return -1 if window is None else window - 1


def expand_order(order: Any, where: str = "block_overrides.order") -> list[str]:
    """The flat list of override names ``order`` describes (nested orders and repeats expanded)."""
    if not isinstance(order, (list, tuple)):
        raise PlanError(f"{where} must be a list of {{name: ...}} / {{order: [...]}} entries, got {order!r}")
    out: list[str] = []
    for k, item in enumerate(order):
        here = f"{where}[{k}]"
        if not hasattr(item, "keys"):
            raise PlanError(f"{here}: expected a mapping with 'name' or 'order', got {item!r}")
        unknown = set(item.keys()) - {"name", "order", "repeat"}
        if unknown:
            raise PlanError(f"{here}: unknown key(s) {sorted(unknown)}; valid keys: name, order, repeat")
        if ("name" in item) == ("order" in item):
            raise PlanError(f"{here}: exactly one of 'name' or 'order' must be given, got {dict(item)!r}")
        repeat = item.get("repeat", 1)
        if not isinstance(repeat, int) or isinstance(repeat, bool) or repeat < 1:
            raise PlanError(f"{here}: repeat must be a positive integer, got {repeat!r}")
        names = [item["name"]] if "name" in item else expand_order(item["order"], f"{here}.order")
        out.extend(names * repeat)
    return out


def plan_from_mpt(model: dict) -> LayerPlan:
    """The layer plan of an llm-foundry MPT ``model:`` section (needs ``n_layers``;
    reads ``attn_config.sliding_window_size`` and ``block_overrides``)."""
    model = _plain(model)
    n_layers = model.get("n_layers")
    if not isinstance(n_layers, int) or isinstance(n_layers, bool) or n_layers < 1:
        raise PlanError(f"the MPT config needs n_layers (a positive integer), got {n_layers!r}")
    base = dict(model.get("attn_config") or {})
    overrides_cfg = model.get("block_overrides")
    if overrides_cfg is None:
        w = _window(base)
        return LayerPlan.build([Layer("sliding" if w else "global", w) for _ in range(n_layers)])
    unknown = set(overrides_cfg) - {"order", "overrides", "repeat"}
    if unknown:
        raise PlanError(f"block_overrides: unknown key(s) {sorted(unknown)}; valid keys: order, overrides, repeat")
    if "order" not in overrides_cfg:
        raise PlanError("block_overrides needs an 'order' list")
    definitions = overrides_cfg.get("overrides") or {}
    repeat = overrides_cfg.get("repeat", 1)
    names = expand_order(overrides_cfg["order"]) * repeat
    if len(names) != n_layers:
        raise PlanError(f"block_overrides.order describes {len(names)} layers but n_layers={n_layers}; make them equal")
    layers: list[Layer] = []
    for i, name in enumerate(names):
        if name == "default":
            override: dict = {}
        elif name in definitions:
            override = definitions[name] or {}
        else:
            valid = ", ".join(["default", *sorted(definitions)])
            raise PlanError(f"layer {i}: block_overrides.order names {name!r}, which is not in overrides; valid names: {valid}")
        extra = set(override) - {"attn_config"}
        if extra:
            raise PlanError(f"override {name!r} sets {sorted(extra)}; mixattn translates only attn_config "
                            f"({', '.join(sorted(_OVERRIDE_ATTN_KEYS))})")
        attn = override.get("attn_config") or {}
        bad = set(attn) - _OVERRIDE_ATTN_KEYS
        if bad:
            raise PlanError(f"override {name!r}: attn_config key(s) {sorted(bad)} have no mixattn equivalent; "
                            f"supported: {', '.join(sorted(_OVERRIDE_ATTN_KEYS))}")
        w = _window({**base, **attn})
        reuse = attn.get("reuse_kv_layer_idx")
        source = None
        if reuse is not None:
            if not isinstance(reuse, int) or isinstance(reuse, bool) or reuse >= 0:
                raise PlanError(f"override {name!r} (layer {i}): reuse_kv_layer_idx must be a negative relative index, got {reuse!r}")
            source = i + reuse
            if source < 0:
                raise PlanError(f"layer {i} ({name!r}): reuse_kv_layer_idx {reuse} points before layer 0")
        layers.append(Layer("sliding" if w else "global", w, source))
    return LayerPlan.build(layers)


def plan_from_spec(spec, n_layers: int | None) -> LayerPlan:
    """A plan written as llm-foundry writes one inside a model section,
    ``{block_overrides: ..., sliding_window_size: W}`` (a ModelConfig's
    ``plan`` may be one), for ``n_layers`` layers."""
    unknown = set(spec.keys()) - {"block_overrides", "sliding_window_size"}
    if unknown:
        raise PlanError(f"an llm-foundry style plan takes block_overrides and sliding_window_size, got {sorted(unknown)}")
    if n_layers is None:
        raise PlanError("an llm-foundry style plan (block_overrides) needs n_layers")
    attn = {"sliding_window_size": spec.get("sliding_window_size", -1)}
    return plan_from_mpt({"n_layers": n_layers, "attn_config": attn, "block_overrides": spec["block_overrides"]})


def mpt_from_plan(plan: LayerPlan) -> dict:
    """``attn_config`` (the default layer's window) and ``block_overrides`` for
    llm-foundry's MPT that describe ``plan``; ``plan_from_mpt`` reads it back to
    an equal plan. Each distinct (window, relative reuse) gets one named
    override; ``order`` is run-length encoded."""
    if not plan[0].owns_kv:
        raise PlanError("layer 0 must own its KV")
    default = (plan[0].window, None)
    definitions: dict[str, dict] = {}
    names: list[str] = []
    for i, layer in enumerate(plan):
        rel = None if layer.owns_kv else layer.kv_source - i
        key = (layer.window, rel)
        if key == default:
            names.append("default")
            continue
        name = ("global" if layer.window is None else f"sliding_{layer.window}") + ("" if rel is None else f"_reuse{rel}")
        attn: dict[str, Any] = {"sliding_window_size": _mpt_window(layer.window)}
        if rel is not None:
            attn["reuse_kv_layer_idx"] = rel
        definitions[name] = {"attn_config": attn}
        names.append(name)
    order: list[dict] = []
    for name in names:
        if order and order[-1]["name"] == name:
            order[-1]["repeat"] = order[-1].get("repeat", 1) + 1
        else:
            order.append({"name": name})
    section: dict[str, Any] = {
        "n_layers": len(plan),
        "attn_config": {"sliding_window_size": _mpt_window(default[0])},
    }
    if definitions:
        section["block_overrides"] = {"order": order, "overrides": definitions}
    return section


# -- whole model sections ------------------------------------------------------------------

# MPT keys read into ModelConfig; anything else that changes the model is refused by name
_MPT_IGNORED = {"name", "init_device", "attn_impl", "use_train_metrics", "additional_train_metrics",
                "additional_eval_metrics", "loss_fn", "emb_pdrop", "resid_pdrop", "logit_scale", "use_cache",
                "use_pad_tok_in_ffn", "fc_type", "verbose", "init_config", "param_init_fn", "init_std",
                "pretrained_model_name_or_path", "config_overrides", "tokenizer", "z_loss", "shift_labels"}


def _plain(d: Any) -> dict:
    if d is None:
        return {}
    try:  # an omegaconf DictConfig
        from omegaconf import DictConfig, OmegaConf

        if isinstance(d, DictConfig):
            return OmegaConf.to_container(d, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover - omegaconf is a core dependency
        pass
    return copy.deepcopy(dict(d))


def model_config_from_mpt(model: dict, mpt_defaults: bool = True) -> dict:
    """ModelConfig keyword arguments for an llm-foundry MPT ``model:`` section.
    With ``mpt_defaults``, keys the section leaves out take MPTConfig's defaults
    (biases on, expansion ratio 4, learned positions unless RoPE/ALiBi), as
    llm-foundry would build the model; without, they take mixattn's. A setting
    that would change the model and has no mixattn equivalent (ALiBi, learned
    positions, an MoE ``ffn_config``, ...) is refused by name."""
    model = _plain(model)
    if mpt_defaults:
        model = {"expansion_ratio": 4, "no_bias": False, "learned_pos_emb": True, **model}
    attn = dict(model.get("attn_config") or {})
    out: dict[str, Any] = {}
    for key in ("d_model", "n_heads", "n_layers", "max_seq_len", "vocab_size"):
        if key in model:
            out[key] = model[key]
    if model.get("expansion_ratio") is not None:
        ratio = model["expansion_ratio"]
        hidden = ratio * out.get("d_model", 768)
        if hidden != int(hidden):
            raise PlanError(f"expansion_ratio {ratio} x d_model {out.get('d_model')} is not an integer MLP width")
        out["mlp_hidden"] = int(hidden)
    if "no_bias" in model:
        out["bias"] = not model["no_bias"]
    if "tie_word_embeddings" in model:
        out["tie_embeddings"] = bool(model["tie_word_embeddings"])
    norm = model.get("norm_type", "low_precision_layernorm" if mpt_defaults else "layernorm")
    norms = {"low_precision_layernorm": "layernorm", "layernorm": "layernorm", "rmsnorm": "rmsnorm",
             "low_precision_rmsnorm": "rmsnorm"}
    if norm not in norms:
        raise PlanError(f"norm_type {norm!r} has no mixattn equivalent; supported: {', '.join(sorted(norms))}")
    out["norm_type"] = norms[norm]
    if "norm_eps" in model:
        out["norm_eps"] = model["norm_eps"]
    ffn = dict(model.get("ffn_config") or {"ffn_type": "mptmlp"})
    ffn_types = {"mptmlp": "gelu", "mptglu": "swiglu", "mptgeglu": "swiglu"}
    ffn_type = ffn.pop("ffn_type", "mptmlp")
    if ffn_type not in ffn_types:
        raise PlanError(f"ffn_config.ffn_type {ffn_type!r} has no mixattn equivalent; supported: {', '.join(ffn_types)}")
    ffn.pop("fc_type", None)
    if ffn:
        raise PlanError(f"ffn_config key(s) {sorted(ffn)} have no mixattn equivalent")
    out["mlp_type"] = ffn_types[ffn_type]
    if model.get("learned_pos_emb") and not attn.get("rope") and not attn.get("alibi"):
        raise PlanError("learned_pos_emb: mixattn models use RoPE; set attn_config.rope: true")
    if attn.get("alibi"):
        raise PlanError("attn_config.alibi: mixattn models use RoPE, not ALiBi; set attn_config.rope: true")
    for key in ("clip_qkv", "qk_gn"):
        if attn.get(key):
            raise PlanError(f"attn_config.{key} has no mixattn equivalent; remove it")
    if "rope_theta" in attn:
        out["rope_theta"] = float(attn["rope_theta"])
    if attn.get("qk_ln"):
        out["qk_norm"] = True
    if attn.get("kv_n_heads") is not None:
        out["n_kv_heads"] = attn["kv_n_heads"]
    unknown = set(attn) - _IGNORED_ATTN_KEYS - {"sliding_window_size", "rope", "alibi", "alibi_bias_max", "rope_theta",
                                                  "qk_ln", "qk_gn", "clip_qkv", "kv_n_heads"}
    if unknown:
        raise PlanError(f"attn_config key(s) {sorted(unknown)} have no mixattn equivalent")
    if "n_layers" in model:
        plan = plan_from_mpt(model)
        out["plan"] = plan.to_pattern(window=next((layer.window for layer in plan if layer.window), None))
        windows = [layer.window for layer in plan if layer.window]
        if windows:
            out["window"] = windows[0]
    known = {"d_model", "n_heads", "n_layers", "max_seq_len", "vocab_size", "expansion_ratio", "no_bias",
             "tie_word_embeddings", "norm_type", "norm_eps", "ffn_config", "learned_pos_emb", "attn_config",
             "block_overrides"}
    rest = set(model) - known - _MPT_IGNORED
    if rest:
        raise PlanError(f"MPT key(s) {sorted(rest)} have no mixattn equivalent")
    return out


def mpt_from_model_config(cfg: Any) -> dict:
    """An llm-foundry ``model:`` section (``name: mpt_causal_lm``) with the same
    dimensions and layer plan as a mixattn ModelConfig. The architecture maps
    one to one; trained weights are not converted by this function."""
    plan = cfg.layer_plan
    section = mpt_from_plan(plan)
    attn = section["attn_config"]
    attn.update({"rope": True, "rope_impl": "hf", "rope_theta": cfg.rope_theta, "attn_impl": "flash"})
    if cfg.n_kv_heads != cfg.n_heads:
        attn.update({"attn_type": "grouped_query_attention", "kv_n_heads": cfg.n_kv_heads})
    if cfg.qk_norm:
        attn["qk_ln"] = True
    hidden = cfg.hidden
    out = {
        "name": "mpt_causal_lm", "d_model": cfg.d_model, "n_heads": cfg.n_heads, "n_layers": cfg.n_layers,
        "max_seq_len": cfg.max_seq_len, "vocab_size": cfg.vocab_size, "expansion_ratio": hidden / cfg.d_model,
        "no_bias": not cfg.bias, "norm_type": "low_precision_rmsnorm" if cfg.norm_type == "rmsnorm" else "low_precision_layernorm",
        "norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings, "learned_pos_emb": False,
        "ffn_config": {"ffn_type": "mptglu" if cfg.mlp_type == "swiglu" else "mptmlp"},
        "attn_config": attn,
    }
    if "block_overrides" in section:
        out["block_overrides"] = section["block_overrides"]
    return out
