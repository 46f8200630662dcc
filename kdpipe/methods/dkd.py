"""Decoupled Knowledge Distillation (DKD, Zhao et al., CVPR 2022): pure losses and the
reference hyper-parameters of mdistiller (megvii-research/mdistiller, the DKD authors' code).

With p = softmax(z / T) over the C classes and g the label of a sample:

- TCKD (target-class KD) compares the binary distributions b = (p_g, 1 - p_g):
  ``KL(b_teacher || b_student)``;
- NCKD (non-target-class KD) compares the distributions over the C - 1 other classes,
  renormalised: ``p~_j = p_j / (1 - p_g)``, j != g: ``KL(p~_teacher || p~_student)``.

Each is summed over its categories, averaged over the batch and multiplied by T^2, and

    DKD = alpha * TCKD + beta * NCKD.

mdistiller's training loss is ``ce_weight * CE + min(epoch / warmup, 1) * DKD`` with its
1-based epoch counter (``dkd_warmup_factor``).

Numerics: kdpipe computes both terms in log space (log-sum-exp over the target class, the
other classes and all classes; NCKD on the C - 1 gathered non-target logits). mdistiller
takes ``log`` of summed softmax probabilities and masks the target class by subtracting
1000 from its scaled logit; the two agree to float rounding (tests/test_losses_extra.py
checks it against values mdistiller produced) except where mdistiller's probabilities
underflow to 0, where it returns inf or nan and kdpipe stays finite.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdpipe.methods.base import Method, loss_parts, reference_recipe
from kdpipe.methods.registry import MethodOptions, option, register
from kdpipe.targets import Logits

__all__ = [
    "dkd_loss",
    "dkd_terms",
    "dkd_warmup_factor",
    "DKDOptions",
    "DKDSettings",
    "REFERENCE_DKD",
    "DEFAULT_DKD",
    "DKD",
]


def _check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> None:
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"DKD expects student and teacher logits of the same shape [B, C]; got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if student_logits.shape[1] < 2:
        raise ValueError("DKD needs at least two classes (it splits target and non-target).")
    if labels.shape != student_logits.shape[:1]:
        raise ValueError(f"DKD expects labels [B] = [{student_logits.shape[0]}]; got {tuple(labels.shape)}")


def _binary_log_probs(scaled: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """[B, C] scaled logits -> [B, 2] log (p_target, p_other), in log space."""
    log_all = torch.logsumexp(scaled, dim=1)
    log_target = scaled.masked_fill(~target_mask, float("-inf")).logsumexp(dim=1)
    log_other = scaled.masked_fill(target_mask, float("-inf")).logsumexp(dim=1)
    return torch.stack([log_target - log_all, log_other - log_all], dim=1)


def _non_target(scaled: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """[B, C] -> [B, C - 1]: each row without its target class, other classes in order."""
    batch, classes = scaled.shape
    return scaled[~target_mask].view(batch, classes - 1)


def _kl_log(log_p_student: torch.Tensor, log_p_teacher: torch.Tensor) -> torch.Tensor:
    """sum over categories of p_t (log p_t - log p_s), averaged over the batch."""
    per_element = F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True)
    return per_element.sum(dim=1).mean()


def dkd_terms(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(TCKD, NCKD), each a scalar already multiplied by T^2 (see the module docstring).

    Args:
        student_logits: [B, C] raw student logits.
        teacher_logits: [B, C] raw teacher logits (no gradient needed through them).
        labels: [B] int64 class indices in [0, C).
        temperature: T > 0.
    """
    _check_logits(student_logits, teacher_logits, labels)
    t = float(temperature)
    s = student_logits / t
    tt = teacher_logits.to(s.dtype) / t
    target_mask = F.one_hot(labels.long(), s.shape[1]).bool()
    tckd = _kl_log(_binary_log_probs(s, target_mask), _binary_log_probs(tt, target_mask))
    nckd = _kl_log(
        F.log_softmax(_non_target(s, target_mask), dim=1), F.log_softmax(_non_target(tt, target_mask), dim=1)
    )
    return tckd * (t * t), nckd * (t * t)


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    beta: float,
    temperature: float,
) -> torch.Tensor:
    """DKD = alpha * TCKD + beta * NCKD (scalar), as mdistiller's ``dkd_loss`` computes it.

    Args:
        student_logits: [B, C] raw student logits.
        teacher_logits: [B, C] raw teacher logits.
        labels: [B] int64 class indices.
        alpha: weight of TCKD; beta: weight of NCKD; temperature: T > 0.
    """
    tckd, nckd = dkd_terms(student_logits, teacher_logits, labels, temperature)
    return alpha * tckd + beta * nckd


