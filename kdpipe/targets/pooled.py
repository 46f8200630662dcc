"""The teacher's pooled feature (mdistiller's ``feats["pooled_feat"]``): what the relational
methods (PKT, RKD) read of the teacher, stored for every view.

mdistiller's ``pooled_feat`` is the global average of the teacher's last feature map, the
vector its classifier reads (every family in mdistiller/models/cifar/*.py pools the map the
classifier follows). kdpipe's ``penult`` map is that map, so the stored row is its mean over
the h * w cells: D numbers per view instead of D * h * w. The relational losses compare the
samples of a batch with each other (distances, angles, cosine similarities), which a
per-sample row of this vector gives exactly (up to float16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdpipe.targets.base import StoreContents, StoredArray, TargetKind, TeacherOutputs

__all__ = ["PooledFeature", "pooled_feature"]


def pooled_feature(penult: torch.Tensor) -> torch.Tensor:
    """[B, D, h, w] -> [B, D]: the mean over the h * w cells (the models' global pooling)."""
    return F.adaptive_avg_pool2d(penult, 1).flatten(1)


class PooledFeature(TargetKind):
    """Target ``pooled_feat`` [B, D] float32: the teacher's penult map averaged over its cells.

    Warp keeps the identity view's vector (it is not spatial), as for the logits."""

    name = "pooled_feat"
    target_keys = ("pooled_feat",)
    listing_order = 21

    @classmethod
    def in_store(cls, contents: StoreContents) -> list[TargetKind]:
        return [cls()] if cls.name in contents.names else []

    @property
    def storage(self) -> dict[str, StoredArray]:
        return {self.name: StoredArray("float16", "teacher penultimate map averaged over its cells (pooled_feat)")}

    def online(self, out: TeacherOutputs) -> dict[str, torch.Tensor]:
        return {self.name: pooled_feature(out.feats["penult"].float())}

    def targets(self, rows):
        return {"pooled_feat": rows[self.name].float()}
