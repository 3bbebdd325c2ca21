"""Batch-1 decode's matrix-vector products, by implementation (GPU).

    python benchmarks/gemv.py

The projections of one layer of the decode benchmark's model (d_model 2048:
fused Q/K/V 6144 x 2048, output 2048 x 2048, MLP up 8192 x 2048, down
2048 x 8192) and the output head (50304 x 2048), bf16, one row of input:
torch's ``F.linear`` (cuBLAS; and with ``preferred_blas_library("cublaslt")``)
against mixattn's Triton GEMV (``mixattn.decode_kernel``: one program per
``BLOCK_N`` output rows, looping over K) under each launch setting given. Each call is captured in a CUDA
graph and replayed, each call reading another copy of the matrix (400 MB of
copies, so none is in L2); reported: us per call and weight bytes read per
second.
Writes benchmarks/results/gemv.json.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = {"wqkv": (6144, 2048), "wo": (2048, 2048), "up": (8192, 2048), "down": (2048, 8192), "head": (50304, 2048)}


def run(args) -> dict:
    import torch
    import torch.nn.functional as F
    import triton
    from cached_attention import time_graph
    from common import prepare_gpu
    from decode import copy_bandwidth

    from mixattn import decode_kernel

    gemv = decode_kernel._gemv_jit  # the kernel use_gemv runs, launched here with each setting

    if not prepare_gpu("benchmarks/gemv.py", recompile_limit=8):
        raise SystemExit(2)
    bw = copy_bandwidth()
    rows = []
    for name, (n, k) in SHAPES.items():
        # enough copies of the matrix that consecutive calls never find it in L2 (50 MB on an H100), as
        # in a decode step, where every layer's weights are read once
        copies = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(max(2, -(-400 * 2**20 // (2 * n * k))))]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = F.linear(x, copies[0])
        variants = [("cublas", None), ("cublaslt", None)] + [
            ("triton", (bn, bk, nw)) for bn, bk, nw in itertools.product(args.block_n, args.block_k, args.warps)]
        for impl, setting in variants:
            y = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
            if impl == "triton":
                bn, bk, nw = setting

                def call(bn=bn, bk=bk, nw=nw, y=y):
                    gemv[(triton.cdiv(n, bn),)](x, copies[next(turn)], y, n, k, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw)
                    return y
            else:
                torch.backends.cuda.preferred_blas_library("cublaslt" if impl == "cublaslt" else "cublas")

                def call():
                    return F.linear(x, copies[next(turn)])
            turn = itertools.cycle(range(len(copies)))  # the first call reads copies[0]: compared with ref
            out = call()
            err = (out.float() - ref.float()).abs().max().item()
            us = time_graph(call, args.iters)
            row = {"matrix": name, "N": n, "K": k, "impl": impl, "setting": None if setting is None else
                   dict(zip(("BLOCK_N", "BLOCK_K", "num_warps"), setting)), "us": us,
                   "bytes_per_s": copies[0].nbytes / (us / 1e6), "vs_copy_bandwidth": copies[0].nbytes / (us / 1e6) / bw,
                   "max_abs_diff": err}
            rows.append(row)
            print({k2: (round(v, 4) if isinstance(v, float) else v) for k2, v in row.items()}, flush=True)
        torch.backends.cuda.preferred_blas_library("cublas")
    return {"copy_bandwidth_bytes_per_s": bw, "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--block-n", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--block-k", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--name", default="gemv")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from common import write_result
    from tabulate import tabulate

    result = run(args)
    best = {}
    for r in result["rows"]:
        key = (r["matrix"], r["impl"])
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = r
    print(tabulate([(m, i, r["setting"] or "", f"{r['us']:.2f}", f"{r['bytes_per_s'] / 1e12:.2f}", f"{r['vs_copy_bandwidth']:.2f}")
                    for (m, i), r in best.items()], headers=["matrix", "impl", "best setting", "us", "TB/s", "vs copy bw"]))
    path = write_result(args.name, {"config": vars(args), **result}, args.out, topic="decode")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
