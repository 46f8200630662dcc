"""The model zoo: mdistiller's CIFAR models (same names, same state-dict keys and shapes)
and torchvision's ImageNet models, all in the feature interface of `kdpipe.models.base`.

    build(name, num_classes=100, head="linear") -> KDModel   (head "cam": CAT-KD's student head)
    available() -> list[str]
    load_teacher(name, path, num_classes) -> KDModel (eval mode)

CIFAR names: resnet8, resnet14, resnet20, resnet32, resnet44, resnet56, resnet110,
resnet8x4, resnet32x4, wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2, vgg8/11/13/16/19 (BN variants;
also as vgg8_bn ... vgg19_bn), ShuffleV1, ShuffleV2, MobileNetV2 (also mobile_half),
ResNet18, ResNet50. ImageNet names: imagenet_mobilenet_v1 (also MobileNetV1: mdistiller's, and
the network both references' ImageNet rows call "MobileNetV2"); needing torchvision:
imagenet_resnet18, imagenet_resnet34, imagenet_resnet50, imagenet_mobilenet_v2 (torchvision's
MobileNetV2).
"""

# Importing the family modules runs their @register_model decorators.
from kdpipe.models import imagenet, mobilenetv1, mobilenetv2, resnet, resnetv2, shufflenetv1, shufflenetv2, vgg, wrn  # noqa: F401
from kdpipe.models.base import HEAD_KINDS, TAP_POINTS, KDModel
from kdpipe.models.checkpoint import identify_architecture, load_teacher, state_listing
from kdpipe.models.registry import available, build, register_model

__all__ = [
    "HEAD_KINDS",
    "KDModel",
    "TAP_POINTS",
    "available",
    "build",
    "identify_architecture",
    "load_teacher",
    "register_model",
    "state_listing",
]
