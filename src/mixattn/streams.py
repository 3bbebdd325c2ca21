"""StreamingDataset that does not end an epoch silently when a shard fails.

streaming prepares shards (download, hash check, decompress) in a background
thread; when that thread raises (a remote shard whose hash does not match, a
truncated download) the exception goes to a future's done-callback, the
thread pool stops and iteration simply ends early: an epoch with missing data
and no error. This subclass keeps the exception and raises it from the
iterator, naming the shard.
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
        yield from super().__iter__()
        if self._mixattn_error is not None:
            err = self._mixattn_error
            raise DataError(f"reading the dataset failed while preparing a shard: {type(err).__name__}: {err} "
                            "(a corrupt or truncated shard; re-copy it from its source)") from err
