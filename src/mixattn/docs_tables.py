"""The documentation's preset tables, generated from the presets
(``scripts/docs_tables.py`` writes them; a test fails when one is stale).

A doc holds each table between a ``<!-- generated: NAME -->`` line and an
``<!-- end generated -->`` line; everything else in the doc is prose."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from mixattn.plan import format_bytes, preset_rows

DIMS = "24 layers, 16 KV heads of 128, bf16, W = 1024, one sequence of 32,768 tokens"


def layer_plans_table() -> str:
    lines = [f"({DIMS}; `mixattn plan NAME --n-layers 24 --context 32768`)", "",
             "| preset | paper name | layout at 24 layers (layer 0 first) | KV owners | KV cache | vs standard |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in preset_rows():
        versus = "–" if r["preset"] == "standard" else f"{r['reduction']:.1f}x smaller"
        lines.append(f"| `{r['preset']}` | {r['paper_name'] or '–'} | `{r['layout']}` | {r['kv_owners']} | "
                     f"{format_bytes(r['kv_bytes'])} | {versus} |")
    return "\n".join(lines)


def recipes_table(root: Path) -> str:
    stems = {}
    for path in sorted((root / "yamls" / "pretrain").glob("*-350m.yaml")):
        plan = yaml.safe_load(path.read_text())["model"]["plan"]
        stems[plan] = path.name.removesuffix("350m.yaml")
    lines = [f"({DIMS})", "",
             "| plan | file stem | layout at 24 layers (layer 0 first) | KV reduction vs standard |",
             "| --- | --- | --- | --- |"]
    for r in preset_rows():
        if r["preset"] in stems:
            lines.append(f"| `{r['preset']}` ({r['paper_name'] or 'not in the paper'}) | `{stems[r['preset']]}` | "
                         f"`{r['layout']}` | {r['reduction']:.1f}x |")
    return "\n".join(lines)


BLOCK = re.compile(r"(<!-- generated: (\S+) -->\n)(.*?)(<!-- end generated -->)", re.S)


def update_docs(root: Path, check: bool = False) -> list[Path]:
    """Rewrite every generated table under docs/ (``check``: only report);
    returns the docs whose tables were stale."""
    tables = {"layer-plans": layer_plans_table, "recipes": lambda: recipes_table(root)}
    stale = []
    for doc in sorted((root / "docs").glob("*.md")):
        text = doc.read_text()
        new = BLOCK.sub(lambda m: m.group(1) + tables[m.group(2)]() + "\n" + m.group(4), text)
        if new != text:
            stale.append(doc)
            if not check:
                doc.write_text(new)
    return stale
