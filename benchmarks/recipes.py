"""The product path, measured: shipped recipes through `mixattn train`'s
real path beside the bare step of the same model, in one call (GPU).

    python benchmarks/recipes.py yamls/pretrain/standard-350m.yaml yamls/pretrain/ma-350m.yaml \\
        yamls/long_context/extend-32k.yaml:model.plan=standard yamls/long_context/extend-32k.yaml

A recipe may carry overrides after a colon (``RECIPE:key=value,key=value``).
For each recipe:
  trainer  ``composer -n 1`` on benchmarks/train_scaling.py's worker: the
           recipe as shipped (Composer's Trainer, mixattn's assembly,
           StreamingDataset over MDS shards written here from the stdlib
           (``--corpus``: its modules as documents below 16K tokens, its
           packages as long documents from 16K up), checkpoints saved to a
           temporary folder at the recipe's save_interval, its doc_mask, activation_checkpointing auto, compile)
           with one microbatch of the recipe per optimizer step (the global
           batch is microbatch x GPUs, as benchmarks/train_scaling.py runs it);
  bare     benchmarks/train_throughput.py's step for the same model, batch and
           backend (fused AdamW, the whole model compiled, no documents).
ms_per_step is the median of the timed steps; p90_over_p50 their spread;
mfu counts the plan's real FLOPs (MixAttentionLM.flops_per_sequence) over
989 TFLOP/s; mfu_llm_foundry the same time under llm-foundry's MPT count
(all parameters, full T x T attention in every layer), the formula of its
published MFU tables. Prints a table; writes benchmarks/results/NAME.json (rows:
recipe, path, plan, seq_len, doc_mask, activation_checkpointing, backend,
ms_per_step, p90_over_p50, tokens_per_s, mfu, peak_mem_gib).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from train_scaling import CORPORA, recipe_microbatch  # noqa: E402

_MICRO: dict[str, int] = {}


def microbatch_of(recipe: str, overrides: list[str], cfg) -> int:
    """The recipe's microbatch (``auto`` resolved once per recipe argument,
    so its Trainer and bare rows run the same one)."""
    key = recipe + ":" + ",".join(overrides)
    if key not in _MICRO:
        _MICRO[key] = recipe_microbatch(cfg)
    return _MICRO[key]


def spread(ms: list[float]) -> tuple[float, float]:
    """(median, p90 / p50) of step times."""
    ordered = sorted(ms)
    p50 = statistics.median(ordered)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return p50, p90 / p50


def parse_recipe_arg(arg: str) -> tuple[str, list[str]]:
    path, _, rest = arg.partition(":")
    return path, [o for o in rest.split(",") if o]


def run_trainer(recipe: str, overrides: list[str], work: Path, batches: int, warmup: int,
                corpus: str = "auto") -> tuple[dict, dict | None]:
    """One recipe through ``composer -n 1`` on benchmarks/train_scaling.py's
    worker, one microbatch per optimizer step, on MDS data of ``corpus``.
    Returns (what the row says of the run, the worker's result or None when
    it failed; then the first dict holds the error and the stderr's tail)."""
    from train_scaling import corpus_for, prepare_data

    from mixattn.training.recipe import load_recipe

    cfg = load_recipe(recipe, overrides)
    micro = microbatch_of(recipe, overrides, cfg)
    corpus = corpus_for(corpus, cfg.model.max_seq_len)
    data = prepare_data(work / f"data-{corpus}-{cfg.model.max_seq_len}", cfg.model.max_seq_len, corpus)
    result = work / "result.json"
    result.unlink(missing_ok=True)
    save = work / "checkpoints" / str(time.time_ns())
    run_overrides = [
        *overrides, f"data.train=[{{local: {data / 'train'}}}]", "data.eval=[]", f"max_duration={batches}ba",
        f"global_train_batch_size={micro}", f"device_train_microbatch_size={micro}",
        f"save_folder={save}", "autoresume=false", "load_path=null", "wandb=null",
        "progress_bar=false", "console_log_interval=1000ba",
    ]
    cmd = [sys.executable, "-m", "composer.cli.launcher", "-n", "1", str(HERE / "train_scaling.py"), "--worker",
           "--result", str(result), "--recipe", recipe, "--warmup", str(warmup), "--trace", "0", *run_overrides]
    try:
        proc = subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True)
    finally:  # the run's checkpoints were written to be timed, not kept: 1B ones are 15 GiB each
        shutil.rmtree(save, ignore_errors=True)
    base = {"recipe": recipe + (":" + ",".join(overrides) if overrides else ""), "path": "trainer", "plan": str(cfg.model.plan),
            "seq_len": cfg.model.max_seq_len, "doc_mask": cfg.data.doc_mask, "backend": cfg.model.attn_backend,
            "fp32_residual": cfg.model.fp32_residual, "batch": micro, "microbatch_setting": cfg.device_train_microbatch_size,
            "corpus": corpus}
    if proc.returncode or not result.is_file():
        print(proc.stdout[-2000:], proc.stderr[-4000:], sep="\n", file=sys.stderr)
        return {**base, "error": f"exit {proc.returncode}", "stderr_tail": proc.stderr[-1500:]}, None
    return base, json.loads(result.read_text())


