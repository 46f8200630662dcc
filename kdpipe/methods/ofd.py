"""Overhaul of Feature Distillation (OFD, Heo et al., ICCV 2019) as mdistiller computes it
(``mdistiller/distillers/OFD.py``).

Per matched stage (the last min(n_s, n_t) entries of mdistiller's ``preact_feats[1:]`` of
each network: the stage outputs before their last ReLU, ``feats["preact_stages"]`` of
kdpipe's models):

1. a connector maps the student's pre-ReLU map to the teacher's width: a bias-free k x k
   convolution (padding (k - 1) // 2; weights N(0, sqrt(2 / (k * k * Dt)))) then
   BatchNorm2d(Dt) (weight 1, bias 0);
2. the teacher's pre-ReLU map is adaptive-average-pooled to the connector output's size;
3. margin m per teacher channel, from the BN before the teacher's ReLU (weight s, bias mu as
   the pre-ReLU distribution's std and mean): m = mu - s * phi(mu/s) / Phi(-mu/s) (the mean
   of the negative part) where Phi(-mu/s) > 0.001, else -3 s (s = |weight|);
4. partial L2 (``ofd_feat_loss``): (s - m)^2 where s > m and t <= m, (s - t)^2 where s > t
   and m < t <= 0, (s - t)^2 where t > 0; summed over channels and cells and averaged over
   the batch;
5. stage i of n weighs 1 / 2^(n - i - 1) (the last stage 1).

Total = ce_weight * CE + feat_weight * the weighted sum.

What the store holds: every teacher stage's pre-ReLU map, every view (``PreactStages``,
``preact_feats/stage{i}``), and the margins once (``static/teacher/ofd_margin{i}``): the
margins are fixed by the teacher's weights. mdistiller's OFD sets its teacher to training
mode with the student (its ``train`` override), so its teacher's BatchNorm normalises with
batch statistics; kdpipe's teacher is in evaluation mode (running statistics), the only mode
whose targets a store can hold.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdpipe.errors import KdpipeError
from kdpipe.methods.base import Method, loss_parts, probe_features
from kdpipe.methods.registry import MethodOptions, option, register
from kdpipe.targets.base import NumberedArrays, TeacherOutputs

__all__ = ["PreactStages", "ofd_margin", "ofd_feat_loss", "ofd_loss", "Connector", "OFDOptions", "OFD"]

_CFG = "mdistiller/engine/cfg.py"
MARGIN = "teacher/ofd_margin{}"


def ofd_margin(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Margins [D] float32 from the BN before the ReLU (see the module docstring, step 3)."""
    out = []
    for s, m in zip(weight.detach().double().cpu().tolist(), bias.detach().double().cpu().tolist()):
        s = abs(s)
        tail = 0.5 * math.erfc((m / s) / math.sqrt(2.0))  # Phi(-m / s)
        if tail > 0.001:
            out.append(-s * math.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi) / tail + m)
        else:
            out.append(-3 * s)
    return torch.tensor(out, dtype=torch.float32)


# ------------------------------------------------------------------ the teacher's target
class PreactStages(NumberedArrays):
    """Targets ``preact_stage{i}`` [B, D_i, h_i, w_i] float32: the teacher's stage outputs
    before their last ReLU, i = 1 .. n, every view; the margins as static arrays."""

    name = "preact_feats"
    key = "preact_stage"

    def describe(self, number: int) -> str:
        return f"teacher stage {number} output before its ReLU, every view"

    def _preacts(self, out: TeacherOutputs) -> list[torch.Tensor]:
        feats = out.feats.get("preact_stages")
        if not feats:
            raise KdpipeError("OFD needs the teacher's pre-ReLU stage outputs, which its family does not list.")
        return feats

    def static(self, teacher, out: TeacherOutputs) -> dict:
        points = teacher.preact_points() or []
        if any(p.bn is None for p in points):
            raise KdpipeError(f"OFD's margins need the BN before each ReLU, which {type(teacher).__name__} lacks.")
        return {
            MARGIN.format(i): (ofd_margin(p.bn.weight, p.bn.bias).numpy(), f"OFD margin of teacher stage {i} [D]")
            for i, p in enumerate(points, start=1)
        }

    def online(self, out: TeacherOutputs) -> dict[str, torch.Tensor]:
        return self._numbered([f.float() for f in self._preacts(out)])

    def warp(self, rows, policy, params):
        return {k: policy.apply_maps(v.float(), params, mode="bilinear") for k, v in rows.items()}


