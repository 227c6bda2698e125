"""Validation in batches letterboxed to their images' rectangle against square batches: time and COCO mAP.

    python benchmarks/val_speed.py --model runs/train/weights/best.pt [--data coco128.yaml] [--sizes 320 640]
                                   [--batch 16] [--repeats 3]

Validation orders the images by aspect ratio and pads each batch only to the multiples of 32 that hold its
images (DetectionDataset.batch_by_aspect); the square variant clears those shapes, so every batch is S x S as
before. Both run the checkpoint's Conv+BN-fused model through predict_loader (reading, letterbox, forward,
NMS), as val does; the variants alternate within each repeat and the table gives medians. mAP comes from
one pass of each.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from detector import Model
from detector.data.cards import load_data_card
from detector.data.coco import CocoDataset
from detector.data.loader import build_dataloader
from detector.engine import predict_loader
from detector.metrics import coco_evaluate, load_ground_truth
from detector.runs import set_threads


def run(model, dataset: CocoDataset, image_size: int, batch: int, rect: bool) -> tuple[float, list, list, float]:
    """(seconds, detections, image ids, padded pixels / image pixels) of one pass over `dataset`."""
    loader = build_dataloader(dataset, train=False, image_size=image_size, batch_size=batch, workers=0)
    if not rect:
        loader.dataset.shapes = None
    shapes = loader.dataset.shapes or [(image_size, image_size)] * len(dataset)
    pixels = sum(h * w for h, w in shapes) / (image_size * image_size * len(dataset))
    start = time.perf_counter()
    detections, image_ids = predict_loader(model, loader, device=torch.device("cpu"),
                                           category_ids=dataset.category_ids, conf=0.001, iou=0.7, max_det=300)
    return time.perf_counter() - start, detections, image_ids, pixels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a trained checkpoint (.pt)")
    parser.add_argument("--data", default="coco128.yaml")
    parser.add_argument("--sizes", type=int, nargs="+", default=[320, 640])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    threads = set_threads(0)
    model = Model(args.model).detector.fused_copy().eval()
    card = load_data_card(args.data)
    dataset = CocoDataset(card.val_images, card.val_json)
    truth = load_ground_truth(dataset.annotation_json)
    names = dict(zip(dataset.category_ids, dataset.names, strict=True))
    print(f"{args.data} val, {len(dataset)} images, batch {args.batch}, {threads} threads, "
          f"medians of {args.repeats} passes")
    print("| imgsz | batches | input pixels / square | seconds | rect / square | mAP50-95 | mAP50 |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        times: dict[bool, list[float]] = {False: [], True: []}
        results = {}
        for _ in range(args.repeats):
            for rect in (False, True):
                seconds, detections, image_ids, pixels = run(model, dataset, size, args.batch, rect)
                times[rect].append(seconds)
                results[rect] = (detections, image_ids, pixels)
        square_time = statistics.median(times[False])
        for rect in (False, True):
            detections, image_ids, pixels = results[rect]
            metrics = coco_evaluate(truth, detections, image_ids, names)
            seconds = statistics.median(times[rect])
            print(f"| {size} | {'rectangles' if rect else 'squares'} | {pixels:.3f} | {seconds:.2f} "
                  f"| {seconds / square_time:.3f} | {metrics.map50_95:.4f} | {metrics.map50:.4f} |", flush=True)


if __name__ == "__main__":
    main()
