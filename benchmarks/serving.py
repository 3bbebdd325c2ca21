"""The paper's serving workload through the continuous-batching engine (GPU).

    python benchmarks/serving.py                     # 64 prompts of ~31K tokens, 512 out, 40 GiB of KV cache
    python benchmarks/serving.py --plot benchmarks/results/serving/serving.json

The paper (its SGLang experiment): 300 prompts of about 31K tokens in and 1K
out on one H100, about 580 s for standard attention against about 299 s for
MA-Offset, with about 2.7x the tokens in flight. Here, scaled to one call:
``--prompts`` prompts of ``--prompt-len`` tokens (each 0-3% shorter, random
ids), ``--out-tokens`` greedy tokens each (no stop token: every request
generates all of them), all submitted at once to a :class:`mixattn.engine.Engine`
whose cache gets ``--kv-budget`` bytes: as many rows of ``--context`` tokens
as the plan-shaped cache fits (``max_slots_for``), at most one per prompt.
The model is ``benchmarks/decode.py``'s 1.3B (random bf16 weights; speed does
not depend on them), window 1024.

The path measured is the engine's default, the one ``mixattn serve`` runs:
chunked prefill on the request's row (SDPA over the cache under a position
mask; ``--prefill ordered`` the opt-in mask-free path), then the default
decode path (``DecodePath.resolve``: on CUDA with Triton, the compiled step
replayed from a CUDA graph with mixattn's Triton attention), compiled and
captured by one request of two prefill chunks before the clock starts (``startup_s``). Per plan: wall time, output tokens/s, time to first token (mean, p50,
p90), the most tokens held in the cache at once, rows, cache bytes, peak
memory. Writes benchmarks/results/serving/NAME.json and NAME.png.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode import DIMS  # noqa: E402

PLANS = ["standard", "ma", "ma_offset", "ma_pairs"]


def run_plan(args, plan: str, budget: int | None, prefill: str = "masked") -> dict:
    import torch

    from mixattn.engine import Engine, Request, max_slots_for
    from mixattn.generate import DecodePath
    from mixattn.model import MixAttentionLM, ModelConfig
    from mixattn.plan import parse_bytes

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dims = dict(vocab_size=512, d_model=64, n_layers=24, n_heads=4) if args.tiny else DIMS
    torch.manual_seed(0)
    cfg = ModelConfig(**dims, max_seq_len=args.context, plan=plan, window=args.window, attn_backend=args.attn_backend)
    model = MixAttentionLM(cfg).to(device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32).eval()
    slots = min(args.prompts, max_slots_for(model, args.context, parse_bytes(args.kv_budget)))
    if slots < 1:
        return {"plan": plan, "error": f"--kv-budget {args.kv_budget} fits no row of {args.context} tokens"}
    engine = Engine(model, max_slots=slots, max_context=args.context, chunk_size=args.chunk_size,
                    prefill_budget=budget, decode=DecodePath.resolve(device, prefill=prefill))
    rng = random.Random(1)
    lengths = [args.prompt_len - rng.randint(0, args.prompt_len // 32) for _ in range(args.prompts)]
    prompts = [[rng.randrange(cfg.vocab_size) for _ in range(n)] for n in lengths]
    t_warm = time.perf_counter()
    # start-up, untimed: compiles the decode step and captures its CUDA graph, and runs two full prefill
    # chunks (the first, and one over a full ring) so that what ordered prefill compiles is compiled
    engine.submit(Request([1] * min(2 * args.chunk_size + 8, args.context - 4), 3))
    engine.run()
    warmup_s = time.perf_counter() - t_warm
    engine.max_in_flight_tokens = 0
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    requests = [engine.submit(Request(p, args.out_tokens)) for p in prompts]
    engine.run()
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    ttft = sorted(r.first_token_at - t0 for r in requests)
    out = sum(len(r.tokens) for r in requests)
    row = {"plan": plan, "prefill": prefill, "attn_backend": args.attn_backend, "prefill_budget": engine.prefill_budget, "chunk_size": args.chunk_size, "prompts": args.prompts, "prompt_tokens": sum(lengths), "output_tokens": out, "rows": slots,
           "kv_cache_bytes": engine.cache.nbytes, "wall_s": wall, "output_tokens_per_s": out / wall,
           "ttft_mean_s": sum(ttft) / len(ttft), "ttft_p50_s": ttft[len(ttft) // 2], "ttft_p90_s": ttft[int(len(ttft) * 0.9)],
           "max_in_flight_tokens": engine.max_in_flight_tokens, "decode_path": engine.decode_path.describe(),
           "startup_s": warmup_s,
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}
    del engine, model
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def summary(rows: list[dict]) -> list[dict]:
    """One line per row, each plan against standard at the same prefill budget and prefill attention."""
    out = []
    for r in rows:
        base = next((b for b in rows if b["plan"] == "standard" and "error" not in b
                     and b.get("prefill_budget") == r.get("prefill_budget")
                     and b.get("prefill", "masked") == r.get("prefill", "masked")), None)
        ok = base is not None and "error" not in r
        out.append({"plan": r["plan"], "prefill": r.get("prefill", "masked"), "prefill budget": r.get("prefill_budget"),
                    "rows": r.get("rows"),
                    "wall s": round(r.get("wall_s", 0), 1), "out tok/s": round(r.get("output_tokens_per_s", 0)),
                    "vs standard": f"{r['output_tokens_per_s'] / base['output_tokens_per_s']:.2f}x" if ok else "",
                    "TTFT p50 s": round(r.get("ttft_p50_s", 0), 1), "max in flight": r.get("max_in_flight_tokens"),
                    "in flight vs standard": f"{r['max_in_flight_tokens'] / base['max_in_flight_tokens']:.1f}x" if ok else "",
                    "error": r.get("error", "")})
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    head = result["rows"][0] if result["rows"] else {}  # the plot shows the first budget and prefill attention
    first = head.get("prefill_budget")
    rows = [r for r in result["rows"] if "error" not in r and r.get("prefill_budget") == first
            and r.get("prefill", "masked") == head.get("prefill", "masked")]
    names = [r["plan"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, label in zip(axes, ["output_tokens_per_s", "max_in_flight_tokens", "wall_s"],
                              ["output tokens/s (higher is better)", "most tokens in flight (higher is better)",
                               "wall time, s (lower is better)"]):
        ax.bar(names, [r[key] for r in rows], color=["C1" if n == "standard" else "C0" for n in names])
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="x", labelrotation=20)
    c = result["config"]
    fig.suptitle(f"{c['prompts']} prompts of ~{c['prompt_len']} tokens, {c['out_tokens']} out, {c['kv_budget']} of KV cache, "
                 f"prefill budget {first}; "
                 f"{result.get('environment', {}).get('device', '')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plans", nargs="+", default=PLANS)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=31744)
    parser.add_argument("--out-tokens", type=int, default=512)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--kv-budget", default="40GiB")
    parser.add_argument("--chunk-size", type=int, default=2048, help="prefill chunk (mixattn serve's default)")
    parser.add_argument("--prefill-budget", type=int, nargs="+", default=[None],
                        help="prompt tokens prefilled per engine step (default: the engine's, as mixattn serve); "
                             "several: each plan at each, in that order")
    parser.add_argument("--prefill", nargs="+", default=["masked"], choices=["masked", "ordered"],
                        help="how prefill chunks read the cache (mixattn.kv_cache); several: each plan with each, in that order")
    parser.add_argument("--attn-backend", default="auto",
                        help="the model's attention backend, which ordered prefill attends with (auto: fa4, flash or flex on a GPU)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model (a CPU check of the program)")
    parser.add_argument("--name", default="serving")
    parser.add_argument("--out", default=None)
    parser.add_argument("--plot", metavar="JSON", help="only draw the plot of a result file")
    args = parser.parse_args(argv)
    from common import write_result
    from tabulate import tabulate

    if args.plot:
        plot(json.loads(Path(args.plot).read_text()), Path(args.plot).with_suffix(".png"))
        return 0
    rows = []
    config = {k: v for k, v in vars(args).items() if k not in ("plot",)}
    for prefill in args.prefill:
        for budget in args.prefill_budget:
            for plan in args.plans:
                rows.append(run_plan(args, plan, budget, prefill))
                print(json.dumps(rows[-1]), flush=True)
                path = write_result(args.name, {"config": config, "rows": rows}, args.out, topic="serving")
    print(tabulate(summary(rows), headers="keys"))
    result = json.loads(path.read_text())
    plot(result, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
