"""Layer-configuration sweeps: ``mixattn sweep SPEC.yaml``.

A spec names a base recipe, a grid of recipe keys to vary (presets, windows,
sizes) and the evaluations to run on each point::

    name: plans-125m
    base: yamls/pretrain/standard-125m.yaml
    grid:
      model.plan: [standard, ma, ma_offset, ma_pairs, all_sliding]
      model.window: [512, 1024]
    overrides: [max_duration=2000ba]        # applied to every point
    gpus: 8                                  # > 1: launched with `composer -n GPUS`
    kv_context: 32768                        # KV bytes per token reported at this context
    eval:
      perplexity: {data: data/mds/val, max_batches: 50}
      retrieval: {tokenizer: data/tokenizer.json, lengths: [1024, 2048], samples: 4}

The grid expands to one resolved recipe per point (every point validated
before anything runs), written with the commands that train and evaluate it;
``--run`` runs them one after another (points with results are skipped, so a
sweep resumes), ``--collect`` reads every point's results into a table
(CSV, Markdown) and a Pareto plot of quality against KV bytes per token.
"""

from __future__ import annotations

import csv
import itertools
import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mixattn.config import ConfigError, from_dict, load_yaml
from mixattn.model import ModelConfig
from mixattn.plan import kv_cache_bytes
from mixattn.training.recipe import TrainConfig, load_recipe, recipe_to_dict


@dataclass
class PerplexityEval:
    data: str
    max_batches: int | None = None
    batch_size: int = 8


@dataclass
class RetrievalEval:
    tokenizer: str
    lengths: list[int]
    tasks: list[str] = field(default_factory=lambda: ["niah_single", "niah_multikey", "niah_multivalue", "variable_tracking"])
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    samples: int = 4
    max_new_tokens: int = 32


@dataclass
class SweepSpec:
    name: str
    base: str
    grid: dict[str, list]
    overrides: list[str] = field(default_factory=list)
    out: str | None = None  # default runs/sweeps/NAME
    gpus: int = 1
    kv_context: int | None = None  # default: the base recipe's max_seq_len
    eval: dict = field(default_factory=dict)  # perplexity: PerplexityEval, retrieval: RetrievalEval
    source: str = "<spec>"

    @property
    def out_dir(self) -> Path:
        return Path(self.out or f"runs/sweeps/{self.name}")


@dataclass
class Point:
    name: str
    values: dict  # grid key -> value
    recipe: TrainConfig
    dir: Path

    @property
    def recipe_path(self) -> Path:
        return self.dir / "recipe.yaml"

    @property
    def checkpoint(self) -> Path:
        return self.dir / "checkpoints" / "latest-rank0.pt"

    def result(self, evaluation: str) -> Path:
        """Where ``mixattn eval <evaluation>`` writes this point's JSON."""
        return self.dir / "eval" / f"{evaluation}.json"


EVALS = {"perplexity": PerplexityEval, "retrieval": RetrievalEval}


def load_spec(path: str | Path, overrides=()) -> SweepSpec:
    """Parse and check a sweep spec (not yet its points: see :func:`expand`)."""
    data = load_yaml(path, overrides)
    data.pop("source", None)
    spec = from_dict(SweepSpec, data, "sweep", str(path))
    spec.source = str(path)
    if not isinstance(spec.grid, dict) or not spec.grid:
        raise ConfigError(f"{path}: grid is empty; give at least one recipe key with a list of values, e.g. grid: {{model.plan: [standard, ma]}}")
    for key, values in spec.grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: grid.{key} must be a non-empty list of values, got {values!r}")
        for v in values:
            if not isinstance(v, (str, int, float, bool)):
                raise ConfigError(f"{path}: grid.{key} has {v!r}; grid values are single strings or numbers")
        if len(set(map(str, values))) != len(values):
            raise ConfigError(f"{path}: grid.{key} repeats a value: {values}")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", spec.name):
        raise ConfigError(f"{path}: name {spec.name!r} may use only letters, digits, '_', '.', '-'")
    if spec.gpus < 1:
        raise ConfigError(f"{path}: gpus must be >= 1, got {spec.gpus}")
    unknown = sorted(set(spec.eval) - set(EVALS))
    if unknown:
        raise ConfigError(f"{path}: unknown eval(s) {unknown}; valid: {', '.join(EVALS)}")
    spec.eval = {k: from_dict(EVALS[k], v, f"eval.{k}", str(path)) for k, v in spec.eval.items()}
    return spec


def _slug(value) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", str(value)).strip("_") or "x"


