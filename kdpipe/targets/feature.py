"""Raw teacher feature maps (``feat/<layer>``): what ``cluster`` fits letKD's LDA and
K-means on.

By default only the identity view is stored (``views="identity"``: the array is
[N, 1, D, h, w]): the letKD reference fits on the un-augmented training images, and the raw
maps of every view would be far too large (hundreds of GiB for CIFAR-100). ``views="all"``
keeps them for every stored view, for users who want fits on augmented views.
"""

from __future__ import annotations

import torch

from kdpipe.errors import KdpipeError
from kdpipe.targets.base import StoreContents, StoredArray, TargetKind, TeacherOutputs

LAYERS = ("penult", "inter")
FEATURE_VIEWS = ("identity", "all")


def feature_name(layer: str) -> str:
    return f"feat/{layer}"


class Feature(TargetKind):
    """Target ``feat_<layer>`` [B, D, h, w] float32: a teacher feature map (``"penult"``: the
    last map before pooling; ``"inter"``: the output of the first block of the last stage)."""

    listing_order = 20

    def __init__(self, layer: str, views: str = "identity"):
        if layer not in LAYERS:
            raise KdpipeError(f"Unknown feature map {layer!r}; choose from {', '.join(LAYERS)}.")
        if views not in FEATURE_VIEWS:
            raise KdpipeError(f"Feature views must be {' or '.join(FEATURE_VIEWS)}, not {views!r}.")
        self.layer = layer
        self.views = views

    @classmethod
    def in_store(cls, contents: StoreContents) -> list[TargetKind]:
        prefix = feature_name("")
        layers = [n[len(prefix) :] for n in sorted(contents.names) if n.startswith(prefix)]
        return [cls(layer, views=contents.feature_views) for layer in layers if layer in LAYERS]

    @property
    def name(self) -> str:
        return feature_name(self.layer)

    @property
    def target_keys(self) -> tuple[str, ...]:
        return (f"feat_{self.layer}",)

    def __repr__(self) -> str:
        return f"Feature({self.layer!r}, views={self.views!r})"

    @property
    def storage(self) -> dict[str, StoredArray]:
        return {
            self.name: StoredArray("float16", f"teacher feature map '{self.layer}' (before any tap)", views=self.views)
        }

    def online(self, out: TeacherOutputs) -> dict[str, torch.Tensor]:
        return {self.name: out.feats[self.layer].float()}

    def targets(self, rows):
        return {f"feat_{self.layer}": rows[self.name].float()}

    def warp(self, rows, policy, params):
        return {self.name: policy.apply_maps(rows[self.name].float(), params, mode="bilinear")}
