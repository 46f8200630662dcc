"""Self-supervised KD with SVD (KDSVD, Lee et al., ECCV 2018) as mdistiller computes it
(``mdistiller/distillers/KDSVD.py``): radial-basis relations between the leading right
singular vectors of consecutive stages.

Per matched stage i (mdistiller's ``feats["feats"][1:]`` of both networks, paired in order):

1. the feature [B, C, H, W] is viewed as [B, C*H, W], as mdistiller reshapes its NCHW
   tensors (the singular vectors live on the W columns), and decomposed (``torch.svd``;
   non-finite entries set to 0);
2. the teacher keeps its first k right singular vectors v_t [B, W, k] and singular values
   s_t [B, k], each l2-normalised (vectors over W, values over k); the student its first
   k + 3 vectors v_s [B, W, k + 3];
3. alignment: for each teacher vector j, the student vector of largest |cosine| with it,
   times the sign of that cosine, becomes the student's j-th (ties: their sum); both sides
   are then scaled by the *teacher's* s_t;
4. from the second stage on, with d(a, b) = exp(-(a - b)^2 / 8) between every entry of this
   stage's vectors and the previous stage's ([B, W_i, W_{i-1}, k]), the stage adds
   sum (d_s - d_t)^2 (non-finite terms dropped).

The KDSVD loss is the sum over stages divided by B; the training loss is
``ce_weight * CE + feat_weight * kdsvd_loss``. The student's stages must have the teacher's
widths W (mdistiller's alignment multiplies [k + 3, W_s] by [W_t, k]).

Gradient: the SVD's derivative divides by s_i^2 - s_j^2, which is 0 where singular values
repeat, e.g. the zero ones of a map with several all-zero columns (blank image borders after a
ReLU): torch's gradient, and so mdistiller's port, is then NaN, and one such step ruins the
student. The KD-SVD authors' TensorFlow code (sseung0703/SSKD_SVD ``nets/Distillation.py``,
its registered ``gradient_svd``) zeroes the gradient of every sample whose gradient has a
non-finite entry (``crop_removenan``); kdpipe does the same at the SVD's input
(``right_singular``). Where torch's gradient is finite it is kept as it is.

What the store holds (``SVDTargets``): per teacher stage only v_t and s_t, (W + 1) * k
numbers a view (9 on resnet32x4's last stage at k = 1) instead of C * H * W. The loss reads
nothing else of the teacher. The signs of singular vectors are whatever the SVD returns for
the teacher's feature (as online); the stored ones are those of the extraction's device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdpipe.errors import KdpipeError
from kdpipe.methods.base import Method, loss_parts
from kdpipe.methods.registry import MethodOptions, option, register
from kdpipe.targets.base import KindContext, StoreContents, StoredArray, TargetKind, TeacherOutputs

__all__ = ["right_singular", "align_vectors", "kdsvd_loss", "kdsvd_loss_from_teacher", "SVDTargets", "KDSVD"]


def _finite(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _zero_nonfinite_samples(grad: torch.Tensor) -> torch.Tensor:
    """[B, ...] gradient -> the same with every sample that has a non-finite entry zeroed."""
    finite = torch.isfinite(grad).flatten(1).all(dim=1)
    return torch.where(finite.view(-1, *([1] * (grad.dim() - 1))), grad, torch.zeros_like(grad))


def right_singular(feat: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, C, H, W] -> (v [B, W, n'] the first n' = min(n, W) right singular vectors of the
    [B, C*H, W] view, each l2-normalised; s [B, n'] the singular values, l2-normalised).
    Backward: a sample whose SVD gradient is not finite gets none (module docstring)."""
    if feat.dim() != 4:
        raise ValueError(f"KDSVD expects stage features [B, C, H, W]; got {tuple(feat.shape)}")
    batch, channels, height, width = feat.shape
    matrix = feat.reshape(batch, channels * height, width).float()
    if matrix.requires_grad:
        matrix.register_hook(_zero_nonfinite_samples)
    _, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    v = _finite(vh.transpose(-2, -1))
    return F.normalize(v[:, :, :n], dim=1), F.normalize(_finite(s)[:, :n], dim=1)


