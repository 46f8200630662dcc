"""Variational Information Distillation (VID, Ahn et al., CVPR 2019) as mdistiller computes it
(``mdistiller/distillers/VID.py``).

Per matched stage i (mdistiller's ``feats["feats"][1:]`` of both networks, paired in order:
the stage outputs, see ``kdpipe.methods.at`` for each family's list):

1. spatial sizes: the larger map is adaptive-average-pooled to the smaller one's (square)
   side;
2. a regressor, 1x1 conv Ds -> Dt, ReLU, 1x1 conv Dt -> Dt, ReLU, 1x1 conv Dt -> Dt (all
   bias-free, PyTorch's default initialisation), predicts the mean mu of the teacher's map;
3. the variance per teacher channel is softplus(log_scale) + eps, log_scale initialised to
   log(exp(init_pred_var - eps) - 1), so that it starts at init_pred_var;
4. stage loss: the mean over B * Dt * h * w of 0.5 * ((mu - f_t)^2 / var + log var).

Total = ce_weight * CE + feat_weight * sum of the stage losses.

mdistiller keeps the log scales in a plain Python list, so its optimizer never sees them and
the variance stays at init_pred_var (5) all run long; kdpipe does the same by default
(``learn_variance`` false: buffers) and trains them with ``learn_variance`` true (the VID
paper and RepDistiller's ``VIDLoss``, which registers them as parameters).

What the store holds: every teacher stage's output map, every view (``StageFeatures``,
``stage_feats/stage{i}`` [N, V, D_i, h_i, w_i] float16): the loss reads the whole maps (pooled
down to the student's side where the student's is smaller, which the loss does).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdpipe.errors import KdpipeError
from kdpipe.methods.base import Method, loss_parts, probe_features
from kdpipe.methods.registry import MethodOptions, option, register
from kdpipe.targets.base import NumberedArrays, TeacherOutputs

__all__ = ["StageFeatures", "VIDRegressor", "vid_stage_loss", "vid_loss", "VIDHead", "VIDOptions", "VID"]

_CFG = "mdistiller/engine/cfg.py"


# ------------------------------------------------------------------ the teacher's target
class StageFeatures(NumberedArrays):
    """Targets ``stage_feat{i}`` [B, D_i, h_i, w_i] float32: the teacher's stage outputs i = 1
    .. n (mdistiller's ``feats["feats"][1:]``), every view.

    ``count`` None: the number of stored stages is read from the store when bound (or from
    the teacher's first outputs)."""

    name = "stage_feats"
    key = "stage_feat"

    def describe(self, number: int) -> str:
        return f"teacher stage {number} output map, every view"

    def online(self, out: TeacherOutputs) -> dict[str, torch.Tensor]:
        feats = out.feats["stages"]
        if self.count is not None and len(feats) < self.count:
            raise KdpipeError(f"The teacher lists {len(feats)} stages; the store's stage features need {self.count}.")
        return self._numbered([f.float() for f in feats])

    def warp(self, rows, policy, params):
        return {k: policy.apply_maps(v.float(), params, mode="bilinear") for k, v in rows.items()}


# ------------------------------------------------------------------ pure functions
def _conv1x1(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)


class VIDRegressor(nn.Sequential):
    """[B, Ds, h, w] -> [B, Dt, h, w]: conv1x1, ReLU, conv1x1, ReLU, conv1x1 (bias-free)."""

    def __init__(self, student_channels: int, teacher_channels: int) -> None:
        s, t = int(student_channels), int(teacher_channels)
        super().__init__(_conv1x1(s, t), nn.ReLU(), _conv1x1(t, t), nn.ReLU(), _conv1x1(t, t))


def vid_stage_loss(
    regressor: nn.Module, log_scale: torch.Tensor, student_feat: torch.Tensor, teacher_feat: torch.Tensor, eps: float
) -> torch.Tensor:
    """One stage (mdistiller's ``vid_loss``).

    Args:
        regressor: [B, Ds, h, w] -> [B, Dt, h, w] (``VIDRegressor``).
        log_scale: [Dt]; the variance is softplus(log_scale) + eps.
        student_feat: [B, Ds, hs, ws]; teacher_feat: [B, Dt, ht, wt] (square maps; the larger
            is pooled to the smaller's side).

    Returns:
        scalar: mean over B * Dt * h * w of 0.5 * ((mu - f_t)^2 / var + log var).
    """
    s_side, t_side = student_feat.shape[2], teacher_feat.shape[2]
    if s_side > t_side:
        student_feat = F.adaptive_avg_pool2d(student_feat, (t_side, t_side))
    elif s_side < t_side:
        teacher_feat = F.adaptive_avg_pool2d(teacher_feat, (s_side, s_side))
    mean = regressor(student_feat)
    var = (torch.log(1.0 + torch.exp(log_scale)) + eps).reshape(1, -1, 1, 1).to(mean)
    return torch.mean(0.5 * ((mean - teacher_feat.to(mean)) ** 2 / var + torch.log(var)))


def vid_loss(
    regressors: Sequence[nn.Module],
    log_scales: Sequence[torch.Tensor],
    student_feats: Sequence[torch.Tensor],
    teacher_feats: Sequence[torch.Tensor],
    eps: float = 1e-5,
) -> torch.Tensor:
    """The sum of ``vid_stage_loss`` over the student's stages, paired in order with the
    teacher's first ones (mdistiller's loop over ``feats["feats"][1:]`` of the student)."""
    if len(teacher_feats) < len(student_feats) or len(regressors) != len(student_feats):
        raise ValueError(
            f"VID pairs each of the {len(student_feats)} student stages with a regressor and a teacher "
            f"stage; got {len(regressors)} regressors and {len(teacher_feats)} teacher stages"
        )
    losses = [
        vid_stage_loss(r, s, fs, ft, eps) for r, s, fs, ft in zip(regressors, log_scales, student_feats, teacher_feats)
    ]
    return torch.stack(losses).sum()


# ------------------------------------------------------------------ the student side
class VIDHead(nn.Module):
    """The student side of VID: one regressor and one log-scale vector per matched stage.

    Args:
        student_channels / teacher_channels: per matched stage, Ds_i and Dt_i.
        init_pred_var, eps: the variance's start (see the module docstring).
        learn_variance: log scales as parameters (trained) or buffers (mdistiller).
    """

    def __init__(
        self,
        student_channels: Sequence[int],
        teacher_channels: Sequence[int],
        init_pred_var: float = 5.0,
        eps: float = 1e-5,
        learn_variance: bool = False,
    ) -> None:
        super().__init__()
        self.regressors = nn.ModuleList(VIDRegressor(s, t) for s, t in zip(student_channels, teacher_channels))
        start = math.log(math.exp(init_pred_var - eps) - 1.0)
        self.learn_variance = bool(learn_variance)
        for i, t in enumerate(teacher_channels):
            value = torch.full((int(t),), start)
            if self.learn_variance:
                self.register_parameter(f"log_scale{i}", nn.Parameter(value))
            else:
                self.register_buffer(f"log_scale{i}", value)

    def log_scales(self) -> list[torch.Tensor]:
        return [getattr(self, f"log_scale{i}") for i in range(len(self.regressors))]


# ------------------------------------------------------------------ options
@dataclass
class VIDOptions(MethodOptions):
    """VID's options: mdistiller/engine/cfg.py CFG.VID (configs/cifar100/vid.yaml keeps them)."""

    ce_weight: float | None = option(
        1.0, source=f"{_CFG} CFG.VID.LOSS.CE_WEIGHT", help="weight of CE", yaml="VID.LOSS.CE_WEIGHT"
    )
    feat_weight: float | None = option(
        1.0, source=f"{_CFG} CFG.VID.LOSS.FEAT_WEIGHT", help="weight of the VID loss", yaml="VID.LOSS.FEAT_WEIGHT"
    )
    eps: float | None = option(1e-5, source=f"{_CFG} CFG.VID.EPS", help="added to the variance", yaml="VID.EPS")
    init_pred_var: float | None = option(
        5.0, source=f"{_CFG} CFG.VID.INIT_PRED_VAR", help="the variance's initial value", yaml="VID.INIT_PRED_VAR"
    )
    learn_variance: bool | None = option(
        False,
        source="mdistiller/distillers/VID.py (log_scales in a plain list: never trained)",
        help="train the per-channel variances (the VID paper, RepDistiller)",
    )


# ------------------------------------------------------------------ the method
@register(
    "vid",
    options=VIDOptions,
    summary="VID: CE + weight * Gaussian NLL of the teacher's stage maps under regressors of the student's",
    paper="Ahn et al., CVPR 2019; mdistiller/distillers/VID.py",
    yaml_names=("VID",),
    yaml_recorded={"VID.INPUT_SIZE": [32, 32]},
)
class VID(Method):
    """VID: total = ce_weight * CE + feat_weight * vid_loss (see the module docstring).

    ``student_channels`` and ``teacher_channels`` (per matched stage) size the regressors
    (the student's ``vid_head``); they are found from a probe of the student and the store (or
    the online teacher), and recorded so that evaluate rebuilds the head.
    """

    name = "vid"
    recorded_options = ("student_channels", "teacher_channels")

    def __init__(
        self,
        ce_weight: float | None = None,
        feat_weight: float | None = None,
        eps: float | None = None,
        init_pred_var: float | None = None,
        learn_variance: bool | None = None,
        student_channels=None,
        teacher_channels=None,
    ):
        d = VIDOptions.defaults()
        given = {
            "ce_weight": ce_weight,
            "feat_weight": feat_weight,
            "eps": eps,
            "init_pred_var": init_pred_var,
            "learn_variance": learn_variance,
        }
        options = {k: d[k] if v is None else v for k, v in given.items()}
        if not float(options["eps"]) > 0 or not float(options["init_pred_var"]) > float(options["eps"]):
            self._bad_option("init_pred_var", options["init_pred_var"], "larger than eps (both positive)")
        super().__init__(
            **options,
            student_channels=None if student_channels is None else [int(c) for c in student_channels],
            teacher_channels=None if teacher_channels is None else [int(c) for c in teacher_channels],
        )
        self._image_size = (32, 32)
        self._head: VIDHead | None = None

    def kinds(self) -> list:
        return [StageFeatures()]

    def attach_teacher(self, info) -> None:
        self._image_size = tuple(info.image_size)
        shapes = [info.shapes[p] for p in sorted(info.shapes, key=_stage_number) if p.startswith("stage_feats/")]
        if shapes:
            self.options["teacher_channels"] = [int(s[0]) for s in shapes]

    def _student_channels(self, student) -> list[int]:
        stages = probe_features(student, self._image_size)["stages"]
        return [int(f.shape[1]) for f in stages]

    def prepare_student(self, student, target_set=None):
        o = self.options
        if o["teacher_channels"] is None:
            raise KdpipeError(
                "Method 'vid' needs the teacher's stage features: train from a store extracted with "
                "--methods vid, or with --online-teacher."
            )
        if o["student_channels"] is None:
            o["student_channels"] = self._student_channels(student)
        if len(o["student_channels"]) > len(o["teacher_channels"]):
            raise KdpipeError(
                f"VID pairs the student's {len(o['student_channels'])} stages with the teacher's first ones, "
                f"but the teacher lists {len(o['teacher_channels'])}."
            )
        teacher = o["teacher_channels"][: len(o["student_channels"])]
        self._head = VIDHead(o["student_channels"], teacher, o["init_pred_var"], o["eps"], o["learn_variance"])
        student.vid_head = self._head
        student.collect_stages = True
        return student

    def loss(self, logits, feats, targets, labels):
        o = self.options
        head = self._head
        if head is None:
            raise KdpipeError("Method 'vid': prepare_student must install its regressors before training.")
        student_feats = feats["stages"]
        teacher_feats = [targets[f"stage_feat{i}"] for i in range(1, len(student_feats) + 1)]
        vid = vid_loss(list(head.regressors), head.log_scales(), student_feats, teacher_feats, o["eps"])
        ce = F.cross_entropy(logits, labels)
        total = o["ce_weight"] * ce + o["feat_weight"] * vid
        return total, loss_parts(ce=ce, vid=vid, total=total)


def _stage_number(path: str) -> int:
    tail = path.rsplit("stage", 1)[-1]
    return int(tail) if tail.isdigit() else 0
