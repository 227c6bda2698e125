"""Anchor points and the distance <-> box conversions shared by the loss and the post-processing.

Every prediction sits on an anchor: the centre of one cell of a feature map of stride s. The head
predicts, per anchor, the distances from that centre to the four sides of its box (left, top, right,
bottom), each as a distribution over `reg_max` bins of one stride each (distribution focal loss).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def make_anchors(sizes: list[tuple[int, int]], strides: tuple[int, ...], *, device: torch.device,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor centres of every feature map, in input pixels, level by level, row-major within a level.

    Args:
        sizes: (height, width) of each feature map.
        strides: input pixels per feature cell of each map.

    Returns:
        points (A, 2) as (x, y) input pixels and strides (A, 1), A = sum of height * width.
    """
    points, per_anchor = [], []
    for (height, width), stride in zip(sizes, strides, strict=True):
        ys = (torch.arange(height, device=device, dtype=dtype) + 0.5) * stride
        xs = (torch.arange(width, device=device, dtype=dtype) + 0.5) * stride
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([grid_x, grid_y], dim=-1).reshape(-1, 2))
        per_anchor.append(torch.full((height * width, 1), float(stride), device=device, dtype=dtype))
    return torch.cat(points), torch.cat(per_anchor)


def expected_distance(logits: torch.Tensor) -> torch.Tensor:
    """Expected bin of each side's distribution: (..., 4, R) logits -> (..., 4) in strides, in [0, R-1].

    In float32 under autocast too: a matmul there would run in bf16, whose 8-bit mantissa puts the
    distances of the loss's boxes on steps of up to 1/16 of a stride.
    """
    bins = torch.arange(logits.shape[-1], device=logits.device, dtype=torch.float32)
    return (F.softmax(logits.float(), dim=-1) * bins).sum(-1)


def distance_to_xyxy(distances: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """(..., 4) distances (left, top, right, bottom) from (..., 2) points -> (..., 4) boxes xyxy."""
    left_top, right_bottom = distances.split(2, dim=-1)
    return torch.cat([points - left_top, points + right_bottom], dim=-1)


def xyxy_to_distance(boxes_xyxy: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """(..., 4) boxes xyxy and (..., 2) points inside them -> (..., 4) distances (left, top, right, bottom)."""
    top_left, bottom_right = boxes_xyxy.split(2, dim=-1)
    return torch.cat([points - top_left, bottom_right - points], dim=-1)


def flatten_outputs(outputs: list[torch.Tensor], reg_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-level head outputs -> one row per anchor.

    Args:
        outputs: per stride, (B, 4 * reg_max + C, H, W).

    Returns:
        distance logits (B, A, 4, reg_max) and class logits (B, A, C), anchors in make_anchors' order.
    """
    batch = outputs[0].shape[0]
    # (B, C', H, W) -> (B, H * W, C'): a view for channels_last outputs, and the cat yields one contiguous
    # (B, A, 4R + C) whose rows are anchors, the layout the per-anchor terms of the loss read fastest.
    flat = torch.cat([o.permute(0, 2, 3, 1).reshape(batch, -1, o.shape[1]) for o in outputs], dim=1)
    distance_logits, class_logits = flat.split([4 * reg_max, flat.shape[-1] - 4 * reg_max], dim=-1)
    return distance_logits.reshape(batch, -1, 4, reg_max), class_logits
