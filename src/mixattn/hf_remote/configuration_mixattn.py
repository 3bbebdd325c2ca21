"""transformers config for a mixattn model exported by ``mixattn export-hf``.
The mixattn model config travels whole under ``mixattn_model``; the usual
transformers names are filled in from it for tools that read them."""

from transformers import PretrainedConfig


class MixAttnConfig(PretrainedConfig):
    model_type = "mixattn"

    def __init__(self, mixattn_model: dict | None = None, **kwargs):
        self.mixattn_model = dict(mixattn_model or {})
        m = self.mixattn_model
        if m:
            self.vocab_size = m["vocab_size"]
            self.hidden_size = m["d_model"]
            self.num_hidden_layers = m["n_layers"]
            self.num_attention_heads = m["n_heads"]
            self.num_key_value_heads = m.get("n_kv_heads") or m["n_heads"]
            self.max_position_embeddings = m["max_seq_len"]
            kwargs.setdefault("tie_word_embeddings", m.get("tie_embeddings", True))
        super().__init__(**kwargs)
