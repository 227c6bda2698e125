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
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from detector.assets import models_dir
from detector.errors import ConfigError
from detector.model.blocks import Backbone, ConvBlock, Head, Neck
from detector.model.yolo11 import build_yolo11

STRIDES = (8, 16, 32)
SCALE_KEYS = {"scale", "depth", "width", "max_channels", "reg_max", "family"}
FAMILIES = ("yolov8", "yolo11")  # yolo11: detector/model/yolo11.py


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
