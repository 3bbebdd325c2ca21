"""Instruction fine-tuning: prompt/response JSONL -> MDS with a loss mask,
labels masked on prompts, training from a pretrained checkpoint."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mixattn.data import DataError, _split_of, collate, convert_finetune_to_mds, load_tokenizer
from mixattn.training.composer_model import ComposerMixAttention
from mixattn.training.recipe import load_recipe
from test_train import RECIPE, _cfg, _fit

ROOT = Path(__file__).resolve().parents[1]


def _examples(n=300):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        a, b = (int(x) for x in rng.integers(0, 50, 2))
        out.append({"prompt": f"Q: what is {a} plus {b}?\nA:", "response": f" {a + b}"})
    return out


@pytest.fixture(scope="module")
def sft(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    (root / "chat.jsonl").write_text("".join(json.dumps(e) + "\n" for e in _examples()))
    tok = load_tokenizer(corpus / "tok" / "tokenizer.json")
    stats = convert_finetune_to_mds([root / "chat.jsonl"], root / "mds", tok, 64, val_fraction=0.1, progress=False)
    return root, tok, stats


def _read(split_dir):
    from streaming import StreamingDataset

    ds = StreamingDataset(local=str(split_dir), shuffle=False, batch_size=1)
    return [ds[i] for i in range(len(ds))]


def test_examples_are_packed_whole_with_the_response_mask(sft):
    root, tok, stats = sft
    samples = _read(root / "mds" / "train")
    assert len(samples) == stats.samples["train"] > 0 and stats.skipped == 0
    # rebuild the expected greedy packing of the train split from the raw examples
    expected, cur_t, cur_m = [], [], []
    for e in _examples():
        if _split_of(e["prompt"] + "\x00" + e["response"], 0.1, 17) != "train":
            continue
        p, r = tok.encode_batch([e["prompt"], e["response"]])
        ids, mask = p + r + [tok.eos_id], [0] * len(p) + [1] * (len(r) + 1)
        if len(cur_t) + len(ids) > 64:
            expected.append((cur_t, cur_m))
            cur_t, cur_m = [], []
        cur_t, cur_m = cur_t + ids, cur_m + mask
    expected.append((cur_t, cur_m))
    assert len(expected) == len(samples)
    for (toks, mask), s in zip(expected, samples):
        pad = 64 - len(toks)
        assert s["tokens"].tolist() == toks + [tok.eos_id] * pad
        assert s["loss_mask"].tolist() == mask + [0] * pad


def test_collate_masks_prompt_labels_and_the_loss_counts_only_responses(sft, corpus):
    root, tok, _ = sft
    samples = _read(root / "mds" / "train")[:4]
    batch = collate(samples, tok.eos_id)
    mask = torch.from_numpy(np.stack([s["loss_mask"] for s in samples])).bool()
    assert torch.equal(batch["labels"] == -100, ~mask)
    assert torch.equal(batch["labels"][mask], batch["input_ids"][mask])
    cfg = _cfg(corpus, root, "model.vocab_size=512").model
    model = ComposerMixAttention(cfg)
    model.train()
    loss = model.loss(model(batch), batch)
    logits = model.model(batch["input_ids"], doc_ids=batch["doc_ids"]).logits
    # by hand: next-token CE at the positions whose target is a response token
    pred, target, keep = logits[:, :-1], batch["input_ids"][:, 1:], mask[:, 1:]
    manual = F.cross_entropy(pred[keep].float(), target[keep])
    torch.testing.assert_close(loss, manual)


def test_finetune_from_a_pretrained_checkpoint(sft, corpus, tmp_path):
    root, _, _ = sft
    _, pre_w, _ = _fit(_cfg(corpus, tmp_path / "pre", "max_duration=4ba"))
    ckpt = tmp_path / "pre" / "ckpt" / "latest-rank0.pt"
    rec, _, metrics = _fit(_cfg(
        corpus, tmp_path / "ft", "max_duration=30ba", f"load_path={ckpt}", "load_weights_only=true", "optimizer.lr=3e-3",
        f"data.train=[{{local: {root / 'mds' / 'train'}}}]", f"data.eval=[{{local: {root / 'mds' / 'val'}}}]",
        "save_folder=null",
    ))
    for k, v in pre_w.items():
        assert torch.equal(rec.start_weights[k], v), k
    first, last = sum(rec.losses[:5]) / 5, sum(rec.losses[-5:]) / 5
    assert last < first - 0.5, (first, last)
    assert metrics["LanguageCrossEntropy"] < first


def test_the_finetune_recipe_parses():
    cfg = load_recipe(ROOT / "yamls" / "finetune" / "instruct-350m.yaml", ["load_path=ckpt.pt"])
    assert cfg.load_weights_only and cfg.model.plan == "ma" and cfg.load_path == "ckpt.pt"
    assert RECIPE.is_file()


def test_bad_finetune_data_is_rejected(corpus, tmp_path):
    tok = load_tokenizer(corpus / "tok" / "tokenizer.json")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "only a prompt"}\n')
    with pytest.raises(DataError, match="bad.jsonl:2: no 'response' field"):
        convert_finetune_to_mds([bad], tmp_path / "o1", tok, 64, progress=False)
    assert not (tmp_path / "o1").exists()
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "word " * 200, "response": "x"}) + "\n")
    with pytest.raises(DataError, match="no training examples fit in max_seq_len=64 \\(1 longer examples skipped\\)"):
        convert_finetune_to_mds([long], tmp_path / "o2", tok, 64, progress=False)
    assert not (tmp_path / "o2").exists() and not list(tmp_path.glob(".tmp-*"))
    txt = tmp_path / "plain.txt"
    txt.write_text("hello")
    with pytest.raises(DataError, match="fine-tuning data must be JSONL"):
        convert_finetune_to_mds([txt], tmp_path / "o3", tok, 64, progress=False)
