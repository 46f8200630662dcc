"""Class activation maps (CAT-KD): pooled to r x r (``cam_r{r}``) or native (``cam``).

A CAM is the classifier weight applied at every location of the last feature map as a
bias-free 1x1 convolution (``KDModel.forward_features()["cam"]``, [B, C, h, w]). CAT-KD's
loss pools it to r x r; storing the pooled map is r*r / (h*w) of the native size (1/16 for
r = 2 on 8x8 maps), so that is the default. The native map is stored only for methods that
need it (binarisation thresholds over the native cells).
"""

from __future__ import annotations

import torch

from kdpipe.targets.base import KindContext, StoreContents, StoredArray, TargetKind, TeacherOutputs, pool_to

NATIVE = "cam"


def pooled_name(resolution: int) -> str:
    """Store array of the CAM pooled to r x r: ``cam_r{r}``."""
    return f"cam_r{int(resolution)}"


class Cam(TargetKind):
    """Target ``cam`` [B, C, r, r] float32: the teacher CAM adaptive-average-pooled to r x r.

    Read from ``cam_r{r}``; a store that has only the native ``cam`` serves it pooled per
    batch (``bind`` notices), and warp then moves the native map before pooling, which is
    closer to the online teacher than warping the pooled one."""

    listing_order = 10

    target_keys = ("cam",)

    def __init__(self, r: int = 2):
        self.r = int(r)
        self.from_native = False

    @classmethod
    def in_store(cls, contents: StoreContents) -> list[TargetKind]:
        prefix = pooled_name(0)[:-1]
        return [cls(int(n[len(prefix) :])) for n in sorted(contents.names) if n.startswith(prefix)]

    @property
    def name(self) -> str:
        return pooled_name(self.r)

    def __repr__(self) -> str:
        return f"Cam(r={self.r})"

    @property
    def storage(self) -> dict[str, StoredArray]:
        if self.from_native:
            return {NATIVE: StoredArray("float16", "native class activation map (bias-free 1x1 conv)")}
        return {self.name: StoredArray("float16", f"class activation map adaptive-average-pooled to {self.r}x{self.r}")}

    def bind(self, ctx: KindContext) -> Cam:
        self.from_native = bool(ctx.available) and self.name not in ctx.available and NATIVE in ctx.available
        return self

    def online(self, out: TeacherOutputs) -> dict[str, torch.Tensor]:
        cam = out.feats["cam"].float()
        if self.from_native:
            return {NATIVE: cam}
        return {self.name: pool_to(cam, (self.r, self.r))}

    def targets(self, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        cam = rows[NATIVE if self.from_native else self.name].float()
        return {"cam": pool_to(cam, (self.r, self.r))}

    def warp(self, rows, policy, params):
        return {k: policy.apply_maps(v.float(), params, mode="bilinear") for k, v in rows.items()}


class NativeCam(TargetKind):
    """Target ``cam`` [B, C, h, w] float32: the teacher's native CAM (CAT-KD binarisation
    thresholds each class map over its native cells, before pooling)."""

    listing_order = 11

    name = NATIVE

    @classmethod
    def in_store(cls, contents: StoreContents) -> list[TargetKind]:
        return [cls()] if NATIVE in contents.names else []

    target_keys = ("cam",)

    @property
    def storage(self) -> dict[str, StoredArray]:
        return {
            NATIVE: StoredArray(
                "float16", "native class activation map: classifier weight as 1x1 conv on the last map, no bias"
            )
        }

    def online(self, out: TeacherOutputs) -> dict[str, torch.Tensor]:
        return {NATIVE: out.feats["cam"].float()}

    def targets(self, rows):
        return {"cam": rows[NATIVE].float()}

    def warp(self, rows, policy, params):
        return {NATIVE: policy.apply_maps(rows[NATIVE].float(), params, mode="bilinear")}
