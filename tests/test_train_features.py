"""Training features through the real Trainer: keep-last-K checkpoints, wandb
offline logging, several streams mixed by proportion, a remote stream,
torch.compile and activation checkpointing, train-time metrics."""

import os
import shutil

import pytest
import torch

from mixattn.data import DataError, convert_to_mds, load_tokenizer
from mixattn.demo import stdlib_corpus
from mixattn.training.loaders import streaming_loader
from mixattn.training.recipe import StreamConfig
from test_train import _cfg, _fit


@pytest.fixture(scope="module")
def second(corpus, tmp_path_factory):
    """A second dataset from other stdlib modules, same tokenizer."""
    root = tmp_path_factory.mktemp("second")
    tok = load_tokenizer(corpus / "tok" / "tokenizer.json")
    convert_to_mds(stdlib_corpus()[40:55], root / "mds", tok, 64, val_fraction=0.0, progress=False)
    return root / "mds" / "train"


def test_keep_last_k_checkpoints(corpus, tmp_path):
    _fit(_cfg(corpus, tmp_path, "max_duration=8ba", "save_interval=2ba", "save_num_checkpoints_to_keep=2"))
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["ep0-ba6-rank0.pt", "ep0-ba8-rank0.pt", "latest-rank0.pt"], files
    assert os.path.realpath(tmp_path / "ckpt" / "latest-rank0.pt").endswith("ep0-ba8-rank0.pt")


def test_wandb_logs_offline(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    _fit(_cfg(corpus, tmp_path, "max_duration=3ba", "save_folder=null", "wandb={project: mixattn-test, mode: offline}"))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "wandb").iterdir())
    assert list(runs[0].glob("run-*.wandb")), list(runs[0].iterdir())  # the run's log, ready for `wandb sync`


def _stream_of_each_sample(streams, cfg):
    loader = streaming_loader(streams, 4, cfg, eos_id=None, shuffle=True)
    return [batch["input_ids"] for batch in loader]


def test_streams_are_mixed_by_proportion(corpus, second, tmp_path):
    from streaming import StreamingDataset

    cfg = _cfg(corpus, tmp_path)
    a, b = corpus / "mds64" / "train", second
    ds_a = StreamingDataset(local=str(a), batch_size=1, shuffle=False)
    rows_a = {tuple(ds_a[i]["tokens"].tolist()) for i in range(len(ds_a))}
    batches = _stream_of_each_sample([StreamConfig(str(a), proportion=0.8), StreamConfig(str(b), proportion=0.2)], cfg)
    rows = [tuple(r.tolist()) for batch in batches for r in batch]
    share_a = sum(r in rows_a for r in rows) / len(rows)
    assert abs(share_a - 0.8) < 0.03, share_a
    flipped = _stream_of_each_sample([StreamConfig(str(a), proportion=0.2), StreamConfig(str(b), proportion=0.8)], cfg)
    rows = [tuple(r.tolist()) for batch in flipped for r in batch]
    assert abs(sum(r in rows_a for r in rows) / len(rows) - 0.2) < 0.03