def dkd_warmup_factor(epoch: int, warmup: int) -> float:
    """mdistiller's ramp of the DKD loss: ``min(epoch / warmup, 1.0)``.

    ``epoch`` counts from 1 as mdistiller's trainer does (its first epoch gets 1 / warmup,
    never 0): a loop counting from 0 passes ``epoch + 1``. ``warmup`` must be positive
    (mdistiller divides by it).
    """
    if int(warmup) < 1:
        raise ValueError(f"DKD warmup must be a positive number of epochs, got {warmup!r}")
    if int(epoch) < 1:
        raise ValueError(f"DKD epochs count from 1 (mdistiller's trainer), got {epoch!r}")
    return min(int(epoch) / int(warmup), 1.0)


@dataclass(frozen=True)
class DKDSettings:
    """One reference configuration of DKD."""

    alpha: float
    beta: float
    temperature: float
    warmup: int
    ce_weight: float


@dataclass
class DKDOptions(MethodOptions):
    """DKD's options: mdistiller/engine/cfg.py CFG.DKD; the CIFAR-100 configs override BETA
    only, the ImageNet ones BETA, T, WARMUP and CE_WEIGHT (``REFERENCE_DKD``)."""

    alpha: float | None = option(
        1.0, source="mdistiller/engine/cfg.py CFG.DKD.ALPHA", help="TCKD weight", yaml="DKD.ALPHA"
    )
    beta: float | None = option(
        8.0,
        source="mdistiller/engine/cfg.py CFG.DKD.BETA (the pair's config where one exists)",
        help="NCKD weight",
        yaml="DKD.BETA",
    )
    temperature: float | None = option(
        4.0, source="mdistiller/engine/cfg.py CFG.DKD.T", help="temperature T", yaml="DKD.T"
    )
    warmup: int | None = option(
        20,
        source="mdistiller/engine/cfg.py CFG.DKD.WARMUP",
        help="epochs of the DKD loss's linear warm-up",
        yaml="DKD.WARMUP",
    )
    ce_weight: float | None = option(
        1.0, source="mdistiller/engine/cfg.py CFG.DKD.CE_WEIGHT", help="weight of CE", yaml="DKD.CE_WEIGHT"
    )


DEFAULT_DKD = DKDSettings(**DKDOptions.defaults())


def _cifar(beta: float) -> DKDSettings:
    return dataclasses.replace(DEFAULT_DKD, beta=beta)


# (teacher, student) in kdpipe's names -> DKD settings of the mdistiller config named beside.
# The CAT-KD repository's configs/cifar100/dkd/*.yaml are copies (same DKD values).
REFERENCE_DKD: dict[tuple[str, str], DKDSettings] = {
    ("resnet56", "resnet20"): _cifar(2.0),  # configs/cifar100/dkd/res56_res20.yaml
    ("resnet110", "resnet32"): _cifar(2.0),  # configs/cifar100/dkd/res110_res32.yaml
    ("resnet32x4", "resnet8x4"): _cifar(8.0),  # configs/cifar100/dkd/res32x4_res8x4.yaml
    ("wrn_40_2", "wrn_16_2"): _cifar(6.0),  # configs/cifar100/dkd/wrn40_2_wrn_16_2.yaml
    ("wrn_40_2", "wrn_40_1"): _cifar(6.0),  # configs/cifar100/dkd/wrn40_2_wrn_40_1.yaml
    ("vgg13", "vgg8"): _cifar(6.0),  # configs/cifar100/dkd/vgg13_vgg8.yaml
    ("vgg13", "MobileNetV2"): _cifar(6.0),  # configs/cifar100/dkd/vgg13_mv2.yaml
    ("ResNet50", "MobileNetV2"): _cifar(8.0),  # configs/cifar100/dkd/res50_mv2.yaml
    ("resnet32x4", "ShuffleV1"): _cifar(8.0),  # configs/cifar100/dkd/res32x4_shuv1.yaml
    ("resnet32x4", "ShuffleV2"): _cifar(8.0),  # configs/cifar100/dkd/res32x4_shuv2.yaml
    ("wrn_40_2", "ShuffleV1"): _cifar(8.0),  # configs/cifar100/dkd/wrn40_2_shuv1.yaml
    # configs/imagenet/r34_r18/dkd.yaml (ALPHA left at 1.0)
    ("imagenet_resnet34", "imagenet_resnet18"): DKDSettings(1.0, 0.5, 1.0, 1, 1.0),
    # configs/imagenet/r50_mv1/dkd.yaml: mdistiller's MobileNetV1 (kdpipe's imagenet_mobilenet_v1)
    ("imagenet_resnet50", "imagenet_mobilenet_v1"): DKDSettings(1.0, 2.0, 1.0, 1, 1.0),
}


