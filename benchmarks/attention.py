"""Attention backends: forward+backward time and achieved TFLOP/s for global
causal and sliding-window attention (GPU).

    python benchmarks/attention.py [--seq-lens 4096 16384 32768] [--window 1024]

Batch = tokens / T (32K tokens per step by default), 16 heads of 128, bf16.
FLOPs count only unmasked query-key pairs: 4 * B * H * D * pairs forward
(two matmuls), x3.5 for forward+backward (backward = 2.5x forward).

Document-mask rows (``--docs stdlib long``): packed rows of real document
lengths (the stdlib corpus, tokenized here; a log-uniform 8K-128K "long"
corpus) against the same layer without documents. ``flex+docs`` is the
model's path (one block mask per forward from the ids, shared by the layers
of a kind; its build time is the ``mask_build_ms`` column, paid once per
forward, not per layer); ``flex+docs (dense build)`` the old path (a dense
create_block_mask per call, included in its time); ``varlen`` torch's
flash varlen kernel (``torch.nn.attention.varlen``; its cu_seqlens made
outside the timing); where flash-attn-4 is installed, ``fa4`` (no documents)
and ``fa4+docs`` (its varlen path, offsets from the collator's per-row
starts, as training passes them). ``vs_plain`` = time / the plain layer's
time (global: SDPA causal; sliding: flex without documents), the bar being
1.15x; ``vs_fa4_plain`` = fa4+docs / fa4.
Prints a table and writes benchmarks/results/NAME.json (default attention).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import long_doc_lengths, packed_doc_ids, prepare_gpu, stdlib_doc_lengths, write_result  # noqa: E402

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


def _varlen(q, k, v, cu, max_len, kind, window):
    """torch's flash varlen kernel over the (row, document) runs: [B, H, T, D] -> [B*T, H, D] and back."""
    from torch.nn.attention.varlen import varlen_attn

    b, h, t, d = q.shape
    left = window - 1 if kind.name == "sliding" else -1
    flat = [x.transpose(1, 2).reshape(b * t, x.shape[1], d) for x in (q, k, v)]
    out = varlen_attn(*flat, cu, cu, max_len, max_len, window_size=(left, 0))
    return out.view(b, t, h, d).transpose(1, 2)


