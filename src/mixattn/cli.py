"""The ``mixattn`` command line. Each subcommand parses arguments and calls
library code; no logic lives only here."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from mixattn.plan import PRESETS, LayerPlan, format_bytes, plan_report, preset_key

# mixattn.attention.CACHED_ATTENTION's names, listed here so that the CLI starts without importing torch
# (a test checks the two agree)
CACHED_ATTENTION_NAMES = ["flex", "matmul", "sdpa", "triton"]


def _cmd_plan(args) -> int:
    from tabulate import tabulate

    if args.budget:
        return _plan_budget(args)
    if args.list:
        print(tabulate([(name, p.doc) for name, p in PRESETS.items()], headers=["preset", "layout"], maxcolwidths=[None, 90]))
        return 0
    cfg = None
    if args.mpt:
        cfg = _mpt_model_config(args.mpt)
        plan, label = cfg.layer_plan, args.mpt
        head_dim, n_kv, window = cfg.head_dim, cfg.n_kv_heads, cfg.window
    elif args.config:
        from mixattn.model import load_model_config

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
        if not args.json and not args.to_mpt:
            print(f"dims (no --config): d_model {args.d_model}, n_heads {args.n_heads}, n_kv_heads {n_kv}, head_dim "
                  f"{head_dim}, window {window}; set --d-model/--n-heads/--n-kv-heads/--window or give --config MODEL.yaml")
    if args.to_mpt:
        import yaml

        from mixattn.mpt import mpt_from_model_config, mpt_from_plan

        section = mpt_from_model_config(cfg) if cfg is not None else mpt_from_plan(plan)
        print(yaml.safe_dump({"model": section}, sort_keys=False), end="")
        return 0
    report = plan_report(plan, n_kv_heads=n_kv, head_dim=head_dim, contexts=args.context, batch_size=args.batch, dtype=args.dtype)
    if plan.name is not None and preset_key(plan.name) is not None:
        report = {"preset": preset_key(plan.name), **report}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    max_ctx = max(args.context)
    rows = [(*row, plan.cache_tokens(i, max_ctx)) for i, row in enumerate(plan.describe())]
    print(f"plan {label!r}: {len(plan)} layers, {len(plan.owners)} own a KV cache")
    if cfg is not None:
        import torch

        from mixattn.model import MixAttentionLM

        with torch.device("meta"):  # shapes only
            model = MixAttentionLM(cfg)
        print(f"parameters: {model.num_params() / 1e9:.3f}B total, {model.num_active_params() / 1e9:.3f}B active per token")
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


def _mpt_model_config(path: str):
    """The ModelConfig of an llm-foundry YAML's model section: MPT
    (``block_overrides``, ``sliding_window_size``) or ``name: mixattn``."""
    from omegaconf import OmegaConf

    from mixattn.model import ModelConfig
    from mixattn.mpt import model_config_from_mpt

    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as e:  # a missing file, bad YAML, an unresolvable ${...}
        raise ValueError(f"{path}: {e}") from None
    section = dict(data.get("model", data)) if isinstance(data, dict) else None
    if not section:
        raise ValueError(f"{path}: no model section")
    if section.pop("name", None) == "mixattn":
        from mixattn.foundry import foundry_model_config

        return foundry_model_config({"vocab_size": 50304, **section})
    return ModelConfig(**model_config_from_mpt(section))


def _plan_budget(args) -> int:
    """mixattn plan --budget 80GiB --context 32768: concurrent sequences per
    plan, from the memory of a whole generation on the default decode path
    (mixattn.memory.decode_budget), not the KV bytes alone."""
    import torch
    from tabulate import tabulate

    from mixattn.memory import decode_budget, model_bytes
    from mixattn.model import MixAttentionLM, ModelConfig
    from mixattn.plan import parse_bytes

    context = max(args.context)
    if args.config:
        from mixattn.model import load_model_config

        base = load_model_config(args.config, args.plan)
    else:
        base = ModelConfig(vocab_size=args.vocab_size, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                           n_kv_heads=args.n_kv_heads, max_seq_len=max(context, args.window), window=args.window)
    names = [args.plan[0]] if args.plan and not args.config else PRESETS.names()
    plans = {}
    for name in names:
        try:
            plans[name] = LayerPlan.parse(name, base.n_layers, base.window)
        except ValueError:
            continue  # a preset that needs more layers than the model has
    if "standard" not in plans:
        plans = {"standard": LayerPlan.parse("standard", base.n_layers, base.window), **plans}
    weights = {}
    for name, plan in plans.items():  # per plan: a layer that shares its KV has no K and V projections
        with torch.device("meta"):
            model = MixAttentionLM(dataclasses.replace(base, plan=plan.to_list())).to(torch.bfloat16)  # as served: bf16
        weights[name] = model_bytes(model)
    budget = parse_bytes(args.budget)
    rows = decode_budget(plans, base, budget_bytes=budget, context=context, weight_bytes=weights, dtype=args.dtype,
                         chunk_size=args.chunk_size)
    if args.json:
        print(json.dumps({"budget": args.budget, "budget_bytes": budget, "context": context, "chunk_size": args.chunk_size,
                          "reserve": 0.05, "plans": rows}, indent=2))
        return 0
    print(f"budget {args.budget}, context {context}, {base.n_layers} layers x d_model {base.d_model}, bf16 weights, "
          f"KV in {args.dtype}\ncounted: weights, KV, position tables and the larger of prefill's (chunks of "
          f"{args.chunk_size}) and a decode step's working set; 5% reserved")
    table = []
    for r in rows:
        est = r["estimate_at_max"]
        table.append((r["plan"], format_bytes(r["weight_bytes"]), format_bytes(r["kv_bytes_per_sequence"]), r["max_sequences"],
                      f"{r['vs_standard']:.1f}x" if r["vs_standard"] is not None else "-",
                      format_bytes(est["peak"]) if est else "-"))
    print(tabulate(table, headers=["plan", "weights", "KV per sequence", "concurrent sequences", "vs standard",
                                   "peak at that batch"]))
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mixattn")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _int_in(low: int, high: int | None, what: str):
    """An argparse type: an integer in [low, high] (high None: no bound);
    argparse names the flag in its error, e.g. ``argument --context: must be
    a positive integer, got '0'``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    return parse


