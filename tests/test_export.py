"""Hugging Face export: the folder loads with AutoModelForCausalLM
(trust_remote_code) and gives the native model's logits; the tokenizer comes
along; bad input leaves nothing behind."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mixattn.checkpoint import load_model
from mixattn.data import load_tokenizer
from mixattn.generate import generate
from mixattn.hf import ExportError, export_model
from mixattn.model import MixAttentionLM, ModelConfig
from test_generate_cli import trained  # noqa: F401  (the module-scoped trained checkpoint)

ROOT = Path(__file__).resolve().parents[1]


def _model(plan="ma_offset", **kw):
    cfg = ModelConfig(vocab_size=61, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=64, plan=plan, window=8, **kw)
    torch.manual_seed(0)
    return MixAttentionLM(cfg).eval()


@pytest.mark.parametrize("plan,tied", [("ma_offset", True), ("all_sliding", False), ("standard", True)])
def test_export_round_trip_logits_match(tmp_path, plan, tied):
    model = _model(plan, tie_embeddings=tied)
    out = export_model(model, tmp_path / f"hf-{plan}-{tied}")
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    x = torch.randint(0, 61, (3, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x).logits, rtol=0, atol=0)
        labels = x.clone()
        assert torch.equal(hf(x, labels=labels).loss, model(x, labels=labels).loss)
    assert hf.model.plan == model.plan
    assert (hf.get_output_embeddings() is None) == tied
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 4 and config["tie_word_embeddings"] == tied and config["model_type"] == "mixattn"


def test_hf_greedy_generate_matches_mixattn_generate(tmp_path):
    model = _model()
    hf = AutoModelForCausalLM.from_pretrained(export_model(model, tmp_path / "hf"), trust_remote_code=True).eval()
    prompt = [5, 17, 3, 42, 8, 1]
    ours = generate(model, [prompt], 12).tokens[0]
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert theirs[0, len(prompt):].tolist() == ours


def test_bf16_export_halves_the_file_and_stays_close(tmp_path):
    model = _model()
    fp32 = export_model(model, tmp_path / "fp32")
    bf16 = export_model(model, tmp_path / "bf16", dtype="bf16")
    assert (bf16 / "model.safetensors").stat().st_size < 0.55 * (fp32 / "model.safetensors").stat().st_size
    hf = AutoModelForCausalLM.from_pretrained(bf16, trust_remote_code=True, torch_dtype=torch.float32).eval()
    x = torch.randint(0, 61, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x).logits, rtol=0.05, atol=0.05)


def test_left_and_right_padding_give_the_unpadded_logits(tmp_path):
    model = _model()
    hf = AutoModelForCausalLM.from_pretrained(export_model(model, tmp_path / "hf"), trust_remote_code=True).eval()
    x = torch.randint(0, 61, (2, 10))
    right = torch.tensor([[1] * 10, [1] * 6 + [0] * 4])
    with torch.no_grad():
        torch.testing.assert_close(hf(x, attention_mask=right).logits[1, :6], model(x[1:, :6]).logits[0], rtol=1e-5, atol=1e-5)
        left = right.flip(1)
        torch.testing.assert_close(hf(x, attention_mask=left).logits[1, 4:], model(x[1:, 4:]).logits[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hf(x, attention_mask=left).logits[0], model(x[:1]).logits[0], rtol=1e-5, atol=1e-5)


def test_transformers_generate_the_way_people_call_it(trained, corpus, tmp_path):  # noqa: F811
    """generate(**tok(...)), a left-padded batch (the same tokens as one prompt
    at a time) and pipeline('text-generation'), on an export with its tokenizer."""
    from transformers import pipeline

    path, _ = trained
    out = tmp_path / "export"
    from mixattn.hf import export_checkpoint

    export_checkpoint(path, out, corpus / "tok" / "tokenizer.json")
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.model_input_names == ["input_ids", "attention_mask"]
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id, eos_token_id=None)
    single = hf.generate(**tok("def parse(", return_tensors="pt"), **settings)
    prompts = ["def parse(", "import os\nclass Parser:\n    def __init__(self"]
    one_by_one = [hf.generate(**tok(p, return_tensors="pt"), **settings)[0].tolist() for p in prompts]
    tok.padding_side = "left"
    batch = tok(prompts, return_tensors="pt", padding=True)
    together = hf.generate(**batch, **settings)
    width = batch["input_ids"].shape[1]
    for row, alone, prompt in zip(together.tolist(), one_by_one, prompts):
        n = len(tok(prompt)["input_ids"])
        assert row[width - n:] == alone  # the prompt (after its left padding) and the same new tokens
    assert single[0].tolist() == one_by_one[0]
    text = pipeline("text-generation", model=hf, tokenizer=tok)("def parse(", max_new_tokens=8, do_sample=False)
    assert text[0]["generated_text"].startswith("def parse(") and len(text[0]["generated_text"]) > len("def parse(")


def test_cli_exports_a_trained_checkpoint_with_its_tokenizer(trained, corpus, tmp_path):  # noqa: F811
    path, _ = trained
    out = tmp_path / "export"
    tok_json = corpus / "tok" / "tokenizer.json"
    cmd = [sys.executable, "-m", "mixattn.cli", "export-hf", str(path), str(out), "--tokenizer", str(tok_json)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    native = load_model(path)
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    text = "def main():\n    return sorted(items)\n"
    ids = load_tokenizer(tok_json).encode_batch([text])[0]
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.padding_side == "right"
    with torch.no_grad():
        torch.testing.assert_close(hf(torch.tensor([ids])).logits, native(torch.tensor([ids])).logits, rtol=0, atol=0)
    # a second export to the same folder is refused, naming the folder and the flag
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "exists and is not an empty folder" in res.stderr and "--force" in res.stderr


def test_bad_exports_leave_nothing_behind(tmp_path, corpus):
    model = _model()  # vocab 61, the corpus tokenizer has 512 tokens
    with pytest.raises(ExportError, match="has 512 tokens but the model's vocab_size is 61"):
        export_model(model, tmp_path / "a", tokenizer=corpus / "tok" / "tokenizer.json")
    with pytest.raises(ExportError, match="dtype 'int8' is not one of fp32, bf16, fp16"):
        export_model(model, tmp_path / "b", dtype="int8")
    assert list(tmp_path.iterdir()) == []
