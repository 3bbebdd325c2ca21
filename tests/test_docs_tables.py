"""The preset tables in the docs are generated from the presets
(scripts/docs_tables.py) and must be up to date."""

import subprocess
import sys
from pathlib import Path

from mixattn.docs_tables import layer_plans_table, recipes_table, update_docs
from mixattn.plan import PRESETS

ROOT = Path(__file__).resolve().parents[1]


def test_docs_tables_are_up_to_date():
    assert update_docs(ROOT, check=True) == [], "run: python scripts/docs_tables.py"


def test_tables_hold_every_preset_and_every_recipe_plan():
    table = layer_plans_table()
    for name in PRESETS.names():
        assert f"| `{name}` |" in table
    assert "| `ma_offset` | MA-Offset | `S s S s s G S s S s s g S s S s s g S s S s s g` | 9 | 320.00 MiB | 19.2x smaller |" in table
    recipes = recipes_table(ROOT)
    assert recipes.count("\n| `") == len(list((ROOT / "yamls" / "pretrain").glob("*-350m.yaml")))


def test_stale_table_is_found_and_rewritten(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "yamls" / "pretrain").mkdir(parents=True)
    (tmp_path / "yamls" / "pretrain" / "ma-350m.yaml").write_text("model: {plan: ma}\n")
    doc = tmp_path / "docs" / "recipes.md"
    doc.write_text("before\n<!-- generated: recipes -->\nold table\n<!-- end generated -->\nafter\n")
    assert update_docs(tmp_path, check=True) == [doc] and "old table" in doc.read_text()
    assert update_docs(tmp_path) == [doc]
    text = doc.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "| `ma` (MA) | `ma-` |" in text
    assert update_docs(tmp_path, check=True) == []
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "docs_tables.py"), "--check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout
