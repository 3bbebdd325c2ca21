"""Multi-GPU scaling through the real training path: Composer's launcher,
mixattn's Trainer assembly (FSDP2 from the recipe), StreamingDataset over MDS
shards written here from Python's standard library source.

    python benchmarks/train_scaling.py --recipe yamls/pretrain/standard-350m.yaml --gpus 1 2

For each GPU count N it runs ``composer -n N`` on this file in worker mode for
``--batches`` steps of the recipe's per-device batch (global batch = per-device
x N, so each GPU does the same work), times the steps after ``--warmup``, and
reports tokens/s, per-GPU tokens/s, MFU (the plan's FLOPs, as in
train_throughput.py) and scaling efficiency = tokens/s(N) / (N x tokens/s(1)).
Prints a table; writes benchmarks/results/NAME.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


CORPORA = ("files", "packages")


def corpus_for(choice: str, seq_len: int) -> str:
    """``auto``: the stdlib's modules (files) below 16K tokens, its packages
    (long documents) from 16K up, the data each kind of recipe is for."""
    return choice if choice != "auto" else ("packages" if seq_len >= 16384 else "files")


def prepare_data(work: Path, max_seq_len: int, corpus: str = "files") -> Path:
    """MDS shards of real text packed at ``max_seq_len`` under WORK/data, and
    a BPE tokenizer of 8,192 tokens trained on it. ``corpus``: ``files``, the
    stdlib's top-level modules, one document each (4.8K tokens at the
    median); ``packages``, the stdlib's packages, each package's sources
    concatenated into one document (repository-level code, the long
    documents a 32K extension trains on; benchmarks.common.stdlib_packages)."""
    from common import stdlib_packages

    from mixattn.data import convert_to_mds, load_tokenizer, train_tokenizer
    from mixattn.demo import stdlib_corpus

    if corpus not in CORPORA:
        raise ValueError(f"corpus must be one of {', '.join(CORPORA)}, got {corpus!r}")
    data = work / "data"
    if not (data / "train" / "index.json").is_file():
        files = stdlib_corpus() if corpus == "files" else stdlib_packages(work / "documents")
        tok = train_tokenizer(files, work / "tokenizer", vocab_size=8192)
        convert_to_mds(files, data, load_tokenizer(tok), max_seq_len, val_fraction=0.0, progress=False)
    return data


def gpu_idle_by_phase(trace: dict, steps: int) -> dict:
    """From a chrome trace of ``steps`` training batches (torch.profiler,
    with every Composer event marked as a ``composer/EVENT`` range that lasts
    until the next event): ms per batch of wall time, GPU busy time (the union
    of kernels, copies and memsets) and GPU idle time, the idle time split by
    the Composer phase the host was in meanwhile."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    gpu = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events
                 if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    phases = sorted((e["ts"], e["ts"] + e.get("dur", 0), e["name"][len("composer/"):]) for e in events
                    if e.get("ph") == "X" and str(e.get("name", "")).startswith("composer/") and e.get("cat") != "gpu_user_annotation")
    starts = [p for p in phases if p[2] == "batch_start"]
    ends = [p for p in phases if p[2] == "batch_end"]
    if not gpu or not starts or not ends:
        return {"error": "the trace holds no GPU work or no batch markers"}
    t0, t1 = starts[0][0], ends[-1][1]
    busy, idle, last = 0.0, [], t0
    for a, b in gpu:
        a, b = max(a, t0), min(b, t1)
        if b <= last:
            continue
        if a > last:
            idle.append((last, a))
        busy += b - max(a, last)
        last = b
    if last < t1:
        idle.append((last, t1))
    by_phase: dict[str, float] = {}
    for a, b in idle:
        for pa, pb, name in phases:
            overlap = min(b, pb) - max(a, pa)
            if overlap > 0:
                by_phase[name] = by_phase.get(name, 0.0) + overlap
    per = 1e-3 / steps  # us over all steps -> ms per step
    return {"steps": steps, "ms_per_step": (t1 - t0) * per, "gpu_busy_ms_per_step": busy * per,
            "gpu_idle_ms_per_step": sum(b - a for a, b in idle) * per,
            "idle_ms_per_step_by_phase": {k: v * per for k, v in sorted(by_phase.items(), key=lambda kv: -kv[1])}}


