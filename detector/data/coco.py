"""COCO JSON + images -> (image, Target): a dataset indexed 0..N-1 with contiguous class indices.

COCO category ids may have gaps (1..90 for COCO); the dataset maps them to class indices 0..C-1
(`category_ids[c]` maps back for evaluation). Every image is checked once at construction, so a
missing or truncated file fails before training starts, never mid-epoch.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import psutil
from pycocotools.coco import COCO

from detector.data.coco_json import load_coco_json
from detector.data.images import probe_image, read_image, reduction_for
from detector.errors import DataError

logger = logging.getLogger(__name__)

NAMED_ORPHANS = 5  # a warning names this many of the annotations whose image_id no image has
CACHE_AUTO_SHARE = 0.1  # cache=auto keeps the decoded images when they need at most this share of free RAM


@dataclass
class Target:
    """Boxes of one image.

    Attributes:
        boxes_xyxy: float32 (N, 4) absolute pixels [x1, y1, x2, y2] of the image they belong to.
        classes: int64 (N,) contiguous class indices 0..C-1.
    """

    boxes_xyxy: np.ndarray
    classes: np.ndarray

    def __len__(self) -> int:
        return len(self.classes)


def empty_target() -> Target:
    return Target(np.zeros((0, 4), np.float32), np.zeros((0,), np.int64))


def _boxes_of(annotations: list[dict], class_of: dict[int, int], height: int, width: int,
              counts: dict[str, int]) -> Target:
    """COCO annotations of one image -> Target clipped to (height, width); counts what it drops."""
    boxes, classes = [], []
    for annotation in annotations:
        if annotation.get("iscrowd", 0):
            counts["crowd"] += 1
            continue
        if annotation["category_id"] not in class_of:
            counts["unknown category"] += 1
            continue
        x, y, w, h = (float(v) for v in annotation["bbox"])
        # Clipped and checked in float32, as stored: a 1 px box can round to 0.9999997 px there.
        box = np.clip(np.float32([x, y, x + w, y + h]), np.float32(0), np.float32([width, height, width, height]))
        # NaN fails both comparisons, so it is dropped with the thin boxes.
        if not (box[2] - box[0] >= 1 and box[3] - box[1] >= 1 and w > 0 and h > 0):
            counts["degenerate"] += 1
            continue
        boxes.append(box)
        classes.append(class_of[annotation["category_id"]])
    if not boxes:
        return empty_target()
    return Target(np.asarray(boxes, np.float32), np.asarray(classes, np.int64))


def relabel(data: dict, classes: list[int] | None = None, single_cls: bool = False) -> dict:
    """The labels of a COCO JSON dict as a run sees them: only the annotations of `classes` (indices of the
    categories in id order; None keeps all, and the categories stay), then with single_cls every one in one
    category, 'object' (detection without classes).

    The training set, the validation set and the ground truth COCOeval scores against all go through it.
    """
    if classes is not None:
        ids = sorted(c["id"] for c in data.get("categories", []))
        kept = {ids[i] for i in classes}
        data = {**data, "annotations": [a for a in data.get("annotations", []) if a.get("category_id") in kept]}
    if single_cls:
        data = {**data, "categories": [{"id": 1, "name": "object"}],
                "annotations": [{**a, "category_id": 1} for a in data.get("annotations", [])]}
    return data


def _coco_index(data: dict) -> COCO:
    """pycocotools' index of a checked COCO JSON dict (without the progress it prints)."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class CocoDataset:
    """Images and boxes of one COCO instances JSON.

    Attributes:
        names: Class names, indexed by contiguous class index.
        category_ids: COCO category id of each class index (sorted by id).
        image_ids: COCO image id of each dataset index.
        annotation_json: The JSON file (for COCOeval against the original ground truth).
        max_boxes: Most boxes any image has after filtering.
        classes: The class indices its boxes are limited to (the classes= setting); None: all.
    """

    def __init__(self, images_dir: Path | str, annotation_json: Path | str, *, cache: bool | str = False,
                 skip_bad_images: bool = False, image_size: int | None = None, single_cls: bool = False,
                 classes: list[int] | None = None) -> None:
        """Parses the JSON and checks every image file.

        Args:
            images_dir: Folder the JSON's file_name entries are relative to.
            annotation_json: COCO instances JSON.
            cache: Keep the decoded images in RAM (decoded once, here): True, False, or "auto" for True when
                they need at most CACHE_AUTO_SHARE of the available RAM (shared by the local DDP ranks).
            skip_bad_images: Drop missing/unreadable images with a warning instead of raising.
            image_size: With cache, resize cached images so their longest side is this (the training size,
                at which each sample then needs no resize): down with area averaging, up bilinearly as
                training's own resize would (the same pixels, made once instead of every epoch).
            single_cls: Every box is of one class, 'object' (see relabel).
            classes: Keep only the boxes of these class indices (None: all); the classes stay (see relabel).

        Raises:
            DataError: Malformed JSON, or missing/unreadable images without skip_bad_images.
        """
        self.images_dir = Path(images_dir)
        self.annotation_json = Path(annotation_json)
        coco = _coco_index(relabel(load_coco_json(self.annotation_json), classes, single_cls))
        self.classes = None if single_cls else classes  # what detections are kept to (single_cls: its one class)
        categories = sorted(coco.cats.values(), key=lambda c: c["id"])
        self.category_ids: list[int] = [c["id"] for c in categories]
        self.names: list[str] = [c["name"] for c in categories]
        self._read_labels(coco, skip_bad_images)
        self.max_boxes = max((len(t) for t in self.targets), default=0)
        self._cache: list[np.ndarray] | None = None
        if cache == "auto":
            cache = self._fits_in_ram(image_size)
        if cache:
            self._cache = [self._decode(i, image_size) for i in range(len(self))]
        logger.info("%s: %d images, %d boxes, %d classes", self.annotation_json.name, len(self),
                    sum(len(t) for t in self.targets), len(self.names))

    def _read_labels(self, coco: COCO, skip_bad_images: bool) -> None:
        """The paths, ids, sizes and Targets of the images that open; warns of the boxes it drops.

        Raises:
            DataError: no usable image.
        """
        class_of = {category_id: index for index, category_id in enumerate(self.category_ids)}
        image_records = self._scan_images(coco, skip_bad_images)
        counts = {"crowd": 0, "unknown category": 0, "degenerate": 0}
        self.paths: list[Path] = []
        self.image_ids: list[int] = []
        self.sizes: list[tuple[int, int]] = []  # (height, width) of the decoded originals
        self.targets: list[Target] = []
        for record, size in image_records:
            self.paths.append(self.images_dir / record["file_name"])
            self.image_ids.append(int(record["id"]))
            self.sizes.append(size)
            self.targets.append(_boxes_of(coco.imgToAnns.get(record["id"], []), class_of, *size, counts))
        if not self.paths:
            raise DataError(f"annotation file {self.annotation_json} has no usable images: its 'images' list is "
                            "empty or every image was skipped; check the file and the image folder")
        orphans = [a["id"] for a in coco.dataset["annotations"] if a["image_id"] not in coco.imgs]
        counts["unknown image id"] = len(orphans)
        self._warn_dropped(counts, orphans)
        if not any(len(t) for t in self.targets):
            logger.warning("%s has no boxes: training on it learns background only, and validating on it scores 0",
                           self.annotation_json.name)

    def _fits_in_ram(self, image_size: int | None) -> bool:
        """Whether the decoded images (resized to image_size) take at most CACHE_AUTO_SHARE of the available RAM."""
        scales = [image_size / max(size) if image_size else 1.0 for size in self.sizes]
        need = sum(3 * (h * f) * (w * f) for (h, w), f in zip(self.sizes, scales, strict=True))
        budget = CACHE_AUTO_SHARE * psutil.virtual_memory().available / int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        fits = need <= budget
        logger.info("cache=auto: %s decoded images need %.2f GiB, %s", self.annotation_json.name, need / 2**30,
                    "kept in RAM" if fits else f"over the budget of {budget / 2**30:.2f} GiB: read from disk")
        return fits

    def _scan_images(self, coco: COCO, skip_bad_images: bool) -> list[tuple[dict, tuple[int, int]]]:
        """Probes every image; returns (record, (height, width)) of the good ones."""
        good, bad, resized, lost_boxes = [], [], 0, 0
        for record in coco.imgs.values():
            try:
                size = probe_image(self.images_dir / record["file_name"])
            except DataError:
                bad.append(str(self.images_dir / record["file_name"]))
                lost_boxes += sum(not a.get("iscrowd", 0) for a in coco.imgToAnns.get(record["id"], []))
                continue
            stored = (record.get("height"), record.get("width"))
            resized += None not in stored and stored != size
            good.append((record, size))
        if resized:
            # The decoded image is what the model sees; boxes are clipped to it.
            logger.warning("%s: %d images have a width/height that differs from the file; using the file's",
                           self.annotation_json.name, resized)
        if bad and not skip_bad_images:
            listed = ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
            raise DataError(f"{len(bad)} missing or unreadable images in {self.annotation_json.name}: "
                            f"{listed}; "
                            "fix or remove them, or set skip_bad_images=true")
        if bad:
            logger.warning("skipping %d missing or unreadable %s of %s and the %d %s on them (first: %s)", len(bad),
                           "image" if len(bad) == 1 else "images", self.annotation_json.name, lost_boxes,
                           "box" if lost_boxes == 1 else "boxes", bad[0])
        return good

    def _warn_dropped(self, counts: dict[str, int], orphans: list[int]) -> None:
        """One warning for the boxes dropped, by reason; those of images the JSON lacks named by annotation id."""
        dropped = {k: v for k, v in counts.items() if v and k != "crowd"}
        if dropped:
            total = sum(dropped.values())
            ids = ", ".join(map(str, orphans[:NAMED_ORPHANS])) + (", ..." if len(orphans) > NAMED_ORPHANS else "")
            named = {"unknown image id": f": annotation {'id' if len(orphans) == 1 else 'ids'} {ids}"}  # to find them
            reasons = [f"{v} {k}{named.get(k, '')}" for k, v in dropped.items()]
            logger.warning("%s: dropped %d %s (%s)", self.annotation_json.name, total, "box" if total == 1 else "boxes",
                           ", ".join(reasons))
        if counts["crowd"]:
            logger.info("%s: %d crowd %s not trained on", self.annotation_json.name, counts["crowd"],
                        "box" if counts["crowd"] == 1 else "boxes")

    def __len__(self) -> int:
        return len(self.paths)

    def _decode(self, index: int, image_size: int | None) -> np.ndarray:
        image = read_image(self.paths[index])
        height, width = image.shape[:2]
        if image_size and max(height, width) != image_size:
            ratio = image_size / max(height, width)
            size = (max(round(width * ratio), 1), max(round(height * ratio), 1))
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA if ratio < 1 else cv2.INTER_LINEAR)
        return image

    def load(self, index: int, size: int | None = None) -> tuple[np.ndarray, Target, int]:
        """Returns (image uint8 (H, W, 3) RGB, Target in that image's pixels, COCO image id).

        Args:
            index: Dataset index.
            size: The longest side the caller shrinks the image to, if it does: the file is then
                decoded at 1/2, 1/4 or 1/8 scale when its longest side stays at least `size` and divides
                exactly (a 640 px JPEG for imgsz 320 decodes faster at half scale, and needs no resize).
        """
        reduction = 1
        if self._cache is not None:
            image = self._cache[index]
        else:
            reduction = reduction_for(*self.sizes[index], size)
            image = read_image(self.paths[index], reduction)
        target = self.targets[index]
        height, width = self.sizes[index]
        if image.shape[:2] != (height, width):
            # Decoded at reduced scale, cached resized, or changed since the scan: rescale and clip the boxes.
            # A reduced decode scales the content by exactly 1 / reduction (an odd side ends on a part pixel).
            new_height, new_width = image.shape[:2]
            factor = (np.array([new_width / width, new_height / height] * 2, np.float32) if reduction == 1
                      else np.float32(1 / reduction))
            boxes = np.clip(target.boxes_xyxy * factor, 0, [new_width, new_height, new_width, new_height])
            target = Target(boxes.astype(np.float32), target.classes)
        return image, Target(target.boxes_xyxy.copy(), target.classes.copy()), self.image_ids[index]

    def orig_size(self, index: int) -> tuple[int, int]:
        """(height, width) of the original image file (post EXIF orientation)."""
        return self.sizes[index]

    def all_boxes(self, image_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Every box of the dataset, for label statistics.

        Args:
            image_size: If given, boxes are mapped as letterbox() maps them into an image_size square.

        Returns:
            boxes_xyxy float32 (N, 4) and classes int64 (N,).
        """
        boxes, classes = [], []
        for (height, width), target in zip(self.sizes, self.targets, strict=True):
            scaled = target.boxes_xyxy
            if image_size:
                scale = min(image_size / height, image_size / width)
                pad = np.array([(image_size - round(width * scale)) // 2,
                                (image_size - round(height * scale)) // 2])
                scaled = scaled * scale + np.tile(pad, 2)
            boxes.append(scaled)
            classes.append(target.classes)
        if not boxes:
            return np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)
        return np.concatenate(boxes).astype(np.float32), np.concatenate(classes)
