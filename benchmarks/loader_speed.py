"""Images per second of the data pipeline (decode + augment + collate) on coco8, in one process.

    python benchmarks/loader_speed.py [--passes 5] [--sizes 320 640]

Reads coco8 from $DETECTOR_DATASETS (default ../shared/datasets). Each pass loads every image of the
train split (4 images; a mosaic decodes 4 each) and of the val split, in batches of 4, workers=0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from detector.data.coco import CocoDataset
from detector.data.loader import build_dataloader, set_epoch

REPO = Path(__file__).resolve().parents[1]


def images_per_second(dataset: CocoDataset, *, train: bool, image_size: int, passes: int) -> float:
    """Median over `passes` of images/s through a workers=0 loader (each pass one epoch, new seed)."""
    loader = build_dataloader(dataset, train=train, image_size=image_size, batch_size=4, workers=0)
    rates = []
    for epoch in range(passes + 1):
        set_epoch(loader, epoch)
        start = time.perf_counter()
        count = sum(len(batch) for batch in loader)
        if epoch:  # the first pass warms caches (file system, albumentations, cv2 threads)
            rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[320, 640])
    args = parser.parse_args()
    torch.set_num_threads(2)
    root = Path(os.environ.get("DETECTOR_DATASETS", REPO.parent / "shared" / "datasets")) / "coco8"
    train = CocoDataset(root / "images" / "train", root / "annotations" / "instances_train.json")
    val = CocoDataset(root / "images" / "val", root / "annotations" / "instances_val.json")
    print(f"{'imgsz':>6} {'train (mosaic) img/s':>21} {'val (letterbox) img/s':>22}")
    for size in args.sizes:
        train_rate = images_per_second(train, train=True, image_size=size, passes=args.passes)
        val_rate = images_per_second(val, train=False, image_size=size, passes=args.passes)
        print(f"{size:>6} {train_rate:>21.1f} {val_rate:>22.1f}")


if __name__ == "__main__":
    main()
