"""The first-run demo: a real tokenizer, real MDS data and a small
MixAttention model trained on text that ships with Python (its standard
library's source), then validation perplexity and the KV-cache saving."""

from __future__ import annotations

import os
import sysconfig
import time
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[2] / "yamls" / "pretrain" / "tiny-cpu.yaml"


def stdlib_corpus() -> list[Path]:
    """The top-level modules of the running interpreter's standard library
    (about 5 MB of Python source on CPython 3.11): real text, always offline."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.stat().st_size > 0)
    if not files:
        raise RuntimeError(f"no standard-library sources found under {root}")
    return files


def run_demo(workdir: str | Path = "runs/demo", recipe: str | Path = RECIPE, overrides: list[str] | None = None) -> dict:
    from mixattn.data import convert_to_mds, load_tokenizer, train_tokenizer
    from mixattn.plan import format_bytes, plan_report
    from mixattn.training.recipe import load_recipe
    from mixattn.training.trainer import build_trainer

    work = Path(workdir)
    files = stdlib_corpus()
    tok_path = work / "tokenizer" / "tokenizer.json"
    data_dir = work / "data"
    cfg = load_recipe(recipe, [
        f"data.train=[{{local: {data_dir / 'train'}}}]", f"data.eval=[{{local: {data_dir / 'val'}}}]",
        f"save_folder={work / ('run-' + time.strftime('%Y%m%d-%H%M%S'))}", *(overrides or []),
    ])
    if not tok_path.is_file():
        print(f"[1/4] training a byte-level BPE tokenizer ({cfg.model.vocab_size} tokens) on {len(files)} stdlib files")
        train_tokenizer(files, tok_path.parent, vocab_size=cfg.model.vocab_size)
    else:
        print(f"[1/4] tokenizer: {tok_path} (reused)")
    if not (data_dir / "train" / "index.json").is_file():
        print(f"[2/4] writing MDS shards of {cfg.model.max_seq_len}-token packed sequences to {data_dir}")
        stats = convert_to_mds(files, data_dir, load_tokenizer(tok_path), cfg.model.max_seq_len, val_fraction=0.05)
        print(f"      train: {stats.samples['train']} sequences ({stats.tokens['train']:,} tokens), val: {stats.samples['val']}")
    else:
        print(f"[2/4] data: {data_dir} (reused)")
    print(f"[3/4] training a {cfg.model.n_layers}-layer MixAttention model (plan {cfg.model.layer_plan.to_pattern(cfg.model.window)!r})"
          f" for {cfg.max_duration}")
    trainer = build_trainer(cfg)
    start = time.time()
    trainer.fit()
    minutes = (time.time() - start) / 60
    metrics = {k: float(v.compute()) for k, v in trainer.state.eval_metrics["eval"].items()}
    m = cfg.model
    report = plan_report(m.layer_plan, n_kv_heads=m.n_kv_heads, head_dim=m.head_dim,
                         contexts=[m.max_seq_len, 32768], batch_size=1, dtype="bf16")
    print(f"\n[4/4] done in {minutes:.1f} min. validation loss {metrics['LanguageCrossEntropy']:.3f}, "
          f"perplexity {metrics['LanguagePerplexity']:.1f}, token accuracy {metrics['TokenAccuracy']:.3f}")
    for row in report["contexts"]:
        print(f"      KV cache at {row['context']:>6} tokens: {format_bytes(row['plan_bytes'])} vs "
              f"{format_bytes(row['standard_bytes'])} with standard attention ({row['reduction']:.2f}x smaller)")
    latest = link_latest(work, Path(cfg.save_folder))
    print(f"      checkpoint: {latest / 'latest-rank0.pt'} (this run: {cfg.save_folder})\n      tokenizer:  {tok_path}\n"
          f"      generate:   mixattn generate {latest / 'latest-rank0.pt'} --tokenizer {tok_path} "
          f"--prompt 'def parse(' --max-new-tokens 64\n      serve:      mixattn serve {latest}  (OpenAI API on :8000)")
    return {"metrics": metrics, "kv": report, "minutes": minutes, "latest": latest}


def link_latest(work: Path, run: Path) -> Path:
    """``work/latest``: a symbolic link to the newest run's folder (a stable
    path for the README's commands, whatever the run's timestamp)."""
    link = work / "latest"
    tmp = work / f".latest-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run.resolve(), target_is_directory=True)
    tmp.replace(link)  # atomic: a reader sees the old run or the new one
    return link
