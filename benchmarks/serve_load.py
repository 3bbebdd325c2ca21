"""The serving workload through ``mixattn serve``'s HTTP server, measured as
a client sees it (GPU): vLLM's ``benchmark_serving`` for mixattn.

    python benchmarks/serve_load.py                  # standard and MA-Offset: 64 prompts of ~31K tokens, 512 out
    python benchmarks/serve_load.py --plans ma_offset --request-rate 2 --num-prompts 200 --input-len 4096
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --model demo --input-len 512 --output-len 128

For each plan, a server process (this program with ``--serve``) builds
``benchmarks/decode.py``'s 1.3B model (random bf16 weights; speed does not
depend on them; window 1024) and serves it as ``mixattn serve`` does:
``mixattn.serve.create_app`` over an ``Engine`` on the default decode path,
prefill chunks of 2,048 and the default prefill budget, as many rows of
``--context`` tokens as ``--kv-budget`` holds (at most one per prompt),
uvicorn on localhost. With ``--url``, any running server instead (one plan,
its own settings).

The client (this process, ``openai.AsyncOpenAI``) first sends one request
to compile and capture (untimed), then ``--num-prompts`` requests of random
token ids, ``--input-len`` long (each within ``--range-ratio`` of it), each
asking ``--output-len`` tokens (``ignore_eos``), streamed with usage, at
``--request-rate`` requests/s (Poisson arrivals; ``inf``: all at once), at
most ``--max-concurrency`` in flight. Per plan, as vLLM reports them: wall
time, requests/s, output and total tokens/s, time to first token, time per
output token after the first (TPOT) and between streamed chunks (ITL), mean,
median and p99, in ms; and from the server's ``/stats``: the most tokens held
at once, rows, KV cache bytes. Writes benchmarks/results/serving/NAME.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode import DIMS  # noqa: E402

PLANS = ["standard", "ma_offset"]
TINY = dict(vocab_size=512, d_model=64, n_layers=24, n_heads=4)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plans", nargs="+", default=PLANS)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=31744)
    p.add_argument("--output-len", type=int, default=512)
    p.add_argument("--range-ratio", type=float, default=0.03, help="each prompt's length is within this fraction of --input-len")
    p.add_argument("--request-rate", type=float, default=math.inf, help="requests/s, Poisson arrivals (inf: all at once)")
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most (default: no limit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--kv-budget", default="40GiB")
    p.add_argument("--url", default=None, help="a running server (then --model names its model, and --plans is ignored)")
    p.add_argument("--model", default=None)
    p.add_argument("--tiny", action="store_true", help="a tiny model (a CPU check of the program)")
    p.add_argument("--name", default="serve_load")
    p.add_argument("--out", default=None)
    p.add_argument("--serve", metavar="PLAN", help=argparse.SUPPRESS)  # the server process's mode
    p.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    return p


# -- the server process ----------------------------------------------------------------------------


def synthetic_tokenizer(vocab_size: int):
    """A word-level tokenizer with one token per id (``<i>``, EOS last), so a
    random-weight model of any vocabulary can be served: prompts are sent as
    token ids, and outputs come back as text."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    from mixattn.data import EOS_TOKEN, Tokenizer

    vocab = {f"<{i}>": i for i in range(vocab_size - 1)} | {EOS_TOKEN: vocab_size - 1}
    backend = HFTokenizer(models.WordLevel(vocab, unk_token=EOS_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([EOS_TOKEN])
    return Tokenizer(backend=backend, eos_id=vocab_size - 1, vocab_size=vocab_size, name="synthetic")


def serve(args) -> int:
    """Serve the benchmark model as ``mixattn serve`` does, on localhost:--port."""
    import torch
    import uvicorn

    from mixattn.engine import Engine, max_slots_for
    from mixattn.model import MixAttentionLM, ModelConfig
    from mixattn.plan import parse_bytes
    from mixattn.serve import create_app

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    cfg = ModelConfig(**(TINY if args.tiny else DIMS), max_seq_len=args.context, plan=args.serve, window=args.window)
    model = MixAttentionLM(cfg).to(device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32).eval()
    slots = min(args.num_prompts, max_slots_for(model, args.context, parse_bytes(args.kv_budget)))
    if slots < 1:
        print(f"--kv-budget {args.kv_budget} fits no row of {args.context} tokens", file=sys.stderr)
        return 2
    engine = Engine(model, max_slots=slots, max_context=args.context, chunk_size=2048)  # mixattn serve's defaults
    print(f"serving {args.serve}: {slots} rows, decode path: {engine.decode_path.describe()}", file=sys.stderr, flush=True)
    uvicorn.run(create_app(engine, synthetic_tokenizer(cfg.vocab_size), args.serve), host="127.0.0.1", port=args.port,
                log_level="warning")
    return 0


def start_server(args, plan: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, __file__, "--serve", plan, "--port", str(port), "--num-prompts", str(args.num_prompts),
           "--context", str(args.context), "--window", str(args.window), "--kv-budget", args.kv_budget] + ["--tiny"] * args.tiny
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return proc, url
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"the server for {plan} exited with {proc.returncode}: {proc.stderr.read()[-2000:]}") from None
            if time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"the server for {plan} did not start in 600 s") from None
            time.sleep(0.5)


