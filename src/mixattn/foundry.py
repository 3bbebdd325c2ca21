"""The llm-foundry plugin: ``model.name: mixattn`` in an llm-foundry YAML.

Registered through llm-foundry's ``llmfoundry_models`` entry point (install
``mixattn[foundry]``), so ``composer llm-foundry/scripts/train/train.py
recipe.yaml`` builds this model. Its ``model:`` section takes mixattn's own
keys (``plan``, ``window``, ``mlp_type``, ...; see :class:`~mixattn.model.ModelConfig`)
and, so that existing MixAttention YAMLs keep working, MPT's
``attn_config`` (``sliding_window_size``, ``rope_theta``, ``kv_n_heads``, ...)
and ``block_overrides`` (converted by :mod:`mixattn.mpt`). Batches are
llm-foundry's: ``input_ids``, optional ``labels`` (-100 ignored),
``attention_mask`` and ``sequence_id`` (attention masked per document).

Importing this module imports composer; mixattn imports it only for
``mixattn plan --mpt`` on a ``name: mixattn`` section.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from mixattn.model import ModelConfig
from mixattn.mpt import model_config_from_mpt
from mixattn.plan import PlanError
from mixattn.training.composer_model import ComposerMixAttention

# llm-foundry passes these to every model builder; they do not change the model
_FOUNDRY_KEYS = {"init_device", "use_train_metrics", "additional_train_metrics", "additional_eval_metrics",
                 "loss_fn", "pretrained", "pretrained_model_name_or_path"}
_MPT_KEYS = {"attn_config", "block_overrides", "expansion_ratio", "no_bias", "ffn_config", "learned_pos_emb",
             "tie_word_embeddings"}


def foundry_model_config(kwargs: dict, tokenizer: Any = None) -> ModelConfig:
    """The ModelConfig an llm-foundry ``model:`` section (minus ``name``) describes."""
    ours = {f.name for f in fields(ModelConfig) if f.init}
    unknown = set(kwargs) - ours - _MPT_KEYS - _FOUNDRY_KEYS
    if unknown:
        raise ValueError(f"model (mixattn): unknown key(s) {sorted(unknown)}; valid: mixattn's "
                         f"{', '.join(sorted(ours))} or MPT's {', '.join(sorted(_MPT_KEYS))}")
    direct = {k: v for k, v in kwargs.items() if k in ours}
    mpt = {k: v for k, v in kwargs.items() if k in _MPT_KEYS}
    if mpt:
        mpt_plan = "block_overrides" in mpt or "sliding_window_size" in (mpt.get("attn_config") or {})
        if "plan" in direct and mpt_plan:
            raise PlanError("model (mixattn): give the layer plan once, as plan or as block_overrides/sliding_window_size")
        carried = {k: direct[k] for k in ("d_model", "n_layers", "norm_type") if k in direct}
        converted = model_config_from_mpt({**carried, **mpt}, mpt_defaults=False)
        if not mpt_plan:  # the MPT keys set dimensions only; the plan is mixattn's (or its default)
            converted.pop("plan", None)
            converted.pop("window", None)
        direct = {**converted, **direct}
    if "vocab_size" not in direct and tokenizer is not None:
        direct["vocab_size"] = len(tokenizer)
    if tokenizer is not None and len(tokenizer) > direct.get("vocab_size", 50304):
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but model.vocab_size is {direct['vocab_size']}; "
                         f"set vocab_size >= {len(tokenizer)}")
    return ModelConfig(**direct)


class MixAttentionForFoundry(ComposerMixAttention):
    """mixattn's ComposerModel, built from an llm-foundry model config."""

    def __init__(self, tokenizer: Any = None, use_train_metrics: bool = True, **kwargs: Any):
        cfg = foundry_model_config(kwargs, tokenizer)
        super().__init__(cfg, train_metrics=use_train_metrics)
        self.tokenizer = tokenizer

    def forward(self, batch):
        ids = batch["input_ids"]
        labels = batch.get("labels")
        if labels is None:
            labels = ids.masked_fill(batch["attention_mask"] == 0, -100) if "attention_mask" in batch else ids
        return super().forward({"input_ids": ids, "labels": labels, "doc_ids": batch.get("sequence_id")})

    def loss(self, outputs, batch, *args, **kwargs):
        if "labels" not in batch:
            batch = {**batch, "labels": batch["input_ids"]}
        return super().loss(outputs, batch, *args, **kwargs)
