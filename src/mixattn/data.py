"""Text -> tokens -> MosaicML streaming (MDS) shards of packed sequences, and
the training-side reader.

Each MDS sample is one packed sequence: column ``tokens`` (int32, exactly
``max_seq_len`` tokens). Documents are tokenized, an EOS appended, concatenated
and cut; document boundaries are recovered at load time from the EOS tokens
(the token after an EOS starts a new document), so attention can be masked per
document without storing a second column.

Fine-tuning data (``convert_finetune_to_mds``) adds a ``loss_mask`` column
(uint8, 1 on response tokens): the collate function turns the masked
positions' labels into -100, so only responses are learned.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

EOS_TOKEN = "<|endoftext|>"


class DataError(ValueError):
    pass


# -- tokenizers ---------------------------------------------------------------


@dataclass
class Tokenizer:
    """What the pipeline needs of a tokenizer: batch encode, EOS id, vocab size."""

    backend: object  # tokenizers.Tokenizer or a transformers tokenizer
    eos_id: int
    vocab_size: int
    name: str

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if hasattr(self.backend, "encode_batch"):
            return [e.ids for e in self.backend.encode_batch(texts)]
        return self.backend(texts, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids))

    def fingerprint(self) -> str:
        """sha256 of what decides the ids (the serialized tokenizer: vocabulary,
        merges, normalizer; for a slow transformers tokenizer its vocabulary):
        equal for two copies of one tokenizer, different after any retraining."""
        backend = getattr(self.backend, "backend_tokenizer", self.backend)  # a fast transformers tokenizer's core
        if hasattr(backend, "to_str"):
            text = backend.to_str()
        else:
            text = json.dumps(sorted(self.backend.get_vocab().items()))
        return hashlib.sha256(text.encode()).hexdigest()

    def record(self) -> dict:
        """Where the tokenizer is and what it is, as checkpoints and data folders keep it."""
        local = Path(self.name)
        return {"path": str(local.resolve()) if local.exists() else self.name, "sha256": self.fingerprint()}


def train_tokenizer(files: Sequence[str | Path], out_dir: str | Path, vocab_size: int = 8192) -> Path:
    """Train a byte-level BPE tokenizer on local text files with the
    ``tokenizers`` library; writes OUT_DIR/tokenizer.json and returns its path."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    files = [str(f) for f in files]
    if not files:
        raise DataError("train_tokenizer: no input files")
    if vocab_size < 257:  # the 256 byte symbols and EOS come first; below that the trainer silently ignores the size
        raise DataError(f"train_tokenizer: vocab_size must be at least 257 (256 bytes and EOS), got {vocab_size}")
    for f in files:
        if not Path(f).is_file():
            raise DataError(f"train_tokenizer: {f!r} is not a file")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS_TOKEN], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train(files, trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    return out / "tokenizer.json"


def load_tokenizer(name_or_path: str | Path) -> Tokenizer:
    """A tokenizer.json file, a directory holding one, or a Hugging Face name or
    directory (names need a reachable hub)."""
    p = Path(name_or_path)
    if p.is_dir() and (p / "tokenizer.json").is_file() and not (p / "tokenizer_config.json").is_file():
        p = p / "tokenizer.json"
    if p.is_file():
        from tokenizers import Tokenizer as HFTokenizer

        tok = HFTokenizer.from_file(str(p))
        eos = tok.token_to_id(EOS_TOKEN)
        if eos is None:
            raise DataError(f"tokenizer {str(p)!r} has no {EOS_TOKEN!r} token; train one with `mixattn tokenizer train`")
        return Tokenizer(tok, eos, tok.get_vocab_size(), str(p))
    if p.exists() and not (p / "tokenizer_config.json").is_file():
        raise DataError(f"tokenizer {str(p)!r} is a folder with neither tokenizer.json nor a transformers tokenizer")
    offline = None if p.exists() else _hub_offline()  # a transformers tokenizer folder needs no hub
    if offline:
        raise DataError(f"tokenizer {str(name_or_path)!r} is not a file or folder here (looked in {Path.cwd()}), and it "
                        f"cannot be a Hugging Face name: {offline}; give the path of a tokenizer.json or folder "
                        "(`mixattn tokenizer train` makes one)")
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(name_or_path))
    except Exception as e:
        raise DataError(f"cannot load tokenizer {str(name_or_path)!r}: not a local tokenizer.json, and transformers said: {e}") from None
    if tok.eos_token_id is None:
        raise DataError(f"tokenizer {str(name_or_path)!r} has no EOS token")
    return Tokenizer(tok, tok.eos_token_id, len(tok), str(name_or_path))


