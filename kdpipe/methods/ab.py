"""Activation Boundaries (AB, Heo et al., AAAI 2019) as the CRD authors' RepDistiller computes
it: ``distiller_zoo/AB.py`` (``ABLoss``), ``models/util.py`` (``Connector``), ``train_student.py``
and ``helper/pretrain.py`` (``--distill abound -a 0 -b 1``, ``--init_epochs 30``). mdistiller
has no AB; the letKD supplement's AB row is RepDistiller's.

RepDistiller trains AB in two stages:

1. initialisation, ``init_epochs`` (30) epochs: the student's feature layers and a connector
   per stage trained by the AB loss alone (no CE) at the run's initial learning rate;
2. then the usual 240 epochs of CE alone: its AB term is 0 in this stage ("can also add
   loss to this stage"), so the knowledge lives in the initialisation.

AB loss on the pre-ReLU stage outputs (RepDistiller's ``feat[1:-1]`` with ``preact=True``,
kdpipe's ``feats["preact_stages"]``) of n matched stages: the connector maps the student's to
the teacher's shape (identity where width and side agree, else FitNet's regressor without
ReLU: ``ConvReg(use_relu=False)``), then per stage the alternative L2
sum((s + m)^2 [s > -m, t <= 0] + (s - m)^2 [s <= m, t > 0]) with margin m = 1, weighted
2^(i - n + 1) (the last stage 1), divided by the batch size and multiplied by 3/1000; the
stages are summed.

The loss reads the teacher only through the sign of its pre-ReLU maps, so the store holds
that: ``ab_signs/stage{i}`` [N, V, D, h, w] uint8 (1 where the teacher's map is > 0), half the
bytes of float16 maps and exact.

kdpipe runs both stages in one loop of ``init_epochs + 240`` epochs (``recipe``: the
milestones moved by ``init_epochs``, so the first stage runs at the initial rate as
RepDistiller's; a shorter ``--epochs`` scales an unset ``init_epochs`` with the milestones:
``kdpipe.methods.two_stage``). The second stage starts with the optimizer's state cleared, as
RepDistiller starts it with a new optimizer (no momentum from the first stage), and the first
stage leaves the classifier as it is: its loss does not reach it, so it has no gradient (and
no weight decay) then, as RepDistiller's first optimizer, which holds the feature layers only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdpipe.errors import KdpipeError
from kdpipe.methods.base import Method, loss_parts, probe_features
from kdpipe.methods.fitnet import HintRegressor
from kdpipe.methods.registry import MethodOptions, option, register
from kdpipe.methods.two_stage import InitialisationStage
from kdpipe.targets.base import NumberedArrays, TeacherOutputs

__all__ = ["PreactSigns", "ab_stage_loss", "ab_loss", "ABOptions", "AB"]

_REPO = "HobbitLong/RepDistiller"


# ------------------------------------------------------------------ the teacher's target
class PreactSigns(NumberedArrays):
    """Targets ``ab_sign{i}`` [B, D_i, h_i, w_i] float32 (1.0 where the teacher's pre-ReLU map
    of stage i is > 0, else 0.0), stored as uint8, every view."""

    name = "ab_signs"
    key = "ab_sign"
    dtype = "uint8"

    def describe(self, number: int) -> str:
        return f"1 where teacher stage {number}'s pre-ReLU map is > 0"

    def online(self, out: TeacherOutputs) -> dict[str, torch.Tensor]:
        feats = out.feats.get("preact_stages")
        if not feats:
            raise KdpipeError("AB needs the teacher's pre-ReLU stage outputs, which its family does not list.")
        return self._numbered([(f > 0).to(torch.uint8) for f in feats])

    def warp(self, rows, policy, params):
        return {k: policy.apply_maps(v.float(), params, mode="nearest").round() for k, v in rows.items()}


# ------------------------------------------------------------------ pure functions
def ab_stage_loss(source: torch.Tensor, teacher_positive: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """RepDistiller's ``criterion_alternative_l2``, summed (not averaged).

    Args:
        source: [B, D, h, w] the connected student map; teacher_positive: [B, D, h, w], true
            (or 1) where the teacher's pre-ReLU map is > 0.
    """
    positive = teacher_positive > 0.5 if teacher_positive.is_floating_point() else teacher_positive.bool()
    loss = (source + margin) ** 2 * ((source > -margin) & ~positive).float() + (source - margin) ** 2 * (
        (source <= margin) & positive
    ).float()
    return torch.abs(loss).sum()


def ab_loss(
    connected: Sequence[torch.Tensor], teacher_positive: Sequence[torch.Tensor], margin: float = 1.0
) -> torch.Tensor:
    """RepDistiller's ``ABLoss`` summed over stages: stage i of n weighs 2^(i - n + 1), each
    divided by the batch size and multiplied by 3/1000."""
    n = len(connected)
    if len(teacher_positive) != n or n == 0:
        raise ValueError(f"AB needs one teacher map per connected student map; got {n} and {len(teacher_positive)}")
    batch = connected[0].shape[0]
    losses = [
        2.0 ** (i - n + 1) * ab_stage_loss(s, t, margin) / batch / 1000 * 3
        for i, (s, t) in enumerate(zip(connected, teacher_positive))
    ]
    return torch.stack(losses).sum()


def _connector(student_shape: Sequence[int], teacher_shape: Sequence[int]) -> nn.Module:
    """RepDistiller's ``Connector`` entry: identity where width and side agree, else ConvReg
    without ReLU (kdpipe's ``HintRegressor``)."""
    (ds, hs, ws), (dt, ht, wt) = student_shape, teacher_shape
    if ds == dt and hs == ht:
        return nn.Sequential()
    return HintRegressor(ds, dt, (hs, ws), (ht, wt), use_relu=False)


# ------------------------------------------------------------------ options
@dataclass
class ABOptions(MethodOptions):
    """AB's options: RepDistiller's defaults and its AB command."""

    init_epochs: int | None = option(
        30, source=f"{_REPO} train_student.py (--init_epochs default 30)", help="epochs of the AB initialisation"
    )
    margin: float | None = option(1.0, source=f"{_REPO} distiller_zoo/AB.py (ABLoss margin=1.0)", help="margin m")
    ce_weight: float | None = option(
        1.0, source=f"{_REPO} scripts/run_cifar_distill.sh (-r default 1)", help="weight of CE after the initialisation"
    )


# ------------------------------------------------------------------ the method
@register(
    "ab",
    options=ABOptions,
    summary="AB: init_epochs of activation-boundary matching of pre-ReLU maps, then CE (RepDistiller)",
    paper="Heo et al., AAAI 2019; HobbitLong/RepDistiller distiller_zoo/AB.py",
)
class AB(InitialisationStage, Method):
    """AB (see the module docstring): the loss is ab_loss before ``init_epochs``, ce_weight *
    CE after. ``student_shapes`` / ``teacher_shapes`` ([D, h, w] per matched stage) size the
    connectors (the student's ``ab_connectors``), recorded for evaluate."""

    name = "ab"
    recorded_options = ("student_shapes", "teacher_shapes")

    def __init__(
        self,
        init_epochs: int | None = None,
        margin: float | None = None,
        ce_weight: float | None = None,
        student_shapes=None,
        teacher_shapes=None,
    ):
        d = ABOptions.defaults()
        given = {"init_epochs": init_epochs, "margin": margin, "ce_weight": ce_weight}
        options = {k: d[k] if v is None else v for k, v in given.items()}
        if int(options["init_epochs"]) < 0:
            self._bad_option("init_epochs", options["init_epochs"], "0 or more")
        shapes = {"student_shapes": student_shapes, "teacher_shapes": teacher_shapes}
        super().__init__(
            **options, **{k: None if v is None else [[int(a) for a in s] for s in v] for k, v in shapes.items()}
        )
        self._image_size = (32, 32)
        self._student_arch: str | None = None
        self._connectors: nn.ModuleList | None = None
        self._start_stages(init_epochs, d["init_epochs"])

    def bind(self, teacher_arch=None, student_arch=None, dataset: str = "cifar"):
        self.dataset = dataset
        self._student_arch = student_arch
        return self

    def kinds(self) -> list:
        return [PreactSigns()]

    def attach_teacher(self, info) -> None:
        self._image_size = tuple(info.image_size)
        if self.options["student_shapes"] is None and self._student_arch is not None:
            # found now (at the training images' size), so that the run's config records it
            from kdpipe.models import build

            self.options["student_shapes"] = self._student_shapes(build(self._student_arch, num_classes=10))
        paths = sorted((p for p in info.shapes if p.startswith(PreactSigns.name + "/")), key=_stage_number)
        if paths:
            self.options["teacher_shapes"] = [[int(s) for s in info.shapes[p]] for p in paths]

    def _student_shapes(self, student) -> list[list[int]]:
        feats = probe_features(student, self._image_size)
        if "preact_stages" not in feats:
            raise KdpipeError(f"AB needs the student's pre-ReLU stage outputs, which {type(student).__name__} lacks.")
        return [[int(s) for s in f.shape[1:]] for f in feats["preact_stages"]]

    def prepare_student(self, student, target_set=None):
        o = self.options
        if o["teacher_shapes"] is None:
            raise KdpipeError(
                "Method 'ab' needs the signs of the teacher's pre-ReLU stage maps: train from a store "
                "extracted with --methods ab, or with --online-teacher."
            )
        if o["student_shapes"] is None:
            o["student_shapes"] = self._student_shapes(student)
        if len(o["student_shapes"]) != len(o["teacher_shapes"]):
            raise KdpipeError(
                f"AB pairs the stages one to one (RepDistiller's Connector); the student has "
                f"{len(o['student_shapes'])} and the teacher {len(o['teacher_shapes'])}."
            )
        self._connectors = nn.ModuleList(_connector(s, t) for s, t in zip(o["student_shapes"], o["teacher_shapes"]))
        student.ab_connectors = self._connectors
        student.collect_stages = True
        return student

    def loss(self, logits, feats, targets, labels):
        o = self.options
        if self._connectors is None:
            raise KdpipeError("Method 'ab': prepare_student must install its connectors before training.")
        ce = F.cross_entropy(logits, labels)
        if self.initialising:
            connected = [c(f) for c, f in zip(self._connectors, feats["preact_stages"])]
            teacher = [targets[f"ab_sign{i}"] for i in range(1, len(connected) + 1)]
            ab = ab_loss(connected, teacher, o["margin"])
            return ab, loss_parts(ce=ce, ab=ab, total=ab)  # CE shown, not trained on
        total = o["ce_weight"] * ce
        return total, loss_parts(ce=ce, ab=torch.zeros((), device=ce.device), total=total)


def _stage_number(path: str) -> int:
    tail = path.rsplit("stage", 1)[-1]
    return int(tail) if tail.isdigit() else 0
