"""COCO mAP with pycocotools against the original annotation JSON (original category ids)."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


@dataclass
class DetectionMetrics:
    """Validation results. precision/recall are at each class's best-F1 score threshold, IoU 0.5."""

    map50_95: float = 0.0
    map50: float = 0.0
    precision: float = 0.0
    recall: float = 0.0
    per_class_ap: dict[str, float] = field(default_factory=dict)

    @property
    def fitness(self) -> float:
        """The number best.pt is chosen by: mostly mAP50-95, a little mAP50."""
        return 0.1 * self.map50 + 0.9 * self.map50_95

    def as_row(self) -> dict[str, float]:
        return {"metrics/precision": self.precision, "metrics/recall": self.recall,
                "metrics/mAP50": self.map50, "metrics/mAP50-95": self.map50_95}


def load_ground_truth(annotation_json: Path) -> COCO:
    """A COCO object for COCOeval, tolerating files that lack the optional area / iscrowd keys."""
    with open(annotation_json, encoding="utf-8") as file:
        data = json.load(file)
    for annotation in data.get("annotations", []):
        x, y, w, h = annotation["bbox"]
        annotation.setdefault("area", float(w) * float(h))
        annotation.setdefault("iscrowd", 0)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_evaluate(ground_truth: COCO, detections: list[dict], image_ids: list[int],
                  names_by_category: dict[int, str]) -> DetectionMetrics:
    """Run COCOeval (bbox) on `detections` for `image_ids`.

    Args:
        ground_truth: from load_ground_truth.
        detections: COCO results, dicts with image_id, category_id (original id), bbox [x, y, w, h]
            in original image pixels, score.
        image_ids: the images that were evaluated (images without detections count as misses).
        names_by_category: original category id -> class name, for per-class AP.
    """
    if not detections:
        return DetectionMetrics(per_class_ap={name: 0.0 for name in names_by_category.values()})
    with contextlib.redirect_stdout(io.StringIO()):
        results = ground_truth.loadRes(copy.deepcopy(detections))
        evaluator = COCOeval(ground_truth, results, "bbox")
        evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    precision = evaluator.eval["precision"]  # (iou T, recall R, class K, area A, max_dets M), -1 = no gt
    scores = evaluator.eval["scores"]
    category_ids = evaluator.params.catIds
    per_class, best_p, best_r = {}, [], []
    recall_points = np.asarray(evaluator.params.recThrs)
    for k, category_id in enumerate(category_ids):
        curve = precision[:, :, k, 0, -1]
        if (curve > -1).any():
            per_class[names_by_category.get(category_id, str(category_id))] = float(curve[curve > -1].mean())
            p50 = np.clip(curve[0], 0, None)
            f1 = 2 * p50 * recall_points / np.maximum(p50 + recall_points, 1e-9)
            i = int(f1.argmax())
            has_score = scores[0, i, k, 0, -1] > 0
            best_p.append(float(p50[i]) if has_score else 0.0)
            best_r.append(float(recall_points[i]) if has_score else 0.0)
    return DetectionMetrics(
        map50_95=max(float(evaluator.stats[0]), 0.0),
        map50=max(float(evaluator.stats[1]), 0.0),
        precision=float(np.mean(best_p)) if best_p else 0.0,
        recall=float(np.mean(best_r)) if best_r else 0.0,
        per_class_ap=per_class,
    )