def _hub_offline() -> str | None:
    """Why a Hugging Face name cannot be fetched now (offline settings, or no
    connection to the hub within 2 s), or None: transformers would otherwise
    retry for most of a minute before failing."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var}={os.environ[var]}"
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=2).close()
    except OSError as e:
        return f"the hub ({endpoint.hostname}) is unreachable ({type(e).__name__})"
    return None


# -- reading raw text -------------------------------------------------------------

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".text"}


def iter_documents(inputs: Sequence[str | Path], text_field: str = "text") -> Iterator[str]:
    """Documents from plain text files (one file, one document), JSONL (one
    document per line, ``text_field``) and Parquet (column ``text_field``).
    Directories are walked in sorted order."""
    for path in expand_inputs(inputs):
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            for (rec,) in _jsonl_records(path, (text_field,), "--text-field"):
                yield rec
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            if text_field not in table.column_names:
                raise DataError(f"{path}: no column {text_field!r}; columns: {', '.join(table.column_names)}")
            yield from (str(t) for t in table.column(text_field).to_pylist())
        else:
            yield path.read_text(encoding="utf-8", errors="replace")


def _jsonl_records(path: Path, fields: tuple[str, ...], option: str) -> Iterator[tuple[str, ...]]:
    """The values of ``fields`` from each non-blank line of a JSONL file; errors
    name the file, the line and the missing field."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            missing = [k for k in fields if not isinstance(rec, dict) or k not in rec]
            if missing:
                raise DataError(f"{path}:{n}: no {' or '.join(map(repr, missing))} field (set {option})")
            yield tuple(str(rec[k]) for k in fields)


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES | {".jsonl", ".parquet"}))
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"input {str(p)!r} does not exist")
    if not files:
        raise DataError(f"no input files found in {[str(i) for i in inputs]}")
    return files


# -- writing MDS --------------------------------------------------------------------


@dataclass
class ConvertStats:
    documents: dict = field(default_factory=lambda: {"train": 0, "val": 0})
    tokens: dict = field(default_factory=lambda: {"train": 0, "val": 0})
    samples: dict = field(default_factory=lambda: {"train": 0, "val": 0})
    skipped: int = 0  # fine-tuning examples longer than max_seq_len


def _split_of(text: str, val_fraction: float, seed: int) -> str:
    # a stable hash of the document: the split does not depend on input order
    h = hashlib.blake2b(f"{seed}:{text}".encode("utf-8", "replace"), digest_size=8).digest()
    return "val" if int.from_bytes(h, "little") / 2**64 < val_fraction else "train"


