"""Decode speed and KV memory of the plan-shaped cache (GPU).

    python benchmarks/decode.py                       # the full sweep
    python benchmarks/decode.py --plot benchmarks/results/decode/decode.json   # the plot only (any machine)

A ~1.3B model (24 layers, d_model 2048, 16 heads of 128, vocab 50304; random
bf16 weights: speed does not depend on them). For each plan, context and
batch size the cache is filled to ``context`` tokens (positions set, K/V
random: a decode step costs the same whatever the values), one decode step
(``mixattn.generate.decode_step``: every layer, the cache write, attention
over the cache, the logits) is captured in a CUDA graph and replayed.

Reported per point: ms per step, tokens/s (batch / step time), the cache's
bytes (KVCache.nbytes), peak GPU memory, and the memory-bandwidth floor:
(weight bytes + K/V bytes a step reads) / measured device copy bandwidth.
Then, under a memory budget (default 80 GiB minus 10%): the largest batch
each plan fits at 32K, and each plan's tokens/s at standard's largest batch.
Writes benchmarks/results/decode/decode.json and decode.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

DIMS = dict(vocab_size=50304, d_model=2048, n_layers=24, n_heads=16)
PLANS = ["standard", "ma", "ma_offset", "ma_pairs", "all_sliding"]


def copy_bandwidth() -> float:
    """Bytes/s of a device-to-device copy (read + write counted)."""
    import torch

    x = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    s = start.elapsed_time(end) / 1e3 / 10
    del x, y
    return 2 * 2 * 2**30 / s


def fill(cache, context: int) -> None:
    """Mark ``context`` tokens present (positions 0..context-1) in every
    position group and fill every store with random K/V."""
    import torch

    for g in cache.groups:
        slots = torch.arange(g.cap, device=g.pos.device, dtype=torch.int32)
        if g.ring:
            pos = torch.arange(context - g.cap, context, device=g.pos.device, dtype=torch.int32)
            g.pos.copy_(pos[torch.remainder(slots - context, g.cap)].expand_as(g.pos))
        else:
            g.pos.copy_(torch.where(slots < context, slots, torch.full_like(slots, -1)).expand_as(g.pos))
    for store in cache.stores.values():
        store.kv.normal_()


def kernel_profile(replay, top: int = 25) -> list[dict]:
    """The GPU kernels of a few graph replays, by total time (torch.profiler)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            replay()
        torch.cuda.synchronize()
    rows = [{"kernel": e.key[:120], "calls_per_step": e.count / 5, "us_per_step": e.device_time_total / 5}
            for e in prof.key_averages() if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r["us_per_step"])[:top]


def time_decode(model, plan_cache, batch: int, context: int, iters: int, step=None, profile_into: dict | None = None) -> float:
    """ms per decode step at ``context`` tokens, CUDA-graph replay."""
    import torch

    from mixattn.generate import decode_step

    decode_step = step or decode_step
    tokens = torch.randint(0, DIMS["vocab_size"], (batch, 1), device="cuda")
    positions = torch.full((batch, 1), context, device="cuda")
    snapshot = [g.pos.clone() for g in plan_cache.groups]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(2):
            decode_step(model, plan_cache, tokens, positions)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        out = decode_step(model, plan_cache, tokens, positions)
    for g, pos in zip(plan_cache.groups, snapshot):  # the step wrote position `context`; same work every replay
        g.pos.copy_(pos)
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    if profile_into is not None:
        profile_into["kernels"] = kernel_profile(graph.replay)
    del graph, out
    return start.elapsed_time(end) / iters


