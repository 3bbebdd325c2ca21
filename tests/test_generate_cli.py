"""A trained checkpoint loads weights-only into the model it was trained as,
and `mixattn generate` / `mixattn plan --budget` work from the command line."""

import json
from pathlib import Path

import pytest
import torch

from mixattn.checkpoint import CheckpointError, load_model
from mixattn.cli import main
from mixattn.data import load_tokenizer
from mixattn.generate import generate
from test_train import _cfg, _fit


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    _, weights, _ = _fit(_cfg(corpus, tmp, "max_duration=4ba", "model.plan=ma_offset"))
    return tmp / "ckpt" / "latest-rank0.pt", weights


def test_checkpoint_loads_weights_only_as_the_trained_model(trained):
    path, weights = trained
    model = load_model(path)
    from mixattn.plan import LayerPlan

    assert model.plan == LayerPlan.parse("ma_offset", 4, 16) and model.cfg.window == 16  # the trained config, not a default
    state = model.state_dict()
    for k, v in weights.items():
        assert torch.equal(state[k], v), k


def test_bad_checkpoints_are_named(tmp_path, trained):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope.pt")
    cut = tmp_path / "cut.pt"
    cut.write_bytes(trained[0].read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="checkpoint .*cut.pt' is truncated or not a checkpoint"):
        load_model(cut)
    flipped = tmp_path / "flipped.pt"
    data = bytearray(trained[0].read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside a tensor record: the zip still opens
    flipped.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="flipped.pt' is corrupt: record .* fails its CRC check"):
        load_model(flipped)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="not a mixattn training checkpoint"):
        load_model(other)