def align_vectors(student_v: torch.Tensor, teacher_v: torch.Tensor) -> torch.Tensor:
    """[B, W, m], [B, W, k] -> [B, W, k]: per teacher vector, the student vector(s) of largest
    |cosine| with it, signed by that cosine (mdistiller's ``align_rsv``)."""
    if student_v.shape[1] != teacher_v.shape[1]:
        raise KdpipeError(
            f"KDSVD aligns singular vectors over the stage's width: the student's is {student_v.shape[1]}, "
            f"the teacher's {teacher_v.shape[1]}; mdistiller needs equal widths."
        )
    cosine = student_v.transpose(-2, -1) @ teacher_v  # [B, m, k]
    best = cosine.abs().amax(dim=1, keepdim=True)
    mask = torch.where(cosine.abs() == best, torch.sign(cosine), torch.zeros_like(cosine))
    return student_v @ mask


def _rbf(v: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """[B, W_i, k], [B, W_{i-1}, k] -> [B, W_i, W_{i-1}, k]: exp(-(a - b)^2 / 8)."""
    return torch.exp(-(v[:, :, None, :] - previous[:, None, :, :]).pow(2) / 8.0)


def kdsvd_loss_from_teacher(
    student_feats: Sequence[torch.Tensor],
    teacher_v: Sequence[torch.Tensor],
    teacher_s: Sequence[torch.Tensor],
    k: int = 1,
) -> torch.Tensor:
    """KDSVD of student stage features against the teacher's stored singular vectors.

    Args:
        student_feats: per matched stage, [B, C_i, H_i, W_i].
        teacher_v: per stage, the teacher's ``right_singular(feat, k)[0]`` [B, W_i, k].
        teacher_s: per stage, its singular values [B, k].
        k: the number of teacher vectors (the student keeps k + 3).

    Returns:
        scalar: see the module docstring (0 for a single stage: relations need two).
    """
    if not (len(student_feats) == len(teacher_v) == len(teacher_s)) or not student_feats:
        raise ValueError(
            f"KDSVD matches stages pairwise; got {len(student_feats)} student stages and "
            f"{len(teacher_v)} / {len(teacher_s)} teacher vectors / values"
        )
    total = student_feats[0].new_zeros(())
    previous: tuple[torch.Tensor, torch.Tensor] | None = None
    for feat, v_t, s_t in zip(student_feats, teacher_v, teacher_s):
        v_t, s_t = v_t.float().detach(), s_t.float().detach()[:, None, :]
        v_s = align_vectors(right_singular(feat, k + 3)[0], v_t) * s_t
        v_t = v_t * s_t
        if previous is not None:
            gap = (_rbf(v_s, previous[0]) - _rbf(v_t, previous[1])).pow(2)
            total = total + _finite(gap).sum()
        previous = (v_s, v_t)
    return total / student_feats[0].shape[0]


def kdsvd_loss(
    student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor], k: int = 1
) -> torch.Tensor:
    """KDSVD on stage features of both networks (mdistiller's ``kdsvd_loss``); both lists
    of the same length, each pair of the same width W."""
    if len(student_feats) != len(teacher_feats):
        raise ValueError(
            f"KDSVD matches stages pairwise; got {len(student_feats)} student and {len(teacher_feats)} teacher features"
        )
    teacher = [right_singular(t, k) for t in teacher_feats]
    return kdsvd_loss_from_teacher(student_feats, [v for v, _ in teacher], [s for _, s in teacher], k)