class _SplitWriter:
    """MDS writers for the train and val splits of one dataset, written under a
    temporary directory and renamed into place by ``commit`` (an interrupted
    conversion leaves no half-written dataset). Use as a context manager:
    leaving it finishes the writers, and on an exception removes the
    temporary directory."""

    def __init__(self, out_dir: str | Path, columns: dict, compression: str | None):
        from streaming import MDSWriter

        self.out = Path(out_dir)
        if self.out.exists() and any(self.out.iterdir()):
            raise DataError(f"output directory {str(self.out)!r} is not empty; choose a new one")
        self.tmp = self.out.parent / f".tmp-{self.out.name}-{os.getpid()}"
        self.writers = {s: MDSWriter(out=str(self.tmp / s), columns=columns, compression=compression, hashes=["xxh64"],
                                     size_limit="64mb") for s in ("train", "val")}

    def write(self, split: str, sample: dict) -> None:
        self.writers[split].write(sample)

    def __enter__(self) -> _SplitWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        for w in self.writers.values():
            w.finish()
        if exc_type is not None:  # bad input, Ctrl-C: nothing half-written stays behind
            self._discard()
        return False

    def _discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def commit(self, tokenizer: Tokenizer, max_seq_len: int, stats: ConvertStats, empty_message: str, **meta) -> None:
        """Rename the finished splits into place with mixattn_data.json, or, if
        the train split is empty, remove them and raise ``empty_message``."""
        if stats.samples["train"] == 0:
            self._discard()
            raise DataError(empty_message)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        if self.out.exists():
            self.out.rmdir()
        self.tmp.rename(self.out)
        (self.out / "mixattn_data.json").write_text(json.dumps({
            **meta, "tokenizer": tokenizer.name, "tokenizer_record": tokenizer.record(),
            "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
            "max_seq_len": max_seq_len, "documents": stats.documents, "tokens": stats.tokens, "samples": stats.samples,
        }, indent=2))


def _closing(bar):
    """Iterate a tqdm bar and close it however the loop ends (an error's
    message then starts on a line of its own)."""
    with bar:
        yield from bar


def _check_convert_args(max_seq_len: int, val_fraction: float) -> None:
    if max_seq_len < 2:
        raise DataError(f"max_seq_len must be >= 2, got {max_seq_len}")
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")


def pack_document(buffer: list[int], ids: Sequence[int], eos_id: int, max_seq_len: int) -> Iterator[list[int]]:
    """Append one document's ids and an EOS to ``buffer`` and yield every full
    ``max_seq_len`` sequence cut from its front (the rest stays buffered)."""
    buffer.extend(ids)
    buffer.append(eos_id)
    while len(buffer) >= max_seq_len:
        yield buffer[:max_seq_len]
        del buffer[:max_seq_len]


def convert_to_mds(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    tokenizer: Tokenizer,
    max_seq_len: int,
    *,
    val_fraction: float = 0.05,
    text_field: str = "text",
    compression: str | None = "zstd",
    seed: int = 17,
    batch_docs: int = 64,
    progress: bool = True,
) -> ConvertStats:
    """Tokenize documents, append EOS, pack into ``max_seq_len`` sequences and
    write OUT_DIR/train and OUT_DIR/val as MDS. The last partial sequence of a
    split is dropped. Writes into OUT_DIR/.tmp-* and renames at the end, so an
    interrupted conversion leaves no half-written dataset."""
    from tqdm import tqdm

    _check_convert_args(max_seq_len, val_fraction)
    stats = ConvertStats()
    buffers = {"train": [], "val": []}
    with _SplitWriter(out_dir, {"tokens": "ndarray:int32"}, compression) as out:
        docs = iter_documents(inputs, text_field)
        # a context manager: on an error the bar ends its line before the message is printed
        with tqdm(desc="tokenizing", unit="doc", disable=not progress) as bar:
            while True:
                chunk = [d for _, d in zip(range(batch_docs), docs)]
                if not chunk:
                    break
                for text, ids in zip(chunk, tokenizer.encode_batch(chunk)):
                    split = _split_of(text, val_fraction, seed)
                    stats.documents[split] += 1
                    stats.tokens[split] += len(ids) + 1
                    for seq in pack_document(buffers[split], ids, tokenizer.eos_id, max_seq_len):
                        out.write(split, {"tokens": np.asarray(seq, dtype=np.int32)})
                        stats.samples[split] += 1
                bar.update(len(chunk))
    out.commit(tokenizer, max_seq_len, stats,
               f"the corpus gave {stats.tokens['train']} training tokens, less than one sequence of {max_seq_len}; "
               "add text or lower max_seq_len", format="pretrain")
    return stats


