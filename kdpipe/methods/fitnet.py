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
from kdpipe.methods.base import Method, loss_parts, probe_features
from kdpipe.methods.registry import MethodOptions, option, register

__all__ = [
    "HintRegressor",
    "fitnet_loss",
    "FitNetOptions",
    "FitNetSettings",
    "DEFAULT_FITNET",
    "REFERENCE_FITNET",
    "FitNet",
]


def _regression_conv(
    student_channels: int, teacher_channels: int, student_size: tuple[int, int], teacher_size: tuple[int, int]
) -> nn.Module:
    (hs, ws), (ht, wt) = student_size, teacher_size
    if hs == 2 * ht:
        return nn.Conv2d(student_channels, teacher_channels, kernel_size=3, stride=2, padding=1)
    if 2 * hs == ht:
        return nn.ConvTranspose2d(student_channels, teacher_channels, kernel_size=4, stride=2, padding=1)
    if hs >= ht:
        return nn.Conv2d(student_channels, teacher_channels, kernel_size=(1 + hs - ht, 1 + ws - wt))
    raise KdpipeError(
        f"The hint regressor (mdistiller's ConvReg: FitNet's, and AB's connector) cannot map a "
        f"{hs}x{ws} student map to a {ht}x{wt} teacher map (it supports a student twice, half, "
        f"or at least as large as the teacher, as mdistiller)."
    )


class HintRegressor(nn.Module):
    """Student hint [B, Ds, hs, ws] -> [B, Dt, ht, wt]: conv (see the module docstring), BN, ReLU.

    Args:
        student_channels / teacher_channels: Ds, Dt.
        student_size / teacher_size: (h, w) of the two hints.
        use_relu: end with a ReLU (mdistiller's default, used by FitNet).
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        student_size: tuple[int, int],
        teacher_size: tuple[int, int],
        use_relu: bool = True,
    ) -> None:
        super().__init__()
        self.conv = _regression_conv(
            int(student_channels),
            int(teacher_channels),
            (int(student_size[0]), int(student_size[1])),
            (int(teacher_size[0]), int(teacher_size[1])),
        )
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
            f"shape; got {tuple(student_hint_regressed.shape)} and {tuple(teacher_hint.shape)}"
        )
    return F.mse_loss(student_hint_regressed, teacher_hint.to(student_hint_regressed.dtype))


@dataclass(frozen=True)
class FitNetSettings:
    """One reference configuration: total = ce_weight * CE + feat_weight * fitnet_loss."""

    hint_layer: int
    feat_weight: float
    ce_weight: float


@dataclass
class FitNetOptions(MethodOptions):
    """FitNet's options: mdistiller/engine/cfg.py CFG.FITNET (no config overrides them;
    FITNET.INPUT_SIZE only sized mdistiller's regressor: kdpipe probes the images)."""

    hint_layer: int | None = option(
        2,
        source="mdistiller/engine/cfg.py CFG.FITNET.HINT_LAYER",
        help="the hint stage, mdistiller's feats index",
        yaml="FITNET.HINT_LAYER",
    )
    feat_weight: float | None = option(
        100.0,
        source="mdistiller/engine/cfg.py CFG.FITNET.LOSS.FEAT_WEIGHT",
        help="weight of the hint loss",
        yaml="FITNET.LOSS.FEAT_WEIGHT",
    )
    ce_weight: float | None = option(
        1.0,
        source="mdistiller/engine/cfg.py CFG.FITNET.LOSS.CE_WEIGHT",
        help="weight of CE",
        yaml="FITNET.LOSS.CE_WEIGHT",
    )


DEFAULT_FITNET = FitNetSettings(**FitNetOptions.defaults())

REFERENCE_FITNET: dict[tuple[str, str], FitNetSettings] = {
    ("resnet32x4", "resnet8x4"): DEFAULT_FITNET,  # configs/cifar100/fitnet.yaml
}


# --------------------------------------------------------------------------- method
def _shape(value, what: str) -> list[int] | None:
    if value is None:
        return None
    shape = [int(v) for v in value]
    if len(shape) != 3 or min(shape) < 1:
        raise KdpipeError(f"Method 'fitnet': {what} must be [channels, height, width], got {value!r}.")
    return shape


