"""MobileNetV2 for CIFAR, parameter-compatible with mdistiller's
`mdistiller/models/cifar/mobilenetv2.py`: `mobile_half` (expansion 6, width 0.5), registered
as "MobileNetV2" (mdistiller's model-dict name) and "mobile_half".

Layout: stride-2 3x3 stem, seven groups of inverted residuals in `blocks` (strides
1,1,2,2,1,2,1), a 1x1 conv to 1280 channels with BN and ReLU, global pooling, classifier
`classifier[0]`. On 32x32 inputs the maps are 16x16 after the stem and 2x2 at the end.

Feature points (32x32 input, width 0.5):
    inter  = output of blocks[5][0], the stride-2 inverted residual that opens the last
             resolution stage (blocks[5] and blocks[6] run at 2x2); our "first block of the
             last stage"                                                   [B, 80, 2, 2]
    penult = output of conv2 (1x1 conv + BN + ReLU), before pooling        [B, 1280, 2, 2]
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn as nn

from kdpipe.models.base import CAM_INIT_HE_FAN_OUT, KDModel, PreactPoint, init_like_mdistiller, module_output
from kdpipe.models.registry import register_model

# (expansion, output channels at width 1, units, first unit's stride) per group; expansion
# None means "the model's T", as mdistiller's table writes it.
_GROUPS: list[tuple[int | None, int, int, int]] = [
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
]
# blocks[_LAST_STAGE] is the first group at the final resolution (its first unit has stride 2).
_LAST_STAGE = 5


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expand - ReLU - depthwise 3x3 - ReLU - 1x1 project (linear), with an identity
    shortcut when stride is 1 and width unchanged. [B, Cin, H, W] -> [B, Cout, H/s, W/s]."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, 1, 0, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(KDModel):
    """MobileNetV2 with expansion `expansion` and width multiplier `width_mult`."""

    # CAT-KD mdistiller/models/cifar/mobilenetv2.py MobileNetV2_test: conv_test is created
    # before _initialize_weights (normal_(0, sqrt(2 / (k * k * out_channels)))).
    cam_head_init = CAM_INIT_HE_FAN_OUT

    def __init__(self, expansion: int, width_mult: float, num_classes: int) -> None:
        super().__init__()
        in_channels = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(3, in_channels, 3, stride=2)
        self.blocks = nn.ModuleList()
        group_out_channels = []
        for group_expansion, channels, units, first_stride in _GROUPS:
            out_channels = int(channels * width_mult)
            units_list = []
            for unit in range(units):
                stride = first_stride if unit == 0 else 1
                units_list.append(InvertedResidual(in_channels, out_channels, stride, group_expansion or expansion))
                in_channels = out_channels
            self.blocks.append(nn.Sequential(*units_list))
            group_out_channels.append(out_channels)
        # mdistiller widens the last conv only for width multipliers above 1.
        last_channels = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(in_channels, last_channels, 1, stride=1)
        self.classifier = nn.Sequential(nn.Linear(last_channels, num_classes))
        self.inter_channels = group_out_channels[_LAST_STAGE]
        self.penult_channels = last_channels

        init_like_mdistiller(self, linear="normal")

    def forward_inter(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for group in self.blocks[:_LAST_STAGE]:
            x = group(x)
        return self._last_stage()[0](x)

    def forward_penult(self, inter: torch.Tensor) -> torch.Tensor:
        x = self._last_stage()[1:](inter)
        for group in self.blocks[_LAST_STAGE + 1 :]:
            x = group(x)
        return self.conv2(x)

    def _last_stage(self) -> nn.Sequential:
        # ModuleList's stub types its items as Module; each is the nn.Sequential built above.
        return cast(nn.Sequential, self.blocks[_LAST_STAGE])

    def stage_points(self) -> list[tuple[nn.Module, bool]]:
        # mdistiller mobilenetv2.py feats[1:]: the outputs of blocks[1], blocks[2], blocks[4], blocks[6]
        return [(cast(nn.Sequential, self.blocks[i])[-1], False) for i in (1, 2, 4, 6)]

    def stem_point(self) -> tuple[nn.Module, bool]:
        # mdistiller mobilenetv2.py feats[0]: conv1(x) (conv, BN, ReLU)
        return (self.conv1, False)

    def preact_points(self) -> list[PreactPoint]:
        # Its blocks end in a linear bottleneck (no ReLU): RepDistiller's preact=True returns
        # these same stage outputs, and mdistiller's get_bn_before_relu names their last BN,
        # blocks[i][-1].conv[-1] (mdistiller lists no preact_feats for this family)
        last = [cast(nn.Sequential, self.blocks[i])[-1] for i in (1, 2, 4, 6)]
        return [PreactPoint(b, module_output, bn=cast(nn.Sequential, b.conv)[-1]) for b in last]

    def linear_head(self) -> nn.Linear:
        # nn.Sequential's stub types its items as Module; item 0 is the nn.Linear built above.
        return cast(nn.Linear, self.classifier[0])


@register_model("MobileNetV2", "mobile_half")
def mobile_half(num_classes: int = 100) -> MobileNetV2:
    return MobileNetV2(expansion=6, width_mult=0.5, num_classes=num_classes)
