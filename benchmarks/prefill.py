"""Prefill of one long prompt through the KV cache (GPU): time to first token.

    python benchmarks/prefill.py --plans standard ma ma_offset ma_pairs --prompt-len 31744 --prefill masked ordered

What ``mixattn serve`` does for each request before its first token, alone:
one prompt of ``--prompt-len`` random ids (no other request in flight)
prefilled in chunks of ``--chunk-size`` (the engine's: one row,
``mixattn.generate.prefill``), the output head at the last token only, on
``benchmarks/decode.py``'s 1.3B model (bf16, random weights; speed does not
depend on them). Each plan with each ``--prefill`` way of reading the cache,
side by side in one process (``masked``: SDPA under a position mask over
every slot; ``ordered``: keys in position order, the model's training
attention, no mask; see mixattn.kv_cache), after one untimed prefill that
compiles what compiles. Per row: ms for the whole prompt (median of
``--iters``), prompt tokens/s, which training backend ``ordered`` resolved to
for global and sliding layers, and with ``--profile`` the top GPU kernels.
Writes benchmarks/results/serving/NAME.json and prints a table. ``--tiny``
runs a tiny model (on the CPU without a GPU): a check of the program, not a
measurement.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode import DIMS, kernel_profile  # noqa: E402

PLANS = ["standard", "ma", "ma_offset", "ma_pairs"]


def run_plan(args, plan: str, mode: str) -> dict:
    import torch

    from mixattn.attention import select_chunk_backend
    from mixattn.generate import new_cache, prefill
    from mixattn.model import MixAttentionLM, ModelConfig
    from mixattn.plan import LAYER_KINDS

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dims = dict(vocab_size=512, d_model=64, n_layers=24, n_heads=4) if args.tiny else DIMS
    torch.manual_seed(0)
    cfg = ModelConfig(**dims, max_seq_len=args.prompt_len, plan=plan, window=args.window, attn_backend=args.attn_backend)
    model = MixAttentionLM(cfg).to(device, torch.bfloat16 if device == "cuda" else torch.float32).eval()
    cache = new_cache(model, 1, args.prompt_len, prefill=mode)
    prompt = [torch.randint(0, cfg.vocab_size, (args.prompt_len,)).tolist()]
    backends = {kind: select_chunk_backend(args.attn_backend, torch.device(device), LAYER_KINDS.get(kind), model.embed.weight.dtype,
                                           cfg.head_dim) for kind in ("global", "sliding")}
    row = {"plan": plan, "prefill": mode, "prompt_len": args.prompt_len, "chunk_size": args.chunk_size,
           "attn_backend": args.attn_backend, "ordered_backends": backends if mode == "ordered" else None}

    def once() -> None:
        cache.reset()
        prefill(model, cache, prompt, chunk_size=args.chunk_size)

    def timed() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        once()
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3

    try:
        row["first_s"] = timed() / 1e3  # compiles (flex, inductor) included
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = [timed() for _ in range(args.iters)]
        ms = statistics.median(times)
        row.update(ms=ms, ms_all=times, tokens_per_s=args.prompt_len / (ms / 1e3),
                   peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None)
        if args.profile and device == "cuda":
            row["kernels"] = kernel_profile(once)
    except Exception as e:  # a kernel that does not compile, out of memory: recorded, not hidden
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return row


def summary(rows: list[dict]) -> list[dict]:
    """Each row against the same plan's masked prefill and against standard in the same mode."""
    out = []
    for r in rows:
        masked = next((b for b in rows if b["plan"] == r["plan"] and b["prefill"] == "masked" and "ms" in b), None)
        std = next((b for b in rows if b["plan"] == "standard" and b["prefill"] == r["prefill"] and "ms" in b), None)
        ok = "ms" in r
        out.append({"plan": r["plan"], "prefill": r["prefill"], "ms": round(r["ms"], 1) if ok else None,
                    "prompt tok/s": round(r["tokens_per_s"]) if ok else None,
                    "vs masked": f"{masked['ms'] / r['ms']:.2f}x" if ok and masked else "",
                    "vs standard": f"{std['ms'] / r['ms']:.2f}x" if ok and std else "",
                    "first s": round(r.get("first_s", 0), 1), "error": r.get("error", "")})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plans", nargs="+", default=PLANS)
    parser.add_argument("--prefill", nargs="+", default=["masked", "ordered"], choices=["masked", "ordered"])
    parser.add_argument("--prompt-len", type=int, default=31744)
    parser.add_argument("--chunk-size", type=int, default=2048, help="prefill chunk (mixattn serve's default)")
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--attn-backend", default="auto", help="the model's attention backend, which ordered prefill uses")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="also record the top GPU kernels of one prefill")
    parser.add_argument("--tiny", action="store_true", help="a tiny model, on the CPU without a GPU (a check of the program)")
    parser.add_argument("--name", default="prefill")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from common import prepare_gpu, write_result
    from tabulate import tabulate

    if not args.tiny and not prepare_gpu("benchmarks/prefill.py", recompile_limit=64):
        return 2
    rows: list[dict] = []
    config = vars(args)
    import torch

    for plan in args.plans:
        for mode in args.prefill:
            rows.append(run_plan(args, plan, mode))  # its model and cache are freed on return
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            torch._dynamo.reset()  # the next row compiles as a fresh process would
            print({k: v for k, v in rows[-1].items() if k not in ("kernels", "ms_all")}, flush=True)
            path = write_result(args.name, {"config": config, "rows": rows}, args.out, topic="serving")  # after every row
    print(tabulate(summary(rows), headers="keys"))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
