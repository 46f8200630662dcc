"""Attention Transfer (AT, Zagoruyko & Komodakis, ICLR 2017) as mdistiller computes it: pure
losses on lists of stage feature maps, and the attention maps a store can hold instead of the
teacher's features.

Per matched stage (mdistiller ``mdistiller/distillers/AT.py``):

1. spatial sizes: the larger of the student's and the teacher's feature maps is adaptive-
   average-pooled to the smaller one's size (the *feature*, before its attention map);
2. attention map of a feature f [B, D, h, w]: ``f.pow(p)`` averaged over the D channels,
   flattened to [B, h*w] and l2-normalised per sample (``F.normalize``: divided by
   max(norm, 1e-12)). mdistiller raises f to the power p without an absolute value; with its
   p = 2 (every config) that equals the paper's |f|^p;
3. stage loss: the mean over the B * h * w elements of the squared difference of the two
   maps.

The AT loss is the sum of the stage losses; mdistiller's training loss is
``ce_weight * CE + feat_weight * at_loss``.

Matched stages: mdistiller passes ``feats["feats"][1:]`` of student and teacher, i.e. every
stage output its models list except the first entry (the stem), and ``zip`` pairs them in
order, so when one network lists more stages its extra last ones are dropped. Per family
(mdistiller/models/cifar/*.py, imagenet/*.py), the stages are:

==================  =========================================================================
resnet (CIFAR)      outputs of layer1, layer2, layer3 (after their ReLU)
wrn                 outputs of block1, block2, block3 (block3 before the final BN + ReLU)
vgg                 ReLU of block1, block2, block3, block4
ShuffleV1 / V2      outputs of layer1, layer2, layer3 (ShuffleV2: before its conv2)
MobileNetV2 (CIFAR) outputs of blocks[1], blocks[2], blocks[4], blocks[6]
ResNet18/50 (CIFAR) outputs of layer1 ... layer4
ImageNet ResNet     ReLU of layer1 ... layer4
ImageNet MobileNetV1  its 2nd, 3rd and 4th listed features (its list has no stem entry)
==================  =========================================================================

Cached teacher (``attention_map`` / ``at_loss_from_maps``): the store holds the teacher's
attention map per stage, [B, h, w], instead of its feature [B, D, h, w]. Pooling a map is
not pooling a feature (the power is not linear), so where the student's stage is smaller
than the teacher's, the stored map must come from the teacher's feature pooled to the
student's size (``attention_map(feat, p, size=student_side)``), as mdistiller pools it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdpipe.errors import KdpipeError
from kdpipe.methods.base import Method, loss_parts
from kdpipe.methods.registry import MethodOptions, option, register
from kdpipe.targets.stages import AttentionMaps, attention_map

__all__ = [
    "attention_map",
    "at_loss",
    "at_loss_from_maps",
    "ATOptions",
    "ATSettings",
    "REFERENCE_AT",
    "DEFAULT_AT",
    "AT",
]


def _stage_loss_from_map(student_feat: torch.Tensor, teacher_map: torch.Tensor, p: float) -> torch.Tensor:
    """One stage: the student's feature [B, D, h, w] against the teacher's map [B, h', w']."""
    student_side, teacher_side = student_feat.shape[2], teacher_map.shape[1]
    if student_side < teacher_side:
        raise ValueError(
            f"teacher attention map {teacher_side}x{teacher_map.shape[2]} is larger than the "
            f"student's feature ({student_side}x{student_feat.shape[3]}); compute it with "
            f"attention_map(teacher_feat, p, size={student_side}) as mdistiller pools the "
            f"teacher's feature"
        )
    student_map = attention_map(student_feat, p, size=teacher_side)
    return (student_map - teacher_map.to(student_map.dtype)).pow(2).mean()


def at_loss_from_maps(
    student_feats: Sequence[torch.Tensor], teacher_maps: Sequence[torch.Tensor], p: float = 2.0
) -> torch.Tensor:
    """AT loss of student stage features against the teacher's stored attention maps.

    Args:
        student_feats: per matched stage, the student's feature [B, D_i, h_i, w_i].
        teacher_maps: per matched stage, the teacher's ``attention_map`` [B, h_i', w_i'],
            taken at the student's size where the student's stage is smaller (see the
            module docstring).
        p: the power of the attention map.

    Returns:
        scalar: sum over stages of the mean squared difference of the maps; equal to
        ``at_loss(student_feats, teacher_feats, p)`` when the maps are the teacher's.
    """
    if len(student_feats) != len(teacher_maps) or not student_feats:
        raise ValueError(
            f"AT needs one teacher map per student stage; got {len(student_feats)} student "
            f"features and {len(teacher_maps)} teacher maps"
        )
    losses = [_stage_loss_from_map(f, m, p) for f, m in zip(student_feats, teacher_maps)]
    return torch.stack(losses).sum()


def at_loss(
    student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor], p: float = 2.0
) -> torch.Tensor:
    """AT loss on stage features of both networks (mdistiller's ``at_loss``).

    Args:
        student_feats / teacher_feats: per matched stage, [B, D_i, h_i, w_i] and
            [B, D_i', h_i', w_i'] (channel counts may differ; the larger map is pooled to
            the smaller's size). Both lists must have the same length (select the matched
            stages first; mdistiller's ``zip`` would drop the extra ones silently).
        p: the power of the attention map.

    Returns:
        scalar: sum over stages of mean_{b, cells} (map_s - map_t)^2.
    """
    if len(student_feats) != len(teacher_feats):
        raise ValueError(
            f"AT matches stages pairwise; got {len(student_feats)} student and {len(teacher_feats)} teacher features"
        )
    maps = [attention_map(t, p, size=min(t.shape[2], s.shape[2])) for s, t in zip(student_feats, teacher_feats)]
    return at_loss_from_maps(student_feats, maps, p)


@dataclass(frozen=True)
class ATSettings:
    """One reference configuration of AT: total = ce_weight * CE + feat_weight * at_loss."""

    p: float
    feat_weight: float
    ce_weight: float


@dataclass
class ATOptions(MethodOptions):
    """AT's options; mdistiller's CIFAR-100 and ImageNet configs keep cfg.py's values."""

    p: float | None = option(
        2.0, source="mdistiller/engine/cfg.py CFG.AT.P", help="power p of the attention maps", yaml="AT.P"
    )
    feat_weight: float | None = option(
        1000.0,
        source="mdistiller/engine/cfg.py CFG.AT.LOSS.FEAT_WEIGHT",
        help="weight of the attention-transfer loss",
        yaml="AT.LOSS.FEAT_WEIGHT",
    )
    ce_weight: float | None = option(
        1.0, source="mdistiller/engine/cfg.py CFG.AT.LOSS.CE_WEIGHT", help="weight of CE", yaml="AT.LOSS.CE_WEIGHT"
    )


DEFAULT_AT = ATSettings(**ATOptions.defaults())

# (teacher, student) -> settings of the mdistiller config named beside (all cfg.py defaults).
REFERENCE_AT: dict[tuple[str, str], ATSettings] = {
    ("resnet32x4", "resnet8x4"): DEFAULT_AT,  # configs/cifar100/at.yaml
    ("imagenet_resnet34", "imagenet_resnet18"): DEFAULT_AT,  # configs/imagenet/r34_r18/at.yaml
    # configs/imagenet/r50_mv1/at.yaml: mdistiller's MobileNetV1 (kdpipe's imagenet_mobilenet_v1)
    ("imagenet_resnet50", "imagenet_mobilenet_v1"): DEFAULT_AT,
}


# --------------------------------------------------------------------------- method
def _teacher_map(targets: dict, stage: int, student_side: int) -> torch.Tensor:
    """The stored teacher map of ``stage`` (1-based) that mdistiller's pooling rule asks for:
    the native map where the student's side is at least the teacher's, the half-side map where
    it is half; any other ratio is one sentence."""
    native = targets[f"at_stage{stage}"]
    if student_side >= native.shape[1]:
        return native
    half = targets[f"at_stage{stage}_half"]
    if student_side == half.shape[1]:
        return half
    raise KdpipeError(
        f"AT stage {stage}: the student's map is {student_side} wide, the teacher's "
        f"{native.shape[1]}; the store holds the teacher's maps at its side and at half of it only."
    )


@register(
    "at",
    options=ATOptions,
    summary="attention transfer: CE + weight * MSE of l2-normalised stage attention maps",
    paper="Zagoruyko & Komodakis, ICLR 2017; mdistiller/distillers/AT.py",
    yaml_names=("AT",),
)
class AT(Method):
    """AT: total = ce_weight * CE + feat_weight * at_loss over the matched stages.

    Options left None take mdistiller/engine/cfg.py's CFG.AT (``DEFAULT_AT``: p 2, feat_weight
    1000, ce_weight 1). Stages are matched in order as mdistiller's ``zip`` does (the extra
    stages of the deeper list are dropped)."""

    name = "at"

    def __init__(self, p: float | None = None, feat_weight: float | None = None, ce_weight: float | None = None):
        if p is not None and not float(p) > 0:
            self._bad_option("p", p, "a positive number")
        given = {"p": p, "feat_weight": feat_weight, "ce_weight": ce_weight}
        super().__init__(**{**ATOptions.defaults(), **{k: float(v) for k, v in given.items() if v is not None}})

    def kinds(self) -> list:
        return [AttentionMaps(self.options["p"])]

    def prepare_student(self, student, target_set=None):
        student.collect_stages = True
        return student

    def loss(self, logits, feats, targets, labels):
        o = self.options
        student = feats["stages"]
        count = sum(1 for key in targets if key.startswith("at_stage") and not key.endswith("_half"))
        pairs = min(len(student), count)
        maps = [_teacher_map(targets, i + 1, student[i].shape[2]) for i in range(pairs)]
        at = at_loss_from_maps(student[:pairs], maps, o["p"])
        ce = F.cross_entropy(logits, labels)
        total = o["ce_weight"] * ce + o["feat_weight"] * at
        return total, loss_parts(ce=ce, at=at, total=total)
