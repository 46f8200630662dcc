"""SimKD (Chen et al., "Knowledge Distillation with the Reused Teacher Classifier", CVPR
2022): a projector maps the student's last feature map to the teacher's width, trained by
mean squared error to the teacher's last feature map; at inference the teacher's own
classifier classifies the projected student features.

Facts from the authors' code (github.com/DefangChen/SimKD, commit 2b389c3:
``models/util.py`` class ``SimKD``, ``helper/loops.py``, ``train_student.py``,
``scripts/run_distill.sh``); mdistiller has no SimKD.

- Features: ``feat[-2]`` of both networks, the last feature map before global pooling
  ([B, Ds, hs, ws] and [B, Dt, ht, wt]). For the CIFAR ResNets, VGG, ShuffleV1 and the
  ImageNet ResNets that is kdpipe's "penult" map. For ShuffleV2 and MobileNetV2 students it
  is the last stage's output *before* their final 1x1 conv + BN + ReLU (ShuffleV2 layer3,
  464 channels; MobileNetV2 blocks[6], 160 channels at width 0.5), which is neither of
  kdpipe's tap points: feeding kdpipe's "penult" there is not reference-exact.
- Spatial alignment: if hs > ht the student map is adaptive-average-pooled to ht x ht
  before the projector; otherwise the teacher map is pooled to hs x hs (square sizes, as
  the reference).
- Projector (``SimKDHead.projector``), all convolutions bias-free, factor f (default 2):
  1x1 conv Ds -> Dt/f, BN, ReLU; 3x3 conv (padding 1) Dt/f -> Dt/f, BN, ReLU; 1x1 conv
  Dt/f -> Dt, BN, ReLU. PyTorch's default initialisation (the reference sets none).
- Loss: ``nn.MSELoss()`` (mean over B * Dt * h * w) between the projected student map and
  the (aligned) teacher map: feature maps, not pooled vectors. The reference's command
  (``-c 0 -d 0 -b 1``) trains with this loss alone: no CE, no KD term.
- Logits, in training and at test time: global average pooling of the projected map, then
  the teacher's classifier (weight and bias, frozen: not in the reference's optimizer).

kdpipe keeps the teacher's classifier as buffers of ``SimKDHead`` (saved with the student,
never trained), and the teacher's spatial side as an attribute, so the student classifies
without the teacher.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdpipe.errors import KdpipeError
from kdpipe.methods.base import Method, loss_parts
from kdpipe.methods.registry import MethodOptions, option, register

__all__ = ["SimKDHead", "simkd_loss", "SimKDSettings", "DEFAULT_SIMKD", "SimKD"]


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class SimKDHead(nn.Module):
    """The student-side SimKD module: projector plus the teacher's frozen classifier.

    Args:
        student_channels: Ds of the student's feature map.
        teacher_channels: Dt of the teacher's feature map (the classifier's input width).
        teacher_classifier_weight: [C, Dt], the teacher's linear classifier weight.
        teacher_classifier_bias: [C] (or None for a bias-free classifier).
        factor: bottleneck factor f of the projector (the reference's default 2).
        teacher_side: the teacher map's spatial side ht; a larger student map is pooled to
            it before projection. None: never pool the student.

    ``forward(student_feat)`` -> (projected [B, Dt, h, w], logits [B, C]).
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        teacher_classifier_weight: torch.Tensor,
        teacher_classifier_bias: torch.Tensor | None,
        factor: int = 2,
        teacher_side: int | None = None,
    ) -> None:
        super().__init__()
        student_channels, teacher_channels, factor = int(student_channels), int(teacher_channels), int(factor)
        if factor < 1 or teacher_channels % factor:
            raise KdpipeError(
                f"SimKD's factor must be a positive divisor of the teacher's width {teacher_channels}, got {factor}."
            )
        weight = teacher_classifier_weight.detach()
        if weight.dim() != 2 or weight.shape[1] != teacher_channels:
            raise ValueError(f"teacher classifier weight must be [C, {teacher_channels}]; got {tuple(weight.shape)}")
        bias = (
            torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
            if teacher_classifier_bias is None
            else teacher_classifier_bias.detach()
        )
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"teacher classifier bias must be [{weight.shape[0]}]; got {tuple(bias.shape)}")
        hidden = teacher_channels // factor
        self.projector = nn.Sequential(
            *_conv_bn_relu(student_channels, hidden, 1),
            *_conv_bn_relu(hidden, hidden, 3),
            *_conv_bn_relu(hidden, teacher_channels, 1),
        )
        # Buffers, not parameters: the teacher's classifier is reused, never trained.
        self.register_buffer("teacher_weight", weight.clone())
        self.register_buffer("teacher_bias", bias.clone())
        self.teacher_side = None if teacher_side is None else int(teacher_side)

    def align(self, student_feat: torch.Tensor) -> torch.Tensor:
        """The student map pooled to the teacher's side where it is larger (else unchanged)."""
        side = self.teacher_side
        if side is not None and student_feat.shape[2] > side:
            return F.adaptive_avg_pool2d(student_feat, (side, side))
        return student_feat

    def classify(self, projected: torch.Tensor) -> torch.Tensor:
        """Projected map [B, Dt, h, w] -> logits [B, C] by the teacher's classifier."""
        pooled = F.adaptive_avg_pool2d(projected, 1).flatten(1)
        weight, bias = cast(torch.Tensor, self.teacher_weight), cast(torch.Tensor, self.teacher_bias)  # buffers
        return F.linear(pooled, weight.to(pooled.dtype), bias.to(pooled.dtype))

    def forward(self, student_feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        projected = self.projector(self.align(student_feat))
        return projected, self.classify(projected)


def simkd_loss(projected_student: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """MSE (mean over all elements) between the projected student map [B, Dt, h, w] and the
    teacher's map [B, Dt, h', w'], the teacher's pooled to h x w where it is larger (the
    reference). A teacher map smaller than the projected one means the student was not
    aligned first (``SimKDHead(teacher_side=...)``): ValueError.
    """
    if projected_student.dim() != 4 or teacher_feat.dim() != 4 or projected_student.shape[:2] != teacher_feat.shape[:2]:
        raise ValueError(
            f"simkd_loss expects maps [B, Dt, h, w] with the same B and Dt; got "
            f"{tuple(projected_student.shape)} and {tuple(teacher_feat.shape)}"
        )
    side, teacher_side = projected_student.shape[2], teacher_feat.shape[2]
    if teacher_side < side:
        raise ValueError(
            f"teacher map {teacher_side}x{teacher_side} is smaller than the projected student "
            f"map {side}x{side}; pool the student first (SimKDHead's teacher_side)"
        )
    if teacher_side > side:
        teacher_feat = F.adaptive_avg_pool2d(teacher_feat, (side, side))
    return F.mse_loss(projected_student, teacher_feat.to(projected_student.dtype))


@dataclass(frozen=True)
class SimKDSettings:
    """Reference settings: total = ce_weight * CE + kd_weight * KD + feat_weight * simkd_loss."""

    factor: int
    feat_weight: float
    ce_weight: float
    kd_weight: float


_SIMKD_RUN = "DefangChen/SimKD scripts/run_distill.sh --distill simkd"


@dataclass
class SimKDOptions(MethodOptions):
    """SimKD's options: the authors' command for CIFAR-100 (resnet32x4 -> resnet8x4) and
    ImageNet (ResNet50 -> ResNet18) alike."""

    factor: int | None = option(
        2, source="DefangChen/SimKD train_student.py (-f default 2)", help="the projector's bottleneck factor"
    )
    feat_weight: float | None = option(1.0, source=_SIMKD_RUN + " -b 1", help="weight of the feature loss")
    ce_weight: float | None = option(0.0, source=_SIMKD_RUN + " -c 0", help="weight of CE on the SimKD logits")
    kd_weight: float | None = option(0.0, source=_SIMKD_RUN + " -d 0", help="weight of KD on the SimKD logits")
    temperature: float | None = option(
        4.0, source="DefangChen/SimKD train_student.py (--kd_T default 4)", help="temperature of the KD term"
    )


DEFAULT_SIMKD = SimKDSettings(**{k: v for k, v in SimKDOptions.defaults().items() if k != "temperature"})


# --------------------------------------------------------------------------- method
@register(
    "simkd",
    options=SimKDOptions,
    summary="SimKD: a projector to the teacher's width, MSE to its features, the teacher's classifier reused",
    paper="Chen et al., CVPR 2022; DefangChen/SimKD",
)
class SimKD(Method):
    """SimKD: total = feat_weight * simkd_loss (+ ce_weight * CE + kd_weight * KD on the SimKD
    logits, both 0 in the reference's command). The student's penult map goes through the
    projector and the teacher's classifier (``SimKDHead``, the student's ``simkd_head``), at
    training and at inference.

    The teacher's classifier and its map's side come from the store's static arrays (or the
    online teacher) through ``attach_teacher``; ``teacher_channels`` and ``teacher_side`` are
    recorded so that evaluate rebuilds the head (its weights then come from the checkpoint).
    """

    name = "simkd"
    #: the student classifies with the reused teacher classifier: its own stays, unused
    leaves_parameters_unused = True
    recorded_options = ("teacher_channels", "teacher_side")

    def __init__(
        self,
        factor: int | None = None,
        feat_weight: float | None = None,
        ce_weight: float | None = None,
        kd_weight: float | None = None,
        temperature: float | None = None,
        teacher_channels: int | None = None,
        teacher_side: int | None = None,
    ):
        if factor is not None and (int(factor) != float(factor) or int(factor) < 1):
            self._bad_option("factor", factor, "a positive integer")
        super().__init__(
            factor=DEFAULT_SIMKD.factor if factor is None else int(factor),
            feat_weight=DEFAULT_SIMKD.feat_weight if feat_weight is None else float(feat_weight),
            ce_weight=DEFAULT_SIMKD.ce_weight if ce_weight is None else float(ce_weight),
            kd_weight=DEFAULT_SIMKD.kd_weight if kd_weight is None else float(kd_weight),
            # used only by a KD term (kd_weight > 0)
            temperature=SimKDOptions.defaults()["temperature"] if temperature is None else float(temperature),
            teacher_channels=None if teacher_channels is None else int(teacher_channels),
            teacher_side=None if teacher_side is None else int(teacher_side),
        )
        self._classifier: tuple[torch.Tensor, torch.Tensor] | None = None

    def kinds(self) -> list:
        from kdpipe.targets import Logits, PenultMap

        return [PenultMap()] + ([Logits()] if self.options["kd_weight"] > 0 else [])

    def attach_teacher(self, info) -> None:
        from kdpipe.targets.stages import CLASSIFIER_BIAS, CLASSIFIER_WEIGHT, PENULT_SIDE

        missing = [n for n in (CLASSIFIER_WEIGHT, CLASSIFIER_BIAS, PENULT_SIDE) if n not in info.static]
        if missing:
            raise KdpipeError(
                f"Method 'simkd' needs the teacher's classifier ({', '.join(missing)} missing): "
                "extract the store with --methods simkd, or train with --online-teacher."
            )
        weight = torch.as_tensor(info.static[CLASSIFIER_WEIGHT], dtype=torch.float32)
        self._classifier = (weight, torch.as_tensor(info.static[CLASSIFIER_BIAS], dtype=torch.float32))
        self.options["teacher_channels"] = int(weight.shape[1])
        self.options["teacher_side"] = int(np.asarray(info.static[PENULT_SIDE]).reshape(-1)[0])

    def prepare_student(self, student, target_set=None):
        o = self.options
        if self._classifier is None:
            if o["teacher_channels"] is None:
                raise KdpipeError(
                    "Method 'simkd' needs the teacher's classifier: train from a store extracted "
                    "with --methods simkd, or with --online-teacher."
                )
            # evaluate's rebuild: the checkpoint brings the classifier's values
            classes = int(student.head().weight.shape[0])
            self._classifier = (torch.zeros(classes, o["teacher_channels"]), torch.zeros(classes))
        weight, bias = self._classifier
        student.set_reused_head(
            SimKDHead(
                student.feature_channels()["penult"],
                weight.shape[1],
                weight,
                bias,
                factor=o["factor"],
                teacher_side=o["teacher_side"],
            )
        )
        return student

    def loss(self, logits, feats, targets, labels):
        from kdpipe.methods.kd import kd_loss

        o = self.options
        feat = simkd_loss(feats["projected"], targets["penult_map"])
        total = o["feat_weight"] * feat
        parts = {"simkd": feat}
        if o["ce_weight"] > 0:
            parts["ce"] = F.cross_entropy(logits, labels)
            total = total + o["ce_weight"] * parts["ce"]
        if o["kd_weight"] > 0:
            parts["kd"] = kd_loss(logits, targets["logits"].to(logits.dtype), o["temperature"])
            total = total + o["kd_weight"] * parts["kd"]
        return total, loss_parts(**parts, total=total)

    def recipe(self, student_arch: str) -> dict:
        from kdpipe.methods.base import reference_recipe

        recipe = reference_recipe(student_arch, nesterov=False, dataset=self.dataset)
        if self.dataset == "imagenet":
            # DefangChen/SimKD scripts/run_distill.sh (ImageNet): batch 256, 120 epochs, lr 0.1 x0.1 at
            # 30/60/90, weight decay 1e-4
            recipe.update(batch_size=256, epochs=120, lr=0.1, milestones=[30, 60, 90], weight_decay=1e-4)
        return recipe