def write_token_sequences(sequences: Iterable[Sequence[int]], out_dir: str | Path, tokenizer: Tokenizer, max_seq_len: int,
                          *, compression: str | None = "zstd") -> ConvertStats:
    """Write sequences that are already packed (exactly ``max_seq_len`` token
    ids each, documents separated by EOS; e.g. synthetic exercises that must
    not be cut) as the train split of an MDS dataset readable like
    ``convert_to_mds``'s, so it can be mixed with other streams by proportion."""
    _check_convert_args(max_seq_len, 0.0)
    stats = ConvertStats()
    with _SplitWriter(out_dir, {"tokens": "ndarray:int32"}, compression) as out:
        for i, seq in enumerate(sequences):
            arr = np.asarray(seq, dtype=np.int32)
            if arr.shape != (max_seq_len,):
                raise DataError(f"sequence {i} has shape {tuple(arr.shape)}; every sequence must have exactly "
                                f"max_seq_len={max_seq_len} tokens")
            if arr.min() < 0 or arr.max() >= tokenizer.vocab_size:
                raise DataError(f"sequence {i} has token ids outside [0, {tokenizer.vocab_size}) (the tokenizer's vocabulary)")
            out.write("train", {"tokens": arr})
            stats.samples["train"] += 1
            stats.tokens["train"] += max_seq_len
            stats.documents["train"] += int((arr == tokenizer.eos_id).sum())
    out.commit(tokenizer, max_seq_len, stats, "no sequences given", format="pretrain")
    return stats


# -- instruction fine-tuning data ----------------------------------------------------


def iter_examples(inputs: Sequence[str | Path], prompt_field: str = "prompt", response_field: str = "response") -> Iterator[tuple[str, str]]:
    """(prompt, response) pairs from JSONL files, one example per line."""
    for path in expand_inputs(inputs):
        if path.suffix.lower() not in (".jsonl", ".json"):
            raise DataError(f"{path}: fine-tuning data must be JSONL with {prompt_field!r} and {response_field!r} fields")
        yield from _jsonl_records(path, (prompt_field, response_field), "--prompt-field / --response-field")


def convert_finetune_to_mds(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    tokenizer: Tokenizer,
    max_seq_len: int,
    *,
    prompt_field: str = "prompt",
    response_field: str = "response",
    val_fraction: float = 0.05,
    compression: str | None = "zstd",
    seed: int = 17,
    progress: bool = True,
) -> ConvertStats:
    """Prompt/response JSONL -> MDS for instruction fine-tuning.

    Each example is ``prompt + response + EOS``; column ``loss_mask`` (uint8)
    is 1 on the response and its EOS, 0 on the prompt, so the loss is computed
    on response tokens only. Whole examples are packed greedily into
    ``max_seq_len`` sequences (an example never straddles two sequences, so it
    always sees its prompt); the rest of a sequence is EOS padding with mask 0.
    Examples longer than ``max_seq_len`` are skipped and counted
    (``stats.skipped``)."""
    from tqdm import tqdm

    _check_convert_args(max_seq_len, val_fraction)
    stats = ConvertStats()
    buffers: dict[str, tuple[list, list]] = {"train": ([], []), "val": ([], [])}

    def flush(out, split):
        toks, mask = buffers[split]
        if not toks:
            return
        pad = max_seq_len - len(toks)
        out.write(split, {"tokens": np.asarray(toks + [tokenizer.eos_id] * pad, dtype=np.int32),
                          "loss_mask": np.asarray(mask + [0] * pad, dtype=np.uint8)})
        stats.samples[split] += 1
        toks.clear()
        mask.clear()

    with _SplitWriter(out_dir, {"tokens": "ndarray:int32", "loss_mask": "ndarray:uint8"}, compression) as out:
        bar = tqdm(iter_examples(inputs, prompt_field, response_field), desc="tokenizing", unit="example", disable=not progress)
        for prompt, response in _closing(bar):
            p_ids, r_ids = tokenizer.encode_batch([prompt, response])
            ids = p_ids + r_ids + [tokenizer.eos_id]
            if len(ids) > max_seq_len:
                stats.skipped += 1
                continue
            split = _split_of(prompt + "\x00" + response, val_fraction, seed)
            if len(buffers[split][0]) + len(ids) > max_seq_len:
                flush(out, split)
            buffers[split][0].extend(ids)
            buffers[split][1].extend([0] * len(p_ids) + [1] * (len(r_ids) + 1))
            stats.documents[split] += 1
            stats.tokens[split] += len(ids)
        for split in buffers:
            flush(out, split)
    out.commit(tokenizer, max_seq_len, stats,
               f"no training examples fit in max_seq_len={max_seq_len} ({stats.skipped} longer examples skipped); "
               "raise max_seq_len or check the input", format="finetune", skipped_too_long=stats.skipped)
    return stats


