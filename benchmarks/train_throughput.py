"""Training throughput: tokens/s and MFU of a training step for several layer
plans at several context lengths (GPU).

    python benchmarks/train_throughput.py --size 350m --plans standard ma all_sliding --seq-lens 4096 32768

One step = forward + backward + AdamW (fused) on ``--tokens`` tokens (batch =
tokens / T), bf16 autocast over fp32 weights (composer's amp_bf16), the model
compiled with torch.compile, attention on the auto backend (SDPA for global
layers, FlexAttention for sliding ones). This is the step Composer runs, without
its loop around it. MFU = model FLOPs (MixAttentionLM.flops_per_sequence: the
real plan, sliding layers cost less attention) / time / peak dense bf16 FLOP/s.
Prints a table; writes benchmarks/results/NAME.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import prepare_gpu, write_result  # noqa: E402

from mixattn.model import MixAttentionLM, ModelConfig  # noqa: E402

SIZES = {  # d_model, n_layers, n_heads
    "125m": (768, 12, 12),
    "350m": (1024, 24, 16),
    "1b": (2048, 24, 16),
}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops() -> float:
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16.items():
        if key in name:
            return value
    raise SystemExit(f"unknown peak FLOP/s for {name!r}; add it to PEAK_BF16")


def run_one(size: str, plan: str, t: int, tokens: int, window: int, steps: int, compile_model: bool) -> dict:
    d, n_layers, heads = SIZES[size]
    cfg = ModelConfig(vocab_size=50304, d_model=d, n_layers=n_layers, n_heads=heads, max_seq_len=t, plan=plan, window=window)
    torch.manual_seed(0)
    model = MixAttentionLM(cfg).cuda()
    flops_seq = model.flops_per_sequence(t)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    step_model = torch.compile(model) if compile_model else model
    b = max(1, tokens // t)
    x = torch.randint(0, cfg.vocab_size, (b, t), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step_model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(3):  # compile + warm-up
        step()
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step()
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / steps
    tok_s = b * t / (ms / 1e3)
    mfu = b * flops_seq / (ms / 1e3) / peak_flops()
    torch.cuda.empty_cache()
    return {"size": size, "plan": plan, "T": t, "B": b, "ms_per_step": ms, "tokens_per_s": tok_s, "mfu": mfu,
            "flops_per_sequence": flops_seq, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "warmup_s": warm_s}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="350m", choices=sorted(SIZES))
    parser.add_argument("--plans", nargs="+", default=["standard", "ma", "all_sliding"])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--tokens", type=int, default=32768, help="tokens per step; batch = tokens / T")
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--name", default="train_throughput", help="result file name")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not prepare_gpu("benchmarks/train_throughput.py", recompile_limit=64):
        return 2
    rows = []
    for t in args.seq_lens:
        for plan in args.plans:
            try:
                row = run_one(args.size, plan, t, args.tokens, args.window, args.steps, not args.no_compile)
            except Exception as e:  # out of memory, a compile failure: recorded, not hidden
                row = {"size": args.size, "plan": plan, "T": t, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
                torch.cuda.empty_cache()
            rows.append(row)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    summary = []
    for t in args.seq_lens:
        base = next((r for r in rows if r["T"] == t and r["plan"] == "standard" and "error" not in r), None)
        for r in rows:
            if r["T"] == t and "error" not in r and base:
                summary.append({"T": t, "plan": r["plan"], "speedup_vs_standard": r["tokens_per_s"] / base["tokens_per_s"]})
    from tabulate import tabulate

    print()
    print(tabulate([(r["T"], r.get("B", "-"), r["plan"], f"{r['ms_per_step']:.1f}" if "ms_per_step" in r else r.get("error"),
                     f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else "-", f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-",
                     f"{r['peak_mem_gib']:.1f}" if "peak_mem_gib" in r else "-",
                     next((f"{s['speedup_vs_standard']:.2f}x" for s in summary if s["T"] == r["T"] and s["plan"] == r["plan"]), "-"))
                    for r in rows],
                   headers=["T", "B", "plan", "ms/step", "tokens/s", "MFU", "peak GiB", "vs standard"]))
    path = write_result(args.name, {"config": vars(args), "rows": rows, "summary": summary}, args.out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