_positive = _int_in(1, None, "a positive integer")  # a count or size
_non_negative = _int_in(0, None, "an integer >= 0")  # a count that may be 0 (few-shot examples)
_port = _int_in(0, 65535, "a port number 0-65535")  # 0: any free port


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Every subcommand's --help shows its options' defaults."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                child.formatter_class = argparse.ArgumentDefaultsHelpFormatter
                for option in child._actions:  # the formatter adds "(default: ...)" only to options with a help text
                    if option.help is None and option.option_strings and option.default not in (None, False, argparse.SUPPRESS):
                        option.help = "(default: %(default)s)"
                _show_defaults(child)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixattn", description="MixAttention: pretrain and serve inference-friendly LMs")
    parser.add_argument("--version", action="version", version=f"mixattn {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="print a layer plan and its KV-cache size vs standard attention")
    p.add_argument("plan", nargs="*", help="a preset name or a pattern such as 'G (S s S s s g)*2'; with --config, key=value overrides")
    p.add_argument("--config", help="a model or recipe YAML; its model section gives the plan and dimensions")
    p.add_argument("--mpt", metavar="YAML", help="an llm-foundry YAML: its MPT model section (block_overrides, "
                   "sliding_window_size) gives the plan and dimensions")
    p.add_argument("--to-mpt", action="store_true", help="print the plan as an llm-foundry MPT model section "
                   "(attn_config + block_overrides) instead of the report")
    p.add_argument("--list", action="store_true", help="list the presets")
    p.add_argument("--n-layers", type=_positive, default=24, help="depth for a preset (default 24)")
    p.add_argument("--window", type=_positive, default=1024, help="sliding window in tokens (default 1024)")
    p.add_argument("--d-model", type=_positive, default=2048)
    p.add_argument("--n-heads", type=_positive, default=16)
    p.add_argument("--n-kv-heads", type=_positive, default=None)
    p.add_argument("--context", type=_positive, nargs="+", default=[4096, 32768, 131072], help="context lengths in tokens")
    p.add_argument("--batch", type=_positive, default=1, help="concurrent sequences")
    p.add_argument("--dtype", default="bf16", help="KV dtype: bf16, fp16, fp32, fp8")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.add_argument("--budget", help="GPU memory (e.g. 80GiB): how many sequences of --context tokens each plan fits")
    p.add_argument("--vocab-size", type=_positive, default=50304, help="with --budget: vocabulary (for the weights' size)")
    p.add_argument("--chunk-size", type=_positive, default=512, help="with --budget: the prefill chunk (mixattn generate's "
                   "default; mixattn serve's is 2048)")
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
    p.add_argument("--format", default="pretrain", choices=["pretrain", "finetune", "longqa"],
                   help="pretrain: packed text; finetune: prompt/response JSONL, loss on responses only; "
                        "longqa: synthetic long-context QA over the inputs as haystack (RULER-style retrieval, "
                        "multi-hop, aggregation), one per sequence, loss on the answers only")
    p.add_argument("--samples", type=int, default=1000, help="longqa: sequences to write (default: %(default)s)")
    p.add_argument("--tasks", nargs="+", default=None, help="longqa: the tasks (default: every mixattn.retrieval task)")
    p.add_argument("--prompt-field", default="prompt", help="finetune: JSONL key of the prompt")
    p.add_argument("--response-field", default="response", help="finetune: JSONL key of the response")
    p.add_argument("--compression", default="zstd", help="zstd, gz, br, snappy, or none")
    p.add_argument("--seed", type=int, default=17, help="seed of the train/val split")
    p.set_defaults(func=_cmd_data)

    p = sub.add_parser("train", help="train from a YAML recipe (under `composer -n GPUS` for several GPUs)",
                       description="Train from a YAML recipe (yamls/), with key=value overrides. Every recipe key, "
                                   "its type and default: `mixattn train --keys`. The resolved recipe: --print-config.")
    p.add_argument("recipe", nargs="?", help="a recipe YAML, e.g. yamls/pretrain/ma-350m.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides (omegaconf dot-list), e.g. max_duration=200ba model.plan=ma")
    p.add_argument("--keys", action="store_true", help="list every recipe key with its type and default, then exit")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe (file, overrides and defaults) as YAML, then exit")
    p.add_argument("--dry-run", action="store_true", help="build the model, data loaders and Trainer and read one batch, "
                   "then exit without training (nothing is written)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("sweep", help="a grid of layer plans/windows/sizes: resolved recipes, launch, results table + Pareto plot")
    p.add_argument("spec", help="sweep spec YAML (see yamls/sweeps/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the spec")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--run", action="store_true", help="train and evaluate every point here, one after another, then collect")
    mode.add_argument("--collect", action="store_true", help="only collect the points' results into the table and plot")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("export-hf", help="write a checkpoint as a transformers folder (AutoModelForCausalLM, trust_remote_code)")
    p.add_argument("checkpoint", help="a training checkpoint (.pt), or its save folder")
    p.add_argument("out", help="the folder to write (must not exist or be empty, unless --force)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json or a transformers tokenizer folder to include "
                   "(default: the one the checkpoint records, where it is still there)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_cmd_export_hf)

    p = sub.add_parser("generate", help="generate text from a training checkpoint with the plan-shaped KV cache")
    p.add_argument("checkpoint", help="a checkpoint written by `mixattn train` (.../latest-rank0.pt), or its save folder")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json, a directory, or a Hugging Face name "
                   "(default: the one the checkpoint records, its training data's)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop when the output contains this text (any number of tokens; repeat for several; not printed); "
                   "EOS always stops")
    p.add_argument("--chunk-size", type=int, default=512, help="prefill chunk in tokens")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    _add_decode_flags(p)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("serve", help="serve a checkpoint over HTTP with OpenAI's completions API (continuous batching)")
    p.add_argument("checkpoint", help="a checkpoint written by `mixattn train` (.../latest-rank0.pt), or its save folder")
    p.add_argument("--tokenizer", default=None, help="default: the one the checkpoint records; a transformers tokenizer "
                   "folder with a chat template also enables /v1/chat/completions")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--model-name", "--served-model-name", default=None,
                   help="the model id clients send (default: the checkpoint's run name)")
    p.add_argument("--chat-template", default=None,
                   help="a Jinja chat template, or a file holding one: serves /v1/chat/completions with it (for a "
                        "tokenizer without one, or instead of its own)")
    p.add_argument("--api-key", default=os.environ.get("MIXATTN_API_KEY"),
                   help="clients of the /v1 routes must send 'Authorization: Bearer KEY' (default: $MIXATTN_API_KEY; none: open)")
    p.add_argument("--max-context", "--max-model-len", type=_positive, default=None,
                   help="tokens per request, prompt + output (default: the model's max_seq_len)")
    p.add_argument("--max-slots", "--max-num-seqs", type=int, default=None,
                   help="requests decoded at once (default: what --kv-budget fits, or 8)")
    p.add_argument("--kv-budget", default=None, help="memory for the KV cache, e.g. 40GiB: as many rows of --max-context as the "
                   "plan-shaped cache fits")
    p.add_argument("--chunk-size", type=int, default=2048, help="prefill chunk in tokens")
    p.add_argument("--prefill-budget", "--max-num-batched-tokens", type=int, default=None,
                   help="prompt tokens prefilled per engine step, in chunks, before the decode step (default: 8192, "
                        "or one chunk if larger); "
                        "larger: more throughput, slower tokens for requests already decoding")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    _add_decode_flags(p)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("eval", help="evaluate a checkpoint: loss by position (perplexity), long-context retrieval, "
                       "in-context learning tasks (icl)")
    esub = p.add_subparsers(dest="eval_command", required=True)
    e = esub.add_parser("perplexity", help="validation loss/perplexity per position bucket on an MDS split")
    e.add_argument("checkpoint", help="a training checkpoint (.pt), or its save folder")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="a local MDS split, e.g. data/mds/val")
    src.add_argument("--text", nargs="+", help="raw text: files or folders (.txt, .jsonl, .parquet), packed as for training")
    e.add_argument("--tokenizer", help="with --text: tokenizer.json, a directory, or a Hugging Face name "
                   "(default: the one the checkpoint records)")
    e.add_argument("--seq-len", type=_positive, default=None, help="with --text: sequence length (default: the model's max_seq_len)")
    e.add_argument("--text-field", default="text", help="with --text: the JSONL/Parquet text field")
    e.add_argument("--buckets", type=_non_negative, nargs="+", default=None, help="bucket edges (default: powers of two up to max_seq_len)")
    e.add_argument("--batch-size", type=_positive, default=8)
    e.add_argument("--max-batches", type=_positive, default=None)
    e.add_argument("--device", default="auto")
    e.add_argument("--json", help="also write the rows to this JSON file")
    e.set_defaults(func=_cmd_eval_perplexity)
    e = esub.add_parser("retrieval", help="RULER-style retrieval accuracy (table, JSON, heatmap)")
    e.add_argument("checkpoint", help="a training checkpoint (.pt), or its save folder")
    e.add_argument("--tokenizer", default=None, help="default: the one the checkpoint records (its training data's)")
    e.add_argument("--haystack", nargs="+", default=None, help="text files for the haystack (default: Python's stdlib)")
    e.add_argument("--tasks", nargs="+", default=["niah_single", "niah_multikey", "niah_multivalue", "variable_tracking"])
    e.add_argument("--lengths", type=_positive, nargs="+", required=True, help="context lengths in tokens")
    e.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    e.add_argument("--samples", type=_positive, default=4, help="samples per (task, length, depth)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--max-new-tokens", type=_positive, default=32)
    e.add_argument("--device", default="auto")
    e.add_argument("--out", required=True, help="directory for retrieval.json and retrieval.png")
    e.set_defaults(func=_cmd_eval_retrieval)

    e = esub.add_parser("icl", help="in-context-learning tasks from local JSONL files (multiple choice, exact-match generation)")
    e.add_argument("checkpoint", help="a training checkpoint (.pt), or its save folder")
    e.add_argument("--tokenizer", default=None, help="default: the one the checkpoint records (its training data's)")
    e.add_argument("--tasks", nargs="+", required=True, help="JSONL task files (format: docs/evaluation.md)")
    e.add_argument("--shots", type=_non_negative, default=0, help="examples of the same file shown before each example")
    e.add_argument("--separator", default="\n\n", help="between few-shot examples")
    e.add_argument("--seed", type=int, default=0, help="which examples are the shots")
    e.add_argument("--max-new-tokens", type=_positive, default=32, help="for generation examples")
    e.add_argument("--batch-size", type=_positive, default=16)
    e.add_argument("--device", default="auto")
    e.add_argument("--json", help="also write the scores and per-example records to this JSON file")
    e.set_defaults(func=_cmd_eval_icl)

    p = sub.add_parser("demo", help="tokenizer + MDS data from Python's stdlib, train a tiny MixAttention model, report")
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the tiny recipe")
    p.set_defaults(func=_cmd_demo)
    _show_defaults(parser)
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
    if args.format == "longqa":
        from mixattn.data import convert_longqa_to_mds

        stats = convert_longqa_to_mds(args.inputs, args.out, tok, args.max_seq_len, samples=args.samples, tasks=args.tasks,
                                      text_field=args.text_field, **common)
    elif args.format == "finetune":
        stats = convert_finetune_to_mds(args.inputs, args.out, tok, args.max_seq_len, prompt_field=args.prompt_field,
                                        response_field=args.response_field, **common)
    else:
        stats = convert_to_mds(args.inputs, args.out, tok, args.max_seq_len, text_field=args.text_field, **common)
    unit = {"finetune": "examples", "longqa": "QA samples"}.get(args.format, "documents")
    for split in ("train", "val"):
        print(f"{split}: {stats.documents[split]} {unit}, {stats.tokens[split]:,} tokens, {stats.samples[split]} sequences")
    if stats.skipped:
        print(f"skipped {stats.skipped} examples longer than --max-seq-len {args.max_seq_len}")
    return 0