@register(
    "fitnet",
    options=FitNetOptions,
    summary="FitNets hints: CE + weight * MSE(regressor(student stage), teacher stage)",
    paper="Romero et al., ICLR 2015; mdistiller/distillers/FitNet.py",
    yaml_names=("FITNET",),
    yaml_recorded={"FITNET.INPUT_SIZE": [32, 32]},
)
class FitNet(Method):
    """FitNet: total = ce_weight * CE + feat_weight * MSE(regressor(student hint), teacher hint).

    Options left None take mdistiller/engine/cfg.py's CFG.FITNET (``DEFAULT_FITNET``:
    hint_layer 2, feat_weight 100, ce_weight 1). ``student_hint_shape`` and
    ``teacher_hint_shape`` ([D, h, w]) size the regressor; they are found from the store (or
    the online teacher) and a probe of the student, and recorded so that evaluate rebuilds it.
    The regressor is the student's submodule ``fitnet_regressor`` (trained with it, unused at
    inference, as mdistiller's ``conv_reg``).
    """

    name = "fitnet"
    recorded_options = ("student_hint_shape", "teacher_hint_shape")

    def __init__(
        self,
        hint_layer: int | None = None,
        feat_weight: float | None = None,
        ce_weight: float | None = None,
        student_hint_shape=None,
        teacher_hint_shape=None,
    ):
        if hint_layer is not None and (int(hint_layer) != float(hint_layer) or int(hint_layer) < 1):
            self._bad_option("hint_layer", hint_layer, "a stage number (1 or more)")
        super().__init__(
            hint_layer=DEFAULT_FITNET.hint_layer if hint_layer is None else int(hint_layer),
            feat_weight=DEFAULT_FITNET.feat_weight if feat_weight is None else float(feat_weight),
            ce_weight=DEFAULT_FITNET.ce_weight if ce_weight is None else float(ce_weight),
            student_hint_shape=_shape(student_hint_shape, "student_hint_shape"),
            teacher_hint_shape=_shape(teacher_hint_shape, "teacher_hint_shape"),
        )
        self._image_size = (32, 32)
        self._student_arch: str | None = None
        self._regressor: HintRegressor | None = None

    def bind(self, teacher_arch=None, student_arch=None, dataset: str = "cifar"):
        self.dataset = dataset
        self._student_arch = student_arch
        return self

    def kinds(self) -> list:
        from kdpipe.targets import HintFeature

        return [HintFeature(self.options["hint_layer"])]

    def attach_teacher(self, info) -> None:
        self._image_size = tuple(info.image_size)
        shape = info.shapes.get(self.kinds()[0].name)
        if shape is not None:
            self.options["teacher_hint_shape"] = [int(s) for s in shape]
        if self.options["student_hint_shape"] is None and self._student_arch is not None:
            # found now, so that the run's config records it (evaluate rebuilds the regressor)
            from kdpipe.models import build

            self.options["student_hint_shape"] = self._student_hint_shape(build(self._student_arch, num_classes=10))

    def _student_hint_shape(self, student) -> list[int]:
        """[D, h, w] of the student's hint, from one forward of a zero image (eval mode)."""
        stages = probe_features(student, self._image_size)["stages"]
        layer = self.options["hint_layer"]
        if layer > len(stages):
            raise KdpipeError(f"FitNet's hint layer {layer} is past the student's {len(stages)} stages.")
        return [int(s) for s in stages[layer - 1].shape[1:]]

    def prepare_student(self, student, target_set=None):
        o = self.options
        if o["teacher_hint_shape"] is None:
            raise KdpipeError(
                "Method 'fitnet' needs the teacher's hint shape: train from a store extracted with "
                "--methods fitnet, or with --online-teacher."
            )
        if o["student_hint_shape"] is None:
            o["student_hint_shape"] = self._student_hint_shape(student)
        (ds, hs, ws), (dt, ht, wt) = o["student_hint_shape"], o["teacher_hint_shape"]
        self._regressor = HintRegressor(ds, dt, (hs, ws), (ht, wt))
        student.fitnet_regressor = self._regressor
        student.collect_stages = True
        return student

    def loss(self, logits, feats, targets, labels):
        o = self.options
        if self._regressor is None:
            raise KdpipeError("Method 'fitnet': prepare_student must install the regressor before training.")
        hint = feats["stages"][o["hint_layer"] - 1]
        fit = fitnet_loss(self._regressor(hint), targets["hint"])
        ce = F.cross_entropy(logits, labels)
        total = o["ce_weight"] * ce + o["feat_weight"] * fit
        return total, loss_parts(ce=ce, hint=fit, total=total)