def trainer_row(recipe: str, overrides: list[str], work: Path, batches: int, warmup: int, corpus: str = "auto") -> dict:
    base, r = run_trainer(recipe, overrides, work, batches, warmup, corpus)
    if r is None:
        return base
    timed = r["step_ms"][warmup:]
    p50, p90_50 = spread(timed)
    resolved = r.get("resolved") or {}
    return {**base, "activation_checkpointing": resolved.get("activation_checkpointing"),
            "checkpointed_blocks": resolved.get("checkpointed_blocks"), "fsdp": resolved.get("fsdp"),
            "num_workers": resolved.get("num_workers"), "save_interval": r.get("save_interval"), "ms_per_step": p50, "p90_over_p50": p90_50,
            "tokens_per_s": base["batch"] * base["seq_len"] / (p50 / 1e3), "flops_per_step": r["flops_per_step"],
            "peak_mem_gib": r["peak_mem_gib"], "step_ms": timed}


def foundry_flops_per_step(recipe: str, overrides: list[str]) -> float:
    """One microbatch's FLOPs by llm-foundry's MPT count (train_throughput.llm_foundry_flops_per_sequence:
    all parameters, every layer's attention full T x T), for its published MFU tables."""
    import torch
    from train_throughput import llm_foundry_flops_per_sequence

    from mixattn.model import MixAttentionLM
    from mixattn.training.recipe import load_recipe

    cfg = load_recipe(recipe, overrides)
    with torch.device("meta"):
        model = MixAttentionLM(cfg.model)
    micro = microbatch_of(recipe, overrides, cfg)
    return micro * llm_foundry_flops_per_sequence(model, cfg.model.max_seq_len)


def bare_row(recipe: str, overrides: list[str], steps: int) -> dict:
    import torch
    from train_throughput import make_model_step, warm_until_steady

    from mixattn.training.recipe import load_recipe

    cfg = load_recipe(recipe, overrides)
    micro = microbatch_of(recipe, overrides, cfg)
    base = {"recipe": recipe + (":" + ",".join(overrides) if overrides else ""), "path": "bare", "plan": str(cfg.model.plan),
            "seq_len": cfg.model.max_seq_len, "doc_mask": False, "activation_checkpointing": "none",
            "backend": cfg.model.attn_backend, "fp32_residual": cfg.model.fp32_residual, "batch": micro,
            "microbatch_setting": cfg.device_train_microbatch_size}
    try:
        torch.cuda.reset_peak_memory_stats()
        step, info = make_model_step(cfg.model, micro)
        for _ in range(3):
            step()
        warm_until_steady(step)
        times = []
        for _ in range(steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    except Exception as e:  # out of memory, a compile failure: recorded, not hidden
        return {**base, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    finally:
        step = None
        torch.cuda.empty_cache()
    p50, p90_50 = spread(times)
    return {**base, "ms_per_step": p50, "p90_over_p50": p90_50, "tokens_per_s": micro * cfg.model.max_seq_len / (p50 / 1e3),
            "flops_per_step": info["flops_per_step"], "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
            "step_ms": times}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="+", metavar="RECIPE[:key=value,...]")
    parser.add_argument("--batches", type=int, default=16, help="Trainer batches per recipe (the first --warmup untimed)")
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--bare-steps", type=int, default=10)
    parser.add_argument("--paths", nargs="+", default=["trainer", "bare"], choices=["trainer", "bare"])
    parser.add_argument("--corpus", default="auto", choices=["auto", *CORPORA],
                        help="the Trainer's text: the stdlib's modules one document each (files), its packages one long "
                             "document each (packages), or auto: files below 16K tokens, packages from 16K")
    parser.add_argument("--workdir", default=None, help="data and checkpoints (default: a temporary directory)")
    parser.add_argument("--name", default="recipes")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from common import prepare_gpu, write_result
    from train_throughput import peak_flops

    if not prepare_gpu("benchmarks/recipes.py", recompile_limit=64):
        return 2
    work = Path(args.workdir or tempfile.mkdtemp(prefix="mixattn-recipes-"))
    rows = []
    for arg in args.recipes:
        recipe, overrides = parse_recipe_arg(arg)
        for path in args.paths:
            row = (trainer_row(recipe, overrides, work, args.batches, args.warmup, args.corpus) if path == "trainer"
                   else bare_row(recipe, overrides, args.bare_steps))
            if "ms_per_step" in row:
                row["mfu"] = row["flops_per_step"] / (row["ms_per_step"] / 1e3) / peak_flops()
                row["mfu_llm_foundry"] = (foundry_flops_per_step(recipe, overrides) / (row["ms_per_step"] / 1e3)
                                          / peak_flops())
            rows.append(row)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "step_ms"}, flush=True)
            write_result(args.name, {"config": vars(args), "rows": rows, "complete": False}, args.out, topic="recipes")  # what a timeout leaves
    from tabulate import tabulate

    print()
    print(tabulate([(r["recipe"], r["path"], r["plan"], r["seq_len"], r.get("corpus", "-"), r["doc_mask"],
                     r.get("activation_checkpointing", "-"),
                     f"{r['ms_per_step']:.1f}" if "ms_per_step" in r else r.get("error"),
                     f"{r['p90_over_p50']:.3f}" if "p90_over_p50" in r else "-",
                     f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else "-", f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-",
                     f"{100 * r['mfu_llm_foundry']:.1f}%" if "mfu_llm_foundry" in r else "-",
                     f"{r['peak_mem_gib']:.1f}" if r.get("peak_mem_gib") else "-") for r in rows],
                   headers=["recipe", "path", "plan", "T", "corpus", "doc_mask", "act. ckpt", "ms/step", "p90/p50", "tokens/s", "MFU",
                            "MFU (foundry)", "peak GiB"]))
    path = write_result(args.name, {"config": vars(args), "rows": rows, "complete": True}, args.out, topic="recipes")
    print(f"\nwrote {path}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