def test_generate_cli_matches_the_library(trained, corpus, capsys):
    path, _ = trained
    tok_path = corpus / "tok" / "tokenizer.json"
    assert main(["generate", str(path), "--tokenizer", str(tok_path), "--prompt", "def f(x):", "--max-new-tokens", "12",
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    tok = load_tokenizer(tok_path)
    ids = tok.encode_batch(["def f(x):"])[0]
    expected = generate(load_model(path), [ids], 12, stop_tokens=[tok.eos_id]).tokens[0]
    assert printed == "def f(x):" + tok.decode([t for t in expected if t != tok.eos_id]) + "\n"


def test_generate_cli_with_gemv_prints_the_same_text(trained, corpus, capsys, monkeypatch):
    # on the CPU the GEMV runs in Triton's interpreter (tests only); elsewhere --gemv is refused, naming why
    path, _ = trained
    argv = ["generate", str(path), "--tokenizer", str(corpus / "tok" / "tokenizer.json"), "--prompt", "def f(x):",
            "--max-new-tokens", "6", "--device", "cpu"]
    assert main(argv) == 0
    plain = capsys.readouterr().out
    assert main(argv + ["--gemv"]) == 0
    assert capsys.readouterr().out == plain
    from mixattn import decode_kernel

    monkeypatch.setattr(decode_kernel, "_interpreting", lambda: False)
    assert main(argv + ["--gemv"]) == 2
    assert "--gemv cannot run on cpu: the Triton kernel runs on CUDA GPUs" in capsys.readouterr().err


def test_generate_cli_rejects_a_too_long_prompt(trained, corpus, capsys):
    path, _ = trained
    code = main(["generate", str(path), "--tokenizer", str(corpus / "tok" / "tokenizer.json"), "--prompt", "x = 1\n" * 40,
                 "--max-new-tokens", "10", "--device", "cpu"])
    assert code == 2
    assert "exceeds the model's max_seq_len 64" in capsys.readouterr().err


def test_plan_budget_counts_sequences(capsys):
    from mixattn.memory import decode_memory
    from mixattn.model import ModelConfig
    from mixattn.plan import LayerPlan

    assert main(["plan", "--budget", "80GiB", "--context", "32768", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {r["plan"]: r for r in report["plans"]}
    assert rows["standard"]["kv_bytes_per_sequence"] == 24 * 2 * 16 * 128 * 2 * 32768
    # bf16 weights and RoPE tables; MA's 15 sharing layers have no K/V projections (2 x 2048 x 2048 x 2 bytes each)
    assert rows["standard"]["weight_bytes"] - rows["ma"]["weight_bytes"] == 15 * 2 * 2048 * 2048 * 2
    cfg = ModelConfig(vocab_size=50304, d_model=2048, n_layers=24, n_heads=16, max_seq_len=32768)
    usable = 80 * 2**30 * 0.95
    for name in ("standard", "ma", "ma_pairs"):  # the largest batch whose whole generation fits, and no larger
        r, plan = rows[name], LayerPlan.parse(name, 24, 1024)
        peak = [decode_memory(cfg, plan, batch=b, context=32768, weight_bytes=r["weight_bytes"],
                              kv_bytes=b * r["kv_bytes_per_sequence"], chunk_size=512).peak for b in (r["max_sequences"], r["max_sequences"] + 1)]
        assert peak[0] <= usable < peak[1], name
        assert r["estimate_at_max"]["peak"] == peak[0]
        assert r["estimate_at_max"]["kv"] == r["max_sequences"] * r["kv_bytes_per_sequence"]
    # by hand: 76 GiB less 2.47 of weights leaves 73.5; 12 rows of 6 GiB (72) leave 1.5 for positions and working sets, 13 do not fit
    assert rows["standard"]["max_sequences"] == 12
    assert rows["ma"]["max_sequences"] >= 5 * rows["standard"]["max_sequences"]
    assert main(["plan", "--budget", "80 parsecs", "--context", "32768"]) == 2
    assert "cannot read '80 parsecs' as a memory size" in capsys.readouterr().err


def test_plan_budget_gives_the_batches_that_ran_on_the_gpu(capsys):
    """The planned max batches that benchmarks/decode.py ran in fresh processes
    on an H200 without running out of memory (decode_default.json: 120 GiB,
    32K context plus the generated token, chunks of 512) are what
    `mixattn plan --budget` prints for the same model."""
    ran = json.loads((Path(__file__).resolve().parents[1] / "benchmarks/results/decode/decode_default.json").read_text())
    measured = {r["plan"]: r["batch"] for r in ran["rows"] if r.get("batch_is_plan_max") and "error" not in r}
    assert set(measured) == {"standard", "ma", "ma_offset", "ma_pairs"}
    assert main(["plan", "--budget", "120GiB", "--context", "32769", "--json"]) == 0
    planned = {r["plan"]: r["max_sequences"] for r in json.loads(capsys.readouterr().out)["plans"]}
    assert {name: planned[name] for name in measured} == measured == {"standard": 18, "ma": 350, "ma_offset": 350, "ma_pairs": 194}


def test_plan_budget_too_small_for_the_weights_is_named(capsys):
    assert main(["plan", "--budget", "2GiB", "--context", "32768"]) == 2
    err = capsys.readouterr().err
    assert "weights (2.47 GiB) alone fill the 2.00 GiB budget less its 5% reserve" in err and "Traceback" not in err


def test_the_checkpoint_records_its_tokenizer_and_generate_uses_it(trained, corpus, capsys, tmp_path):
    path, _ = trained
    tok_path = (corpus / "tok" / "tokenizer.json").resolve()
    model = load_model(path)
    assert model.trained_tokenizer == {"path": str(tok_path), "sha256": load_tokenizer(tok_path).fingerprint()}
    argv = ["generate", str(path), "--prompt", "def f(x):", "--max-new-tokens", "8", "--device", "cpu"]
    assert main(argv) == 0
    recorded = capsys.readouterr()
    assert f"tokenizer: {tok_path} (recorded in the checkpoint)" in recorded.err
    assert main(argv + ["--tokenizer", str(tok_path)]) == 0
    given = capsys.readouterr()
    assert given.out == recorded.out and "warning" not in given.err
    from mixattn.data import train_tokenizer
    from mixattn.demo import stdlib_corpus

    other = train_tokenizer(stdlib_corpus()[40:50], tmp_path / "other", vocab_size=300)
    assert main(argv + ["--tokenizer", str(other)]) == 0
    err = capsys.readouterr().err
    assert f"warning: --tokenizer {other} (sha256 " in err and f"is not the tokenizer this model was trained with ({tok_path}" in err


def test_a_checkpoint_without_a_tokenizer_record_asks_for_one(trained, tmp_path, capsys):
    state = torch.load(trained[0], weights_only=False)
    del state["state"]["model"]["_extra_state"]["mixattn_tokenizer"]
    old = tmp_path / "old.pt"
    torch.save(state, old)
    assert main(["generate", str(old), "--prompt", "x", "--device", "cpu"]) == 2
    assert "--tokenizer is needed: this checkpoint records no tokenizer" in capsys.readouterr().err


def test_generate_takes_a_save_folder(trained, capsys, tmp_path):
    path, _ = trained
    argv = ["--prompt", "def f(x):", "--max-new-tokens", "6", "--device", "cpu"]
    assert main(["generate", str(path), *argv]) == 0
    by_file = capsys.readouterr().out
    assert main(["generate", str(path.parent), *argv]) == 0  # the save folder: its latest-rank0.pt
    assert capsys.readouterr().out == by_file
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "ep0-ba4-rank0.pt").write_bytes(path.read_bytes())  # no latest link: the newest file
    assert main(["generate", str(run), *argv]) == 0
    assert capsys.readouterr().out == by_file
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    assert main(["generate", str(empty), *argv]) == 2
    err = capsys.readouterr().err
    assert "is a folder with no checkpoint: no latest-rank0.pt, no ep*-ba*-rank0.pt" in err and "it holds notes.txt" in err
    assert "whose write did not finish" not in err


def test_a_stop_string_of_several_tokens_ends_generation(trained, corpus, capsys):
    path, _ = trained
    tok = load_tokenizer(corpus / "tok" / "tokenizer.json")
    argv = ["generate", str(path), "--prompt", "def f(x):", "--max-new-tokens", "24", "--device", "cpu"]
    assert main(argv) == 0
    free = capsys.readouterr().out[len("def f(x):"):-1]
    stop = next(free[i:i + 3] for i in range(2, len(free) - 3) if len(tok.encode_batch([free[i:i + 3]])[0]) >= 2)
    assert main(argv + ["--stop", stop]) == 0
    assert capsys.readouterr().out == "def f(x):" + free.split(stop, 1)[0] + "\n"
    assert main(argv + ["--stop", ""]) == 2
    assert "--stop[0] is '': a stop string must be a non-empty string" in capsys.readouterr().err


@pytest.mark.parametrize("argv, flag, value", [
    (["plan", "ma", "--context", "0"], "--context", "0"),
    (["plan", "ma", "--context", "4096", "-5"], "--context", "-5"),
    (["plan", "--budget", "80GiB", "--chunk-size", "0"], "--chunk-size", "0"),
    (["plan", "ma", "--n-layers", "zero"], "--n-layers", "zero"),
    (["plan", "ma", "--window", "0"], "--window", "0"),
    (["eval", "perplexity", "x.pt", "--text", "a.txt", "--batch-size", "0"], "--batch-size", "0"),
    (["eval", "perplexity", "x.pt", "--text", "a.txt", "--seq-len", "-1"], "--seq-len", "-1"),
    (["eval", "retrieval", "x.pt", "--lengths", "512", "--samples", "0", "--out", "o"], "--samples", "0"),
    (["eval", "icl", "x.pt", "--tasks", "t.jsonl", "--batch-size", "0"], "--batch-size", "0"),
    (["serve", "x.pt", "--max-context", "0"], "--max-context/--max-model-len", "0"),  # 0 once meant the model's max_seq_len
    (["serve", "x.pt", "--max-model-len", "0"], "--max-context/--max-model-len", "0"),  # vLLM's name for it
])
def test_sizes_that_are_not_positive_are_refused_naming_the_flag(capsys, argv, flag, value):
    with pytest.raises(SystemExit) as e:  # once a division by zero deep in a report, or silently ignored
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {flag}: must be a positive integer, got '{value}'" in err
    assert "Traceback" not in err


def test_eval_icl_refuses_a_negative_shot_count(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "icl", "x.pt", "--tasks", "t.jsonl", "--shots", "-1"])
    assert e.value.code == 2 and "argument --shots: must be an integer >= 0, got '-1'" in capsys.readouterr().err


def test_a_tokenizer_smaller_than_its_byte_alphabet_is_refused(tmp_path, capsys):
    text = tmp_path / "a.txt"
    text.write_text("def f(x):\n    return x\n" * 20)
    assert main(["tokenizer", "train", str(text), "--out", str(tmp_path / "tok"), "--vocab-size", "100"]) == 2
    assert "vocab_size must be at least 257 (256 bytes and EOS), got 100" in capsys.readouterr().err
    assert not (tmp_path / "tok").exists()  # nothing written


def test_serve_refuses_a_port_out_of_range(capsys):
    with pytest.raises(SystemExit) as e:  # once an OverflowError from bind() with a traceback
        main(["serve", "x.pt", "--port", "99999"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --port: must be a port number 0-65535, got '99999'" in err


def test_an_unknown_name_is_printed_as_a_message_not_a_key_repr(trained, capsys, tmp_path):
    """Registries raise KeyError naming the valid names; the CLI prints the
    message itself (str(KeyError) wrapped it in quotes)."""
    path, _ = trained
    assert main(["eval", "retrieval", str(path), "--lengths", "48", "--tasks", "niah_nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "\nmixattn eval: error: unknown retrieval task 'niah_nope'; valid: niah_multikey," in err, err
