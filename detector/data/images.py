"""Reading image files: checking one without decoding it, its size from the header, whether a JPEG or PNG is cut
short, and decoding it (at 1/2, 1/4 or 1/8 of each side when the caller shrinks it anyway). The dataset, the
converter and predict's sources share them.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from detector.errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}  # the files taken as images
EXIF_ORIENTATION = 0x0112
_SWAPPED_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees
_JPEG_SOI, _JPEG_EOI = b"\xff\xd8\xff", b"\xff\xd9"
_PNG_SIGNATURE, _PNG_IEND = b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"  # IEND: its type, then its fixed CRC
_PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def probe_image(path: Path) -> tuple[int, int]:
    """Checks that an image file is readable without decoding it fully; returns (height, width).

    The size is the one after EXIF orientation (as cv2.imread returns the image). PIL's verify()
    does not notice a truncated JPEG, so a JPEG must also end with its end-of-image marker; one
    that does not (truncated, or trailing bytes) is decoded fully to decide.

    Raises:
        DataError: The file is missing, empty, not an image or truncated.
    """
    try:
        if path.stat().st_size == 0:
            raise DataError(f"{path} is empty")
        with Image.open(path) as image:
            image.verify()  # must come first: it leaves the file object unusable
        height, width, is_jpeg = _header(path)
        if is_jpeg and not _ends_with_eoi(path):
            with Image.open(path) as image:
                image.load()  # raises "image file is truncated"
    except DataError:
        raise
    except _PIL_ERRORS as err:
        raise DataError(f"cannot read image {path}: {err}") from err
    return height, width


def header_size(path: Path) -> tuple[int, int] | None:
    """(height, width) after EXIF orientation, from the file's header alone; None when PIL cannot read it."""
    try:
        return _header(path)[:2]
    except _PIL_ERRORS:
        return None


def _header(path: Path) -> tuple[int, int, bool]:
    """(height, width) after EXIF orientation (as cv2.imread returns the image), and whether it is a JPEG."""
    with Image.open(path) as image:
        width, height = image.size
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
        is_jpeg = image.format == "JPEG"
    return (width, height, is_jpeg) if orientation in _SWAPPED_ORIENTATIONS else (height, width, is_jpeg)


def reduction_for(height: int, width: int, size: int | None) -> int:
    """1, or the largest of 2, 4 and 8 at which a decode keeps the longest side at least `size` and scales it
    exactly (the longest side divides by it): JPEG decoders shrink in the frequency domain, for a fraction of the
    work of a full decode (a 4032 x 3024 photo for imgsz 640: 13.5 ms at 1/4 against 41 ms whole, one core)."""
    longest, reduction = max(height, width), 1
    while size and reduction < 8 and longest % (2 * reduction) == 0 and longest // (2 * reduction) >= size:
        reduction *= 2
    return reduction


def _ends_with_eoi(path: Path) -> bool:
    return _head_and_tail(path)[1].rstrip(b"\x00\r\n ").endswith(_JPEG_EOI)


def _head_and_tail(path: Path) -> tuple[bytes, bytes]:
    """The first 8 and the last 64 bytes of a file."""
    with open(path, "rb") as file:
        head = file.read(8)
        file.seek(max(file.seek(0, 2) - 64, 0))
        return head, file.read()


def truncation(path: Path) -> str | None:
    """Why a JPEG or PNG file is incomplete, or None when it is whole (or of another format, not checked).

    OpenCV decodes a JPEG cut short into a picture grey below the cut and says so only on stderr. A JPEG must end
    with its end-of-image marker (FF D9), a PNG with its IEND chunk; a file that does not (cut short, or followed
    by bytes of something else) is decoded fully with PIL to decide, so only suspect files pay for a second decode.

    Raises:
        OSError: the file cannot be opened.
    """
    head, tail = _head_and_tail(path)
    if head.startswith(_JPEG_SOI):
        if tail.rstrip(b"\x00\r\n ").endswith(_JPEG_EOI):
            return None
        missing = "its end-of-image marker FF D9"
    elif head == _PNG_SIGNATURE:
        if tail.endswith(_PNG_IEND):
            return None
        missing = "its IEND chunk"
    else:
        return None
    try:
        with Image.open(path) as image:
            image.load()  # raises "image file is truncated" for a file cut short
    except _PIL_ERRORS:
        return f"it is cut short: it ends before {missing}"
    return None


READ_FLAGS = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
               8: cv2.IMREAD_REDUCED_COLOR_8}


def read_image(path: Path, reduction: int = 1) -> np.ndarray:
    """Decodes an image as uint8 (H, W, 3) RGB; EXIF orientation applied, grey/RGBA made 3-channel.

    Args:
        path: The image file.
        reduction: 1, or 2, 4 or 8 to decode at that fraction of each side (sides rounded up). A JPEG
            decoder does this in the frequency domain, for a fraction of the work of a full decode.
    """
    bgr = cv2.imread(str(path), READ_FLAGS[reduction])  # IMREAD_COLOR* apply EXIF and drop alpha
    if bgr is None:
        raise DataError(f"cannot decode image {path}; remove it or set skip_bad_images=true")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
