"""Shared by the benchmark programs: environment record and JSON output."""

from __future__ import annotations

import datetime
import json
import platform
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def prepare_gpu(program: str, recompile_limit: int) -> bool:
    """False (with a message) without CUDA; else let dynamo keep ``recompile_limit``
    compiled variants (a benchmark compiles many shapes in one process)."""
    import torch

    if not torch.cuda.is_available():
        print(f"{program} needs a CUDA GPU", file=sys.stderr)
        return False
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, recompile_limit)
    return True


def apply_settings(target, settings: list[str], flag: str) -> None:
    """Set attributes of ``target`` (a module) from KEY=VALUE strings (VALUE
    is JSON: true, 1, "x"; KEY may be dotted); an unknown key fails naming
    it and the flag."""
    import json

    for setting in settings:
        key, sep, value = setting.partition("=")
        *parents, name = key.split(".")
        obj = target
        for part in parents:
            obj = getattr(obj, part, None)
        if not sep or obj is None or not hasattr(obj, name):
            raise SystemExit(f"{flag} {setting!r}: expected KEY=VALUE with KEY in {target.__name__}")
        setattr(obj, name, json.loads(value))


def apply_inductor_settings(settings: list[str]) -> None:
    """torch._inductor.config from KEY=VALUE strings, e.g. coordinate_descent_tuning=true."""
    import torch._inductor.config as config

    apply_settings(config, settings, "--inductor")


def parse_model_settings(settings: list[str]) -> dict:
    """ModelConfig fields from KEY=VALUE strings (VALUE is JSON), e.g.
    fp32_residual=false."""
    import json

    out = {}
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep:
            raise SystemExit(f"--model {setting!r}: expected KEY=VALUE, e.g. fp32_residual=false")
        out[key] = json.loads(value)
    return out


def environment() -> dict:
    import torch

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "host": platform.node(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("flash-attn", "flash-attn-4"):  # flash-attn-4 (flash_attn.cute) has no flash_attn.__version__
        try:
            env[dist.replace("-", "_")] = version(dist)
        except PackageNotFoundError:
            env[dist.replace("-", "_")] = None
    return env


def write_result(name: str, payload: dict, out_dir: str | None = None, topic: str | None = None) -> Path:
    """Write ``payload`` with the command line, time and environment to
    benchmarks/results/TOPIC/NAME.json (or OUT_DIR/NAME.json). Topics:
    attention, decode, recipes, training, replication, serving."""
    record = {
        "benchmark": name,
        "command": " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(),
        **payload,
    }
    directory = Path(out_dir) if out_dir else RESULTS / (topic or "")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def stdlib_doc_lengths(vocab_size: int = 8192) -> list[int]:
    """Token counts of the stdlib corpus's documents (the demo's and the
    training benchmarks' real text), under a BPE tokenizer trained on it
    here (about a second)."""
    import tempfile

    from mixattn.data import load_tokenizer, train_tokenizer
    from mixattn.demo import stdlib_corpus

    files = stdlib_corpus()
    with tempfile.TemporaryDirectory() as tmp:
        tok = load_tokenizer(train_tokenizer(files, Path(tmp), vocab_size=vocab_size))
        texts = [p.read_text(errors="replace") for p in files]
        return [len(ids) + 1 for ids in tok.encode_batch(texts)]  # + EOS


def stdlib_packages(dest: Path) -> list[Path]:
    """A long-document corpus of real text: one document per package of the
    running interpreter's standard library (asyncio, email, idlelib, ...),
    its ``.py`` files concatenated in path order, each preceded by a
    ``# file: PATH`` line, as repository-level code corpora are built.
    ``test`` is left out (17 MB, a third of it data files). Writes DEST/NAME.py
    (32 documents, 9.7 MB on CPython 3.11; 44K tokens at the median under an 8K BPE) and
    returns the paths; writes nothing that is already there."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for package in sorted(p for p in root.iterdir() if p.is_dir() and (p / "__init__.py").is_file() and p.name != "test"):
        sources = sorted(package.rglob("*.py"))
        doc = dest / f"{package.name}.py"
        if not doc.is_file():
            parts = [f"# file: {f.relative_to(root)}\n{f.read_text(errors='replace')}" for f in sources]
            tmp = doc.with_suffix(".tmp")
            tmp.write_text("\n".join(parts))
            tmp.replace(doc)
        out.append(doc)
    if not out:
        raise RuntimeError(f"no standard-library packages found under {root}")
    return out


def long_doc_lengths(n: int = 512, low: int = 8192, high: int = 131072, seed: int = 0) -> list[int]:
    """A long-document corpus: lengths log-uniform in [low, high] tokens
    (books, code repositories), the data a 32K extension trains on."""
    import random

    rng = random.Random(seed)
    return [int(low * (high / low) ** rng.random()) for _ in range(n)]


def packed_doc_ids(lengths: list[int], batch: int, seq_len: int, seed: int = 0):
    """doc ids [batch, seq_len] (int64) of documents with these lengths,
    shuffled and packed end to end as `mixattn data` packs them, cut into
    rows; a row starts mid-document where the previous row ended."""
    import random

    import torch

    rng = random.Random(seed)
    need, ids, doc = batch * seq_len, [], 0
    while len(ids) < need:
        ids.extend([doc] * rng.choice(lengths))
        doc += 1
    return torch.tensor(ids[:need]).view(batch, seq_len)
