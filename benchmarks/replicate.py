"""A small-scale replication of MixAttention's findings (issue #5).

    python benchmarks/replicate.py --plans standard ma ma_offset ma_pairs all_sliding --name replication

The paper's three stages on its own layouts (issue #17: 24 layers, window/context as the paper's 1024/4K
and 1024/32K):

    python benchmarks/replicate.py --size 24l --short 1024 --long 8192 --window 256 --steps 1600 --long-steps 300 \
        --qa-steps 40 --qa-lr 5e-5 --short-rope-theta 5e5 --long-rope-theta 8e6 --long-trainable attention --seed 17 \
        --plans standard all_sliding ma ma_endslide ma_offset ma_pairs ma_offset_slideshare ma_pairs_slideshare

(one process per plan, on copies of one prepared data folder, in parallel on one GPU: benchmarks/replicate.sh;
a schedule longer than one call: add ``--save-every 200 --reuse-stages`` and run the same command again on the
same machine, which goes on from each stage's last checkpoint)

For each plan, identical otherwise: pretrain a small model at a short context
on real offline text (the interpreter's whole standard library, every .py
file, split by file into train / held-out), continue it at a long context
(RoPE theta raised, weights only, as yamls/long_context/), then evaluate on
held-out files: loss by position bucket at the long context, and RULER-style
retrieval (niah_single, niah_multikey) at several lengths and depths over a
held-out haystack. Everything goes through the real framework: MDS data, the
Composer Trainer (``build_trainer``), ``load_model``, ``mixattn.retrieval``.

At this scale a model learns little retrieval from source code alone, so by
default 30% of the training sequences are synthetic retrieval exercises (the
same generators with other seeds, over the training haystack, answer
included), written whole, 1-4 per sequence, as their own MDS stream mixed by
proportion (a packer would cut most of them from their questions): what is
measured is whether a plan *can* retrieve across its context, which is the
paper's question (all-sliding fails, global layers rescue it), not how well
a tiny model generalizes.

Prepare the data folder once (``--prepare-only``; self-contained: tokenizer,
MDS, held-out files) and run one process per plan on it, in parallel if the
GPU has room.

Writes benchmarks/results/NAME.json (every row with its command) and prints
the tables. ``--merge A.json B.json`` joins runs of different plans into one
table (runs on several machines).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SIZES = {  # d_model, n_layers, n_heads, per-device batch at the short context
    "tiny": (32, 8, 4, 4),
    "20m": (256, 8, 4, 32),
    "50m": (512, 8, 8, 32),
    "40m12": (384, 12, 6, 32),  # 12 layers: deep enough that ma_swa_shared differs from ma
    "125m": (768, 12, 12, 16),
    "24l": (384, 24, 6, 32),  # the paper's depth, narrow (issue #17): the presets are the paper's figures
}
RETRIEVAL_TASKS = ["niah_single", "niah_multikey"]


def corpus_split(limit_files: int | None = None) -> tuple[list[Path], list[Path]]:
    """Every stdlib .py file, shuffled by a fixed seed; 95% train, 5% held out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if p.stat().st_size > 200 and "site-packages" not in p.parts)
    random.Random(0).shuffle(files)
    if limit_files:
        files = files[:limit_files]
    cut = max(1, len(files) // 20)
    return files[cut:], files[:cut]


def exercise_sequences(tokenizer, hay_ids: list[int], seq_len: int, n: int, seed: int):
    """``n`` training sequences of exactly ``seq_len`` tokens, each holding 1, 2
    or 4 whole retrieval exercises (of at least 256 tokens) (prompt, answer, EOS; EOS padding), so no
    exercise is ever cut from its question by packing."""
    from mixattn.retrieval import make_sample

    rng = random.Random(seed)
    eos = tokenizer.eos_id
    for i in range(n):
        parts = rng.choice([p for p in (1, 2, 4) if seq_len // p >= 256] or [1])
        slot = seq_len // parts
        seq: list[int] = []
        for j in range(parts):
            s = make_sample(rng.choice(RETRIEVAL_TASKS), tokenizer, hay_ids, slot - 16, rng.random(), seed * 1_000_003 + 4 * i + j)
            ids = s.prompt_ids + tokenizer.encode_batch([" " + " ".join(s.answers) + "."])[0] + [eos]
            seq += ids[-slot:] + [eos] * (slot - len(ids))
        yield seq + [eos] * (seq_len - len(seq))


def prepare(args, work: Path) -> dict:
    """Tokenizer, code MDS and exercise MDS at both contexts, held-out files
    copied (the data folder is self-contained: prepare it on one machine,
    train on another)."""
    import shutil

    from mixattn.data import convert_to_mds, load_tokenizer, train_tokenizer, write_token_sequences

    data = work / "data"
    meta_path = data / "meta.json"
    if meta_path.is_file():
        return json.loads(meta_path.read_text())
    t0 = time.time()
    train_files, held_files = corpus_split(args.limit_files)
    tok_path = train_tokenizer(train_files[:400], data / "tok", vocab_size=args.vocab)
    tok = load_tokenizer(tok_path)
    held_dir = data / "heldout"
    held_dir.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(held_files):
        shutil.copy(f, held_dir / f"{i:04d}-{f.name}")
    hay_ids = tok.encode_batch(["".join(f.read_text(encoding="utf-8", errors="replace") for f in train_files[:60])])[0]
    for t, steps, batch in ((args.short, args.steps, SIZES[args.size][3]),
                            (args.long, args.long_steps, max(1, SIZES[args.size][3] * args.short // args.long))):
        convert_to_mds(train_files, data / f"code{t}", tok, t, val_fraction=0.0, progress=False)
        n = int(args.retrieval_mix * steps * batch) + 1  # one pass over the exercises
        write_token_sequences(exercise_sequences(tok, hay_ids, t, n, seed=t), data / f"exercises{t}", tok, t)
    if args.qa_steps:  # the paper's stage 3: long-context QA at the long context, loss on the answers
        from mixattn.data import convert_longqa_to_mds

        qa_batch = max(1, SIZES[args.size][3] * args.short // args.long)
        convert_longqa_to_mds(train_files[:60], data / f"qa{args.long}", tok, args.long, samples=args.qa_steps * qa_batch,
                              val_fraction=0.0, seed=args.seed)
    meta = {"tokenizer": str(tok_path.relative_to(work)), "train_files": len(train_files),
            "held_out_files": len(held_files), "corpus_bytes": sum(f.stat().st_size for f in train_files),
            "python": sys.version.split()[0], "prepare_s": round(time.time() - t0, 1)}
    meta_path.write_text(json.dumps(meta, indent=2))
    return meta


def _streams(args, work: Path, t: int) -> str:
    data = work / "data"
    if not args.retrieval_mix:
        return f"data.train=[{{local: {data / f'code{t}' / 'train'}}}]"
    return (f"data.train=[{{local: {data / f'code{t}' / 'train'}, proportion: {1 - args.retrieval_mix}}}, "
            f"{{local: {data / f'exercises{t}' / 'train'}, proportion: {args.retrieval_mix}}}]")


def train_plan(args, work: Path, meta: dict, plan: str) -> Path:
    from mixattn.training.recipe import load_recipe
    from mixattn.training.trainer import build_trainer

    d, layers, heads, batch = SIZES[args.size]
    gpu = args.device == "gpu"
    common = [
        f"model.vocab_size={args.vocab}", f"model.d_model={d}", f"model.n_layers={layers}", f"model.n_heads={heads}",
        f"model.plan={plan}", f"model.window={args.window}", "model.attn_backend=auto", f"device={args.device}",
        f"precision={'amp_bf16' if gpu else 'fp32'}", f"compile={str(gpu and args.compile).lower()}", "progress_bar=false",
        "console_log_interval=50ba", "eval_interval=100000ba", "data.eval=[]", "autoresume=false", f"seed={args.seed}",
    ]
    root = work / "runs" / plan
    stage_s: dict[str, float] = {}
    resumed_from: dict[str, int] = {}  # the batch a resumed stage went on from (0: trained from its start)
    reused: list[str] = []  # stages an earlier call finished (--reuse-stages): their seconds are that call's

    def fit(stage: str, cfg) -> None:
        """One stage through the Trainer. With --reuse-stages a stage that an
        earlier call of the same command finished on this machine is not
        trained again, and one it was cut from (the call's time limit) goes
        on from its last checkpoint (every --save-every batches) with the
        same next batches (Composer's autoresume), so a stage longer than one
        call runs over several."""
        folder = root / stage
        done = folder / "DONE"
        if args.reuse_stages and done.is_file():
            print(f"{plan}: stage {stage}: reusing {folder / 'latest-rank0.pt'}", flush=True)
            record = json.loads(done.read_text())  # the call that finished it: its seconds and where it began
            if "seconds" in record:
                stage_s[stage], resumed_from[stage] = record["seconds"], record["resumed_at_batch"]
                reused.append(stage)
            return
        resume = bool(args.save_every and args.reuse_stages and (folder / "latest-rank0.pt").is_file())
        if resume:
            print(f"{plan}: stage {stage}: resuming from {folder / 'latest-rank0.pt'}", flush=True)
        elif folder.exists():
            shutil.rmtree(folder)  # a stage started afresh leaves nothing of an earlier one behind
        cfg.autoresume = resume
        if args.save_every:
            cfg.save_interval, cfg.save_num_checkpoints_to_keep = f"{args.save_every}ba", 2
        t = time.time()
        trainer = build_trainer(cfg)
        resumed_at = int(trainer.state.timestamp.batch)
        trainer.fit()
        trainer.close()
        stage_s[stage] = round(time.time() - t, 1)
        resumed_from[stage] = resumed_at
        done.write_text(json.dumps({"stage": stage, "resumed_at_batch": resumed_at, "seconds": stage_s[stage]}))

    short = load_recipe(args.recipe, [
        *common, f"model.max_seq_len={args.short}", _streams(args, work, args.short),
        *([f"model.rope_theta={args.short_rope_theta}"] if args.short_rope_theta else []),
        f"global_train_batch_size={batch}", f"max_duration={args.steps}ba", f"save_folder={root / 'short'}",
        f"save_interval={args.steps}ba", f"optimizer.lr={args.lr}", f"scheduler.t_warmup={max(1, args.steps // 20)}ba",
        f"run_name={plan}-short",
    ])
    t0 = time.time()
    fit("short", short)
    # a second compile of the same code in this process at another sequence length would be
    # traced with dynamic shapes (dynamo's automatic dynamic), which inductor 2.11 failed to lower
    # for the block-mask construction ("ShapeAsConstantBuffer has no attribute dtype"); a fresh
    # compile, as a new `mixattn train` process would get
    import torch

    torch._dynamo.reset()
    long_batch = max(1, batch * args.short // args.long)
    long = load_recipe(args.recipe, [
        *common, f"model.max_seq_len={args.long}", f"model.rope_theta={args.long_rope_theta}",
        _streams(args, work, args.long), f"global_train_batch_size={long_batch}",
        f"max_duration={args.long_steps}ba", f"save_folder={root / 'long'}", f"save_interval={args.long_steps}ba",
        f"load_path={root / 'short' / 'latest-rank0.pt'}", "load_weights_only=true", f"optimizer.lr={args.lr / 2}",
        f"scheduler.t_warmup={max(1, args.long_steps // 10)}ba", f"run_name={plan}-long",
        *([f"trainable=[{args.long_trainable}]"] if args.long_trainable else []),
    ])
    fit("long", long)
    final = root / "long" / "latest-rank0.pt"
    args.long_checkpoint = final
    if args.qa_steps:  # stage 3 (the paper's): long-context QA, loss on the answers, attention only
        torch._dynamo.reset()
        qa = load_recipe(args.recipe, [
            *common, f"model.max_seq_len={args.long}", f"model.rope_theta={args.long_rope_theta}",
            f"data.train=[{{local: {work / 'data' / f'qa{args.long}' / 'train'}}}]", f"global_train_batch_size={long_batch}",
            f"max_duration={args.qa_steps}ba", f"save_folder={root / 'qa'}", f"save_interval={args.qa_steps}ba",
            f"load_path={final}", "load_weights_only=true", f"optimizer.lr={args.qa_lr or args.lr / 4}",
            f"scheduler.t_warmup={max(1, args.qa_steps // 10)}ba", f"run_name={plan}-qa", "trainable=[attention]",
        ])
        fit("qa", qa)
        final = root / "qa" / "latest-rank0.pt"
    # the training time of all three stages, an earlier call's included for a stage it finished (a stage
    # resumed from a checkpoint counts from the resume: the cut call's seconds on it are not known here)
    train_s = round(time.time() - t0 + sum(stage_s[s] for s in reused), 1)
    print(f"{plan}: trained in {train_s:.0f} s" + (f" ({', '.join(reused)} in an earlier call)" if reused else ""),
          flush=True)
    args.train_s, args.stage_s, args.resumed_from, args.reused_stages = train_s, stage_s, resumed_from, reused
    return final


def evaluate_plan(args, meta: dict, plan: str, checkpoint: Path) -> dict:
    import torch

    from mixattn.checkpoint import load_model
    from mixattn.data import load_tokenizer
    from mixattn.evaluate import loss_by_position, retrieval_table, text_batches
    from mixattn.plan import kv_cache_bytes
    from mixattn.retrieval import evaluate, make_suite

    t0 = time.time()
    device = "cuda" if args.device == "gpu" else "cpu"
    model = load_model(checkpoint, device=device, dtype=torch.bfloat16 if device == "cuda" else None)
    tok = load_tokenizer(Path(args.workdir) / meta["tokenizer"])
    held = sorted((Path(args.workdir) / "data" / "heldout").iterdir())
    edges = sorted({0, args.window, args.short, args.long // 2})
    ppl = loss_by_position(model, text_batches(held, tok, args.long, 4, args.eval_batches), edges)
    before_qa = None
    if args.qa_steps:  # stage 3 trains on answers only and pulls the model off language modelling: the LM comparison is here
        long_model = load_model(args.long_checkpoint, device=device, dtype=torch.bfloat16 if device == "cuda" else None)
        before_qa = loss_by_position(long_model, text_batches(held, tok, args.long, 4, args.eval_batches), edges)
        del long_model
    haystack = "".join(Path(f).read_text(encoding="utf-8", errors="replace") for f in held)
    lengths = sorted({max(256, args.short // 2), args.short, args.long // 2, args.long - 64})
    suite = make_suite(RETRIEVAL_TASKS, tok, haystack, lengths, [0.0, 0.25, 0.5, 0.75, 1.0], args.samples, seed=1234)
    t = time.time()
    table = retrieval_table(evaluate(model, tok, suite, max_new_tokens=16))
    print(f"{plan}: retrieval suite ({len(suite)} samples) in {time.time() - t:.0f} s", flush=True)
    cfg = model.cfg
    by_length = {}
    for n in lengths:
        cells = [t for t in table if t["length"] == n]
        by_length[str(n)] = sum(t["accuracy"] * t["samples"] for t in cells) / sum(t["samples"] for t in cells)
    return {
        "plan": plan, "seed": args.seed, "checkpoint": str(checkpoint), "params": model.num_params(),
        "kv_bytes_per_token_at_long": kv_cache_bytes(cfg.layer_plan, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                                                     context_len=args.long, batch_size=1, dtype="bf16") / args.long,
        "train_s": getattr(args, "train_s", None), "stage_s": getattr(args, "stage_s", None),
        "resumed_from": getattr(args, "resumed_from", None),
        "reused_stages": getattr(args, "reused_stages", None), "eval_s": round(time.time() - t0, 1),
        "val_loss": ppl[-1]["loss"], "loss_by_position": ppl,
        "val_loss_before_qa": before_qa[-1]["loss"] if before_qa else None, "loss_by_position_before_qa": before_qa,
        "retrieval_by_length": by_length,
        "retrieval": sum(by_length.values()) / len(by_length), "retrieval_table": table,
    }


def print_tables(rows: list[dict]) -> None:
    """One line per row; "vs standard" against the standard row of the same seed (blank where that seed has none),
    and a seed column once the rows come from more than one seed (a merge of several runs)."""
    from tabulate import tabulate

    bases = {}
    for r in rows:
        if r["plan"] == "standard":
            bases.setdefault(r.get("seed"), r)
    seeds = len({r.get("seed") for r in rows}) > 1
    lengths = sorted({int(n) for r in rows for n in r["retrieval_by_length"]})
    qa = any(r.get("val_loss_before_qa") is not None for r in rows)
    print(tabulate([(r["plan"], *([r.get("seed", "-")] if seeds else []), f"{r['kv_bytes_per_token_at_long']:,.0f}",
                     f"{r['val_loss']:.4f}",
                     f"{r['val_loss'] - bases[r.get('seed')]['val_loss']:+.4f}" if r.get("seed") in bases else "",
                     *([f"{r['val_loss_before_qa']:.4f}" if r.get("val_loss_before_qa") is not None else "-"] if qa else []),
                     *(f"{r['retrieval_by_length'][str(n)]:.2f}" if str(n) in r["retrieval_by_length"] else "-"
                       for n in lengths)) for r in rows],
                   headers=["plan", *(["seed"] if seeds else []), "KV B/token", "val loss", "vs standard", *(["before QA"] if qa else []),
                            *(f"retr@{n}" for n in lengths)], disable_numparse=True))  # the cells as formatted


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Retrieval by context length, one line per plan and seed (the first seed solid, others dashed, one colour
    per plan), and mean retrieval against KV bytes per token at the long context (the paper's trade-off)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plans = list(dict.fromkeys(r["plan"] for r in rows))
    seeds = sorted({r.get("seed") for r in rows}, key=lambda s: (s is None, s or 0))  # numerically; None last
    colour = {plan: f"C{i % 10}" for i, plan in enumerate(plans)}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5.2))
    for r in rows:
        pts = sorted((int(n), v) for n, v in r["retrieval_by_length"].items())
        first = r.get("seed") == seeds[0]
        ax1.plot([n for n, _ in pts], [v for _, v in pts], marker="o", color=colour[r["plan"]],
                 linestyle="-" if first else "--", label=r["plan"] if first else None)
        ax2.scatter(r["kv_bytes_per_token_at_long"], r["retrieval"], color=colour[r["plan"]], marker="o" if first else "s")
        if first:
            ax2.annotate(r["plan"], (r["kv_bytes_per_token_at_long"], r["retrieval"]), fontsize=8,
                         xytext=(4, 3), textcoords="offset points")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("context (tokens)")
    ax1.set_title("retrieval accuracy by length")
    ax1.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.14))  # below: the lines fill the axes
    ax2.set_xscale("log")
    ax2.set_xlabel("KV cache bytes per token at the long context")
    ax2.set_title("mean retrieval against KV cache")
    for ax in (ax1, ax2):
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    marks = ", ".join(f"seed {s}: {'solid / circle' if s == seeds[0] else 'dashed / square'}" for s in seeds)
    fig.suptitle(f"{title} ({marks})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plans", nargs="+", default=["standard", "ma", "ma_offset", "ma_pairs", "all_sliding"])
    parser.add_argument("--size", default="50m", choices=sorted(SIZES))
    parser.add_argument("--short", type=int, default=1024, help="pretraining context")
    parser.add_argument("--long", type=int, default=4096, help="extension context")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--long-steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--short-rope-theta", type=float, default=None, help="RoPE theta of the first stage (default: the recipe's)")
    parser.add_argument("--long-rope-theta", type=float, default=100000.0)
    parser.add_argument("--long-trainable", default=None, help="train only this part in the long stage (the paper: attention)")
    parser.add_argument("--qa-steps", type=int, default=0,
                        help="a third stage (the paper's): this many steps of long-context QA, loss on answers, attention only")
    parser.add_argument("--qa-lr", type=float, default=None, help="learning rate of the QA stage (default: --lr / 4)")
    parser.add_argument("--reuse-stages", action="store_true",
                        help="keep a stage whose checkpoint is already in --workdir (a second call on the same machine "
                             "finishing a run the first was cut from)")
    parser.add_argument("--save-every", type=int, default=0, metavar="N",
                        help="each stage also saves every N batches (the last two kept), so that with --reuse-stages a "
                             "call cut short mid-stage is continued from there by the next (default: only at the end)")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--retrieval-mix", type=float, default=0.3, help="share of training tokens in synthetic retrieval exercises")
    parser.add_argument("--samples", type=int, default=4, help="retrieval samples per (task, length, depth)")
    parser.add_argument("--eval-batches", type=int, default=20)
    parser.add_argument("--limit-files", type=int, default=None, help="use only this many stdlib files (a quick check)")
    parser.add_argument("--recipe", default=str(Path(__file__).resolve().parents[1] / "yamls/pretrain/tiny-cpu.yaml"))
    parser.add_argument("--device", default="gpu", choices=["gpu", "cpu"])
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--workdir", default="/tmp/replicate")
    parser.add_argument("--name", default="replication")
    parser.add_argument("--out", default=None)
    parser.add_argument("--prepare-only", action="store_true", help="only write the data folder (tokenizer, MDS, held-out files)")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="only join result files into one table, its JSON and a plot beside it (NAME.png)")
    args = parser.parse_args(argv)
    from common import write_result

    if args.merge:
        runs = [json.loads(Path(path).read_text()) for path in args.merge]
        # a row written before rows carried their seed takes its run's
        rows = [{"seed": run.get("config", {}).get("seed"), **r} for run in runs for r in run["rows"]]
        print_tables(rows)
        # each source run's command, machine, versions and config travel with its rows
        sources = [{k: v for k, v in run.items() if k != "rows"} for run in runs]
        path = write_result(args.name, {"sources": sources, "rows": rows}, args.out, topic="replication")
        plot(rows, path.with_suffix(".png"), f"replication {args.name}")
        print(f"wrote {path} and {path.with_suffix('.png').name}")
        return 0
    work = Path(args.workdir)
    meta = prepare(args, work)
    print(f"data ready in {work / 'data'}: {meta}", flush=True)
    if args.prepare_only:
        return 0
    rows = []
    config = {k: v for k, v in vars(args).items() if k != "merge"}
    for plan in args.plans:
        checkpoint = train_plan(args, work, meta, plan)
        rows.append(evaluate_plan(args, meta, plan, checkpoint))
        print_tables(rows)
        path = write_result(args.name, {"config": config, "data": meta, "rows": rows}, args.out, topic="replication")  # after every plan
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