def expand(spec: SweepSpec) -> list[Point]:
    """One resolved, validated recipe per grid point (the grid's product, in
    the spec's order). A bad key or value fails here, naming the point."""
    keys = list(spec.grid)
    points = []
    for combo in itertools.product(*(spec.grid[k] for k in keys)):
        values = dict(zip(keys, combo))
        name = "_".join(f"{k.rsplit('.', 1)[-1]}-{_slug(v)}" for k, v in values.items())
        point_dir = spec.out_dir / "points" / name
        grid_overrides = [f"{k}={v}" for k, v in values.items()]
        fixed = [f"run_name={spec.name}-{name}", f"save_folder={point_dir / 'checkpoints'}"]
        try:
            recipe = load_recipe(spec.base, [*spec.overrides, *grid_overrides, *fixed])
        except ValueError as e:  # ConfigError, PlanError
            raise ConfigError(f"{spec.source}: point {name} ({', '.join(grid_overrides)}): {e}") from None
        points.append(Point(name, values, recipe, point_dir))
    return points


def shell_line(args) -> str:
    """A command as one line a shell runs unchanged (each argument quoted)."""
    return " ".join(shlex.quote(str(a)) for a in args)


def commands(spec: SweepSpec, point: Point) -> list[list[str]]:
    """The commands that train and evaluate one point."""
    train = (["composer", "-n", str(spec.gpus), "scripts/train.py", str(point.recipe_path)] if spec.gpus > 1
             else ["mixattn", "train", str(point.recipe_path)])
    cmds = [train]
    if "perplexity" in spec.eval:
        p = spec.eval["perplexity"]
        cmd = ["mixattn", "eval", "perplexity", str(point.checkpoint), "--data", p.data, "--batch-size", str(p.batch_size),
               "--json", str(point.result("perplexity"))]
        cmds.append(cmd + (["--max-batches", str(p.max_batches)] if p.max_batches else []))
    if "retrieval" in spec.eval:
        r = spec.eval["retrieval"]
        cmds.append(["mixattn", "eval", "retrieval", str(point.checkpoint), "--tokenizer", r.tokenizer,
                     "--lengths", *map(str, r.lengths), "--tasks", *r.tasks, "--depths", *map(str, r.depths),
                     "--samples", str(r.samples), "--max-new-tokens", str(r.max_new_tokens), "--out", str(point.result("retrieval").parent)])
    return cmds


def write(spec: SweepSpec, points: list[Point]) -> Path:
    """Write each point's recipe.yaml and the sweep manifest; returns the manifest path."""
    import yaml

    for p in points:
        p.dir.mkdir(parents=True, exist_ok=True)
        p.result("perplexity").parent.mkdir(exist_ok=True)
        p.recipe_path.write_text(yaml.safe_dump(recipe_to_dict(p.recipe), sort_keys=False))
    manifest = spec.out_dir / "sweep.json"
    manifest.write_text(json.dumps({
        "name": spec.name, "spec": spec.source, "base": spec.base, "grid": spec.grid,
        "points": [{"name": p.name, "values": p.values, "recipe": str(p.recipe_path),
                    "commands": [shell_line(c) for c in commands(spec, p)]} for p in points],
    }, indent=2))
    return manifest


def _resolve(cmd: list[str]) -> list[str]:
    # run mixattn with this interpreter (the console script may not be on PATH)
    if cmd[0] == "mixattn":
        return [sys.executable, "-m", "mixattn.cli", *cmd[1:]]
    return cmd


def run(spec: SweepSpec, points: list[Point], log=print) -> None:
    """Train and evaluate each point in turn; a point whose evaluations are all
    written is skipped (a sweep resumes where it stopped)."""
    for i, p in enumerate(points, 1):
        if _done(spec, p):
            log(f"[{i}/{len(points)}] {p.name}: results present, skipped")
            continue
        for cmd in commands(spec, p):
            log(f"[{i}/{len(points)}] {p.name}: {shell_line(cmd)}")
            res = subprocess.run(_resolve(cmd))
            if res.returncode:
                raise RuntimeError(f"sweep point {p.name} failed (exit {res.returncode}) in: {shell_line(cmd)}")


def _done(spec: SweepSpec, p: Point) -> bool:
    needed = [p.result(k) for k in spec.eval] or [p.checkpoint]
    return all(f.is_file() for f in needed)


def kv_bytes_per_token(model_cfg: ModelConfig, context: int) -> float:
    """bf16 KV-cache bytes per token of one sequence at ``context`` tokens."""
    return kv_cache_bytes(model_cfg.layer_plan, n_kv_heads=model_cfg.n_kv_heads, head_dim=model_cfg.head_dim, context_len=context,
                          batch_size=1, dtype="bf16") / context


