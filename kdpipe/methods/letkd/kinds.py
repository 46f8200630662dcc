"""letKD's targets, computed from a target set fitted by ``kdpipe cluster``.

- ``PenultTopk``: at every location of the teacher's penultimate map (pooled to the target
  set's grid), the k largest probabilities of ``softmax_K(-T * ||f - rho_K||^2)`` over the K
  penultimate centres, with their centre indices (``penult_topk_idx`` / ``penult_topk_val``).
- ``PenultSoftmax``: the same distribution over all K, dense; online only (a K-wide row per
  location is too large to store): the reference's own target, for the top-k ablation.
- ``InterSubclass``: at every location of the intermediate map, the label-constrained
  sub-class ``y*K_inter + k*`` (``subclass_idx``); the target handed to the loss is that
  sub-class's row of the score matrix S.

The teacher-side computations are ``kdpipe.methods.letkd.functional.penult_topk_targets`` and
``assign_subclasses``: cluster's assignment pass and the online teacher call the same
functions through these kinds.
"""

from __future__ import annotations

import numpy as np
import torch

from kdpipe.artifacts.target_set import TargetSet
from kdpipe.errors import KdpipeError
from kdpipe.methods.letkd.functional import assign_subclasses, densify_topk, penult_softmax_targets, penult_topk_targets
from kdpipe.targets.base import (
    KindContext,
    StoreContents,
    StoredArray,
    TargetKind,
    TeacherOutputs,
    pool_to,
    warp_channels_last,
)


def index_dtype(num_values: int) -> str:
    """int16 where every index fits (K, C*K_inter <= 32767), else int32."""
    return "int16" if int(num_values) <= np.iinfo(np.int16).max else "int32"


class _TargetSetKind(TargetKind):
    """Shared binding: the target set record and lazily loaded static arrays."""

    writer: str | None = "cluster"
    needs_target_set = True

    def __init__(self):
        self.ctx: KindContext | None = None
        self._static: dict[str, torch.Tensor] = {}

    def bind(self, ctx: KindContext):
        if ctx.target_set is None:
            raise KdpipeError(f"{type(self).__name__} targets need a target set (`kdpipe cluster`).")
        self.ctx = ctx
        self._static = {}
        return self

    def _bound(self) -> KindContext:
        if self.ctx is None:
            raise KdpipeError(f"{type(self).__name__} is not bound to a target set.")
        return self.ctx

    @property
    def ts(self) -> TargetSet:
        target_set = self._bound().target_set
        if target_set is None:  # bind refuses a context without one
            raise KdpipeError(f"{type(self).__name__} is bound to a context without a target set.")
        return target_set

    def fitted(self, short_name: str) -> torch.Tensor:
        """A whole array of the target set (centres, LDA, S) as float32 on the device."""
        if short_name not in self._static:
            self._static[short_name] = self._bound().tensor(self.ts.array(short_name))
        return self._static[short_name]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class PenultTopk(_TargetSetKind):
    """Targets ``penult_topk_idx`` int64 [B, h, w, k] and ``penult_topk_val`` float32
    [B, h, w, k] (probabilities as stored: not renormalised; their sum is the retained mass)."""

    name = "penult_topk"
    target_keys = ("penult_topk_idx", "penult_topk_val")

    @classmethod
    def in_store(cls, contents: StoreContents) -> list[TargetKind]:
        return [cls()] if contents.has_target_array("penult_topk_idx") else []

    @property
    def storage(self) -> dict[str, StoredArray]:
        ts = self.ts
        return {
            ts.array("penult_topk_idx"): StoredArray(
                index_dtype(ts.k_penult), "indices of the top-k nearest penult centres, by decreasing probability"
            ),
            ts.array("penult_topk_val"): StoredArray(
                "float16", "their probabilities under softmax(-T d^2) over all K centres"
            ),
        }

    def online(self, out: TeacherOutputs) -> dict[str, torch.Tensor]:
        ts = self.ts
        feat = pool_to(out.feats["penult"].float(), ts.penult_grid)
        idx, val = penult_topk_targets(feat, self.fitted("penult_centers"), ts.temperature, ts.topk)
        return {ts.array("penult_topk_idx"): idx, ts.array("penult_topk_val"): val}

    def targets(self, rows):
        ts = self.ts
        return {
            "penult_topk_idx": rows[ts.array("penult_topk_idx")].long(),
            "penult_topk_val": rows[ts.array("penult_topk_val")].float(),
        }

    def warp(self, rows, policy, params):
        return {k: warp_channels_last(v, policy, params, "nearest") for k, v in rows.items()}

    def row_stats(self, rows: dict) -> dict:
        """The retained mass (sum of the stored k probabilities) over the written locations."""
        mass = np.asarray(rows[self.ts.array("penult_topk_val")], dtype=np.float64).sum(-1)
        return {"retained_mass": (float(mass.min()) if mass.size else 1.0, float(mass.sum()), int(mass.size))}

    def compare(self, cached, online):
        """Densified, renormalised distributions over all K centres."""
        K = self.ts.k_penult
        return {
            self.name: (
                densify_topk(cached["penult_topk_idx"], cached["penult_topk_val"], K),
                densify_topk(online["penult_topk_idx"], online["penult_topk_val"], K),
            )
        }


