"""COCO mAP against the original annotation JSON (original category ids), with faster-coco-eval: pycocotools'
COCO and COCOeval with the matching and accumulation in C++, the same numbers (tests/test_metrics.py checks them
against pycocotools) in a sixth of the time."""

from __future__ import annotations

import contextlib
import gc
import io
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from faster_coco_eval import COCO
from faster_coco_eval import COCOeval_faster as COCOeval
from torchvision.ops import box_convert, box_iou

from detector.data.coco import relabel
from detector.data.coco_json import load_coco_json


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Python's cyclic garbage collector off for a block that makes tens of thousands of acyclic objects (the COCO
    dicts of a validation pass and its evaluation), so that collections, which walk every object of a training
    process, do not land inside it; reference counting still frees everything. coco128's validation pass at 320
    with 300,000 other objects alive: 1.41 s paused against 1.69 running, medians of 7 (benchmarks/eval_speed.py)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()



CONFUSION_CONF = 0.25  # score a detection needs to enter the confusion matrix (predict's default)
CONFUSION_IOU = 0.45   # IoU at which a detection and a ground-truth box are taken for the same object


@dataclass
class ClassMetrics:
    """One class's row of the validation table: its ground truth in the evaluated images, and its scores."""

    images: int = 0
    instances: int = 0
    precision: float = 0.0
    recall: float = 0.0
    map50: float = 0.0
    map50_95: float = 0.0


@dataclass
class DetectionMetrics(ClassMetrics):
    """Validation results: the row of all classes, and each class's row. precision/recall are at each class's
    best-F1 score threshold, IoU 0.5; the overall figures are means over the classes with ground truth in the
    evaluated images (COCO's convention)."""

    per_class: dict[str, ClassMetrics] = field(default_factory=dict)
    # Class -> COCO's interpolated precision at IoU 0.5 at the recall points 0, 0.01, ..., 1 (PR_curve.png).
    pr50: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    # Counts [predicted, true] (confusion_matrix), and the names of its rows and columns: the classes, background.
    confusion: np.ndarray | None = field(default=None, repr=False)
    confusion_labels: list[str] = field(default_factory=list, repr=False)

    @property
    def fitness(self) -> float:
        """The number best.pt is chosen by: mostly mAP50-95, a little mAP50."""
        return 0.1 * self.map50 + 0.9 * self.map50_95

    def as_row(self) -> dict[str, float]:
        return {"metrics/precision": self.precision, "metrics/recall": self.recall,
                "metrics/mAP50": self.map50, "metrics/mAP50-95": self.map50_95}

    def table(self, per_class: bool = False) -> list[str]:
        """Text lines: a header, the row of all classes and, with per_class, one row per class with ground truth."""
        rows = [("all", self), *(self.per_class.items() if per_class else ())]
        width = max(len(name) for name, _ in rows) + 2
        lines = [f"{'class':<{width}}{'images':>8}{'instances':>10}{'P':>8}{'R':>8}{'mAP50':>8}{'mAP50-95':>10}"]
        lines += [f"{name:<{width}}{m.images:>8}{m.instances:>10}{m.precision:>8.3f}{m.recall:>8.3f}{m.map50:>8.3f}"
                  f"{m.map50_95:>10.3f}" for name, m in rows]
        return lines

    def details(self) -> dict[str, Any]:
        """Plain data for metrics.json: the per-class rows, and the confusion matrix as {true class: {predicted
        class: count}} (counts above zero; true "background" holds the false detections, predicted "background"
        the missed objects)."""
        labels, confusion = self.confusion_labels, {}
        for column, true_name in enumerate(labels):
            counts = {name: int(n) for name, n in zip(labels, self.confusion[:, column], strict=True) if n}
            if counts:
                confusion[true_name] = counts
        return {"per_class": {name: asdict(row) for name, row in self.per_class.items()}, "confusion_matrix": confusion}