# --------------------------------------------------------------------------- method
@register(
    "dkd",
    options=DKDOptions,
    summary="decoupled KD: ce_weight * CE + warm-up * (alpha * TCKD + beta * NCKD)",
    paper="Zhao et al., CVPR 2022; mdistiller/distillers/DKD.py",
    yaml_names=("DKD",),
)
class DKD(Method):
    """DKD: total = ce_weight * CE + min(epoch / warmup, 1) * (alpha * TCKD + beta * NCKD).

    Options left None take the bound pair's mdistiller config (``REFERENCE_DKD``), else
    mdistiller/engine/cfg.py's CFG.DKD (``DEFAULT_DKD``). The epoch is mdistiller's 1-based
    one: the loop's ``begin_epoch(e)`` sets e + 1.
    """

    name = "dkd"
    _FIELDS = ("alpha", "beta", "temperature", "warmup", "ce_weight")

    def __init__(
        self,
        alpha: float | None = None,
        beta: float | None = None,
        temperature: float | None = None,
        warmup: int | None = None,
        ce_weight: float | None = None,
    ):
        if temperature is not None and not float(temperature) > 0:
            self._bad_option("temperature", temperature, "a positive number")
        if warmup is not None and (int(warmup) != float(warmup) or int(warmup) < 1):
            self._bad_option("warmup", warmup, "a positive number of epochs")
        given = {"alpha": alpha, "beta": beta, "temperature": temperature, "warmup": warmup, "ce_weight": ce_weight}
        self._given = {k: (int(v) if k == "warmup" else float(v)) for k, v in given.items() if v is not None}
        super().__init__(**self._settings(DEFAULT_DKD))
        self._epoch = 1

    def _settings(self, ref: DKDSettings) -> dict:
        return {**{k: getattr(ref, k) for k in self._FIELDS}, **self._given}

    def bind(self, teacher_arch=None, student_arch=None, dataset: str = "cifar"):
        from kdpipe.models.registry import canonical_or_same

        self.dataset = dataset
        known = teacher_arch is not None and student_arch is not None
        pair = (canonical_or_same(teacher_arch), canonical_or_same(student_arch)) if known else None
        self.options = self._settings(REFERENCE_DKD.get(pair, DEFAULT_DKD) if pair else DEFAULT_DKD)
        return self

    def kinds(self) -> list:
        return [Logits()]

    def begin_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch) + 1

    def loss(self, logits, feats, targets, labels):
        o = self.options
        ce = F.cross_entropy(logits, labels)
        tckd, nckd = dkd_terms(logits, targets["logits"].to(logits.dtype), labels, o["temperature"])
        dkd = o["alpha"] * tckd + o["beta"] * nckd
        total = o["ce_weight"] * ce + dkd_warmup_factor(self._epoch, o["warmup"]) * dkd
        return total, loss_parts(ce=ce, tckd=tckd, nckd=nckd, total=total)

    def recipe(self, student_arch: str) -> dict:
        # mdistiller configs/cifar100/dkd/*.yaml and configs/imagenet/*/dkd.yaml: its usual schedules
        return reference_recipe(student_arch, nesterov=False, dataset=self.dataset)