def test_remote_stream_is_downloaded_and_hash_checked(corpus, tmp_path):
    remote = tmp_path / "remote"
    shutil.copytree(corpus / "mds64" / "train", remote)
    cfg = _cfg(corpus, tmp_path)
    batches = _stream_of_each_sample([StreamConfig(str(tmp_path / "cache"), remote=str(remote))], cfg)
    assert batches and list((tmp_path / "cache").glob("shard.*"))  # fetched into the local cache
    shard = sorted(remote.glob("shard.*.zstd"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"Checksum failure: .*{shard.name}"):
        _stream_of_each_sample([StreamConfig(str(tmp_path / "cache2"), remote=str(remote))], cfg)


def test_compile_and_activation_checkpointing_match_eager(corpus, tmp_path):
    plain, _, _ = _fit(_cfg(corpus, tmp_path / "a", "max_duration=3ba", "save_folder=null"))
    wrapped, _, _ = _fit(_cfg(corpus, tmp_path / "b", "max_duration=3ba", "save_folder=null", "compile=true",
                              "activation_checkpointing=true"))
    assert len(wrapped.losses) == 3
    torch.testing.assert_close(torch.tensor(wrapped.losses), torch.tensor(plain.losses), rtol=1e-4, atol=1e-4)


def test_train_metrics_on_gives_the_same_losses(corpus, tmp_path):
    off, _, _ = _fit(_cfg(corpus, tmp_path / "a", "max_duration=3ba", "save_folder=null"))
    on, _, _ = _fit(_cfg(corpus, tmp_path / "b", "max_duration=3ba", "save_folder=null", "train_metrics=true"))
    assert on.losses == off.losses


def test_auto_microbatch_through_the_trainer(corpus, tmp_path, capsys, monkeypatch):
    """device_train_microbatch_size: auto reaches Composer as the microbatch
    the memory estimate allows, is logged with its reason, recorded in the
    resolved recipe, and trains the same losses as that microbatch written
    out (gradient accumulation changes no math)."""
    from mixattn.memory import calibrated_peak, state_bytes
    from mixattn.model import MixAttentionLM
    from mixattn.training import parallelize as par
    from mixattn.training.trainer import build_trainer

    cfg = _cfg(corpus, tmp_path / "a", "max_duration=2ba", "save_folder=null", "device_train_microbatch_size=auto")
    n = sum(p.numel() for p in MixAttentionLM(cfg.model).parameters())
    two = calibrated_peak(cfg.model, cfg.model.layer_plan, 2 * 64, state_bytes(n, cfg.optimizer.name))
    monkeypatch.setattr(par, "device_free_bytes", lambda device: int(two / 0.90) + 1)
    trainer = build_trainer(cfg)
    out = capsys.readouterr().out
    assert "device_train_microbatch_size: auto -> microbatch 2 of the per-device batch 8" in out
    assert trainer.state.device_train_microbatch_size == 2 and trainer.mixattn_resolved["device_train_microbatch_size"] == 2
    trainer.close()
    auto, _, _ = _fit(cfg)
    fixed, _, _ = _fit(_cfg(corpus, tmp_path / "b", "max_duration=2ba", "save_folder=null", "device_train_microbatch_size=2"))
    assert auto.losses == fixed.losses


def test_fsdp_is_not_applied_in_one_process(corpus, tmp_path, capsys):
    """One process has nothing to shard: the recipe's fsdp section is kept for
    launches of several processes and skipped here (saying so)."""
    from torch.distributed.tensor import DTensor

    from mixattn.training.parallelize import effective_fsdp
    from mixattn.training.trainer import build_trainer

    cfg = _cfg(corpus, tmp_path, "max_duration=1ba", "save_folder=null", "fsdp={version: 2, reshard_after_forward: true}")
    assert effective_fsdp(cfg, 1) is None and effective_fsdp(cfg, 2) == cfg.fsdp
    trainer = build_trainer(cfg)
    assert "fsdp: not applied (one process" in capsys.readouterr().out
    assert trainer.mixattn_resolved["fsdp"] is False
    assert not isinstance(trainer.state.model.model.embed.weight, DTensor)
    trainer.close()


def test_fsdp2_root_stays_unsharded_between_forward_and_backward(corpus, tmp_path, monkeypatch):
    """Composer passes reshard_after_forward=True to the root too, which frees
    the embedding and output head right before backward (on GPUs the backward
    then read freed storage); the root must stay unsharded, the blocks reshard.
    (FSDP applied in one process here, as it is on every rank of a launch.)"""
    from composer.core import Callback
    from torch.distributed.tensor import DTensor

    import mixattn.training.parallelize
    from mixattn.training.trainer import build_trainer

    monkeypatch.setattr(mixattn.training.parallelize, "effective_fsdp", lambda cfg, world: cfg.fsdp)

    seen = []

    class Probe(Callback):
        def after_forward(self, state, logger):
            inner = state.model.model
            seen.append((isinstance(inner.embed.weight, DTensor), isinstance(inner.blocks[0].attn.wqkv.weight, DTensor)))

    cfg = _cfg(corpus, tmp_path, "max_duration=2ba", "save_folder=null", "fsdp={version: 2, reshard_after_forward: true}")
    trainer = build_trainer(cfg, extra_callbacks=[Probe()])
    trainer.fit()
    trainer.close()
    assert seen == [(False, True), (False, True)], seen  # root unsharded, every block resharded



def test_prepacked_sequences_are_written_whole_and_checked(corpus, tmp_path):
    from streaming import StreamingDataset

    from mixattn.data import write_token_sequences

    tok = load_tokenizer(corpus / "tok" / "tokenizer.json")
    seqs = [[(i * 7 + j) % 500 for j in range(63)] + [tok.eos_id] for i in range(10)]
    stats = write_token_sequences(seqs, tmp_path / "ex", tok, 64)
    assert stats.samples["train"] == 10 and stats.tokens["train"] == 640
    ds = StreamingDataset(local=str(tmp_path / "ex" / "train"), batch_size=1, shuffle=False)
    assert [ds[i]["tokens"].tolist() for i in range(len(ds))] == seqs  # never re-cut
    with pytest.raises(DataError, match=r"sequence 1 has shape \(63,\); .*max_seq_len=64"):
        write_token_sequences([seqs[0], seqs[1][:63]], tmp_path / "bad", tok, 64)
    with pytest.raises(DataError, match=r"sequence 0 has token ids outside \[0, 512\)"):
        write_token_sequences([[600] * 64], tmp_path / "bad", tok, 64)
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".tmp-*"))  # nothing half-written



