"""The ComposerModel around the plain :class:`~mixattn.model.MixAttentionLM`:
batches in, the loss out, the evaluation metrics, and the model config kept
in every checkpoint. The llm-foundry plugin (``mixattn.foundry``) subclasses it.

With ``train_metrics`` off (the default) the training forward returns only the
loss, computed inside the (compiled) forward: the [B, T, vocab] logits never
leave the graph, which measured 216 vs 328 ms per step for the 350m model at
4K on an H100 (docs/benchmarks.md). Evaluation always returns logits for the
metrics."""

from __future__ import annotations

import dataclasses

import torch
from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
from composer.models import ComposerModel
from torchmetrics import Metric

from mixattn.config import ConfigError
from mixattn.model import MixAttentionLM, ModelConfig, next_token_loss

# Fields that may legitimately differ when loading a checkpoint into a new run
# (long-context extension, another backend).
MAY_DIFFER_ON_LOAD = {"max_seq_len", "rope_theta", "rope_scaling", "attn_backend", "init_std", "fp32_residual"}


class TokenAccuracy(Metric):
    """Fraction of next-token predictions (argmax) that are right, ignoring -100."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("correct", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, logits, target):
        keep = target != -100
        self.correct += (logits.argmax(-1)[keep] == target[keep]).sum()
        self.total += keep.sum()

    def compute(self):
        return self.correct.float() / self.total.clamp(min=1)


def _model_config_defaults() -> dict:
    return {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.init and f.default is not dataclasses.MISSING}


class ComposerMixAttention(ComposerModel):
    def __init__(self, cfg: ModelConfig, train_metrics: bool = False, recipe: dict | None = None):
        super().__init__()
        self.cfg = cfg
        self.model = MixAttentionLM(cfg)
        self.use_train_metrics = train_metrics
        self.recipe = recipe
        self.tokenizer_record = None  # {"path", "sha256"} of the data's tokenizer, kept in checkpoints
        self.train_metrics = (
            {"LanguageCrossEntropy": LanguageCrossEntropy(), "TokenAccuracy": TokenAccuracy()} if train_metrics else {}
        )
        self.val_metrics = {
            "LanguageCrossEntropy": LanguageCrossEntropy(),
            "LanguagePerplexity": LanguagePerplexity(),
            "TokenAccuracy": TokenAccuracy(),
        }

    def forward(self, batch):
        ids, docs = batch["input_ids"], {"doc_ids": batch.get("doc_ids"), "doc_starts": batch.get("doc_starts")}
        if self.training and not self.use_train_metrics:
            return {"loss": self.model(ids, labels=batch["labels"], **docs).loss}
        return {"logits": self.model(ids, **docs).logits}

    def loss(self, outputs, batch, *args, **kwargs):
        if "loss" in outputs:
            return outputs["loss"]
        return next_token_loss(outputs["logits"], batch["labels"])

    def eval_forward(self, batch, outputs=None):
        return outputs if outputs is not None else self.forward(batch)

    def flops_per_batch(self, batch):
        # composer's SpeedMonitor turns this into MFU
        b, t = batch["input_ids"].shape
        return b * self.model.flops_per_sequence(t)

    def get_metrics(self, is_train=False):
        return self.train_metrics if is_train else self.val_metrics

    def update_metric(self, batch, outputs, metric):
        metric.update(outputs["logits"][:, :-1].float().contiguous(), batch["labels"][:, 1:].contiguous())

    # the resolved model config travels inside every checkpoint (weights_only-safe data)
    def get_extra_state(self):
        extra = {"mixattn_model_config": self.cfg.to_dict()}
        if self.recipe is not None:
            extra["mixattn_recipe"] = self.recipe
        if self.tokenizer_record is not None:
            extra["mixattn_tokenizer"] = self.tokenizer_record
        return extra

    def set_extra_state(self, state):
        saved = (state or {}).get("mixattn_model_config")
        if saved is None:
            return
        ours = self.cfg.to_dict()
        # a key the checkpoint lacks was added to ModelConfig later: it had the default then
        saved = {**_model_config_defaults(), **saved}
        diff = sorted(k for k in set(saved) | set(ours) if k not in MAY_DIFFER_ON_LOAD and saved.get(k) != ours.get(k))
        if diff:
            details = "; ".join(f"{k}: checkpoint {saved.get(k)!r} vs config {ours.get(k)!r}" for k in diff)
            raise ConfigError(f"checkpoint is from an incompatible model config ({details})")
