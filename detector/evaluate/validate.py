"""Validation: a letterboxed loader through the model, the detections back in original pixels as COCO results,
scored with COCO mAP. Trainer.evaluate (the EMA weights, each epoch) and Model.val (a checkpoint) both run `evaluate`.

The detections are mapped back and written exactly as predict's (postprocess.letterbox_to_original,
metrics.coco_results), so val save_json and predict give the same entries for the same input.
"""

from __future__ import annotations

import gc
import logging
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from faster_coco_eval import COCO
from torch import nn
from tqdm import tqdm

from detector.autobatch.memory import is_out_of_memory
from detector.data.coco import CocoDataset
from detector.device import autocast, device_ops, prepare_images
from detector.evaluate.metrics import (
    CONFUSION_CONF,
    CONFUSION_IOU,
    DetectionMetrics,
    coco_evaluate,
    coco_results,
    paused_gc,
)
from detector.evaluate.plots import plot_batch, plot_confusion_matrix, plot_pr_curves
from detector.model.postprocess import Detections, decode, letterbox_to_original, non_max_suppression

logger = logging.getLogger(__name__)


@dataclass
class Validation:
    """One validation's scores and the detections they were computed from.

    Attributes:
        metrics: COCO mAP, precision and recall, overall and per class.
        detections: COCO results entries (image_id, category_id, bbox [x, y, w, h] original pixels, score).
        image_ids: the images evaluated, in loader order.
    """

    metrics: DetectionMetrics
    detections: list[dict]
    image_ids: list[int]


def evaluate(model: nn.Module, loader, ground_truth: COCO, *, dataset: CocoDataset, device: torch.device,
             conf: float, iou: float, max_det: int, amp_dtype: torch.dtype | None = None,
             channels_last: bool = False, progress: bool = True, final: bool = True,
             plot_dir: Path | None = None) -> Validation:
    """Run the validation pass, score it against `ground_truth` and log the table.

    Args:
        model: the detector as it should run (Detector.fused_copy(): Conv+BN folded, the same outputs up to float
            rounding and faster); put in eval mode.
        loader: validation DataLoader of `dataset` (letterboxed Batches).
        ground_truth: from metrics.load_ground_truth, relabelled as `dataset` is.
        dataset: the images validated: their category ids, class names and the classes= setting.
        device, amp_dtype, channels_last: where and how the model runs.
        conf, iou, max_det: NMS settings.
        progress: a progress bar on a terminal.
        final: the per-class table and the confusion matrix (Model.val, a run's last validation); False for the
            overall row only (each epoch's).
        plot_dir: with final, write PR_curve.png, confusion_matrix.png and the first batch's pictures there.
    """
    detections, image_ids = predict_loader(model, loader, device=device, category_ids=dataset.category_ids,
                                           conf=conf, iou=iou, max_det=max_det, amp_dtype=amp_dtype,
                                           channels_last=channels_last, progress=progress, classes=dataset.classes)
    names = dict(zip(dataset.category_ids, dataset.names, strict=True))
    metrics = coco_evaluate(ground_truth, detections, image_ids, names, confusion=final)
    for line in metrics.table(per_class=final):
        logger.info(line)
    if final and plot_dir is not None:
        plot_validation(model, loader, metrics, dataset.names, plot_dir, device=device, amp_dtype=amp_dtype,
                        channels_last=channels_last)
    return Validation(metrics, detections, image_ids)


