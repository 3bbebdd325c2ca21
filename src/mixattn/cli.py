"""The ``mixattn`` command line. Each subcommand parses arguments and calls
library code; no logic lives only here."""

from __future__ import annotations

import argparse
import json
import sys

from mixattn.plan import PRESETS, LayerPlan, format_bytes, plan_report


def _cmd_plan(args) -> int:
    from tabulate import tabulate

    if args.list:
        print(tabulate([(name, p.doc) for name, p in PRESETS.items()], headers=["preset", "layout"], maxcolwidths=[None, 90]))
        return 0
    if args.config:
        from mixattn.config import load_model_config

        stray = [o for o in args.plan if not o.startswith("model.")]
        if stray:
            print(f"mixattn plan: with --config, arguments are model.KEY=VALUE overrides; got {stray[0]!r}", file=sys.stderr)
            return 2
        cfg = load_model_config(args.config, args.plan)
        plan, label = cfg.layer_plan, f"{args.config} {' '.join(args.plan)}".strip()
        head_dim, n_kv, window = cfg.head_dim, cfg.n_kv_heads, cfg.window
    else:
        if len(args.plan) != 1:
            print("mixattn plan: give one preset name or pattern (quote patterns), --config FILE, or --list", file=sys.stderr)
            return 2
        label = args.plan[0]
        plan = LayerPlan.parse(label, args.n_layers, args.window)
        head_dim, n_kv, window = args.d_model // args.n_heads, args.n_kv_heads or args.n_heads, args.window
    report = plan_report(plan, n_kv_heads=n_kv, head_dim=head_dim, contexts=args.context, batch_size=args.batch, dtype=args.dtype)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    max_ctx = max(args.context)
    rows = [(*row, plan.cache_tokens(i, max_ctx)) for i, row in enumerate(plan.describe())]
    print(f"plan {label!r}: {len(plan)} layers, {len(plan.owners)} own a KV cache")
    print(f"pattern: {plan.to_pattern(window)}\n")
    print(tabulate(rows, headers=["layer", "kind", "window", "kv", f"cached tokens @ {max_ctx}"]))
    print(
        f"\nKV cache, {args.dtype}, n_kv_heads={n_kv}, head_dim={head_dim}, batch={args.batch}: "
        f"{format_bytes(report['standard_bytes_per_token'])}/token standard, "
        f"{format_bytes(report['bytes_per_token_uncapped'])}/token this plan below its windows\n"
    )
    table = [
        (r["context"], format_bytes(r["standard_bytes"]), format_bytes(r["plan_bytes"]), f"{r['reduction']:.2f}x")
        for r in report["contexts"]
    ]
    print(tabulate(table, headers=["context", "standard", "this plan", "reduction"]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixattn", description="MixAttention: pretrain and serve inference-friendly LMs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="print a layer plan and its KV-cache size vs standard attention")
    p.add_argument("plan", nargs="*", help="a preset name or a pattern such as 'G (S s S s s g)*2'; with --config, key=value overrides")
    p.add_argument("--config", help="a model or recipe YAML; its model section gives the plan and dimensions")
    p.add_argument("--list", action="store_true", help="list the presets")
    p.add_argument("--n-layers", type=int, default=24, help="depth for a preset (default 24)")
    p.add_argument("--window", type=int, default=1024, help="sliding window in tokens (default 1024)")
    p.add_argument("--d-model", type=int, default=2048)
    p.add_argument("--n-heads", type=int, default=16)
    p.add_argument("--n-kv-heads", type=int, default=None)
    p.add_argument("--context", type=int, nargs="+", default=[4096, 32768, 131072], help="context lengths in tokens")
    p.add_argument("--batch", type=int, default=1, help="concurrent sequences")
    p.add_argument("--dtype", default="bf16", help="KV dtype: bf16, fp16, fp32, fp8")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = tsub.add_parser("train", help="train a byte-level BPE tokenizer on local text (writes OUT/tokenizer.json)")
    t.add_argument("inputs", nargs="+", help="text/JSONL/Parquet files or directories")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--vocab-size", type=int, default=8192)
    t.set_defaults(func=_cmd_tokenizer_train)

    p = sub.add_parser("data", help="convert raw text (txt, JSONL, Parquet) to MDS shards of packed sequences")
    p.add_argument("inputs", nargs="+", help="files or directories")
    p.add_argument("--out", required=True, help="output directory (gets train/ and val/)")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json, a directory, or a Hugging Face name")
    p.add_argument("--max-seq-len", type=int, required=True)
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--text-field", default="text", help="JSONL key / Parquet column holding the text")
    p.add_argument("--format", default="pretrain", choices=["pretrain", "finetune"],
                   help="pretrain: packed text; finetune: prompt/response JSONL, loss on responses only")
    p.add_argument("--prompt-field", default="prompt", help="finetune: JSONL key of the prompt")
    p.add_argument("--response-field", default="response", help="finetune: JSONL key of the response")
    p.add_argument("--compression", default="zstd", help="zstd, gz, br, snappy, or none")
    p.add_argument("--seed", type=int, default=17, help="seed of the train/val split")
    p.set_defaults(func=_cmd_data)

    p = sub.add_parser("train", help="train from a YAML recipe (under `composer -n GPUS` for several GPUs)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key=value overrides (omegaconf dot-list)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("demo", help="tokenizer + MDS data from Python's stdlib, train a tiny MixAttention model, report")
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the tiny recipe")
    p.set_defaults(func=_cmd_demo)
    return parser


def _cmd_tokenizer_train(args) -> int:
    from mixattn.data import expand_inputs, train_tokenizer

    path = train_tokenizer(expand_inputs(args.inputs), args.out, vocab_size=args.vocab_size)
    print(f"wrote {path}")
    return 0


def _cmd_data(args) -> int:
    from mixattn.data import convert_finetune_to_mds, convert_to_mds, load_tokenizer

    common = dict(val_fraction=args.val_fraction, compression=None if args.compression == "none" else args.compression,
                  seed=args.seed)
    tok = load_tokenizer(args.tokenizer)
    if args.format == "finetune":
        stats = convert_finetune_to_mds(args.inputs, args.out, tok, args.max_seq_len, prompt_field=args.prompt_field,
                                        response_field=args.response_field, **common)
    else:
        stats = convert_to_mds(args.inputs, args.out, tok, args.max_seq_len, text_field=args.text_field, **common)
    unit = "examples" if args.format == "finetune" else "documents"
    for split in ("train", "val"):
        print(f"{split}: {stats.documents[split]} {unit}, {stats.tokens[split]:,} tokens, {stats.samples[split]} sequences")
    if stats.skipped:
        print(f"skipped {stats.skipped} examples longer than --max-seq-len {args.max_seq_len}")
    return 0


def _cmd_train(args) -> int:
    from mixattn.train import build_trainer, load_recipe

    cfg = load_recipe(args.recipe, args.overrides)
    build_trainer(cfg).fit()
    return 0


def _cmd_demo(args) -> int:
    from mixattn.demo import run_demo

    run_demo(args.workdir, overrides=args.overrides)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, OSError) as e:  # PlanError, ConfigError, DataError are ValueErrors
        print(f"mixattn {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