def _cmd_train(args) -> int:
    from mixattn.training.recipe import load_recipe, recipe_keys, recipe_to_dict, save_folder_path

    if args.keys:
        from tabulate import tabulate

        print(tabulate(recipe_keys(), headers=["key", "type", "default"]))
        return 0
    if not args.recipe:
        raise ValueError("a RECIPE is needed (a YAML file, e.g. yamls/pretrain/tiny-cpu.yaml); "
                         "`mixattn train --keys` lists what a recipe may set")
    cfg = load_recipe(args.recipe, args.overrides)
    if args.print_config:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(recipe_to_dict(cfg)), end="")
        return 0
    from mixattn.training.trainer import build_trainer  # Composer: imported only to train

    if args.dry_run:
        folder = save_folder_path(cfg)
        fresh = folder is not None and "://" not in folder and not Path(folder).exists()
        try:
            return _dry_run(cfg, build_trainer(cfg))
        finally:
            if fresh and Path(folder).is_dir() and not any(Path(folder).iterdir()):
                Path(folder).rmdir()  # the Trainer makes its save folder when built; a dry run leaves none
    trainer = build_trainer(cfg)
    try:
        trainer.fit()
    except OSError as e:  # a full disk or a lost mount while writing a checkpoint, a vanished shard
        raise OSError(f"training stopped: {e}. {_resume_hint(cfg)}") from e
    return 0


