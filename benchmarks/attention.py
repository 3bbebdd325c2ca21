"""Attention backends: forward+backward time and achieved TFLOP/s for global
causal and sliding-window attention (GPU).

    python benchmarks/attention.py [--seq-lens 4096 16384 32768] [--window 1024]

Batch = tokens / T (32K tokens per step by default), 16 heads of 128, bf16.
FLOPs count only unmasked query-key pairs: 4 * B * H * D * pairs forward
(two matmuls), x3.5 for forward+backward (backward = 2.5x forward).
Prints a table and writes benchmarks/results/attention.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import prepare_gpu, write_result  # noqa: E402

import mixattn.attention as A  # noqa: E402
from mixattn.plan import LAYER_KINDS, attended_pairs  # noqa: E402

# candidate FlexAttention block sizes, tried for global causal at the longest T
FLEX_OPTIONS = {
    "flex[128x128,w8]": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    "flex[128x64,w4,s3]": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    "flex[64x128,w4]": {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2},
}


def bench(fn, q, k, v, grad_out) -> float:
    from triton.testing import do_bench

    def step():
        out = fn()
        torch.autograd.grad(out, (q, k, v), grad_out)

    return do_bench(step, warmup=50, rep=200, return_mode="median")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--tokens", type=int, default=32768, help="tokens per step; batch = tokens / T")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--eager-max", type=int, default=4096, help="longest T for the eager reference (T^2 memory)")
    parser.add_argument("--out", default=None, help="directory for the JSON (default benchmarks/results)")
    args = parser.parse_args(argv)
    if not prepare_gpu("benchmarks/attention.py", recompile_limit=256):
        return 2

    h, d, dev = args.heads, args.head_dim, "cuda"
    rows = []
    for t in args.seq_lens:
        b = max(1, args.tokens // t)
        g = torch.Generator(device=dev).manual_seed(t)
        q, k, v = (torch.randn(b, h, t, d, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_() for _ in range(3))
        grad_out = torch.randn(b, h, t, d, device=dev, dtype=torch.bfloat16, generator=g)
        for kind_name, window in (("global", None), ("sliding", args.window)):
            kind = LAYER_KINDS.get(kind_name)
            candidates = {"sdpa": "sdpa", "flex": "flex", "auto": "auto"}
            if t <= args.eager_max:
                candidates["eager"] = "eager"
            if A.BACKENDS.get("flash").available(torch.device(dev)) is None:
                candidates["flash"] = "flash"
            if kind_name == "global" and t == max(args.seq_lens):
                candidates.update({name: "flex" for name in FLEX_OPTIONS})
            flops = 3.5 * 4 * b * h * d * attended_pairs(t, window)
            for label, backend in candidates.items():
                A.FLEX_KERNEL_OPTIONS = FLEX_OPTIONS.get(label)
                fn = lambda: A.attend(q, k, v, kind, window, None, backend=backend)
                try:
                    ms = bench(fn, q, k, v, grad_out)
                    err = None
                except Exception as e:  # a block size that does not fit, out of memory, ...
                    ms, err = None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                torch.cuda.empty_cache()
                rows.append({
                    "T": t, "B": b, "kind": kind_name, "window": window, "backend": label,
                    "ms": ms, "tflops": flops / ms / 1e9 if ms else None, "error": err,
                })
                print(f"T={t:6d} B={b} {kind_name:8s} {label:20s} "
                      + (f"{ms:8.2f} ms {flops / ms / 1e9:7.1f} TFLOP/s" if ms else f"failed: {err}"), flush=True)
    A.FLEX_KERNEL_OPTIONS = None

    def ms_of(t, kind, backend):
        return next((r["ms"] for r in rows if r["T"] == t and r["kind"] == kind and r["backend"] == backend), None)

    summary = []
    for t in args.seq_lens:
        sdpa_g = ms_of(t, "global", "sdpa")
        flex_g = [r["ms"] for r in rows if r["T"] == t and r["kind"] == "global" and r["backend"].startswith("flex") and r["ms"]]
        best_flex_g = min(flex_g) if flex_g else None
        summary.append({
            "T": t,
            "global_sdpa_ms": sdpa_g,
            "global_flex_ms_default": ms_of(t, "global", "flex"),
            "global_flex_ms_best": best_flex_g,
            "flex_over_sdpa_global_best": best_flex_g / sdpa_g if best_flex_g and sdpa_g else None,
            "auto_over_sdpa_global": ms_of(t, "global", "auto") / sdpa_g if sdpa_g else None,
            "sliding_auto_ms": ms_of(t, "sliding", "auto"),
            "sliding_speedup_vs_global_causal": sdpa_g / ms_of(t, "sliding", "auto") if sdpa_g else None,
        })

    from tabulate import tabulate

    print()
    print(tabulate(
        [(r["T"], r["B"], r["kind"], r["backend"], f"{r['ms']:.2f}" if r["ms"] else "-", f"{r['tflops']:.0f}" if r["tflops"] else r["error"])
         for r in rows],
        headers=["T", "B", "kind", "backend", "ms fwd+bwd", "TFLOP/s"]))
    print()
    print(tabulate(
        [(s["T"], f"{s['global_sdpa_ms']:.2f}", f"{s['global_flex_ms_best']:.2f}", f"{s['flex_over_sdpa_global_best']:.2f}x",
          f"{s['auto_over_sdpa_global']:.2f}x", f"{s['sliding_auto_ms']:.2f}", f"{s['sliding_speedup_vs_global_causal']:.2f}x")
         for s in summary],
        headers=["T", "global sdpa ms", "global flex best ms", "flex/sdpa", "auto/sdpa", f"sliding W={args.window} ms", "sliding speedup"]))
    path = write_result("attention", {
        "config": {"heads": h, "head_dim": d, "window": args.window, "tokens_per_step": args.tokens, "dtype": "bfloat16",
                   "flex_options": FLEX_OPTIONS},
        "rows": rows, "summary": summary,
    }, args.out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
