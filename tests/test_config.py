"""YAML -> ModelConfig: the three plan syntaxes from YAML, overrides, errors."""

from pathlib import Path

import pytest

from mixattn.cli import main as cli_main
from mixattn.config import ConfigError
from mixattn.model import load_model_config
from mixattn.plan import LayerPlan

YAMLS = Path(__file__).resolve().parents[1] / "yamls"

BASE = "model:\n  vocab_size: 100\n  d_model: 64\n  n_layers: 13\n  n_heads: 4\n  max_seq_len: 256\n  window: 32\n"


def _write(tmp_path, text, name="m.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_three_plan_syntaxes_in_yaml_agree(tmp_path):
    preset = load_model_config(_write(tmp_path, BASE + "  plan: character_ai\n", "a.yaml"))
    pattern = load_model_config(_write(tmp_path, BASE + "  plan: 'G (S s S s s g)*2'\n", "b.yaml"))
    listed = load_model_config(YAMLS / "models" / "character-ai-13.yaml", ["model.window=32", "model.vocab_size=100"])
    assert preset.layer_plan == pattern.layer_plan == LayerPlan.from_preset("character_ai", 13, 32)
    assert listed.layer_plan == LayerPlan.from_preset("character_ai", 13, 32)


def test_overrides_and_shipped_model_yamls(tmp_path):
    cfg = load_model_config(_write(tmp_path, BASE + "  plan: standard\n"), ["model.plan=all_sliding", "model.window=16"])
    assert cfg.layer_plan == LayerPlan.from_preset("all_sliding", 13, 16)
    for path in sorted((YAMLS / "models").glob("*.yaml")):
        for plan in ("standard", "ma", "ma_offset", "ma_pairs"):
            cfg = load_model_config(path, [f"model.plan={plan}"] if "character" not in path.name else [])
            assert len(cfg.layer_plan) == cfg.n_layers


@pytest.mark.parametrize("text, overrides, message", [
    (BASE + "  plan: standard\n  n_layer: 3\n", [], "m.yaml: unknown key(s) model.n_layer; valid keys of model:"),
    (BASE + "  plan: ma\n", ["model.window=512"], "window 512 is larger than max_seq_len 256"),
    (BASE + "  plan: ma\n  window: 8\n", [], "duplicate key window"),
    (BASE + "  plan: [oops\n", [], "m.yaml"),
    (BASE + "  plan: standard\n", ["model.plan"], "not of the form key=value"),
    (BASE + "  plan: standard\n", ["model.plan=mixed"], "neither a preset"),
    ("- just\n- a list\n", [], "expected a mapping at the top level"),
])
def test_bad_yaml_is_rejected_with_the_file_named(tmp_path, text, overrides, message):
    with pytest.raises((ConfigError, ValueError)) as info:
        load_model_config(_write(tmp_path, text), overrides)
    assert message in str(info.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="'nope.yaml' does not exist"):
        load_model_config("nope.yaml")


def test_plan_cli_with_config(tmp_path, capsys):
    path = _write(tmp_path, BASE + "  plan: character_ai\n")
    assert cli_main(["plan", "--config", str(path), "--context", "256"]) == 0
    assert "5 own a KV cache" in capsys.readouterr().out
    assert cli_main(["plan", "--config", str(path), "plan=ma"]) == 2
    assert "model.KEY=VALUE" in capsys.readouterr().err
