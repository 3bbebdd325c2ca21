"""Loading a trained model from a Composer checkpoint, without unpickling
code: ``torch.load(weights_only=True)`` with an allowlist of the plain data
types Composer stores besides tensors (its RNG states are numpy arrays, its
timestamps timedeltas). The model config comes from the checkpoint itself
(``mixattn_model_config``, written by every training run)."""

from __future__ import annotations

import datetime
import logging
import os
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch

from mixattn.model import MixAttentionLM, ModelConfig


def _safe_globals() -> list:
    core = getattr(np, "_core", None) or np.core
    dtypes = {type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64, np.float32, np.int32, np.uint8, np.bool_)}
    return [datetime.timedelta, core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype, *dtypes,
            torch.torch_version.TorchVersion]


class CheckpointError(ValueError):
    pass


log = logging.getLogger(__name__)

# composer's default file names: ep{epoch}-ba{batch}-rank{rank}.pt (one file),
# ep{epoch}-ba{batch}/ (a sharded FSDP checkpoint), latest-rank{rank}.pt (a symlink)
_CHECKPOINT = re.compile(r"^ep(\d+)-ba(\d+)(-rank0\.pt)?$")
LATEST = "latest-rank0.pt"


_PARTIAL = ".mixattn-partial-"  # + pid: where a checkpoint file is written before it takes its name


def install_atomic_checkpoint_writes() -> None:
    """Make composer write every checkpoint file under a temporary path and
    rename it into place (``os.replace``, after an fsync), so a write cut
    short by a crash or a full disk never exists under a checkpoint's name,
    let alone becomes ``latest``. Composer 0.32 writes in place; this wraps
    its ``_write_checkpoint_file`` (re-applied by every ``build_trainer``, so
    it also wraps a replacement installed later, as the disk-full test does).
    The temporary file keeps the final name inside ``.mixattn-partial-PID/``
    next to it: composer picks the format from the name's extension."""
    from composer.utils import checkpoint as composer_checkpoint

    current = composer_checkpoint._write_checkpoint_file
    if getattr(current, "_mixattn_atomic", False):
        return

    def write(state_dict, filename):
        final = Path(filename)
        partial = final.parent / f"{_PARTIAL}{os.getpid()}"
        partial.mkdir(exist_ok=True)
        tmp = partial / final.name
        try:
            current(state_dict, str(tmp))
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
            try:
                partial.rmdir()
            except OSError:
                pass

    write._mixattn_atomic = True
    composer_checkpoint._write_checkpoint_file = write


def verify_checkpoint(path: str | Path) -> None:
    """Raise CheckpointError naming ``path`` unless it is a complete checkpoint:
    a file must be a whole zip (torch.save's format) whose every record
    matches its CRC-32, so a write cut short (crash, full disk) or a flipped
    byte is caught; a sharded checkpoint directory must hold the ``.metadata``
    that torch.distributed.checkpoint writes last."""
    p = Path(path)
    if p.is_dir():
        if not (p / ".metadata").is_file():
            raise CheckpointError(f"sharded checkpoint {str(p)!r} has no .metadata: its write did not finish")
        return
    if not p.is_file():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist")
    try:
        with zipfile.ZipFile(p) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"checkpoint {str(p)!r} is truncated or not a checkpoint ({e})") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {str(p)!r} is corrupt: record {bad!r} fails its CRC check")