def convert_longqa_to_mds(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    tokenizer: Tokenizer,
    max_seq_len: int,
    *,
    samples: int = 1000,
    tasks: Sequence[str] | None = None,
    text_field: str = "text",
    val_fraction: float = 0.05,
    compression: str | None = "zstd",
    seed: int = 17,
) -> ConvertStats:
    """Synthetic long-context QA (the paper's stage 3) -> MDS with the loss
    on the answers only: ``samples`` sequences of ``max_seq_len`` tokens, each
    a haystack from ``inputs`` with one RULER-style task's facts hidden in it
    (retrieval: niah_*; multi-hop: variable_tracking; aggregation:
    word_frequency; see :mod:`mixattn.retrieval`), the question, then the
    answer and EOS. Column ``loss_mask`` is 1 on the answer and its EOS only
    (the fine-tuning format, so the Trainer reads it as such). Sample seeds
    never overlap with `mixattn eval retrieval`'s."""
    from mixattn.retrieval import TASKS, qa_examples

    _check_convert_args(max_seq_len, val_fraction)
    tasks = list(tasks or TASKS.names())
    for t in tasks:
        if t not in TASKS:
            raise DataError(f"unknown task {t!r} for --format longqa; valid: {', '.join(TASKS.names())}")
    if samples < 1:
        raise DataError(f"samples must be >= 1, got {samples}")
    haystack = "\n\n".join(iter_documents(inputs, text_field))
    hay_ids = tokenizer.encode_batch([haystack])[0]
    if len(hay_ids) < max_seq_len:
        raise DataError(f"the haystack text has {len(hay_ids)} tokens; --format longqa at max_seq_len={max_seq_len} "
                        f"needs at least {max_seq_len}: give more text")
    stats = ConvertStats()
    with _SplitWriter(out_dir, {"tokens": "ndarray:int32", "loss_mask": "ndarray:uint8"}, compression) as out:
        for i, (prompt, answer) in enumerate(qa_examples(tokenizer, hay_ids, max_seq_len, samples, tasks, seed)):
            split = _split_of(f"longqa:{i}", val_fraction, seed)
            out.write(split, {"tokens": np.asarray(prompt + answer, dtype=np.int32),
                              "loss_mask": np.asarray([0] * len(prompt) + [1] * len(answer), dtype=np.uint8)})
            stats.samples[split] += 1
            stats.documents[split] += 1
            stats.tokens[split] += max_seq_len
    out.commit(tokenizer, max_seq_len, stats, "no training samples (raise --samples or lower --val-fraction)",
               format="finetune", source="longqa", tasks=tasks)
    return stats


# -- reading MDS for training ----------------------------------------------------------


def doc_ids_from_eos(tokens, eos_id: int):
    """[B, T] document ids: a new document starts after every EOS."""
    import torch

    prev_eos = torch.zeros_like(tokens, dtype=torch.long)
    prev_eos[:, 1:] = (tokens[:, :-1] == eos_id).long()
    return prev_eos.cumsum(dim=1)


def collate(samples: list[dict], eos_id: int | None) -> dict:
    import torch

    tokens = torch.from_numpy(np.stack([np.asarray(s["tokens"], dtype=np.int64) for s in samples]))
    labels = tokens.clone()
    if "loss_mask" in samples[0]:  # fine-tuning data: loss on response tokens only
        mask = torch.from_numpy(np.stack([np.asarray(s["loss_mask"], dtype=np.bool_) for s in samples]))
        labels[~mask] = -100
    batch = {"input_ids": tokens, "labels": labels}
    if eos_id is not None:
        from mixattn.attention import document_starts

        batch["doc_ids"] = doc_ids_from_eos(tokens, eos_id)
        batch["doc_starts"] = document_starts(batch["doc_ids"])  # here on the host: varlen kernels wait on nothing
    return batch