def test_compressed_shards_are_decompressed_atomically_for_concurrent_runs(corpus, tmp_path):
    """Two runs on one local dataset: streaming decompresses in place on first
    use under one fixed temporary name, and the second run's rename failed (seen
    on the GPU machine). verify_mds_dir(decompress=True), which training calls,
    writes each raw shard under a private name, renames it, checks it against
    index.json, and keeps the compressed file."""
    import json
    from concurrent.futures import ThreadPoolExecutor

    from mixattn.data import verify_mds_dir

    data = tmp_path / "train"
    shutil.copytree(corpus / "mds64" / "train", data)
    index = json.loads((data / "index.json").read_text())
    raws = [data / s["raw_data"]["basename"] for s in index["shards"]]
    zips = [data / s["zip_data"]["basename"] for s in index["shards"]]
    for r in raws:
        r.unlink(missing_ok=True)
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda _: verify_mds_dir(data, "xxh64", decompress=True), range(4))) == [2 * len(raws)] * 4
    assert all(r.is_file() for r in raws) and all(z.is_file() for z in zips) and not list(data.glob(".*.tmp"))
    batches = _stream_of_each_sample([StreamConfig(str(data))], _cfg(corpus, tmp_path))
    assert len(batches) == sum(s["samples"] for s in index["shards"]) // 4
    assert all(z.is_file() for z in zips)  # streaming (no remote) kept them too
    for r in raws:  # without hashing (data.validate_hash: null) only sizes are checked, and it still decompresses
        r.unlink()
    assert verify_mds_dir(data, None, decompress=True) == 2 * len(raws) and all(r.is_file() for r in raws)


