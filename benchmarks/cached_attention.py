"""One layer's attention over a KV cache, by implementation (GPU).

    python benchmarks/cached_attention.py
    python benchmarks/cached_attention.py --kernel BLOCK_N=32 BLOCK_N=128 PROGRAMS_PER_SM=8 NUM_STAGES=2

The attention of one decode step for one layer of the decode benchmark's
model (16 heads of 128, bf16), the cache filled to the context: ``sdpa``
(the mask built from the position table, then SDPA with it: what a cached
step does) and mixattn's Triton kernel (``triton``, reading the position
table itself) under its default launch settings and under each ``--kernel``
change (one setting at a time). Each is captured in a CUDA graph and
replayed; reported: us per call and the K/V bytes read per second (vs the
device's copy bandwidth). Writes benchmarks/results/cached_attention.json.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

HEADS, HEAD_DIM = 16, 128


def time_graph(fn, iters: int) -> float:
    """us per call of ``fn`` captured in a CUDA graph."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (5 * iters)


def step(impl, q, kv, q_pos, k_pos, kind):
    """What a cached step does for one layer: the mask in impl's form, then attention."""
    from mixattn.attention import KeyPositions, additive_mask, position_mask

    if impl.mask == "positions":
        mask = KeyPositions(q_pos, k_pos, kind, None)
    else:
        mask = additive_mask(position_mask(kind, None, q_pos, k_pos), q.dtype)
    return impl.fn(q, kv[0], kv[1], mask)


def run(args) -> dict:
    import torch
    from common import apply_settings, prepare_gpu
    from decode import copy_bandwidth

    import mixattn.decode_kernel as dk
    from mixattn.attention import CACHED_ATTENTION
    from mixattn.plan import LAYER_KINDS

    if not prepare_gpu("benchmarks/cached_attention.py", recompile_limit=64):
        raise SystemExit(2)
    bw = copy_bandwidth()
    defaults = {name: getattr(dk, name) for name in ("BLOCK_N", "PROGRAMS_PER_SM", "NUM_WARPS", "NUM_STAGES")}
    variants = [("sdpa", None), ("triton", None)] + [("triton", s) for s in args.kernel]
    rows = []
    for context in args.contexts:
        for batch in args.batches:
            for hkv in args.kv_heads:
                kv = torch.randn(2, batch, hkv, context, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
                q = torch.randn(batch, 1, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
                q_pos = torch.full((batch, 1), context - 1, device="cuda")
                k_pos = torch.arange(context, device="cuda", dtype=torch.int32).repeat(batch, 1)
                kind = LAYER_KINDS.get("global")
                ref = None
                for name, setting in variants:
                    for key, value in defaults.items():
                        setattr(dk, key, value)
                    if setting:
                        apply_settings(dk, [setting], "--kernel")
                    call = functools.partial(step, CACHED_ATTENTION.get(name), q, kv, q_pos, k_pos, kind)
                    out = call()
                    ref = out if ref is None else ref
                    us = time_graph(call, args.iters)
                    kv_bytes = kv.nbytes
                    row = {"context": context, "batch": batch, "kv_heads": hkv, "attention": name,
                           "setting": setting or "default", "us": us, "kv_bytes": kv_bytes,
                           "bytes_per_s": kv_bytes / (us / 1e6), "vs_copy_bandwidth": kv_bytes / (us / 1e6) / bw,
                           "max_abs_diff_vs_sdpa": (out.float() - ref.float()).abs().max().item()}
                    rows.append(row)
                    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
                del kv
    return {"copy_bandwidth_bytes_per_s": bw, "launch_defaults": defaults, "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--kv-heads", type=int, nargs="+", default=[16])
    parser.add_argument("--kernel", nargs="*", default=[], metavar="KEY=VALUE",
                        help="launch settings of mixattn.decode_kernel to compare, each alone against the defaults")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--name", default="cached_attention")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from common import write_result
    from tabulate import tabulate

    result = run(args)
    print(tabulate([(r["context"], r["batch"], r["kv_heads"], r["attention"], r["setting"], f"{r['us']:.1f}",
                     f"{r['bytes_per_s'] / 1e12:.2f}", f"{r['vs_copy_bandwidth']:.2f}") for r in result["rows"]],
                   headers=["context", "batch", "kv heads", "attention", "setting", "us", "TB/s", "vs copy bw"]))
    path = write_result(args.name, {"config": vars(args), **result}, args.out, topic="decode")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
