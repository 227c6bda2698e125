"""NMS image by image (postprocess.non_max_suppression) against one batched_nms call for the whole batch.

    python benchmarks/nms_speed.py --model runs/train/weights/best.pt [--data coco128.yaml] [--sizes 320 640]
                                   [--batch 16] [--repeats 5] [--conf 0.001]

The model's decoded outputs of every validation batch are computed once; then both ways run NMS over all of
them, alternated, --repeats times. "one call" is how non_max_suppression worked before: the batch's
candidates in one torchvision batched_nms call, grouped by (image, class). torchvision runs a call of more
than 4,000 box coordinates on the CPU class by class, finding each group's members among all candidates, so
the batch-wide call spent most of its time there. Prints medians, and the share of the one call's detections
(score, class) that image by image keeps too: a call of fewer than 1,000 boxes runs torchvision's other way
(classes apart by an offset added to the coordinates), whose float rounding can flip a box at the IoU threshold.
Image by image, each image's best 999 candidates go first, and all of them (up to 30,000) only when those leave
fewer than max_det; the one call kept the batch's best 30,000, so a crowded image took its batch-mates' places.
"""

from __future__ import annotations

import statistics
import time

import torch
from checkpoint_args import checkpoint_parser
from torchvision.ops import batched_nms

from detector import Model
from detector.data.cards import load_data_card
from detector.data.coco import CocoDataset
from detector.data.loader import build_dataloader
from detector.device import prepare_images, set_threads
from detector.model.postprocess import decode, non_max_suppression

BATCH_CANDIDATES = 30_000  # the one call's cap on (anchor, class) pairs over the whole batch


def one_call(boxes: torch.Tensor, scores: torch.Tensor, conf: float, iou: float = 0.7, max_det: int = 300) -> list:
    """(boxes, scores, classes) per image from one batched_nms call over the batch's best candidates."""
    batch, _, num_classes = scores.shape
    image, anchor, cls = (scores > conf).nonzero(as_tuple=True)
    candidate_scores = scores[image, anchor, cls]
    if len(candidate_scores) > BATCH_CANDIDATES:
        top = candidate_scores.topk(BATCH_CANDIDATES).indices
        image, anchor, cls, candidate_scores = image[top], anchor[top], cls[top], candidate_scores[top]
    candidate_boxes = boxes[image, anchor]
    keep = batched_nms(candidate_boxes, candidate_scores, image * num_classes + cls, iou)
    kept_image = image[keep]
    return [(candidate_boxes[mine], candidate_scores[mine], cls[mine])
            for mine in (keep[kept_image == index][:max_det] for index in range(batch))]


def pairs(scores: torch.Tensor, classes: torch.Tensor) -> set[tuple[float, int]]:
    return set(zip(scores.tolist(), classes.tolist(), strict=True))


def main() -> None:
    parser = checkpoint_parser(__doc__, batch=16, repeats=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[320, 640])
    parser.add_argument("--conf", type=float, default=0.001)
    args = parser.parse_args()
    threads = set_threads(args.threads)
    card = load_data_card(args.data)
    dataset = CocoDataset(card.val_images, card.val_json)
    model = Model(args.model)._fused_model(torch.device("cpu"))
    print(f"{len(dataset)} images, batch {args.batch}, conf {args.conf}, {threads} threads, medians of {args.repeats}")
    print("| imgsz | candidates per image (median) | one call s | image by image s | ratio | detections kept by both |")
    print("|---:|---:|---:|---:|---:|---|")
    for size in args.sizes:
        outputs = []
        loader = build_dataloader(dataset, train=False, image_size=size, batch_size=args.batch, workers=0)
        with torch.no_grad():
            for batch in loader:
                raw = model(prepare_images(batch.images, torch.device("cpu"), False))
                outputs.append(decode([o.float() for o in raw], model.strides, model.reg_max))
        candidates = [int(n) for boxes, scores in outputs for n in (scores > args.conf).sum(dim=(1, 2))]
        times: dict[str, list[float]] = {"one call": [], "per image": []}
        for _ in range(args.repeats):
            start = time.perf_counter()
            before = [one_call(boxes, scores, args.conf) for boxes, scores in outputs]
            times["one call"].append(time.perf_counter() - start)
            start = time.perf_counter()
            after = [non_max_suppression(boxes, scores, conf=args.conf) for boxes, scores in outputs]
            times["per image"].append(time.perf_counter() - start)
        kept = [(pairs(b[1], b[2]), pairs(a.scores, a.classes))
                for old, new in zip(before, after, strict=True) for b, a in zip(old, new, strict=True)]
        same = sum(len(b & a) for b, a in kept) / max(sum(len(b) for b, _ in kept), 1)
        old, new = (statistics.median(times[k]) for k in ("one call", "per image"))
        print(f"| {size} | {statistics.median(candidates):.0f} | {old:.3f} | {new:.3f} | {new / old:.3f} "
              f"| {same:.5f} |")


if __name__ == "__main__":
    main()
