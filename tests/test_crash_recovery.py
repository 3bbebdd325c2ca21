"""Crashes that must lose nothing (issue #7): a training process SIGKILLed at a
random point (one process and two), a checkpoint write torn midway, a full
disk during a save. Each time, the same command relaunched finishes with
final weights bit-equal to an uninterrupted run's (CPU)."""

import errno
import io
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mixattn.checkpoint import LATEST, CheckpointError, load_checkpoint, recover_latest, verify_checkpoint
from mixattn.cli import main
from mixattn.config import ConfigError
from test_train import _cfg, _fit

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "yamls" / "pretrain" / "tiny-cpu.yaml")
BATCHES = 12


def _weights(ckpt: Path) -> dict:
    model = load_checkpoint(ckpt)["state"]["model"]
    return {k: v for k, v in model.items() if isinstance(v, torch.Tensor)}


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


# -- SIGKILL, then the same command again --------------------------------------------------


def _args(corpus, save: Path, batches: int = BATCHES) -> list[str]:
    return [
        RECIPE, f"data.train=[{{local: {corpus / 'mds64' / 'train'}}}]", "data.eval=[]", "model.vocab_size=512",
        "model.d_model=64", "model.n_layers=4", "model.n_heads=4", "model.max_seq_len=64", "model.window=16",
        "model.plan=ma", "model.attn_backend=sdpa", "global_train_batch_size=8", f"max_duration={batches}ba",
        "progress_bar=false", "console_log_interval=1ba", f"save_folder={save}", "save_interval=1ba",
        "autoresume=true", "scheduler.t_warmup=2ba",
    ]