def _dry_run(cfg, trainer) -> int:
    """Everything ``fit`` needs is built; read one batch and check it against
    the model, then close without a step or a write."""
    from mixattn.plan import letters

    state = trainer.state
    model = state.model.module if hasattr(state.model, "module") else state.model
    batch = next(iter(state.train_dataloader))
    ids = batch["input_ids"]
    low, high = int(ids.min()), int(ids.max())
    if high >= cfg.model.vocab_size or low < 0:
        raise ValueError(f"data.train: token id {high if high >= cfg.model.vocab_size else low} is outside the model's "
                         f"vocabulary [0, {cfg.model.vocab_size}); set model.vocab_size to the tokenizer's size")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"dry run: model {model.model.num_params():,} parameters ({trainable:,} trainable), plan "
          f"'{letters(model.model.cfg.layer_plan)}'; first batch {tuple(ids.shape)} with token ids in [{low}, {high}]; "
          f"would train for {cfg.max_duration} with a global batch of {cfg.global_train_batch_size}, "
          f"saving to {cfg.save_folder or '(no save_folder)'}")
    trainer.close()
    return 0


def _resume_hint(cfg) -> str:
    import os

    from mixattn.checkpoint import LATEST
    from mixattn.training.recipe import save_folder_path

    folder = save_folder_path(cfg)
    if not folder or "://" in folder:
        return "No local save_folder to resume from."
    link = Path(folder) / LATEST
    if not link.is_symlink():
        return f"No checkpoint was completed in {folder!r}."
    how = "relaunch the same command to resume from it" if cfg.autoresume else "set autoresume=true and relaunch to resume from it"
    return f"The last complete checkpoint is {os.readlink(link)!r} in {folder!r}; {how} (a torn newer file is set aside)."


