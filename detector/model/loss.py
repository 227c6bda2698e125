"""Predictions + targets -> the training loss: task-aligned assignment, then CIoU, DFL and BCE terms.

    loss_cls  BCE of every anchor's class logits against the assigner's soft scores (background -> 0)
    loss_box  1 - CIoU of each foreground anchor's decoded box with its assigned box
    loss_dfl  distribution focal loss: the two bins around each true side distance get its mass

Each term is summed over anchors, weighted by the soft target scores, and divided by the sum of those
scores, so it is a per-image-batch mean that does not depend on how many objects the batch holds.

Under DDP (world_size > 1) the sum of the scores is taken over every rank's batch (by the `all_reduce`
the training layer hands in: this module runs no collective of its own), and the loss is
scaled so that DistributedDataParallel's average of the ranks' gradients equals the gradient one
process would compute on the union of their batches.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import complete_box_iou_loss

from detector.model.assigner import TaskAlignedAssigner
from detector.model.boxes import distance_to_xyxy, expected_distance, flatten_outputs, make_anchors, xyxy_to_distance


def pad_targets(targets: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of all images -> one padded slot table per image.

    Args:
        targets: (N, 6) rows [batch_index, class, x1, y1, x2, y2].
        batch_size: B.

    Returns:
        classes int64 (B, M), boxes_xyxy (B, M, 4) and valid bool (B, M), M = most boxes of one image.
    """
    device = targets.device
    image = targets[:, 0].long()
    counts = torch.bincount(image, minlength=batch_size)
    slots = int(counts.max()) if len(targets) else 0
    order = torch.argsort(image, stable=True)
    image, rows = image[order], targets[order]
    first = torch.cumsum(counts, 0) - counts  # row index where each image's boxes start
    slot = torch.arange(len(rows), device=device) - first[image]
    classes = torch.zeros(batch_size, slots, dtype=torch.long, device=device)
    boxes = torch.zeros(batch_size, slots, 4, dtype=torch.float32, device=device)
    valid = torch.zeros(batch_size, slots, dtype=torch.bool, device=device)
    classes[image, slot] = rows[:, 1].long()
    boxes[image, slot] = rows[:, 2:6].float()
    valid[image, slot] = True
    return classes, boxes, valid


def distribution_focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy towards the two bins around a continuous target, split by distance to each.

    Args:
        logits: (K, 4, R) distance logits.
        target: (K, 4) distances in bins, in [0, R - 1).

    Returns:
        (K,) loss per anchor, mean over the 4 sides.
    """
    bins = logits.shape[-1]
    left = target.long()
    left_weight = (left + 1) - target
    flat = logits.reshape(-1, bins)
    loss_left = F.cross_entropy(flat, left.reshape(-1), reduction="none").view_as(target)
    loss_right = F.cross_entropy(flat, (left + 1).reshape(-1), reduction="none").view_as(target)
    return (loss_left * left_weight + loss_right * (1 - left_weight)).mean(dim=-1)


class DetectionLoss(nn.Module):
    """The training loss of Detector outputs (see the module docstring).

    Args:
        num_classes: C.
        strides: input pixels per cell of each output level.
        reg_max: bins per side distance.
        box_gain, cls_gain, dfl_gain: weights of the three terms.
        world_size: ranks of a DDP run whose batches form one global batch (1: a single process).
        all_reduce: sums a tensor over the ranks in place (with world_size > 1).
    """

    def __init__(self, *, num_classes: int, strides: tuple[int, ...], reg_max: int, box_gain: float = 7.5,
                 cls_gain: float = 0.5, dfl_gain: float = 1.5, world_size: int = 1,
                 all_reduce: Callable[[torch.Tensor], object] | None = None):
        super().__init__()
        if world_size > 1 and all_reduce is None:
            raise ValueError("DetectionLoss with world_size > 1 needs the all_reduce that sums over the ranks")
        self.world_size, self.all_reduce = world_size, all_reduce
        self.num_classes, self.strides, self.reg_max = num_classes, tuple(strides), reg_max
        self.gains = {"loss_box": box_gain, "loss_cls": cls_gain, "loss_dfl": dfl_gain}
        self.assigner = TaskAlignedAssigner()
        self._anchors: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def anchors(self, outputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Anchor points (A, 2) and strides (A, 1) for these output sizes (cached per size and device)."""
        sizes = [tuple(o.shape[-2:]) for o in outputs]
        key = (*sizes, outputs[0].device)
        if key not in self._anchors:
            self._anchors[key] = make_anchors(sizes, self.strides, device=outputs[0].device)
        return self._anchors[key]

    def forward(self, outputs: list[torch.Tensor], targets: torch.Tensor,
                batch_size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Args:
            outputs: per level, (B, 4 * reg_max + C, H / s, W / s) from Detector.
            targets: (N, 6) rows [batch_index, class, x1, y1, x2, y2] in input pixels.
            batch_size: B (the images, including those without boxes).

        Returns:
            The loss to backpropagate, the weighted sum of the terms times B (so micro-batches accumulate
            like one large batch), and the detached weighted terms (loss_box, loss_cls, loss_dfl).
        """
        points, strides = self.anchors(outputs)
        distance_logits, class_logits = flatten_outputs([o.float() for o in outputs], self.reg_max)
        boxes = distance_to_xyxy(expected_distance(distance_logits) * strides, points)  # (B, A, 4) pixels
        gt_classes, gt_boxes, gt_valid = pad_targets(targets, batch_size)
        assigned = self.assigner(class_logits.detach().sigmoid(), boxes.detach(), points, gt_classes, gt_boxes,
                                 gt_valid)
        score_sum = assigned.scores.sum()
        if self.all_reduce is not None:
            self.all_reduce(score_sum)  # the normalizer of the global batch
        score_sum = score_sum.clamp(min=1.0)
        terms = {"loss_cls": F.binary_cross_entropy_with_logits(class_logits, assigned.scores,
                                                                reduction="sum") / score_sum}
        foreground = assigned.foreground
        weight = assigned.scores.sum(dim=-1)[foreground]  # (K,)
        target_boxes = assigned.boxes_xyxy[foreground]
        ciou_loss = complete_box_iou_loss(boxes[foreground], target_boxes, reduction="none")  # 1 - CIoU
        terms["loss_box"] = (ciou_loss * weight).sum() / score_sum
        anchor_index = foreground.nonzero()[:, 1]
        target_bins = xyxy_to_distance(target_boxes, points[anchor_index]) / strides[anchor_index]
        target_bins = target_bins.clamp(0, self.reg_max - 1 - 0.01)
        dfl = distribution_focal_loss(distance_logits[foreground], target_bins)
        terms["loss_dfl"] = (dfl * weight).sum() / score_sum
        # Each rank's terms are its share of the global batch's: times world_size, an estimate of the whole.
        # The global batch is batch_size * world_size images, and DDP divides the summed gradients by
        # world_size: hence world_size squared.
        items = {name: (terms[name] * gain * self.world_size).detach() for name, gain in self.gains.items()}
        loss = sum(terms[name] * gain for name, gain in self.gains.items()) * batch_size * self.world_size**2
        return loss, items

    def rank_local(self) -> DetectionLoss:
        """This loss for one rank on its own (no collective): what AutoBatch's probe steps run, since ranks may
        take different numbers of them."""
        local = copy.copy(self)
        local.world_size, local.all_reduce = 1, None
        return local
