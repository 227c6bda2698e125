"""Prediction over photo files: decoded smaller (as training and validation decode them) against decoded whole.

    python benchmarks/decode_speed.py --model runs/train/weights/best.pt [--data coco128.yaml] [--images 32]
                                      [--sizes 320 640] [--photo 4032x3024] [--batch 8] [--repeats 3]

predict() decodes a JPEG whose longest side is at least twice imgsz at 1/2, 1/4 or 1/8 of each side (the
decoder's frequency-domain shrink; detector/data/coco.py: reduction_for), then letterboxes it. The "whole"
variant decodes every file at full size and letterboxes it from there, as predict did before. The photos are the
dataset's first images resized to --photo (a phone camera's 12 MP by default) and written as JPEG (quality 90) to
a temporary folder. Both variants run predict() over the same files in one process, alternated within each
repeat; the table gives medians of the wall time, how far the detections of the two variants differ (conf 0.25),
and the COCO mAP50-95 of each (one pass at conf 0.001) against the dataset's boxes scaled to the photos.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import cv2
import numpy as np
import torch
from checkpoint_args import checkpoint_parser
from torchvision.ops import box_iou

from detector import Model
from detector.data.cards import load_data_card
from detector.data.coco import CocoDataset
from detector.device import set_threads
from detector.evaluate.metrics import coco_evaluate, load_ground_truth
from detector.inference.results import coco_detections


def write_photos(dataset: CocoDataset, count: int, folder: Path, width: int, height: int) -> tuple[list[Path], Path]:
    """The first `count` images resized to width x height as JPEG files, and a COCO JSON of their boxes, scaled."""
    photos, scales = [], {}
    for path, image_id, (orig_height, orig_width) in zip(dataset.paths[:count], dataset.image_ids,
                                                         dataset.sizes, strict=False):
        photo = folder / f"{image_id:012d}.jpg"
        cv2.imwrite(str(photo), cv2.resize(cv2.imread(str(path)), (width, height), interpolation=cv2.INTER_CUBIC),
                    [cv2.IMWRITE_JPEG_QUALITY, 90])
        photos.append(photo)
        scales[image_id] = (width / orig_width, height / orig_height)
    data = json.loads(Path(dataset.annotation_json).read_text())
    data["images"] = [{**i, "width": width, "height": height} for i in data["images"] if i["id"] in scales]
    data["annotations"] = [{**a, "bbox": [v * scales[a["image_id"]][k % 2] for k, v in enumerate(a["bbox"])],
                            "area": a["bbox"][2] * a["bbox"][3] * scales[a["image_id"]][0] * scales[a["image_id"]][1]}
                           for a in data["annotations"] if a["image_id"] in scales]
    truth = folder / "truth.json"
    truth.write_text(json.dumps(data))
    return photos, truth


def run(model: Model, photos: list[Path], image_size: int, batch: int, whole: bool, conf: float = 0.25
        ) -> tuple[float, list]:
    """(seconds, results) of one predict() pass; `whole` decodes every file at full size."""
    with mock.patch("detector.inference.sources.reduction_for", lambda *args: 1) if whole else contextlib.nullcontext():
        start = time.perf_counter()
        results = model.predict(photos, imgsz=image_size, batch=batch, conf=conf)
        return time.perf_counter() - start, results


def map50_95(model: Model, photos: list[Path], truth: Path, dataset: CocoDataset, image_size: int, batch: int,
             whole: bool) -> float:
    """COCO mAP50-95 of one pass at conf 0.001 against the boxes scaled to the photos."""
    _, results = run(model, photos, image_size, batch, whole, conf=0.001)
    names = dict(zip(dataset.category_ids, dataset.names, strict=True))
    image_ids = [int(photo.stem) for photo in photos]
    return coco_evaluate(load_ground_truth(truth), coco_detections(results), image_ids, names,
                         confusion=False).map50_95


def box_difference(results: list, others: list) -> tuple[float, float]:
    """(mean share of detections both variants find at IoU >= 0.5 with the same class, median IoU of those)."""
    shares, ious = [], []
    for ours, theirs in zip(results, others, strict=True):
        if not len(ours.scores) and not len(theirs.scores):
            continue
        iou = box_iou(torch.from_numpy(ours.boxes_xyxy), torch.from_numpy(theirs.boxes_xyxy)).numpy()
        iou[ours.classes[:, None] != theirs.classes[None, :]] = 0
        best = iou.max(axis=1) if iou.size else np.zeros(len(ours.scores))
        shares.append(float((best >= 0.5).sum()) / max(len(ours.scores), len(theirs.scores)))
        ious += best[best >= 0.5].tolist()
    return statistics.mean(shares), statistics.median(ious) if ious else float("nan")


def main() -> None:
    parser = checkpoint_parser(__doc__, batch=8, repeats=3)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--sizes", type=int, nargs="+", default=[320, 640])
    parser.add_argument("--photo", default="4032x3024", help="WIDTHxHEIGHT of the photos written")
    args = parser.parse_args()
    threads = set_threads(args.threads)
    card = load_data_card(args.data)
    dataset = CocoDataset(card.val_images, card.val_json)
    width, height = (int(v) for v in args.photo.lower().split("x"))
    model = Model(args.model)
    with tempfile.TemporaryDirectory() as folder:
        photos, truth = write_photos(dataset, args.images, Path(folder), width, height)
        print(f"{len(photos)} photos of {width} x {height}, batch {args.batch}, {threads} threads, "
              f"medians of {args.repeats} alternated passes")
        print("| imgsz | whole decode s | smaller decode s | smaller / whole | detections found by both | median IoU "
              "| mAP50-95 whole -> smaller |")
        print("|---:|---:|---:|---:|---:|---:|---|")
        for image_size in args.sizes:
            run(model, photos[:args.batch], image_size, args.batch, whole=False)  # warm-up
            times = {True: [], False: []}
            results = {}
            for _ in range(args.repeats):
                for whole in (True, False):
                    seconds, results[whole] = run(model, photos, image_size, args.batch, whole)
                    times[whole].append(seconds)
            whole_s, small_s = statistics.median(times[True]), statistics.median(times[False])
            share, iou = box_difference(results[False], results[True])
            scores = [map50_95(model, photos, truth, dataset, image_size, args.batch, whole) for whole in (True, False)]
            print(f"| {image_size} | {whole_s:.2f} | {small_s:.2f} | {small_s / whole_s:.3f} | {share:.3f} "
                  f"| {iou:.3f} | {scores[0]:.4f} -> {scores[1]:.4f} |")


if __name__ == "__main__":
    main()