def recover_latest(folder: str | Path) -> dict:
    """Make ``latest-rank0.pt`` in a local save folder point at the newest
    *complete* checkpoint, before autoresume reads it. Writes are atomic
    (:func:`install_atomic_checkpoint_writes`; unfinished ones in
    ``.mixattn-partial-*`` are removed here), but a folder can still hold a
    complete file the symlink was not yet moved to, a torn file from a run
    without atomic writes (older mixattn, plain composer), or (bit rot, a copy
    cut short) a damaged file the symlink does point at. Damaged checkpoints
    are renamed ``*.corrupt`` (kept, not deleted) and named in a warning. Returns {"latest": name or None,
    "quarantined": [names]}."""
    root = Path(folder)
    if not root.is_dir():
        return {"latest": None, "quarantined": []}
    for partial in root.glob(f"{_PARTIAL}*"):  # a writer killed mid-write (SIGKILL): never a checkpoint
        shutil.rmtree(partial, ignore_errors=True)
        log.warning("removed %s: a checkpoint write that did not finish", partial.name)
    found = sorted(((int(m.group(2)), p) for p in root.iterdir() if (m := _CHECKPOINT.match(p.name))),
                   key=lambda x: x[0], reverse=True)
    quarantined, good = [], None
    for _, p in found:
        try:
            verify_checkpoint(p)
        except CheckpointError as e:
            p.rename(p.with_name(p.name + ".corrupt"))
            quarantined.append(p.name)
            log.warning("%s; renamed to %s.corrupt, autoresume uses an earlier checkpoint", e, p.name)
            continue
        good = p
        break
    link = root / LATEST
    if good is not None:
        target = os.readlink(link) if link.is_symlink() else None
        if target != good.name:
            tmp = root / f".{LATEST}.{os.getpid()}"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(good.name)
            tmp.replace(link)  # atomic
            log.warning("autoresume: %s now points at %s (was %s)", LATEST, good.name, target)
    elif link.is_symlink() or link.exists():
        link.unlink()  # nothing complete left to resume from: start over rather than fail on a torn file
    return {"latest": good.name if good else None, "quarantined": quarantined}


def run_name(path: str | Path) -> str:
    """What to call the model of a checkpoint path: its run folder's name
    (runs/NAME/checkpoints/latest-rank0.pt, runs/NAME/ckpt, runs/NAME -> NAME),
    through links such as the demo's runs/demo/latest to the run they name."""
    p = Path(path)
    p = p.resolve() if p.exists() else p
    run = p.parent if p.suffix == ".pt" or p.is_file() else p
    if run.name in ("checkpoints", "ckpt") and run.parent.name:
        run = run.parent
    return run.name or p.name


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a save folder of them (``mixattn train``'s
    ``save_folder``): its ``latest-rank0.pt``, else its newest complete
    ``ep*-ba*-rank0.pt``. A folder with none of these, and no sharded
    checkpoint's ``.metadata``, is named with what it holds."""
    p = Path(path)
    if not p.is_dir() or (p / ".metadata").is_file():
        return p
    if (p / LATEST).exists():
        return p / LATEST
    found = sorted((int(m.group(2)), q) for q in p.iterdir() if (m := _CHECKPOINT.match(q.name)) and q.is_file())
    if found:
        return found[-1][1]
    if (p / "checkpoints").is_dir():  # a run folder (runs/NAME) whose save_folder is runs/NAME/checkpoints
        return resolve_checkpoint(p / "checkpoints")
    names = sorted(q.name for q in p.iterdir())
    held = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "") if names else "nothing"
    raise CheckpointError(f"{str(p)!r} is a folder with no checkpoint: no {LATEST}, no ep*-ba*-rank0.pt, no .metadata "
                          f"of a sharded checkpoint (it holds {held}); give a checkpoint file or a save_folder")


def load_checkpoint(path: str | Path) -> dict:
    """The checkpoint's dict, loaded weights-only. Clear errors for a missing,
    truncated or foreign file."""
    p = Path(path)
    verify_checkpoint(p)
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickled code, not a torch file
        raise CheckpointError(f"cannot load checkpoint {str(p)!r} (weights only): {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               **overrides) -> MixAttentionLM:
    """A MixAttentionLM with the checkpoint's config (``overrides`` may set
    fields such as attn_backend) and weights, in eval mode. ``path`` may be a
    save folder (:func:`resolve_checkpoint`). The tokenizer the training data
    was written with, where the checkpoint records it, is
    ``model.trained_tokenizer`` ({"path", "sha256"}, else None)."""
    path = resolve_checkpoint(path)
    state = load_checkpoint(path)
    try:
        model_state = state["state"]["model"]
        cfg_dict = model_state["_extra_state"]["mixattn_model_config"]
    except (KeyError, TypeError):
        raise CheckpointError(f"{path}: not a mixattn training checkpoint (no state.model._extra_state.mixattn_model_config)") from None
    cfg = ModelConfig.from_dict({**cfg_dict, **overrides})
    model = MixAttentionLM(cfg)
    weights = {k.removeprefix("model."): v for k, v in model_state.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the recorded config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    model = model.to(device=device, dtype=dtype).eval()
    model.trained_tokenizer = model_state["_extra_state"].get("mixattn_tokenizer")
    return model