def document_rows(args) -> list[dict]:
    """Document-masked layers vs the same layer without documents."""
    from triton.testing import do_bench

    h, d, dev = args.heads, args.head_dim, "cuda"
    corpora = {"stdlib": stdlib_doc_lengths, "long": long_doc_lengths}
    rows = []
    for corpus in args.docs:
        lengths = corpora[corpus]()
        for t in args.seq_lens:
            b = max(1, args.tokens // t)
            ids = packed_doc_ids(lengths, b, t, seed=t).to(dev)
            starts = torch.ones_like(ids, dtype=torch.bool)
            starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
            flat_starts = starts.flatten().nonzero().flatten()
            cu = torch.cat([flat_starts, flat_starts.new_tensor([b * t])]).to(torch.int32)
            max_len = int((cu[1:] - cu[:-1]).max())
            docs_per_row = round((len(cu) - 1) / b, 1)
            g = torch.Generator(device=dev).manual_seed(t)
            q, k, v = (torch.randn(b, h, t, d, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_() for _ in range(3))
            grad_out = torch.randn(b, h, t, d, device=dev, dtype=torch.bfloat16, generator=g)
            for kind_name, window in (("global", None), ("sliding", args.window)):
                kind = LAYER_KINDS.get(kind_name)
                documents = A.Documents(ids)
                build_ms = do_bench(lambda: A.document_block_mask(kind, window, ids), warmup=20, rep=100, return_mode="median")
                documents.block_mask(kind, window, t, t)
                candidates = {
                    "plain": lambda: A.attend(q, k, v, kind, window, None, backend="sdpa" if kind_name == "global" else "flex"),
                    "flex+docs": lambda: A.attend(q, k, v, kind, window, documents, backend="flex"),
                    "flex+docs (dense build)": lambda: A._compiled_flex()(
                        q, k, v, block_mask=A._dense_document_block_mask(kind, window, t, t, ids)),
                    "sdpa+docs (dense mask)": lambda: A.attend(q, k, v, kind, window, ids, backend="sdpa"),
                    "varlen": lambda: _varlen(q, k, v, cu, max_len, kind, window),
                }
                if A.BACKENDS.get("fa4").available(torch.device(dev)) is None:
                    fa4_docs = A.Documents(ids, A.document_starts(ids.cpu()).to(dev))  # the collator's starts
                    candidates["fa4"] = lambda: A.attend(q, k, v, kind, window, None, backend="fa4")
                    candidates["fa4+docs"] = lambda: A.attend(q, k, v, kind, window, fa4_docs, backend="fa4")
                if t > 8192:
                    candidates.pop("sdpa+docs (dense mask)")  # a [B, 1, T, T] mask per call
                plain_ms = fa4_ms = None
                for label, fn in candidates.items():
                    try:
                        ms, err = bench(fn, q, k, v, grad_out), None
                    except Exception as e:  # a kernel that does not exist in this torch, out of memory, ...
                        ms, err = None, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                    torch.cuda.empty_cache()
                    plain_ms = ms if label == "plain" else plain_ms
                    fa4_ms = ms if label == "fa4" else fa4_ms
                    row = {"corpus": corpus, "T": t, "B": b, "docs_per_row": docs_per_row, "kind": kind_name, "window": window,
                           "backend": label, "ms": ms, "vs_plain": ms / plain_ms if ms and plain_ms else None, "error": err,
                           "vs_fa4_plain": ms / fa4_ms if ms and fa4_ms and label == "fa4+docs" else None,
                           "mask_build_ms": build_ms if label == "flex+docs" else None}
                    rows.append(row)
                    print(row, flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--tokens", type=int, default=32768, help="tokens per step; batch = tokens / T")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--eager-max", type=int, default=4096, help="longest T for the eager reference (T^2 memory)")
    parser.add_argument("--docs", nargs="*", default=[], choices=["stdlib", "long"],
                        help="also time document-masked layers with these document-length corpora")
    parser.add_argument("--docs-only", action="store_true", help="only the document-mask rows")
    parser.add_argument("--name", default="attention")
    parser.add_argument("--out", default=None, help="directory for the JSON (default benchmarks/results)")
    args = parser.parse_args(argv)
    if not prepare_gpu("benchmarks/attention.py", recompile_limit=256):
        return 2

    h, d, dev = args.heads, args.head_dim, "cuda"
    doc_rows = document_rows(args) if args.docs else []
    rows = []
    for t in ([] if args.docs_only else args.seq_lens):
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
            if A.BACKENDS.get("fa4").available(torch.device(dev)) is None:
                candidates["fa4"] = "fa4"
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
    for t in ([] if args.docs_only else args.seq_lens):
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
    if doc_rows:
        print()
        print(tabulate(
            [(r["T"], r["B"], r["corpus"], r["docs_per_row"], r["kind"], r["backend"], f"{r['ms']:.3f}" if r["ms"] else r["error"],
              f"{r['vs_plain']:.2f}x" if r.get("vs_plain") else "-", f"{r['mask_build_ms']:.3f}" if r.get("mask_build_ms") else "-")
             for r in doc_rows],
            headers=["T", "B", "corpus", "docs/row", "kind", "backend", "ms fwd+bwd", "vs plain", "mask_build_ms"]))
    print()
    print(tabulate(
        [(s["T"], f"{s['global_sdpa_ms']:.2f}", f"{s['global_flex_ms_best']:.2f}", f"{s['flex_over_sdpa_global_best']:.2f}x",
          f"{s['auto_over_sdpa_global']:.2f}x", f"{s['sliding_auto_ms']:.2f}", f"{s['sliding_speedup_vs_global_causal']:.2f}x")
         for s in summary],
        headers=["T", "global sdpa ms", "global flex best ms", "flex/sdpa", "auto/sdpa", f"sliding W={args.window} ms", "sliding speedup"]))
    path = write_result(args.name, {
        "config": {"heads": h, "head_dim": d, "window": args.window, "tokens_per_step": args.tokens, "dtype": "bfloat16",
                   "flex_options": FLEX_OPTIONS, "docs": args.docs},
        "rows": rows, "summary": summary, "doc_rows": doc_rows,
    }, args.out, topic="attention")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
