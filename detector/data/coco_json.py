"""A COCO instances JSON read and checked for what pycocotools and the dataset rely on.

Each mistake is a DataError naming the file, the record and the field, before any image is opened.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from pathlib import Path

from detector.errors import DataError

logger = logging.getLogger(__name__)


def load_coco_json(path: Path) -> dict:
    """Reads a COCO JSON and checks the structure pycocotools relies on."""
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except FileNotFoundError as err:
        raise DataError(f"annotation file {path} not found; check the card's train_json/val_json") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"annotation file {path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise DataError(f"annotation file {path}: expected a JSON object with images/annotations/categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            problem = "is missing" if key not in data else "is not a list"
            raise DataError(f"annotation file {path}: '{key}' {problem}; is this a COCO instances file?")
    _check_records(path, "images", data["images"], {"id": int, "file_name": str})
    _check_records(path, "categories", data["categories"], {"id": int, "name": str})
    # pycocotools keys images and categories by id: a repeated id would silently merge two records.
    for key, what in (("images", "image"), ("categories", "category")):
        repeated = sorted(i for i, n in Counter(record["id"] for record in data[key]).items() if n > 1)
        if repeated:
            raise DataError(f"annotation file {path}: {what} id {repeated[0]} is used by more than one of '{key}' "
                            f"({len(repeated)} repeated id(s)); ids must be unique")
    _check_records(path, "annotations", data["annotations"],
                   {"image_id": int, "category_id": int, "bbox": list})
    for index, annotation in enumerate(data["annotations"]):
        annotation.setdefault("id", index + 1)
        bbox = annotation["bbox"]
        if len(bbox) != 4 or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in bbox):
            raise DataError(f"annotation file {path}: annotations[{index}].bbox must be [x, y, w, h] numbers")
        if not all(math.isfinite(v) for v in bbox) or bbox[2] < 0 or bbox[3] < 0:
            # Not a box that clipping could mend: the file was written wrong (often [x1, y1, x2, y2]).
            raise DataError(f"annotation file {path}: annotations[{index}].bbox {bbox} has a negative or "
                            "non-finite value; COCO boxes are [x, y, width, height] with width, height >= 0")
    return data


def category_names(path: Path, data: dict) -> list[str]:
    """The category names of the COCO JSON dict read from `path`, in id order."""
    try:
        return [str(c["name"]) for c in sorted(data["categories"], key=lambda c: c["id"])]
    except (KeyError, TypeError) as err:
        raise DataError(f"cannot read category names from {path}: {err!r}") from err


def _check_records(path: Path, key: str, records: list, fields: dict[str, type]) -> None:
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"annotation file {path}: {key}[{index}] is not an object")
        for field, kind in fields.items():
            value = record.get(field)
            if not isinstance(value, kind) or isinstance(value, bool):
                problem = ("is missing" if field not in record
                           else f"is {type(value).__name__}, not {kind.__name__}")
                raise DataError(f"annotation file {path}: {key}[{index}].{field} {problem}")


def find_images(json_path: Path, file_names: list[str]) -> Path:
    """The folder a bare COCO JSON's file names are relative to: of ../images/<split>, ../<split> and ../images
    (beside an annotations/ folder), the JSON's own folder and the images/ folder beside it, the one that holds
    the most of its first images (the first such on a tie).

    Raises:
        DataError: none holds any of them; the message names where it looked and how to point at the images.
    """
    folder = json_path.parent
    candidates = []
    if folder.name == "annotations":
        split = json_path.stem.removeprefix("instances_")
        candidates += [folder.parent / "images" / split, folder.parent / split, folder.parent / "images"]
    candidates += [folder, folder / "images"]
    if not file_names:
        return folder  # no images: the dataset says so
    found = [sum((candidate / name).is_file() for name in file_names) for candidate in candidates]
    if not max(found):
        raise DataError(f"the images of {json_path} (first: {file_names[0]}) are in none of "
                        f"{', '.join(map(str, candidates))}; put them in one, or name their folder in a data card: "
                        f"train: <image folder>, train_json: {json_path}")
    images = candidates[found.index(max(found))]
    logger.info("%s: its images are in %s", json_path.name, images)
    return images
