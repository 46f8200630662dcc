"""ResNet18 / ResNet50 for CIFAR (four stages, 3x3 stride-1 stem, no max-pool),
parameter-compatible with mdistiller's `mdistiller/models/cifar/resnetv2.py`.

Feature points (32x32 input):
    inter  = output of layer4[0], the first block of the last stage  [B, 512 or 2048, 4, 4]
    penult = output of layer4 (already ReLU'd, no extra BN)           [B, 512 or 2048, 4, 4]
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdpipe.models.base import CAM_INIT_HE_FAN_OUT, KDModel, PreactPoint, init_like_mdistiller
from kdpipe.models.registry import register_model


def _projection(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    """Identity shortcut (empty Sequential) where shapes agree, else 1x1 conv + BN."""
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes),
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN, shortcut, ReLU. [B, Cin, H, W] -> [B, planes, H/s, W/s]."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _projection(in_planes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce - 3x3 (stride) - 1x1 expand (x4), shortcut, ReLU.
    [B, Cin, H, W] -> [B, 4*planes, H/s, W/s]."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, self.expansion * planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(self.expansion * planes)
        self.shortcut = _projection(in_planes, self.expansion * planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class CifarResNetV2(KDModel):
    """Stem conv3x3(64)+BN+ReLU, stages of widths 64/128/256/512 (x expansion), strides
    1/2/2/2, global pooling, linear classifier `linear`."""

    # CAT-KD mdistiller/models/cifar/resnetv2.py ResNet_test (ResNet50_test): conv_test is
    # created before the kaiming_normal_(fan_out) loop.
    cam_head_init = CAM_INIT_HE_FAN_OUT

    def __init__(
        self, block: type[BasicBlock] | type[Bottleneck], stage_blocks: tuple[int, int, int, int], num_classes: int
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_planes = 64
        stages = []
        for planes, num_blocks, stride in zip((64, 128, 256, 512), stage_blocks, (1, 2, 2, 2)):
            blocks = []
            for i in range(num_blocks):
                blocks.append(block(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(512 * block.expansion, num_classes)
        self.inter_channels = 512 * block.expansion
        self.penult_channels = 512 * block.expansion

        init_like_mdistiller(self)

    def forward_inter(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.layer4[0](x)

    def forward_penult(self, inter: torch.Tensor) -> torch.Tensor:
        return self.layer4[1:](inter)

    def stage_points(self) -> list[tuple[nn.Module, bool]]:
        # mdistiller resnetv2.py feats[1:]: the outputs of layer1 ... layer4
        return [(stage[-1], False) for stage in (self.layer1, self.layer2, self.layer3, self.layer4)]

    def stem_point(self) -> tuple[nn.Module, bool]:
        # mdistiller resnetv2.py feats[0]: relu(bn1(conv1(x)))
        return (self.bn1, True)

    def preact_points(self) -> list[PreactPoint]:
        # mdistiller resnetv2.py preact_feats[1:]: the last block's last BN output plus its
        # shortcut, before the block's final ReLU
        stages = (self.layer1, self.layer2, self.layer3, self.layer4)
        last = [stage[-1] for stage in stages]
        return [PreactPoint(b, _residual_sum, ("bn2", "bn3", "shortcut"), bn=_last_bn(b)) for b in last]

    def linear_head(self) -> nn.Linear:
        return self.linear


def _residual_sum(block, x, output, captured) -> torch.Tensor:
    """The last BN's output (bn3 of a Bottleneck, bn2 of a BasicBlock) plus the shortcut."""
    return captured["bn3" if "bn3" in captured else "bn2"] + captured["shortcut"]


@register_model("ResNet18")
def resnet18_cifar(num_classes: int = 100) -> CifarResNetV2:
    return CifarResNetV2(BasicBlock, (2, 2, 2, 2), num_classes)


@register_model("ResNet50")
def resnet50_cifar(num_classes: int = 100) -> CifarResNetV2:
    return CifarResNetV2(Bottleneck, (3, 4, 6, 3), num_classes)


def _last_bn(block: nn.Module) -> nn.Module:
    """The BN before a block's final ReLU: bn3 of a Bottleneck, bn2 of a BasicBlock."""
    return cast(nn.Module, block.bn3 if isinstance(block, Bottleneck) else block.bn2)
