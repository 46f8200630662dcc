"""Knowledge review (ReviewKD, Chen et al., CVPR 2021) as mdistiller computes it
(``mdistiller/distillers/ReviewKD.py``).

Levels, deepest first: the student's pooled feature as a [B, D, 1, 1] map, then its stage
outputs from the last to the first (mdistiller's ``feats`` reversed; ``preact_feats`` with
``stu_preact``), as many as the teacher has: its pre-ReLU stage outputs (``preact_feats[1:]``)
plus its pooled feature, the same order. One attention-based fusion module (``ABF``) per
level, run deepest first:

- conv1: bias-free 1x1 conv to ``mid`` = min(512, the pooled feature's width) channels, BN;
- every level but the deepest fuses the residual of the level before: nearest-upsampled to
  this level's student side, concatenated with conv1's output, a 1x1 conv (with bias) to 2
  channels and a sigmoid give the two weights of a weighted sum;
- the sum is nearest-resized to the teacher's side at that level (the new residual), then
  conv2: bias-free 3x3 conv to the teacher's width, BN: the level's output.

conv1's and conv2's weights are kaiming-uniform (a=1), the rest PyTorch's defaults. The loss
(``hcl_loss``) sums over levels the hierarchical context loss: the MSE of the two maps, plus
the MSEs of both pooled to 4x4, 2x2 and 1x1 (those smaller than the map), weighted 1/2, 1/4,
1/8 (of those used), all divided by the sum of the weights used. Total = ce_weight * CE +
reviewkd_weight * min(epoch / warmup_epochs, 1) * hcl_loss, epoch counted from 1 as
mdistiller's trainer does (kdpipe's 0-based epoch e is mdistiller's e + 1).

The widths and sides (mdistiller's REVIEWKD.IN_CHANNELS, OUT_CHANNELS, SHAPES, OUT_SHAPES,
set in its YAML for each pair) are read off the two networks here, so a file's values are
recorded only. What the store holds: the teacher's pre-ReLU stage maps (``PreactStages``, as
OFD) and pooled feature (``PooledPenult``, as CRD), every view.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdpipe.errors import KdpipeError
from kdpipe.methods.base import Method, loss_parts, probe_features
from kdpipe.methods.crd import PooledPenult
from kdpipe.methods.ofd import PreactStages
from kdpipe.methods.registry import MethodOptions, option, register

__all__ = ["ABF", "hcl_loss", "ReviewHead", "ReviewKDOptions", "ReviewKD"]

_CFG = "mdistiller/engine/cfg.py"


class ABF(nn.Module):
    """One attention-based fusion level (see the module docstring); parameter names as
    mdistiller's (``conv1``, ``conv2``, ``att_conv``)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        first = nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False)
        second = nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.conv1 = nn.Sequential(first, nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(second, nn.BatchNorm2d(out_channels))
        self.att_conv = nn.Sequential(nn.Conv2d(mid_channels * 2, 2, kernel_size=1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(first.weight, a=1)
        nn.init.kaiming_uniform_(second.weight, a=1)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, side: int, out_side: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, Din, h, w], residual of the level before (None at the deepest) -> (output [B,
        Dout, out_side, out_side], the new residual [B, mid, out_side, out_side])."""
        n, _, h, w = x.shape
        x = self.conv1(x)
        if self.att_conv is not None:
            if residual is None:
                raise ValueError("a fusing ABF level needs the residual of the level before")
            y = F.interpolate(residual, (side, side), mode="nearest")
            z = self.att_conv(torch.cat([x, y], dim=1))
            x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
        if x.shape[-1] != out_side:
            x = F.interpolate(x, (out_side, out_side), mode="nearest")
        return self.conv2(x), x


def hcl_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """mdistiller's ``hcl_loss``: per pair of [B, D, h, w] maps, (MSE + sum_l w_l MSE(pool_l))
    / (1 + sum_l w_l) over l in (4, 2, 1) with l < h, w_l halving from 1/2; summed over pairs."""
    total = torch.zeros((), device=student[0].device)
    for fs, ft in zip(student, teacher):
        ft = ft.to(fs)
        loss = F.mse_loss(fs, ft)
        cnt, tot = 1.0, 1.0
        for size in (4, 2, 1):
            if size >= fs.shape[2]:
                continue
            cnt /= 2.0
            loss = (
                loss
                + F.mse_loss(F.adaptive_avg_pool2d(fs, (size, size)), F.adaptive_avg_pool2d(ft, (size, size))) * cnt
            )
            tot += cnt
        total = total + loss / tot
    return total


class ReviewHead(nn.Module):
    """The student side: one ``ABF`` per level, deepest first (``abfs[0]`` the pooled
    feature's, without fusion).

    Args:
        in_channels / out_channels: per level, deepest first: the student's and the teacher's
            widths; sides / out_sides: the student's and the teacher's map sides.
    """

    def __init__(
        self, in_channels: Sequence[int], out_channels: Sequence[int], sides: Sequence[int], out_sides: Sequence[int]
    ) -> None:
        super().__init__()
        mid = min(512, int(in_channels[0]))
        # mdistiller builds them shallowest first (fuse: every one but the pooled level), then reverses
        shallow_first = [
            ABF(int(i), mid, int(o), fuse=k > 0)
            for k, (i, o) in reversed(list(enumerate(zip(in_channels, out_channels))))
        ]
        self.abfs = nn.ModuleList(shallow_first[::-1])
        self.sides = [int(s) for s in sides]
        self.out_sides = [int(s) for s in out_sides]

    def forward(self, levels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """levels: the student's maps, deepest first -> outputs, shallowest first (the
        teacher's order)."""
        out, residual = self.abfs[0](levels[0], None, self.sides[0], self.out_sides[0])
        results = [out]
        for x, abf, side, out_side in zip(levels[1:], self.abfs[1:], self.sides[1:], self.out_sides[1:]):
            out, residual = abf(x, residual, side, out_side)
            results.insert(0, out)
        return results


@dataclass
class ReviewKDOptions(MethodOptions):
    """ReviewKD's options: mdistiller/engine/cfg.py CFG.REVIEWKD and configs/cifar100/reviewkd.yaml."""

    ce_weight: float | None = option(
        1.0, source=f"{_CFG} CFG.REVIEWKD.CE_WEIGHT", help="weight of CE", yaml="REVIEWKD.CE_WEIGHT"
    )
    reviewkd_weight: float | None = option(
        5.0,
        source="mdistiller configs/cifar100/reviewkd.yaml REVIEWKD.REVIEWKD_WEIGHT (cfg.py: 1.0)",
        help="weight of the review loss",
        yaml="REVIEWKD.REVIEWKD_WEIGHT",
        yaml_default=1.0,
    )
    warmup_epochs: int | None = option(
        20,
        source=f"{_CFG} CFG.REVIEWKD.WARMUP_EPOCHS",
        help="epochs over which the review loss's weight ramps up",
        yaml="REVIEWKD.WARMUP_EPOCHS",
    )
    stu_preact: bool | None = option(
        False,
        source=f"{_CFG} CFG.REVIEWKD.STU_PREACT",
        help="the student's levels before their ReLU",
        yaml="REVIEWKD.STU_PREACT",
    )


@register(
    "reviewkd",
    options=ReviewKDOptions,
    summary="ReviewKD: CE + warmed-up weight * HCL of fused student levels to the teacher's pre-ReLU maps",
    paper="Chen et al., CVPR 2021; mdistiller/distillers/ReviewKD.py",
    yaml_names=("REVIEWKD",),
    # read off the networks here (mdistiller's values for resnet32x4 -> resnet8x4 as defaults)
    yaml_recorded={
        "REVIEWKD.SHAPES": [1, 8, 16, 32],
        "REVIEWKD.OUT_SHAPES": [1, 8, 16, 32],
        "REVIEWKD.IN_CHANNELS": [64, 128, 256, 256],
        "REVIEWKD.OUT_CHANNELS": [64, 128, 256, 256],
        "REVIEWKD.MAX_MID_CHANNEL": 512,
    },
)
class ReviewKD(Method):
    """ReviewKD (see the module docstring). ``student_levels`` / ``teacher_levels`` ([[width,
    side], ...] deepest first) size the fusion modules (the student's ``review_head``); found
    from a probe of the student and the store (or the online teacher), recorded for evaluate."""

    name = "reviewkd"
    recorded_options = ("student_levels", "teacher_levels")

    def __init__(
        self,
        ce_weight: float | None = None,
        reviewkd_weight: float | None = None,
        warmup_epochs: int | None = None,
        stu_preact: bool | None = None,
        student_levels=None,
        teacher_levels=None,
    ):
        d = ReviewKDOptions.defaults()
        given = {
            "ce_weight": ce_weight,
            "reviewkd_weight": reviewkd_weight,
            "warmup_epochs": warmup_epochs,
            "stu_preact": stu_preact,
        }
        options = {k: d[k] if v is None else v for k, v in given.items()}
        if int(options["warmup_epochs"]) < 1:
            self._bad_option("warmup_epochs", options["warmup_epochs"], "a positive integer")
        levels = {"student_levels": student_levels, "teacher_levels": teacher_levels}
        super().__init__(
            **options, **{k: None if v is None else [[int(a) for a in lv] for lv in v] for k, v in levels.items()}
        )
        self._image_size = (32, 32)
        self._student_arch: str | None = None
        self._head: ReviewHead | None = None
        self._epoch = 0

    def bind(self, teacher_arch=None, student_arch=None, dataset: str = "cifar"):
        self.dataset = dataset
        self._student_arch = student_arch
        return self

    def kinds(self) -> list:
        return [PreactStages(), PooledPenult()]

    def attach_teacher(self, info) -> None:
        self._image_size = tuple(info.image_size)
        if self.options["student_levels"] is None and self._student_arch is not None:
            # found now (at the training images' size), so that the run's config records it
            from kdpipe.models import build

            self.options["student_levels"] = self._student_levels(build(self._student_arch, num_classes=10))
        stages = sorted((p for p in info.shapes if p.startswith(PreactStages.name + "/")), key=_stage_number)
        pooled = info.shapes.get(PooledPenult.name)
        if stages and pooled is not None:
            maps = [[int(info.shapes[p][0]), int(info.shapes[p][1])] for p in stages]
            self.options["teacher_levels"] = [[int(pooled[0]), 1]] + maps[::-1]

    def _student_levels(self, student) -> list[list[int]]:
        feats = probe_features(student, self._image_size)
        maps = self._student_maps(feats)
        return [[int(feats["penult"].shape[1]), 1]] + [[int(f.shape[1]), int(f.shape[2])] for f in maps[::-1]]

    def _student_maps(self, feats: dict) -> list[torch.Tensor]:
        key = "preact_stages" if self.options["stu_preact"] else "stages"
        if key not in feats:
            raise KdpipeError("ReviewKD's student lists no pre-ReLU stage outputs (stu_preact).")
        return feats[key]

    def prepare_student(self, student, target_set=None):
        o = self.options
        if o["teacher_levels"] is None:
            raise KdpipeError(
                "Method 'reviewkd' needs the teacher's pre-ReLU stage maps and pooled feature: train from "
                "a store extracted with --methods reviewkd, or with --online-teacher."
            )
        if o["student_levels"] is None:
            o["student_levels"] = self._student_levels(student)
        n = len(o["teacher_levels"])
        if len(o["student_levels"]) < n:
            raise KdpipeError(
                f"ReviewKD pairs the teacher's {n} levels with the student's deepest ones; the student has "
                f"{len(o['student_levels'])}."
            )
        student_levels = o["student_levels"][:n]
        self._head = ReviewHead(
            [lv[0] for lv in student_levels],
            [lv[0] for lv in o["teacher_levels"]],
            [lv[1] for lv in student_levels],
            [lv[1] for lv in o["teacher_levels"]],
        )
        student.review_head = self._head
        student.collect_stages = True
        return student

    def begin_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)

    def warmup_factor(self) -> float:
        """min(epoch / warmup_epochs, 1) with mdistiller's 1-based epoch."""
        return min((self._epoch + 1) / self.options["warmup_epochs"], 1.0)

    def loss(self, logits, feats, targets, labels):
        o = self.options
        if self._head is None:
            raise KdpipeError("Method 'reviewkd': prepare_student must install its fusion modules before training.")
        n = len(o["teacher_levels"])
        pooled = feats["penult"].mean(dim=(2, 3))[:, :, None, None]
        levels = ([pooled] + self._student_maps(feats)[::-1])[:n]
        stages = n - 1
        teacher = [targets[f"preact_stage{i}"] for i in range(1, stages + 1)]
        teacher.append(targets["penult_pooled"][:, :, None, None])
        review = hcl_loss(self._head(levels), teacher)
        ce = F.cross_entropy(logits, labels)
        total = o["ce_weight"] * ce + o["reviewkd_weight"] * self.warmup_factor() * review
        return total, loss_parts(ce=ce, review=review, total=total)


def _stage_number(path: str) -> int:
    tail = path.rsplit("stage", 1)[-1]
    return int(tail) if tail.isdigit() else 0
