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
bytes (KVCache.nbytes), peak GPU memory, and two memory-bandwidth floors
over the measured device copy bandwidth: ``floor_ms``, (weight bytes + the
cache's K/V bytes, each store once), the issue's bar; ``read_floor_ms``,
(weight bytes + every layer's reads, a sharing layer re-reading its owner's
store: mixattn.plan.kv_read_bytes), what a step must move.

The step is the product's default (``mixattn.generate.DecodePath.resolve``:
on CUDA with Triton, mixattn's split-KV attention and GEMV, the step
compiled and replayed from a CUDA graph through ``GraphedStep``, as
``generate``, the engine and the CLI run it); ``--attention``, ``--gemv``,
``--compile``, ``--cuda-graph`` switch its parts, side by side in one call.

Then, under a memory budget (default 80 GiB): the largest batch each plan
fits at 32K by ``mixattn.memory.max_decode_batch`` (everything a generation
allocates, 5% reserved), each run in a fresh process that prefills one
group of rows through the whole context for real (the prefill's working set
does not grow with the batch), fills the other rows with random K/V and
decodes; and each plan's tokens/s at standard's largest batch. Writes
benchmarks/results/decode/decode.json and decode.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
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


def time_decode(model, cache, batch: int, context: int, iters: int, step, profile_into: dict | None = None) -> tuple[float, float]:
    """(ms per decode step at ``context`` tokens, seconds of the first call:
    compiling and capturing). A step writes the same slot whenever it runs
    with the same inputs, so every call does the same work."""
    import torch

    tokens = torch.randint(0, DIMS["vocab_size"], (batch, 1), device="cuda")
    positions = torch.full((batch, 1), context, device="cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    step(model, cache, tokens, positions)
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    for _ in range(3):
        step(model, cache, tokens, positions)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        step(model, cache, tokens, positions)
    end.record()
    torch.cuda.synchronize()
    if profile_into is not None:
        profile_into["kernels"] = kernel_profile(lambda: step(model, cache, tokens, positions))
    return start.elapsed_time(end) / iters, first_s


def decode_path(args, attention: str):
    from mixattn.generate import DecodePath

    return DecodePath.resolve("cuda", attention=attention, gemv=args.gemv, compile=args.compile,
                              cuda_graph=args.cuda_graph, fuse=args.fuse, persistent=args.persistent, flag="--")


def build(plan: str, max_len: int, window: int):
    import torch

    from mixattn.model import MixAttentionLM, ModelConfig

    cfg = ModelConfig(**DIMS, max_seq_len=max_len, plan=plan, window=window)
    torch.manual_seed(0)
    return MixAttentionLM(cfg).to("cuda", torch.bfloat16).eval()


def planned_max_batch(model, context: int, budget: int, attention: str, chunk: int) -> int:
    from mixattn.memory import max_decode_batch, model_bytes
    from mixattn.plan import kv_cache_bytes

    cfg = model.cfg
    per_row = kv_cache_bytes(model.plan, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, context_len=context + 1,
                             batch_size=1, dtype="bf16")
    return max_decode_batch(budget, cfg, model.plan, context=context + 1, weight_bytes=model_bytes(model),
                            kv_bytes_per_row=per_row, chunk_size=chunk, attention=attention)


def one_point(args) -> dict:
    """``--one PLAN:CONTEXT:BATCH`` in a fresh process: build, prefill one
    group of rows for real, fill the rest, decode; peak memory against the
    estimate."""
    import torch

    from mixattn.generate import PREFILL_TOKENS, new_cache, prefill
    from mixattn.memory import decode_memory, model_bytes

    plan, context, batch = args.one.split(":")
    context, batch = int(context), int(batch)
    path = decode_path(args, args.attention[0])
    model = path.prepare(build(plan, context + 1, args.window))
    row = {"plan": plan, "context": context, "batch": batch, "batch_is_plan_max": True, "fresh_process": True,
           "path": path.describe(), "attention": path.attention}
    try:
        cache = new_cache(model, batch, context + 1, attention=path.attention)
        fill(cache, context)
        group = min(batch, max(1, PREFILL_TOKENS // args.chunk_size))
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, DIMS["vocab_size"], (context,), generator=g).tolist() for _ in range(group)]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        prefill(model, cache.rows(0, group), prompts, chunk_size=args.chunk_size)
        torch.cuda.synchronize()
        row["prefilled_rows"], row["prefill_s"] = group, time.perf_counter() - t0
        ms, first_s = time_decode(model, cache, batch, context, args.iters, path.step_fn())
        cfg = model.cfg
        est = decode_memory(cfg, model.plan, batch=batch, context=context + 1, weight_bytes=model_bytes(model),
                            kv_bytes=cache.nbytes, chunk_size=args.chunk_size, attention=path.attention)
        peak = torch.cuda.max_memory_allocated()
        row.update(ms_per_step=ms, first_step_s=first_s, tokens_per_s=batch / (ms / 1e3), cache_bytes=cache.nbytes,
                   peak_mem_gib=peak / 2**30, peak_bytes=peak, estimate=est.as_dict(), estimate_over_peak=est.peak / peak,
                   reserved_gib=torch.cuda.max_memory_reserved() / 2**30)
    except Exception as e:  # out of memory: recorded, not hidden
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return row


def run(args, rows: list) -> dict:
    """Every point's row is appended to ``rows`` as it is measured (a run cut
    short still writes what it has)."""
    import subprocess

    import torch
    from common import apply_inductor_settings, apply_settings, prepare_gpu

    from mixattn.generate import new_cache
    from mixattn.memory import decode_memory, model_bytes
    from mixattn.plan import kv_cache_bytes, kv_read_bytes

    if not prepare_gpu("benchmarks/decode.py", recompile_limit=64):
        raise SystemExit(2)
    bw = copy_bandwidth()
    apply_inductor_settings(args.inductor)
    import mixattn.decode_kernel

    apply_settings(mixattn.decode_kernel, args.kernel, "--kernel")
    import mixattn.persistent

    apply_settings(mixattn.persistent, args.persistent_kernel, "--persistent-kernel")
    max_len = max(args.contexts + [args.budget_context]) + 1
    weights_bytes, std_max = None, None
    budget = int(args.budget_gib * 2**30)

    def add_floors(row, model):
        cfg = model.cfg
        reads = kv_read_bytes(model.plan, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, context_len=row["context"] + 1,
                              batch_size=row["batch"], dtype="bf16")
        row["floor_ms"] = (weights_bytes + row["cache_bytes"]) / bw * 1e3  # a step reads every owner's whole store
        row["read_floor_ms"] = (weights_bytes + reads) / bw * 1e3  # ... and each sharer reads its owner's again
        row["vs_floor"] = row["ms_per_step"] / row["floor_ms"]
        row["vs_read_floor"] = row["ms_per_step"] / row["read_floor_ms"]

    for plan in args.plans:
        model = build(plan, max_len, args.window)
        cfg = model.cfg
        weights_bytes = sum(p.nbytes for p in model.parameters())
        for attention in args.attention:  # side by side: the default path and the ones asked for
            path = decode_path(args, attention)
            path.prepare(model)
            for context in args.contexts:
                for b in args.batches:
                    row = {"plan": plan, "context": context, "batch": b, "batch_is_plan_max": False,
                           "path": path.describe(), "attention": path.attention, "compiled": path.compile,
                           "gemv": path.gemv, "fuse": path.fuse, "cuda_graph": path.cuda_graph}
                    try:
                        cache = new_cache(model, b, context + 1, attention=path.attention)
                        fill(cache, context)
                        torch.cuda.reset_peak_memory_stats()
                        step = path.step_fn()
                        ms, first_s = time_decode(model, cache, b, context, args.iters, step,
                                                  row if args.profile else None)
                        if path.persistent:  # did the steps run in the kernel, or fall back (and why, on stderr)
                            row["persistent_in_kernel"] = getattr(step, "step", step).in_kernel
                        est = decode_memory(cfg, model.plan, batch=b, context=context + 1,
                                            weight_bytes=model_bytes(model), kv_bytes=cache.nbytes, attention=path.attention)
                        row.update(ms_per_step=ms, first_step_s=first_s, tokens_per_s=b / (ms / 1e3), cache_bytes=cache.nbytes,
                                   cache_metadata_bytes=cache.metadata_bytes,
                                   peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30,
                                   estimate_step_gib=est.step / 2**30,
                                   expected_cache_bytes=kv_cache_bytes(model.plan, n_kv_heads=cfg.n_kv_heads,
                                                                       head_dim=cfg.head_dim, context_len=context + 1,
                                                                       batch_size=b, dtype="bf16"))
                        add_floors(row, model)
                    except Exception as e:  # out of memory, a kernel that does not compile: recorded, not hidden
                        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                    cache = None
                    torch.cuda.empty_cache()
                    rows.append(row)
                    print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "kernels"},
                          flush=True)
        if args.budget:
            path = decode_path(args, args.attention[0])
            max_batch = planned_max_batch(model, args.budget_context, budget, path.attention, args.chunk_size)
            points = [max_batch]
            if plan == "standard":
                std_max = max_batch
            elif std_max is not None and args.compare:
                points.append(std_max)  # the comparison at standard's largest batch
            for b in points:
                cmd = [sys.executable, __file__, "--one", f"{plan}:{args.budget_context}:{b}", "--window", str(args.window),
                       "--iters", str(args.iters), "--chunk-size", str(args.chunk_size), "--attention", args.attention[0],
                       *(["--gemv" if args.gemv else "--no-gemv"] if args.gemv is not None else []),
                       *(["--compile" if args.compile else "--no-compile"] if args.compile is not None else []),
                       *(["--fuse", args.fuse] if args.fuse is not None else [])]
                done = subprocess.run(cmd, capture_output=True, text=True)
                line = next((x for x in done.stdout.splitlines() if x.startswith("ROW ")), None)
                row = json.loads(line[4:]) if line else {"plan": plan, "context": args.budget_context, "batch": b,
                                                          "error": f"the process failed: {done.stderr[-400:]}"}
                row["batch_is_plan_max"] = b == max_batch
                if "ms_per_step" in row:
                    add_floors(row, model)
                rows.append(row)
                print({k: v for k, v in row.items() if k != "estimate"}, flush=True)
            per_seq = kv_cache_bytes(model.plan, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                                     context_len=args.budget_context + 1, batch_size=1, dtype="bf16")
            rows.append({"plan": plan, "budget_max_batch": max_batch, "kv_bytes_per_sequence": per_seq})
        del model
        torch.cuda.empty_cache()
        torch._dynamo.reset()  # the next plan compiles as a fresh process would
    return {"copy_bandwidth_bytes_per_s": bw, "weights_bytes": weights_bytes, "rows": rows}