class SVDTargets(TargetKind):
    """Targets ``svd_stage{i}_v`` [B, W_i, k] and ``svd_stage{i}_s`` [B, k] for the teacher's
    stages i = 1 .. n (``right_singular(feat, k)``). ``stages`` None: read from the store
    when bound, or from the teacher's first outputs. Warp keeps the identity view's rows."""

    needs_stages = True

    def __init__(self, k: int = 1, stages: int | None = None):
        self.k = int(k)
        self.stages = None if stages is None else int(stages)

    @classmethod
    def in_store(cls, contents: StoreContents) -> list[TargetKind]:
        ks = {n.split("/", 1)[0] for n in contents.names if n.startswith("kdsvd_k") and "/stage" in n}
        return [cls(int(k[len("kdsvd_k") :])) for k in sorted(ks)]

    @property
    def name(self) -> str:
        return f"kdsvd_k{self.k}"

    def __repr__(self) -> str:
        return f"SVDTargets(k={self.k}, stages={self.stages})"

    def _paths(self) -> list[tuple[str, str]]:
        out = []
        for i in range(1, (self.stages or 0) + 1):
            out += [(f"{self.name}/stage{i}_v", f"svd_stage{i}_v"), (f"{self.name}/stage{i}_s", f"svd_stage{i}_s")]
        return out

    @property
    def target_keys(self) -> tuple[str, ...]:
        return tuple(key for _, key in self._paths())

    @property
    def storage(self) -> dict[str, StoredArray]:
        what = {"v": "right singular vectors", "s": "singular values"}
        return {
            path: StoredArray(
                "float16", f"KDSVD: first {self.k} {what[path[-1]]} of teacher stage {path.split('stage')[1][:-2]}"
            )
            for path, _ in self._paths()
        }

    def bind(self, ctx: KindContext) -> SVDTargets:
        if self.stages is None and ctx.available:
            prefix = self.name + "/stage"
            self.stages = sum(1 for p in ctx.available if p.startswith(prefix) and p.endswith("_v")) or None
        return self

    def online(self, out: TeacherOutputs) -> dict[str, torch.Tensor]:
        feats = out.feats["stages"]
        if self.stages is None:
            self.stages = len(feats)
        if len(feats) < self.stages:
            raise KdpipeError(f"The teacher lists {len(feats)} stages; the store's KDSVD targets need {self.stages}.")
        rows = {}
        for i, feat in enumerate(feats[: self.stages], start=1):
            rows[f"{self.name}/stage{i}_v"], rows[f"{self.name}/stage{i}_s"] = right_singular(feat, self.k)
        return rows

    def targets(self, rows):
        return {key: rows[path].float() for path, key in self._paths()}


@dataclass
class KDSVDOptions(MethodOptions):
    """KDSVD's options: mdistiller/engine/cfg.py CFG.KDSVD; its only CIFAR-100 config
    (configs/cifar100/kdsvd.yaml, resnet32x4 -> resnet8x4) keeps these values."""

    k: int | None = option(
        1, source="mdistiller/engine/cfg.py CFG.KDSVD.K", help="singular vectors kept of the teacher", yaml="KDSVD.K"
    )
    feat_weight: float | None = option(
        1.0,
        source="mdistiller/engine/cfg.py CFG.KDSVD.LOSS.FEAT_WEIGHT",
        help="weight of the KDSVD loss",
        yaml="KDSVD.LOSS.FEAT_WEIGHT",
    )
    ce_weight: float | None = option(
        1.0,
        source="mdistiller/engine/cfg.py CFG.KDSVD.LOSS.CE_WEIGHT",
        help="weight of CE",
        yaml="KDSVD.LOSS.CE_WEIGHT",
    )


@register(
    "kdsvd",
    options=KDSVDOptions,
    summary="KD with SVD: CE + weight * RBF relations of aligned singular vectors of consecutive stages",
    paper="Lee et al., ECCV 2018; mdistiller/distillers/KDSVD.py",
    yaml_names=("KDSVD",),
)
class KDSVD(Method):
    """KDSVD: total = ce_weight * CE + feat_weight * kdsvd_loss over the matched stages
    (paired in order; the extra stages of the longer list are dropped)."""

    name = "kdsvd"

    def __init__(self, k: int | None = None, feat_weight: float | None = None, ce_weight: float | None = None):
        if k is not None and (int(k) != float(k) or int(k) < 1):
            self._bad_option("k", k, "a positive integer")
        options = {**KDSVDOptions.defaults()}
        if k is not None:
            options["k"] = int(k)
        options.update(
            {n: float(v) for n, v in {"feat_weight": feat_weight, "ce_weight": ce_weight}.items() if v is not None}
        )
        super().__init__(**options)

    def kinds(self) -> list:
        return [SVDTargets(self.options["k"])]

    def prepare_student(self, student, target_set=None):
        student.collect_stages = True
        return student

    def loss(self, logits, feats, targets, labels):
        o = self.options
        student = feats["stages"]
        count = sum(1 for key in targets if key.startswith("svd_stage") and key.endswith("_v"))
        pairs = min(len(student), count)
        v = [targets[f"svd_stage{i}_v"] for i in range(1, pairs + 1)]
        s = [targets[f"svd_stage{i}_s"] for i in range(1, pairs + 1)]
        kdsvd = kdsvd_loss_from_teacher(student[:pairs], v, s, o["k"])
        ce = F.cross_entropy(logits, labels)
        total = o["ce_weight"] * ce + o["feat_weight"] * kdsvd
        return total, loss_parts(ce=ce, kdsvd=kdsvd, total=total)
