"""mixattn sweep: a spec expands into the right resolved recipes, bad specs are
refused naming the key or point, and a small sweep run end to end is collected
from the real run outputs into the table and the Pareto plot."""

import csv
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mixattn.config import ConfigError
from mixattn.plan import kv_cache_bytes
from mixattn.sweep import collect, expand, load_spec, pareto
from mixattn.training.recipe import load_recipe, recipe_to_dict

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.vocab_size=512", "model.d_model=32", "model.n_layers=4", "model.n_heads=4", "model.max_seq_len=256", "model.window=16",
        "model.attn_backend=sdpa", "global_train_batch_size=8", "device_eval_batch_size=8", "progress_bar=false",
        "eval_interval=1000ba", "scheduler.t_warmup=1ba", "save_interval=2ba", "max_duration=2ba"]


def _spec(tmp_path, corpus=None, **extra) -> Path:
    data = corpus / "mds64" if corpus else Path("unused")
    spec = {"name": "t", "base": str(ROOT / "yamls/pretrain/tiny-cpu.yaml"), "out": str(tmp_path / "sweep"),
            "grid": {"model.plan": ["standard", "all_sliding"], "model.window": [8, 16]},
            "overrides": [*TINY, f"data.train=[{{local: {data / 'train'}}}]", f"data.eval=[{{local: {data / 'val'}}}]"],
            "kv_context": 64, **extra}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_spec_expands_into_one_resolved_recipe_per_point(tmp_path):
    spec = load_spec(_spec(tmp_path))
    points = expand(spec)
    assert [p.name for p in points] == ["plan-standard_window-8", "plan-standard_window-16",
                                        "plan-all_sliding_window-8", "plan-all_sliding_window-16"]
    for p in points:
        assert p.recipe.model.window == p.values["model.window"]
        assert p.recipe.model.layer_plan.to_list() == load_recipe(ROOT / "yamls/pretrain/tiny-cpu.yaml", [
            *TINY, f"model.plan={p.values['model.plan']}", f"model.window={p.values['model.window']}"]).model.layer_plan.to_list()
        assert p.recipe.max_duration == "2ba" and p.recipe.model.d_model == 32  # the spec's overrides
        assert p.recipe.run_name == f"t-{p.name}" and p.recipe.save_folder == str(p.dir / "checkpoints")
    from mixattn.sweep import write

    manifest = json.loads(write(spec, points).read_text())
    assert [m["name"] for m in manifest["points"]] == [p.name for p in points]
    for p in points:  # the written recipe is the resolved one, loadable as it is
        assert recipe_to_dict(load_recipe(p.recipe_path)) == recipe_to_dict(p.recipe)


