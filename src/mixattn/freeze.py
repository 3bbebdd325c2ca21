"""Training part of a model: ``trainable: [attention]`` and the like.

Groups name the parts of :class:`~mixattn.model.MixAttentionLM` by what they
are; any other entry is an fnmatch pattern over parameter names
(``blocks.*.attn.wqkv.*``). Frozen parameters get ``requires_grad = False``
before any wrapper is applied, so autograd makes no gradient for them and
the optimizer (built over the trainable ones) keeps no state."""

from __future__ import annotations

import fnmatch

from mixattn.config import ConfigError

GROUPS = {
    "attention": ("blocks.*.attn.*",),  # Q/K/V and output projections, q/k norms
    "mlp": ("blocks.*.mlp.*",),
    "norms": ("blocks.*.norm_*", "norm_f.*"),
    "embeddings": ("embed.*", "lm_head.*"),
}


def _patterns(entries) -> list[str]:
    return [p for e in entries for p in GROUPS.get(e, (e,))]


def check_trainable(entries) -> None:
    if not isinstance(entries, (list, tuple)) or not entries or not all(isinstance(e, str) and e for e in entries):
        raise ConfigError(f"trainable must be a non-empty list of groups ({', '.join(GROUPS)}) or parameter-name "
                          f"patterns, or null for everything; got {entries!r}")


def freeze_all_but(model, entries) -> int:
    """Freeze every parameter of ``model`` that no entry matches; returns the
    number of trainable elements. An entry that matches nothing is an error
    (a typo would otherwise freeze the whole model)."""
    check_trainable(entries)
    names = [n for n, _ in model.named_parameters()]
    for entry in entries:
        if not any(fnmatch.fnmatchcase(n, p) for p in _patterns([entry]) for n in names):
            raise ConfigError(f"trainable entry {entry!r} matches no parameter; groups: {', '.join(GROUPS)}; "
                              f"names look like {names[0]!r}, {names[min(3, len(names) - 1)]!r}")
    patterns = _patterns(entries)
    kept = 0
    for name, p in model.named_parameters():
        p.requires_grad_(any(fnmatch.fnmatchcase(name, pat) for pat in patterns))
        kept += p.numel() if p.requires_grad else 0
    return kept