def collect(spec: SweepSpec, points: list[Point]) -> list[dict]:
    """One row per point: its grid values, KV bytes per token, validation loss
    and perplexity, retrieval accuracy (overall and per length). A point
    without results gets ``status: missing`` rather than being dropped."""
    context = spec.kv_context or points[0].recipe.model.max_seq_len
    rows = []
    for p in points:
        row = {"point": p.name, **p.values, "kv_context": context, "kv_bytes_per_token": kv_bytes_per_token(p.recipe.model, context),
               "status": "ok"}
        ppl, ret = p.result("perplexity"), p.result("retrieval")
        missing = []
        if "perplexity" in spec.eval:
            if ppl.is_file():
                overall = next(r for r in json.loads(ppl.read_text())["rows"] if r["positions"] == "all")
                row.update(val_loss=overall["loss"], val_perplexity=overall["perplexity"])
            else:
                missing.append("perplexity")
        if "retrieval" in spec.eval:
            if ret.is_file():
                table = json.loads(ret.read_text())["table"]
                total = sum(t["accuracy"] * t["samples"] for t in table) / max(1, sum(t["samples"] for t in table))
                row["retrieval"] = total
                for n in sorted({t["length"] for t in table}):
                    part = [t for t in table if t["length"] == n]
                    row[f"retrieval@{n}"] = sum(t["accuracy"] * t["samples"] for t in part) / sum(t["samples"] for t in part)
            else:
                missing.append("retrieval")
        if missing:
            row["status"] = "missing " + ", ".join(missing)
        rows.append(row)
    return rows


def pareto(rows: list[dict], quality: str, higher_is_better: bool) -> set[str]:
    """Points no other point beats on both KV bytes per token and ``quality``."""
    sign = 1 if higher_is_better else -1
    pts = [(sign * r[quality], -r["kv_bytes_per_token"], r["point"]) for r in rows if quality in r]  # larger is better on both
    return {name for q, kv, name in pts
            if not any(oq >= q and okv >= kv and (oq > q or okv > kv) for oq, okv, _ in pts)}


def _measures(rows: list[dict]) -> list[tuple[str, bool]]:
    """The quality measures present, each with whether higher is better."""
    return [(m, hi) for m, hi in (("val_loss", False), ("retrieval", True)) if any(m in r for r in rows)]


def results_table(rows: list[dict], tablefmt: str = "simple") -> str:
    """The results table: every column of the rows and the Pareto fronts a
    point is on; results.md and the console print this same table."""
    from tabulate import tabulate

    columns = list(dict.fromkeys(k for r in rows for k in r))
    front = {m: pareto(rows, m, hi) for m, hi in _measures(rows)}
    table = [[*(_fmt(r.get(c)) for c in columns), ", ".join(m for m in front if r["point"] in front[m])] for r in rows]
    return tabulate(table, headers=[*columns, "pareto"], tablefmt=tablefmt)


def pareto_figure(name: str, rows: list[dict]):
    """Quality against KV bytes per token, one panel per measure, each saying
    which way is better; the Pareto front drawn as o and joined."""
    measures = _measures(rows)
    front = {m: pareto(rows, m, hi) for m, hi in measures}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(measures), figsize=(5.5 * len(measures), 4), squeeze=False)
    for ax, (m, higher) in zip(axes[0], measures):
        pts = [r for r in rows if m in r]
        for r in pts:
            on = r["point"] in front[m]
            ax.scatter(r["kv_bytes_per_token"], r[m], marker="o" if on else "x", color="C0" if on else "C1")
            ax.annotate(r["point"], (r["kv_bytes_per_token"], r[m]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        line = sorted((r["kv_bytes_per_token"], r[m]) for r in pts if r["point"] in front[m])
        ax.plot([p[0] for p in line], [p[1] for p in line], color="C0", alpha=0.5)
        ax.set_xscale("log")
        ax.set_xlabel("KV-cache bytes per token (bf16, log scale); fewer is better")
        ax.set_ylabel(f"{m} ({'higher' if higher else 'lower'} is better)")
        ax.set_title(f"better: {'up' if higher else 'down'} and to the left", fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(f"sweep {name}: quality vs KV memory (o = Pareto front)")
    fig.tight_layout()
    return fig


def report(spec: SweepSpec, rows: list[dict]) -> list[Path]:
    """results.csv, results.md and pareto.png (one panel per quality measure) in the sweep folder."""
    out = spec.out_dir
    out.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    measures = _measures(rows)
    (out / "results.md").write_text(f"# Sweep {spec.name}\n\nKV bytes per token (bf16) of one sequence at kv_context tokens. "
                                    f"pareto: no other point has both fewer KV bytes and better quality on that measure "
                                    f"(val_loss: lower is better; retrieval: higher is better).\n\n"
                                    + results_table(rows, "github") + "\n")
    written = [out / "results.csv", out / "results.md"]
    if measures:
        import matplotlib.pyplot as plt

        fig = pareto_figure(spec.name, rows)
        fig.savefig(out / "pareto.png", dpi=120)
        plt.close(fig)
        written.append(out / "pareto.png")
    return written


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else v)
