"""The embedded default dataset: rendered images of simple shapes with COCO annotations.

A fresh machine can train and reach a real mAP without a download: `generate_shapes` renders
circles, rectangles, triangles and stars (filled or outlined, rotated, 8 to ~100 px, partly
overlapping) on textured backgrounds with unlabelled distractors, and writes a COCO dataset:

    root/images/{train,val}/000000.jpg ...
    root/annotations/instances_{train,val}.json   category ids 1..4, bbox [x, y, w, h] pixels

Each image depends only on (seed, split, index), so the output is identical across runs.
Look at it with `python -m detector.data.shapes --out DIR`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from detector.data.shapes_render import CLASS_NAMES, render_image
from detector.errors import DataError

logger = logging.getLogger(__name__)

SPLIT_CODES = {"train": 0, "val": 1}
# Full-resolution colour: 4:2:0 chroma subsampling would smear the colour of 8 px objects.
JPEG_PARAMS = [cv2.IMWRITE_JPEG_QUALITY, 95,
               cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]


def _write_split(root: Path, split: str, count: int, seed: int, image_size: int) -> None:
    """Renders `count` images of one split into root/images/<split> and its COCO JSON."""
    image_dir = root / "images" / split
    image_dir.mkdir(parents=True)
    images, annotations = [], []
    for index in tqdm(range(count), desc=f"shapes {split}", unit="img", leave=False, disable=None):
        image, objects = render_image(np.random.default_rng((seed, SPLIT_CODES[split], index)), image_size)
        file_name = f"{index:06d}.jpg"
        if not cv2.imwrite(str(image_dir / file_name), image, JPEG_PARAMS):
            raise DataError(f"could not write {image_dir / file_name}")
        images.append({"id": index + 1, "file_name": file_name, "width": image_size, "height": image_size})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1,
                                "category_id": obj.class_index + 1, "bbox": [float(v) for v in obj.box_xywh],
                                "area": obj.area, "iscrowd": 0})
    coco = {
        "info": {"description": f"detector shapes, seed {seed}, split {split}"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name, "supercategory": "shape"}
                       for i, name in enumerate(CLASS_NAMES)],
    }
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    logger.info("shapes %s: %d images, %d boxes", split, len(images), len(annotations))


def _is_complete(root: Path) -> bool:
    # The dataset only ever appears by one rename, so its annotation files mean it is whole.
    return all((root / "annotations" / f"instances_{s}.json").is_file() for s in SPLIT_CODES)


def _remove_stale_partials(root: Path) -> None:
    """Deletes temp folders left by generations that were killed (their process is gone)."""
    for partial in root.parent.glob(f".{root.name}.partial-*"):
        try:
            os.kill(int(partial.name.rsplit("-", 1)[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(partial, ignore_errors=True)
        except (ValueError, PermissionError):
            continue  # not ours to judge: a foreign name, or a live process of another user


def generate_shapes(root: Path, *, seed: int = 0, num_train: int = 600, num_val: int = 100,
                    image_size: int = 256) -> Path:
    """Renders the shapes dataset into `root` unless it is already there.

    The images are rendered into a temp folder next to `root` and moved into place with one
    rename, so an interrupted run never leaves a half dataset behind.

    Args:
        root: Dataset folder to create (its parent is created if needed).
        seed: Seed of the whole dataset; image i of a split depends only on (seed, split, i).
        num_train: Number of training images.
        num_val: Number of validation images.
        image_size: Side of the square images in pixels.

    Returns:
        `root`, holding images/{train,val}/ and annotations/instances_{train,val}.json.

    Raises:
        DataError: `root` exists, is not empty and is not a complete shapes dataset.
    """
    root = Path(root)
    if _is_complete(root):
        logger.info("shapes dataset found at %s", root)
        return root
    if root.exists() and any(root.iterdir()):
        raise DataError(f"{root} exists but holds no complete shapes dataset; remove it or pick another path")
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(root)
    partial = root.parent / f".{root.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    logger.info("generating shapes dataset at %s (%d train + %d val images, %d px, seed %d)",
                root, num_train, num_val, image_size, seed)
    start = time.perf_counter()
    try:
        _write_split(partial, "train", num_train, seed, image_size)
        _write_split(partial, "val", num_val, seed, image_size)
        if root.is_dir():
            root.rmdir()  # empty (checked above); rename cannot replace a folder on every platform
        try:
            os.replace(partial, root)
        except OSError:
            if not _is_complete(root):  # not a concurrent generator that finished first
                raise
            logger.info("shapes dataset at %s was completed by another process", root)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    logger.info("shapes dataset ready in %.1f s", time.perf_counter() - start)
    return root


def main(argv: list[str] | None = None) -> int:
    """Command line: `python -m detector.data.shapes --out DIR [--seed S ...]`."""
    parser = argparse.ArgumentParser(description="Render the shapes dataset (COCO format) into a folder.")
    parser.add_argument("--out", type=Path, required=True, help="dataset folder to create")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=600)
    parser.add_argument("--num-val", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=256)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    generate_shapes(args.out, seed=args.seed, num_train=args.num_train, num_val=args.num_val,
                    image_size=args.image_size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