def _cmd_sweep(args) -> int:
    from mixattn import sweep

    spec = sweep.load_spec(args.spec, args.overrides)
    points = sweep.expand(spec)  # every point validated before anything is written or run
    manifest = sweep.write(spec, points)
    print(f"sweep {spec.name}: {len(points)} points, recipes and commands in {manifest}")
    if not args.run and not args.collect:
        for p in points:
            print(f"# {p.name}")
            for cmd in sweep.commands(spec, p):
                print(sweep.shell_line(cmd))
        print("(launch them on a cluster as they are, or run them here with --run)")
        return 0
    if args.run:
        sweep.run(spec, points)
    rows = sweep.collect(spec, points)
    print(sweep.results_table(rows))  # the columns of results.md
    for path in sweep.report(spec, rows):
        print(f"wrote {path}")
    return 0


def _cmd_export_hf(args) -> int:
    from mixattn.hf import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, args.tokenizer, args.dtype, overwrite=args.force)
    print(f"wrote {out}: load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)")
    return 0


def _add_decode_flags(p) -> None:
    """How decode steps run (mixattn.generate.DecodePath): by default the
    fastest correct path where it runs, each part switchable."""
    p.add_argument("--attention", default="auto", choices=["auto", *CACHED_ATTENTION_NAMES],
                   help="how decode steps read the KV cache (auto: triton on CUDA with Triton, else sdpa; "
                        "docs/inference.md compares them)")
    p.add_argument("--gemv", action=argparse.BooleanOptionalAction, default=None,
                   help="one-row projections through mixattn's Triton GEMV (default: on where it runs, CUDA with Triton)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the decode step (default: on where it runs; the first step of a shape compiles)")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="replay the decode step from a CUDA graph (default: on a CUDA GPU)")
    p.add_argument("--persistent", action=argparse.BooleanOptionalAction, default=None,
                   help="run a one-row step's layers in one persistent kernel (mixattn.persistent; other steps "
                        "as above; default: off)")


