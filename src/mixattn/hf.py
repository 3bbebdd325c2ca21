"""Hugging Face export: ``mixattn export-hf CHECKPOINT OUT`` writes a folder
that ``transformers.AutoModelForCausalLM.from_pretrained(OUT,
trust_remote_code=True)`` loads: config.json (the mixattn model config whole,
plus the usual transformers names), model.safetensors, the two remote-code
files from ``mixattn/hf_remote/`` and, when given, the tokenizer. Everything
is written to a temporary folder beside OUT and renamed into place at the
end, so a failed export leaves nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from mixattn.checkpoint import load_model
from mixattn.model import MixAttentionLM

REMOTE_CODE = Path(__file__).parent / "hf_remote"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ExportError(ValueError):
    pass


def export_model(model: MixAttentionLM, out: str | Path, tokenizer: str | Path | None = None, dtype: str = "fp32",
                 overwrite: bool = False) -> Path:
    """Write ``model`` (and the tokenizer) as a transformers folder at ``out``."""
    from safetensors.torch import save_file

    out = Path(out)
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise ExportError(f"{str(out)!r} exists and is not an empty folder; pass overwrite=True (--force) to replace it")
    tok = None
    if tokenizer is not None:
        tok = _hf_tokenizer(tokenizer, model.cfg.max_seq_len)
        if len(tok) > model.cfg.vocab_size:
            raise ExportError(f"the tokenizer {str(tokenizer)!r} has {len(tok)} tokens but the model's vocab_size is {model.cfg.vocab_size}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for name in ("configuration_mixattn.py", "modeling_mixattn.py"):
            shutil.copy2(REMOTE_CODE / name, tmp / name)
        cfg = model.cfg.to_dict()
        config = {
            "architectures": ["MixAttnForCausalLM"],
            "model_type": "mixattn",
            "auto_map": {"AutoConfig": "configuration_mixattn.MixAttnConfig",
                         "AutoModelForCausalLM": "modeling_mixattn.MixAttnForCausalLM"},
            "mixattn_model": cfg,
            "vocab_size": cfg["vocab_size"], "hidden_size": cfg["d_model"], "num_hidden_layers": cfg["n_layers"],
            "num_attention_heads": cfg["n_heads"], "num_key_value_heads": cfg["n_kv_heads"] or cfg["n_heads"],
            "max_position_embeddings": cfg["max_seq_len"], "tie_word_embeddings": bool(cfg["tie_embeddings"]),
            "torch_dtype": str(DTYPES[dtype]).removeprefix("torch."),
        }
        if tok is not None and tok.eos_token_id is not None:
            config["eos_token_id"] = tok.eos_token_id
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        state = {f"model.{k}": v.detach().to(DTYPES[dtype]).contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "mixattn_plan": json.dumps(cfg["plan"])})
        if tok is not None:
            tok.save_pretrained(str(tmp))
        _usual_modes(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _usual_modes(folder: Path) -> None:
    """The modes a plain mkdir and open would give under the user's umask
    (mkdtemp makes 0700 and some writers 0600): 0777 / 0666 minus the umask."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.rglob("*"):
        f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)


def export_checkpoint(checkpoint: str | Path, out: str | Path, tokenizer: str | Path | None = None, dtype: str = "fp32",
                      overwrite: bool = False) -> Path:
    """``mixattn export-hf``: a training checkpoint (loaded weights-only) to a
    transformers folder, with ``tokenizer``, else the one the checkpoint
    records where that file is still there."""
    model = load_model(checkpoint)
    recorded = getattr(model, "trained_tokenizer", None)
    if tokenizer is None and recorded is not None and Path(recorded["path"]).exists():
        tokenizer = recorded["path"]
    return export_model(model, out, tokenizer, dtype, overwrite)


def _hf_tokenizer(name_or_path: str | Path, max_len: int):
    """A transformers fast tokenizer from a tokenizer.json (ours: EOS is
    ``<|endoftext|>``) or from a transformers tokenizer folder."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from mixattn.data import EOS_TOKEN, load_tokenizer

    loaded = load_tokenizer(name_or_path)  # the same checks as training: exists, has an EOS
    if not hasattr(loaded.backend, "encode_batch"):
        return AutoTokenizer.from_pretrained(str(name_or_path))
    # model_input_names: what the model takes, so tok(...) unpacks straight into generate()
    return PreTrainedTokenizerFast(tokenizer_object=loaded.backend, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
                                   padding_side="right", model_max_length=max_len,
                                   model_input_names=["input_ids", "attention_mask"])