def test_recipe_losses_over_20_steps_match_the_eager_reference(corpus, tmp_path):
    """The tiny recipe as the Trainer runs it (document masks on, the auto
    backend: SDPA on the CPU, activation_checkpointing auto) against the eager
    reference backend, 20 steps: the same losses."""
    fast, _, _ = _fit(_cfg(corpus, tmp_path / "a", "max_duration=20ba", "save_folder=null", "model.attn_backend=auto",
                           "activation_checkpointing=auto"))
    ref, _, _ = _fit(_cfg(corpus, tmp_path / "b", "max_duration=20ba", "save_folder=null", "model.attn_backend=eager"))
    assert len(fast.losses) == len(ref.losses) == 20
    for a, b in zip(fast.losses, ref.losses):
        assert abs(a - b) < 1e-3 * max(1.0, abs(b)), (fast.losses, ref.losses)
    assert fast.losses[-1] < fast.losses[0]


def test_loader_workers_auto_is_a_share_of_the_cores_on_gpu_and_none_on_cpu():
    from mixattn.training.loaders import loader_workers

    assert loader_workers("auto", "cpu", 64, 1) == 0  # the CPU step needs the cores
    assert loader_workers("auto", "gpu", 16, 1) == 8  # at most 8, as llm-foundry's recipes
    assert loader_workers("auto", "gpu", 16, 8) == 1  # two cores per process: one for the loop, one worker
    assert loader_workers("auto", "gpu", 6, 1) == 5
    assert loader_workers("auto", "gpu", 2, 4) == 1  # never 0 on a GPU: the loop would read the data itself
    assert loader_workers(3, "gpu", 64, 1) == 3 and loader_workers(0, "gpu", 64, 1) == 0  # as given


@pytest.mark.parametrize("value", ["-1", "many", "true", "1.5"])
def test_bad_num_workers_is_named_with_its_file(corpus, tmp_path, value):
    from mixattn.config import ConfigError

    with pytest.raises(ConfigError, match=r"tiny-cpu.yaml: data.num_workers must be auto or an integer >= 0, got"):
        _cfg(corpus, tmp_path, f"data.num_workers={value}")
    with pytest.raises(ConfigError, match="data.prefetch_factor must be an integer >= 1, got 0"):
        _cfg(corpus, tmp_path, "data.prefetch_factor=0")


def test_loader_workers_give_the_same_batches_and_resume_exactly(corpus, tmp_path):
    """Two worker processes read, in order, the batches the main process reads;
    a run with workers stopped at batch 4 resumes with the batches and weights
    of the uninterrupted run."""
    main, main_w, _ = _fit(_cfg(corpus, tmp_path / "a", "max_duration=7ba", "data.num_workers=0"))
    full, full_w, _ = _fit(_cfg(corpus, tmp_path / "b", "max_duration=7ba", "data.num_workers=2"))
    assert len(full.inputs) == 7
    for a, b in zip(main.inputs, full.inputs):
        assert torch.equal(a, b)
    assert full.losses == main.losses
    _fit(_cfg(corpus, tmp_path / "c", "max_duration=7ba", "data.num_workers=2"), stop_after=4)
    resumed, resumed_w, _ = _fit(_cfg(corpus, tmp_path / "c", "max_duration=7ba", "data.num_workers=2", "autoresume=true"))
    assert len(resumed.inputs) == 3
    for a, b in zip(resumed.inputs, full.inputs[4:]):
        assert torch.equal(a, b)
    for k in full_w:
        assert torch.equal(full_w[k], resumed_w[k]), k


def _epoch_threads(dataset) -> int:
    """How many threads run one of the dataset's epoch loops (streaming's
    _prepare_thread, _ready_thread) anywhere on their stacks."""
    import sys

    def runs_one(frame):
        while frame is not None:
            if frame.f_code.co_name in ("_prepare_thread", "_ready_thread") and frame.f_locals.get("self") is dataset:
                return True
            frame = frame.f_back
        return False

    return sum(map(runs_one, sys._current_frames().values()))


def _settles_at(dataset, count: int) -> bool:
    """Whether the dataset's epoch threads number ``count`` within 10 s (threads start and stop a tick late)."""
    import time

    deadline = time.monotonic() + 10
    while _epoch_threads(dataset) != count and time.monotonic() < deadline:
        time.sleep(0.01)
    return _epoch_threads(dataset) == count


