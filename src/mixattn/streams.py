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
"""

from __future__ import annotations

from streaming import StreamingDataset

from mixattn.data import DataError


class CheckedStreamingDataset(StreamingDataset):
    _mixattn_error: BaseException | None = None

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
