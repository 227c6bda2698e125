"""Grouping a stream of items into batches as they arrive, read ahead in a background thread.

    items (read and transformed in a thread) -> groups of up to `batch`, handed on when full, at the end, or
    `max_wait_ms` after a group's first item arrived

A slow stream (a camera, a generator that waits for uploads) thus never holds a half-full batch for ever, and
the model's time and the reading's overlap.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
U = TypeVar("U")

_END = object()


def iter_batches(items: Iterable[T], batch: int, max_wait_ms: float | None = None,
                 transform: Callable[[T], U] | None = None) -> Iterator[list[U]]:
    """Group `items` into lists of up to `batch`, in order, while a background thread reads ahead.

    A group is handed on when it is full, when the items end, or `max_wait_ms` after its first item
    arrived (None: wait until it is full). Items that arrived while the consumer was busy are taken at
    once, so a slow stream gets small, prompt batches and a fast one full batches.

    Args:
        items: any iterable; it is iterated in the reading thread only.
        batch: most items per group (>= 1).
        max_wait_ms: longest wait (ms) of a group's first item for the others; None waits until the
            group is full, 0 hands on whatever has arrived.
        transform: applied to each item in the reading thread (e.g. decoding and letterboxing).

    Yields:
        Lists of transformed items; concatenated, they are all the items in their order.

    Raises:
        Whatever iterating `items` or `transform` raised, after the groups read before it.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    ready: queue.Queue = queue.Queue(maxsize=2 * batch)  # bounded: a long video is not read into memory
    stop = threading.Event()
    thread = threading.Thread(target=_read_ahead, args=(items, transform, ready, stop), name="detector-source",
                              daemon=True)
    thread.start()
    try:
        yield from _group(ready, batch, max_wait_ms)
    finally:
        stop.set()  # the reader ends at its next put; a consumer that stops early leaves no thread behind


def _read_ahead(items: Iterable, transform: Callable | None, ready: queue.Queue, stop: threading.Event) -> None:
    """The reading thread: (arrival time, item, None) per item, then (time, _END, the error that ended the items
    or None). Returns early once `stop` is set."""
    try:
        for item in items:
            if not _put(ready, stop, (time.monotonic(), transform(item) if transform else item, None)):
                return
    except BaseException as err:  # handed to the consumer, which raises it in its own thread
        _put(ready, stop, (time.monotonic(), _END, err))
        return
    _put(ready, stop, (time.monotonic(), _END, None))


def _put(ready: queue.Queue, stop: threading.Event, entry: tuple) -> bool:
    """Put `entry` once there is room; False when `stop` was set first."""
    while not stop.is_set():
        try:
            ready.put(entry, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _group(ready: queue.Queue, batch: int, max_wait_ms: float | None) -> Iterator[list]:
    """Groups from a queue of (arrival time, item, error) entries; the item _END closes the stream."""
    while True:
        arrived, item, error = ready.get()
        if item is _END:
            _finish(error)
            return
        group, ended, error = [item], False, None
        deadline = None if max_wait_ms is None else arrived + max_wait_ms / 1000
        while len(group) < batch:
            timeout = None if deadline is None else deadline - time.monotonic()
            try:
                _, item, error = ready.get(timeout=timeout) if timeout is None or timeout > 0 else ready.get_nowait()
            except queue.Empty:
                break
            if item is _END:
                ended = True
                break
            group.append(item)
        yield group
        if ended:
            _finish(error)
            return


def _finish(error: BaseException | None) -> None:
    if error is not None:
        raise error
