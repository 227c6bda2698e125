"""The detector: images -> raw per-stride outputs. Plain nn.Modules; scales are depth/width multipliers.

    backbone  stem, then four stride-2 stages of Conv + C2f (CSP) blocks, SPPF at stride 32
    neck      PAN: top-down (upsample + concat + C2f) then bottom-up (stride-2 conv + concat + C2f)
    head      decoupled per level: a box branch (4 sides x reg_max bins, distribution focal loss)
              and a class branch (one logit per class), at strides 8, 16 and 32

The loss lives in detector/loss.py and the decoding / NMS in detector/postprocess.py.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from detector.assets import models_dir
from detector.errors import ConfigError

STRIDES = (8, 16, 32)
SCALE_KEYS = {"scale", "depth", "width", "max_channels", "reg_max", "family"}
FAMILIES = ("yolov8", "yolo11")  # yolo11: detector/model/yolo11.py


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


def scaled_widths(width: float, max_channels: int) -> list[int]:
    """Channels of the five backbone levels: the base 64..1024, capped, times width, multiple of 8."""
    return [max(int(math.ceil(min(c, max_channels) * width / 8) * 8), 8) for c in (64, 128, 256, 512, 1024)]


class Detector(nn.Module):
    """Anchor-free YOLO-style detector.

    Input: float (B, 3, H, W) in [0, 1], H and W multiples of 32.
    Output: list of 3 tensors (B, 4 * reg_max + num_classes, H / s, W / s) for s in `strides`: per cell,
    logits of the distance distributions (left, top, right, bottom; reg_max bins of one stride each),
    then class logits.
    """

    def __init__(self, *, num_classes: int, depth: float = 0.33, width: float = 0.25, max_channels: int = 1024,
                 reg_max: int = 16, scale: str = "n", family: str = "yolov8"):
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"a detector needs at least one class, got num_classes={num_classes}")
        if family not in FAMILIES:
            raise ConfigError(f"invalid value family={family!r}: expected one of {', '.join(FAMILIES)}")
        self.model_args = {"num_classes": num_classes, "depth": depth, "width": width,
                           "max_channels": max_channels, "reg_max": reg_max, "scale": scale}
        if family != "yolov8":  # absent for the default, so checkpoints written before families stay identical
            self.model_args["family"] = family
        self.num_classes, self.reg_max, self.strides = num_classes, reg_max, STRIDES
        channels = scaled_widths(width, max_channels)
        if family == "yolo11":
            from detector.model.yolo11 import build_yolo11  # here: yolo11.py builds on this module's blocks

            self.backbone, self.neck, self.head = build_yolo11(channels, depth, scale, num_classes, reg_max)
        else:
            depths = [max(round(n * depth), 1) for n in (3, 6)]
            self.backbone = Backbone(channels, depths)
            self.neck = Neck(channels, depths[0])
            self.head = Head(channels[2:], num_classes, reg_max)
        self.head.init_biases(self.strides)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.head(self.neck(*self.backbone(images)))

    def blocks(self) -> list[nn.Module]:
        """The blocks `freeze` counts, in data-flow order: the backbone's 10 (YOLOv8's layers 0-9, so freeze=10 is
        the backbone there and here), then the neck's 6 that hold weights."""
        backbone = [*self.backbone.stem, *self.backbone.stage3, *self.backbone.stage4, *self.backbone.stage5]
        neck = self.neck
        return backbone + [neck.top_down4, neck.top_down3, neck.down3, neck.bottom_up4, neck.down4, neck.bottom_up5]

    def freeze(self, count: int) -> int:
        """Stops the first `count` blocks' weights from training (their BatchNorm statistics still follow the data,
        as in YOLOv8); returns how many parameters that holds still."""
        blocks = self.blocks()
        if count > len(blocks):
            raise ConfigError(f"invalid value freeze={count}: this model has {len(blocks)} blocks to freeze "
                              f"(10: the backbone, {len(blocks)}: backbone and neck)")
        frozen = [p for block in blocks[:count] for p in block.parameters()]
        for parameter in frozen:
            parameter.requires_grad_(False)
        return sum(p.numel() for p in frozen)

    def fuse(self) -> Detector:
        """Fold each BatchNorm into its convolution (inference only: the model must be in eval mode)."""
        for module in self.modules():
            if isinstance(module, ConvBlock) and isinstance(module.bn, nn.BatchNorm2d):
                module.conv = nn.utils.fusion.fuse_conv_bn_eval(module.conv, module.bn)
                module.bn = nn.Identity()
        return self

    def fused_copy(self, channels_last: bool = False) -> Detector:
        """An eval-mode copy with BatchNorm folded into the convolutions (fuse), optionally NHWC; self is untouched."""
        fused = copy.deepcopy(self).eval().fuse()
        return fused.to(memory_format=torch.channels_last) if channels_last else fused


def load_scale(spec: str | Path) -> dict[str, Any]:
    """Scale multipliers (and the family, yolov8 unless named) from a name (n..x, yolo11n..yolo11x) or a YAML path.

    Raises:
        ConfigError: unknown scale, unreadable file, or unknown keys.
    """
    text = str(spec)
    shipped = models_dir() / f"{text}.yaml"
    if text.endswith(".yaml") and not Path(text).is_file():  # model=yolo11n.yaml: the shipped yolo11n
        shipped = models_dir() / text
    path = shipped if shipped.is_file() else Path(text)
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in models_dir().glob("*.yaml")))
        yolo = re.fullmatch(r"yolo(?:v\d+|\d+)([nsmlx])(?:\.yaml)?", Path(text).name)
        hint = f" ({text} is an Ultralytics model: model={yolo.group(1)} is this package's, built like YOLOv8" \
            f"{yolo.group(1)})" if yolo and yolo.group(1) in known.split(", ") else ""
        raise ConfigError(f"invalid value model={text!r}: expected a scale ({known}), a model YAML path "
                          f"or a .pt checkpoint{hint}")
    try:
        scale = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"model file {path} is not readable YAML: {err}") from err
    if not isinstance(scale, dict) or not {"depth", "width"} <= set(scale) or set(scale) - SCALE_KEYS:
        raise ConfigError(f"model file {path} must hold depth and width (and optionally "
                          f"{', '.join(sorted(SCALE_KEYS - {'depth', 'width'}))}), got {scale!r}")
    scale.setdefault("scale", path.stem)
    return scale


def build_model(spec: str | Path, num_classes: int) -> Detector:
    """A freshly initialised detector of scale `spec` (name or YAML path) for `num_classes` classes."""
    return Detector(num_classes=num_classes, **load_scale(spec))


def model_info(model: Detector, image_size: int = 640) -> dict[str, float]:
    """Parameters and GFLOPs (2 FLOPs per multiply-add) of one forward pass at image_size x image_size."""
    from torch.utils.flop_counter import FlopCounterMode

    parameter = next(model.parameters())
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, image_size, image_size, device=parameter.device, dtype=parameter.dtype))
    model.train(was_training)
    return {"parameters": float(sum(p.numel() for p in model.parameters())),
            "gflops": counter.get_total_flops() / 1e9}
