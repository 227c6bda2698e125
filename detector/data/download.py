"""Fetching a dataset zip and unpacking it without letting it write outside its folder."""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from tqdm import tqdm

from detector.errors import DataError

logger = logging.getLogger(__name__)

MAX_DOWNLOAD_BYTES = 8 * 2**30
MAX_EXTRACT_BYTES = 16 * 2**30
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
CHUNK = 1 << 20


def check_url(url: str) -> None:
    """Allows https, file, and http only to this machine (plain http elsewhere can be tampered with)."""
    parsed = urlparse(url)
    if parsed.scheme in ("https", "file") or (parsed.scheme == "http" and parsed.hostname in LOCAL_HOSTS):
        return
    raise DataError(f"refusing to download {url}: use an https:// URL or a local path")


def as_url(source: str) -> str:
    """A URL as it is; a local path (absolute, or relative to the working folder) as a file:// URL."""
    scheme = urlparse(source).scheme
    if scheme and len(scheme) > 1:  # one letter is a Windows drive, C:\...
        return source
    return Path(source).expanduser().resolve().as_uri()


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to a URL check_url allows: an https link cannot send us to plain http."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        check_url(newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def download(url: str, dest: Path, *, max_bytes: int = MAX_DOWNLOAD_BYTES, sha256: str | None = None,
             timeout: float = 30.0) -> Path:
    """Streams `url` to `dest` with a progress bar; a temp file is renamed into place when complete.

    Args:
        url: https://, file:// or http://127.0.0.1 / localhost URL, or a local path. Redirects are
            followed only to URLs of those kinds.
        dest: File to write.
        max_bytes: Stop with an error past this many bytes.
        sha256: Expected hex digest, checked when given.
        timeout: Socket timeout in seconds.

    Returns:
        dest.

    Raises:
        DataError: Bad scheme, network failure, too large, or checksum mismatch.
    """
    url = as_url(url)
    check_url(url)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part")
    digest = hashlib.sha256()
    try:
        opener = urllib.request.build_opener(_CheckedRedirects)
        with opener.open(url, timeout=timeout) as response, open(tmp, "wb") as file:
            written = _copy(response, file, digest, url=url, max_bytes=max_bytes, label=f"downloading {dest.name}")
    except (urllib.error.URLError, OSError, ValueError) as err:
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot download {url}: {err}") from err
    except DataError:
        tmp.unlink(missing_ok=True)
        raise
    if sha256 and digest.hexdigest() != sha256.lower():
        tmp.unlink(missing_ok=True)
        raise DataError(f"{url}: sha256 {digest.hexdigest()} does not match the expected {sha256}")
    os.replace(tmp, dest)
    logger.info("downloaded %s to %s (%d bytes)", url, dest, written)
    return dest


def _copy(response, file, digest, *, url: str, max_bytes: int, label: str) -> int:
    """Copy the response into the open file, durably, feeding the digest and a progress bar; returns the bytes."""
    total = int(response.headers.get("Content-Length") or 0) or None
    if total and total > max_bytes:
        raise DataError(f"{url} is {total} bytes, more than the {max_bytes} allowed")
    with tqdm(total=total, unit="B", unit_scale=True, desc=label) as bar:
        written = 0
        while chunk := response.read(CHUNK):
            written += len(chunk)
            if written > max_bytes:
                raise DataError(f"{url} is larger than the {max_bytes} bytes allowed")
            file.write(chunk)
            digest.update(chunk)
            bar.update(len(chunk))
    file.flush()
    os.fsync(file.fileno())
    return written


def _check_member(info: zipfile.ZipInfo, zip_path: Path) -> None:
    name = info.filename.replace("\\", "/")
    path = PurePosixPath(name)
    if path.is_absolute() or (path.parts and ":" in path.parts[0]) or ".." in path.parts:
        raise DataError(f"{zip_path}: entry {info.filename!r} would write outside the target; not unpacking")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise DataError(f"{zip_path}: entry {info.filename!r} is a symbolic link; not unpacking")


def safe_extract(zip_path: Path, target: Path, *, max_bytes: int = MAX_EXTRACT_BYTES) -> Path:
    """Unpacks a zip into `target`, refusing absolute paths, `..` entries, links and zip bombs.

    Returns:
        target.

    Raises:
        DataError: An unsafe entry, too many uncompressed bytes, or a broken zip.
    """
    target = Path(target)
    try:
        with zipfile.ZipFile(zip_path) as archive:
            members = archive.infolist()
            for info in members:
                _check_member(info, zip_path)
            total = sum(info.file_size for info in members)
            if total > max_bytes:
                raise DataError(f"{zip_path} unpacks to {total} bytes, more than the {max_bytes} allowed")
            target.mkdir(parents=True, exist_ok=True)
            root = target.resolve()
            for info in members:
                destination = (target / info.filename).resolve()
                if destination != root and root not in destination.parents:
                    raise DataError(f"{zip_path}: entry {info.filename!r} resolves outside {target}")
                archive.extract(info, target)
    except (zipfile.BadZipFile, OSError) as err:
        raise DataError(f"cannot unpack {zip_path}: {err}; delete it and try again") from err
    return target