def coco_results(boxes_xyxy: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, *, image_id: int,
                 category_ids: Sequence[int]) -> list[dict]:
    """One image's detections as COCO results entries (what COCO.loadRes and coco_evaluate read).

    Validation and Result.to_coco both build their entries here, so val save_json and predict write the same.

    Args:
        boxes_xyxy: float (K, 4) in original image pixels.
        scores: float (K,).
        classes: int (K,) contiguous class indices.
        image_id: the image's id in the ground truth.
        category_ids: the dataset's category id of each class index.

    Returns:
        K dicts (fewer if a score is NaN): image_id, category_id, bbox [x, y, width, height] rounded to 0.001
        pixel, score rounded to 1e-5.
    """
    boxes = boxes_xyxy.float().cpu().reshape(-1, 4)
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)
    # Rounded as tensors: value by value in Python this took 2.5 us per detection, and validation at conf 0.001
    # makes tens of thousands of them per pass.
    xywh = torch.round(xywh.double(), decimals=3).tolist()
    scores = torch.round(scores.double().cpu(), decimals=5).tolist()
    ids = [int(category_id) for category_id in category_ids]
    return [{"image_id": int(image_id), "category_id": ids[c], "bbox": box, "score": s}
            for box, s, c in zip(xywh, scores, classes.cpu().tolist(), strict=True) if not math.isnan(s)]


def load_ground_truth(annotation_json: Path, single_cls: bool = False, classes: list[int] | None = None) -> COCO:
    """A COCO object for COCOeval from a COCO instances JSON (checked by detector.data.coco_json); single_cls and
    classes relabel it as the dataset trained with them sees it (detector.data.coco.relabel). See
    ground_truth_index for what is mended on the way.

    Raises:
        DataError: the file is missing or is not a COCO instances JSON.
    """
    return ground_truth_index(relabel(load_coco_json(Path(annotation_json)), classes, single_cls))


def ground_truth_index(data: dict) -> COCO:
    """A COCO object for COCOeval from a checked, relabelled COCO JSON dict (changed in place).

    Annotations lacking the optional area / iscrowd keys get them, and every annotation is numbered 1..N in file
    order, whatever id the file gives it: COCOeval marks a box no detection matched with id 0 and looks boxes up
    by id, so a file whose ids start at 0 (several converters write them so) had its id-0 box counted as missed
    even when detected, and a repeated id made two boxes one; with perfect detections either scored below 1.0.
    Results never name annotation ids, so the numbering changes nothing else.
    """
    for number, annotation in enumerate(data["annotations"], start=1):
        annotation["id"] = number
        x, y, w, h = annotation["bbox"]
        annotation.setdefault("area", float(w) * float(h))
        annotation.setdefault("iscrowd", 0)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_evaluate(ground_truth: COCO, detections: list[dict], image_ids: list[int],
                  names_by_category: dict[int, str], *, confusion: bool = True) -> DetectionMetrics:
    """Run COCOeval (bbox) on `detections` for `image_ids`.

    Args:
        ground_truth: from load_ground_truth.
        detections: COCO results, dicts with image_id, category_id (original id), bbox [x, y, w, h]
            in original image pixels, score.
        image_ids: the images that were evaluated (images without detections count as misses).
        names_by_category: original category id -> class name, for per-class AP.
        confusion: also count the confusion matrix (the final validation's; each epoch's skips it).
    """
    per_class = _ground_truth_counts(ground_truth, image_ids, names_by_category)
    overall = DetectionMetrics(images=len(image_ids), instances=sum(m.instances for m in per_class.values()),
                               per_class=per_class)
    if confusion:
        overall.confusion = confusion_matrix(ground_truth, detections, image_ids, list(names_by_category))
        overall.confusion_labels = [*names_by_category.values(), "background"]
    if not detections:
        return overall
    with contextlib.redirect_stdout(io.StringIO()), paused_gc():
        results = ground_truth.loadRes([dict(d) for d in detections])  # it adds keys to each (area, id, ...)
        evaluator = COCOeval(ground_truth, results, "bbox")
        evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    precision = evaluator.eval["precision"]  # (iou T, recall R, class K, area A, max_dets M), -1 = no gt
    scores = evaluator.eval["scores"]
    recall_points = np.asarray(evaluator.params.recThrs)
    for k, category_id in enumerate(evaluator.params.catIds):
        curve = precision[:, :, k, 0, -1]
        name = names_by_category.get(category_id, str(category_id))
        if name not in per_class or not (curve > -1).any():
            continue
        p50 = np.clip(curve[0], 0, None)
        f1 = 2 * p50 * recall_points / np.maximum(p50 + recall_points, 1e-9)
        i = int(f1.argmax())
        row = per_class[name]
        if scores[0, i, k, 0, -1] > 0:
            row.precision, row.recall = float(p50[i]), float(recall_points[i])
        row.map50, row.map50_95 = float(p50.mean()), float(curve[curve > -1].mean())
        overall.pr50[name] = p50
    rows = per_class.values()
    overall.map50_95 = max(float(evaluator.stats[0]), 0.0)
    overall.map50 = max(float(evaluator.stats[1]), 0.0)
    overall.precision = float(np.mean([m.precision for m in rows])) if rows else 0.0
    overall.recall = float(np.mean([m.recall for m in rows])) if rows else 0.0
    return overall


