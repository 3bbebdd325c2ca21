"""The training and evaluation loaders: StreamingDataset over the recipe's
MDS streams (local shards checked first), mixattn's collate (document ids and
starts made here, on the host, in the loader's workers), and how many workers."""

from __future__ import annotations

import os
from functools import partial

from streaming import Stream, StreamingDataLoader

from mixattn.data import DataError, collate, read_data_meta, verify_mds_dir
from mixattn.streams import CheckedStreamingDataset
from mixattn.training.recipe import StreamConfig, TrainConfig


def loader_workers(setting, device: str, cpus: int, local_world: int) -> int:
    """What ``data.num_workers`` means here: an integer as given; ``auto`` is 0
    on the CPU and, on a GPU, this process's share of the node's ``cpus``
    less one for the training loop itself, between 1 and 8."""
    if setting != "auto":
        return setting
    if device != "gpu":
        return 0
    return max(1, min(8, cpus // max(1, local_world) - 1))


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def streaming_loader(streams: list[StreamConfig], batch_size: int, cfg: TrainConfig, eos_id, shuffle: bool,
                      device: str = "cpu"):
    objs = []
    for s in streams:
        if s.remote is None:
            verify_mds_dir(s.local, cfg.data.validate_hash, decompress=True)
        objs.append(Stream(local=s.local, remote=s.remote, proportion=s.proportion))
    dataset = CheckedStreamingDataset(
        streams=objs, shuffle=shuffle, shuffle_seed=cfg.data.shuffle_seed, batch_size=batch_size,
        validate_hash=cfg.data.validate_hash, replication=None,
    )
    workers = loader_workers(cfg.data.num_workers, device, _usable_cpus(), int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    extra = {"prefetch_factor": cfg.data.prefetch_factor, "persistent_workers": True} if workers else {}
    return StreamingDataLoader(dataset, batch_size=batch_size, collate_fn=partial(collate, eos_id=eos_id),
                               num_workers=workers, pin_memory=device == "gpu", drop_last=True, **extra)


def resolve_eos_id(cfg: TrainConfig) -> int | None:
    if cfg.data.eos_id is not None:
        return cfg.data.eos_id
    meta = read_data_meta(cfg.data.train[0].local) if cfg.data.train else None
    if meta is None:
        return None
    if meta["vocab_size"] > cfg.model.vocab_size:
        raise DataError(
            f"the dataset's tokenizer has {meta['vocab_size']} tokens but model.vocab_size is {cfg.model.vocab_size}; "
            f"set model.vocab_size >= {meta['vocab_size']}"
        )
    return meta["eos_id"]


def tokenizer_record(cfg: TrainConfig) -> dict | None:
    """The tokenizer the training data was written with (from the first train
    stream's mixattn_data.json), so generate and eval can default to it."""
    meta = read_data_meta(cfg.data.train[0].local) if cfg.data.train and cfg.data.train[0].local else None
    return (meta or {}).get("tokenizer_record")
