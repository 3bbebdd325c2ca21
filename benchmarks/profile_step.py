"""Where a training step's GPU time goes: torch.profiler over a few compiled
steps of benchmarks/train_throughput.py's step, kernels grouped by category.

    python benchmarks/profile_step.py --size 350m --plan standard --seq-len 4096

Prints the top kernels and the time per category (matmul, attention forward and
backward, fused elementwise/norm kernels, cross-entropy, optimizer, copies);
``--ops N`` also the N eager ATen ops (those outside the compiled graphs: custom
ops' insides, the autograd engine's copies) with the most GPU time, by input
shapes and with the Python lines that called them, to say where a copy kernel
comes from. Writes benchmarks/results/NAME.json.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import apply_inductor_settings, parse_model_settings, prepare_gpu, write_result  # noqa: E402
from train_throughput import make_step  # noqa: E402

CATEGORIES = [  # first match wins
    ("attention bwd", r"flash.*bwd|bprop|attention.*backward|fmha.*bwd|_bwd_|flex.*bwd"),
    ("attention fwd", r"flash|fmha|attention|flex"),
    ("matmul", r"gemm|cutlass|sm90_xmma|nvjet|cublas|matmul|_mm_"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("copy / cast", r"copy|cast|elementwise_kernel<.*direct_copy|fill"),
    ("reduction", r"reduce|softmax|log_softmax|nll"),
    ("fused (triton)", r"triton"),
]


def category(name: str) -> str:
    low = name.lower()
    for label, pattern in CATEGORIES:
        if re.search(pattern, low):
            return label
    return "other"


def eager_ops(events, steps: int, top: int) -> list[dict]:
    """The ``top`` ATen ops by GPU time per step from ``key_averages(group_by_input_shape=True,
    group_by_stack_n=...)`` events: op, input shapes, calls and ms per step, and the calling lines."""
    rows = []
    for evt in events:
        t = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if not evt.key.startswith("aten::") or not t:
            continue
        stack = [line for line in (evt.stack or []) if "torch/" not in line][:4]
        rows.append({"op": evt.key, "input_shapes": str(evt.input_shapes), "calls_per_step": evt.count / steps,
                     "ms_per_step": t / 1e3 / steps, "stack": stack})
    return sorted(rows, key=lambda r: -r["ms_per_step"])[:top]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="350m")
    parser.add_argument("--plan", default="standard")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--compile", default="model", choices=["model", "blocks", "none"])
    parser.add_argument("--loss", default="fp32", choices=["fp32", "chunked"])
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--model", nargs="+", default=[], metavar="KEY=VALUE", help="other ModelConfig fields (JSON values)")
    parser.add_argument("--inductor", nargs="+", default=[], metavar="KEY=VALUE", help="torch._inductor.config settings")
    parser.add_argument("--ops", type=int, default=0, metavar="N",
                        help="also list the N eager ATen ops with the most GPU time, by input shape and caller")
    parser.add_argument("--name", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not prepare_gpu("benchmarks/profile_step.py", recompile_limit=64):
        return 2
    apply_inductor_settings(args.inductor)
    model_settings = parse_model_settings(args.model)
    step, info = make_step(args.size, args.plan, args.seq_len, args.tokens, args.window, args.compile, args.loss,
                           model_settings=model_settings)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if args.ops else [])
    with profile(activities=activities, record_shapes=bool(args.ops), with_stack=bool(args.ops)) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    ops = eager_ops(prof.key_averages(group_by_input_shape=True, group_by_stack_n=8), args.steps, args.ops) if args.ops else []
    per_kernel: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        t = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if t and evt.device_type.name == "CUDA":
            per_kernel[evt.key] += t / 1e3 / args.steps  # ms per step
    total = sum(per_kernel.values())
    by_cat: dict[str, float] = defaultdict(float)
    for k, v in per_kernel.items():
        by_cat[category(k)] += v
    from tabulate import tabulate

    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[: args.top]
    print(tabulate([(f"{v:.2f}", f"{100 * v / total:.1f}%", category(k), k[:110]) for k, v in top],
                   headers=["ms/step", "share", "category", "kernel"]))
    print()
    print(tabulate([(c, f"{v:.2f}", f"{100 * v / total:.1f}%") for c, v in sorted(by_cat.items(), key=lambda kv: -kv[1])],
                   headers=["category", "ms/step", "share"]))
    print(f"\nGPU kernel time {total:.1f} ms/step; model {info['flops_per_step'] / 1e12:.1f} TFLOP/step")
    if ops:
        print()
        print(tabulate([(f"{r['ms_per_step']:.2f}", f"{r['calls_per_step']:g}", r["op"], r["input_shapes"][:60],
                         " <- ".join(r["stack"][:2])[:90]) for r in ops],
                       headers=["ms/step", "calls/step", "eager op", "input shapes", "called from"]))
    name = args.name or f"profile_{args.size}_{args.plan}_{args.seq_len}"
    path = write_result(name, {"config": vars(args), "kernel_ms_per_step": total, "categories": by_cat,
                               "top_kernels": [{"kernel": k, "ms": v} for k, v in top], "eager_ops": ops, **info}, args.out, topic="training")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