# ------------------------------------------------------------------ pure functions
class Connector(nn.Sequential):
    """[B, Ds, h, w] -> [B, Dt, h, w]: bias-free k x k conv then BatchNorm2d (step 1)."""

    def __init__(self, student_channels: int, teacher_channels: int, kernel_size: int = 1) -> None:
        conv = nn.Conv2d(
            int(student_channels), int(teacher_channels), kernel_size, padding=(kernel_size - 1) // 2, bias=False
        )
        bn = nn.BatchNorm2d(int(teacher_channels))
        conv.weight.data.normal_(0, math.sqrt(2.0 / (kernel_size * kernel_size * int(teacher_channels))))
        bn.weight.data.fill_(1)
        bn.bias.data.zero_()
        super().__init__(conv, bn)


def ofd_feat_loss(source: torch.Tensor, target: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """mdistiller's ``feat_loss``: the partial L2 of step 4.

    Args:
        source: [B, D, h, w] the connected student map; target: [B, D, h, w] the teacher's;
        margin: [D] (or broadcastable [1, D, 1, 1]).
    """
    margin = margin.reshape(1, -1, 1, 1).to(source)
    target = target.to(source)
    loss = (
        (source - margin) ** 2 * ((source > margin) & (target <= margin)).float()
        + (source - target) ** 2 * ((source > target) & (target > margin) & (target <= 0)).float()
        + (source - target) ** 2 * (target > 0).float()
    )
    return torch.abs(loss).mean(dim=0).sum()


def ofd_loss(
    connected: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor], margins: Sequence[torch.Tensor]
) -> torch.Tensor:
    """The weighted sum over matched stages (steps 2, 4 and 5).

    Args:
        connected: per matched stage, the connector's output [B, Dt, h, w].
        teacher_feats: per matched stage, the teacher's pre-ReLU map [B, Dt, h', w'].
        margins: per matched stage, [Dt].
    """
    n = len(connected)
    if len(teacher_feats) != n or len(margins) != n or n == 0:
        raise ValueError(f"OFD needs as many teacher maps and margins as connected maps ({n})")
    losses = [
        ofd_feat_loss(s, F.adaptive_avg_pool2d(t, (int(s.shape[-2]), int(s.shape[-1]))), m) / 2 ** (n - i - 1)
        for i, (s, t, m) in enumerate(zip(connected, teacher_feats, margins))
    ]
    return torch.stack(losses).sum()


# ------------------------------------------------------------------ options
@dataclass
class OFDOptions(MethodOptions):
    """OFD's options: mdistiller/engine/cfg.py CFG.OFD (configs/cifar100/ofd.yaml keeps them)."""

    ce_weight: float | None = option(
        1.0, source=f"{_CFG} CFG.OFD.LOSS.CE_WEIGHT", help="weight of CE", yaml="OFD.LOSS.CE_WEIGHT"
    )
    feat_weight: float | None = option(
        0.001, source=f"{_CFG} CFG.OFD.LOSS.FEAT_WEIGHT", help="weight of the OFD loss", yaml="OFD.LOSS.FEAT_WEIGHT"
    )
    kernel_size: int | None = option(
        1,
        source=f"{_CFG} CFG.OFD.CONNECTOR.KERNEL_SIZE",
        help="kernel size of the connectors",
        yaml="OFD.CONNECTOR.KERNEL_SIZE",
    )