def confusion_matrix(ground_truth: COCO, detections: list[dict], image_ids: list[int], category_ids: list[int], *,
                     conf: float = CONFUSION_CONF, iou: float = CONFUSION_IOU) -> np.ndarray:
    """Which class each object was detected as: counts of shape (K + 1, K + 1), [predicted, true].

    In each image the detections scoring at least `conf` and the non-crowd ground-truth boxes are paired one to
    one, whatever their classes, highest IoU first, when their IoU exceeds `iou`. A pair counts at [its
    detection's class, its box's class]; a box left unpaired at [K, its class] (missed, "background"); a
    detection left unpaired at [its class, K] (a false detection). Classes outside `category_ids` (original
    ids; index k of the matrix is category_ids[k]) are left out on both sides.
    """
    index = {category_id: k for k, category_id in enumerate(category_ids)}
    background = len(category_ids)
    matrix = np.zeros((background + 1, background + 1), np.int64)
    kept: dict[int, list[dict]] = {}
    for detection in detections:
        if detection["score"] >= conf and detection["category_id"] in index:
            kept.setdefault(detection["image_id"], []).append(detection)
    for image_id in image_ids:
        truths = [a for a in ground_truth.loadAnns(ground_truth.getAnnIds(imgIds=[image_id], iscrowd=False))
                  if a["category_id"] in index]
        found = kept.get(image_id, [])
        true_classes = [index[a["category_id"]] for a in truths]
        found_classes = [index[d["category_id"]] for d in found]
        overlap = box_iou(_xyxy([d["bbox"] for d in found]), _xyxy([a["bbox"] for a in truths]))
        pairs = sorted((overlap > iou).nonzero().tolist(), key=lambda pair: -overlap[pair[0], pair[1]])
        paired_found, paired_truths = set(), set()
        for d, t in pairs:
            if d not in paired_found and t not in paired_truths:
                paired_found.add(d)
                paired_truths.add(t)
                matrix[found_classes[d], true_classes[t]] += 1
        for t, k in enumerate(true_classes):
            if t not in paired_truths:
                matrix[background, k] += 1
        for d, k in enumerate(found_classes):
            if d not in paired_found:
                matrix[k, background] += 1
    return matrix


def _xyxy(boxes_xywh: list[list[float]]) -> torch.Tensor:
    return box_convert(torch.tensor(boxes_xywh, dtype=torch.float64).reshape(-1, 4), "xywh", "xyxy")


def _ground_truth_counts(ground_truth: COCO, image_ids: list[int],
                         names_by_category: dict[int, str]) -> dict[str, ClassMetrics]:
    """Images and (non-crowd) instances of each class in `image_ids`, for the classes that have any."""
    images: dict[int, set[int]] = {}
    instances: dict[int, int] = {}
    for annotation in ground_truth.loadAnns(ground_truth.getAnnIds(imgIds=list(image_ids), iscrowd=False)):
        category_id = annotation["category_id"]
        images.setdefault(category_id, set()).add(annotation["image_id"])
        instances[category_id] = instances.get(category_id, 0) + 1
    return {names_by_category.get(c, str(c)): ClassMetrics(len(images[c]), instances[c])
            for c in sorted(instances, key=lambda c: (c not in names_by_category, c))}
