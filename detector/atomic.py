"""Atomic file writes: a crash or a kill leaves either the old file or the new one, never half of one.

Every artefact a later run reads back (checkpoints, results.csv, args.yaml, converted annotations,
autobatch.json, plots) is written this way: a temp file beside the target, fsync, then one rename.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from detector.errors import DetectorError


def atomic_write_bytes(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call write(file) on a temp file beside `path`, fsync it, then rename it over `path`.

    The temp file is in the same folder (a rename is atomic only within one file system) and is
    removed if `write` raises. The folder is fsynced after the rename, so the new name survives a
    power cut as well as a killed process. The file gets the mode open() would give it.

    Raises:
        DetectorError: `path` is a folder, or a file sits where one of its folders should be.
    """
    path = Path(path)
    check_file_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_name = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    # Not tempfile.mkstemp: it creates the file 0600. Asking for 0666 lets the kernel apply the umask (and a
    # folder's default ACL) as it does for open(), without os.umask, which would change it for every thread.
    handle = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` as UTF-8 to `path` atomically (see atomic_write_bytes)."""
    atomic_write_bytes(path, lambda file: file.write(text.encode("utf-8")))


def check_file_path(path: Path) -> None:
    """Raise DetectorError when `path` cannot become a file: it is a folder, or a file sits where one of its
    folders should be. A long job (an export, a conversion) calls it first, so it fails before its work."""
    path = Path(path)
    if path.is_dir():
        raise DetectorError(f"cannot write {path}: it is a folder; give a file path")
    blocker = file_in_the_way(path.parent)
    if blocker is not None:
        raise DetectorError(f"cannot write {path}: {blocker} is a file, not a folder; give another path")


def file_in_the_way(folder: Path) -> Path | None:
    """The first of `folder` and its parents that exists and is not a folder, or None."""
    folder = Path(folder)
    return next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)


def _fsync_folder(folder: Path) -> None:
    # Not every platform or file system can open or fsync a folder; the rename itself is done by then.
    with contextlib.suppress(OSError):
        handle = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)
