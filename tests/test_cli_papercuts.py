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
    from mixattn.training.recipe import load_recipe

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
    from mixattn.training.recipe import load_recipe

    with pytest.raises(ConfigError) as e:
        load_recipe(RECIPE, [override])
    msg = str(e.value)
    assert key in msg and "100ba" in msg and "2ep" in msg and "1000000tok" in msg


def test_a_used_save_folder_gets_advice_that_works(corpus, tmp_path):
    from mixattn.config import ConfigError
    from mixattn.training.trainer import build_trainer
    from test_train import _cfg

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "ep0-ba4-rank0.pt").write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"already holds checkpoints of a run \(ep0-ba4-rank0.pt\); set autoresume=true") as e:
        build_trainer(_cfg(corpus, tmp_path, "max_duration=1ba", f"save_folder={folder}"))
    assert "overwrite" not in str(e.value) and ".." not in str(e.value)


def test_a_failed_train_leaves_no_save_folder_behind(corpus, tmp_path):
    from mixattn.training.trainer import build_trainer
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
    # the checkpoint records the data's tokenizer and generate takes the save folder: nothing else to name
    assert f"mixattn: generate: mixattn generate {tmp_path / 'ckpt'} --prompt" in out and "--tokenizer" not in out
    _fit(_cfg(corpus, tmp_path, "max_duration=6ba", "eval_interval=2ba", "autoresume=true"))
    assert re.search(r"mixattn: resumed at batch 4 \([\d,]+ tokens\) from .*ep0-ba4-rank0.pt", capfd.readouterr().out)


def _train_argv(corpus, tmp_path, *extra):
    return ["train", RECIPE, f"data.train=[{{local: {corpus / 'mds64' / 'train'}}}]", f"data.eval=[{{local: {corpus / 'mds64' / 'val'}}}]",
            "model.vocab_size=512", "model.d_model=64", "model.n_layers=4", "model.n_heads=4", "model.max_seq_len=64",
            "model.window=16", "model.plan=ma", "global_train_batch_size=8", "max_duration=3ba", "progress_bar=false",
            f"save_folder={tmp_path / 'ckpt'}", *extra]


def test_train_keys_lists_every_recipe_key_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "mixattn train --keys" in capsys.readouterr().out
    assert main(["train", "--keys"]) == 0
    rows = {line.split()[0]: line.split()[-1] for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows["max_duration"] == "'100ba'" and rows["model.window"] == "1024" and rows["optimizer.lr"] == "0.0006"
    assert rows["activation_checkpointing"] == "'auto'" and rows["data.doc_mask"] == "True" and "wandb.mode" in rows
    from mixattn.training.recipe import TrainConfig

    assert {k.split(".")[0] for k in rows} == {f for f in TrainConfig.__dataclass_fields__}
    assert main(["train"]) == 2
    assert "a RECIPE is needed" in capsys.readouterr().err


def test_train_print_config_shows_the_resolved_recipe_and_exits(corpus, tmp_path, capsys):
    import yaml

    assert main([*_train_argv(corpus, tmp_path, "optimizer.lr=0.002"), "--print-config"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["optimizer"]["lr"] == 0.002 and shown["max_duration"] == "3ba" and shown["model"]["window"] == 16
    assert shown["scheduler"]["alpha_f"] == 0.1  # defaults the file does not set are shown too
    assert not (tmp_path / "ckpt").exists()
    assert main([*_train_argv(corpus, tmp_path, "optimizer.lrr=1"), "--print-config"]) == 2
    assert "command line: unknown key 'optimizer.lrr'" in capsys.readouterr().err


def test_train_dry_run_builds_everything_reads_a_batch_and_writes_nothing(corpus, tmp_path, capsys):
    assert main([*_train_argv(corpus, tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"dry run: model [\d,]+ parameters \([\d,]+ trainable\), plan 'G S s g'; first batch \(8, 64\) with token ids "
                     r"in \[\d+, \d+\]; would train for 3ba", out)
    assert not (tmp_path / "ckpt").exists()
    assert main([*_train_argv(corpus, tmp_path, "model.vocab_size=100"), "--dry-run"]) == 2  # data the model cannot embed
    assert "model.vocab_size" in capsys.readouterr().err


def _inside(fig, artist):
    fig.canvas.draw()
    box, page = artist.get_window_extent(), fig.bbox
    return box.x0 >= page.x0 - 1 and box.x1 <= page.x1 + 1 and box.y0 >= page.y0 - 1 and box.y1 <= page.y1 + 1


def test_a_retrieval_heatmap_names_model_and_tasks_and_keeps_its_title_inside():
    from mixattn.evaluate import model_label, retrieval_figure

    model = MixAttentionLM(ModelConfig(vocab_size=64, d_model=32, n_layers=24, n_heads=2, max_seq_len=256, plan="ma_offset", window=8))
    assert model_label(model, "runs/long-ma/checkpoints") == "long-ma (ma_offset, 24 layers)"
    hand = MixAttentionLM(ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=2, max_seq_len=256, plan="G g S", window=8))
    assert model_label(hand, "runs/x/ckpt") == "x ('G g S', 3 layers)"  # no preset: its letters
    title = f"{model_label(model, 'runs/long-ma/checkpoints')}: retrieval accuracy, mean of niah_single, niah_multikey, variable_tracking"
    table = [{"task": "niah_single", "length": 4096, "depth": d, "accuracy": 0.5, "samples": 4} for d in (0.0, 0.5, 1.0)]
    fig = retrieval_figure(table, title)  # a single length: the narrowest figure
    t = fig.axes[0].title
    assert " ".join(t.get_text().split()) == title and _inside(fig, t)


def test_the_pareto_plot_says_which_way_is_better():
    from mixattn.sweep import pareto_figure

    rows = [{"point": "a", "kv_bytes_per_token": 100.0, "val_loss": 2.0, "retrieval": 0.5},
            {"point": "b", "kv_bytes_per_token": 400.0, "val_loss": 1.9, "retrieval": 0.9}]
    fig = pareto_figure("s", rows)
    loss, retr = fig.axes
    assert loss.get_ylabel() == "val_loss (lower is better)" and retr.get_ylabel() == "retrieval (higher is better)"
    assert "fewer is better" in loss.get_xlabel() and loss.get_title() == "better: down and to the left"
    assert retr.get_title() == "better: up and to the left"
