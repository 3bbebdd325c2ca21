"""Can one persistent kernel read a decode step's weights faster than a kernel per GEMV? (GPU)

    python benchmarks/persistent.py

The four projections of each of the decode benchmark's 24 layers (d_model 2048:
Q/K/V 6144 x 2048, output 2048 x 2048, MLP up 8192 x 2048 with GELU, down
2048 x 8192 with the residual add), bf16 weights (2.42 GB, never in L2), one
row of input, run two ways:
- ``kernels``: mixattn's Triton GEMV (``mixattn.decode_kernel``), one launch per
  projection (96), captured in a CUDA graph, with programmatic dependent launch
  where the GPU has it: the default decode path's GEMVs;
- ``persistent``: one kernel of CTAS programs that loops over the layers and
  their four projections itself, every program its own rows of each matrix,
  with a grid-wide barrier between projections (``mixattn.persistent``'s: an
  atomic counter, polled with loads); before it
  waits at a barrier, a program loads its first tile of the next matrix.
  Variants: without the barriers (``no_sync``: a bound on what the reads
  alone take; its numbers are not a valid product) and without the products
  (``sync_only``: what 96 barriers cost).
Reported: us per step, weight bytes per second and against the copy bandwidth,
and the largest difference of the result from the eager product in float32.
Writes benchmarks/results/decode/<name>.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

D, QKV, FF, LAYERS = 2048, 6144, 8192, 24


def kernels():
    import triton
    import triton.language as tl

    from mixattn.persistent import _grid_sync  # the product's barrier (polls with loads, one acquire)

    @triton.jit
    def first_tile(W, pid, N, K: tl.constexpr, R: tl.constexpr, NPROG: tl.constexpr):
        r = pid * (N // NPROG) + tl.arange(0, R)
        k = tl.arange(0, K)
        return tl.load(W + r[:, None] * K + k[None, :])

    @triton.jit
    def rows_gemv(W, w0, X, Y, pid, N, K: tl.constexpr, R: tl.constexpr, NPROG: tl.constexpr,
                  ADD: tl.constexpr, GELU: tl.constexpr, WORK: tl.constexpr):
        # rows [pid * N / NPROG, (pid + 1) * N / NPROG) of W [N, K] times X [K] (fp32, written by
        # other programs: read from L2), R rows at a time, the first R already loaded (w0)
        if WORK:
            rows = N // NPROG
            r0 = pid * rows
            k = tl.arange(0, K)
            x = tl.load(X + k, cache_modifier=".cg")
            w = w0
            for i in range(0, rows, R):
                r = r0 + i + tl.arange(0, R)
                if i > 0:
                    w = tl.load(W + r[:, None] * K + k[None, :])
                acc = tl.sum(w.to(tl.float32) * x[None, :], axis=1)
                if GELU:
                    acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
                if ADD:
                    acc += tl.load(Y + r, cache_modifier=".cg")
                tl.store(Y + r, acc)

    @triton.jit
    def persistent(X, QKVB, U, WQKV, WO, WUP, WDOWN, CNT, L,
                   NPROG: tl.constexpr, RD: tl.constexpr, RF: tl.constexpr, SYNC: tl.constexpr,
                   WORK: tl.constexpr):
        pid = tl.program_id(0)
        w0 = first_tile(WQKV, pid, 6144, 2048, RD, NPROG)
        for layer in range(L):
            wq = WQKV + layer * 6144 * 2048
            wo = WO + layer * 2048 * 2048
            wu = WUP + layer * 8192 * 2048
            wd = WDOWN + layer * 2048 * 8192
            base = layer * 4 * NPROG
            rows_gemv(wq, w0, X, QKVB, pid, 6144, 2048, RD, NPROG, False, False, WORK)
            w1 = first_tile(wo, pid, 2048, 2048, RD, NPROG)
            if SYNC:
                _grid_sync(CNT, base + NPROG, True)
            rows_gemv(wo, w1, QKVB, X, pid, 2048, 2048, RD, NPROG, True, False, WORK)
            w2 = first_tile(wu, pid, 8192, 2048, RD, NPROG)
            if SYNC:
                _grid_sync(CNT, base + 2 * NPROG, True)
            rows_gemv(wu, w2, X, U, pid, 8192, 2048, RD, NPROG, False, True, WORK)
            w3 = first_tile(wd, pid, 2048, 8192, RF, NPROG)
            if SYNC:
                _grid_sync(CNT, base + 3 * NPROG, True)
            rows_gemv(wd, w3, U, X, pid, 2048, 8192, RF, NPROG, True, False, WORK)
            # the next layer's Q/K/V tile (the last layer reads layer 0's again: harmless)
            w0 = first_tile(WQKV + ((layer + 1) % L) * 6144 * 2048, pid, 6144, 2048, RD, NPROG)
            if SYNC:
                _grid_sync(CNT, base + 4 * NPROG, True)

    return persistent


def reference(x, w):
    import torch.nn.functional as F

    x = x.clone()
    for layer in range(LAYERS):
        qkv = (w["qkv"][layer].float() @ x)
        x = x + w["o"][layer].float() @ qkv[:D]
        u = F.gelu(w["up"][layer].float() @ x)
        x = x + w["down"][layer].float() @ u
    return x


def run(args) -> dict:
    import torch
    from cached_attention import time_graph
    from common import prepare_gpu
    from decode import copy_bandwidth

    from mixattn import decode_kernel

    if not prepare_gpu("benchmarks/persistent.py", recompile_limit=8):
        raise SystemExit(2)
    bw = copy_bandwidth()
    g = torch.Generator(device="cuda").manual_seed(0)

    def weights(n, k):
        return (torch.randn(LAYERS, n, k, device="cuda", generator=g) * (0.5 / k**0.5)).to(torch.bfloat16)

    w = {"qkv": weights(QKV, D), "o": weights(D, D), "up": weights(FF, D), "down": weights(D, FF)}
    nbytes = sum(t.nbytes for t in w.values())
    x0 = torch.randn(D, device="cuda", generator=g)
    ref = reference(x0, w)
    rows = []

    def add(path, us, out=None, setting=None):
        row = {"path": path, "setting": setting, "us": us, "weights_bytes": nbytes,
               "bytes_per_s": nbytes / (us / 1e6), "vs_copy_bandwidth": nbytes / (us / 1e6) / bw,
               "max_abs_diff": None if out is None else (out - ref).abs().max().item(),
               "ref_abs_max": ref.abs().max().item()}
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)

    # the default path's GEMVs: one launch a projection (bf16 activations, as in the decode step)
    xb = x0.to(torch.bfloat16)[None]

    def per_kernel():
        x = xb
        for layer in range(LAYERS):
            qkv = decode_kernel.gemv(x, w["qkv"][layer])
            x = x + decode_kernel.gemv(qkv[:, :D], w["o"][layer])
            u = decode_kernel.gemv(x, w["up"][layer], act="gelu")
            x = x + decode_kernel.gemv(u, w["down"][layer])
        return x

    out = per_kernel()
    add("kernels", time_graph(per_kernel, args.iters), out[0].float())

    persistent = kernels()
    for ctas in args.ctas:
        for rd in args.rows:
            rf = max(1, rd // 4)
            for sync, work, path in ((True, True, "persistent"), (False, True, "no_sync"), (True, False, "sync_only")):
                x = torch.empty(D, device="cuda")
                qkvb = torch.empty(QKV, device="cuda")
                u = torch.empty(FF, device="cuda")
                cnt = torch.zeros(1, device="cuda", dtype=torch.int32)

                def call(ctas=ctas, rd=rd, rf=rf, sync=sync, work=work, x=x, qkvb=qkvb, u=u, cnt=cnt):
                    x.copy_(x0)
                    cnt.zero_()
                    persistent[(ctas,)](x, qkvb, u, w["qkv"], w["o"], w["up"], w["down"], cnt, LAYERS,
                                        NPROG=ctas, RD=rd, RF=rf, SYNC=sync, WORK=work, num_warps=args.warps)
                    return x

                try:
                    out = call().clone()
                    add(path, time_graph(call, args.iters), out if sync and work else None,
                        {"ctas": ctas, "rows": rd, "down_rows": rf, "num_warps": args.warps})
                except Exception as e:  # a setting that does not compile or fit: reported, the rest go on
                    rows.append({"path": path, "setting": {"ctas": ctas, "rows": rd}, "error": repr(e)[:400]})
                    print(rows[-1], flush=True)
    return {"copy_bandwidth_bytes_per_s": bw, "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ctas", type=int, nargs="+", default=[128], help="programs of the persistent kernel "
                        "(must divide 2048: every program gets the same rows of every matrix)")
    parser.add_argument("--rows", type=int, nargs="+", default=[4, 8], help="rows a program reads at a time "
                        "(a quarter as many for the down projection, whose rows are 4x longer)")
    parser.add_argument("--warps", type=int, default=8)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--name", default="persistent")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    for c in args.ctas:
        if D % c or (D // c) % max(1, max(args.rows) // 4) or any((D // c) % r for r in args.rows):
            parser.error(f"--ctas {c}: must divide 2048 into whole tiles of --rows {args.rows}")
    from common import write_result
    from tabulate import tabulate

    result = run(args)
    print(tabulate([(r["path"], r.get("setting") or "", f"{r['us']:.1f}" if "us" in r else r.get("error", ""),
                     f"{r['bytes_per_s'] / 1e12:.2f}" if "us" in r else "",
                     f"{r['vs_copy_bandwidth']:.2f}" if "us" in r else "",
                     "" if r.get("max_abs_diff") is None else f"{r['max_abs_diff']:.2e}")
                    for r in result["rows"]], headers=["path", "setting", "us/step", "TB/s", "vs copy bw", "max diff"]))
    path = write_result(args.name, {"config": vars(args), **result}, args.out, topic="decode")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