def run(args) -> dict:
    import torch
    from common import apply_inductor_settings, apply_settings, prepare_gpu

    from mixattn.generate import new_cache
    from mixattn.model import MixAttentionLM, ModelConfig
    from mixattn.plan import kv_cache_bytes

    if not prepare_gpu("benchmarks/decode.py", recompile_limit=64):
        raise SystemExit(2)
    bw = copy_bandwidth()
    apply_inductor_settings(args.inductor)
    import mixattn.decode_kernel

    apply_settings(mixattn.decode_kernel, args.kernel, "--kernel")
    step = None
    if args.compile:  # inductor fuses the per-layer glue; the CUDA graph still wraps the whole step
        from mixattn.generate import decode_step

        step = torch.compile(decode_step, dynamic=False, mode="default")
    max_len = max(args.contexts + [args.budget_context]) + 1
    rows, weights_bytes, std_max = [], None, None
    budget = args.budget_gib * 2**30
    for plan in args.plans:
        cfg = ModelConfig(**DIMS, max_seq_len=max_len, plan=plan, window=args.window)
        torch.manual_seed(0)
        model = MixAttentionLM(cfg).to("cuda", torch.bfloat16).eval()
        if args.gemv:  # one-row projections through mixattn's Triton GEMV instead of cuBLAS
            from mixattn.decode_kernel import use_gemv

            use_gemv(model)
        weights_bytes = sum(p.nbytes for p in model.parameters())
        per_seq = kv_cache_bytes(model.plan, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                                 context_len=args.budget_context + 1, batch_size=1, dtype="bf16")
        max_batch = int((budget * 0.9 - weights_bytes) // per_seq)
        points = [(c, b) for c in args.contexts for b in args.batches]
        if args.budget:
            points.append((args.budget_context, "max"))
            if plan == "standard":
                std_max = max_batch
            elif std_max is not None:
                points.append((args.budget_context, std_max))  # the comparison at standard's largest batch
        for context, batch in points:
            b = max_batch if batch == "max" else batch
            cache = None
            for attention in args.attention:  # side by side on the same cache
                row = {"plan": plan, "context": context, "batch": b, "batch_is_plan_max": batch == "max",
                       "compiled": args.compile, "attention": attention}
                try:
                    if cache is None:
                        cache = new_cache(model, b, context + 1)
                        fill(cache, context)
                    cache.attention = attention
                    torch.cuda.reset_peak_memory_stats()
                    ms = time_decode(model, cache, b, context, args.iters, step, row if args.profile else None)
                    floor_ms = (weights_bytes + cache.nbytes) / bw * 1e3  # a step reads every owner's whole store
                    row.update(ms_per_step=ms, tokens_per_s=b / (ms / 1e3), cache_bytes=cache.nbytes,
                               cache_metadata_bytes=cache.metadata_bytes, floor_ms=floor_ms, vs_floor=ms / floor_ms,
                               peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30,
                               expected_cache_bytes=kv_cache_bytes(model.plan, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                                                                   context_len=context + 1, batch_size=b, dtype="bf16"))
                except Exception as e:  # out of memory, a kernel that does not compile: recorded, not hidden
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                torch.cuda.empty_cache()
                rows.append(row)
                print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "kernels"}, flush=True)
            del cache
            torch.cuda.empty_cache()
        rows.append({"plan": plan, "budget_max_batch": max_batch, "kv_bytes_per_sequence": per_seq})
        del model
        torch.cuda.empty_cache()
    return {"copy_bandwidth_bytes_per_s": bw, "weights_bytes": weights_bytes, "rows": rows}


