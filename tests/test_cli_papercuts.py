"""Issue #19's command-line papercuts, each reproduced as the issue wrote it."""

import re

import pytest

from mixattn.cli import main
from mixattn.generate import GenerationError, generate
from mixattn.model import MixAttentionLM, ModelConfig


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and re.fullmatch(r"mixattn \S+\n", capsys.readouterr().out)


@pytest.mark.parametrize("command, shown", [
    (["data"], "(default: 0.05)"),
    (["generate"], "--max-new-tokens"),
    (["tokenizer", "train"], "(default: 8192)"),
    (["plan"], "(default: 24)"),
])
def test_help_shows_defaults(capsys, command, shown):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    out = capsys.readouterr().out
    assert shown in out and "(default:" in out


def test_eval_help_lists_icl(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "in-context learning tasks (icl)" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "icl" in capsys.readouterr().out


def test_too_many_new_tokens_names_the_largest_that_fits():
    model = MixAttentionLM(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=256, plan="G S", window=8))
    with pytest.raises(GenerationError) as e:
        generate(model, [[1, 2, 3]], max_new_tokens=300)
    assert "max_new_tokens can be at most 253 for this prompt" in str(e.value) and "-44" not in str(e.value)
    with pytest.raises(GenerationError, match="shorten the prompt to at most 56 tokens"):
        generate(model, [[1] * 100], max_new_tokens=200)


def test_plan_without_config_says_which_dims_it_assumed(capsys):
    assert main(["plan", "ma", "--n-layers", "6", "--context", "256"]) == 0
    out = capsys.readouterr().out
    assert "dims (no --config): d_model 2048, n_heads 16, n_kv_heads 16, head_dim 128, window 1024" in out
    assert main(["plan", "ma", "--n-layers", "6", "--context", "256", "--d-model", "128", "--n-heads", "4", "--window", "64"]) == 0
    out = capsys.readouterr().out
    assert "d_model 128, n_heads 4, n_kv_heads 4, head_dim 32, window 64" in out and "192.00 KiB" in out  # the demo's figure


RECIPE = "yamls/pretrain/tiny-cpu.yaml"


def test_unknown_command_line_key_is_blamed_on_the_command_line_with_a_suggestion():
    from mixattn.config import ConfigError
    from mixattn.train import load_recipe

    with pytest.raises(ConfigError, match=r"^command line: unknown key 'max_duratoin' \(in 'max_duratoin=4ba'\); did you mean 'max_duration'\?"):
        load_recipe(RECIPE, ["max_duratoin=4ba"])
    with pytest.raises(ConfigError, match=r"^command line: unknown key 'model.d_modle'.*did you mean 'model.d_model'\?"):
        load_recipe(RECIPE, ["model.d_modle=3"])
    with pytest.raises(ConfigError, match=r"^command line: unknown key 'overwrite' \(in 'overwrite=True'\); valid keys"):
        load_recipe(RECIPE, ["overwrite=True"])
    assert load_recipe(RECIPE, ["fsdp.version=2"]).fsdp == {"version": 2}  # free-form sections are not second-guessed


@pytest.mark.parametrize("override, key", [("max_duration=4xx", "max_duration"), ("save_interval=10bat", "save_interval"),
                                           ("scheduler.t_warmup=2bb", "scheduler.t_warmup")])
def test_bad_duration_names_the_key_and_the_valid_forms(override, key):
    from mixattn.config import ConfigError
    from mixattn.train import load_recipe

    with pytest.raises(ConfigError) as e:
        load_recipe(RECIPE, [override])
    msg = str(e.value)
    assert key in msg and "100ba" in msg and "2ep" in msg and "1000000tok" in msg


def test_a_used_save_folder_gets_advice_that_works(corpus, tmp_path):
    from mixattn.config import ConfigError
    from mixattn.train import build_trainer
    from test_train import _cfg

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "ep0-ba4-rank0.pt").write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"already holds checkpoints of a run \(ep0-ba4-rank0.pt\); set autoresume=true") as e:
        build_trainer(_cfg(corpus, tmp_path, "max_duration=1ba", f"save_folder={folder}"))
    assert "overwrite" not in str(e.value) and ".." not in str(e.value)


