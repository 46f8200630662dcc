"""ShuffleNet v1 for CIFAR (groups 3, stage widths 240/480/960, 4/8/4 units),
parameter-compatible with mdistiller's `mdistiller/models/cifar/ShuffleNetv1.py` (ShuffleV1).

Feature points (32x32 input):
    inter  = output of layer3[0], the first (stride-2) unit of the last stage [B, 960, 4, 4]
    penult = output of layer3 (units end in ReLU; no final conv or BN)    [B, 960, 4, 4]
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdpipe.models.base import CAM_INIT_TORCH_DEFAULT, KDModel, PreactPoint
from kdpipe.models.registry import register_model


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, H, W] with channels reordered from (groups, C/groups) to
    (C/groups, groups), so grouped convolutions that follow see every input group."""
    batch, channels, height, width = x.shape
    return (
        x.reshape(batch, groups, channels // groups, height, width)
        .transpose(1, 2)
        .reshape(batch, channels, height, width)
    )


class ChannelShuffle(nn.Module):
    """Module form of `channel_shuffle` (no parameters)."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(x, self.groups)


class ShuffleUnit(nn.Module):
    """Grouped 1x1 conv - shuffle - depthwise 3x3 - grouped 1x1 conv, plus shortcut.

    stride 1: output = ReLU(branch + x), [B, C, H, W] -> [B, C, H, W].
    stride 2: output = ReLU(concat(branch, avgpool3x3(x))), so the unit's width is
    `branch_planes + in_planes` at half the resolution.
    """

    def __init__(self, in_planes: int, branch_planes: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid_planes = branch_planes // 4
        # The 24-channel stem output is too narrow to group; the first 1x1 conv is dense there.
        first_groups = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid_planes, kernel_size=1, groups=first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.shuffle1 = ChannelShuffle(first_groups)
        self.conv2 = nn.Conv2d(
            mid_planes, mid_planes, kernel_size=3, stride=stride, padding=1, groups=mid_planes, bias=False
        )
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, branch_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(branch_planes)
        self.shortcut = nn.Sequential()
        if stride == 2:
            self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.shuffle1(out)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = self.shortcut(x)
        out = torch.cat([out, shortcut], 1) if self.stride == 2 else out + shortcut
        return F.relu(out)


class ShuffleNetV1(KDModel):
    """1x1 stem to 24 channels (no downsampling: CIFAR), three stages whose first unit has
    stride 2, global pooling, linear classifier."""

    # CAT-KD mdistiller/models/cifar/ShuffleNetv1.py ShuffleNet_test: no init loop.
    cam_head_init = CAM_INIT_TORCH_DEFAULT

    def __init__(
        self, stage_planes: tuple[int, int, int], stage_units: tuple[int, int, int], groups: int, num_classes: int
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_planes = 24
        stages = []
        for planes, units in zip(stage_planes, stage_units):
            # The stride-2 unit concatenates its input, so its branch makes up the difference.
            stage = [ShuffleUnit(in_planes, planes - in_planes, stride=2, groups=groups)]
            stage += [ShuffleUnit(planes, planes, stride=1, groups=groups) for _ in range(units - 1)]
            stages.append(nn.Sequential(*stage))
            in_planes = planes
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(stage_planes[2], num_classes)
        self.inter_channels = stage_planes[2]
        self.penult_channels = stage_planes[2]

    def forward_inter(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.layer3[0](x)

    def forward_penult(self, inter: torch.Tensor) -> torch.Tensor:
        return self.layer3[1:](inter)

    def stage_points(self) -> list[tuple[nn.Module, bool]]:
        # mdistiller ShuffleNetv1/v2.py feats[1:]: the outputs of layer1, layer2, layer3
        return [(stage[-1], False) for stage in (self.layer1, self.layer2, self.layer3)]

    def stem_point(self) -> tuple[nn.Module, bool]:
        # mdistiller ShuffleNetv1.py feats[0]: relu(bn1(conv1(x)))
        return (self.bn1, True)

    def preact_points(self) -> list[PreactPoint]:
        # mdistiller ShuffleNetv1.py preact_feats[1:]: the last unit's sum (concatenation at
        # stride 2) before its ReLU
        return [
            PreactPoint(stage[-1], _unit_preact, ("bn3", "shortcut"))
            for stage in (self.layer1, self.layer2, self.layer3)
        ]

    def linear_head(self) -> nn.Linear:
        return self.linear


def _unit_preact(unit, x, output, captured) -> torch.Tensor:
    out, shortcut = captured["bn3"], captured["shortcut"]
    return torch.cat([out, shortcut], 1) if unit.stride == 2 else out + shortcut


@register_model("ShuffleV1")
def shuffle_v1(num_classes: int = 100) -> ShuffleNetV1:
    return ShuffleNetV1((240, 480, 960), (4, 8, 4), groups=3, num_classes=num_classes)