def worker(args) -> int:
    import torch
    from composer.core import Callback, Event
    from composer.utils import dist

    from mixattn.model import MixAttentionLM
    from mixattn.training.recipe import load_recipe
    from mixattn.training.trainer import build_trainer

    cfg = load_recipe(args.recipe, args.override)
    times: list[float] = []
    losses: list[float] = []
    traced: dict = {}

    class StepTimer(Callback):
        def batch_end(self, state, logger):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter())
            loss = state.loss  # after the synchronize above: reading it costs no extra wait
            losses.append(float(sum(loss.values()) if isinstance(loss, dict) else loss))

    class Tracer(Callback):
        """Profiles --trace batches after the warm-up, each Composer event a named range."""

        def __init__(self):
            self.prof, self.range, self.started = None, None, 0

        def run_event(self, event, state, logger):
            if self.range is not None:
                self.range.__exit__(None, None, None)
                self.range = None
            # batches are counted here: Composer's timestamp already counts a batch at its BATCH_END
            if event == Event.BATCH_START and state.timestamp.batch.value == args.warmup and self.prof is None:
                acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
                self.prof = torch.profiler.profile(activities=acts)
                self.prof.start()
            if self.prof is not None and not traced:
                self.started += event == Event.BATCH_START
                self.range = torch.profiler.record_function(f"composer/{event.value}")
                self.range.__enter__()
                if event == Event.BATCH_END and self.started == args.trace:
                    self.range.__exit__(None, None, None)
                    self.range = None
                    self.prof.stop()
                    with tempfile.NamedTemporaryFile(suffix=".json") as f:
                        self.prof.export_chrome_trace(f.name)
                        traced.update(gpu_idle_by_phase(json.loads(Path(f.name).read_text()), args.trace))

    callbacks = [StepTimer()] + ([Tracer()] if args.trace else [])
    trainer = build_trainer(cfg, extra_callbacks=callbacks)
    trainer.fit()
    if dist.get_global_rank() == 0:
        # the traced batches (and the trace's export) are not timed
        steps = times[args.warmup + args.trace:]
        if len(steps) < 2:
            raise SystemExit(f"--batches {args.batches} leaves fewer than 2 timed batches after --warmup and --trace")
        seconds = (steps[-1] - steps[0]) / (len(steps) - 1)
        step_ms = [round((b - a) * 1e3, 2) for a, b in zip(times, times[1:])]
        tokens = cfg.global_train_batch_size * cfg.model.max_seq_len
        with torch.device("meta"):  # the FLOP count needs only parameter shapes
            flops = cfg.global_train_batch_size * MixAttentionLM(cfg.model).flops_per_sequence(cfg.model.max_seq_len)
        Path(args.result).write_text(json.dumps({
            "world_size": dist.get_world_size(), "global_batch": cfg.global_train_batch_size, "T": cfg.model.max_seq_len,
            "s_per_step": seconds, "tokens_per_s": tokens / seconds, "flops_per_step": flops, "step_ms": step_ms,
            "loss": losses, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
            "resolved": getattr(trainer, "mixattn_resolved", None), "doc_mask": cfg.data.doc_mask,
            "attn_backend": cfg.model.attn_backend, "plan": cfg.model.plan if isinstance(cfg.model.plan, str) else "custom",
            "timed_batches": len(steps) - 1, "save_interval": cfg.save_interval if cfg.save_folder else None,
            **({"trace": traced} if args.trace else {}),
        }))
    return 0