class PenultSoftmax(_TargetSetKind):
    """Target ``penult_probs`` float32 [B, h, w, K]: the whole softmax over the K centres, as
    the letKD reference computes it every step. Online only (not stored)."""

    name = "penult_softmax"
    target_keys = ("penult_probs",)
    writer = None

    def online(self, out: TeacherOutputs):
        return {}

    def targets(self, rows):
        raise KdpipeError(
            "The full penultimate softmax is computed online only; train with "
            "--online-teacher, or use the stored top-k."
        )

    def online_targets(self, out: TeacherOutputs) -> dict[str, torch.Tensor]:
        ts = self.ts
        feat = pool_to(out.feats["penult"].float(), ts.penult_grid)
        return {"penult_probs": penult_softmax_targets(feat, self.fitted("penult_centers"), ts.temperature)}


class InterSubclass(_TargetSetKind):
    """Target ``inter_probs`` float32 [B, h, w, C*K_inter]: per location, the score-matrix row
    of its label-constrained sub-class (stored as ``subclass_idx`` [N, V, h, w])."""

    name = "inter_subclass"
    target_keys = ("inter_probs",)

    @classmethod
    def in_store(cls, contents: StoreContents) -> list[TargetKind]:
        return [cls()] if contents.has_target_array("subclass_idx") else []

    @property
    def storage(self) -> dict[str, StoredArray]:
        ts = self.ts
        return {
            ts.array("subclass_idx"): StoredArray(
                index_dtype(ts.num_subclasses), "label-constrained sub-class y*K + k of each location"
            )
        }

    def online(self, out: TeacherOutputs) -> dict[str, torch.Tensor]:
        if out.labels is None:
            raise KdpipeError("letKD's intermediate targets need the images' labels.")
        ts = self.ts
        feat = pool_to(out.feats["inter"].float(), ts.inter_grid)
        sub = assign_subclasses(
            feat,
            out.labels.to(feat.device),
            self.fitted("lda_xbar").reshape(-1),
            self.fitted("lda_scalings"),
            self.fitted("subclass_centers"),
            ts.k_inter,
        )
        return {ts.array("subclass_idx"): sub}

    def targets(self, rows):
        idx = rows[self.ts.array("subclass_idx")].long()
        scores = self.fitted("subclass_scores")
        return {"inter_probs": scores[idx.to(scores.device)]}

    def warp(self, rows, policy, params):
        return {k: policy.apply_maps(v[:, None], params, mode="nearest")[:, 0] for k, v in rows.items()}
