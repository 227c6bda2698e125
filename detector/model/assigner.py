"""Task-aligned assignment: which anchors learn which ground-truth box, and with what soft score.

For each ground-truth box, the candidate anchors are those whose centre lies inside it. Each is ranked
by the alignment metric  t = s^alpha * u^beta, with s the predicted score of the box's class and u
the IoU of the predicted box with it, so an anchor is chosen for being good at both classification and
localisation. The top-k candidates per box become positives; an anchor claimed by several boxes goes
to the one it overlaps most. Positive targets are soft: t normalised per box so that the box's best
anchor gets the box's best IoU (TOOD, Feng et al. 2021).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.ops import complete_box_iou_loss

EPS = 1e-9


@dataclass
class Assignment:
    """Per-anchor training targets.

    Attributes:
        boxes_xyxy: float (B, A, 4) box each anchor regresses to (input pixels; zeros for background).
        scores: float (B, A, C) soft class targets (zeros for background).
        foreground: bool (B, A) anchors assigned to a box.
    """

    boxes_xyxy: torch.Tensor
    scores: torch.Tensor
    foreground: torch.Tensor


def aligned_iou(boxes_a: torch.Tensor, boxes_b: torch.Tensor) -> torch.Tensor:
    """Complete IoU of matching rows, clamped at 0: (K, 4) xyxy and (K, 4) xyxy -> (K,)."""
    return (1 - complete_box_iou_loss(boxes_a, boxes_b, reduction="none")).clamp_(min=0)


class TaskAlignedAssigner:
    """Assigns anchors to ground truth with the task-aligned metric (see the module docstring).

    Args:
        top_k: positives per ground-truth box at most.
        alpha: weight of the classification score in the metric.
        beta: weight of the IoU in the metric.
    """

    def __init__(self, *, top_k: int = 10, alpha: float = 0.5, beta: float = 6.0):
        self.top_k, self.alpha, self.beta = top_k, alpha, beta

    @torch.no_grad()
    def __call__(self, scores: torch.Tensor, boxes_xyxy: torch.Tensor, points: torch.Tensor,
                 gt_classes: torch.Tensor, gt_boxes_xyxy: torch.Tensor, gt_valid: torch.Tensor) -> Assignment:
        """Args:
            scores: (B, A, C) predicted class probabilities in [0, 1].
            boxes_xyxy: (B, A, 4) predicted boxes, input pixels.
            points: (A, 2) anchor centres, input pixels.
            gt_classes: (B, M) int64 class of each ground-truth slot.
            gt_boxes_xyxy: (B, M, 4) ground-truth boxes, input pixels.
            gt_valid: (B, M) bool, False for padding slots (images have different numbers of boxes).
        """
        batch, anchors, _ = scores.shape
        if gt_boxes_xyxy.shape[1] == 0:
            return Assignment(torch.zeros_like(boxes_xyxy), torch.zeros_like(scores),
                              torch.zeros(batch, anchors, dtype=torch.bool, device=scores.device))
        inside = self._inside(points, gt_boxes_xyxy) & gt_valid[:, :, None]  # (B, M, A)
        metric, overlaps = self._metric(scores, boxes_xyxy, gt_classes, gt_boxes_xyxy, inside)
        positive = self._top_k(metric, inside) & inside
        positive, owner = self._resolve(positive, overlaps)
        foreground = positive.any(dim=1)  # (B, A)

        image = torch.arange(batch, device=scores.device)[:, None]
        target_boxes = gt_boxes_xyxy[image, owner]  # (B, A, 4)
        target_classes = gt_classes[image, owner]  # (B, A)
        # Soft targets: per box, t / max(t) * max(IoU) over its positives, read at each anchor.
        metric = metric * positive
        best_metric = metric.amax(dim=-1, keepdim=True)
        best_overlap = (overlaps * positive).amax(dim=-1, keepdim=True)
        quality = (metric * best_overlap / (best_metric + EPS)).amax(dim=1)  # (B, A)
        # One write per anchor into zeros, rather than a one-hot (B, A, C) and two products over it.
        target_scores = torch.zeros_like(scores).scatter_(-1, target_classes[..., None],
                                                          (quality * foreground)[..., None])
        return Assignment(target_boxes, target_scores, foreground)

    @staticmethod
    def _inside(points: torch.Tensor, gt_boxes_xyxy: torch.Tensor) -> torch.Tensor:
        """(B, M, A) whether each anchor centre lies strictly inside each box."""
        x, y = points.T  # (A,) each
        x1, y1, x2, y2 = gt_boxes_xyxy[..., None].unbind(dim=2)  # (B, M, 1) each
        # Four broadcast comparisons straight to bool, no (B, M, A, 4) float margins (the loss's largest tensor).
        return (x > x1 + EPS) & (y > y1 + EPS) & (x < x2 - EPS) & (y < y2 - EPS)

    def _metric(self, scores: torch.Tensor, boxes_xyxy: torch.Tensor, gt_classes: torch.Tensor,
                gt_boxes_xyxy: torch.Tensor, inside: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Alignment metric and IoU (B, M, A), computed only for anchors inside their box (zero elsewhere)."""
        b, m, a = inside.nonzero(as_tuple=True)
        iou = aligned_iou(boxes_xyxy[b, a], gt_boxes_xyxy[b, m]).to(scores.dtype)
        overlaps = torch.zeros(inside.shape, dtype=scores.dtype, device=scores.device)
        overlaps[b, m, a] = iou
        metric = torch.zeros_like(overlaps)
        metric[b, m, a] = scores[b, a, gt_classes[b, m]].pow(self.alpha) * iou.pow(self.beta)
        return metric, overlaps

    def _top_k(self, metric: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
        """(B, M, A) True at each box's top_k anchors by metric, anchors inside the box ranked first.

        Ranking outside anchors below every inside one matters when metrics tie at zero (no overlap
        yet): an arbitrary pick among ties would otherwise spend the k places on anchors outside.
        """
        k = min(self.top_k, metric.shape[-1])
        indices = metric.masked_fill(~inside, -1.0).topk(k, dim=-1).indices
        return torch.zeros_like(metric, dtype=torch.bool).scatter_(-1, indices, True)

    @staticmethod
    def _resolve(positive: torch.Tensor, overlaps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Give an anchor claimed by several boxes to the one it overlaps most.

        Returns the resolved (B, M, A) positives and (B, A) index of each anchor's box (0 if none).
        """
        # The claimant with the largest IoU (inside anchors have IoU >= 0 > -1); for an anchor with one claimant
        # that is the claimant, for an anchor with none it is 0. Keeping each anchor's positive for that box
        # alone resolves every anchor at once.
        best = torch.where(positive, overlaps, -1.0).argmax(dim=1)  # (B, A)
        slots = torch.arange(positive.shape[1], device=positive.device)[None, :, None]
        return positive & (slots == best[:, None]), best
