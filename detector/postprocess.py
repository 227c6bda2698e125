"""Raw outputs -> boxes and scores -> per-image detections after non-maximum suppression."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.ops import batched_nms

from detector.boxes import distance_to_xyxy, expected_distance, flatten_outputs, make_anchors

MAX_CANDIDATES = 30_000  # (anchor, class) pairs per batch kept for NMS, highest scores first


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
    """Class-wise NMS of each image of a batch (torchvision's batched_nms), over the batch's MAX_CANDIDATES best
    (anchor, class) pairs.

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
    batch, _, num_classes = scores.shape
    passing = scores > conf
    if classes is not None:
        wanted = torch.zeros(num_classes, dtype=torch.bool, device=scores.device)
        wanted[list(classes)] = True
        passing &= wanted
    image, anchor, cls = passing.nonzero(as_tuple=True)
    candidate_scores = scores[image, anchor, cls]
    if len(candidate_scores) > MAX_CANDIDATES:
        top = candidate_scores.topk(MAX_CANDIDATES).indices
        image, anchor, cls, candidate_scores = image[top], anchor[top], cls[top], candidate_scores[top]
    candidate_boxes = boxes_xyxy[image, anchor].float()
    results = []
    for index in range(batch):
        # One call per image: torchvision runs a large call group by group, finding each group's candidates among
        # all of them, and one call for the batch spent most of its time there (validation at conf 0.001 image by
        # image: 0.63x the NMS time at 320, 0.72x at 640, from the same candidates; benchmarks/nms_speed.py).
        mine = (image == index).nonzero().squeeze(1)
        keep = mine[batched_nms(candidate_boxes[mine], candidate_scores[mine].float(), cls[mine], iou)[:max_det]]
        results.append(Detections(candidate_boxes[keep], candidate_scores[keep], cls[keep]))  # best first
    return results
