"""Data off the critical path: a background thread reads the next step's micro-batches while this one computes.

The thread only advances the DataLoader iterator the loop would advance itself, in the same order, so the
batches are exactly the same; what changes is when they are made. Decoding images (PIL), the image processor
(numpy) and collation (torch) release the GIL for most of their time, so on a machine with a spare core the
next step's data is ready when the step ends. With `data.num_workers > 0` the thread takes the unpickling of
the workers' batches off the loop too.

A dataset whose `__getitem__` drew from the global RNGs would now draw concurrently with the training step; the
datasets of this engine draw nothing (their randomness, where any, derives from (seed, epoch, index)), which
also keeps a run identical for any number of DataLoader workers.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

_END = object()


class _Failed:
    """An exception of the producer, re-raised in the consumer."""

    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher(Iterator[Any]):
    """Iterate `source` up to `depth` items ahead in a daemon thread (`depth` 0: no thread, plain iteration).

    Use as a context manager (or call `close`): leaving early stops the thread and drops the source iterator,
    which shuts down its DataLoader workers.
    """

    def __init__(self, source: Iterator[Any], depth: int):
        self._source: Iterator[Any] | None = source
        self._done = False
        self._thread: threading.Thread | None = None
        if depth > 0:
            self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._produce, name="arctic-vl-prefetch", daemon=True)
            self._thread.start()

    def _produce(self) -> None:
        try:
            for item in self._source:  # type: ignore[union-attr]
                if not self._put(item):
                    return
            self._put(_END)
        except BaseException as e:  # handed to the consumer, which re-raises it
            self._put(_Failed(e))

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        if self._thread is None:
            try:
                return next(self._source)  # type: ignore[arg-type]
            except StopIteration:
                self._done = True
                raise
        item = self._queue.get()
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, _Failed):
            self._done = True
            raise item.error
        return item

    def close(self) -> None:
        """Stop the thread (it finishes the item it is reading) and release the source."""
        self._done = True
        if self._thread is not None:
            self._stop.set()
            while True:  # unblock a producer waiting on a full queue
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._thread.join(timeout=10)
        self._source = None

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