@pytest.mark.parametrize("extra,message", [
    ({"grid": {}}, "grid is empty"),
    ({"grid": {"model.plan": []}}, r"grid.model.plan must be a non-empty list"),
    ({"grid": {"model.plan": ["ma", "ma"]}}, "grid.model.plan repeats a value"),
    ({"grid": {"model.plan": [["G", "S"]]}}, "grid values are single strings or numbers"),
    ({"gird": {"model.plan": ["ma"]}}, r"unknown key\(s\) sweep.gird; valid keys of sweep: .*grid"),
    ({"eval": {"bleu": {}}}, r"unknown eval\(s\) \['bleu'\]; valid: perplexity, retrieval"),
    ({"eval": {"perplexity": {"dataset": "x"}}}, r"unknown key\(s\) eval.perplexity.dataset; valid keys of eval.perplexity: batch_size, data, max_batches"),
])
def test_bad_specs_are_refused_naming_the_key(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        load_spec(_spec(tmp_path, **extra))


@pytest.mark.parametrize("grid,message", [
    ({"model.plan": ["ma", "ma_pairs"]}, r"point plan-ma_pairs \(model.plan=ma_pairs\): .*needs at least 7 layers"),
    ({"model.windw": [8]}, r"point windw-8 \(model.windw=8\): .*unknown .*model.windw|windw"),
    ({"model.window": [8, 1000]}, r"point window-1000 \(model.window=1000\)"),
])
def test_bad_points_are_refused_before_anything_is_written(tmp_path, grid, message):
    spec = load_spec(_spec(tmp_path, grid=grid))
    with pytest.raises(ConfigError, match=message):
        expand(spec)
    assert not (tmp_path / "sweep").exists()


def test_pareto_front():
    rows = [{"point": "a", "kv_bytes_per_token": 10, "val_loss": 3.0}, {"point": "b", "kv_bytes_per_token": 100, "val_loss": 2.5},
            {"point": "c", "kv_bytes_per_token": 100, "val_loss": 2.9}, {"point": "d", "kv_bytes_per_token": 5, "val_loss": 3.5},
            {"point": "e", "kv_bytes_per_token": 10, "val_loss": 3.0}]
    assert pareto(rows, "val_loss", higher_is_better=False) == {"a", "b", "d", "e"}  # c is beaten by b; ties both stay


def test_small_sweep_runs_and_collects_real_results(tmp_path, corpus):
    tok = corpus / "tok" / "tokenizer.json"
    path = _spec(tmp_path, corpus, grid={"model.plan": ["standard", "all_sliding"]},
                 eval={"perplexity": {"data": str(corpus / "mds64" / "val"), "max_batches": 2},
                       "retrieval": {"tokenizer": str(tok), "lengths": [200], "tasks": ["niah_single"], "depths": [0.5], "samples": 2,
                                     "max_new_tokens": 8}})
    cmd = [sys.executable, "-m", "mixattn.cli", "sweep", str(path), "--run"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = tmp_path / "sweep"
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["point"] for r in rows] == ["plan-standard", "plan-all_sliding"]
    spec = load_spec(path)
    for r, p in zip(rows, expand(spec)):
        ppl = json.loads((p.dir / "eval" / "perplexity.json").read_text())["rows"][-1]
        assert ppl["positions"] == "all" and float(r["val_loss"]) == pytest.approx(ppl["loss"], rel=1e-9)
        table = json.loads((p.dir / "eval" / "retrieval.json").read_text())["table"]
        assert float(r["retrieval"]) == pytest.approx(sum(t["accuracy"] for t in table) / len(table))
        m = p.recipe.model
        assert float(r["kv_bytes_per_token"]) == kv_cache_bytes(m.layer_plan, n_kv_heads=m.n_kv_heads, head_dim=m.head_dim,
                                                                 context_len=64, batch_size=1, dtype="bf16") / 64
        assert r["status"] == "ok"
    assert float(rows[0]["kv_bytes_per_token"]) == 4 * float(rows[1]["kv_bytes_per_token"])  # W=16 of the 64-token kv_context
    assert (out / "pareto.png").stat().st_size > 0 and "| point" in (out / "results.md").read_text()
    md_header = next(line for line in (out / "results.md").read_text().splitlines() if line.startswith("| point"))
    console_header = next(line for line in res.stdout.splitlines() if line.split()[:1] == ["point"])
    assert [c.strip() for c in md_header.strip("|").split("|")] == console_header.split()  # the console shows results.md's columns
    assert console_header.split()[-1] == "pareto" and "val_loss" in console_header
    # run again: every point has its results, nothing is retrained
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.count("results present, skipped") == 2, res.stdout[-2000:]
    # a point whose results are gone is reported missing, not dropped
    (expand(spec)[1].dir / "eval" / "retrieval.json").unlink()
    rows = collect(spec, expand(spec))
    assert rows[1]["status"] == "missing retrieval" and "retrieval" not in rows[1] and rows[0]["status"] == "ok"


def test_every_shipped_sweep_spec_expands(tmp_path):
    specs = sorted((ROOT / "yamls" / "sweeps").glob("*.yaml"))
    assert specs
    for path in specs:
        spec = load_spec(path, [f"out={tmp_path / path.stem}"])
        spec.base = str(ROOT / spec.base)
        points = expand(spec)
        assert len(points) == len(list(itertools.product(*spec.grid.values())))
        assert spec.eval, path  # every shipped sweep evaluates its points
