"""The shipped recipes resolve to exactly the values recorded in
tests/data/recipes_resolved.json (issue #20: recipes were rewritten from
copies into a base per size plus the plan; every documented recipe must still
mean what it meant), and ``extends:`` refuses what it cannot do."""

import json
from pathlib import Path

import pytest

from mixattn.config import ConfigError, load_yaml
from mixattn.model import ModelConfig
from mixattn.training.recipe import load_recipe, recipe_to_dict

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("pretrain", "long_context", "finetune", "paper")


def resolved_recipes() -> dict:
    """Every recipe's resolved values, its plan written as its pattern."""
    out = {}
    for folder in FOLDERS:
        for path in sorted((ROOT / "yamls" / folder).glob("*.yaml")):
            d = recipe_to_dict(load_recipe(path))
            d["model"]["plan"] = ModelConfig(**d["model"]).layer_plan.to_pattern()
            out[f"{folder}/{path.name}"] = d
    return out


def test_every_recipe_resolves_to_its_recorded_values():
    recorded = json.loads((ROOT / "tests" / "data" / "recipes_resolved.json").read_text())
    now = json.loads(json.dumps(resolved_recipes()))  # tuples -> lists, as recorded
    assert sorted(now) == sorted(recorded)
    for name in recorded:
        assert now[name] == recorded[name], name


def test_a_base_is_merged_under_the_recipe_and_interpolated_after(tmp_path):
    (tmp_path / "sizes").mkdir()
    (tmp_path / "sizes" / "small.yaml").write_text(
        "run_name: small\nsave_folder: runs/${run_name}/checkpoints\nmodel: {d_model: 32, n_layers: 2, plan: standard}\n"
        "data: {train: [{local: a}, {local: b}]}\n")
    (tmp_path / "r.yaml").write_text("extends: sizes/small.yaml\nrun_name: ma-small\nmodel: {plan: ma}\ndata: {train: [{local: c}]}\n")
    data = load_yaml(tmp_path / "r.yaml")
    assert data["run_name"] == "ma-small" and data["save_folder"] == "runs/ma-small/checkpoints"  # the child's run_name
    assert data["model"] == {"d_model": 32, "n_layers": 2, "plan": "ma"}  # mappings merge key by key
    assert data["data"]["train"] == [{"local": "c"}]  # lists are replaced, not appended
    assert "extends" not in data
    assert load_yaml(tmp_path / "r.yaml", ["run_name=x"])["save_folder"] == "runs/x/checkpoints"  # overrides last


def test_bad_bases_are_named(tmp_path):
    (tmp_path / "r.yaml").write_text("extends: nowhere.yaml\nmodel: {}\n")
    with pytest.raises(ConfigError, match=r"r.yaml: extends 'nowhere.yaml', which does not exist \(looked for .*nowhere.yaml\)"):
        load_yaml(tmp_path / "r.yaml")
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match=r"b.yaml: extends 'a.yaml', which makes a loop: \S*a.yaml -> \S*b.yaml -> \S*a.yaml$"):
        load_yaml(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: [x.yaml]\n")
    with pytest.raises(ConfigError, match=r"c.yaml: extends must be the path of one YAML file"):
        load_yaml(tmp_path / "c.yaml")