@torch.no_grad()
def predict_loader(model: nn.Module, loader, *, device: torch.device, category_ids: list[int],
                   conf: float, iou: float, max_det: int, amp_dtype: torch.dtype | None = None,
                   channels_last: bool = False, progress: bool = True, classes: list[int] | None = None
                   ) -> tuple[list[dict], list[int]]:
    """Run the model over a validation loader; returns COCO detections (original pixels) and image ids, of
    `classes` only when given (the classes= setting)."""
    model.eval()
    detections, image_ids = [], []
    # The bar erases itself when done: only on a terminal; in a file it would run into the metrics table.
    bar = tqdm(loader, desc="validating", disable=not progress or not sys.stderr.isatty(), leave=False,
               dynamic_ncols=True)
    with paused_gc():
        for batch in bar:
            results = detect_in_parts(model, batch.images, device=device, conf=conf, iou=iou, max_det=max_det,
                                      amp_dtype=amp_dtype, channels_last=channels_last, classes=classes)
            for i, found in enumerate(results):
                image_id = int(batch.image_ids[i])
                image_ids.append(image_id)
                boxes = letterbox_to_original(found.boxes_xyxy, batch.scales[i], batch.pads[i], batch.orig_sizes[i])
                detections.extend(coco_results(boxes, found.scores, found.classes, image_id=image_id,
                                               category_ids=category_ids))
    return detections, image_ids


def detect_in_parts(model: nn.Module, images: torch.Tensor, **settings) -> list[Detections]:
    """detect(), and when the device runs out of memory, the two halves of the batch in turn (recursively): each
    image's detections do not depend on its batch-mates, so the results are the same, only later."""
    try:
        return detect(model, images, **settings)
    except Exception as err:
        if not is_out_of_memory(err) or len(images) == 1:
            raise
        traceback.clear_frames(err.__traceback__)  # the frames hold the failed batch's activations
    gc.collect()  # outside the except block, so the memory can be freed
    device_ops(settings["device"]).empty_cache()
    logger.warning("validation ran out of memory with %d images; going on in halves", len(images))
    half = len(images) // 2
    return detect_in_parts(model, images[:half], **settings) + detect_in_parts(model, images[half:], **settings)


def detect(model: nn.Module, images: torch.Tensor, *, device: torch.device, conf: float, iou: float, max_det: int,
           amp_dtype: torch.dtype | None = None, channels_last: bool = False,
           classes: list[int] | None = None) -> list[Detections]:
    """A uint8 (B, 3, H, W) RGB batch's detections, in its input pixels."""
    inputs = prepare_images(images, device, channels_last)
    with autocast(device, amp_dtype):
        outputs = model(inputs)
    boxes, scores = decode([o.float() for o in outputs], model.strides, model.reg_max)
    return non_max_suppression(boxes, scores, conf=conf, iou=iou, max_det=max_det, classes=classes)


@torch.no_grad()
def plot_validation(model: nn.Module, loader, metrics: DetectionMetrics, names: list[str], run_dir: Path, *,
                    device: torch.device, amp_dtype: torch.dtype | None = None, channels_last: bool = False,
                    conf: float = 0.25, iou: float = 0.7) -> None:
    """PR_curve.png and confusion_matrix.png from `metrics`, and val_batch0_labels.jpg / val_batch0_pred.jpg:
    the first validation batch with its ground truth, and with the model's detections scoring at least `conf`
    (predict's default), to check the model by eye."""
    plot_pr_curves(metrics.pr50, run_dir / "PR_curve.png")
    if metrics.confusion is not None:
        plot_confusion_matrix(metrics.confusion, metrics.confusion_labels, run_dir / "confusion_matrix.png",
                              title=f"confusion matrix: scores >= {CONFUSION_CONF}, IoU > {CONFUSION_IOU}")
    model.eval()
    batch = next(iter(loader))
    results = detect(model, batch.images, device=device, conf=conf, iou=iou, max_det=300, amp_dtype=amp_dtype,
                     channels_last=channels_last)
    rows = [torch.cat([torch.full((len(r.scores), 1), float(i)), r.classes[:, None].float().cpu(),
                       r.boxes_xyxy.float().cpu()], dim=1) for i, r in enumerate(results)]
    plot_batch(batch.images, batch.targets, names, run_dir / "val_batch0_labels.jpg")
    plot_batch(batch.images, torch.cat(rows), names, run_dir / "val_batch0_pred.jpg",
               scores=torch.cat([r.scores.float().cpu() for r in results]))