def _decode_path(args, device: str):
    from mixattn.generate import DecodePath

    path = DecodePath.resolve(device, attention=args.attention, gemv=args.gemv, compile=args.compile,
                              cuda_graph=args.cuda_graph, persistent=args.persistent, flag="--")
    print(f"[decode: {path.describe()}]", file=sys.stderr)
    return path


def _cmd_generate(args) -> int:
    from mixattn.checkpoint import load_model
    from mixattn.detokenize import TextStream, check_stops
    from mixattn.generate import generate

    check_stops(args.stop, "--stop")  # before the model loads
    device = _device(args.device)
    path = _decode_path(args, device)  # before the model loads, too
    dtype = _dtype(args.dtype, device)
    model = load_model(args.checkpoint, device=device, dtype=dtype)
    tok = _tokenizer_for(model, args.tokenizer)
    streams = [TextStream(tok, args.stop) for _ in args.prompt]  # stop strings of any length, held back until sure
    prompts = tok.encode_batch(args.prompt)
    stream = len(prompts) == 1
    if stream:
        print(args.prompt[0], end="", flush=True)

    def on_token(row: int, token: int) -> bool:
        if token == tok.eos_id:
            return True
        piece = streams[row].push(token)
        if stream:
            print(piece, end="", flush=True)
        return streams[row].stopped is not None

    out = generate(model, prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   stop_tokens=[tok.eos_id], seed=args.seed, chunk_size=args.chunk_size,
                   decode=path, on_token=on_token)
    tails = [s.finish() for s in streams]
    if stream:
        print(tails[0])
    else:
        for prompt, s in zip(args.prompt, streams):
            print(f"--- {prompt!r}\n{prompt}{s.text}")
    from mixattn.plan import format_bytes

    print(f"[KV cache {format_bytes(out.cache_bytes)} for {len(prompts)} sequence(s) of up to "
          f"{max(out.prompt_lengths) + args.max_new_tokens} tokens]", file=sys.stderr)
    return 0


def _cmd_serve(args) -> int:
    import uvicorn

    from mixattn.checkpoint import load_model, resolve_checkpoint, run_name
    from mixattn.engine import Engine, max_slots_for
    from mixattn.plan import format_bytes, parse_bytes
    from mixattn.serve import create_app

    template = _chat_template(args.chat_template)
    device = _device(args.device)
    path = _decode_path(args, device)
    model = load_model(args.checkpoint, device=device, dtype=_dtype(args.dtype, device))
    tok = _tokenizer_for(model, args.tokenizer)
    context = args.max_context or model.cfg.max_seq_len
    if not 2 <= context <= model.cfg.max_seq_len:
        raise ValueError(f"--max-context {context} must be in [2, {model.cfg.max_seq_len}] (the model's max_seq_len)")
    for flag, value in (("--chunk-size", args.chunk_size), ("--prefill-budget", args.prefill_budget)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value} must be at least 1 token")
    slots = args.max_slots
    if slots is None:
        slots = max_slots_for(model, context, parse_bytes(args.kv_budget)) if args.kv_budget else 8
        if slots < 1:
            raise ValueError(f"--kv-budget {args.kv_budget} does not fit one request of --max-context {context} tokens")
    engine = Engine(model, max_slots=slots, max_context=context, chunk_size=args.chunk_size, prefill_budget=args.prefill_budget,
                    decode=path)
    name = args.model_name or run_name(resolve_checkpoint(args.checkpoint))
    print(f"serving {name!r}: {slots} rows of {context} tokens, KV cache {format_bytes(engine.cache.nbytes)}, "
          f"on http://{args.host}:{args.port}/v1 (OpenAI completions API"
          f"{', API key required' if args.api_key else ''})", file=sys.stderr)
    uvicorn.run(create_app(engine, tok, name, api_key=args.api_key, chat_template=template), host=args.host, port=args.port, log_level="info")
    return 0


