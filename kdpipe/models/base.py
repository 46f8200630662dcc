"""The feature interface every kdpipe model offers (docs/ARCHITECTURE.md, "Models").

A model is split at two points that distillation methods need:

    x [B, 3, H, W]
      -> forward_inter(x)        -> inter  [B, Di, hi, wi]  output of the first block of the
                                                            last stage (family docstrings say
                                                            which block that is)
      -> tap "inter" (optional)
      -> forward_penult(inter)   -> penult [B, D, h, w]     last feature map before global
                                                            pooling (after the model's own
                                                            final BN/ReLU, if it has one)
      -> tap "penult" (optional)
      -> global average pool -> head() (nn.Linear)  -> logits [B, C]

Taps live in `self.taps`, an `nn.ModuleDict` that is empty unless a method adds a tap, so a
plain model's state-dict keys are exactly mdistiller's (or torchvision's).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

TAP_POINTS = ("inter", "penult")


def built_on_meta(module: nn.Module) -> bool:
    """True when `module`'s parameters live on the meta device (shape-only builds, used to
    list state-dict layouts). Families skip their random initialisation then: there is
    nothing to fill, and meta-tensor random ops pull in torch's slow decomposition machinery."""
    first = next(module.parameters(), None)
    return first is not None and first.is_meta


def init_like_mdistiller(model: nn.Module, linear: str = "default") -> None:
    """mdistiller's initialisation, shared by its CIFAR families: He-normal convolutions
    (fan_out, for ReLU; zero bias where a conv has one), unit/zero BatchNorm, and the Linear
    layers as the family had them: ``"default"`` (PyTorch's), ``"zero_bias"`` (WRN) or
    ``"normal"`` (N(0, 0.01) weight, zero bias: MobileNetV2, VGG). Skipped on the meta device
    (see ``built_on_meta``)."""
    if built_on_meta(model):
        return
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and linear != "default":
            if linear == "normal":
                nn.init.normal_(module.weight, 0.0, 0.01)
            nn.init.zeros_(module.bias)


class KDModel(nn.Module):
    """Base class: subclasses build their layers, then implement `forward_inter`,
    `forward_penult` and `head`, and set `inter_channels` / `penult_channels`."""

    #: channels of the "inter" map (Di); set by each subclass's constructor
    inter_channels: int
    #: channels of the "penult" map (D); set by each subclass's constructor
    penult_channels: int

    def __init__(self) -> None:
        super().__init__()
        self.taps = nn.ModuleDict()

    # -- what each family provides ---------------------------------------------------------

    def forward_inter(self, x: torch.Tensor) -> torch.Tensor:
        """Input [B, 3, H, W] -> output of the first block of the last stage [B, Di, hi, wi]."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward_inter")

    def forward_penult(self, inter: torch.Tensor) -> torch.Tensor:
        """inter map [B, Di, hi, wi] -> last feature map before pooling [B, D, h, w]."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward_penult")

    def head(self) -> nn.Linear:
        """The classifier (weight [C, D], bias [C])."""
        raise NotImplementedError(f"{type(self).__name__} must implement head")

    def classify_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled features [B, D] -> logits [B, C]. Families whose classifier holds more than
        the linear layer (torchvision's MobileNetV2 has a dropout before it) override this."""
        return self.head()(pooled)

    # -- the shared interface --------------------------------------------------------------

    def feature_channels(self) -> dict[str, int]:
        """{"inter": Di, "penult": D}."""
        return {"inter": self.inter_channels, "penult": self.penult_channels}

    def set_tap(self, point: str, module: nn.Module | None) -> None:
        """Install `module` at `point` ("inter" or "penult"); None removes the tap.

        A tap maps the feature map [B, D, h, w] to a replacement of the same shape, or to a
        pair (replacement, scores); scores then appear in forward_features' feats as
        "<point>_scores". The replacement is what the rest of the network sees.
        """
        if point not in TAP_POINTS:
            raise ValueError(f"tap point must be one of {TAP_POINTS}, got {point!r}")
        if module is None:
            if point in self.taps:
                del self.taps[point]
            return
        self.taps[point] = module

    def _apply_tap(self, point: str, x: torch.Tensor, feats: dict | None) -> torch.Tensor:
        if point not in self.taps:
            return x
        result = self.taps[point](x)
        if isinstance(result, (tuple, list)):
            replacement, scores = result
            if feats is not None:
                feats[f"{point}_scores"] = scores
        else:
            replacement = result
        if replacement.shape != x.shape:
            raise ValueError(
                f"tap at {point!r} must keep the feature map's shape {tuple(x.shape)}, "
                f"returned {tuple(replacement.shape)}"
            )
        return replacement

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 3, H, W] -> logits [B, C]. Taps run (a student keeps its KD layers at
        inference); their scores are dropped and no CAM is computed."""
        inter = self._apply_tap("inter", self.forward_inter(x), None)
        penult = self._apply_tap("penult", self.forward_penult(inter), None)
        pooled = F.adaptive_avg_pool2d(penult, 1).flatten(1)
        return self.classify_pooled(pooled)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x [B, 3, H, W] -> (logits [B, C], feats).

        feats: "inter" [B, Di, hi, wi] and "penult" [B, D, h, w] as the network produced
        them (before their taps); "cam" [B, C, h, w], the classifier weight applied as a 1x1
        convolution without bias to the penult map after its tap, so that in eval mode
        GAP(cam) + bias == logits; and "<point>_scores" for each tap returning a pair.
        """
        feats: dict[str, torch.Tensor] = {}
        inter = self.forward_inter(x)
        feats["inter"] = inter
        inter = self._apply_tap("inter", inter, feats)
        penult = self.forward_penult(inter)
        feats["penult"] = penult
        penult = self._apply_tap("penult", penult, feats)
        pooled = F.adaptive_avg_pool2d(penult, 1).flatten(1)
        logits = self.classify_pooled(pooled)
        weight = self.head().weight
        feats["cam"] = F.conv2d(penult, weight.reshape(weight.shape[0], weight.shape[1], 1, 1))
        return logits, feats