def summarize(result: dict, budget_context: int, attention: str) -> list[dict]:
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

    first = next((r["attention"] for r in result["rows"] if "attention" in r), "sdpa")
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


def build_parser() -> argparse.ArgumentParser:
    from mixattn.attention import CACHED_ATTENTION

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plans", nargs="+", default=PLANS)
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--batches", type=int, nargs="+", default=[1])
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--budget-gib", type=float, default=80.0)
    parser.add_argument("--budget-context", type=int, default=32768)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the decode step (default: the product's choice, on with Triton)")
    parser.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                        help="replay the step from a CUDA graph (default: on)")
    parser.add_argument("--inductor", nargs="+", default=[], metavar="KEY=VALUE",
                        help="torch._inductor.config settings for --compile (JSON values), e.g. coordinate_descent_tuning=true")
    parser.add_argument("--kernel", nargs="+", default=[], metavar="KEY=VALUE",
                        help="launch settings of the triton attention (mixattn.decode_kernel), e.g. BLOCK_N=128 NUM_WARPS=8")
    parser.add_argument("--gemv", action=argparse.BooleanOptionalAction, default=None,
                        help="batch-1 projections through mixattn's Triton GEMV (default: the product's choice, on with Triton)")
    parser.add_argument("--fuse", nargs="?", const="all", default=None, choices=["none", "gelu", "all"],
                        help="with the GEMV (fuse_gemv_inputs): gelu, the GELU as the up projection's epilogue (the "
                             "default with the GEMV); all (--fuse alone), the norms in their consumers' GEMVs too")
    parser.add_argument("--persistent", action=argparse.BooleanOptionalAction, default=None,
                        help="batch-1 steps' layers in one persistent kernel (mixattn.persistent; default: the product's choice)")
    parser.add_argument("--persistent-kernel", nargs="+", default=[], metavar="KEY=VALUE",
                        help="settings of the persistent kernel (mixattn.persistent), e.g. PREFETCH=false NUM_WARPS=4")
    parser.add_argument("--no-fuse", dest="fuse", action="store_const", const="none", help="--fuse none")
    parser.add_argument("--chunk-size", type=int, default=512, help="prefill chunk of the budget points")
    parser.add_argument("--one", metavar="PLAN:CONTEXT:BATCH", help=argparse.SUPPRESS)  # a budget point, in its own process
    parser.add_argument("--profile", action="store_true", help="also record each point's top GPU kernels (torch.profiler)")
    parser.add_argument("--attention", nargs="+", default=["auto"], choices=["auto", *sorted(CACHED_ATTENTION.names())],
                        help="cached attention of the decode steps, side by side on the same model (auto: the default path's)")
    parser.add_argument("--budget", action=argparse.BooleanOptionalAction, default=True,
                        help="add the memory-budget points (each plan's largest batch at --budget-context)")
    parser.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                        help="with --budget: also run every plan at standard's largest batch")
    parser.add_argument("--name", default="decode")
    parser.add_argument("--out", default=None)
    parser.add_argument("--plot", metavar="JSON", help="only draw the plot from a result file")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.one:
        print("ROW " + json.dumps(one_point(args)), flush=True)
        return 0
    if args.plot:
        result = json.loads(Path(args.plot).read_text())
        png = Path(args.plot).with_suffix(".png")
        plot(result, png)
        print(f"wrote {png}")
        return 0
    from common import write_result
    from tabulate import tabulate

    rows: list = []
    try:
        result = {**run(args, rows), "complete": True}
    except KeyboardInterrupt:  # `timeout -s INT`: keep what was measured
        result = {"rows": rows, "complete": False}
    names = dict.fromkeys(r["attention"] for r in result["rows"] if "attention" in r)
    result["summary"] = [s for a in names for s in summarize(result, args.budget_context, a)] if args.budget else []
    rows = [r for r in result["rows"] if "context" in r]
    print(tabulate([(r["plan"], r["attention"], r["context"], r["batch"],
                     f"{r['ms_per_step']:.2f}" if "ms_per_step" in r else r["error"],
                     f"{r.get('tokens_per_s', 0):,.0f}", f"{r.get('cache_bytes', 0) / 2**30:.2f}",
                     f"{r.get('vs_floor', 0):.2f}x", f"{r.get('vs_read_floor', 0):.2f}x", f"{r.get('peak_mem_gib', 0):.1f}")
                    for r in rows],
                   headers=["plan", "attention", "context", "batch", "ms/step", "tokens/s", "cache GiB", "vs floor",
                            "vs read floor", "peak GiB"]))
    print(tabulate([(s["plan"], s["attention"], s["max_batch"], f"{s['max_batch_vs_standard'] or 0:.1f}x",
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