def _chat_template(value: str | None) -> str | None:
    """--chat-template: a file's text, or the template itself (checked to compile)."""
    if value is None:
        return None
    import jinja2

    from mixattn.openai_api import chat_template_env

    path = Path(value)
    if "{" not in value and not path.is_file():
        raise ValueError(f"--chat-template {value}: no such file, and not a Jinja template (a template has {{% %}} or {{{{ }}}})")
    text = path.read_text() if "{" not in value else value
    try:
        chat_template_env().from_string(text)
    except jinja2.TemplateError as e:
        raise ValueError(f"--chat-template {value}: the template does not compile: {e}") from None
    return text


def _tokenizer_for(model, name_or_path: str | None):
    """The tokenizer: the one given, else the one the checkpoint records (the
    training data's); checked against the model (every id it makes must be an
    embedding row) and against the record (a different one is warned about)."""
    from mixattn.data import load_tokenizer

    recorded = getattr(model, "trained_tokenizer", None)
    if name_or_path is None:
        if recorded is None:
            raise ValueError("--tokenizer is needed: this checkpoint records no tokenizer (it was trained on data "
                             "written before mixattn recorded them, or not by `mixattn data`)")
        if Path(recorded["path"]).is_absolute() and not Path(recorded["path"]).exists():
            raise ValueError(f"the checkpoint's tokenizer {recorded['path']!r} (the training data's) is not here any more; "
                             "give --tokenizer")
        name_or_path = recorded["path"]
        print(f"tokenizer: {name_or_path} (recorded in the checkpoint)", file=sys.stderr)
    tok = load_tokenizer(name_or_path)
    if tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is {model.cfg.vocab_size}")
    sha = tok.fingerprint() if recorded is not None else None
    if recorded is not None and sha != recorded["sha256"]:
        print(f"warning: --tokenizer {name_or_path} (sha256 {sha[:12]}) is not the tokenizer this model was "
              f"trained with ({recorded['path']}, sha256 {recorded['sha256'][:12]}): its ids mean other text", file=sys.stderr)
    return tok


