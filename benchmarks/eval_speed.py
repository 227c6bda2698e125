"""COCO evaluation: faster-coco-eval (what validation runs) against pycocotools' COCOeval, on one pass's detections.

    python benchmarks/eval_speed.py --model runs/train/weights/best.pt [--data coco128.yaml] [--imgsz 320]
                                    [--batch 16] [--repeats 5]

One validation pass (the checkpoint's fused model, conf 0.001, as val runs it) gives the detections; then the
two evaluators score them, alternated, --repeats times each: ours is detector.evaluate.metrics.coco_evaluate without the
confusion matrix (as each epoch's validation runs it); pycocotools' is loadRes, COCOeval evaluate, accumulate and
summarize, as coco_evaluate ran before (both with the garbage collector paused, as validation runs). Prints the
medians, the ratio, the pass's own time and both mAP50-95.

Then the garbage collector: the pass and our evaluation with it paused (detector.runs.paused_gc, as validation
runs them) and running, alternated, while --heap small objects stay alive (a training process holds hundreds
of thousands: the model, the dataset's records, the optimizer's state), since a full collection walks them all.
"""

from __future__ import annotations

import contextlib
import copy
import io
import statistics
import time
from unittest import mock

import torch
from checkpoint_args import checkpoint_parser
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detector import Model
from detector.data.cards import load_data_card
from detector.data.coco import CocoDataset
from detector.data.loader import build_dataloader
from detector.device import set_threads
from detector.evaluate.metrics import coco_evaluate, load_ground_truth, paused_gc
from detector.evaluate.validate import predict_loader


def pycocotools_map(truth: COCO, detections: list[dict], image_ids: list[int]) -> float:
    with contextlib.redirect_stdout(io.StringIO()), paused_gc():
        evaluator = COCOeval(truth, truth.loadRes(copy.deepcopy(detections)), "bbox")
        evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[0])


def main() -> None:
    parser = checkpoint_parser(__doc__, batch=16, repeats=5)
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--heap", type=int, default=300_000, help="small objects kept alive for the gc comparison")
    args = parser.parse_args()
    set_threads(args.threads)
    card = load_data_card(args.data)
    dataset = CocoDataset(card.val_images, card.val_json)
    model = Model(args.model)._fused_model(torch.device("cpu"))
    loader = build_dataloader(dataset, train=False, image_size=args.imgsz, batch_size=args.batch, workers=0)
    start = time.perf_counter()
    detections, image_ids = predict_loader(model, loader, device=torch.device("cpu"),
                                           category_ids=dataset.category_ids, conf=0.001, iou=0.7, max_det=300,
                                           progress=False)
    pass_s = time.perf_counter() - start
    names = dict(zip(dataset.category_ids, dataset.names, strict=True))
    with contextlib.redirect_stdout(io.StringIO()):
        theirs_truth = COCO(str(dataset.annotation_json))
    ours_truth = load_ground_truth(dataset.annotation_json)
    times: dict[str, list[float]] = {"pycocotools": [], "faster-coco-eval": []}
    scores = {}
    for _ in range(args.repeats):
        start = time.perf_counter()
        scores["pycocotools"] = pycocotools_map(theirs_truth, detections, image_ids)
        times["pycocotools"].append(time.perf_counter() - start)
        start = time.perf_counter()
        scores["faster-coco-eval"] = coco_evaluate(ours_truth, detections, image_ids, names, confusion=False).map50_95
        times["faster-coco-eval"].append(time.perf_counter() - start)
    theirs, ours = (statistics.median(times[k]) for k in ("pycocotools", "faster-coco-eval"))
    print(f"{len(image_ids)} images at {args.imgsz}, {len(detections)} detections; the pass itself took {pass_s:.2f} s")
    print(f"evaluation, medians of {args.repeats}: pycocotools {theirs:.3f} s, faster-coco-eval {ours:.3f} s, "
          f"ratio {ours / theirs:.3f}; pass + evaluation {(pass_s + ours) / (pass_s + theirs):.3f}")
    print(f"mAP50-95: pycocotools {scores['pycocotools']:.6f}, faster-coco-eval {scores['faster-coco-eval']:.6f}")

    heap = [{"id": i, "box": [float(i)] * 4} for i in range(args.heap)]  # noqa: F841  (kept alive on purpose)
    gc_times: dict[tuple[str, bool], list[float]] = {}
    for _ in range(args.repeats):
        for paused in (True, False):
            with contextlib.ExitStack() as stack:
                if not paused:
                    for module in ("detector.train.engine", "detector.evaluate.metrics"):
                        stack.enter_context(mock.patch(f"{module}.paused_gc", contextlib.nullcontext))
                loader = build_dataloader(dataset, train=False, image_size=args.imgsz, batch_size=args.batch,
                                          workers=0)
                start = time.perf_counter()
                found, ids = predict_loader(model, loader, device=torch.device("cpu"),
                                            category_ids=dataset.category_ids, conf=0.001, iou=0.7, max_det=300,
                                            progress=False)
                middle = time.perf_counter()
                coco_evaluate(ours_truth, found, ids, names, confusion=False)
                gc_times.setdefault(("pass", paused), []).append(middle - start)
                gc_times.setdefault(("evaluation", paused), []).append(time.perf_counter() - middle)
    for part in ("pass", "evaluation"):
        on, off = (gc_times[part, paused] for paused in (False, True))
        print(f"{part} with {args.heap} objects alive, medians of {args.repeats}: gc paused "
              f"{statistics.median(off):.3f} s (range {min(off):.3f}-{max(off):.3f}), gc running "
              f"{statistics.median(on):.3f} s "
              f"(range {min(on):.3f}-{max(on):.3f})")


if __name__ == "__main__":
    main()
