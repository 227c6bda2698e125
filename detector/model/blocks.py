"""The building blocks of the YOLOv8-like detector (network.py) that the YOLO11 family (yolo11.py) shares:
convolution blocks, C2f, SPPF, the backbone, the PAN neck and the decoupled head."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


class ConvBlock(nn.Module):
    """Conv2d (no bias) -> BatchNorm -> SiLU; 'same' padding, so the stride alone sets the output size."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-3, momentum=0.03)
        self.act = nn.SiLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """Two 3x3 ConvBlocks, with a residual connection when `shortcut`."""

    def __init__(self, channels: int, shortcut: bool):
        super().__init__()
        self.conv1 = ConvBlock(channels, channels, 3)
        self.conv2 = ConvBlock(channels, channels, 3)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.conv1(x))
        return x + y if self.shortcut else y


class C2f(nn.Module):
    """CSP stage: split a 1x1 projection in two halves, run bottlenecks on one, concat every output.

    Each bottleneck's output joins the concat, so gradients reach every depth directly.
    """

    def __init__(self, in_channels: int, out_channels: int, depth: int, shortcut: bool):
        super().__init__()
        hidden = out_channels // 2
        self.project = ConvBlock(in_channels, 2 * hidden)
        self.blocks = nn.ModuleList(Bottleneck(hidden, shortcut) for _ in range(depth))
        self.fuse = ConvBlock((2 + depth) * hidden, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = list(self.project(x).chunk(2, dim=1))
        for block in self.blocks:
            parts.append(block(parts[-1]))
        return self.fuse(torch.cat(parts, dim=1))


class SPPF(nn.Module):
    """Spatial pyramid pooling (fast): three chained 5x5 max-pools see 5, 9 and 13 px receptive fields."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        hidden = in_channels // 2
        self.reduce = ConvBlock(in_channels, hidden)
        self.pool = nn.MaxPool2d(5, stride=1, padding=2)
        self.fuse = ConvBlock(4 * hidden, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.reduce(x)
        pooled = [x]
        for _ in range(3):
            pooled.append(self.pool(pooled[-1]))
        return self.fuse(torch.cat(pooled, dim=1))


class Backbone(nn.Module):
    """Input (B, 3, H, W) -> features at strides 8, 16, 32 with channels[2], channels[3], channels[4]."""

    def __init__(self, channels: list[int], depths: list[int]):
        super().__init__()
        self.stem = nn.Sequential(ConvBlock(3, channels[0], 3, 2), ConvBlock(channels[0], channels[1], 3, 2),
                                  C2f(channels[1], channels[1], depths[0], shortcut=True))
        self.stage3 = nn.Sequential(ConvBlock(channels[1], channels[2], 3, 2),
                                    C2f(channels[2], channels[2], depths[1], shortcut=True))
        self.stage4 = nn.Sequential(ConvBlock(channels[2], channels[3], 3, 2),
                                    C2f(channels[3], channels[3], depths[1], shortcut=True))
        self.stage5 = nn.Sequential(ConvBlock(channels[3], channels[4], 3, 2),
                                    C2f(channels[4], channels[4], depths[0], shortcut=True),
                                    SPPF(channels[4], channels[4]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p3 = self.stage3(self.stem(x))
        p4 = self.stage4(p3)
        return p3, p4, self.stage5(p4)


class Neck(nn.Module):
    """PAN: fine levels get coarse context top-down, then coarse levels get fine detail bottom-up."""

    def __init__(self, channels: list[int], depth: int, block: Callable[[int, int, bool], nn.Module] | None = None,
                 inputs: tuple[int, int, int] | None = None):
        """Outputs channels[2:] wide. block(c_in, c_out, last): each merge's block (C2f; YOLO11 hands in its C3k2),
        `last` the P5 merge; inputs: the backbone's P3-P5 widths when they are not the outputs' (YOLO11)."""
        super().__init__()
        block = block or (lambda c_in, c_out, last: C2f(c_in, c_out, depth, shortcut=False))
        o3, o4, o5 = channels[2:]
        i3, i4, i5 = inputs or (o3, o4, o5)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.top_down4 = block(i5 + i4, o4, False)
        self.top_down3 = block(o4 + i3, o3, False)
        self.down3 = ConvBlock(o3, o3, 3, 2)
        self.bottom_up4 = block(o3 + o4, o4, False)
        self.down4 = ConvBlock(o4, o4, 3, 2)
        self.bottom_up5 = block(o4 + i5, o5, True)

    def forward(self, p3: torch.Tensor, p4: torch.Tensor, p5: torch.Tensor) -> list[torch.Tensor]:
        t4 = self.top_down4(torch.cat([self.up(p5), p4], dim=1))
        n3 = self.top_down3(torch.cat([self.up(t4), p3], dim=1))
        n4 = self.bottom_up4(torch.cat([self.down3(n3), t4], dim=1))
        n5 = self.bottom_up5(torch.cat([self.down4(n4), p5], dim=1))
        return [n3, n4, n5]


class Head(nn.Module):
    """Decoupled head: per level, box logits (4 * reg_max) and class logits (num_classes), concatenated."""

    def __init__(self, in_channels: list[int], num_classes: int, reg_max: int):
        super().__init__()
        box_channels = max(16, in_channels[0] // 4, 4 * reg_max)
        class_channels = max(in_channels[0], min(num_classes, 100))
        self.box = nn.ModuleList(
            nn.Sequential(ConvBlock(c, box_channels, 3), ConvBlock(box_channels, box_channels, 3),
                          nn.Conv2d(box_channels, 4 * reg_max, 1)) for c in in_channels)
        self.cls = nn.ModuleList(
            nn.Sequential(ConvBlock(c, class_channels, 3), ConvBlock(class_channels, class_channels, 3),
                          nn.Conv2d(class_channels, num_classes, 1)) for c in in_channels)

    def init_biases(self, strides: tuple[int, ...], image_size: int = 640) -> None:
        """Start every distance distribution flat and every class near its prior.

        About 5 objects per 640 px image spread over the cells of a level and the classes: a class
        logit of log(prior) keeps the many background anchors from swamping the first steps.
        """
        for box, cls, stride in zip(self.box, self.cls, strides, strict=True):
            nn.init.constant_(box[-1].bias, 1.0)
            num_classes = cls[-1].out_channels
            nn.init.constant_(cls[-1].bias, math.log(5 / num_classes / (image_size / stride) ** 2))

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.cat([box(x), cls(x)], dim=1) for x, box, cls in zip(features, self.box, self.cls, strict=True)]
