"""Rectangles against squares: validation and prediction time, and validation's COCO mAP.

    python benchmarks/rect_speed.py --model runs/train/weights/best.pt [--data coco128.yaml] [--sizes 320 640]
                                    [--batch 16] [--repeats 3]

Validation pads each image only to the multiples of 32 that hold it and batches images of one rectangle
(DetectionDataset.batch_by_shape); prediction letterboxes each frame to its own rectangle and runs a
batch of mixed shapes as one forward per shape (detector/predict.py). The square variants give every input S x S (in the
same batches). Validation runs the checkpoint's Conv+BN-fused model through predict_loader (reading, letterbox,
forward, NMS) as val does, each pass after a garbage collection; prediction runs predict() over the val images
(files) and over 16:9 crops of them (arrays, as video frames come) at conf 0.25. The variants alternate within
each repeat and the table gives medians; mAP comes from one pass of each.
"""

from __future__ import annotations

import gc
import statistics
import time

import cv2
import torch
from checkpoint_args import checkpoint_parser

from detector import Model
from detector.data.cards import load_data_card
from detector.data.coco import CocoDataset
from detector.data.loader import build_dataloader
from detector.device import set_threads
from detector.evaluate.metrics import coco_evaluate, load_ground_truth
from detector.evaluate.validate import predict_loader
from detector.inference.predict import TorchForward, predict


def validate(model, dataset: CocoDataset, image_size: int, batch: int, rect: bool) -> tuple[float, list, list, float]:
    """(seconds, detections, image ids, input pixels / square pixels) of one validation pass over `dataset`."""
    loader = build_dataloader(dataset, train=False, image_size=image_size, batch_size=batch, workers=0)
    if not rect:
        loader.dataset.shapes = None
    shapes = loader.dataset.shapes or [(image_size, image_size)] * len(dataset)
    pixels = sum(h * w for h, w in shapes) / (image_size * image_size * len(dataset))
    start = time.perf_counter()
    detections, image_ids = predict_loader(model, loader, device=torch.device("cpu"),
                                           category_ids=dataset.category_ids, conf=0.001, iou=0.7, max_det=300)
    return time.perf_counter() - start, detections, image_ids, pixels


def sixteen_by_nine(paths: list) -> list:
    """Centre crops of the images at 16:9 (BGR arrays), the shape of most video frames."""
    frames = []
    for path in paths:
        image = cv2.imread(str(path))
        height, width = image.shape[:2]
        crop_height = min(height, width * 9 // 16)
        crop_width = crop_height * 16 // 9
        top, left = (height - crop_height) // 2, (width - crop_width) // 2
        frames.append(image[top:top + crop_height, left:left + crop_width])
    return frames


def main() -> None:
    parser = checkpoint_parser(__doc__, batch=16, repeats=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[320, 640])
    args = parser.parse_args()
    threads = set_threads(args.threads)
    checkpoint = Model(args.model)
    model = checkpoint.detector.fused_copy().eval()
    forward = TorchForward(model, torch.device("cpu"))
    card = load_data_card(args.data)
    dataset = CocoDataset(card.val_images, card.val_json)
    truth = load_ground_truth(dataset.annotation_json)
    names = dict(zip(dataset.category_ids, dataset.names, strict=True))
    files = sorted(p for p in card.val_images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    sources = {"val": None, f"predict {len(files)} files": files, "predict 16:9 frames": sixteen_by_nine(files)}
    print(f"{args.data} val images, batch {args.batch}, {threads} threads, medians of {args.repeats} passes")
    print("| imgsz | pass | inputs | seconds | rect / square | mAP50-95 | mAP50 |")
    print("|---:|---|---|---:|---:|---:|---:|")
    for size in args.sizes:
        for name, source in sources.items():
            times: dict[bool, list[float]] = {False: [], True: []}
            results = {}
            for _ in range(args.repeats):
                for rect in (False, True):
                    results.pop(rect, None)
                    gc.collect()  # what earlier passes left would otherwise be collected within this one's time
                    if source is None:
                        seconds, *results[rect] = validate(model, dataset, size, args.batch, rect)
                    else:
                        start = time.perf_counter()
                        list(predict(forward, source, names=checkpoint.names, category_ids=dataset.category_ids,
                                     image_size=size, batch=args.batch, rect=rect))
                        seconds = time.perf_counter() - start
                    times[rect].append(seconds)
            square_time = statistics.median(times[False])
            for rect in (False, True):
                seconds = statistics.median(times[rect])
                scores = "| - | - |"
                if source is None:
                    detections, image_ids, pixels = results[rect]
                    metrics = coco_evaluate(truth, detections, image_ids, names)
                    scores = f"| {metrics.map50_95:.4f} | {metrics.map50:.4f} |"
                print(f"| {size} | {name} | {'rectangles' if rect else 'squares'} | {seconds:.2f} "
                      f"| {seconds / square_time:.3f} {scores}", flush=True)


if __name__ == "__main__":
    main()