def check_mds_dir(path: str | Path) -> None:
    """Clear errors for a missing or empty local MDS directory."""
    p = Path(path)
    if not p.is_dir():
        raise DataError(f"dataset directory {str(p)!r} does not exist")
    if not (p / "index.json").is_file():
        raise DataError(f"{str(p)!r} has no index.json: not an MDS dataset (write one with `mixattn data`)")


def verify_mds_dir(path: str | Path, hash_algo: str | None = "xxh64", decompress: bool = False) -> int:
    """Check every shard of a local MDS directory against index.json: present,
    the recorded size, and (if ``hash_algo``) the recorded hash. streaming
    validates hashes only when it downloads from a remote; local shards are
    checked here. Raises DataError naming the shard; returns shard files checked.

    With ``decompress``, a compressed shard whose raw file is absent is
    decompressed now, into a private temporary file renamed into place, and
    checked: streaming would decompress it in place on first use under one
    fixed temporary name, and two runs reading one local dataset at once (a
    sweep on one machine) raced on that rename ("No such file ...
    shard.00000.mds.tmp"). The compressed file is kept (streaming keeps it too
    when a stream has no remote)."""
    from streaming.base.compression import decompress as decompress_bytes
    from streaming.base.hashing import get_hash

    p = Path(path)
    check_mds_dir(p)
    try:
        index = json.loads((p / "index.json").read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{p / 'index.json'} is corrupt ({e.msg})") from None
    checked = 0
    for shard in index.get("shards", []):
        # a compressed shard may also be present raw (streaming decompressed it on first use), or
        # raw only (streaming deletes the zip after decompressing when the stream has a remote):
        # every form present is checked, and at least one form must be present
        forms = [shard[k] for k in ("zip_data", "raw_data") if shard.get(k)]
        present = [info for info in forms if (p / info["basename"]).is_file()]
        if forms and not present:
            raise DataError(f"shard {p / forms[0]['basename']} listed in index.json is missing")
        raw = shard.get("raw_data")
        for info in present:
            data = _checked_bytes(p, info, hash_algo, get_hash)
            checked += 1
            if decompress and info is shard.get("zip_data") and raw and raw not in present:
                tmp = p / f".{raw['basename']}.{os.getpid()}.{threading.get_ident()}.tmp"
                zipped = data if data is not None else (p / info["basename"]).read_bytes()
                tmp.write_bytes(decompress_bytes(shard["compression"], zipped))
                os.replace(tmp, p / raw["basename"])  # atomic: a concurrent reader sees all of it or none
                _checked_bytes(p, raw, hash_algo, get_hash)
                checked += 1
    return checked


def _checked_bytes(folder: Path, info: dict, hash_algo: str | None, get_hash) -> bytes | None:
    """Check one shard file's size and (if hashing) hash against index.json's
    ``info``; returns its bytes when they were read for the hash, else None
    (without a hash only the size is checked, and nothing is read)."""
    f = folder / info["basename"]
    size = f.stat().st_size
    if size != info["bytes"]:
        raise DataError(f"shard {f} is truncated or altered: {size} bytes, index.json says {info['bytes']}")
    expected = info.get("hashes", {}).get(hash_algo) if hash_algo else None
    if expected is None:
        return None
    data = f.read_bytes()
    if get_hash(hash_algo, data) != expected:
        raise DataError(f"shard {f} is corrupt: its {hash_algo} hash does not match index.json")
    return data


def read_data_meta(path: str | Path) -> dict | None:
    """The metadata `mixattn data` writes beside the splits, if present."""
    for candidate in (Path(path) / "mixattn_data.json", Path(path).parent / "mixattn_data.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    return None
