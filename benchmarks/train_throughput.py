"""Training throughput: tokens/s and MFU of a training step for several layer
plans at several context lengths (GPU).

    python benchmarks/train_throughput.py --size 350m --plans standard ma all_sliding --seq-lens 4096 32768

One step = forward + backward on ``--accum`` microbatches of ``--tokens`` tokens
each (batch = tokens / T), then one AdamW (fused) step, as Composer runs a
global batch of several microbatches (the 350m recipes: 256 sequences in
microbatches of 8, i.e. 4 per GPU on 8 GPUs, 32 on one), bf16 autocast over fp32 weights (composer's amp_bf16), the model
compiled with torch.compile, attention on the auto backend (SDPA for global
layers, FlexAttention for sliding ones). This is the step Composer runs, without
its loop around it. MFU = model FLOPs (MixAttentionLM.flops_per_sequence: the
real plan, sliding layers cost less attention) / time / peak dense bf16 FLOP/s.
Prints a table; writes benchmarks/results/NAME.json.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import apply_inductor_settings, parse_model_settings, prepare_gpu, write_result  # noqa: E402

from mixattn.model import MixAttentionLM, ModelConfig, chunked_cross_entropy  # noqa: E402

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


SDPA_BACKENDS = {"default": None, "cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}


def make_step(size: str, plan: str, t: int, tokens: int, window: int, compile_scope: str = "model", loss: str = "fp32",
              sdpa: str = "default", model_settings: dict | None = None, accum: int = 1):
    """The training step to time: returns (step, info). ``compile_scope``:
    model (torch.compile of the whole model), blocks (each block compiled on
    its own, torchtitan style) or none. ``loss``: fp32 (full float32 logits) or
    chunked (model.chunked_cross_entropy). ``sdpa``: the kernel SDPA may use
    for global layers (default: torch's choice). ``model_settings``: other
    ModelConfig fields (e.g. fp32_residual=False). ``accum``: microbatches
    (forward + backward each, gradients summed) per optimizer step."""
    d, n_layers, heads = SIZES[size]
    cfg = ModelConfig(vocab_size=50304, d_model=d, n_layers=n_layers, n_heads=heads, max_seq_len=t, plan=plan, window=window,
                      **(model_settings or {}))
    return make_model_step(cfg, max(1, tokens // t), compile_scope, loss, sdpa, accum)


def make_model_step(cfg: ModelConfig, b: int, compile_scope: str = "model", loss: str = "fp32", sdpa: str = "default",
                    accum: int = 1):
    """:func:`make_step` for a given model config and ``b`` sequences of
    ``cfg.max_seq_len`` tokens per microbatch."""
    t = cfg.max_seq_len
    torch.manual_seed(0)
    model = MixAttentionLM(cfg).cuda()
    flops_seq = model.flops_per_sequence(t)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    if compile_scope == "blocks":
        for block in model.blocks:
            block.compile()
    x = torch.randint(0, cfg.vocab_size, (b, t), device="cuda")

    def loss_fn(ids):
        if loss == "chunked":
            return chunked_cross_entropy(model.hidden_states(ids), model.output_weight, ids)
        return model(ids, labels=ids).loss

    step_loss = torch.compile(loss_fn) if compile_scope == "model" else loss_fn

    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel = SDPA_BACKENDS[sdpa]

    def step():
        for _ in range(accum):
            ctx = sdpa_kernel(getattr(SDPBackend, kernel)) if kernel else contextlib.nullcontext()
            with ctx, torch.autocast("cuda", dtype=torch.bfloat16):
                value = step_loss(x)
            value.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return value

    return step, {"B": b, "flops_per_sequence": flops_seq, "flops_per_step": accum * b * flops_seq,
                  "flops_per_sequence_llm_foundry": llm_foundry_flops_per_sequence(model, t)}


def llm_foundry_flops_per_sequence(model: MixAttentionLM, t: int) -> float:
    """llm-foundry's MPT convention, for comparison with its MFU tables:
    3 x (2 x all parameters x T + 4 x n_layers x d_model x T^2), i.e. every
    layer counted as full, unmasked T x T attention (no causal halving, no
    window)."""
    cfg = model.cfg
    return 3.0 * (2 * model.num_params() * t + 4 * cfg.n_layers * cfg.d_model * t * t)


def warm_until_steady(step, tolerance: float = 0.03, max_steps: int = 20, sync=None, clock=time.perf_counter) -> int:
    """Run (after compilation) until two consecutive steps take times within
    ``tolerance`` of each other, at most ``max_steps``; returns the steps run.
    Kernels compiled on first use outside torch.compile (flash-attn-4's) once
    landed in the timed steps of a fixed 3-step warm-up: 319 ms/step against
    196 when warm (docs/benchmarks.md)."""
    sync = sync or torch.cuda.synchronize
    last = None
    for n in range(1, max_steps + 1):
        start = clock()
        step()
        sync()
        took = clock() - start
        if last is not None and abs(took - last) <= tolerance * last:
            return n
        last = took
    return max_steps


def run_one(size: str, plan: str, t: int, tokens: int, window: int, steps: int, compile_scope: str, loss: str,
            sdpa: str = "default", model_settings: dict | None = None, accum: int = 1) -> dict:
    step, info = make_step(size, plan, t, tokens, window, compile_scope, loss, sdpa, model_settings, accum)
    b, flops_seq = info["B"], info["flops_per_sequence"]
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(3):  # compile + warm-up
        step()
    warm_steps = 3 + warm_until_steady(step)
    warm_s = time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step()
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / steps
    seqs = accum * b  # sequences per optimizer step
    tok_s = seqs * t / (ms / 1e3)
    mfu = seqs * flops_seq / (ms / 1e3) / peak_flops()
    mfu_foundry = seqs * info["flops_per_sequence_llm_foundry"] / (ms / 1e3) / peak_flops()
    del step
    torch.cuda.empty_cache()
    return {"size": size, "plan": plan, "T": t, "B": b, "accum": accum, "compile": compile_scope, "loss": loss, "sdpa": sdpa,
            **({"model": model_settings} if model_settings else {}), "ms_per_step": ms,
            "tokens_per_s": tok_s, "mfu": mfu, "mfu_llm_foundry": mfu_foundry, "flops_per_sequence": flops_seq,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "warmup_s": warm_s, "warmup_steps": warm_steps}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="350m", choices=sorted(SIZES))
    parser.add_argument("--plans", nargs="+", default=["standard", "ma", "all_sliding"])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--tokens", type=int, default=32768, help="tokens per step; batch = tokens / T")
    parser.add_argument("--accum", type=int, nargs="+", default=[1],
                        help="microbatches of --tokens per optimizer step, one or more settings to time "
                             "(ms/step, tokens/s and MFU count all of a step's microbatches)")
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--compile", nargs="+", default=["model"], choices=["model", "blocks", "none"],
                        help="compile scope(s) to time: the whole model, each block, or none")
    parser.add_argument("--loss", nargs="+", default=["fp32"], choices=["fp32", "chunked"],
                        help="loss variant(s): full float32 logits or chunked cross-entropy")
    parser.add_argument("--sdpa", nargs="+", default=["default"], choices=sorted(SDPA_BACKENDS),
                        help="SDPA kernel(s) for global layers")
    parser.add_argument("--model", nargs="+", default=[], metavar="KEY=VALUE",
                        help="other ModelConfig fields for every row (JSON values), e.g. fp32_residual=false")
    parser.add_argument("--inductor", nargs="+", default=[], metavar="KEY=VALUE",
                        help="torch._inductor.config settings (JSON values), e.g. coordinate_descent_tuning=true")
    parser.add_argument("--name", default="train_throughput", help="result file name")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    model_settings = parse_model_settings(args.model)
    if min(args.accum) < 1:
        parser.error(f"--accum must be >= 1, got {min(args.accum)}")
    if not prepare_gpu("benchmarks/train_throughput.py", recompile_limit=64):
        return 2
    apply_inductor_settings(args.inductor)
    rows = []
    for t in args.seq_lens:
        for plan in args.plans:
            for scope, loss, sdpa, accum in itertools.product(args.compile, args.loss, args.sdpa, args.accum):
                try:
                    row = run_one(args.size, plan, t, args.tokens, args.window, args.steps, scope, loss, sdpa, model_settings,
                                  accum)
                except Exception as e:  # out of memory, a compile failure: recorded, not hidden
                    row = {"size": args.size, "plan": plan, "T": t, "accum": accum, "compile": scope, "loss": loss, "sdpa": sdpa,
                           "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
                    torch.cuda.empty_cache()
                rows.append(row)
                print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    summary = []  # each plan against standard with the same T, compile scope and loss
    for r in rows:
        if "error" in r:
            continue
        base = next((b for b in rows if "error" not in b and b["plan"] == "standard"
                     and (b["T"], b["accum"], b["compile"], b["loss"], b["sdpa"])
                     == (r["T"], r["accum"], r["compile"], r["loss"], r["sdpa"])), None)
        if base:
            r["speedup_vs_standard"] = r["tokens_per_s"] / base["tokens_per_s"]
            summary.append({"T": r["T"], "accum": r["accum"], "plan": r["plan"], "compile": r["compile"], "loss": r["loss"], "sdpa": r["sdpa"],
                            "speedup_vs_standard": r["speedup_vs_standard"]})
    from tabulate import tabulate

    print()
    print(tabulate([(r["T"], f"{r['B']}x{r['accum']}" if "B" in r else "-", r["plan"], r["compile"], r["loss"], r["sdpa"],
                     f"{r['ms_per_step']:.1f}" if "ms_per_step" in r else r.get("error"),
                     f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else "-", f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-",
                     f"{100 * r['mfu_llm_foundry']:.1f}%" if "mfu" in r else "-",
                     f"{r['peak_mem_gib']:.1f}" if "peak_mem_gib" in r else "-",
                     f"{r['speedup_vs_standard']:.2f}x" if "speedup_vs_standard" in r else "-")
                    for r in rows],
                   headers=["T", "B x accum", "plan", "compile", "loss", "sdpa", "ms/step", "tokens/s", "MFU", "MFU (llm-foundry)", "peak GiB", "vs standard"]))
    path = write_result(args.name, {"config": vars(args), "rows": rows, "summary": summary}, args.out, topic="training")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
