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
                labels: torch.LongTensor | None = None, **kwargs) -> CausalLMOutput:
        if attention_mask is not None:
            m = attention_mask.bool()
            # a 1 after a 0 in a row is left padding: positions and attention would be wrong
            if bool((~m[:, :-1] & m[:, 1:]).any()):
                raise ValueError("mixattn models take right-padded batches (tokenizer.padding_side = 'right'); "
                                 "this attention_mask has left padding")
        out = self.model(input_ids, labels=labels)
        return CausalLMOutput(loss=out.loss, logits=out.logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}
