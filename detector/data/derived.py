"""The COCO JSON of a split that a dataset lacks, written from its YOLO labels: for one image folder, for a .txt list
of images, or for several folders merged into one JSON. Each JSON written here has a stamp beside it
(`<json>.sources`), a fingerprint of the files it was written from (images, labels, the list, the merged JSONs:
path, size, modification time); when they change (images or labels added, removed or edited) the JSON is written
again. A JSON without a stamp is the dataset's own and is never rewritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from detector.atomic import atomic_write_text
from detector.data.convert import yolo_to_coco
from detector.data.images import IMAGE_SUFFIXES
from detector.errors import DataError

logger = logging.getLogger(__name__)

STAMP_SUFFIX = ".sources"


def default_json(folder: str) -> str:
    """images/train2017 -> annotations/instances_train2017.json (the COCO layout); a folder named `images` is named
    by its parent, so ../valid/images (a Roboflow export) -> annotations/instances_valid.json."""
    path = Path(folder)
    split = path.parent.name if path.name == "images" and path.parent.name not in ("", ".", "..") else path.name
    return f"annotations/instances_{split}.json"


def read_list(path: Path) -> list[Path]:
    """The images a .txt lists, one path per line, relative to the list's folder (`./images/a.jpg`) or absolute."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read the image list {path}: {err}") from err
    files = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        file = Path(os.path.normpath(path.parent / line.strip()))
        if file.suffix.lower() not in IMAGE_SUFFIXES:
            raise DataError(f"{path}:{number}: {line.strip()!r} is not an image file "
                            f"({', '.join(sorted(IMAGE_SUFFIXES))})")
        if not file.is_file():
            raise DataError(f"{path}:{number}: the image {file} does not exist; fix the line or remove it")
        files.append(file)
    if not files:
        raise DataError(f"the image list {path} lists no images")
    return files


def list_base(path: Path) -> Path:
    """The folder a .txt list's images share (their file names in the JSON are relative to it); the list's own
    folder while the list does not exist."""
    if not path.is_file():
        return path.parent
    folders = {file.parent for file in read_list(path)}
    return Path(os.path.commonpath(sorted(folders)))


def write_split_json(card_name: str, names: list[str], root: Path, images: Path, json_path: Path, *,
                     folders: list[Path] | None = None, listed: Path | None = None) -> None:
    """Writes a split's COCO JSON when it is missing, or when it was written here and its sources changed.

    Args:
        card_name, names: the card's name (for messages) and class names (YOLO class order).
        root: the dataset root (the merged folders' own JSONs go to its annotations/).
        images: the folder the JSON's file names are relative to.
        json_path: the JSON.
        folders: merge these folders' JSONs (each written from its YOLO labels when it has none).
        listed: take the images this .txt lists, not every image under `images`.
    """
    stamp = json_path.with_name(json_path.name + STAMP_SUFFIX)
    if json_path.is_file() and not stamp.is_file():
        return  # the dataset's own
    if folders:
        parts = []
        for folder in folders:
            if not folder.is_dir():
                raise DataError(f"data card {card_name}: the image folder {folder} does not exist")
            parts.append(root / default_json(str(folder)))
            write_split_json(card_name, names, root, folder, parts[-1])
        sources = parts
    else:
        labels = _labels_folder(card_name, images, json_path)
        if labels is None:
            return  # a JSON written from labels since removed: kept
        files = read_list(listed) if listed else sorted(p for p in images.rglob("*") if p.suffix.lower() in
                                                        IMAGE_SUFFIXES)
        sources = [*([listed] if listed else []), *files,
                   *(labels / file.relative_to(images).with_suffix(".txt") for file in files)]
    fingerprint = _fingerprint(sources, root)
    if json_path.is_file() and stamp.read_text(encoding="utf-8") == fingerprint:
        return
    what = (f"the {len(folders)} folders' JSONs" if folders else f"the YOLO labels at {labels}" if not listed else
            f"the images {listed} lists and their YOLO labels at {labels}")
    if json_path.is_file():
        logger.warning("%s was written from %s, which changed since: writing it again", json_path, what)
    else:
        logger.info("%s is missing: writing it from %s", json_path, what)
    if folders:
        _merge(card_name, folders, parts, images, json_path)
    else:
        if not names:
            raise DataError(f"data card {card_name}: 'names' is needed to convert the YOLO labels at {labels}")
        yolo_to_coco(images, labels, json_path, names, files)
    atomic_write_text(stamp, fingerprint)


def _labels_folder(card_name: str, images: Path, json_path: Path) -> Path | None:
    """The YOLO labels beside an image folder (images/<split> <-> labels/<split>, <split>/images <-> <split>/labels:
    the last `images` part of the path read as `labels`); None when there are none but the JSON is there."""
    parts = list(images.parts)
    last = max((i for i, part in enumerate(parts) if part == "images"), default=None)
    labels = Path(*parts[:last], "labels", *parts[last + 1:]) if last is not None else None
    if (labels is None or not labels.is_dir()) and json_path.is_file():
        return None
    if labels is None or not labels.is_dir():
        yolo = f"YOLO labels at {labels}" if labels else "YOLO labels in a 'labels' folder paired with an 'images' one"
        raise DataError(f"{json_path} is missing: put the COCO JSON there (or name it with train_json, val_json or "
                        f"test_json in card '{card_name}'), or {yolo}")
    return labels


def _fingerprint(paths: list[Path], base: Path) -> str:
    """A hash of each file's path (relative to `base` where it lies under it: a moved dataset stays fresh), size and
    modification time. Listing and fingerprinting 20,000 images and their labels took 0.38 s here."""
    digest, prefix = hashlib.sha1(), f"{base}{os.sep}"
    for path in paths:
        try:
            stat = os.stat(path)
            seen = f"{stat.st_size}\t{stat.st_mtime_ns}"
        except FileNotFoundError:
            seen = "-"  # an image without labels: a negative
        digest.update(f"{str(path).removeprefix(prefix)}\t{seen}\n".encode())
    return digest.hexdigest()


def _merge(card_name: str, folders: list[Path], parts: list[Path], base: Path, json_path: Path) -> None:
    """Writes one COCO JSON for several image folders from each one's own JSON: file names relative to `base`,
    image and annotation ids renumbered, the categories all the same."""
    merged: dict[str, Any] = {"images": [], "annotations": [], "categories": None}
    for folder, part in zip(folders, parts, strict=True):
        try:
            data = json.loads(part.read_text(encoding="utf-8"))
            new_ids = {image["id"]: len(merged["images"]) + i + 1 for i, image in enumerate(data["images"])}
            merged["images"] += [{**image, "id": new_ids[image["id"]],
                                  "file_name": (folder.relative_to(base) / image["file_name"]).as_posix()}
                                 for image in data["images"]]
            first = len(merged["annotations"]) + 1
            merged["annotations"] += [{**a, "id": first + i, "image_id": new_ids[a["image_id"]]}
                                      for i, a in enumerate(data["annotations"]) if a["image_id"] in new_ids]
            categories = sorted(data["categories"], key=lambda c: c["id"])
            classes = [(c["id"], c["name"]) for c in categories]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DataError(f"cannot merge {part} into {json_path.name}: {err!r}") from err
        if merged["categories"] is not None and classes != [(c["id"], c["name"]) for c in merged["categories"]]:
            raise DataError(f"data card {card_name}: {part} has other categories (ids, names) than {folders[0]}'s "
                            "JSON; the folders of a split must share their classes")
        merged["categories"] = merged["categories"] or categories
    json_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json_path, json.dumps(merged))
