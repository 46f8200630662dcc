"""ShuffleNet v2 (width 1x: stages 116/232/464, 3/7/3 basic units after each down unit,
1024-channel final 1x1 conv) for CIFAR, parameter-compatible with mdistiller's
`mdistiller/models/cifar/ShuffleNetv2.py` (ShuffleV2 = ShuffleNetV2(net_size=1)).

Feature points (32x32 input):
    inter  = output of layer3[0], the down-sampling unit opening the last stage [B, 464, 4, 4]
    penult = ReLU(bn2(conv2(output of layer3))), the final 1x1 conv's map      [B, 1024, 4, 4]
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdpipe.models.base import CAM_INIT_TORCH_DEFAULT, KDModel, PreactPoint
from kdpipe.models.registry import register_model
from kdpipe.models.shufflenetv1 import ChannelShuffle


class BasicUnit(nn.Module):
    """Split channels in half; the second half goes through 1x1 - depthwise 3x3 - 1x1; concat
    with the untouched half and shuffle. [B, C, H, W] -> [B, C, H, W]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, kernel_size=3, stride=1, padding=1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[1] // 2
        kept, branch = x[:, :half], x[:, half:]
        out = F.relu(self.bn1(self.conv1(branch)))
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)))
        return self.shuffle(torch.cat([kept, out], 1))


class DownUnit(nn.Module):
    """Two stride-2 branches over the whole input, each giving out/2 channels, concatenated
    and shuffled. [B, Cin, H, W] -> [B, Cout, H/2, W/2]."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        # left branch: depthwise 3x3 (stride 2) - 1x1
        self.conv1 = nn.Conv2d(
            in_channels, in_channels, kernel_size=3, stride=2, padding=1, groups=in_channels, bias=False
        )
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        # right branch: 1x1 - depthwise 3x3 (stride 2) - 1x1
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, kernel_size=3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = self.bn1(self.conv1(x))
        left = F.relu(self.bn2(self.conv2(left)))
        right = F.relu(self.bn3(self.conv3(x)))
        right = self.bn4(self.conv4(right))
        right = F.relu(self.bn5(self.conv5(right)))
        return self.shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(KDModel):
    """1x1 stem to 24 channels, three stages (a DownUnit then BasicUnits), a final 1x1 conv
    with BN and ReLU, global pooling, linear classifier."""

    # CAT-KD mdistiller/models/cifar/ShuffleNetv2.py ShuffleNetV2_test: no init loop.
    cam_head_init = CAM_INIT_TORCH_DEFAULT

    def __init__(
        self,
        stage_channels: tuple[int, int, int],
        final_channels: int,
        stage_units: tuple[int, int, int],
        num_classes: int,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_channels = 24
        stages = []
        for channels, units in zip(stage_channels, stage_units):
            stages.append(nn.Sequential(DownUnit(in_channels, channels), *[BasicUnit(channels) for _ in range(units)]))
            in_channels = channels
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = nn.Conv2d(stage_channels[2], final_channels, kernel_size=1, stride=1, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(final_channels)
        self.linear = nn.Linear(final_channels, num_classes)
        self.inter_channels = stage_channels[2]
        self.penult_channels = final_channels

    def forward_inter(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.layer3[0](x)

    def forward_penult(self, inter: torch.Tensor) -> torch.Tensor:
        x = self.layer3[1:](inter)
        return F.relu(self.bn2(self.conv2(x)))

    def stage_points(self) -> list[tuple[nn.Module, bool]]:
        # mdistiller ShuffleNetv1/v2.py feats[1:]: the outputs of layer1, layer2, layer3
        return [(stage[-1], False) for stage in (self.layer1, self.layer2, self.layer3)]

    def stem_point(self) -> tuple[nn.Module, bool]:
        # mdistiller ShuffleNetv2.py feats[0]: relu(bn1(conv1(x)))
        return (self.bn1, True)

    def preact_points(self) -> list[PreactPoint]:
        # mdistiller ShuffleNetv2.py preact_feats[1:]: the last unit's concatenation of the kept
        # half and bn3's output, before the ReLU and without the channel shuffle
        return [PreactPoint(stage[-1], _unit_preact, ("bn3",)) for stage in (self.layer1, self.layer2, self.layer3)]

    def linear_head(self) -> nn.Linear:
        return self.linear


@register_model("ShuffleV2")
def shuffle_v2(num_classes: int = 100) -> ShuffleNetV2:
    return ShuffleNetV2((116, 232, 464), 1024, (3, 7, 3), num_classes=num_classes)


def _unit_preact(unit, x, output, captured) -> torch.Tensor:
    if not isinstance(unit, BasicUnit):
        raise ValueError("ShuffleV2's pre-ReLU stage output is read at a BasicUnit (a stage of one DownUnit has none)")
    return torch.cat([x[:, : x.shape[1] // 2], captured["bn3"]], 1)
