"""Wide ResNets (pre-activation), parameter-compatible with mdistiller's
`mdistiller/models/cifar/wrn.py`: wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2 (WRN-depth-width).

Feature points (32x32 input):
    inter  = output of block3's first BasicBlock (block3.layer[0]), before any final BN
                                                                    [B, 64*k, 8, 8]
    penult = ReLU(bn1(output of block3)), the network's final BN/ReLU [B, 64*k, 8, 8]
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdpipe.models.base import CAM_INIT_HE_FAN_OUT, KDModel, PreactPoint, init_like_mdistiller, module_output_copy
from kdpipe.models.registry import register_model


class WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus shortcut.
    [B, Cin, H, W] -> [B, Cout, H/s, W/s]."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        # mdistiller names it convShortcut; kept for state-dict compatibility.
        self.convShortcut: nn.Module | None = None
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu1(self.bn1(x))
        # When the width changes, the shortcut projects the *activated* input (as in
        # mdistiller and the original WRN code); otherwise it is the raw input.
        shortcut = x if self.convShortcut is None else self.convShortcut(activated)
        out = self.relu2(self.bn2(self.conv1(activated)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        return shortcut + out


class NetworkBlock(nn.Module):
    """One stage: `num_blocks` WideBasicBlocks in `self.layer` (mdistiller's nesting)."""

    def __init__(self, num_blocks: int, in_planes: int, out_planes: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
                for i in range(num_blocks)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(KDModel):
    """WRN-depth-k: 3x3 stem, three stages of (depth-4)/6 blocks (widths 16k, 32k, 64k,
    strides 1/2/2), final BN-ReLU, global pooling, linear classifier."""

    # CAT-KD mdistiller/models/cifar/wrn.py WideResNet_test: conv_test is created before
    # the normal_(0, sqrt(2 / (k * k * out_channels))) loop.
    cam_head_init = CAM_INIT_HE_FAN_OUT

    def __init__(self, depth: int, widen_factor: int, num_classes: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        blocks_per_stage = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(blocks_per_stage, widths[0], widths[1], 1, drop_rate)
        self.block2 = NetworkBlock(blocks_per_stage, widths[1], widths[2], 2, drop_rate)
        self.block3 = NetworkBlock(blocks_per_stage, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(widths[3], num_classes)
        self.inter_channels = widths[3]
        self.penult_channels = widths[3]

        init_like_mdistiller(self, linear="zero_bias")

    def forward_inter(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(self.conv1(x)))
        return self.block3.layer[0](x)

    def forward_penult(self, inter: torch.Tensor) -> torch.Tensor:
        x = self.block3.layer[1:](inter)
        return self.relu(self.bn1(x))

    def stage_points(self) -> list[tuple[nn.Module, bool]]:
        # mdistiller wrn.py feats[1:]: the outputs of block1, block2, block3 (before bn1 + ReLU)
        return [(block.layer[-1], False) for block in (self.block1, self.block2, self.block3)]

    def stem_point(self) -> tuple[nn.Module, bool]:
        # mdistiller wrn.py feats[0]: conv1(x)
        return (self.conv1, False)

    def preact_points(self) -> list[PreactPoint]:
        # mdistiller wrn.py preact_feats[1:]: block2.layer[0].bn1(f1), block3.layer[0].bn1(f2),
        # bn1(f3): the BN that the next ReLU follows, applied to each stage's output
        bns = [cast(nn.Module, block.layer[0].bn1) for block in (self.block2, self.block3)] + [self.bn1]
        return [PreactPoint(bn, module_output_copy, bn=bn) for bn in bns]

    def linear_head(self) -> nn.Linear:
        return self.fc


@register_model("wrn_16_1")
def wrn_16_1(num_classes: int = 100) -> WideResNet:
    return WideResNet(16, 1, num_classes)


@register_model("wrn_16_2")
def wrn_16_2(num_classes: int = 100) -> WideResNet:
    return WideResNet(16, 2, num_classes)


@register_model("wrn_40_1")
def wrn_40_1(num_classes: int = 100) -> WideResNet:
    return WideResNet(40, 1, num_classes)


@register_model("wrn_40_2")
def wrn_40_2(num_classes: int = 100) -> WideResNet:
    return WideResNet(40, 2, num_classes)
