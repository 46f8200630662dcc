"""Neuron Selectivity Transfer (NST, Huang & Wang, 2017) as mdistiller computes it
(``mdistiller/distillers/NST.py``): the student's stage features match the teacher's in the
maximum mean discrepancy of a squared-polynomial kernel between channels.

Per matched stage (mdistiller's ``feats["feats"][1:]`` of both networks, paired in order):

1. the larger feature map is adaptive-average-pooled to the smaller one's side;
2. each channel, flattened over its h * w cells, is l2-normalised: S [B, C_s, n], T [B, C_t, n];
3. with k(a, b) = (a . b)^2 between channel vectors,

       stage loss = mean k(T, T) + mean k(S, S) - 2 mean k(S, T),

   each mean over the batch and the channel pairs (B * C_t * C_t, B * C_s * C_s, B * C_s * C_t).

The NST loss is the sum of the stage losses; the training loss is
``ce_weight * CE + feat_weight * nst_loss``.

What the store holds (``NSTFactors``): the teacher enters only through its channel Gram over
cells, T^T T [n, n] (sum over channels c of t_c t_c^T), and its channel count:
sum_{c_s, c_t} (s . t)^2 = sum_{c_s} s^T (T^T T) s, and sum_{c, c'} (t_c . t_c')^2 = ||T^T T||_F^2.
Any F with F^T F = T^T T therefore gives the same loss in place of T; the store keeps
F / sqrt(C_t) with F = T where C_t <= n and F = R of T's QR decomposition ([n, n]) where
C_t > n, so a stage costs min(C_t, n) * n numbers instead of C_t * n and the mean over C_t
needs no stored count (``nst_factor``). On resnet32x4's last stage (256 channels, 8 x 8)
that is 64 rows instead of 256. As for AT, pooling a factor is not pooling the feature, so
each stage is stored at its side and at half of it (for students whose stages are half the
teacher's: ShuffleNets after a 32-wide stem); other side ratios where the student is the
smaller are one sentence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdpipe.errors import KdpipeError
from kdpipe.methods.base import Method, loss_parts
from kdpipe.methods.registry import MethodOptions, option, register
from kdpipe.targets.base import KindContext, StoreContents, StoredArray, TargetKind, TeacherOutputs

__all__ = ["nst_factor", "nst_stage_loss_from_factor", "nst_loss", "NSTFactors", "NSTOptions", "NST"]


def _channel_vectors(feat: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, C, h*w], each channel l2-normalised over its cells."""
    return F.normalize(feat.reshape(feat.shape[0], feat.shape[1], -1), p=2.0, dim=2)


def _pool_to(feat: torch.Tensor, side: int) -> torch.Tensor:
    return feat if feat.shape[2] == side else F.adaptive_avg_pool2d(feat, (side, side))


