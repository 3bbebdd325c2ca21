"""The save folder, before any training: refused early when it cannot take a
checkpoint, cleaned of a stale autoresume download, and pointed at its newest
complete checkpoint."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from mixattn.checkpoint import recover_latest
from mixattn.config import ConfigError
from mixattn.plan import format_bytes
from mixattn.training.recipe import TrainConfig, save_folder_path


def prepare_save_folder(cfg: TrainConfig, model: torch.nn.Module) -> None:
    """Everything done to ``cfg.save_folder`` before the Trainer sees it."""
    if not cfg.save_folder:
        return
    check_save_folder(cfg, checkpoint_bytes_estimate(model, cfg.optimizer.name))
    drop_stale_autoresume_download(cfg)
    recover_autoresume_checkpoint(cfg)


def checkpoint_bytes_estimate(model: torch.nn.Module, optimizer: str) -> int:
    """About the size of one full checkpoint: fp32 weights plus the
    optimizer's fp32 state (AdamW: two moments, Lion: one) and ~1% for the rest."""
    n = sum(p.numel() for p in model.parameters())
    return int(n * 4 * (3 if optimizer in ("decoupled_adamw", "adamw") else 2) * 1.01)


def check_save_folder(cfg: TrainConfig, needed: int) -> None:
    """A save folder that cannot take the first checkpoint fails now, before
    any training: not writable, or less free space than one checkpoint."""
    folder = save_folder_path(cfg)
    if "://" in folder:
        return  # remote URIs are checked by composer's object store at the first upload
    p = Path(folder)
    used = sorted(x.name for x in p.glob("ep*-ba*")) if p.is_dir() else []
    if used and not cfg.autoresume:
        raise ConfigError(f"save_folder {folder!r} already holds checkpoints of a run ({', '.join(used[:3])}"
                          f"{', ...' if len(used) > 3 else ''}); set autoresume=true to continue that run, or choose "
                          "another save_folder (or remove the old checkpoints)")
    # the folder itself is made when the first checkpoint is written: a run that fails before leaves nothing behind
    existing = next(a for a in (p, *p.absolute().parents) if a.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is not a directory")
        probe = existing / f".mixattn-write-probe-{os.getpid()}"  # per process: every rank checks the same folder
        probe.write_bytes(b"0")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"save_folder {folder!r} is not writable: {e}") from None
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise ConfigError(f"save_folder {folder!r} has {format_bytes(free)} free but one checkpoint of this model "
                          f"takes about {format_bytes(needed)} (weights + optimizer state); free space or choose "
                          "another save_folder")


def drop_stale_autoresume_download(cfg: TrainConfig) -> None:
    """With a remote ``save_folder`` (s3://bucket/run), composer's autoresume
    downloads the bucket's latest checkpoint to the same string read as a local
    path (./s3:/bucket/run/latest-rank0.pt) and, on the next launch, prefers
    that local file if it exists: a relaunch from the same directory would
    resume from the checkpoint downloaded last time, not the bucket's newest.
    The bucket is the record; the download is a cache, removed here (on each
    node's local rank 0, before the Trainer looks)."""
    if not cfg.autoresume or "://" not in (cfg.save_folder or "") or os.environ.get("LOCAL_RANK", "0") != "0":
        return
    local = Path(os.path.abspath(save_folder_path(cfg)))
    for stale in local.glob("latest-rank*.pt"):
        stale.unlink()


def recover_autoresume_checkpoint(cfg: TrainConfig) -> None:
    """Before autoresume reads ``latest-rank0.pt``: point it at the newest
    complete checkpoint and set torn or corrupt ones aside
    (``checkpoint.recover_latest``). Done by global rank 0 only; the other
    ranks reach composer's autoresume after the process-group rendezvous,
    which rank 0 joins only after this."""
    folder = save_folder_path(cfg)
    if not cfg.autoresume or "://" in folder or os.environ.get("RANK", "0") != "0":
        return
    recover_latest(folder)
