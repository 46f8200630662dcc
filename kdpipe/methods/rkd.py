"""Relational Knowledge Distillation (RKD, Park et al., CVPR 2019) as mdistiller computes it
(``mdistiller/distillers/RKD.py``): the student's pooled features keep the teacher's
distances between samples and angles between triples of samples.

For one network's pooled features e [B, D] (mdistiller's ``pooled_feat``):

- distances: d[i, j] = ||e_i - e_j|| computed as sqrt(max(|e_i|^2 + |e_j|^2 - 2 e_i.e_j, eps))
  (without the sqrt where ``squared``), the diagonal set to 0, then divided by the mean of
  its positive entries;
- angles: for every triple (i, j, k), the cosine between e_j - e_i and e_k - e_i (unit
  vectors by ``F.normalize``; a zero difference stays 0), [B, B, B].

rkd_loss = distance_weight * smooth_l1(d_s, d_t) + angle_weight * smooth_l1(a_s, a_t), each
smooth l1 (beta 1) averaged over its entries; the training loss is
``ce_weight * CE + feat_weight * rkd_loss``.

What the store holds: the teacher's pooled feature per view (``PooledFeature``, shared with
PKT). Distances and angles are between the samples of a batch, which change every epoch, so
the per-sample vector is what each sample contributes; nothing smaller gives them all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdpipe.methods.base import Method, loss_parts
from kdpipe.methods.registry import MethodOptions, option, register
from kdpipe.targets.pooled import PooledFeature, pooled_feature

__all__ = ["pairwise_distances", "triple_angles", "rkd_loss", "RKDOptions", "RKD"]


def pairwise_distances(e: torch.Tensor, squared: bool = False, eps: float = 1e-12) -> torch.Tensor:
    """[B, D] -> [B, B] distances (squared distances where ``squared``), clamped below at eps,
    with a zero diagonal (mdistiller's ``_pdist``)."""
    sq_norms = e.pow(2).sum(dim=1)
    dist = (sq_norms[:, None] + sq_norms[None, :] - 2.0 * (e @ e.T)).clamp(min=eps)
    if not squared:
        dist = dist.sqrt()
    eye = torch.eye(e.shape[0], dtype=torch.bool, device=e.device)
    return dist.masked_fill(eye, 0.0)


def triple_angles(e: torch.Tensor) -> torch.Tensor:
    """[B, D] -> [B * B * B]: cos of the angle at e_i between e_j - e_i and e_k - e_i, for
    (i, j, k) in row-major order."""
    unit = F.normalize(e[None, :, :] - e[:, None, :], p=2.0, dim=2)  # [i, j] = e_j - e_i
    return torch.bmm(unit, unit.transpose(1, 2)).reshape(-1)


def _scaled_distances(e: torch.Tensor, squared: bool, eps: float) -> torch.Tensor:
    dist = pairwise_distances(e, squared, eps)
    return dist / dist[dist > 0].mean()


def rkd_loss(
    student_feat: torch.Tensor,
    teacher_feat: torch.Tensor,
    squared: bool = False,
    eps: float = 1e-12,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
) -> torch.Tensor:
    """RKD between pooled features (see the module docstring).

    Args:
        student_feat: [B, ...] (flattened to [B, D_s]); teacher_feat: [B, ...] (flattened to
            [B, D_t]; no gradient flows into it). B >= 2 (distances need a pair).
        squared: compare squared distances; eps: the clamp of the squared distances.
        distance_weight / angle_weight: weights of the two terms.

    Returns:
        scalar: distance_weight * smooth_l1(d_s, d_t) + angle_weight * smooth_l1(a_s, a_t).
    """
    if student_feat.shape[0] != teacher_feat.shape[0] or student_feat.shape[0] < 2:
        raise ValueError(
            f"RKD compares the samples of one batch (at least 2, the same for both networks); got "
            f"{tuple(student_feat.shape)} and {tuple(teacher_feat.shape)}"
        )
    student = student_feat.reshape(student_feat.shape[0], -1)
    teacher = teacher_feat.reshape(teacher_feat.shape[0], -1).to(student.dtype).detach()
    with torch.no_grad():
        t_dist = _scaled_distances(teacher, squared, eps)
        t_angle = triple_angles(teacher)
    distance = F.smooth_l1_loss(_scaled_distances(student, squared, eps), t_dist)
    angle = F.smooth_l1_loss(triple_angles(student), t_angle)
    return distance_weight * distance + angle_weight * angle


@dataclass
class RKDOptions(MethodOptions):
    """RKD's options: mdistiller/engine/cfg.py CFG.RKD; its only CIFAR-100 config
    (configs/cifar100/rkd.yaml, resnet32x4 -> resnet8x4) keeps these values."""

    distance_weight: float | None = option(
        25.0,
        source="mdistiller/engine/cfg.py CFG.RKD.DISTANCE_WEIGHT",
        help="weight of the distance term",
        yaml="RKD.DISTANCE_WEIGHT",
    )
    angle_weight: float | None = option(
        50.0,
        source="mdistiller/engine/cfg.py CFG.RKD.ANGLE_WEIGHT",
        help="weight of the angle term",
        yaml="RKD.ANGLE_WEIGHT",
    )
    feat_weight: float | None = option(
        1.0,
        source="mdistiller/engine/cfg.py CFG.RKD.LOSS.FEAT_WEIGHT",
        help="weight of the RKD loss",
        yaml="RKD.LOSS.FEAT_WEIGHT",
    )
    ce_weight: float | None = option(
        1.0, source="mdistiller/engine/cfg.py CFG.RKD.LOSS.CE_WEIGHT", help="weight of CE", yaml="RKD.LOSS.CE_WEIGHT"
    )
    eps: float | None = option(
        1e-12,
        source="mdistiller/engine/cfg.py CFG.RKD.PDIST.EPSILON",
        help="lower clamp of the squared pairwise distances",
        yaml="RKD.PDIST.EPSILON",
    )
    squared: bool | None = option(
        False,
        source="mdistiller/engine/cfg.py CFG.RKD.PDIST.SQUARED",
        help="compare squared distances",
        yaml="RKD.PDIST.SQUARED",
    )


@register(
    "rkd",
    options=RKDOptions,
    summary="relational KD: CE + weight * (distance and angle terms of the batch's pooled features)",
    paper="Park et al., CVPR 2019; mdistiller/distillers/RKD.py",
    yaml_names=("RKD",),
)
class RKD(Method):
    """RKD: total = ce_weight * CE + feat_weight * rkd_loss(student pooled, teacher pooled)."""

    name = "rkd"

    def __init__(
        self,
        distance_weight: float | None = None,
        angle_weight: float | None = None,
        feat_weight: float | None = None,
        ce_weight: float | None = None,
        eps: float | None = None,
        squared: bool | None = None,
    ):
        if eps is not None and not float(eps) > 0:
            self._bad_option("eps", eps, "a positive number")
        given = {
            "distance_weight": distance_weight,
            "angle_weight": angle_weight,
            "feat_weight": feat_weight,
            "ce_weight": ce_weight,
            "eps": eps,
        }
        options = {**RKDOptions.defaults(), **{k: float(v) for k, v in given.items() if v is not None}}
        if squared is not None:
            options["squared"] = bool(squared)
        super().__init__(**options)

    def kinds(self) -> list:
        return [PooledFeature()]

    def loss(self, logits, feats, targets, labels):
        o = self.options
        rkd = rkd_loss(
            pooled_feature(feats["penult"]),
            targets["pooled_feat"],
            o["squared"],
            o["eps"],
            o["distance_weight"],
            o["angle_weight"],
        )
        ce = F.cross_entropy(logits, labels)
        total = o["ce_weight"] * ce + o["feat_weight"] * rkd
        return total, loss_parts(ce=ce, rkd=rkd, total=total)
