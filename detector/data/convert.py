"""YOLO txt labels -> COCO instances JSON (for datasets downloaded in YOLO format)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from detector.atomic import atomic_write_text, check_file_path
from detector.data.images import IMAGE_SUFFIXES, probe_image
from detector.errors import DataError

logger = logging.getLogger(__name__)

COCO80_NAMES = (
    "person,bicycle,car,motorcycle,airplane,bus,train,truck,boat,traffic light,fire hydrant,stop sign,"
    "parking meter,bench,bird,cat,dog,horse,sheep,cow,elephant,bear,zebra,giraffe,backpack,umbrella,handbag,"
    "tie,suitcase,frisbee,skis,snowboard,sports ball,kite,baseball bat,baseball glove,skateboard,surfboard,"
    "tennis racket,bottle,wine glass,cup,fork,knife,spoon,bowl,banana,apple,sandwich,orange,broccoli,carrot,"
    "hot dog,pizza,donut,cake,chair,couch,potted plant,bed,dining table,toilet,tv,laptop,mouse,remote,"
    "keyboard,cell phone,microwave,oven,toaster,sink,refrigerator,book,clock,vase,scissors,teddy bear,"
    "hair drier,toothbrush"
).split(",")
# Original COCO category id of each of the 80 YOLO classes (1..90 with gaps).
COCO80_TO_91 = [*range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70,
                *range(72, 83), *range(84, 91)]


def category_ids_for(names: list[str]) -> list[int]:
    """COCO's original ids when `names` are the 80 COCO classes (so COCOeval matches), else 1..C."""
    if list(names) == COCO80_NAMES:
        return list(COCO80_TO_91)
    return list(range(1, len(names) + 1))


def _read_labels(path: Path, height: int, width: int, num_classes: int) -> list[tuple[int, list[float]]]:
    """One YOLO label file -> [(class, [x, y, w, h] absolute, clipped)]."""
    boxes = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            cls, cx, cy, w, h = int(parts[0]), *(float(v) for v in parts[1:5])
        except (ValueError, TypeError) as err:
            raise DataError(f"{path}:{line_number}: expected 'class cx cy w h', got {line!r}") from err
        if not 0 <= cls < num_classes:
            raise DataError(f"{path}:{line_number}: class {cls} is not in 0..{num_classes - 1}")
        x1, y1 = max((cx - w / 2) * width, 0.0), max((cy - h / 2) * height, 0.0)
        x2, y2 = min((cx + w / 2) * width, width), min((cy + h / 2) * height, height)
        boxes.append((cls, [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)]))
    return boxes


def yolo_to_coco(images_dir: Path, labels_dir: Path, out_json: Path, names: list[str],
                 files: list[Path] | None = None) -> Path:
    """Writes a COCO instances JSON for the images of `images_dir` and their YOLO labels.

    Image ids are the integer file stems when all stems are distinct numbers (COCO's own ids),
    else 1..N in file-name order. Images without a label file become negatives; label files
    without an image are skipped.

    Args:
        images_dir: Folder of images; file_name entries are relative to it.
        labels_dir: Folder of `<stem>.txt` files, lines "class cx cy w h" normalized to [0, 1].
        out_json: JSON to write (atomically: temp file, fsync, rename).
        names: Class names indexed by YOLO class.
        files: The images to take, each under images_dir (default: every image under it).

    Returns:
        out_json.

    Raises:
        DataError: No images, a malformed label line or an unreadable image.
        DetectorError: out_json is a folder (or lies inside a file).
    """
    images_dir, labels_dir, out_json = Path(images_dir), Path(labels_dir), Path(out_json)
    check_file_path(out_json)  # before reading every image, not after
    if files is None:
        files = sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"no images found in {images_dir}; expected .jpg/.png files")
    stems = [p.stem for p in files]
    numeric = all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems)
    category_ids = category_ids_for(names)
    images, annotations = [], []
    for index, path in enumerate(files):
        image_id = int(path.stem) if numeric else index + 1
        height, width = probe_image(path)
        images.append({"id": image_id, "file_name": path.relative_to(images_dir).as_posix(),
                       "width": width, "height": height})
        label = labels_dir / path.relative_to(images_dir).with_suffix(".txt")
        for cls, bbox in _read_labels(label, height, width, len(names)) if label.is_file() else []:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": category_ids[cls], "bbox": bbox,
                                "area": round(bbox[2] * bbox[3], 3), "iscrowd": 0})
    categories = [{"id": i, "name": n, "supercategory": ""} for i, n in zip(category_ids, names, strict=True)]
    atomic_write_text(out_json, json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    logger.info("wrote %s: %d images, %d boxes", out_json, len(images), len(annotations))
    return out_json

