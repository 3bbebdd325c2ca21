"""Does a default that changes numerics change training? The same recipe
through the real path (benchmarks/recipes.py's Trainer runs: Composer,
StreamingDataset over MDS shards of the stdlib, one microbatch per step)
under several override sets, and the old default again under other seeds as
the yardstick of run-to-run noise, in one call (GPU).

    python benchmarks/loss_curves.py yamls/pretrain/standard-125m.yaml \\
        --variants model.fp32_residual=true model.fp32_residual=false --seeds 17 18 --batches 300

The first variant is the reference and runs under every ``--seeds``; the
others under the first seed, or, with ``--every-seed``, under every seed,
each compared with the reference at its own seed (paired). With
``--shuffle-with-seed`` a seed also sets the data order (``data.shuffle_seed``,
as llm-foundry's recipes tie ``shuffle_seed`` to ``global_seed``), so the
reference's seeds measure the noise of a real rerun, not of the initial
weights alone. Every run uses the same shortened schedule
(``--warmup-batches`` of linear warm-up, then the recipe's decay over
``--batches``) so the curve moves in a short run. For each variant it reports
the mean train loss over the last ``--tail`` batches and the largest gap of
the smoothed curves (an exponential moving average, ``--ema``) to the
reference after the warm-up, beside the same two numbers for the
reference's other seeds. A variant matches when its gaps are within the
seeds' (``matches``). Prints a table; writes benchmarks/results/NAME.json
(losses per batch for every run) and NAME.png.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from train_scaling import CORPORA  # noqa: E402


def ema(values: list[float], alpha: float) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else alpha * acc + (1 - alpha) * v
        out.append(acc)
    return out


def compare(reference: list[float], other: list[float], skip: int, tail: int, alpha: float) -> dict:
    """Gaps of ``other`` to ``reference``: the largest of the smoothed curves
    after ``skip`` batches, and the difference of the last ``tail`` means."""
    n = min(len(reference), len(other))
    a, b = ema(reference[:n], alpha), ema(other[:n], alpha)
    gaps = [abs(x - y) for x, y in zip(a[skip:], b[skip:])]
    return {"max_smoothed_gap": max(gaps) if gaps else None,
            "tail_mean_gap": statistics.fmean(other[n - tail:n]) - statistics.fmean(reference[n - tail:n])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("--variants", nargs="+", required=True, metavar="KEY=VALUE[,KEY=VALUE]",
                        help="override sets; the first is the reference")
    parser.add_argument("--seeds", nargs="+", type=int, default=[17, 18], help="the reference runs under each")
    parser.add_argument("--every-seed", action="store_true",
                        help="run every variant under every seed and compare it with the reference at the same seed")
    parser.add_argument("--shuffle-with-seed", action="store_true",
                        help="data.shuffle_seed follows the seed (the data order changes with it)")
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--warmup-batches", type=int, default=30)
    parser.add_argument("--tail", type=int, default=50)
    parser.add_argument("--ema", type=float, default=0.9)
    parser.add_argument("--corpus", default="files", choices=CORPORA)
    parser.add_argument("--reuse", default=None, metavar="JSON",
                        help="an earlier result of this program for the same recipe and --batches: its finished runs "
                             "(same variant and seed) are taken from it instead of run again")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--name", default="loss_curves")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.tail >= args.batches:
        parser.error(f"--tail {args.tail} must be below --batches {args.batches}")
    from common import prepare_gpu, write_result
    from recipes import run_trainer

    if not prepare_gpu("benchmarks/loss_curves.py", recompile_limit=64):
        return 2
    from mixattn.training.recipe import load_recipe

    recipe_shuffle = load_recipe(args.recipe, []).data.shuffle_seed
    work = Path(args.workdir or tempfile.mkdtemp(prefix="mixattn-loss-"))
    schedule = [f"scheduler.t_warmup={args.warmup_batches}ba"]
    earlier = {}
    if args.reuse:
        import json

        old = json.loads(Path(args.reuse).read_text())
        if old["config"]["recipe"] != args.recipe or old["config"]["batches"] != args.batches:
            parser.error(f"--reuse {args.reuse}: it ran {old['config']['recipe']} for {old['config']['batches']} batches, "
                         f"not {args.recipe} for {args.batches}")
        earlier = {(r["variant"], r["seed"], r.get("shuffle_seed", recipe_shuffle)): r for r in old["runs"] if "loss" in r}
    runs = []
    for i, variant in enumerate(args.variants):
        for seed in (args.seeds if i == 0 or args.every_seed else args.seeds[:1]):
            shuffle = seed if args.shuffle_with_seed else recipe_shuffle
            if (variant, seed, shuffle) in earlier:  # the same run: same overrides, seed and data order
                runs.append({**earlier[(variant, seed, shuffle)], "shuffle_seed": shuffle, "reused_from": args.reuse})
                continue
            overrides = [o for o in variant.split(",") if o] + schedule + [f"seed={seed}", f"data.shuffle_seed={shuffle}"]
            base, result = run_trainer(args.recipe, overrides, work, args.batches, warmup=1, corpus=args.corpus)
            run = {"variant": variant, "seed": seed, "shuffle_seed": shuffle,
                   **{k: base[k] for k in ("plan", "seq_len", "batch", "corpus", "fp32_residual")}}
            if result is None:
                run["error"] = base["error"]
                print(base.get("stderr_tail", ""), file=sys.stderr)
            else:
                run["loss"] = result["loss"]
                run["ms_per_step"] = statistics.median(result["step_ms"][5:])
            runs.append(run)
            print({k: v for k, v in run.items() if k != "loss"}, flush=True)
            write_result(args.name, {"config": vars(args), "runs": runs, "complete": False}, args.out, topic="training")
    reference = runs[0].get("loss")
    by_seed = {r["seed"]: r.get("loss") for r in runs if r["variant"] == args.variants[0]}
    rows = []
    for run in runs[1:]:
        of_seed = run["variant"] == args.variants[0]
        # a variant against the reference at its own seed where that ran (--every-seed), else the first seed's
        against = reference if of_seed else by_seed.get(run["seed"]) if args.every_seed else reference
        if against is None or "loss" not in run:
            continue
        gap = compare(against, run["loss"], args.warmup_batches, args.tail, args.ema)
        rows.append({"variant": run["variant"], "seed": run["seed"], "of": "seed" if of_seed else "variant",
                     "against_seed": args.seeds[0] if of_seed or not args.every_seed else run["seed"],
                     **gap, "tail_mean": statistics.fmean(run["loss"][-args.tail:])})
    noise = [r for r in rows if r["of"] == "seed"]
    for r in rows:
        if r["of"] == "variant" and noise:
            r["matches"] = (r["max_smoothed_gap"] <= max(n["max_smoothed_gap"] for n in noise)
                            and abs(r["tail_mean_gap"]) <= max(abs(n["tail_mean_gap"]) for n in noise))
    from tabulate import tabulate

    print()
    print(f"reference: {args.variants[0]} seed {args.seeds[0]}, last-{args.tail} mean "
          f"{statistics.fmean(reference[-args.tail:]):.4f}" if reference else "reference run failed")
    print(tabulate([(r["variant"], r["seed"], r["of"], r["against_seed"], f"{r['tail_mean']:.4f}", f"{r['tail_mean_gap']:+.4f}",
                     f"{r['max_smoothed_gap']:.4f}", r.get("matches", "-")) for r in rows],
                   headers=["variant", "seed", "vs reference", "reference seed", f"last-{args.tail} mean", "gap",
                            "max smoothed gap", "matches"]))
    payload = {"config": vars(args), "runs": runs, "rows": rows, "complete": True}
    path = write_result(args.name, payload, args.out, topic="training")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5))
        for run in runs:
            if "loss" in run:
                ax.plot(ema(run["loss"], args.ema), label=f"{run['variant']} (seed {run['seed']})", lw=1.2)
        ax.set_xlabel("batch")
        ax.set_ylabel(f"train loss (EMA {args.ema})")
        ax.set_title(f"{Path(args.recipe).name}: {args.batches} batches of {runs[0]['batch']} x {runs[0]['seq_len']}", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path.with_suffix(".png"), dpi=120)
    except ImportError:
        pass
    print(f"\nwrote {path}")
    ok = all("loss" in r for r in runs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