@pytest.mark.timeout(120)
def test_an_epoch_stopped_early_stops_its_threads_and_the_next_epoch_is_whole(corpus):
    """A run that ends mid-epoch (or an evaluation of a few batches) leaves
    streaming's two epoch threads polling until the process ends; the
    dataset stops them when its iteration is closed. Closing an old epoch's
    iterator after a new epoch has begun must not stop the new one's."""
    from mixattn.streams import CheckedStreamingDataset

    ds = CheckedStreamingDataset(local=str(corpus / "mds64" / "train"), shuffle=False, batch_size=1, predownload=4)
    total = len(ds)
    assert total > 40
    first = iter(ds)
    assert [next(first)["tokens"].shape for _ in range(3)]
    assert _settles_at(ds, 2)  # predownload=4: both wait ahead of the 3 samples read, polling
    first.close()
    assert _settles_at(ds, 0)

    second_epoch = iter(ds)
    head = [next(second_epoch) for _ in range(5)]
    third = iter(ds)  # a third epoch begins (streaming ends the second's threads itself) ...
    rows = [next(third)["tokens"] for _ in range(5)]
    second_epoch.close()  # ... and the second's iterator, closed late, leaves the third's threads alone
    assert _settles_at(ds, 2)
    rows += [s["tokens"] for s in third]
    assert len(head) == 5 and len(rows) == total


def test_a_closed_trainer_is_freed_with_its_model_and_its_datasets_shared_memory(corpus, tmp_path):
    """Composer's Engine registers an atexit entry holding the Trainer's state
    and removes it only in a destructor that entry keeps from running: every
    Trainer built in a process (model, optimizer, loaders, the datasets'
    shared memory) lived until the process ended, and the suite ran out of
    descriptors. build_trainer's Trainer is freed once closed and dropped."""
    import gc
    import weakref

    from mixattn.training.trainer import build_trainer
    from test_streams import _none_held

    for i in range(2):
        trainer = build_trainer(_cfg(corpus, tmp_path / str(i), "max_duration=2ba", "save_folder=null"))
        trainer.fit()
        model, loader = weakref.ref(trainer.state.model), weakref.ref(trainer.state.train_dataloader)
        loaders = [trainer.state.train_dataloader] + [e.dataloader.dataloader for e in trainer.state.evaluators]
        prefixes = [dl.dataset._shm_prefix_int for dl in loaders]
        assert len(prefixes) == 2
        del loaders
        trainer.close()
        del trainer
        gc.collect()
        assert model() is None and loader() is None
        assert _none_held(*prefixes) == []


_EXIT_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from composer.core import Callback
from mixattn.training.trainer import build_trainer
from test_train import _cfg
import pathlib

class Says(Callback):
    def __init__(self, name):
        self.name = name
    def close(self, state, logger):
        print("closed", self.name, flush=True)

corpus, tmp = pathlib.Path({corpus!r}), pathlib.Path({tmp!r})
kept = []
for name in ("a", "b"):
    trainer = build_trainer(_cfg(corpus, tmp / name, "max_duration=1ba", "save_folder=null"), extra_callbacks=[Says(name)])
    trainer.fit()
    kept.append(trainer)
kept[0].close()
print("exiting", flush=True)
"""


def test_each_trainer_is_closed_once_a_closed_one_not_again_at_exit(corpus, tmp_path):
    """The exit hook that replaces composer's closes a Trainer that nothing
    closed, and leaves one closed before alone (composer's closed it again)."""
    import subprocess
    import sys
    from pathlib import Path

    script = _EXIT_SCRIPT.format(tests=str(Path(__file__).parent), corpus=str(corpus), tmp=str(tmp_path))
    env = {**os.environ, "WANDB_MODE": "offline"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    said = [line for line in out.stdout.splitlines() if line.startswith(("closed", "exiting"))]
    assert said == ["closed a", "exiting", "closed b"], out.stdout[-3000:]
