"""FitNets hints (Romero et al., ICLR 2015) as mdistiller trains them: one hint stage, a
convolutional regressor on the student's feature, mean squared error to the teacher's.

mdistiller (``mdistiller/distillers/FitNet.py``, ``_common.py``'s ``ConvReg``) trains in one
stage (no separate hint pre-training): total = ce_weight * CE + feat_weight * MSE(
regressor(student_hint), teacher_hint), with ``F.mse_loss``'s mean over all elements.

The hint is ``feats["feats"][hint_layer]`` of both networks, with hint_layer 2 by default:
the second stage's output (CIFAR ResNets: layer2, [B, 32 or 128, 16, 16]; WRN: block2; VGG:
ReLU of block2; ShuffleNets: layer2; MobileNetV2: blocks[2]; see ``kdpipe.methods.at`` for
each family's list, whose entry 0 is the stem).

The regressor (``HintRegressor``) maps the student's hint [B, Ds, hs, ws] to the teacher's
[B, Dt, ht, wt]: one convolution chosen by the spatial sizes, then BatchNorm2d(Dt), then ReLU
(mdistiller's ``use_relu`` default, which FitNet keeps):

- hs == 2 * ht: 3x3 convolution, stride 2, padding 1;
- 2 * hs == ht: 4x4 transposed convolution, stride 2, padding 1;
- hs >= ht otherwise: a valid convolution of kernel (1 + hs - ht, 1 + ws - wt) (1x1 when
  the sizes are equal);
- any other student smaller than the teacher: unsupported (mdistiller raises too).

Its convolution keeps PyTorch's default initialisation and bias, and BatchNorm its defaults,
as mdistiller leaves them (the regressor is not part of the student it initialises).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdpipe.errors import KdpipeError

__all__ = ["HintRegressor", "fitnet_loss", "FitNetSettings", "DEFAULT_FITNET", "REFERENCE_FITNET"]


def _regression_conv(student_channels: int, teacher_channels: int,
                     student_size: tuple[int, int], teacher_size: tuple[int, int]) -> nn.Module:
    (hs, ws), (ht, wt) = student_size, teacher_size
    if hs == 2 * ht:
        return nn.Conv2d(student_channels, teacher_channels, kernel_size=3, stride=2, padding=1)
    if 2 * hs == ht:
        return nn.ConvTranspose2d(student_channels, teacher_channels, kernel_size=4, stride=2,
                                  padding=1)
    if hs >= ht:
        return nn.Conv2d(student_channels, teacher_channels, kernel_size=(1 + hs - ht, 1 + ws - wt))
    raise KdpipeError(
        f"FitNet's regressor cannot map a {hs}x{ws} student hint to a {ht}x{wt} teacher hint "
        f"(it supports a student twice, half, or at least as large as the teacher, as mdistiller).")


class HintRegressor(nn.Module):
    """Student hint [B, Ds, hs, ws] -> [B, Dt, ht, wt]: conv (see the module docstring), BN, ReLU.

    Args:
        student_channels / teacher_channels: Ds, Dt.
        student_size / teacher_size: (h, w) of the two hints.
        use_relu: end with a ReLU (mdistiller's default, used by FitNet).
    """

    def __init__(self, student_channels: int, teacher_channels: int,
                 student_size: tuple[int, int], teacher_size: tuple[int, int],
                 use_relu: bool = True) -> None:
        super().__init__()
        self.conv = _regression_conv(int(student_channels), int(teacher_channels),
                                     tuple(student_size), tuple(teacher_size))
        self.bn = nn.BatchNorm2d(int(teacher_channels))
        self.use_relu = bool(use_relu)

    def forward(self, student_hint: torch.Tensor) -> torch.Tensor:
        out = self.bn(self.conv(student_hint))
        return F.relu(out) if self.use_relu else out


def fitnet_loss(student_hint_regressed: torch.Tensor, teacher_hint: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all B * Dt * ht * wt elements (``F.mse_loss``'s mean).

    Args:
        student_hint_regressed: [B, Dt, ht, wt], the ``HintRegressor``'s output.
        teacher_hint: [B, Dt, ht, wt], the teacher's hint feature.
    """
    if student_hint_regressed.shape != teacher_hint.shape:
        raise ValueError(
            f"fitnet_loss expects the regressed student hint and the teacher hint of the same "
            f"shape; got {tuple(student_hint_regressed.shape)} and {tuple(teacher_hint.shape)}")
    return F.mse_loss(student_hint_regressed, teacher_hint.to(student_hint_regressed.dtype))


@dataclass(frozen=True)
class FitNetSettings:
    """One reference configuration: total = ce_weight * CE + feat_weight * fitnet_loss."""

    hint_layer: int
    feat_weight: float
    ce_weight: float


# mdistiller/engine/cfg.py: CFG.FITNET.HINT_LAYER 2, LOSS.FEAT_WEIGHT 100.0, LOSS.CE_WEIGHT 1.0
# (INPUT_SIZE (32, 32) only sizes the regressor); no config overrides them.
DEFAULT_FITNET = FitNetSettings(hint_layer=2, feat_weight=100.0, ce_weight=1.0)

REFERENCE_FITNET: dict[tuple[str, str], FitNetSettings] = {
    ("resnet32x4", "resnet8x4"): DEFAULT_FITNET,   # configs/cifar100/fitnet.yaml
}
