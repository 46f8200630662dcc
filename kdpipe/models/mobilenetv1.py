"""MobileNet (v1) for ImageNet, parameter-compatible with mdistiller's
`mdistiller/models/imagenet/mobilenetv1.py` (`MobileNetV1`).

Registered as "imagenet_mobilenet_v1" and under mdistiller's model-dict name "MobileNetV1".
It is also the network both papers' ImageNet rows call "MobileNetV2": CAT-KD's
`mdistiller/models/imagenet/mobilenetv2.py` (class `MobileNetV2`, and `MobileNetV2_test` with
the CAM head) and letKD-framework's `feature_extractors/MobileNetV2_ImageNet.py` define this
same stack of a 3x3 convolution and 13 depthwise-separable blocks ending at 1024 channels, not
Sandler et al.'s inverted residuals (torchvision's MobileNetV2, "imagenet_mobilenet_v2").

State dict: mdistiller's, `model.<i>.<j>.*` for the 14 blocks and `fc.*`; with the CAM head,
CAT-KD's `MobileNetV2_test` (`conv_test` instead of `fc`). None of the three references runs
an initialisation loop: every layer keeps PyTorch's default initialisation, here too.

Feature points (224x224 input):
    inter  = output of model[12], the stride-2 block that opens the last (7x7) stage
                                                                     [B, 1024, 7, 7]
    penult = output of model[13], the last block                     [B, 1024, 7, 7]
The references pool with AvgPool2d(7), which is the global average pool kdpipe's heads use on
224x224 inputs (and would refuse smaller ones).

Stage outputs (mdistiller's forward): ``feats["feats"]`` = ReLU'd outputs of model[3], model[5],
model[11] and model[13], ``preact_feats`` the same before their last ReLU. Its list has no stem
entry, so ``feats[0]`` (FSP's first map, ``stem_point``) is model[3]'s output and ``feats[1:]``
(AT, FitNet, ``stage_points``) the outputs of model[5], model[11] and model[13].
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn as nn

from kdpipe.models.base import CAM_INIT_TORCH_DEFAULT, KDModel, PreactPoint, module_output_copy
from kdpipe.models.registry import register_model

# (output channels, stride) of the 13 depthwise-separable blocks after the 32-channel stem
# (mdistiller imagenet/mobilenetv1.py)
_SEPARABLE_BLOCKS = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
)
#: model[LAST_STAGE] opens the final 7x7 stage (the inter point)
_LAST_STAGE = 12
#: the blocks whose outputs mdistiller's forward lists: feats[0] and feats[1:]
_LISTED_BLOCKS = (3, 5, 11, 13)
#: index of the last BatchNorm inside a separable block (its pre-ReLU output)
_LAST_BN = 4


def _conv_bn(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _conv_dw(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """Depthwise 3x3 (+ BN + ReLU), then pointwise 1x1 (+ BN + ReLU)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, in_channels, 3, stride, 1, groups=in_channels, bias=False),
        nn.BatchNorm2d(in_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(in_channels, out_channels, 1, 1, 0, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class MobileNetV1(KDModel):
    """MobileNet (v1), width 1: `model` (stem + 13 separable blocks), then `fc`."""

    # CAT-KD mdistiller/models/imagenet/mobilenetv2.py MobileNetV2_test: no init loop, so
    # conv_test keeps PyTorch's Conv2d default.
    cam_head_init = CAM_INIT_TORCH_DEFAULT

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        blocks = [_conv_bn(3, 32, 2)]
        in_channels = 32
        for out_channels, stride in _SEPARABLE_BLOCKS:
            blocks.append(_conv_dw(in_channels, out_channels, stride))
            in_channels = out_channels
        # mdistiller's model[14] is nn.AvgPool2d(7), which holds no state: the head's global
        # pool stands for it
        self.model = nn.Sequential(*blocks)
        self.fc = nn.Linear(in_channels, num_classes)
        self.inter_channels = _SEPARABLE_BLOCKS[_LAST_STAGE - 1][0]
        self.penult_channels = in_channels

    def _block(self, index: int) -> nn.Sequential:
        # nn.Sequential's stub types its items as Module; each is a Sequential built above.
        return cast(nn.Sequential, self.model[index])

    def forward_inter(self, x: torch.Tensor) -> torch.Tensor:
        return self.model[: _LAST_STAGE + 1](x)

    def forward_penult(self, inter: torch.Tensor) -> torch.Tensor:
        return self.model[_LAST_STAGE + 1 :](inter)

    def stage_points(self) -> list[tuple[nn.Module, bool]]:
        # mdistiller mobilenetv1.py feats[1:]: ReLU(feat2), ReLU(feat3), ReLU(feat4), the
        # outputs of model[5], model[11], model[13] (their ReLU is the block's last module)
        return [(self._block(i), False) for i in _LISTED_BLOCKS[1:]]

    def stem_point(self) -> tuple[nn.Module, bool]:
        # mdistiller mobilenetv1.py feats[0]: ReLU(feat1), the output of model[3]
        return (self._block(_LISTED_BLOCKS[0]), False)

    def preact_points(self) -> list[PreactPoint]:
        # mdistiller mobilenetv1.py preact_feats[1:] = feat2, feat3, feat4: the last BN of
        # model[5], model[11], model[13] (its get_bn_before_relu()[1:]), read before the
        # in-place ReLU that follows overwrites it
        points = []
        for index in _LISTED_BLOCKS[1:]:
            bn = self._block(index)[_LAST_BN]
            points.append(PreactPoint(bn, module_output_copy, bn=bn))
        return points

    def linear_head(self) -> nn.Linear:
        return self.fc


@register_model("imagenet_mobilenet_v1", "MobileNetV1")
def imagenet_mobilenet_v1(num_classes: int = 1000) -> MobileNetV1:
    return MobileNetV1(num_classes)
