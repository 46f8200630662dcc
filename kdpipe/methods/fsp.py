"""Flow of Solution Procedure (FSP, Yim et al., CVPR 2017) as the CRD authors' RepDistiller
computes it: ``distiller_zoo/FSP.py``, ``train_student.py`` and ``helper/pretrain.py``
(``--distill fsp -a 0 -b 50``, ``--init_epochs 30``). mdistiller has no FSP; the letKD
supplement's FSP row is RepDistiller's.

RepDistiller trains FSP in two stages, as AB (``kdpipe.methods.ab``): ``init_epochs`` (30)
epochs of the FSP loss alone on the student's feature layers, then 240 epochs of CE alone (its
FSP term is 0 in that stage; ``-b 50`` weighs nothing).

FSP matrices of a network: its stem output and stage outputs (RepDistiller's ``feat[:-1]``,
post-ReLU; kdpipe's ``feats["stem"]`` and ``feats["stages"]``), taken in consecutive pairs
(bottom, top): the larger map is adaptive-average-pooled to the smaller's side, then G[b, j,
i] = mean over the cells of top[b, j] * bottom[b, i], [B, C_top, C_bottom]. The loss is the sum
over pairs of the mean squared difference of the student's and the teacher's matrices; the
channel counts must agree pair by pair (RepDistiller refuses other pairs, the supplement's
"-").

The loss reads the teacher only through its FSP matrices, so the store holds them
(``fsp/pair{i}`` [N, V, C_top, C_bottom] float16, every view): a few KiB per view instead of
the feature maps. Run as AB is (``kdpipe.methods.ab``): one loop of ``init_epochs + 240``
epochs, the optimizer's state cleared where the second stage begins, the classifier untouched
by the first, and scaled to a shorter ``--epochs`` as ``kdpipe.methods.two_stage`` says.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdpipe.errors import KdpipeError
from kdpipe.methods.base import Method, loss_parts, probe_features
from kdpipe.methods.registry import MethodOptions, option, register
from kdpipe.methods.two_stage import InitialisationStage
from kdpipe.targets.base import NumberedArrays, TeacherOutputs

__all__ = ["FSPMatrices", "fsp_matrices", "fsp_loss", "FSPOptions", "FSP"]

_REPO = "HobbitLong/RepDistiller"


def fsp_matrices(feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """RepDistiller's ``compute_fsp``: feats [B, C_k, h_k, w_k] (square maps) -> per consecutive
    pair, [B, C_{k+1}, C_k]."""
    out = []
    for bottom, top in zip(feats[:-1], feats[1:]):
        b_side, t_side = bottom.shape[2], top.shape[2]
        if b_side > t_side:
            bottom = F.adaptive_avg_pool2d(bottom, (t_side, t_side))
        elif b_side < t_side:
            top = F.adaptive_avg_pool2d(top, (b_side, b_side))
        out.append(torch.einsum("bihw,bjhw->bji", bottom, top) / (bottom.shape[2] * bottom.shape[3]))
    return out


def fsp_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over pairs of mean((G_s - G_t)^2) (RepDistiller's ``compute_loss``, summed as its
    initialisation stage sums the group)."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"FSP compares matrices pair by pair; got {len(student)} and {len(teacher)}")
    return torch.stack([(s - t.to(s)).pow(2).mean() for s, t in zip(student, teacher)]).sum()


def _maps(feats: dict) -> list[torch.Tensor]:
    if "stem" not in feats:
        raise KdpipeError("FSP needs the network's stem output, which its family does not name.")
    return [feats["stem"]] + list(feats["stages"])


class FSPMatrices(NumberedArrays):
    """Targets ``fsp{i}`` [B, C_{i+1}, C_i] float32: the teacher's FSP matrix of maps i and i+1
    (map 0 the stem), every view."""

    name = "fsp"
    key = "fsp"
    part = "pair"

    def describe(self, number: int) -> str:
        return "teacher FSP matrix of consecutive maps, every view"

    def online(self, out: TeacherOutputs) -> dict[str, torch.Tensor]:
        return self._numbered(fsp_matrices([f.float() for f in _maps(out.feats)]))


@dataclass
class FSPOptions(MethodOptions):
    """FSP's options: RepDistiller's defaults and its FSP command."""

    init_epochs: int | None = option(
        30, source=f"{_REPO} train_student.py (--init_epochs default 30)", help="epochs of the FSP initialisation"
    )
    ce_weight: float | None = option(
        1.0, source=f"{_REPO} scripts/run_cifar_distill.sh (-r default 1)", help="weight of CE after the initialisation"
    )


@register(
    "fsp",
    options=FSPOptions,
    summary="FSP: init_epochs of matching FSP matrices of consecutive maps, then CE (RepDistiller)",
    paper="Yim et al., CVPR 2017; HobbitLong/RepDistiller distiller_zoo/FSP.py",
)
class FSP(InitialisationStage, Method):
    """FSP (see the module docstring): fsp_loss before ``init_epochs``, ce_weight * CE after."""

    name = "fsp"

    def __init__(self, init_epochs: int | None = None, ce_weight: float | None = None):
        d = FSPOptions.defaults()
        options = {
            "init_epochs": d["init_epochs"] if init_epochs is None else int(init_epochs),
            "ce_weight": d["ce_weight"] if ce_weight is None else float(ce_weight),
        }
        if options["init_epochs"] < 0:
            self._bad_option("init_epochs", options["init_epochs"], "0 or more")
        super().__init__(**options)
        self._image_size = (32, 32)
        self._teacher_shapes: list[tuple[int, ...]] | None = None
        self._start_stages(init_epochs, d["init_epochs"])

    def kinds(self) -> list:
        return [FSPMatrices()]

    def attach_teacher(self, info) -> None:
        self._image_size = tuple(info.image_size)
        paths = sorted((p for p in info.shapes if p.startswith(FSPMatrices.name + "/")), key=_pair_number)
        if paths:
            self._teacher_shapes = [tuple(int(s) for s in info.shapes[p]) for p in paths]

    def prepare_student(self, student, target_set=None):
        student.collect_stages = True
        if self._teacher_shapes is None:
            return student  # evaluate's rebuild: nothing to size
        feats = probe_features(student, self._image_size)
        shapes = [tuple(int(s) for s in m.shape[1:]) for m in fsp_matrices(_maps(feats))]
        if shapes != self._teacher_shapes:
            raise KdpipeError(
                f"FSP needs the student's and the teacher's channel counts to agree map by map (RepDistiller); "
                f"the student's FSP matrices are {shapes}, the teacher's {self._teacher_shapes}."
            )
        return student

    def loss(self, logits, feats, targets, labels):
        ce = F.cross_entropy(logits, labels)
        if self.initialising:
            student = fsp_matrices(_maps(feats))
            fsp = fsp_loss(student, [targets[f"fsp{i}"] for i in range(1, len(student) + 1)])
            return fsp, loss_parts(ce=ce, fsp=fsp, total=fsp)  # CE shown, not trained on
        total = self.options["ce_weight"] * ce
        return total, loss_parts(ce=ce, fsp=torch.zeros((), device=ce.device), total=total)


def _pair_number(path: str) -> int:
    tail = path.rsplit("pair", 1)[-1]
    return int(tail) if tail.isdigit() else 0