def summarize(result: dict, budget_context: int, attention: str = "sdpa") -> list[dict]:
    rows = [r for r in result["rows"] if "ms_per_step" in r and r.get("attention", "sdpa") == attention]
    maxes = {r["plan"]: r["budget_max_batch"] for r in result["rows"] if "budget_max_batch" in r}
    std_b = maxes.get("standard")
    out = []
    for plan, mb in maxes.items():
        at_std = next((r for r in rows if r["plan"] == plan and r["context"] == budget_context and r["batch"] == std_b), None)
        at_max = next((r for r in rows if r["plan"] == plan and r["context"] == budget_context and r["batch_is_plan_max"]), None)
        std_at_std = next((r for r in rows if r["plan"] == "standard" and r["context"] == budget_context and r["batch"] == std_b), None)
        out.append({
            "plan": plan, "attention": attention, "max_batch": mb, "max_batch_vs_standard": mb / std_b if std_b else None,
            "tokens_per_s_at_standard_max_batch": at_std["tokens_per_s"] if at_std else None,
            "speedup_at_standard_max_batch": at_std["tokens_per_s"] / std_at_std["tokens_per_s"] if at_std and std_at_std else None,
            "tokens_per_s_at_own_max_batch": at_max["tokens_per_s"] if at_max else None,
        })
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = result.get("config", {}).get("attention", ["sdpa"])[0]
    rows = [r for r in result["rows"] if "ms_per_step" in r and not r["batch_is_plan_max"] and r["batch"] == 1
            and r.get("attention", "sdpa") == first]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for plan in dict.fromkeys(r["plan"] for r in rows):
        pts = sorted((r["context"], r["cache_bytes"] / 2**30, r["tokens_per_s"]) for r in rows if r["plan"] == plan)
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=plan)
        ax2.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=plan)
    for ax, title in ((ax1, "KV cache (GiB), batch 1"), (ax2, "decode tokens/s, batch 1")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax1.set_yscale("log")
    ax2.legend()
    fig.suptitle(f"1.3B model, {result.get('environment', {}).get('device', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    from mixattn.attention import CACHED_ATTENTION

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plans", nargs="+", default=PLANS)
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--batches", type=int, nargs="+", default=[1])
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--budget-gib", type=float, default=80.0)
    parser.add_argument("--budget-context", type=int, default=32768)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step (inside the CUDA graph)")
    parser.add_argument("--inductor", nargs="+", default=[], metavar="KEY=VALUE",
                        help="torch._inductor.config settings for --compile (JSON values), e.g. coordinate_descent_tuning=true")
    parser.add_argument("--kernel", nargs="+", default=[], metavar="KEY=VALUE",
                        help="launch settings of the triton attention (mixattn.decode_kernel), e.g. BLOCK_N=128 NUM_WARPS=8")
    parser.add_argument("--gemv", action="store_true", help="batch-1 projections through mixattn.decode_kernel.use_gemv")
    parser.add_argument("--profile", action="store_true", help="also record each point's top GPU kernels (torch.profiler)")
    parser.add_argument("--attention", nargs="+", default=["sdpa"], choices=sorted(CACHED_ATTENTION.names()),
                        help="cached-attention implementations, measured side by side on the same cache")
    parser.add_argument("--budget", action=argparse.BooleanOptionalAction, default=True,
                        help="add the memory-budget points (each plan's largest batch at --budget-context)")
    parser.add_argument("--name", default="decode")
    parser.add_argument("--out", default=None)
    parser.add_argument("--plot", metavar="JSON", help="only draw the plot from a result file")
    args = parser.parse_args(argv)
    if args.plot:
        result = json.loads(Path(args.plot).read_text())
        png = Path(args.plot).with_suffix(".png")
        plot(result, png)
        print(f"wrote {png}")
        return 0
    from common import write_result
    from tabulate import tabulate

    result = run(args)
    result["summary"] = [s for a in args.attention for s in summarize(result, args.budget_context, a)] if args.budget else []
    rows = [r for r in result["rows"] if "context" in r]
    print(tabulate([(r["plan"], r["attention"], r["context"], r["batch"],
                     f"{r['ms_per_step']:.2f}" if "ms_per_step" in r else r["error"],
                     f"{r.get('tokens_per_s', 0):,.0f}", f"{r.get('cache_bytes', 0) / 2**30:.2f}",
                     f"{r.get('vs_floor', 0):.2f}x", f"{r.get('peak_mem_gib', 0):.1f}") for r in rows],
                   headers=["plan", "attention", "context", "batch", "ms/step", "tokens/s", "cache GiB", "vs floor", "peak GiB"]))
    print(tabulate([(s["plan"], s["attention"], s["max_batch"], f"{s['max_batch_vs_standard']:.1f}x",
                     f"{s['tokens_per_s_at_standard_max_batch'] or 0:,.0f}", f"{s['speedup_at_standard_max_batch'] or 0:.2f}x",
                     f"{s['tokens_per_s_at_own_max_batch'] or 0:,.0f}") for s in result["summary"]],
                   headers=["plan", "attention", f"max batch @{args.budget_context}", "vs standard", "tok/s @ std max batch", "speedup",
                            "tok/s @ own max batch"]))
    for r in rows:
        if "kernels" in r:
            print(f"\n{r['plan']} context {r['context']} batch {r['batch']}: {r['ms_per_step']:.2f} ms/step, top kernels")
            print(tabulate([(k["kernel"][:90], f"{k['calls_per_step']:.0f}", f"{k['us_per_step']:.1f}") for k in r["kernels"]],
                           headers=["kernel", "calls/step", "us/step"]))
    path = write_result(args.name, {"config": vars(args), **result}, args.out, topic="decode")
    plot(json.loads(path.read_text()), path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
