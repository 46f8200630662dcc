"""Probabilistic Knowledge Transfer (PKT, Passalis & Tefas, ECCV 2018) as mdistiller computes
it (``mdistiller/distillers/PKT.py``): the student's pooled feature learns the teacher's
distribution of cosine similarities within the batch.

For the pooled features f [B, D] of one network (mdistiller's ``pooled_feat``):

1. each row divided by (its l2 norm + eps); NaNs set to 0;
2. pairwise cosine similarities K = f f^T [B, B], moved to [0, 1] by (K + 1) / 2;
3. each row divided by its sum: P[i, j], a distribution over the batch per sample i.

The loss is mean_{i, j} P_t[i, j] * log((P_t[i, j] + eps) / (P_s[i, j] + eps)), the mean over
all B * B entries, with eps = 1e-7 (fixed in mdistiller's ``pkt_loss``); the training loss is
``ce_weight * CE + feat_weight * pkt_loss``.

What the store holds: the teacher's pooled feature per view (``PooledFeature``, D numbers a
view): the loss reads nothing else of the teacher, and each sample's row of P_t comes from
the rows of the batch it is drawn with, so the vectors themselves are stored, not P_t.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdpipe.methods.base import Method, loss_parts
from kdpipe.methods.registry import MethodOptions, option, register
from kdpipe.targets.pooled import PooledFeature, pooled_feature

__all__ = ["pkt_loss", "PKTOptions", "PKT", "PKT_EPS"]

#: the eps of mdistiller's ``pkt_loss`` (its default argument; the distiller never sets it)
PKT_EPS = 1e-7


def _similarity_distribution(feat: torch.Tensor, eps: float) -> torch.Tensor:
    """[B, D] -> [B, B]: per row, the batch's cosine similarities in [0, 1], summing to 1."""
    unit = feat / (feat.norm(dim=1, keepdim=True) + eps)
    unit = torch.where(torch.isnan(unit), torch.zeros_like(unit), unit)  # mdistiller: x[x != x] = 0
    similarity = (unit @ unit.T + 1.0) / 2.0
    return similarity / similarity.sum(dim=1, keepdim=True)


def pkt_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, eps: float = PKT_EPS) -> torch.Tensor:
    """PKT between pooled features (see the module docstring).

    Args:
        student_feat: [B, D_s]; teacher_feat: [B, D_t] (no gradient needed through it; the
            widths may differ: only each network's B x B similarities are compared).
        eps: added to the norms and inside the log ratio.

    Returns:
        scalar: the mean over the B * B entries of P_t * log((P_t + eps) / (P_s + eps)).
    """
    if student_feat.dim() != 2 or teacher_feat.dim() != 2 or student_feat.shape[0] != teacher_feat.shape[0]:
        raise ValueError(
            f"PKT expects pooled features [B, D] with the same batch; got {tuple(student_feat.shape)} "
            f"and {tuple(teacher_feat.shape)}"
        )
    p_s = _similarity_distribution(student_feat, eps)
    p_t = _similarity_distribution(teacher_feat.to(student_feat.dtype), eps)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


@dataclass
class PKTOptions(MethodOptions):
    """PKT's options: mdistiller/engine/cfg.py CFG.PKT; its only CIFAR-100 config
    (configs/cifar100/pkt.yaml, resnet32x4 -> resnet8x4) keeps these values."""

    feat_weight: float | None = option(
        30000.0,
        source="mdistiller/engine/cfg.py CFG.PKT.LOSS.FEAT_WEIGHT",
        help="weight of the PKT loss",
        yaml="PKT.LOSS.FEAT_WEIGHT",
    )
    ce_weight: float | None = option(
        1.0, source="mdistiller/engine/cfg.py CFG.PKT.LOSS.CE_WEIGHT", help="weight of CE", yaml="PKT.LOSS.CE_WEIGHT"
    )


@register(
    "pkt",
    options=PKTOptions,
    summary="probabilistic KT: CE + weight * KL of the batch's cosine-similarity distributions of pooled features",
    paper="Passalis & Tefas, ECCV 2018; mdistiller/distillers/PKT.py",
    yaml_names=("PKT",),
)
class PKT(Method):
    """PKT: total = ce_weight * CE + feat_weight * pkt_loss(student pooled, teacher pooled)."""

    name = "pkt"

    def __init__(self, feat_weight: float | None = None, ce_weight: float | None = None):
        given = {"feat_weight": feat_weight, "ce_weight": ce_weight}
        super().__init__(**{**PKTOptions.defaults(), **{k: float(v) for k, v in given.items() if v is not None}})

    def kinds(self) -> list:
        return [PooledFeature()]

    def loss(self, logits, feats, targets, labels):
        o = self.options
        pkt = pkt_loss(pooled_feature(feats["penult"]), targets["pooled_feat"])
        ce = F.cross_entropy(logits, labels)
        total = o["ce_weight"] * ce + o["feat_weight"] * pkt
        return total, loss_parts(ce=ce, pkt=pkt, total=total)
