"""Hinton knowledge distillation on logits (the `kd` method).

The loss follows mdistiller's `kd_loss` exactly: per sample, the Kullback-Leibler divergence
KL(softmax(t / T) || softmax(s / T)) is summed over the C classes, the sum is averaged over
the batch (PyTorch's ``reduction="batchmean"``, not the element mean), and the result is
multiplied by T^2 so its gradient scale does not shrink with the temperature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdpipe.methods.base import Method, loss_parts, reference_recipe
from kdpipe.methods.registry import MethodOptions, option, register
from kdpipe.targets import Logits

__all__ = ["kd_loss", "KD", "KDOptions"]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton KD loss.

    Args:
        student_logits: [B, C] raw student logits.
        teacher_logits: [B, C] raw teacher logits (no gradient is needed through them).
        temperature: T > 0.

    Returns:
        scalar: ``T**2 * mean_b sum_c p_t[b,c] * (log p_t[b,c] - log p_s[b,c])`` with
        ``p = softmax(logits / T)`` over classes.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"kd_loss expects student and teacher logits of the same shape [B, C]; got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.to(log_p_s.dtype) / t, dim=1)
    # kl_div(input=log q, target=log p, log_target=True) = p * (log p - log q), elementwise.
    per_element = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True)
    return per_element.sum(dim=1).mean() * (t * t)


@dataclass
class KDOptions(MethodOptions):
    """KD's options; defaults are mdistiller's CIFAR-100 values (ImageNet: ``KD.REFERENCE``)."""

    temperature: float | None = option(
        4.0, source="mdistiller/engine/cfg.py CFG.KD.TEMPERATURE", help="temperature T", yaml="KD.TEMPERATURE"
    )
    ce_weight: float | None = option(
        0.1, source="mdistiller/engine/cfg.py CFG.KD.LOSS.CE_WEIGHT", help="weight of CE", yaml="KD.LOSS.CE_WEIGHT"
    )
    kd_weight: float | None = option(
        0.9,
        source="mdistiller/engine/cfg.py CFG.KD.LOSS.KD_WEIGHT",
        help="weight of the KD term",
        yaml="KD.LOSS.KD_WEIGHT",
    )


@register(
    "kd",
    options=KDOptions,
    summary="Hinton KD: ce_weight * CE + kd_weight * T^2 KL(teacher || student) on softened logits",
    paper="Hinton et al., 2015; mdistiller/distillers/KD.py",
    yaml_names=("KD",),
)
class KD(Method):
    """CE on labels plus Hinton KD on the teacher's logits.

    Options left None take mdistiller's values for the data set when bound: CIFAR-100
    (``KDOptions``' defaults, mdistiller/engine/cfg.py CFG.KD) and ImageNet
    (configs/imagenet/r34_r18/kd.yaml: T 1, CE 0.5, KD 0.5).
    Total = ce_weight * CE + kd_weight * kd_loss.
    """

    name = "kd"
    REFERENCE = {
        "cifar": KDOptions.defaults(),
        "imagenet": {"temperature": 1.0, "ce_weight": 0.5, "kd_weight": 0.5},
    }

    def __init__(
        self, temperature: float | None = None, ce_weight: float | None = None, kd_weight: float | None = None
    ):
        if temperature is not None and not float(temperature) > 0:
            self._bad_option("temperature", temperature, "a positive number")
        given = {"temperature": temperature, "ce_weight": ce_weight, "kd_weight": kd_weight}
        self._given = {k: float(v) for k, v in given.items() if v is not None}
        super().__init__(**{**self.REFERENCE["cifar"], **self._given})

    def bind(self, teacher_arch=None, student_arch=None, dataset: str = "cifar"):
        """The data set's reference values for the options not given."""
        self.dataset = dataset
        self.options = {**self.REFERENCE[dataset], **self._given}
        return self

    def kinds(self) -> list:
        return [Logits()]

    def loss(self, logits, feats, targets, labels):
        o = self.options
        ce = F.cross_entropy(logits, labels)
        kd = kd_loss(logits, targets["logits"].to(logits.dtype), o["temperature"])
        total = o["ce_weight"] * ce + o["kd_weight"] * kd
        return total, loss_parts(ce=ce, kd=kd, total=total)

    def recipe(self, student_arch: str) -> dict:
        return reference_recipe(student_arch, nesterov=False, dataset=self.dataset)
