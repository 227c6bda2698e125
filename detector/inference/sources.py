"""Where images to run on come from: files, folders, globs, videos, arrays or any iterable of them.

    source -> frames (open_source) -> groups of up to `batch` frames (batching.iter_batches) -> the model

A frame is one image in the order of the source; a video contributes one frame per decoded picture. Nothing is
decoded before it is asked for, so that the reading can run ahead of the model in a thread (inference/batching.py).

A file that cannot be read stops the source when the user named it, and is skipped with a warning naming it when
it was found in a folder or by a glob. A JPEG or PNG cut short is used as far as it decodes, with a warning naming
it, and its frame says so (Frame.incomplete).
"""

from __future__ import annotations

import glob
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from detector.data.images import IMAGE_SUFFIXES, READ_FLAGS, header_size, reduction_for, truncation
from detector.errors import DataError

logger = logging.getLogger(__name__)

VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"}


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
        incomplete: the file is cut short (images.truncation): `image` is what decoded, grey past the cut.
    """

    image: np.ndarray
    index: int
    path: str = ""
    frame: int | None = None
    reduction: int = 1
    size: tuple[int, int] | None = None
    incomplete: bool = False

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
    if _is_pattern(text):
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


def _is_pattern(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def _items(source) -> Iterator[tuple[Path | np.ndarray, bool]]:
    """The source flattened to single files and arrays, lazily (a generator is consumed as it yields), each with
    whether the user named it (an array, a file given by its path) rather than it being found in a folder or glob."""
    if isinstance(source, np.ndarray):
        yield source, True
    elif isinstance(source, str | Path):
        named = not _is_pattern(str(source)) and Path(source).is_file()
        for path in list_files(source):
            yield path, named
    elif isinstance(source, Iterable):
        for item in source:
            yield from _items(item)
    else:
        raise DataError(f"predict source of type {type(source).__name__} is not understood: give a path, a glob, "
                        "an image array (H, W, 3) or a list or iterable of them")


def _file_frames(path: Path, index: int, decode_size: int | None) -> Iterator[Frame]:
    """The frames of one image or video file, numbered from `index`.

    Raises:
        DataError: at once, before any frame, when the file cannot be read.
    """
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        return iter([_image_frame(path, index, decode_size)])
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        capture.release()
        raise DataError(f"cannot open video {path}: missing, empty or in a format OpenCV cannot decode")
    return _video_frames(capture, path, index)


def _video_frames(capture: cv2.VideoCapture, path: Path, index: int) -> Iterator[Frame]:
    try:
        number = 0
        while True:
            ok, image = capture.read()
            if not ok:
                return
            yield Frame(image, index + number, str(path), number)
            number += 1
    finally:
        capture.release()


def _image_frame(path: Path, index: int, decode_size: int | None) -> Frame:
    """One image file, decoded smaller when it is at least twice decode_size; one cut short is kept as far as it
    decoded, with a warning naming it (OpenCV's own line on stderr may sit beside another file's)."""
    size = header_size(path) if decode_size else None
    reduction = reduction_for(*size, decode_size) if size else 1
    image = cv2.imread(str(path), READ_FLAGS[reduction])
    try:
        problem = truncation(path)
    except OSError as err:
        raise DataError(f"cannot read image {path}: {err.strerror or err}") from err
    if image is None:
        raise DataError(f"cannot read image {path}: {problem or 'empty or not an image'}")
    if problem:
        logger.warning("image %s is incomplete, its detections cover the part that decoded: %s", path, problem)
    return Frame(image, index, str(path), reduction=reduction, size=size if reduction > 1 else None,
                 incomplete=problem is not None)


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

    A file that cannot be decoded is skipped, with a warning naming it, when it was found in a folder or by a glob.

    Raises:
        DataError: a path that does not exist (at once when the source is one path), a file named by its path
            that cannot be decoded, or an item of another type.
    """
    if isinstance(source, str | Path):
        list_files(source)  # a wrong path fails here, not at the first frame
    return _frames(source, decode_size)


def _frames(source, decode_size: int | None) -> Iterator[Frame]:
    index = 0
    for item, named in _items(source):
        if isinstance(item, np.ndarray):
            yield Frame(_as_bgr(item), index)
            index += 1
            continue
        try:
            frames = _file_frames(item, index, decode_size)
        except DataError as err:
            if named:
                raise
            logger.warning("%s; skipped it, the other files go on", err)
            continue
        for frame in frames:
            yield frame
            index = frame.index + 1


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