# -- the client ------------------------------------------------------------------------------------


async def one_request(client, model: str, prompt: list[int], output_len: int) -> dict:
    """Stream one completion; the times of its chunks and its usage."""
    start = time.perf_counter()
    chunks, usage = [], None
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=output_len, temperature=0, stream=True,
                                             stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            chunks.append(time.perf_counter())
        if chunk.usage is not None:
            usage = chunk.usage
    end = time.perf_counter()
    return {"start": start, "chunks": chunks, "end": end, "prompt_tokens": usage.prompt_tokens if usage else len(prompt),
            "output_tokens": usage.completion_tokens if usage else 0}


async def run_load(url: str, model: str, prompts: list[list[int]], output_len: int, rate: float, concurrency: int | None,
                   seed: int) -> tuple[list[dict], float]:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=os.environ.get("MIXATTN_API_KEY", "none"), max_retries=0,
                                timeout=None)
    await one_request(client, model, prompts[0][:2 * 2048 + 8], 4)  # compile and capture, two prefill chunks: untimed
    limit = asyncio.Semaphore(concurrency or len(prompts))
    rng = random.Random(seed)

    async def limited(p):
        async with limit:
            try:
                return await one_request(client, model, p, output_len)
            except openai.APIError as e:
                return {"error": f"{type(e).__name__}: {e}"}

    t0 = time.perf_counter()
    tasks = []
    for p in prompts:
        tasks.append(asyncio.create_task(limited(p)))
        if math.isfinite(rate):
            await asyncio.sleep(rng.expovariate(rate))
    results = await asyncio.gather(*tasks)
    return results, time.perf_counter() - t0


