"""CIFAR VGGs with batch norm, parameter-compatible with mdistiller's
`mdistiller/models/cifar/vgg.py` (`vgg8_bn` ... `vgg19_bn`). Registered under mdistiller's
model-dict names (vgg8, vgg11, vgg13, vgg16, vgg19, which mdistiller maps to the BN
variants) and under the `_bn` names; the plain no-BN variants are not provided.

Layout: five conv groups block0..block4 (3x3 conv + BN + ReLU each; a group's last ReLU is
applied outside it, as in mdistiller), max-pooling after block0..block2, a linear
classifier on 512 globally pooled channels. On 32x32 inputs block3 and block4 both run at
4x4; on inputs of 64 pixels or more pool3 halves the map between them, as mdistiller does
for 64x64 (TinyImageNet) inputs.

Feature points (32x32 input):
    inter  = ReLU(block3(x)): the first of the two 512-channel groups at the last
             resolution, our "first block of the last stage"               [B, 512, 4, 4]
    penult = ReLU(block4(x)), the last conv group after its ReLU            [B, 512, 4, 4]
(On 64x64 inputs inter is 8x8 and penult 4x4.)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdpipe.models.base import CAM_INIT_TORCH_DEFAULT, KDModel, PreactPoint, init_like_mdistiller, module_output
from kdpipe.models.registry import register_model

# Conv widths of each of the five groups, per mdistiller configuration letter.
_CONFIGS: dict[str, list[list[int]]] = {
    "S": [[64], [128], [256], [512], [512]],  # vgg8
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],  # vgg11
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],  # vgg13
    "D": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],  # vgg16
    "E": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],  # vgg19
}


def _conv_group(widths: list[int], in_channels: int) -> nn.Sequential:
    """conv3x3(+bias)-BN-ReLU per width, without the final ReLU (the caller applies it, so
    the group's pre-activation output stays reachable, as in mdistiller)."""
    layers: list[nn.Module] = []
    for width in widths:
        conv = nn.Conv2d(in_channels, width, kernel_size=3, padding=1)
        layers += [conv, nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_channels = width
    return nn.Sequential(*layers[:-1])


class VGG(KDModel):
    """VGG-BN for CIFAR; see the module docstring for its layout and feature points."""

    # CAT-KD mdistiller/models/cifar/vgg.py VGG_test: conv_test is created after
    # _initialize_weights, so it keeps PyTorch's default.
    cam_head_init = CAM_INIT_TORCH_DEFAULT

    def __init__(self, config: list[list[int]], num_classes: int) -> None:
        super().__init__()
        self.block0 = _conv_group(config[0], 3)
        self.block1 = _conv_group(config[1], config[0][-1])
        self.block2 = _conv_group(config[2], config[1][-1])
        self.block3 = _conv_group(config[3], config[2][-1])
        self.block4 = _conv_group(config[4], config[3][-1])
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.classifier = nn.Linear(512, num_classes)
        self.inter_channels = config[3][-1]
        self.penult_channels = config[4][-1]

        init_like_mdistiller(self, linear="normal")

    def forward_inter(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool0(F.relu(self.block0(x)))
        x = self.pool1(F.relu(self.block1(x)))
        x = self.pool2(F.relu(self.block2(x)))
        return F.relu(self.block3(x))

    def forward_penult(self, inter: torch.Tensor) -> torch.Tensor:
        # inter is input/8 pixels high: 8 or more means an input of 64 or more, where
        # mdistiller pools once more so block4 runs at 4x4 as it does on 32x32 inputs.
        x = self.pool3(inter) if inter.shape[-2] >= 8 else inter
        return F.relu(self.block4(x))

    def stage_points(self) -> list[tuple[nn.Module, bool]]:
        # mdistiller vgg.py feats[1:]: F.relu of block1 ... block4 (the ReLU is outside the blocks)
        return [(block, True) for block in (self.block1, self.block2, self.block3, self.block4)]

    def stem_point(self) -> tuple[nn.Module, bool]:
        # mdistiller vgg.py feats[0]: relu(block0(x))
        return (self.block0, True)

    def preact_points(self) -> list[PreactPoint]:
        # mdistiller vgg.py preact_feats[1:]: block1 ... block4 outputs before their ReLU
        return [PreactPoint(b, module_output, bn=b[-1]) for b in (self.block1, self.block2, self.block3, self.block4)]

    def linear_head(self) -> nn.Linear:
        return self.classifier


@register_model("vgg8", "vgg8_bn")
def vgg8(num_classes: int = 100) -> VGG:
    return VGG(_CONFIGS["S"], num_classes)


@register_model("vgg11", "vgg11_bn")
def vgg11(num_classes: int = 100) -> VGG:
    return VGG(_CONFIGS["A"], num_classes)


@register_model("vgg13", "vgg13_bn")
def vgg13(num_classes: int = 100) -> VGG:
    return VGG(_CONFIGS["B"], num_classes)


@register_model("vgg16", "vgg16_bn")
def vgg16(num_classes: int = 100) -> VGG:
    return VGG(_CONFIGS["D"], num_classes)


@register_model("vgg19", "vgg19_bn")
def vgg19(num_classes: int = 100) -> VGG:
    return VGG(_CONFIGS["E"], num_classes)
