"""torchvision's ImageNet models in kdpipe's feature interface.

Registered names: `imagenet_resnet18`, `imagenet_resnet34`, `imagenet_resnet50`,
`imagenet_mobilenet_v2` (torchvision's MobileNetV2; the references' ImageNet "MobileNetV2" is a
MobileNet v1, `imagenet_mobilenet_v1` in kdpipe/models/mobilenetv1.py). Each wrapper holds
torchvision's own modules under torchvision's attribute names, so its state dict is
torchvision's and torchvision's weight files (bare state dicts) load with `load_teacher`
unchanged. torchvision is imported only when one of
these is built; without it, building raises KdpipeError.

Feature points (224x224 input):
    resnet18/34/50: inter  = output of layer4[0], first block of the last stage [B, D, 7, 7]
                    penult = output of layer4                                 [B, D, 7, 7]
                    (D = 512 for 18/34, 2048 for 50)
    mobilenet_v2:   inter  = output of features[14], the stride-2 inverted residual that
                             opens the last (7x7) resolution stage            [B, 160, 7, 7]
                    penult = output of features[18] (1x1 conv + BN + ReLU6)   [B, 1280, 7, 7]
"""

from __future__ import annotations

import torch
import torch.nn as nn

from kdpipe.errors import KdpipeError
from kdpipe.models.base import CAM_INIT_HE_FAN_OUT, CAM_INIT_TORCH_DEFAULT, KDModel
from kdpipe.models.registry import register_model


def _torchvision_models():
    """Import torchvision.models, or raise KdpipeError saying why it could not be imported."""
    try:
        import torchvision.models as models
    except Exception as exc:  # ImportError, or RuntimeError/OSError from mismatched compiled ops
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise KdpipeError(f"torchvision is required for ImageNet models and did not import: {reason}") from exc
    return models


class TorchvisionResNet(KDModel):
    """torchvision ResNet (conv1-bn1-relu-maxpool, layer1..layer4, fc)."""

    # CAT-KD mdistiller/models/imagenet/resnet.py ResNet_test: conv_test is created
    # before the normal_(0, sqrt(2 / (k * k * out_channels))) loop.
    cam_head_init = CAM_INIT_HE_FAN_OUT

    def __init__(self, arch: str, num_classes: int) -> None:
        super().__init__()
        reference = getattr(_torchvision_models(), arch)(weights=None, num_classes=num_classes)
        # Same attribute names and order as torchvision, so state-dict keys are torchvision's.
        self.conv1 = reference.conv1
        self.bn1 = reference.bn1
        self.relu = reference.relu
        self.maxpool = reference.maxpool
        self.layer1 = reference.layer1
        self.layer2 = reference.layer2
        self.layer3 = reference.layer3
        self.layer4 = reference.layer4
        self.fc = reference.fc
        self.inter_channels = self.fc.in_features
        self.penult_channels = self.fc.in_features

    def forward_inter(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.layer4[0](x)

    def forward_penult(self, inter: torch.Tensor) -> torch.Tensor:
        return self.layer4[1:](inter)

    def stage_points(self) -> list[tuple[nn.Module, bool]]:
        # mdistiller imagenet/resnet.py feats[1:]: the (ReLU'd) outputs of layer1 ... layer4
        return [(stage[-1], False) for stage in (self.layer1, self.layer2, self.layer3, self.layer4)]

    def linear_head(self) -> nn.Linear:
        return self.fc


# features[_MBV2_LAST_STAGE] is torchvision MobileNetV2's first block at the final (stride-32)
# resolution; features[18] is its 1x1 conv to 1280 channels.
_MBV2_LAST_STAGE = 14


class TorchvisionMobileNetV2(KDModel):
    """torchvision MobileNetV2 (`features`, then `classifier` = Dropout + Linear)."""

    # No reference trains this network with a CAM head: the references' ImageNet "MobileNetV2"
    # is a MobileNet (v1), kdpipe's imagenet_mobilenet_v1. Like that one's conv_test (CAT-KD
    # MobileNetV2_test, no init loop), PyTorch's default; with the CAM head there is no dropout.
    cam_head_init = CAM_INIT_TORCH_DEFAULT

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        reference = _torchvision_models().mobilenet_v2(weights=None, num_classes=num_classes)
        self.features = reference.features
        self.classifier = reference.classifier
        self.inter_channels = self.features[_MBV2_LAST_STAGE].out_channels
        self.penult_channels = self.classifier[1].in_features

    def forward_inter(self, x: torch.Tensor) -> torch.Tensor:
        return self.features[: _MBV2_LAST_STAGE + 1](x)

    def forward_penult(self, inter: torch.Tensor) -> torch.Tensor:
        return self.features[_MBV2_LAST_STAGE + 1 :](inter)

    def stage_points(self) -> list[tuple[nn.Module, bool]]:
        # No reference lists torchvision MobileNetV2's stages (mdistiller's ImageNet student is a
        # MobileNetV1); as its CIFAR MobileNetV2 does, the last block of the 24-, 32-, 96- and
        # 320-channel groups: features[3], [6], [13], [17].
        return [(self.features[i], False) for i in (3, 6, 13, 17)]

    def linear_head(self) -> nn.Linear:
        return self.classifier[1]

    def classify_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        # torchvision's dropout before the linear layer (active in training only), so
        # training this wrapper trains torchvision's model.
        return self.classifier(pooled)


@register_model("imagenet_resnet18")
def imagenet_resnet18(num_classes: int = 1000) -> TorchvisionResNet:
    return TorchvisionResNet("resnet18", num_classes)


@register_model("imagenet_resnet34")
def imagenet_resnet34(num_classes: int = 1000) -> TorchvisionResNet:
    return TorchvisionResNet("resnet34", num_classes)


@register_model("imagenet_resnet50")
def imagenet_resnet50(num_classes: int = 1000) -> TorchvisionResNet:
    return TorchvisionResNet("resnet50", num_classes)


@register_model("imagenet_mobilenet_v2")
def imagenet_mobilenet_v2(num_classes: int = 1000) -> TorchvisionMobileNetV2:
    return TorchvisionMobileNetV2(num_classes)
