"""mixattn eval: loss by position bucket adds up to the plain loss; the
retrieval command writes its table, JSON and heatmap from real model output."""

import json
import re

import pytest
import torch
import torch.nn.functional as F

from mixattn.cli import main
from mixattn.data import load_tokenizer
from mixattn.evaluate import loss_by_position, mds_batches, retrieval_table
from mixattn.model import MixAttentionLM, ModelConfig
from test_train import _cfg, _fit


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalrun")
    _fit(_cfg(corpus, tmp, "max_duration=4ba", "model.max_seq_len=256", data="mds128"))
    return tmp / "ckpt" / "latest-rank0.pt"


def test_loss_by_position_buckets_add_up_to_the_plain_loss(corpus):
    torch.manual_seed(0)
    model = MixAttentionLM(ModelConfig(vocab_size=512, d_model=32, n_layers=4, n_heads=4, max_seq_len=64, plan="ma", window=16))
    eos = load_tokenizer(corpus / "tok" / "tokenizer.json").eos_id
    batches = list(mds_batches(corpus / "mds64" / "val", 4, eos, max_batches=3))
    rows = loss_by_position(model, batches, [0, 16, 32])
    by = {r["positions"]: r for r in rows}
    n = sum(b["input_ids"].shape[0] for b in batches)
    assert [by[k]["tokens"] for k in ("[0, 16)", "[16, 32)", "[32, end)")] == [15 * n, 16 * n, 32 * n]
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = model(b["input_ids"], doc_ids=b["doc_ids"]).logits
            total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(), reduction="sum"))
            count += b["labels"][:, 1:].numel()
    assert by["all"]["tokens"] == count
    assert by["all"]["loss"] == pytest.approx(total / count, rel=1e-5)
    weighted = sum(by[k]["loss"] * by[k]["tokens"] for k in ("[0, 16)", "[16, 32)", "[32, end)")) / count
    assert weighted == pytest.approx(total / count, rel=1e-5)


def test_eval_perplexity_cli(trained, corpus, tmp_path, capsys):
    out = tmp_path / "ppl.json"
    assert main(["eval", "perplexity", str(trained), "--data", str(corpus / "mds64" / "val"), "--buckets", "0", "32",
                 "--device", "cpu", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["positions"] for r in rows] == ["[0, 32)", "[32, end)", "all"]
    assert "perplexity" in capsys.readouterr().out


def test_eval_retrieval_cli_writes_table_json_and_heatmap(trained, corpus, tmp_path):
    code = main(["eval", "retrieval", str(trained), "--tokenizer", str(corpus / "tok" / "tokenizer.json"),
                 "--tasks", "niah_single", "word_frequency", "--lengths", "180", "220", "--depths", "0", "1",
                 "--samples", "1", "--max-new-tokens", "6", "--device", "cpu", "--out", str(tmp_path)])
    assert code == 0
    result = json.loads((tmp_path / "retrieval.json").read_text())
    assert len(result["records"]) == 2 * 2 * 2
    assert result["table"] == retrieval_table(result["records"])
    assert (tmp_path / "retrieval.png").stat().st_size > 1000
    assert main(["eval", "retrieval", str(trained), "--tokenizer", str(corpus / "tok" / "tokenizer.json"),
                 "--lengths", "250", "--max-new-tokens", "10", "--out", str(tmp_path / "x")]) == 2  # 260 > max_seq_len 256


def test_retrieval_lengths_too_short_name_the_task_the_flag_and_the_smallest_length(trained, corpus, tmp_path, capsys):
    code = main(["eval", "retrieval", str(trained), "--tokenizer", str(corpus / "tok" / "tokenizer.json"),
                 "--tasks", "niah_multivalue", "--lengths", "16", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "task niah_multivalue: --lengths 16 leaves no room" in err
    smallest = int(err.split("the smallest length that works for niah_multivalue is ")[1].split()[0].rstrip(";"))
    assert 16 < smallest <= 256
    assert not (tmp_path / "r").exists()  # refused before any model ran or anything was written


def test_retrieval_table_averages_per_cell():
    records = [{"task": "t", "length": 8, "depth": 0.5, "score": s} for s in (1.0, 0.0, 0.5)]
    records.append({"task": "t", "length": 16, "depth": 0.5, "score": 1.0})
    assert retrieval_table(records) == [
        {"task": "t", "length": 8, "depth": 0.5, "accuracy": 0.5, "samples": 3},
        {"task": "t", "length": 16, "depth": 0.5, "accuracy": 1.0, "samples": 1},
    ]


def test_perplexity_on_raw_text_equals_the_same_text_converted_to_mds(trained, corpus, tmp_path):
    from mixattn.data import convert_to_mds
    from mixattn.demo import stdlib_corpus

    files = [str(f) for f in stdlib_corpus()[30:34]]
    tok_path = corpus / "tok" / "tokenizer.json"
    convert_to_mds(files, tmp_path / "mds", load_tokenizer(tok_path), 96, val_fraction=0.0, progress=False)
    common = ["--buckets", "0", "48", "--batch-size", "4", "--max-batches", "3", "--device", "cpu"]
    assert main(["eval", "perplexity", str(trained), "--data", str(tmp_path / "mds" / "train"), *common,
                 "--json", str(tmp_path / "mds.json")]) == 0
    assert main(["eval", "perplexity", str(trained), "--text", *files, "--tokenizer", str(tok_path), "--seq-len", "96", *common,
                 "--json", str(tmp_path / "text.json")]) == 0
    mds_rows = json.loads((tmp_path / "mds.json").read_text())["rows"]
    assert mds_rows[-1]["tokens"] == 3 * 4 * 95
    assert json.loads((tmp_path / "text.json").read_text())["rows"] == mds_rows  # same packing, same numbers


@pytest.mark.parametrize("args,message", [
    (["--seq-len", "96"], r"(?s)tokenizer: .* \(recorded in the checkpoint\).*less than one sequence of 96"),  # the trained one
    (["--tokenizer", "TOK", "--seq-len", "4096"], r"--seq-len 4096 must be in \[2, 256\]"),
    (["--tokenizer", "TOK", "--seq-len", "250", "--max-batches", "1"], "less than one sequence of 250"),
])
def test_perplexity_on_raw_text_rejects_bad_input(trained, corpus, tmp_path, capsys, args, message):
    short = tmp_path / "short.txt"
    short.write_text("x = 1\n")
    args = [a.replace("TOK", str(corpus / "tok" / "tokenizer.json")) for a in args]
    assert main(["eval", "perplexity", str(trained), "--text", str(short), *args, "--device", "cpu"]) == 2
    assert re.search(message, capsys.readouterr().err)
