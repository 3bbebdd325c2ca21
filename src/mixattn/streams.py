"""StreamingDataset that does not end an epoch silently when a shard fails.

streaming prepares shards (download, hash check, decompress) in a background
thread; when that thread raises (a remote shard whose hash does not match, a
truncated download) the exception goes to a future's done-callback, the
thread pool stops and iteration simply ends early: an epoch with missing data
and no error. This subclass keeps the exception and raises it from the
iterator, naming the shard.

It also stops an epoch's two background threads when its iteration stops
before the epoch's end (a run's ``max_duration`` reached mid-epoch, an
evaluation of a few batches): streaming leaves them polling every 7 ms until
the next epoch or the process's end, so a process that trains or evaluates
several times (a sweep's points, the replication's stages, the test suite)
gathered dozens of threads contending for the interpreter lock.

And it makes two one-process jobs that start on one host at the same moment
(a sweep's points launched together, the replication's plans) not collide
over streaming's shared memory: streaming finds a free name prefix for a new
dataset's shared memory, then creates it, and two processes between those
steps pick the same prefix; the second then fails with ``FileExistsError:
'/000000_locals'`` (seen on an H200 with five of eight replication plans).
A one-process job builds its datasets holding a host-wide file lock
(``flock`` on a file in ``/dev/shm``, the namespace raced over), so the find
and the create are one step for other jobs. A job of several processes takes
no lock: streaming puts barriers between the find and the create, and a
second local leader of the same job on the host (two nodes on one host)
would wait for the lock at one of them forever; such jobs started at the
same moment on one host can still collide (streaming's own behaviour).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path

from streaming import StreamingDataset

from mixattn.data import DataError


def shm_lock_path() -> Path:
    """The host-wide lock file around building a dataset's shared memory."""
    root = Path("/dev/shm")
    return (root if root.is_dir() else Path(tempfile.gettempdir())) / "mixattn-streaming-prefix.lock"


@contextlib.contextmanager
def shm_prefix_lock():
    """Held by a one-process job while it builds a dataset (see the module's docstring)."""
    import torch.distributed as dist

    several = int(os.environ.get("WORLD_SIZE", "1")) > 1 or (
        dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)  # launched as several, or joined
    if several or int(os.environ.get("LOCAL_RANK", "0")) != 0:
        yield
        return
    path = shm_lock_path()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


class CheckedStreamingDataset(StreamingDataset):
    _mixattn_error: BaseException | None = None

    def __init__(self, *args, **kwargs):
        with shm_prefix_lock():
            super().__init__(*args, **kwargs)

    def on_exception(self, future) -> None:
        exc = future.exception()
        if exc is not None:
            self._mixattn_error = exc
            self._event.set()  # stop the other threads, as streaming does

    def __iter__(self):
        self._mixattn_error = None
        epoch = None  # this epoch's thread state (not self._iterator when this runs: a later epoch's by then)
        try:
            for sample in super().__iter__():
                if epoch is None:
                    epoch = self._iterator
                yield sample
        finally:  # closed early (GeneratorExit) or ended: this epoch's threads exit (without waiting for them)
            if epoch is not None:
                epoch.non_blocking_exit()
        if self._mixattn_error is not None:
            err = self._mixattn_error
            raise DataError(f"reading the dataset failed while preparing a shard: {type(err).__name__}: {err} "
                            "(a corrupt or truncated shard; re-copy it from its source)") from err
