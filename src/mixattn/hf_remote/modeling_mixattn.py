"""transformers wrapper (AutoModelForCausalLM, trust_remote_code) around the
plain ``mixattn.model.MixAttentionLM``: the model code is mixattn's own, so
loading an export needs ``pip install mixattn``. Full-sequence forward only
(no transformers KV cache): lm-evaluation-harness log-likelihoods and short
``generate`` calls work; for fast decoding use ``mixattn.generate``."""

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_mixattn import MixAttnConfig


class MixAttnForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MixAttnConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]

    def __init__(self, config: MixAttnConfig):
        super().__init__(config)
        from mixattn.model import MixAttentionLM, ModelConfig

        self.model = MixAttentionLM(ModelConfig.from_dict(config.mixattn_model))
        self.post_init()  # transformers' bookkeeping (tied-weight keys in 5.x); _init_weights leaves the weights alone

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        # the RoPE tables are non-persistent buffers: transformers 5 builds the
        # model on the meta device and leaves them uninitialised (NaN logits)
        model.model.reset_rope_tables()
        return model

    def _init_weights(self, module):
        pass  # weights come from the export; a fresh model keeps mixattn's own init

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value):
        self.model.embed = value

    def get_output_embeddings(self):
        return self.model.lm_head  # None when tied: the logits use the embedding matrix

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, token_type_ids: torch.Tensor | None = None,
                **kwargs) -> CausalLMOutput:
        """Padded batches, left or right: padding and real tokens are told apart
        as two documents (mixattn's document masks), so no real token attends
        to padding and positions start at 0 at each row's first real token, as
        transformers' position ids from the mask do. ``token_type_ids`` (some
        tokenizers return them) mean nothing here and are ignored."""
        doc_ids = None
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            doc_ids = attention_mask.long()
        out = self.model(input_ids, labels=labels, doc_ids=doc_ids)
        return CausalLMOutput(loss=out.loss, logits=out.logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}
