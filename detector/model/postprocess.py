"""Raw outputs -> boxes and scores -> per-image detections after non-maximum suppression -> original pixels."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.ops import batched_nms

from detector.model.boxes import distance_to_xyxy, expected_distance, flatten_outputs, make_anchors

MAX_CANDIDATES = 30_000  # (anchor, class) pairs of an image NMS looks at, highest scores first
# Tried first: greedy NMS keeps a box or not for the boxes scored above it only, so the survivors of an
# image's best candidates are the first survivors of all of them, and when they are max_det the rest
# change nothing. Under 1,000 boxes torchvision's CPU batched_nms also takes its faster path (one call).
FIRST_CANDIDATES = 999


@dataclass
class Detections:
    """Detections of one image, best first.

    Attributes:
        boxes_xyxy: float (K, 4) in the model's input pixels.
        scores: float (K,) class probability.
        classes: int64 (K,) contiguous class index.
    """

    boxes_xyxy: torch.Tensor
    scores: torch.Tensor
    classes: torch.Tensor


def decode(outputs: list[torch.Tensor], strides: tuple[int, ...], reg_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Detector outputs -> boxes_xyxy (B, A, 4) in input pixels and class probabilities (B, A, C)."""
    sizes = [tuple(o.shape[-2:]) for o in outputs]
    points, anchor_strides = make_anchors(sizes, strides, device=outputs[0].device)
    distance_logits, class_logits = flatten_outputs([o.float() for o in outputs], reg_max)
    boxes = distance_to_xyxy(expected_distance(distance_logits) * anchor_strides, points)
    return boxes, class_logits.sigmoid()


def non_max_suppression(boxes_xyxy: torch.Tensor, scores: torch.Tensor, *, conf: float = 0.25, iou: float = 0.7,
                        max_det: int = 300, classes: list[int] | None = None) -> list[Detections]:
    """Class-wise NMS (torchvision's batched_nms) of each image of a batch, over its MAX_CANDIDATES best
    (anchor, class) pairs: an image's detections do not depend on the images batched with it.

    An anchor may yield one detection per class whose score passes `conf` (several labels per box
    raise recall at a low conf, as COCO evaluation wants).

    Args:
        boxes_xyxy: (B, A, 4).
        scores: (B, A, C) probabilities.
        conf: lowest score kept.
        iou: boxes of the same image and class overlapping more than this with a better one are dropped.
        max_det: most detections kept per image.
        classes: class indices to detect (None: all); the others never become candidates, so they take
            none of the max_det places.

    Returns:
        One Detections per image.
    """
    passing = scores > conf
    if classes is not None:
        wanted = torch.zeros(scores.shape[2], dtype=torch.bool, device=scores.device)
        wanted[list(classes)] = True
        passing &= wanted
    results = []
    for index in range(len(scores)):
        # One call per image: torchvision runs a large call group by group, finding each group's candidates among
        # all of them, and one call for the batch spent most of its time there (benchmarks/nms_speed.py).
        anchor, cls = passing[index].nonzero(as_tuple=True)
        candidate_scores = scores[index, anchor, cls].float()
        order = candidate_scores.argsort(descending=True)[:MAX_CANDIDATES]  # best first
        anchor, cls, candidate_scores = anchor[order], cls[order], candidate_scores[order]
        candidate_boxes = boxes_xyxy[index, anchor].float()
        for count in (FIRST_CANDIDATES, len(order)):
            keep = batched_nms(candidate_boxes[:count], candidate_scores[:count], cls[:count], iou)[:max_det]
            if len(keep) == max_det or count >= len(order):
                break
        results.append(Detections(candidate_boxes[keep], candidate_scores[keep], cls[keep]))
    return results


def letterbox_to_original(boxes_xyxy: torch.Tensor, scale: float | torch.Tensor,
                          pad: tuple[float, float] | torch.Tensor,
                          original_size: tuple[int, int] | torch.Tensor) -> torch.Tensor:
    """Undo the letterbox: boxes in the model's input pixels -> the original image's pixels, clipped to it.

    Validation and predict both map their detections back through this one function, so the boxes they report
    for the same input are the same.

    Args:
        boxes_xyxy: float (K, 4) in input pixels, any device.
        scale: letterbox scale, input = original * scale + pad (a decode at 1/r of the file's size folded in).
        pad: letterbox (pad_x, pad_y) in input pixels.
        original_size: (height, width) of the original image.

    Returns:
        float32 (K, 4) on the CPU, x in [0, width], y in [0, height].
    """
    pad_xy = torch.as_tensor(pad, dtype=torch.float32).reshape(2)
    boxes = (boxes_xyxy.float().cpu() - pad_xy.repeat(2)) / torch.as_tensor(scale, dtype=torch.float32)
    height, width = (int(side) for side in original_size)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    return boxes
