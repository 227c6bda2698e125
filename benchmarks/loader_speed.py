"""CPU milliseconds per image of the data pipeline: training (mosaic + augmentation) and validation (letterbox).

    python benchmarks/loader_speed.py [--data coco128.yaml] [--sizes 320 640] [--passes 5]

Loads the data card's splits as training does (the training images decoded once and kept in RAM when
cache=auto keeps them; validation images read from disk), in this process (workers=0) with OpenCV and
torch on one thread: the figure is what one image costs a core wherever it is loaded, collate included.
Each pass is one epoch of each split (training with a new augmentation seed); the median pass is printed.
To compare two versions of the code, run it from a checkout of each: PYTHONPATH=<checkout> python ...
"""

from __future__ import annotations

import argparse
import statistics
import time

import cv2
import torch

from detector.data.cards import load_data_card
from detector.data.coco import CocoDataset
from detector.data.loader import build_dataloader, set_epoch
from detector.device import keep_freed_memory


def ms_per_image(dataset: CocoDataset, *, train: bool, image_size: int, passes: int) -> float:
    """Median over `passes` epochs of milliseconds per image through a workers=0 loader at batch 16."""
    loader = build_dataloader(dataset, train=train, image_size=image_size, batch_size=16, workers=0)
    results = []
    for epoch in range(passes + 1):
        set_epoch(loader, epoch)
        start = time.process_time()
        count = sum(len(batch) for batch in loader)
        if epoch:  # the first pass warms caches (file system, albumentations, allocator)
            results.append(1e3 * (time.process_time() - start) / count)
    return statistics.median(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="coco128.yaml")
    parser.add_argument("--sizes", type=int, nargs="+", default=[320, 640])
    parser.add_argument("--passes", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    keep_freed_memory()  # as training does: freed blocks are reused, not faulted in again
    card = load_data_card(args.data)
    val = CocoDataset(card.val_images, card.val_json)
    print(f"{args.data}, batch 16, one core, median of {args.passes} epochs")
    print(f"{'imgsz':>6} {'train ms/image':>15} {'val ms/image':>12}")
    for size in args.sizes:
        train = CocoDataset(card.train_images, card.train_json, cache="auto", image_size=size)
        train_ms = ms_per_image(train, train=True, image_size=size, passes=args.passes)
        val_ms = ms_per_image(val, train=False, image_size=size, passes=args.passes)
        print(f"{size:>6} {train_ms:>15.2f} {val_ms:>12.2f}", flush=True)


if __name__ == "__main__":
    main()