def _kernel_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[B, Ca, n], [B, Cb, n] -> [B]: sum over channel pairs of (a_i . b_j)^2."""
    return torch.bmm(a, b.transpose(1, 2)).pow(2).sum(dim=(1, 2))


def nst_factor(teacher_feat: torch.Tensor, side: int | None = None) -> torch.Tensor:
    """What the store keeps of one teacher stage: [B, C, h, w] -> [B, r, s, s], r = min(C, s*s).

    ``side``: pool the feature to side x side first (as mdistiller pools the larger map);
    None keeps its own side. The rows F / sqrt(C) satisfy F^T F = T^T T for the normalised
    channel vectors T (see the module docstring)."""
    if teacher_feat.dim() != 4:
        raise ValueError(f"nst_factor expects a feature map [B, C, h, w]; got {tuple(teacher_feat.shape)}")
    feat = teacher_feat if side is None else _pool_to(teacher_feat, int(side))
    batch, channels, h, w = feat.shape
    vectors = _channel_vectors(feat.float())
    factor = vectors if channels <= h * w else torch.linalg.qr(vectors, mode="r").R
    return (factor / math.sqrt(channels)).reshape(batch, -1, h, w)


def nst_stage_loss_from_factor(student_feat: torch.Tensor, teacher_factor: torch.Tensor) -> torch.Tensor:
    """One stage: the student's feature [B, C_s, h, w] against the teacher's ``nst_factor``
    [B, r, h', w'] with h' <= h (a larger student is pooled to h', as mdistiller does)."""
    side = teacher_factor.shape[2]
    if student_feat.shape[2] < side:
        raise ValueError(
            f"the teacher's NST factor is {side} wide, the student's feature {student_feat.shape[2]}; "
            f"take it with nst_factor(teacher_feat, side={student_feat.shape[2]}) as mdistiller pools the teacher"
        )
    s = _channel_vectors(_pool_to(student_feat, side))
    t = teacher_factor.reshape(teacher_factor.shape[0], teacher_factor.shape[1], -1).to(s.dtype).detach()
    channels = s.shape[1]
    per_sample = _kernel_sum(t, t) + _kernel_sum(s, s) / channels**2 - 2.0 * _kernel_sum(s, t) / channels
    return per_sample.mean()


def nst_loss(student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor]) -> torch.Tensor:
    """NST on stage features of both networks (mdistiller's ``nst_loss``).

    Args:
        student_feats / teacher_feats: per matched stage [B, C_i, h_i, w_i] and
            [B, C_i', h_i', w_i'] (square maps; the larger is pooled to the smaller's side).
            Both lists must have the same length (select the matched stages first).

    Returns:
        scalar: the sum over stages of the MMD of the squared-polynomial kernel.
    """
    if len(student_feats) != len(teacher_feats) or not student_feats:
        raise ValueError(
            f"NST matches stages pairwise; got {len(student_feats)} student and {len(teacher_feats)} teacher features"
        )
    losses = [
        nst_stage_loss_from_factor(s, nst_factor(t, min(s.shape[2], t.shape[2])))
        for s, t in zip(student_feats, teacher_feats)
    ]
    return torch.stack(losses).sum()


class NSTFactors(TargetKind):
    """Targets ``nst_stage{i}`` [B, r_i, h_i, w_i] and ``nst_stage{i}_half`` (the stage's
    feature pooled to half its side first) for the teacher's stages i = 1 .. n: ``nst_factor``
    of each (see the module docstring). ``stages`` None: read from the store when bound, or
    from the teacher's first outputs."""

    needs_stages = True
    name = "nst"

    def __init__(self, stages: int | None = None):
        self.stages = None if stages is None else int(stages)

    @classmethod
    def in_store(cls, contents: StoreContents) -> list[TargetKind]:
        return [cls()] if any(n.startswith("nst/stage") for n in contents.names) else []

    def __repr__(self) -> str:
        return f"NSTFactors(stages={self.stages})"

    def _paths(self) -> list[tuple[str, str, bool]]:
        out = []
        for i in range(1, (self.stages or 0) + 1):
            out += [(f"nst/stage{i}", f"nst_stage{i}", False), (f"nst/stage{i}_half", f"nst_stage{i}_half", True)]
        return out

    @property
    def target_keys(self) -> tuple[str, ...]:
        return tuple(key for _, key, _ in self._paths())

    @property
    def storage(self) -> dict[str, StoredArray]:
        return {
            path: StoredArray(
                "float16",
                f"NST factor of teacher stage {path.split('stage')[1].split('_')[0]}"
                + (", feature pooled to half its side" if half else ""),
            )
            for path, _, half in self._paths()
        }

    def bind(self, ctx: KindContext) -> NSTFactors:
        if self.stages is None and ctx.available:
            self.stages = sum(1 for p in ctx.available if p.startswith("nst/stage") and not p.endswith("_half")) or None
        return self

    def online(self, out: TeacherOutputs) -> dict[str, torch.Tensor]:
        feats = out.feats["stages"]
        if self.stages is None:
            self.stages = len(feats)
        if len(feats) < self.stages:
            raise KdpipeError(f"The teacher lists {len(feats)} stages; the store's NST factors need {self.stages}.")
        rows = {}
        for i, feat in enumerate(feats[: self.stages], start=1):
            rows[f"nst/stage{i}"] = nst_factor(feat)
            rows[f"nst/stage{i}_half"] = nst_factor(feat, max(1, feat.shape[2] // 2))
        return rows

    def targets(self, rows):
        return {key: rows[path].float() for path, key, _ in self._paths()}

    def warp(self, rows, policy, params):
        # the factor rows are maps over the teacher's cells; moved like the maps they come from
        return {k: policy.apply_maps(v.float(), params, mode="bilinear") for k, v in rows.items()}


@dataclass
class NSTOptions(MethodOptions):
    """NST's options: mdistiller/engine/cfg.py CFG.NST; its only CIFAR-100 config
    (configs/cifar100/nst.yaml, resnet32x4 -> resnet8x4) keeps these values."""

    feat_weight: float | None = option(
        50.0,
        source="mdistiller/engine/cfg.py CFG.NST.LOSS.FEAT_WEIGHT",
        help="weight of the NST loss",
        yaml="NST.LOSS.FEAT_WEIGHT",
    )
    ce_weight: float | None = option(
        1.0, source="mdistiller/engine/cfg.py CFG.NST.LOSS.CE_WEIGHT", help="weight of CE", yaml="NST.LOSS.CE_WEIGHT"
    )


def _teacher_factor(targets: dict, stage: int, student_side: int) -> torch.Tensor:
    """The stored factor of ``stage`` that mdistiller's pooling asks for (as AT's maps)."""
    native = targets[f"nst_stage{stage}"]
    if student_side >= native.shape[2]:
        return native
    half = targets[f"nst_stage{stage}_half"]
    if student_side == half.shape[2]:
        return half
    raise KdpipeError(
        f"NST stage {stage}: the student's map is {student_side} wide, the teacher's {native.shape[2]}; "
        f"the store holds the teacher's factors at its side and at half of it only."
    )


@register(
    "nst",
    options=NSTOptions,
    summary="neuron selectivity transfer: CE + weight * polynomial-kernel MMD between stage channels",
    paper="Huang & Wang, arXiv 1707.01219; mdistiller/distillers/NST.py",
    yaml_names=("NST",),
)
class NST(Method):
    """NST: total = ce_weight * CE + feat_weight * nst_loss over the matched stages (paired
    in order; the extra stages of the longer list are dropped, as mdistiller's ``zip``)."""

    name = "nst"

    def __init__(self, feat_weight: float | None = None, ce_weight: float | None = None):
        given = {"feat_weight": feat_weight, "ce_weight": ce_weight}
        super().__init__(**{**NSTOptions.defaults(), **{k: float(v) for k, v in given.items() if v is not None}})

    def kinds(self) -> list:
        return [NSTFactors()]

    def prepare_student(self, student, target_set=None):
        student.collect_stages = True
        return student

    def loss(self, logits, feats, targets, labels):
        o = self.options
        student = feats["stages"]
        count = sum(1 for key in targets if key.startswith("nst_stage") and not key.endswith("_half"))
        pairs = min(len(student), count)
        losses = [
            nst_stage_loss_from_factor(student[i], _teacher_factor(targets, i + 1, student[i].shape[2]))
            for i in range(pairs)
        ]
        nst = torch.stack(losses).sum()
        ce = F.cross_entropy(logits, labels)
        total = o["ce_weight"] * ce + o["feat_weight"] * nst
        return total, loss_parts(ce=ce, nst=nst, total=total)