def percentiles(values: list[float], prefix: str) -> dict:
    if not values:
        return {f"{prefix}_{k}_ms": None for k in ("mean", "median", "p99")}
    v = sorted(values)
    return {f"{prefix}_mean_ms": 1000 * sum(v) / len(v), f"{prefix}_median_ms": 1000 * v[len(v) // 2],
            f"{prefix}_p99_ms": 1000 * v[min(len(v) - 1, int(len(v) * 0.99))]}


def summarize(results: list[dict], wall: float) -> dict:
    """vLLM's serving metrics from the requests' chunk times."""
    done = [r for r in results if "error" not in r]
    ttft = [r["chunks"][0] - r["start"] for r in done if r["chunks"]]
    tpot = [(r["end"] - r["chunks"][0]) / (r["output_tokens"] - 1) for r in done if r["chunks"] and r["output_tokens"] > 1]
    itl = [b - a for r in done for a, b in zip(r["chunks"], r["chunks"][1:])]
    out = sum(r["output_tokens"] for r in done)
    total = out + sum(r["prompt_tokens"] for r in done)
    return {"completed": len(done), "failed": len(results) - len(done),
            "errors": sorted({r["error"] for r in results if "error" in r})[:3], "wall_s": wall,
            "input_tokens": total - out, "output_tokens": out, "request_throughput": len(done) / wall,
            "output_tokens_per_s": out / wall, "total_tokens_per_s": total / wall,
            **percentiles(ttft, "ttft"), **percentiles(tpot, "tpot"), **percentiles(itl, "itl"),
            **percentiles([r["end"] - r["start"] for r in done], "e2e")}


def workload(args, vocab_size: int) -> list[list[int]]:
    rng = random.Random(args.seed)
    lo, hi = int(args.input_len * (1 - args.range_ratio)), int(args.input_len * (1 + args.range_ratio))
    hi = min(hi, args.context - args.output_len)
    return [[rng.randrange(vocab_size - 1) for _ in range(rng.randint(min(lo, hi), hi))] for _ in range(args.num_prompts)]


def stats(url: str) -> dict:
    with urllib.request.urlopen(url + "/stats") as r:
        return json.loads(r.read())


def run_plan(args, plan: str | None) -> dict:
    proc = None
    url, model = args.url, args.model
    if url is None:
        proc, url = start_server(args, plan)
        model = plan
    try:
        with urllib.request.urlopen(url + "/tokenizer_info") as r:
            vocab = json.loads(r.read()).get("vocab_size") or 32000
        prompts = workload(args, vocab)
        results, wall = asyncio.run(run_load(url, model, prompts, args.output_len, args.request_rate, args.max_concurrency,
                                             args.seed))
        server = stats(url)
    finally:
        if proc is not None:
            proc.terminate()
            err = proc.communicate(timeout=60)[1]
            print(err.strip().splitlines()[0] if err.strip() else "", file=sys.stderr)
    return {"plan": plan or model, **summarize(results, wall), "rows": server["max_slots"],
            "kv_cache_bytes": server["kv_cache_bytes"], "max_in_flight_tokens": server["max_in_flight_tokens"]}


def table(rows: list[dict]) -> list[dict]:
    base = next((r for r in rows if r["plan"] == "standard" and r["completed"]), None)
    out = []
    for r in rows:
        vs = lambda key: f"{r[key] / base[key]:.2f}x" if base and r["completed"] else ""
        out.append({"plan": r["plan"], "done": f"{r['completed']}/{r['completed'] + r['failed']}", "rows": r["rows"],
                    "wall s": round(r["wall_s"], 1), "out tok/s": round(r["output_tokens_per_s"]), "vs standard": vs("output_tokens_per_s"),
                    "TTFT p50 ms": round(r["ttft_median_ms"] or 0), "TPOT p50 ms": round(r["tpot_median_ms"] or 0, 2),
                    "ITL p99 ms": round(r["itl_p99_ms"] or 0, 2), "max in flight": r["max_in_flight_tokens"],
                    "in flight vs standard": vs("max_in_flight_tokens")})
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.serve:
        return serve(args)
    if args.url and not args.model:
        build_parser().error("--url needs --model (the name the server serves)")
    from common import write_result
    from tabulate import tabulate

    config = {k: v for k, v in vars(args).items() if k not in ("serve", "port")}
    config["request_rate"] = str(args.request_rate)  # inf is not JSON
    rows = []
    for plan in [None] if args.url else args.plans:
        rows.append(run_plan(args, plan))
        print(json.dumps(rows[-1]), flush=True)
        path = write_result(args.name, {"config": config, "path": "mixattn serve (create_app + uvicorn), streamed through "
                                        "the openai client" if not args.url else f"the server at {args.url}", "rows": rows},
                            args.out, topic="serving")
    print(tabulate(table(rows), headers="keys"))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