def test_a_failed_train_leaves_no_save_folder_behind(corpus, tmp_path):
    from mixattn.train import build_trainer
    from test_train import _cfg

    folder = tmp_path / "runs" / "new" / "ckpt"
    with pytest.raises(ValueError, match="missing.pt"):  # a wrong checkpoint
        build_trainer(_cfg(corpus, tmp_path, "max_duration=1ba", f"save_folder={folder}", f"load_path={tmp_path / 'missing.pt'}"))
    assert not (tmp_path / "runs").exists()
    from mixattn.data import DataError

    with pytest.raises(DataError, match="does not exist"):  # a bad shard folder
        build_trainer(_cfg(corpus, tmp_path, "max_duration=1ba", f"save_folder={folder}",
                           f"data.train=[{{local: {tmp_path / 'no-data'}}}]"))
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("pattern, shown", [("G S:-5", "'-5'"), ("G S:0", "'0'"), ("G S:abc s", "'abc'"), ("G S:", "(missing)")])
def test_a_bad_window_in_a_pattern_is_named_with_its_position(pattern, shown):
    from mixattn.plan import LayerPlan, PlanError

    with pytest.raises(PlanError) as e:
        LayerPlan.parse(pattern, 2)
    assert shown in str(e.value) and "at character 3" in str(e.value) and "positive number of tokens" in str(e.value)


def test_the_demo_keeps_a_stable_latest_link(tmp_path):
    from mixattn.demo import link_latest

    first, second = tmp_path / "run-1", tmp_path / "run-2"
    first.mkdir()
    second.mkdir()
    (second / "latest-rank0.pt").write_bytes(b"x")
    assert link_latest(tmp_path, first).resolve() == first.resolve()
    link = link_latest(tmp_path, second)
    assert link == tmp_path / "latest" and (link / "latest-rank0.pt").read_bytes() == b"x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "run-1", "run-2"]


def test_export_respects_the_umask(tmp_path):
    import os

    from mixattn.hf import export_model
    from mixattn.model import MixAttentionLM, ModelConfig

    model = MixAttentionLM(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=32, plan="G S", window=8))
    old = os.umask(0o022)
    try:
        out = export_model(model, tmp_path / "hf")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert all(f.stat().st_mode & 0o777 == 0o644 for f in out.iterdir() if f.is_file())


def test_a_data_error_starts_its_own_line_after_the_progress_bar(corpus, tmp_path, capfd):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{oops\n')
    assert main(["data", str(bad), "--out", str(tmp_path / "o"), "--tokenizer", str(corpus / "tok"), "--max-seq-len", "64"]) == 2
    err = capfd.readouterr().err
    assert "mixattn data: error:" in err
    assert any(line.startswith("mixattn data: error:") for line in err.splitlines()), err


def test_a_tokenizer_typo_fails_at_once_offline(monkeypatch, tmp_path, capsys):
    import time

    from mixattn.data import DataError, load_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(DataError, match=r"tokenizer 'no_such_tok' is not a file or folder here .* HF_HUB_OFFLINE=1"):
        load_tokenizer("no_such_tok")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: unreachable at once
    with pytest.raises(DataError, match=r"unreachable"):
        load_tokenizer("no_such_tok")
    assert time.monotonic() - start < 10
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither tokenizer.json nor a transformers tokenizer"):
        load_tokenizer(tmp_path / "empty")


def test_training_prints_each_evaluation_and_a_summary_and_says_when_it_resumed(corpus, tmp_path, capfd):
    from test_train import _cfg, _fit

    _fit(_cfg(corpus, tmp_path, "max_duration=4ba", "eval_interval=2ba", "progress_bar=true"))
    out = capfd.readouterr().out
    evals = [line for line in out.splitlines() if line.startswith("mixattn: eval at batch")]
    assert len(evals) >= 2 and re.search(r"eval at batch 2, loss \d+\.\d{4}, perplexity \d+\.\d\d, accuracy 0\.\d{3}, [\d,]+ tokens/s",
                                        evals[0])
    assert re.search(r"mixattn: done: 4 batches, [\d,]+ tokens in [\d.]+ min; final eval: LanguageCrossEntropy", out)
    assert f"mixattn: checkpoint: {(tmp_path / 'ckpt').resolve()}" in out
    assert "mixattn: generate: mixattn generate " in out and "--tokenizer " in out
    _fit(_cfg(corpus, tmp_path, "max_duration=6ba", "eval_interval=2ba", "autoresume=true"))
    assert re.search(r"mixattn: resumed at batch 4 \([\d,]+ tokens\) from .*ep0-ba4-rank0.pt", capfd.readouterr().out)