def _launch(corpus, save: Path, nproc: int, log: Path) -> subprocess.Popen:
    if nproc == 1:
        cmd = [sys.executable, "scripts/train.py", *_args(corpus, save)]
    else:
        from test_distributed import _free_port

        cmd = [str(Path(sys.executable).parent / "composer"), "-n", str(nproc), "--master_port", str(_free_port()),
               "scripts/train.py", *_args(corpus, save)]
    # its own process group: SIGKILL to the group is a lost node (launcher and workers at once)
    return subprocess.Popen(cmd, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def _rendezvous_failed(log: Path) -> bool:
    from test_distributed import startup_network_failure

    return startup_network_failure(log.read_text())


def _run_to_end(corpus, save: Path, nproc: int, log: Path) -> int:
    """Launch and wait; a launch whose rendezvous failed is launched again (twice at most)."""
    for _ in range(3):
        code = _launch(corpus, save, nproc, log).wait(timeout=600)
        if code == 0 or nproc == 1 or not _rendezvous_failed(log):
            return code
    return code


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """reference(nproc): the final checkpoint of an uninterrupted run with that
    many processes (DDP's gradient all-reduce sums in another order than one
    process does, so each process count has its own reference)."""
    done = {}

    def get(nproc):
        if nproc not in done:
            save = tmp_path_factory.mktemp(f"reference{nproc}") / "ckpt"
            log = save.parent / "log.txt"
            assert _run_to_end(corpus, save, nproc, log) == 0, log.read_text()[-3000:]
            done[nproc] = save / f"ep0-ba{BATCHES}-rank0.pt"
        return done[nproc]

    return get


@pytest.mark.parametrize("nproc,seed", [(1, 0), (2, 3)])
def test_sigkill_at_a_random_point_then_relaunch_is_bit_exact(corpus, reference, tmp_path, nproc, seed):
    rng = random.Random(seed)
    after, delay = rng.randint(2, BATCHES - 4), rng.uniform(0.0, 0.05)
    save = tmp_path / "ckpt"
    shm_before = set(os.listdir("/dev/shm"))
    try:
        _kill_and_relaunch(corpus, reference, tmp_path, nproc, after, delay, save)
    finally:
        # a SIGKILLed process leaves streaming's shared-memory segments behind; the relaunch
        # copes, but later datasets in this pytest process collided with them (FileExistsError)
        for name in set(os.listdir("/dev/shm")) - shm_before:
            Path("/dev/shm", name).unlink(missing_ok=True)


def _kill_and_relaunch(corpus, reference, tmp_path, nproc, after, delay, save):
    killed_log = tmp_path / "killed.txt"
    proc, launches = _launch(corpus, save, nproc, killed_log), 1
    # kill once checkpoint `after` has begun to appear, plus a random delay: inside that
    # checkpoint's write, or somewhere in the next batch or two
    deadline = time.time() + 300
    while not (save / f"ep0-ba{after}-rank0.pt").exists():
        if proc.poll() is not None and nproc > 1 and launches < 3 and _rendezvous_failed(killed_log):
            proc, launches = _launch(corpus, save, nproc, killed_log), launches + 1
        assert proc.poll() is None and time.time() < deadline, killed_log.read_text()[-3000:]
        time.sleep(0.002)
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (save / f"ep0-ba{BATCHES}-rank0.pt").exists()  # it really died before the end
    log = tmp_path / "relaunched.txt"
    assert _run_to_end(corpus, save, nproc, log) == 0, log.read_text()[-3000:]
    first = int(re.search(r"\[batch=(\d+)/", log.read_text()).group(1))
    assert first > after  # resumed from a checkpoint, not from scratch
    _assert_same_weights(save / f"ep0-ba{BATCHES}-rank0.pt", reference(nproc))


# -- torn and stale checkpoints: autoresume takes the newest complete one ----------------------


def _tiny(corpus, tmp_path, *extra):
    return _cfg(corpus, tmp_path, "max_duration=6ba", "save_interval=1ba", *extra)


@pytest.fixture
def six_batches(corpus, tmp_path):
    rec, weights, _ = _fit(_tiny(corpus, tmp_path / "ref"))
    return rec, weights


def test_a_torn_latest_checkpoint_is_set_aside_and_autoresume_falls_back(corpus, tmp_path, six_batches):
    ref, ref_w = six_batches
    _fit(_tiny(corpus, tmp_path), stop_after=4)
    ckpt = tmp_path / "ckpt"
    torn = ckpt / "ep0-ba4-rank0.pt"
    assert os.readlink(ckpt / LATEST) == torn.name
    data = torn.read_bytes()
    torn.write_bytes(data[: len(data) // 2])  # the write that a crash cut short
    with pytest.raises(CheckpointError, match="ep0-ba4-rank0.pt' is truncated"):
        verify_checkpoint(torn)
    rec, weights, _ = _fit(_tiny(corpus, tmp_path, "autoresume=true"))
    assert rec.losses == ref.losses[3:]  # resumed at batch 3, the newest complete checkpoint
    assert (ckpt / "ep0-ba4-rank0.pt.corrupt").read_bytes() == data[: len(data) // 2]  # kept, not deleted
    for k in ref_w:
        assert torch.equal(weights[k], ref_w[k]), k


def test_latest_moves_to_a_complete_newer_checkpoint_and_a_torn_newer_one_is_set_aside(corpus, tmp_path, six_batches):
    ref, ref_w = six_batches
    _fit(_tiny(corpus, tmp_path), stop_after=4)
    ckpt = tmp_path / "ckpt"
    # killed after writing batch 4's file but before moving the symlink, and again while writing batch 5
    (ckpt / LATEST).unlink()
    (ckpt / LATEST).symlink_to("ep0-ba3-rank0.pt")
    (ckpt / "ep0-ba5-rank0.pt").write_bytes((ckpt / "ep0-ba4-rank0.pt").read_bytes()[:3000])
    assert recover_latest(ckpt) == {"latest": "ep0-ba4-rank0.pt", "quarantined": ["ep0-ba5-rank0.pt"]}
    (ckpt / LATEST).unlink()
    (ckpt / LATEST).symlink_to("ep0-ba3-rank0.pt")
    (ckpt / "ep0-ba5-rank0.pt.corrupt").rename(ckpt / "ep0-ba5-rank0.pt")
    rec, weights, _ = _fit(_tiny(corpus, tmp_path, "autoresume=true"))
    assert rec.losses == ref.losses[4:]  # from batch 4, and batch 5's save was not blocked by the torn file
    assert (ckpt / "ep0-ba5-rank0.pt.corrupt").exists() and os.readlink(ckpt / LATEST) == "ep0-ba6-rank0.pt"
    for k in ref_w:
        assert torch.equal(weights[k], ref_w[k]), k


def test_an_explicit_load_path_that_is_torn_is_named(corpus, tmp_path):
    cut = tmp_path / "cut.pt"
    cut.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(CheckpointError, match="cut.pt' is truncated or not a checkpoint"):
        _fit(_cfg(corpus, tmp_path, "max_duration=2ba", f"load_path={cut}"))
    with pytest.raises(CheckpointError, match="nope.pt' does not exist"):
        _fit(_cfg(corpus, tmp_path, "max_duration=2ba", f"load_path={tmp_path / 'nope.pt'}"))


# -- a full disk ------------------------------------------------------------------------------


def _cli_args(corpus, tmp_path):
    return ["train", *_args(corpus, tmp_path / "ckpt", batches=6)]


def test_disk_full_during_a_save_stops_clearly_and_the_relaunch_finishes_bit_exact(corpus, tmp_path, monkeypatch, capsys):
    import composer.utils.checkpoint as composer_checkpoint

    assert main(_cli_args(corpus, tmp_path / "ref")) == 0
    real = composer_checkpoint._write_checkpoint_file

    def disk_fills_at_batch_3(state_dict, filename):
        if os.path.basename(filename).startswith("ep0-ba3-"):
            buf = io.BytesIO()
            torch.save(state_dict, buf)
            with open(filename, "wb") as f:  # what fitted before the disk was full
                f.write(buf.getvalue()[: buf.tell() // 3])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        real(state_dict, filename)

    monkeypatch.setattr(composer_checkpoint, "_write_checkpoint_file", disk_fills_at_batch_3)
    capsys.readouterr()
    assert main(_cli_args(corpus, tmp_path)) == 2
    err = capsys.readouterr().err
    assert "training stopped: [Errno 28] No space left on device" in err, err[-2000:]
    assert "last complete checkpoint is 'ep0-ba2-rank0.pt'" in err and "relaunch the same command" in err, err[-2000:]
    assert not (tmp_path / "ckpt" / "ep0-ba3-rank0.pt").exists()  # the torn write never took the checkpoint's name
    assert os.readlink(tmp_path / "ckpt" / LATEST) == "ep0-ba2-rank0.pt"
    monkeypatch.setattr(composer_checkpoint, "_write_checkpoint_file", real)  # space freed
    assert main(_cli_args(corpus, tmp_path)) == 0
    # the torn write never had a checkpoint's name (atomic writes): nothing to set aside, nothing left over
    assert not list((tmp_path / "ckpt").glob("*.corrupt")) and not list((tmp_path / "ckpt").glob(".mixattn-partial-*"))
    _assert_same_weights(tmp_path / "ckpt" / "ep0-ba6-rank0.pt", tmp_path / "ref" / "ckpt" / "ep0-ba6-rank0.pt")


def test_too_little_free_space_for_one_checkpoint_fails_before_training(corpus, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ConfigError, match=r"save_folder '.*ckpt' has 1000 B free but one checkpoint of this model "
                                          r"takes about [0-9.]+ MiB \(weights \+ optimizer state\)"):
        _fit(_cfg(corpus, tmp_path, "max_duration=2ba"))
    assert not list((tmp_path / "ckpt").glob("*.pt"))


def test_a_write_killed_midway_leaves_only_a_partial_folder_that_recovery_removes(corpus, tmp_path):
    """What a SIGKILL during a save leaves with atomic writes: the partial file
    in .mixattn-partial-PID/, never a file with a checkpoint's name."""
    import composer.utils.checkpoint as composer_checkpoint

    from mixattn.checkpoint import install_atomic_checkpoint_writes

    install_atomic_checkpoint_writes()
    write = composer_checkpoint._write_checkpoint_file
    assert write._mixattn_atomic
    folder = tmp_path / "ckpt"
    folder.mkdir()
    write({"x": torch.arange(10)}, str(folder / "ep0-ba1-rank0.pt"))
    assert sorted(p.name for p in folder.iterdir()) == ["ep0-ba1-rank0.pt"]  # renamed into place, folder removed
    partial = folder / ".mixattn-partial-99999"
    partial.mkdir()
    (partial / "ep0-ba2-rank0.pt").write_bytes(b"PK\x03\x04 cut short")  # the dead writer's file
    assert recover_latest(folder) == {"latest": "ep0-ba1-rank0.pt", "quarantined": []}
    assert sorted(p.name for p in folder.iterdir()) == ["ep0-ba1-rank0.pt", LATEST]
