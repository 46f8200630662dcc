"""Teacher targets of the comparison methods that read stage outputs or the last map (AT,
FitNet, SimKD), each stored for every view.

- ``AttentionMaps(p)``: AT's attention map of each teacher stage (mdistiller's
  ``feats["feats"][1:]``), [h, w] per stage, l2-normalised (``kdpipe.methods.at``), at the
  stage's own side (``at_p2/stage1`` ...) and at half its side (``at_p2/stage1_half``: the
  stage's feature average-pooled to side // 2 before the map). Pooling a map is not pooling
  the feature it comes from, so a student whose stage is half the teacher's (ShuffleNets
  after a 32x32-stem teacher) needs the second map to get mdistiller's loss exactly; other
  side ratios are refused by the loss. Both together are 5/4 of the native maps.
- ``HintFeature(layer)``: FitNet's hint, the teacher's ``feats["feats"][layer]``
  (``hint/feats2``), the whole feature map.
- ``PenultMap()``: SimKD's target, the teacher's last feature map before pooling
  (``penult_map``), plus the teacher's classifier and the map's side written once as whole
  arrays (``static/teacher/*``): the SimKD student classifies with them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from kdpipe.errors import KdpipeError
from kdpipe.targets.base import KindContext, StoreContents, StoredArray, TargetKind, TeacherOutputs

__all__ = [
    "AttentionMaps",
    "HintFeature",
    "PenultMap",
    "CLASSIFIER_WEIGHT",
    "CLASSIFIER_BIAS",
    "PENULT_SIDE",
    "teacher_classifier",
]

#: static arrays of ``PenultMap`` (``static/<name>``)
CLASSIFIER_WEIGHT = "teacher/classifier_weight"
CLASSIFIER_BIAS = "teacher/classifier_bias"
PENULT_SIDE = "teacher/penult_side"


def _warp_maps(rows: dict, policy, params) -> dict:
    """[B, h, w] maps moved to other views (bilinear), as the CAMs are."""
    return {k: policy.apply_maps(v.float()[:, None], params, mode="bilinear")[:, 0] for k, v in rows.items()}


def attention_map(feat: torch.Tensor, p: float = 2.0, size: int | None = None) -> torch.Tensor:
    """Attention map of one stage: [B, D, h, w] -> [B, h, w], l2-normalised over h*w.

    ``size``: where it differs from the feature's height h, adaptive-average-pool the
    feature to size x size first (mdistiller compares heights and pools to squares; its maps
    are square). Pooling goes down only: the map of a feature never grows.
    """
    if feat.dim() != 4:
        raise ValueError(f"attention_map expects a feature map [B, D, h, w]; got {tuple(feat.shape)}")
    if size is not None and int(size) != feat.shape[2]:
        if int(size) > feat.shape[2]:
            raise ValueError(f"attention_map pools features down only: feature side {feat.shape[2]}, asked {size}")
        feat = F.adaptive_avg_pool2d(feat, (int(size), int(size)))
    batch, _, h, w = feat.shape
    amap = feat.pow(p).mean(dim=1).reshape(batch, h * w)
    return F.normalize(amap, p=2.0, dim=1).reshape(batch, h, w)


class AttentionMaps(TargetKind):
    """Targets ``at_stage{i}`` [B, h_i, w_i] and ``at_stage{i}_half`` [B, h_i // 2, w_i // 2]
    float32 for the teacher's stages i = 1 .. n (see the module docstring).

    ``stages`` None: the number of stored stages is read from the store when bound."""

    listing_order = 30

    needs_stages = True

    def __init__(self, p: float = 2.0, stages: int | None = None):
        self.p = float(p)
        self.stages = None if stages is None else int(stages)

    @classmethod
    def in_store(cls, contents: StoreContents) -> list[TargetKind]:
        powers = {n.split("/", 1)[0] for n in contents.names if n.startswith("at_p") and "/stage" in n}
        return [cls(float(p[len("at_p") :])) for p in sorted(powers)]

    @property
    def name(self) -> str:
        return f"at_p{self.p:g}"

    def __repr__(self) -> str:
        return f"AttentionMaps(p={self.p:g}, stages={self.stages})"

    def _paths(self) -> list[tuple[str, str, str]]:
        """(array path, target key, half or native) per stored map; none until the stage count
        is known (from the store's arrays, or the teacher's first outputs)."""
        out = []
        for i in range(1, (self.stages or 0) + 1):
            out.append((f"{self.name}/stage{i}", f"at_stage{i}", "native"))
            out.append((f"{self.name}/stage{i}_half", f"at_stage{i}_half", "half"))
        return out

    @property
    def target_keys(self) -> tuple[str, ...]:
        return tuple(key for _, key, _ in self._paths())

    @property
    def storage(self) -> dict[str, StoredArray]:
        return {
            path: StoredArray(
                "float16",
                f"AT attention map (p={self.p:g}) of teacher stage "
                f"{path.rsplit('stage', 1)[1]}" + (", feature pooled to half its side" if size == "half" else ""),
            )
            for path, _, size in self._paths()
        }

    def bind(self, ctx: KindContext) -> AttentionMaps:
        if self.stages is None and ctx.available:
            self.stages = (
                sum(1 for p in ctx.available if p.startswith(self.name + "/stage") and not p.endswith("_half")) or None
            )
        return self

    def online(self, out: TeacherOutputs) -> dict[str, torch.Tensor]:
        feats = out.feats["stages"]
        if self.stages is None:
            self.stages = len(feats)
        if len(feats) < self.stages:
            raise KdpipeError(f"The teacher lists {len(feats)} stages; the store's AT maps need {self.stages}.")
        rows = {}
        for i, feat in enumerate(feats[: self.stages], start=1):
            feat = feat.float()
            rows[f"{self.name}/stage{i}"] = attention_map(feat, self.p)
            rows[f"{self.name}/stage{i}_half"] = attention_map(feat, self.p, size=max(1, feat.shape[2] // 2))
        return rows

    def targets(self, rows):
        return {key: rows[path].float() for path, key, _ in self._paths()}

    def warp(self, rows, policy, params):
        return _warp_maps(rows, policy, params)


class HintFeature(TargetKind):
    """Target ``hint`` [B, D, h, w] float32: the teacher's ``feats["feats"][layer]`` (FitNet's
    hint; ``layer`` counts as mdistiller's list does, 0 being the stem, so stage ``layer``)."""

    listing_order = 31

    needs_stages = True
    target_keys = ("hint",)

    def __init__(self, layer: int = 2):
        if int(layer) < 1:
            raise KdpipeError(f"FitNet's hint layer must be a stage (1 or more), not {layer!r}.")
        self.layer = int(layer)

    @classmethod
    def in_store(cls, contents: StoreContents) -> list[TargetKind]:
        return [cls(int(n[len("hint/feats") :])) for n in sorted(contents.names) if n.startswith("hint/feats")]

    @property
    def name(self) -> str:
        return f"hint/feats{self.layer}"

    def __repr__(self) -> str:
        return f"HintFeature(layer={self.layer})"

    @property
    def storage(self) -> dict[str, StoredArray]:
        return {self.name: StoredArray("float16", f"teacher feature map feats[{self.layer}] (FitNet hint)")}

    def online(self, out: TeacherOutputs) -> dict[str, torch.Tensor]:
        feats = out.feats["stages"]
        if self.layer > len(feats):
            raise KdpipeError(f"FitNet's hint layer {self.layer} is past the teacher's {len(feats)} stages.")
        return {self.name: feats[self.layer - 1].float()}

    def targets(self, rows):
        return {"hint": rows[self.name].float()}

    def warp(self, rows, policy, params):
        return {self.name: policy.apply_maps(rows[self.name].float(), params, mode="bilinear")}


def teacher_classifier(teacher) -> tuple[np.ndarray, np.ndarray]:
    """(weight [C, D], bias [C]) float32 of a teacher's classifier; a CAM head has no bias (zeros)."""
    head = teacher.head()
    weight = head.weight.detach().float().reshape(head.weight.shape[0], -1).cpu().numpy()
    bias = getattr(head, "bias", None)
    bias = np.zeros(weight.shape[0], np.float32) if bias is None else bias.detach().float().cpu().numpy()
    return weight, bias


class PenultMap(TargetKind):
    """Target ``penult_map`` [B, D, h, w] float32: the teacher's last map before pooling
    (SimKD's ``feat_t[-2]``), with the teacher's classifier as static arrays."""

    listing_order = 32

    name = "penult_map"
    target_keys = ("penult_map",)

    @classmethod
    def in_store(cls, contents: StoreContents) -> list[TargetKind]:
        return [cls()] if cls.name in contents.names else []

    @property
    def storage(self) -> dict[str, StoredArray]:
        return {self.name: StoredArray("float16", "teacher penultimate feature map, every view (SimKD)")}

    def static(self, teacher, out: TeacherOutputs) -> dict:
        weight, bias = teacher_classifier(teacher)
        side = np.asarray([out.feats["penult"].shape[2]], dtype=np.int32)
        return {
            CLASSIFIER_WEIGHT: (weight, "teacher classifier weight [C, D] (SimKD reuses it)"),
            CLASSIFIER_BIAS: (bias, "teacher classifier bias [C] (zeros for a CAM head)"),
            PENULT_SIDE: (side, "spatial side of the teacher's penultimate map"),
        }

    def online(self, out: TeacherOutputs) -> dict[str, torch.Tensor]:
        return {self.name: out.feats["penult"].float()}

    def targets(self, rows):
        return {"penult_map": rows[self.name].float()}

    def warp(self, rows, policy, params):
        return {self.name: policy.apply_maps(rows[self.name].float(), params, mode="bilinear")}
