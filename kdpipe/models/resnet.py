"""CIFAR ResNets (v1, three stages), parameter-compatible with mdistiller's
`mdistiller/models/cifar/resnet.py`: resnet8/14/20/32/44/56/110 (widths 16-16-32-64) and
resnet8x4/resnet32x4 (widths 32-64-128-256).

Feature points (32x32 input):
    inter  = output of layer3[0], the first block of the last stage  [B, W3, 8, 8]
    penult = output of layer3 (already ReLU'd, no extra BN)           [B, W3, 8, 8]
with W3 = 64 (resnetN) or 256 (resnetNx4).
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdpipe.models.base import CAM_INIT_HE_FAN_OUT, KDModel, PreactPoint, init_like_mdistiller
from kdpipe.models.registry import register_model


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus shortcut, then ReLU. [B, Cin, H, W] -> [B, planes, H/s, W/s]."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        # Attribute names and order follow mdistiller so state-dict keys (and their order) match.
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class CifarResNet(KDModel):
    """3x3 stem (stride 1) and three stages of `blocks_per_stage` BasicBlocks each, strides
    1/2/2. depth = 6 * blocks_per_stage + 2."""

    # CAT-KD mdistiller/models/cifar/resnet.py ResNet_test: conv_test is created before
    # the kaiming_normal_(fan_out) loop.
    cam_head_init = CAM_INIT_HE_FAN_OUT

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        blocks_per_stage = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_stage(widths[0], widths[1], blocks_per_stage, stride=1)
        self.layer2 = self._make_stage(widths[1], widths[2], blocks_per_stage, stride=2)
        self.layer3 = self._make_stage(widths[2], widths[3], blocks_per_stage, stride=2)
        self.fc = nn.Linear(widths[3], num_classes)
        self.inter_channels = widths[3]
        self.penult_channels = widths[3]

        init_like_mdistiller(self)

    @staticmethod
    def _make_stage(in_planes: int, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes) for _ in range(num_blocks - 1)]
        return nn.Sequential(*blocks)

    def forward_inter(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.layer3[0](x)

    def forward_penult(self, inter: torch.Tensor) -> torch.Tensor:
        return self.layer3[1:](inter)

    def stage_points(self) -> list[tuple[nn.Module, bool]]:
        # mdistiller resnet.py feats[1:]: the outputs of layer1, layer2, layer3 (post-ReLU)
        return [(stage[-1], False) for stage in (self.layer1, self.layer2, self.layer3)]

    def stem_point(self) -> tuple[nn.Module, bool]:
        # mdistiller resnet.py feats[0]: relu(bn1(conv1(x)))
        return (self.bn1, True)

    def preact_points(self) -> list[PreactPoint]:
        # mdistiller resnet.py preact_feats[1:]: the last block's bn2 output plus its shortcut,
        # before the block's final ReLU
        stages = (self.layer1, self.layer2, self.layer3)
        return [PreactPoint(s[-1], _residual_sum, ("bn2", "downsample"), bn=cast(nn.Module, s[-1].bn2)) for s in stages]

    def linear_head(self) -> nn.Linear:
        return self.fc


def _residual_sum(block, x, output, captured) -> torch.Tensor:
    """bn2(...) + shortcut(x) of a BasicBlock (the input itself without a downsample)."""
    return captured["bn2"] + captured.get("downsample", x)


_THIN = (16, 16, 32, 64)
_X4 = (32, 64, 128, 256)


@register_model("resnet8")
def resnet8(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(8, _THIN, num_classes)


@register_model("resnet14")
def resnet14(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(14, _THIN, num_classes)


@register_model("resnet20")
def resnet20(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(20, _THIN, num_classes)


@register_model("resnet32")
def resnet32(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(32, _THIN, num_classes)


@register_model("resnet44")
def resnet44(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(44, _THIN, num_classes)


@register_model("resnet56")
def resnet56(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(56, _THIN, num_classes)


@register_model("resnet110")
def resnet110(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(110, _THIN, num_classes)


@register_model("resnet8x4")
def resnet8x4(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(8, _X4, num_classes)


@register_model("resnet32x4")
def resnet32x4(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(32, _X4, num_classes)
