"""Contrastive Representation Distillation (CRD, Tian et al., ICLR 2020) as mdistiller computes
it (``mdistiller/distillers/CRD.py``, the sampling of ``mdistiller/dataset/cifar100.py``
``CIFAR100InstanceSample``; the same as the authors' RepDistiller ``crd/``).

Per step, with the pooled last features of both networks (mdistiller's ``pooled_feat``: the
penult map averaged over its cells, [B, Ds] and [B, Dt]):

1. embeddings: ``Embed`` = a linear layer to ``feat_dim`` then l2 normalisation (x divided
   by its norm, no epsilon): e_s = embed_s(student), e_t = embed_t(teacher); both layers are
   trained with the student;
2. contrast indices [B, K+1]: column 0 the positive (``exact``: the sample itself;
   ``relax``: a random sample of its class), then K negatives drawn uniformly from the
   samples of the other classes, without replacement unless there are fewer than K;
3. two memory banks [N, feat_dim] (N: training samples), initialised uniform in
   [-s, s], s = 1 / sqrt(feat_dim / 3): the student's (mdistiller's ``memory_v1``) and the
   teacher's (``memory_v2``). Scores exp(<memory row, embedding> / T): the student's
   embedding against the teacher's bank's rows, and the teacher's against the student's
   bank, each divided by its normalisation constant Z, which the first step fixes as
   mean(scores) * N;
4. loss = NCE(student scores) + NCE(teacher scores), NCE being mdistiller's
   ``ContrastLoss`` (``nce_loss``); then each bank's rows of the batch move to
   normalise(momentum * row + (1 - momentum) * embedding) (without gradient).

Total = ce_weight * CE + feat_weight * loss.

What the store holds: the teacher's pooled feature of every view (``PooledPenult``,
``penult_pooled`` [N, V, Dt] float16): it is all of the teacher CRD reads, since mdistiller's
``embed_t`` is a layer trained with the student (so the embedding itself cannot be stored).
The memory banks, the embeddings and the Z constants are the student side's
(``CRDHead``, the student's submodule ``crd_head``, saved in its checkpoints so that a
resumed run continues with the same banks). The banks are indexed by data-set sample, so the
kind asks the target sources for each batch's sample indices (``targets["sample_index"]``)
and the method for the training labels (``TeacherInfo.labels``).

Warp (1-view stores) keeps the identity view's pooled vector (not spatial). Data-parallel
runs: DDP broadcasts rank 0's buffers at each forward, so the banks keep rank 0's updates only
(mdistiller's single-process DataParallel updates them with the whole batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdpipe.errors import KdpipeError
from kdpipe.methods.base import Method, loss_parts
from kdpipe.methods.registry import MethodOptions, option, register
from kdpipe.targets.base import StoreContents, StoredArray, TargetKind, TeacherOutputs

__all__ = [
    "PooledPenult",
    "Embed",
    "nce_loss",
    "contrast_scores",
    "crd_loss",
    "momentum_update",
    "sample_contrast_index",
    "CRDHead",
    "CRDOptions",
    "CRD",
]

_CFG = "mdistiller/engine/cfg.py"


# ------------------------------------------------------------------ the teacher's target
class PooledPenult(TargetKind):
    """Target ``penult_pooled`` [B, Dt] float32: the teacher's penult map averaged over its
    cells (mdistiller's ``pooled_feat``), every view; with the batch's sample indices."""

    name = "penult_pooled"
    target_keys = ("penult_pooled",)
    needs_sample_index = True

    @classmethod
    def in_store(cls, contents: StoreContents) -> list[TargetKind]:
        return [cls()] if cls.name in contents.names else []

    @property
    def storage(self) -> dict[str, StoredArray]:
        return {self.name: StoredArray("float16", "teacher penultimate map averaged over its cells, every view (CRD)")}

    def online(self, out: TeacherOutputs) -> dict[str, torch.Tensor]:
        return {self.name: out.feats["penult"].float().mean(dim=(2, 3))}

    def targets(self, rows):
        return {"penult_pooled": rows[self.name].float()}


# ------------------------------------------------------------------ pure functions
class Embed(nn.Module):
    """[B, ...] -> [B, dim_out]: flatten, linear (PyTorch's default initialisation), then
    divided by its l2 norm (mdistiller's ``Embed`` and ``Normalize(2)``)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(int(dim_in), int(dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x.reshape(x.shape[0], -1))
        return x / x.pow(2).sum(1, keepdim=True).sqrt()


def contrast_scores(memory: torch.Tensor, embedding: torch.Tensor, index: torch.Tensor, temperature: float):
    """Unnormalised scores exp(<memory[index[b, j]], embedding[b]> / T).

    Args:
        memory: [N, D] the other network's bank (no gradient flows into it).
        embedding: [B, D]; index: int64 [B, K+1] (column 0 the positive).

    Returns:
        [B, K+1] float32.
    """
    rows = memory.detach()[index.reshape(-1)].reshape(index.shape[0], index.shape[1], -1)
    # float32 whatever autocast says: exp(1 / 0.07) is past float16's range
    dots = torch.bmm(rows.float(), embedding.float().unsqueeze(2)).squeeze(2)
    return torch.exp(dots / float(temperature))


def nce_loss(scores: torch.Tensor, num_data: int) -> torch.Tensor:
    """mdistiller's ``ContrastLoss``: NCE with a uniform noise distribution over N samples.

    Args:
        scores: [B, K+1] normalised scores P (column 0 the positive pair).
        num_data: N.

    Returns:
        scalar: -(sum_b log(P_b0 / (P_b0 + K/N + eps)) + sum_{b, j>0} log((K/N) / (P_bj + K/N
        + eps))) / B, eps = 1e-7.
    """
    eps = 1e-7
    m = scores.shape[1] - 1
    noise = m / float(num_data)
    log_pos = torch.log(scores[:, 0] / (scores[:, 0] + noise + eps))
    log_neg = torch.log(noise / (scores[:, 1:] + noise + eps))
    return -(log_pos.sum() + log_neg.sum()) / scores.shape[0]


def crd_loss(
    student_embedding: torch.Tensor,
    teacher_embedding: torch.Tensor,
    student_memory: torch.Tensor,
    teacher_memory: torch.Tensor,
    index: torch.Tensor,
    temperature: float,
    z_student: float,
    z_teacher: float,
    num_data: int,
) -> torch.Tensor:
    """The CRD loss of one step, before the banks move (mdistiller's ``crd_loss``).

    Args:
        student_embedding / teacher_embedding: [B, D], the ``Embed`` outputs.
        student_memory / teacher_memory: [N, D], the banks before this step's update.
        index: int64 [B, K+1] contrast indices.
        z_student: Z of the student's scores (against the teacher's bank); z_teacher: of the
            teacher's (against the student's bank).

    Returns:
        scalar: nce_loss(student scores / Z_s) + nce_loss(teacher scores / Z_t).
    """
    out_s = contrast_scores(teacher_memory, student_embedding, index, temperature) / z_student
    out_t = contrast_scores(student_memory, teacher_embedding, index, temperature) / z_teacher
    return nce_loss(out_s, num_data) + nce_loss(out_t, num_data)


@torch.no_grad()
def momentum_update(memory: torch.Tensor, embedding: torch.Tensor, index: torch.Tensor, momentum: float) -> None:
    """Rows ``index`` [B] of ``memory`` [N, D] <- l2-normalised momentum * row + (1 -
    momentum) * embedding [B, D] (in place)."""
    rows = memory[index] * momentum + embedding.detach().to(memory.dtype) * (1.0 - momentum)
    memory.index_copy_(0, index, rows / rows.pow(2).sum(1, keepdim=True).sqrt())


def sample_contrast_index(
    index: torch.Tensor, labels: torch.Tensor, k: int, mode: str = "exact", generator=None
) -> torch.Tensor:
    """Contrast indices [B, K+1] for the samples ``index`` [B] (see the module docstring).

    Args:
        labels: int64 [N], every training sample's label.
        k: negatives per sample; mode: "exact" (positive = the sample) or "relax" (a random
            sample of its class).
    """
    own = labels[index]
    negative = labels[None, :] != own[:, None]  # [B, N]
    counts = negative.sum(1)
    out = torch.empty(index.shape[0], k + 1, dtype=torch.int64, device=index.device)
    keys = torch.rand(negative.shape, device=index.device, generator=generator)
    keys = keys.masked_fill(~negative, 2.0)  # a uniform random k-subset: the k smallest keys
    few = counts < k  # mdistiller draws with replacement only when a class has fewer negatives
    if bool((~few).any()):
        out[~few, 1:] = keys[~few].topk(k, dim=1, largest=False).indices
    if bool(few.any()):
        out[few, 1:] = torch.multinomial(negative[few].float(), k, replacement=True, generator=generator)
    if mode == "exact":
        out[:, 0] = index
    else:
        same = labels[None, :] == own[:, None]
        out[:, 0] = torch.multinomial(same.float(), 1, generator=generator)[:, 0]
    return out


# ------------------------------------------------------------------ the student side
class CRDHead(nn.Module):
    """The student side of CRD: both embeddings, both memory banks and the Z constants.

    Args:
        student_dim / teacher_dim: Ds, Dt of the pooled features; feat_dim: the embedding's.
        num_data: N; labels: int64 [N] (None: zeros, for a rebuild whose checkpoint is loaded
            for inference only).

    ``forward(student_pooled, teacher_pooled, index, contrast_index, temperature, momentum)``
    -> the loss; in training mode it fixes Z on the first call and updates the banks.
    """

    # buffers (registered in __init__)
    student_memory: torch.Tensor
    teacher_memory: torch.Tensor
    z: torch.Tensor
    labels: torch.Tensor

    def __init__(
        self, student_dim: int, teacher_dim: int, feat_dim: int, num_data: int, labels: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.embed_s = Embed(student_dim, feat_dim)
        self.embed_t = Embed(teacher_dim, feat_dim)
        self.num_data = int(num_data)
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        # mdistiller's ContrastMemory: memory_v1 (the student's) first, then memory_v2
        self.register_buffer("student_memory", torch.rand(num_data, feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("teacher_memory", torch.rand(num_data, feat_dim).mul_(2 * stdv).add_(-stdv))
        # Z of the student's and the teacher's scores; negative: not fixed yet
        self.register_buffer("z", torch.tensor([-1.0, -1.0]))
        labels = torch.zeros(num_data, dtype=torch.int64) if labels is None else labels.to(torch.int64)
        self.register_buffer("labels", labels, persistent=False)

    def forward(self, student_pooled, teacher_pooled, index, contrast_index, temperature: float, momentum: float):
        e_s, e_t = self.embed_s(student_pooled), self.embed_t(teacher_pooled.to(student_pooled.dtype))
        if bool((self.z < 0).any()):
            with torch.no_grad():
                n = self.num_data
                self.z[0] = contrast_scores(self.teacher_memory, e_s, contrast_index, temperature).mean() * n
                self.z[1] = contrast_scores(self.student_memory, e_t, contrast_index, temperature).mean() * n
        z_s, z_t = float(self.z[0]), float(self.z[1])
        loss = crd_loss(
            e_s, e_t, self.student_memory, self.teacher_memory, contrast_index, temperature, z_s, z_t, self.num_data
        )
        if self.training:
            momentum_update(self.student_memory, e_s, index, momentum)
            momentum_update(self.teacher_memory, e_t, index, momentum)
        return loss


# ------------------------------------------------------------------ options
@dataclass
class CRDOptions(MethodOptions):
    """CRD's options: mdistiller/engine/cfg.py CFG.CRD (configs/cifar100/crd.yaml keeps them)."""

    feat_dim: int | None = option(
        128, source=f"{_CFG} CFG.CRD.FEAT.DIM", help="width of the contrastive embedding", yaml="CRD.FEAT.DIM"
    )
    nce_k: int | None = option(16384, source=f"{_CFG} CFG.CRD.NCE.K", help="negatives per sample", yaml="CRD.NCE.K")
    nce_t: float | None = option(
        0.07, source=f"{_CFG} CFG.CRD.NCE.TEMPERATURE", help="temperature of the scores", yaml="CRD.NCE.TEMPERATURE"
    )
    nce_momentum: float | None = option(
        0.5, source=f"{_CFG} CFG.CRD.NCE.MOMENTUM", help="momentum of the memory banks", yaml="CRD.NCE.MOMENTUM"
    )
    mode: str | None = option(
        "exact",
        source=f"{_CFG} CFG.CRD.MODE",
        help="positive pair: the sample itself (exact) or one of its class (relax)",
        yaml="CRD.MODE",
        choices=("exact", "relax"),
    )
    ce_weight: float | None = option(
        1.0, source=f"{_CFG} CFG.CRD.LOSS.CE_WEIGHT", help="weight of CE", yaml="CRD.LOSS.CE_WEIGHT"
    )
    feat_weight: float | None = option(
        0.8, source=f"{_CFG} CFG.CRD.LOSS.FEAT_WEIGHT", help="weight of the CRD loss", yaml="CRD.LOSS.FEAT_WEIGHT"
    )


# ------------------------------------------------------------------ the method
@register(
    "crd",
    options=CRDOptions,
    summary="CRD: CE + weight * NCE of student and teacher embeddings against each other's memory bank",
    paper="Tian et al., ICLR 2020; mdistiller/distillers/CRD.py",
    yaml_names=("CRD",),
    # mdistiller sizes its embeddings from these; kdpipe reads the widths off the networks
    yaml_recorded={"CRD.FEAT.STUDENT_DIM": 256, "CRD.FEAT.TEACHER_DIM": 256},
)
class CRD(Method):
    """CRD: total = ce_weight * CE + feat_weight * (NCE_s + NCE_t) (see the module docstring).

    ``student_dim``, ``teacher_dim`` and ``num_data`` size ``CRDHead`` (the student's
    ``crd_head``); they are found from the networks, the store and the training set, and
    recorded so that evaluate rebuilds the head.
    """

    name = "crd"
    recorded_options = ("student_dim", "teacher_dim", "num_data")

    def __init__(
        self,
        feat_dim: int | None = None,
        nce_k: int | None = None,
        nce_t: float | None = None,
        nce_momentum: float | None = None,
        mode: str | None = None,
        ce_weight: float | None = None,
        feat_weight: float | None = None,
        student_dim: int | None = None,
        teacher_dim: int | None = None,
        num_data: int | None = None,
    ):
        d = CRDOptions.defaults()
        given = {
            "feat_dim": feat_dim,
            "nce_k": nce_k,
            "nce_t": nce_t,
            "nce_momentum": nce_momentum,
            "mode": mode,
            "ce_weight": ce_weight,
            "feat_weight": feat_weight,
        }
        options = {k: d[k] if v is None else v for k, v in given.items()}
        for key in ("feat_dim", "nce_k"):
            if int(options[key]) < 1:
                self._bad_option(key, options[key], "a positive integer")
        if not float(options["nce_t"]) > 0:
            self._bad_option("nce_t", options["nce_t"], "a positive number")
        if not 0.0 <= float(options["nce_momentum"]) <= 1.0:
            self._bad_option("nce_momentum", options["nce_momentum"], "between 0 and 1")
        if options["mode"] not in ("exact", "relax"):
            self._bad_option("mode", options["mode"], "exact or relax")
        recorded = {"student_dim": student_dim, "teacher_dim": teacher_dim, "num_data": num_data}
        super().__init__(**options, **{k: None if v is None else int(v) for k, v in recorded.items()})
        self._labels: torch.Tensor | None = None
        self._head: CRDHead | None = None

    def kinds(self) -> list:
        return [PooledPenult()]

    def attach_teacher(self, info) -> None:
        shape = info.shapes.get(PooledPenult.name)
        if shape is not None:
            self.options["teacher_dim"] = int(shape[0])
        if info.labels is not None:
            self._labels = torch.as_tensor(np.asarray(info.labels), dtype=torch.int64)
            self.options["num_data"] = int(self._labels.numel())

    def prepare_student(self, student, target_set=None):
        o = self.options
        if o["teacher_dim"] is None or o["num_data"] is None:
            raise KdpipeError(
                "Method 'crd' needs the teacher's pooled features and the training set: train from a "
                "store extracted with --methods crd, or with --online-teacher."
            )
        o["student_dim"] = int(student.feature_channels()["penult"])
        self._head = CRDHead(o["student_dim"], o["teacher_dim"], o["feat_dim"], o["num_data"], self._labels)
        student.crd_head = self._head
        return student

    def loss(self, logits, feats, targets, labels):
        o = self.options
        head = self._head
        if head is None:
            raise KdpipeError("Method 'crd': prepare_student must install its head before training.")
        index = targets["sample_index"]
        contrast = sample_contrast_index(index, head.labels, o["nce_k"], o["mode"])
        student_pooled = feats["penult"].mean(dim=(2, 3))
        crd = head(student_pooled, targets["penult_pooled"], index, contrast, o["nce_t"], o["nce_momentum"])
        ce = F.cross_entropy(logits, labels)
        total = o["ce_weight"] * ce + o["feat_weight"] * crd
        return total, loss_parts(ce=ce, crd=crd, total=total)
