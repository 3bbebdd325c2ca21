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

Last, shared memory is given back. streaming registers every shared-memory
block it opens with ``atexit``, which keeps the block (two file descriptors,
and its ``/dev/shm`` name) until the process ends:
- a dataset's own blocks (six) outlived the dataset;
- so did the blocks of *other* datasets that building a dataset opens to
  find a free name prefix (six for every prefix in use on the host, live or
  left by a killed process), on every build.
A process that built datasets again and again (the test suite, a notebook,
the replication's three stages) ran out of descriptors ("Too many open files"). Here the probed
blocks are closed as soon as the dataset is built, and a freed dataset closes
the blocks it opened and unlinks those it created (so its prefix is free
again); a forked loader worker's copy never does (the blocks are its
parent's).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import tempfile
import threading
from pathlib import Path

from streaming import StreamingDataset
from streaming.base.shared.memory import SharedMemory

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


def shared_memory_of(obj, depth: int = 2) -> list:
    """The streaming shared-memory blocks an object holds: its attributes,
    and theirs down to ``depth`` (SharedArray, SharedScalar, SharedBarrier
    each hold one)."""
    found = []

    def visit(value, left):
        if isinstance(value, SharedMemory):
            found.append(value)
        elif left and hasattr(value, "__dict__") and not isinstance(value, type):
            for v in vars(value).values():
                visit(v, left - 1)

    for value in vars(obj).values():
        visit(value, depth)
    return found


def release(shm: SharedMemory) -> None:
    """Close a streaming shared-memory block now (unlinking it if this
    process created it) and drop the exit hook that kept it open. A block
    already closed (its exit hook ran: a dataset freed at the process's end)
    is left alone: its name may be another job's block by now."""
    atexit.unregister(shm.cleanup)
    if getattr(shm.shm, "_mmap", None) is not None:  # the stdlib block's mapping; None once closed
        shm.cleanup()


_swap = threading.RLock()  # one swap of a streaming module's SharedMemory at a time in this process


@contextlib.contextmanager
def recorded_shared_memory(module):
    """Every shared-memory block ``module`` opens through its ``SharedMemory``
    name in this thread while this is held, in a list. Used around the two
    places where streaming opens another's block only to read it and never
    closes it: the prefix finder (the blocks of every prefix in use) and
    ``_resume`` (the resume state that ``load_state_dict`` wrote)."""
    made: list = []
    real, mine = module.SharedMemory, threading.get_ident()

    def record(*args, **kwargs):
        shm = real(*args, **kwargs)
        if threading.get_ident() == mine:  # another thread's block (a dataset iterating there) is not ours to close
            made.append(shm)
        return shm

    with _swap:
        module.SharedMemory = record
        try:
            yield made
        finally:
            module.SharedMemory = real


def release_unkept(owner, opened: list) -> None:
    """Release the blocks in ``opened`` that ``owner`` does not hold."""
    kept = {id(shm) for shm in shared_memory_of(owner)}
    for shm in opened:
        if id(shm) not in kept:
            release(shm)


@contextlib.contextmanager
def only_kept_shared_memory(owner, module):
    """Around a call into streaming ``module``: the blocks it opens in this
    thread are released when the call ends (also when it fails), except those
    ``owner`` holds by then."""
    opened: list = []
    try:
        with recorded_shared_memory(module) as opened:
            yield
    finally:
        release_unkept(owner, opened)


class CheckedStreamingDataset(StreamingDataset):
    _mixattn_error: BaseException | None = None
    _mixattn_pid: int | None = None

    def __init__(self, *args, **kwargs):
        from streaming.base.shared import prefix

        self._mixattn_pid = os.getpid()  # first: a build that fails half-way gives back what it made when freed
        # the dataset keeps its own locals block; the other prefixes' blocks were only read
        with shm_prefix_lock(), only_kept_shared_memory(self, prefix):
            super().__init__(*args, **kwargs)

    def _resume(self, world, epoch):
        from streaming.base import dataset

        # the resume state was read; the block stays with the dataset that wrote it
        with only_kept_shared_memory(self, dataset):
            return super()._resume(world, epoch)

    def __del__(self) -> None:
        super().__del__()  # streaming marks its name prefix free
        if self._mixattn_pid != os.getpid():
            return  # a forked worker's copy: the blocks are its parent's
        for shm in shared_memory_of(self):
            release(shm)

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
