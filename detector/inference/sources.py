"""Where images to run on come from: files, folders, globs, videos, arrays or any iterable of them, read
in a background thread and grouped into batches as they arrive.

    source -> frames (open_source) -> groups of up to `batch` frames (iter_batches) -> the model

A frame is one image in the order of the source; a video contributes one frame per decoded picture.
Reading (decoding, letterboxing) runs ahead of the model in a thread, so that the model's time and the
disk's overlap, and a slow stream (a camera, a generator that waits for uploads) does not hold a
half-full batch for ever: `max_wait_ms` bounds how long the first frame of a batch waits for the rest.
"""

from __future__ import annotations

import glob
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np

from detector.data.images import IMAGE_SUFFIXES, READ_FLAGS, header_size, reduction_for
from detector.errors import DataError

VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"}

T = TypeVar("T")
U = TypeVar("U")


@dataclass
class Frame:
    """One image of a source, in source order.

    Attributes:
        image: uint8 (H, W, 3) BGR, as OpenCV reads it.
        index: position in the whole source, from 0.
        path: the file it came from ("" for an array).
        frame: the picture's number within its video, None for still images.
        reduction: 1, or 2, 4 or 8 when a file was decoded at that fraction of each side (open_source's
            decode_size); its content is then scaled by exactly 1 / reduction.
        size: (height, width) of the image as the file holds it, when decoded smaller; None: image's own.
    """

    image: np.ndarray
    index: int
    path: str = ""
    frame: int | None = None
    reduction: int = 1
    size: tuple[int, int] | None = None

    @property
    def original_size(self) -> tuple[int, int]:
        return self.size or self.image.shape[:2]


def list_files(source: str | Path) -> list[Path]:
    """Image and video files of a file, a folder (sorted, not recursive) or a glob pattern.

    Raises:
        DataError: the source is empty, does not exist, is a file of another kind or holds no image or video.
    """
    text = str(source)
    suffixes = IMAGE_SUFFIXES | VIDEO_SUFFIXES
    if not text:  # Path("") is the current folder, which the user did not name
        raise DataError("predict source is empty: give an image, a video, a folder or a glob pattern")
    if any(ch in text for ch in "*?["):
        paths = [Path(p) for p in sorted(glob.glob(text, recursive=True))]
    elif Path(text).is_dir():
        paths = sorted(Path(text).iterdir())
    elif Path(text).is_file():
        if Path(text).suffix.lower() not in suffixes:
            raise DataError(f"predict source {text} is not an image or video file: expected one of "
                            f"{', '.join(sorted(suffixes))}")
        paths = [Path(text)]
    else:
        raise DataError(f"predict source {text} does not exist: give an image, a video, a folder or a glob pattern")
    files = [p for p in paths if p.suffix.lower() in suffixes]
    if not files:
        raise DataError(f"predict source {text} holds no images or videos ({', '.join(sorted(suffixes))})")
    return files


def _items(source) -> Iterator[str | Path | np.ndarray]:
    """The source flattened to single files and arrays, lazily (a generator is consumed as it yields)."""
    if isinstance(source, np.ndarray):
        yield source
    elif isinstance(source, str | Path):
        yield from list_files(source)
    elif isinstance(source, Iterable):
        for item in source:
            yield from _items(item)
    else:
        raise DataError(f"predict source of type {type(source).__name__} is not understood: give a path, a glob, "
                        "an image array (H, W, 3) or a list or iterable of them")


def _video_frames(path: Path) -> Iterator[tuple[np.ndarray, int]]:
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise DataError(f"cannot open video {path}: missing, empty or in a format OpenCV cannot decode")
    try:
        number = 0
        while True:
            ok, image = capture.read()
            if not ok:
                return
            yield image, number
            number += 1
    finally:
        capture.release()


def _as_bgr(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
        raise DataError(f"an image array must be uint8 (H, W), (H, W, 3) BGR or (H, W, 4) BGRA, "
                        f"got {image.dtype} {tuple(image.shape)}")
    if image.ndim == 2 or image.shape[2] == 1:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR) if image.shape[2] == 4 else image


def open_source(source, decode_size: int | None = None) -> Iterator[Frame]:
    """Every frame of `source`, in order: a path, a glob, a folder, a video, an array, or a list or iterable
    of any of these (read lazily: nothing is decoded before it is asked for). An image file whose longest side
    is at least twice `decode_size` is decoded smaller, as training and validation decode it (images.reduction_for).

    Raises:
        DataError: a path that does not exist (at once when the source is one path), a file that cannot
            be decoded, or an item of another type.
    """
    if isinstance(source, str | Path):
        list_files(source)  # a wrong path fails here, not at the first frame
    return _frames(source, decode_size)


def _frames(source, decode_size: int | None) -> Iterator[Frame]:
    index = 0
    for item in _items(source):
        if isinstance(item, np.ndarray):
            yield Frame(_as_bgr(item), index)
            index += 1
        elif item.suffix.lower() in VIDEO_SUFFIXES:
            for image, number in _video_frames(item):
                yield Frame(image, index, str(item), number)
                index += 1
        else:
            size = header_size(item) if decode_size else None
            reduction = reduction_for(*size, decode_size) if size else 1
            image = cv2.imread(str(item), READ_FLAGS[reduction])
            if image is None:
                raise DataError(f"cannot read image {item}: missing, empty or not an image")
            yield Frame(image, index, str(item), reduction=reduction, size=size if reduction > 1 else None)
            index += 1


def count_frames(source) -> int | None:
    """How many frames `source` holds when that is known without decoding it (files, folders, globs,
    arrays and lists of them; videos by their header), else None (generators)."""
    if isinstance(source, np.ndarray):
        return 1
    if isinstance(source, str | Path):
        return sum(_video_length(p) if p.suffix.lower() in VIDEO_SUFFIXES else 1 for p in list_files(source))
    if isinstance(source, list | tuple):
        counts = [count_frames(item) for item in source]
        return None if None in counts else sum(counts)
    return None


def _video_length(path: Path) -> int:
    capture = cv2.VideoCapture(str(path))
    try:
        return max(int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), 1)
    finally:
        capture.release()


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