def _device(name: str) -> str:
    """auto, cpu, cuda or cuda:N; CUDA only where a device is visible."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        n = torch.cuda.device_count()
        index = int(name[5:]) if ":" in name else 0
        if index >= n:
            raise ValueError(f"--device {name}: {n} CUDA device(s) visible here; valid: auto, cpu"
                             + "".join(f", cuda:{i}" for i in range(n)))
        return name
    raise ValueError(f"unknown --device {name!r}; valid: auto, cpu, cuda, cuda:N")


def _dtype(name: str, device: str):
    """fp32, bf16, fp16 or auto (bf16 on CUDA, fp32 on CPU). Half precision on
    a CPU is refused unless the CPU computes it natively (AVX512-BF16 or AMX):
    elsewhere torch emulates it, many times slower than fp32."""
    import torch

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in dtypes:
        raise ValueError(f"unknown --dtype {name!r}; valid: auto, {', '.join(dtypes)}")
    if device == "cpu" and name != "fp32":
        native = torch.cpu._is_avx512_bf16_supported() if name == "bf16" else torch.cpu._is_amx_fp16_supported()
        if not native:
            raise ValueError(f"--dtype {name} on this CPU ({torch.backends.cpu.get_cpu_capability()}, no native {name}) "
                             "would be emulated, many times slower; valid here: fp32 (or a CUDA --device)")
    return dtypes[name]


def _cmd_eval_perplexity(args) -> int:
    from tabulate import tabulate

    from mixattn.checkpoint import load_model
    from mixattn.data import read_data_meta
    from mixattn.evaluate import loss_by_position, mds_batches, text_batches

    model = load_model(args.checkpoint, device=_device(args.device))
    edges = args.buckets or [0] + [2**k for k in range(7, 40) if 2**k < model.cfg.max_seq_len]
    if args.text:
        tok = _tokenizer_for(model, args.tokenizer)
        seq_len = args.seq_len or model.cfg.max_seq_len
        if not 2 <= seq_len <= model.cfg.max_seq_len:
            raise ValueError(f"--seq-len {seq_len} must be in [2, {model.cfg.max_seq_len}] (the model's max_seq_len)")
        batches = text_batches(args.text, tok, seq_len, args.batch_size, args.max_batches, args.text_field)
    else:
        meta = read_data_meta(args.data) or {}
        batches = mds_batches(args.data, args.batch_size, meta.get("eos_id"), args.max_batches)
    rows = loss_by_position(model, batches, edges)
    print(tabulate([(r["positions"], r["tokens"], f"{r['loss']:.4f}", f"{r['perplexity']:.2f}") for r in rows],
                   headers=["target positions", "tokens", "loss", "perplexity"]))
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint": args.checkpoint, "data": args.data or args.text, "rows": rows}, indent=2))
    return 0


def _cmd_eval_icl(args) -> int:
    from tabulate import tabulate

    from mixattn.checkpoint import load_model
    from mixattn.icl import evaluate_task, load_task

    tasks = {Path(t).stem: load_task(t) for t in args.tasks}  # every file checked before the model loads
    if len(tasks) != len(args.tasks):
        raise ValueError(f"two task files share a name: {args.tasks}")
    model = load_model(args.checkpoint, device=_device(args.device))
    tok = _tokenizer_for(model, args.tokenizer)
    results = {name: evaluate_task(model, tok, ex, args.shots, args.separator, args.seed, args.max_new_tokens, args.batch_size)
               for name, ex in tasks.items()}
    fmt = lambda v: "" if v is None else f"{v:.3f}"
    print(tabulate([(n, r["examples"], r["shots"], fmt(r.get("acc")), fmt(r.get("acc_norm")), fmt(r.get("exact_match")))
                    for n, r in results.items()], headers=["task", "examples", "shots", "acc", "acc_norm", "exact_match"]))
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint": args.checkpoint, "tasks": results}, indent=2))
    return 0


def _cmd_eval_retrieval(args) -> int:
    from tabulate import tabulate

    from mixattn.checkpoint import load_model
    from mixattn.data import expand_inputs
    from mixattn.demo import stdlib_corpus
    from mixattn.evaluate import model_label, retrieval_heatmap, retrieval_table
    from mixattn.retrieval import evaluate, make_suite

    model = load_model(args.checkpoint, device=_device(args.device))
    tok = _tokenizer_for(model, args.tokenizer)
    files = expand_inputs(args.haystack) if args.haystack else stdlib_corpus()
    haystack = "".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    too_short = _too_short_lengths(args.tasks, tok, haystack, args.lengths)
    if too_short:
        raise ValueError("; ".join(f"task {t}: --lengths {n} leaves no room for the haystack beside its facts and "
                                   f"question; the smallest length that works for {t} is {need}" for t, n, need in too_short))
    longest = max(args.lengths) + args.max_new_tokens
    if longest > model.cfg.max_seq_len:
        raise ValueError(f"--lengths up to {max(args.lengths)} + --max-new-tokens {args.max_new_tokens} exceed the model's "
                         f"max_seq_len {model.cfg.max_seq_len}")
    suite = make_suite(args.tasks, tok, haystack, args.lengths, args.depths, args.samples, args.seed)
    records = evaluate(model, tok, suite, args.max_new_tokens)
    table = retrieval_table(records)
    print(tabulate([(r["task"], r["length"], f"{r['depth']:.2f}", f"{r['accuracy']:.2f}") for r in table],
                   headers=["task", "length", "depth", "accuracy"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "retrieval.json").write_text(json.dumps({"checkpoint": args.checkpoint, "config": {
        k: v for k, v in vars(args).items() if k != "func"}, "table": table, "records": records}, indent=2))
    retrieval_heatmap(table, out / "retrieval.png",
                      title=f"{model_label(model, args.checkpoint)}: retrieval accuracy, mean of {', '.join(args.tasks)}")
    print(f"wrote {out / 'retrieval.json'} and {out / 'retrieval.png'}")
    return 0


def _too_short_lengths(tasks, tok, haystack, lengths) -> list[tuple[str, int, int]]:
    """(task, length, the smallest length that works for the task) for each
    --lengths value too short for a task, found before any model runs."""
    from mixattn.retrieval import make_sample

    hay_ids = tok.encode_batch([haystack[:400_000]])[0]

    def fits(task, n):
        try:
            make_sample(task, tok, hay_ids, n, 0.5, 0)
            return True
        except ValueError:
            return False

    out = []
    for task in tasks:
        short = [n for n in lengths if not fits(task, n)]
        if short:
            lo, hi = max(short), max(max(short) + 1, 8192)
            while lo + 1 < hi:  # the smallest length that fits (bisection on the sample builder)
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if fits(task, mid) else (mid, hi)
            out += [(task, n, hi) for n in short]
    return out


def _cmd_demo(args) -> int:
    from mixattn.demo import run_demo

    run_demo(args.workdir, overrides=args.overrides)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, OSError) as e:  # PlanError, ConfigError, DataError are ValueErrors
        # a KeyError's str() is its key's repr, quotes and all: print the message itself
        message = e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str) else e
        print(f"mixattn {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
