"""The YOLO11 family: the same PAN topology and box branch as network.py's YOLOv8-like detector, other blocks.

    backbone  stem and four stride-2 stages of Conv + C3k2 blocks; SPPF, then C2PSA (attention) at stride 32
    neck      PAN as in blocks.Neck, with C3k2 blocks (residual bottlenecks)
    head      blocks.Head's box branch; the class branch runs a depthwise 3x3 before each pointwise conv

Built from YOLO11's published structure (layer types, channels, repeats), so a peer checkpoint of the family maps
onto it tensor for tensor (detector/model/peer.py). Scales n..x: cfg/models/yolo11*.yaml.
"""

from __future__ import annotations

import torch
from torch import nn

from detector.model.blocks import SPPF, Bottleneck, C2f, ConvBlock, Head, Neck

# YOLO11 runs every C3k2 on C3k blocks at these scales, and only the marked ones at the smaller scales.
LARGE_SCALES = ("m", "l", "x")


class ConvNorm(ConvBlock):
    """ConvBlock with channel groups (groups=channels: depthwise) and an optional SiLU.

    A ConvBlock subclass, so Detector.fuse folds its BatchNorm as well.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, *, groups: int = 1,
                 activation: bool = True):
        super().__init__(in_channels, out_channels, kernel_size)
        if groups > 1:
            self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, 1, kernel_size // 2, groups=groups,
                                  bias=False)
        if not activation:
            self.act = nn.Identity()


class NarrowBottleneck(Bottleneck):
    """Bottleneck whose first 3x3 halves the channels and whose second restores them (C3k2's plain block)."""

    def __init__(self, channels: int):
        nn.Module.__init__(self)  # Bottleneck's forward, other widths
        self.conv1 = ConvBlock(channels, channels // 2, 3)
        self.conv2 = ConvBlock(channels // 2, channels, 3)
        self.shortcut = True


class CSPBlock(nn.Module):
    """C3k: two 1x1 branches of half the channels, residual bottlenecks on one, concat, 1x1 back."""

    def __init__(self, channels: int, depth: int = 2):
        super().__init__()
        hidden = channels // 2
        self.main = ConvBlock(channels, hidden)
        self.skip = ConvBlock(channels, hidden)
        self.fuse = ConvBlock(2 * hidden, channels)
        self.blocks = nn.Sequential(*(Bottleneck(hidden, shortcut=True) for _ in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([self.blocks(self.main(x)), self.skip(x)], dim=1))


class C3k2(C2f):
    """C2f's split-and-concat (its forward) over `depth` residual blocks: NarrowBottlenecks, or CSPBlocks (C3k)."""

    def __init__(self, in_channels: int, out_channels: int, depth: int, *, csp_blocks: bool,
                 hidden_ratio: float = 0.5):
        nn.Module.__init__(self)  # C2f's layout with other widths and blocks; C2f.__init__ would build its own
        hidden = int(out_channels * hidden_ratio)
        self.project = ConvBlock(in_channels, 2 * hidden)
        self.blocks = nn.ModuleList(CSPBlock(hidden) if csp_blocks else NarrowBottleneck(hidden)
                                    for _ in range(depth))
        self.fuse = ConvBlock((2 + depth) * hidden, out_channels)


class Attention(nn.Module):
    """Multi-head self-attention over the H * W cells, plus a depthwise 3x3 positional term on the values.

    Input and output (B, C, H, W). Per head: keys and queries of head_channels / 2, values of head_channels.
    """

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_channels = channels // num_heads
        self.key_channels = self.head_channels // 2
        self.scale = self.key_channels ** -0.5
        self.qkv = ConvNorm(channels, channels + 2 * self.key_channels * num_heads, activation=False)
        self.proj = ConvNorm(channels, channels, activation=False)
        self.position = ConvNorm(channels, channels, 3, groups=channels, activation=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        # reshape, not view: under channels_last the conv output is not contiguous in this order.
        qkv = self.qkv(x).reshape(B, self.num_heads, 2 * self.key_channels + self.head_channels, H * W)
        q, k, v = qkv.split([self.key_channels, self.key_channels, self.head_channels], dim=2)
        weights = ((q.transpose(-2, -1) @ k) * self.scale).softmax(dim=-1)  # (B, heads, HW, HW)
        attended = (v @ weights.transpose(-2, -1)).reshape(B, C, H, W)
        return self.proj(attended + self.position(v.reshape(B, C, H, W)))


class AttentionBlock(nn.Module):
    """PSABlock: attention, then a 1x1 feed-forward of twice the channels, each with a residual connection."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        self.attention = Attention(channels, num_heads)
        self.feed_forward = nn.Sequential(ConvBlock(channels, 2 * channels),
                                          ConvNorm(2 * channels, channels, activation=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(x)
        return x + self.feed_forward(x)


class C2PSA(nn.Module):
    """Split a 1x1 projection in two halves, attention blocks on one (a head per 64 channels), concat, 1x1 back."""

    def __init__(self, channels: int, depth: int):
        super().__init__()
        hidden = channels // 2
        self.project = ConvBlock(channels, 2 * hidden)
        self.blocks = nn.Sequential(*(AttentionBlock(hidden, max(hidden // 64, 1)) for _ in range(depth)))
        self.fuse = ConvBlock(2 * hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept, attended = self.project(x).chunk(2, dim=1)
        return self.fuse(torch.cat([kept, self.blocks(attended)], dim=1))


class Backbone(nn.Module):
    """Input (B, 3, H, W) -> features at strides 8, 16, 32 with channels[3], channels[3], channels[4].

    The attribute names are blocks.Backbone's, so Detector.blocks counts YOLO11's layers 0-10 (freeze=10 leaves
    C2PSA training, as YOLO11's freeze=10 does).
    """

    def __init__(self, channels: list[int], depth: int, large: bool):
        super().__init__()
        c0, c1, c2, c3, c4 = channels
        self.stem = nn.Sequential(ConvBlock(3, c0, 3, 2), ConvBlock(c0, c1, 3, 2),
                                  C3k2(c1, c2, depth, csp_blocks=large, hidden_ratio=0.25))
        self.stage3 = nn.Sequential(ConvBlock(c2, c2, 3, 2), C3k2(c2, c3, depth, csp_blocks=large, hidden_ratio=0.25))
        self.stage4 = nn.Sequential(ConvBlock(c3, c3, 3, 2), C3k2(c3, c3, depth, csp_blocks=True))
        self.stage5 = nn.Sequential(ConvBlock(c3, c4, 3, 2), C3k2(c4, c4, depth, csp_blocks=True), SPPF(c4, c4),
                                    C2PSA(c4, depth))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p3 = self.stage3(self.stem(x))
        p4 = self.stage4(p3)
        return p3, p4, self.stage5(p4)


class DepthwiseClassHead(Head):
    """blocks.Head with YOLO11's lighter class branch: (depthwise 3x3, pointwise 1x1) twice, then the logits."""

    def __init__(self, in_channels: list[int], num_classes: int, reg_max: int):
        super().__init__(in_channels, num_classes, reg_max)
        hidden = max(in_channels[0], min(num_classes, 100))
        self.cls = nn.ModuleList(
            nn.Sequential(nn.Sequential(ConvNorm(c, c, 3, groups=c), ConvBlock(c, hidden)),
                          nn.Sequential(ConvNorm(hidden, hidden, 3, groups=hidden), ConvBlock(hidden, hidden)),
                          nn.Conv2d(hidden, num_classes, 1)) for c in in_channels)


def build_yolo11(channels: list[int], depth: float, scale: str, num_classes: int, reg_max: int
                 ) -> tuple[Backbone, Neck, DepthwiseClassHead]:
    """YOLO11's backbone, neck and head for the five level widths of network.scaled_widths.

    Args:
        channels: widths of the strides 2..32 levels (YOLO11's 64..1024, scaled and capped).
        depth: multiplier on YOLO11's two blocks per C3k2 and C2PSA.
        scale: the scale's name; m, l and x use C3k blocks in every C3k2, as YOLO11 does.
    """
    repeats, large = max(round(2 * depth), 1), scale in LARGE_SCALES
    # YOLOv8's PAN with C3k2 merges (the P5 merge with C3k blocks at every scale); YOLO11's backbone gives P3 at the
    # P4 width.
    neck = Neck(channels, repeats, block=lambda c_in, c_out, last: C3k2(c_in, c_out, repeats, csp_blocks=last or large),
                inputs=(channels[3], channels[3], channels[4]))
    return Backbone(channels, repeats, large), neck, DepthwiseClassHead(channels[2:], num_classes, reg_max)