# ------------------------------------------------------------------ the method
@register(
    "ofd",
    options=OFDOptions,
    summary="OFD: CE + weight * partial L2 of connected student pre-ReLU maps to the teacher's, with margins",
    paper="Heo et al., ICCV 2019; mdistiller/distillers/OFD.py",
    yaml_names=("OFD",),
)
class OFD(Method):
    """OFD: total = ce_weight * CE + feat_weight * ofd_loss (see the module docstring).

    ``student_channels`` / ``teacher_channels`` (per pre-ReLU stage) size the connectors (the
    student's ``ofd_connectors``); found from a probe of the student and the store (or the
    online teacher), recorded so that evaluate rebuilds them."""

    name = "ofd"
    recorded_options = ("student_channels", "teacher_channels")

    def __init__(
        self,
        ce_weight: float | None = None,
        feat_weight: float | None = None,
        kernel_size: int | None = None,
        student_channels=None,
        teacher_channels=None,
    ):
        d = OFDOptions.defaults()
        given = {"ce_weight": ce_weight, "feat_weight": feat_weight, "kernel_size": kernel_size}
        options = {k: d[k] if v is None else v for k, v in given.items()}
        if int(options["kernel_size"]) < 1 or int(options["kernel_size"]) % 2 == 0:
            self._bad_option("kernel_size", options["kernel_size"], "an odd positive integer")
        super().__init__(
            **options,
            student_channels=None if student_channels is None else [int(c) for c in student_channels],
            teacher_channels=None if teacher_channels is None else [int(c) for c in teacher_channels],
        )
        self._image_size = (32, 32)
        self._margins: list[torch.Tensor] | None = None
        self._connectors: nn.ModuleList | None = None

    def kinds(self) -> list:
        return [PreactStages()]

    def attach_teacher(self, info) -> None:
        self._image_size = tuple(info.image_size)
        paths = sorted((p for p in info.shapes if p.startswith(PreactStages.name + "/")), key=_stage_number)
        if paths:
            self.options["teacher_channels"] = [int(info.shapes[p][0]) for p in paths]
            missing = [MARGIN.format(i) for i in range(1, len(paths) + 1) if MARGIN.format(i) not in info.static]
            if missing:
                raise KdpipeError(
                    f"Method 'ofd' needs the teacher's margins ({', '.join(missing)} missing): extract the "
                    "store with --methods ofd, or train with --online-teacher."
                )
            self._margins = [
                torch.as_tensor(np.asarray(info.static[MARGIN.format(i)]), dtype=torch.float32)
                for i in range(1, len(paths) + 1)
            ]

    def _student_channels(self, student) -> list[int]:
        feats = probe_features(student, self._image_size)
        if "preact_stages" not in feats:
            raise KdpipeError(f"OFD needs the student's pre-ReLU stage outputs, which {type(student).__name__} lacks.")
        return [int(f.shape[1]) for f in feats["preact_stages"]]

    def _matched(self) -> int:
        return min(len(self.options["student_channels"]), len(self.options["teacher_channels"]))

    def prepare_student(self, student, target_set=None):
        o = self.options
        if o["teacher_channels"] is None:
            raise KdpipeError(
                "Method 'ofd' needs the teacher's pre-ReLU stage maps: train from a store extracted with "
                "--methods ofd, or with --online-teacher."
            )
        if o["student_channels"] is None:
            o["student_channels"] = self._student_channels(student)
        n = self._matched()
        pairs = zip(o["student_channels"][-n:], o["teacher_channels"][-n:])
        self._connectors = nn.ModuleList(Connector(s, t, o["kernel_size"]) for s, t in pairs)
        student.ofd_connectors = self._connectors
        student.collect_stages = True
        return student

    def loss(self, logits, feats, targets, labels):
        o = self.options
        if self._connectors is None or self._margins is None:
            raise KdpipeError("Method 'ofd': attach_teacher and prepare_student come before training.")
        n = self._matched()
        student = feats["preact_stages"][-n:]
        teacher_keys = [f"preact_stage{i}" for i in range(1, len(o["teacher_channels"]) + 1)][-n:]
        connected = [c(f) for c, f in zip(self._connectors, student)]
        margins = [m.to(logits.device) for m in self._margins[-n:]]
        ofd = ofd_loss(connected, [targets[k] for k in teacher_keys], margins)
        ce = F.cross_entropy(logits, labels)
        total = o["ce_weight"] * ce + o["feat_weight"] * ofd
        return total, loss_parts(ce=ce, ofd=ofd, total=total)


def _stage_number(path: str) -> int:
    tail = path.rsplit("stage", 1)[-1]
    return int(tail) if tail.isdigit() else 0