def recipe_microbatch(cfg) -> int:
    """The recipe's microbatch per GPU, ``auto`` resolved as one training
    process on this device resolves it (mixattn.training.parallelize), so a
    benchmark that pins one microbatch per optimizer step runs the
    microbatch the recipe would."""
    if cfg.device_train_microbatch_size != "auto":
        return cfg.device_train_microbatch_size or cfg.global_train_batch_size
    import torch

    from mixattn.model import MixAttentionLM
    from mixattn.training.parallelize import microbatch_choice

    with torch.device("meta"):
        model = MixAttentionLM(cfg.model)
    micro, why = microbatch_choice(model, cfg, 1, device="gpu" if torch.cuda.is_available() else "cpu")
    print(f"device_train_microbatch_size: auto -> {why}", flush=True)
    return micro


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="yamls/pretrain/standard-350m.yaml")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10, help="steps not timed (compile, allocator warm-up)")
    parser.add_argument("--trace", type=int, default=0, metavar="N",
                        help="also profile N batches after the warm-up: GPU idle time per batch by Composer phase")
    parser.add_argument("--corpus", default="auto", choices=["auto", *CORPORA],
                        help="stdlib modules (files), stdlib packages as long documents (packages), or auto: files "
                             "below 16K tokens, packages from 16K")
    parser.add_argument("--workdir", default=None, help="where data and runs go (default: a temporary directory)")
    parser.add_argument("--name", default="train_scaling")
    parser.add_argument("--out", default=None)
    parser.add_argument("override", nargs="*", help="recipe key=value overrides")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    import torch
    from common import write_result
    from train_throughput import peak_flops

    from mixattn.training.recipe import load_recipe

    if not torch.cuda.is_available():
        print("benchmarks/train_scaling.py needs CUDA GPUs", file=sys.stderr)
        return 2
    work = Path(args.workdir or tempfile.mkdtemp(prefix="mixattn-scaling-"))
    base = load_recipe(args.recipe, args.override)
    per_device = recipe_microbatch(base)
    data = prepare_data(work, base.model.max_seq_len, corpus_for(args.corpus, base.model.max_seq_len))
    rows = []
    for n in args.gpus:
        result = work / f"result-{n}.json"
        overrides = [
            *args.override, f"data.train=[{{local: {data / 'train'}}}]", "data.eval=[]", f"max_duration={args.batches}ba",
            f"global_train_batch_size={per_device * n}", f"device_train_microbatch_size={per_device}", "save_folder=null",
            "autoresume=false", "wandb=null", "progress_bar=false", "console_log_interval=1000ba", f"run_name=scaling-{n}",
        ]
        cmd = [sys.executable, "-m", "composer.cli.launcher", "-n", str(n), __file__, "--worker", "--result", str(result),
               "--recipe", args.recipe, "--warmup", str(args.warmup), "--trace", str(args.trace), *overrides]
        t0 = time.time()
        proc = subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True)
        if proc.returncode or not result.is_file():
            print(proc.stdout[-3000:], proc.stderr[-5000:], sep="\n", file=sys.stderr)
            rows.append({"gpus": n, "error": f"exit {proc.returncode}", "stderr_tail": proc.stderr[-2000:]})
            continue
        row = {"gpus": n, **json.loads(result.read_text()), "wall_s": time.time() - t0}
        row["tokens_per_s_per_gpu"] = row["tokens_per_s"] / n
        row["mfu"] = row["flops_per_step"] / row["s_per_step"] / n / peak_flops()
        rows.append(row)
        print(row, flush=True)
    one = next((r for r in rows if r.get("gpus") == 1 and "error" not in r), None)
    for r in rows:
        if one and "error" not in r:
            r["scaling_efficiency"] = r["tokens_per_s"] / (r["gpus"] * one["tokens_per_s"])
    from tabulate import tabulate

    print(tabulate([(r["gpus"], r.get("global_batch", "-"), f"{r['s_per_step'] * 1e3:.1f}" if "s_per_step" in r else r["error"],
                     f"{r.get('tokens_per_s', 0):,.0f}", f"{r.get('tokens_per_s_per_gpu', 0):,.0f}",
                     f"{100 * r.get('mfu', 0):.1f}%", f"{r.get('scaling_efficiency', 0):.3f}") for r in rows],
                   headers=["GPUs", "global batch", "ms/step", "tokens/s", "tokens/s/GPU", "MFU", "scaling eff."]))
    path = write_result(args.name, {"config": {k: v for k, v in vars(args).items() if k not in ("worker", "result")},
                                    "recipe": args.recipe, "rows": rows}, args.out, topic="training")
    print(f"wrote {path}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
