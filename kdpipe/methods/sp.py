"""Similarity-Preserving KD (SP, Tung & Mori, ICCV 2019) as mdistiller computes it
(``mdistiller/distillers/SP.py``): the student's last stage output learns the teacher's
batch similarity (Gram) matrix.

For one network's feature f [B, D, h, w] flattened to [B, D*h*w]:

    G = f f^T  [B, B],  each row l2-normalised (``F.normalize``: divided by max(norm, 1e-12)).

The stage loss is ||G_t - G_s||_F^2 / B^2 (channel counts and sizes of the two networks may
differ: only the B x B matrices are compared). mdistiller sums it over the pairs of its
lists and passes one pair: the last entry of each network's ``feats["feats"]``, the output
of its last stage (``feats["stages"][-1]`` in kdpipe; for a WRN before its final BN + ReLU,
for ShuffleNetV2 before its conv2: see ``kdpipe.methods.at``). The training loss is
``ce_weight * CE + feat_weight * sp_loss``.

What the store holds: the teacher's last stage output per view (``LastStage``). G_t's
entries are inner products between the samples of a batch, and which samples share a batch
changes every epoch, so each sample needs its whole flattened feature: no smaller form
gives every inner product (there are far more stored views than dimensions). It is as large
as FitNet's hint (docs/BENCHMARKS.md, "Store sizes").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdpipe.errors import KdpipeError
from kdpipe.methods.base import Method, loss_parts
from kdpipe.methods.registry import MethodOptions, option, register
from kdpipe.targets.base import StoreContents, StoredArray, TargetKind, TeacherOutputs

__all__ = ["similarity_loss", "sp_loss", "SPOptions", "SP", "LastStage"]


def _normalized_gram(feat: torch.Tensor) -> torch.Tensor:
    """[B, ...] -> [B, B]: the Gram matrix of the flattened rows, each row l2-normalised."""
    flat = feat.reshape(feat.shape[0], -1)
    return F.normalize(flat @ flat.T, p=2.0, dim=1)


def similarity_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """One pair: ||G_t - G_s||_F^2 / B^2 (scalar).

    Args:
        student_feat: [B, D_s, h_s, w_s] (any trailing shape); teacher_feat: [B, D_t, h_t, w_t]
            (no gradient needed through it).
    """
    if student_feat.shape[0] != teacher_feat.shape[0]:
        raise ValueError(
            f"SP compares batches of the same size; got {student_feat.shape[0]} student and "
            f"{teacher_feat.shape[0]} teacher rows"
        )
    batch = student_feat.shape[0]
    diff = _normalized_gram(teacher_feat.to(student_feat.dtype)) - _normalized_gram(student_feat)
    return diff.pow(2).sum() / (batch * batch)


def sp_loss(student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor]) -> torch.Tensor:
    """The sum of ``similarity_loss`` over matched pairs (mdistiller passes one: the last stages).

    Args:
        student_feats / teacher_feats: lists of the same length of [B, ...] features.
    """
    if len(student_feats) != len(teacher_feats) or not student_feats:
        raise ValueError(
            f"SP matches features pairwise; got {len(student_feats)} student and {len(teacher_feats)} teacher features"
        )
    return torch.stack([similarity_loss(s, t) for s, t in zip(student_feats, teacher_feats)]).sum()


class LastStage(TargetKind):
    """Target ``stage_last`` [B, D, h, w] float32: the teacher's last stage output
    (mdistiller's ``feats["feats"][-1]``), every view."""

    name = "stage_last"
    target_keys = ("stage_last",)
    needs_stages = True

    @classmethod
    def in_store(cls, contents: StoreContents) -> list[TargetKind]:
        return [cls()] if cls.name in contents.names else []

    @property
    def storage(self) -> dict[str, StoredArray]:
        return {self.name: StoredArray("float16", "teacher's last stage output feats[-1] (SP)")}

    def online(self, out: TeacherOutputs) -> dict[str, torch.Tensor]:
        stages = out.feats.get("stages")
        if not stages:
            raise KdpipeError("SP needs the teacher's stage outputs; this teacher lists none.")
        return {self.name: stages[-1].float()}

    def targets(self, rows):
        return {"stage_last": rows[self.name].float()}

    def warp(self, rows, policy, params):
        return {self.name: policy.apply_maps(rows[self.name].float(), params, mode="bilinear")}


@dataclass
class SPOptions(MethodOptions):
    """SP's options: mdistiller/engine/cfg.py CFG.SP; its only CIFAR-100 config
    (configs/cifar100/sp.yaml, resnet32x4 -> resnet8x4) keeps these values."""

    feat_weight: float | None = option(
        3000.0,
        source="mdistiller/engine/cfg.py CFG.SP.LOSS.FEAT_WEIGHT",
        help="weight of the similarity-preserving loss",
        yaml="SP.LOSS.FEAT_WEIGHT",
    )
    ce_weight: float | None = option(
        1.0, source="mdistiller/engine/cfg.py CFG.SP.LOSS.CE_WEIGHT", help="weight of CE", yaml="SP.LOSS.CE_WEIGHT"
    )


@register(
    "sp",
    options=SPOptions,
    summary="similarity-preserving KD: CE + weight * squared difference of the batch Gram matrices of the last stage",
    paper="Tung & Mori, ICCV 2019; mdistiller/distillers/SP.py",
    yaml_names=("SP",),
)
class SP(Method):
    """SP: total = ce_weight * CE + feat_weight * similarity_loss(student last stage, teacher's)."""

    name = "sp"

    def __init__(self, feat_weight: float | None = None, ce_weight: float | None = None):
        given = {"feat_weight": feat_weight, "ce_weight": ce_weight}
        super().__init__(**{**SPOptions.defaults(), **{k: float(v) for k, v in given.items() if v is not None}})

    def kinds(self) -> list:
        return [LastStage()]

    def prepare_student(self, student, target_set=None):
        student.collect_stages = True
        return student

    def loss(self, logits, feats, targets, labels):
        o = self.options
        sp = similarity_loss(feats["stages"][-1], targets["stage_last"])
        ce = F.cross_entropy(logits, labels)
        total = o["ce_weight"] * ce + o["feat_weight"] * sp
        return total, loss_parts(ce=ce, sp=sp, total=total)
