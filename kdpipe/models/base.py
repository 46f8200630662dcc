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
      -> classifier                                 -> logits [B, C]

The classifier is one of two heads (``model.head_kind``):

- ``"linear"`` (the default): global average pooling, then the family's ``nn.Linear`` with
  bias (``linear_head()``), initialised as mdistiller initialises it;
- ``"cam"``: the CAT-KD reference student's head: a bias-free 1x1 convolution
  ``conv_test`` (the reference's attribute name, so its student checkpoints' keys match) on
  the penult map gives the CAM [B, C, h, w], and logits = GAP(CAM). It replaces the linear
  layer (which leaves the state dict), initialised as the reference initialises its
  ``conv_test`` for that family (``cam_head_init``; see ``use_cam_head``).

Taps live in `self.taps`, an `nn.ModuleDict` that is empty unless a method adds a tap, so a
plain model's state-dict keys are exactly mdistiller's (or torchvision's).

Stage outputs (AT, FitNet): ``stage_points()`` lists, per family, the modules whose outputs
are mdistiller's ``feats["feats"][1:]`` (every stage output but the stem's), with whether a
ReLU follows outside the module (VGG). ``forward_features(x, stages=True)`` (or a model whose
``collect_stages`` is True) adds them as ``feats["stages"]``, a list, read by forward hooks
so the families' forwards stay as they are. Where a family lists them (``preact_points()``),
the same call adds ``feats["preact_stages"]``: mdistiller's ``feats["preact_feats"][1:]``, the
stage outputs before their last ReLU (OFD, ReviewKD's teacher).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdpipe.errors import KdpipeError

TAP_POINTS = ("inter", "penult")
HEAD_KINDS = ("linear", "cam")

#: CAM-head initialisations of the CAT-KD reference's ``*_test`` students:
#: He-normal for ReLU, fan_out: N(0, 2 / C) for a [C, D, 1, 1] weight (the families whose
#: init loop runs after ``conv_test`` exists: kaiming_normal_ fan_out or its hand-written
#: twin normal_(0, sqrt(2 / (k * k * out_channels))));
CAM_INIT_HE_FAN_OUT = "he_normal_fan_out"
#: PyTorch's own Conv2d initialisation, U(-1/sqrt(D), 1/sqrt(D)) (families that create
#: ``conv_test`` after their init loop, or have none).
CAM_INIT_TORCH_DEFAULT = "torch_default"


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


def module_output(module, module_input, output, captured) -> torch.Tensor:
    """A ``PreactPoint.combine``: the module's output is the pre-ReLU value (the ReLU that
    follows, if any, does not work in place)."""
    return output


def module_output_copy(module, module_input, output, captured) -> torch.Tensor:
    """A ``PreactPoint.combine``: a copy of the module's output, for a module followed by a
    ReLU that works in place (it would overwrite the value read)."""
    return output.clone()


@dataclass(frozen=True)
class PreactPoint:
    """Where a stage's pre-ReLU output is read: ``combine(module, module_input, module_output,
    captured)`` computes it when ``module`` runs, ``captured`` holding the outputs of its
    submodules named in ``capture`` (those it has) in that run. ``bn``: the BatchNorm whose
    affine parameters describe that output's distribution (mdistiller's
    ``get_bn_before_relu``, OFD's margin); None where the reference has none (ShuffleNets)."""

    module: nn.Module
    combine: Callable[..., torch.Tensor]
    capture: tuple[str, ...] = ()
    bn: nn.Module | None = None


class KDModel(nn.Module):
    """Base class: subclasses build their layers, then implement `forward_inter`,
    `forward_penult` and `head`, and set `inter_channels` / `penult_channels`."""

    #: channels of the "inter" map (Di); set by each subclass's constructor
    inter_channels: int
    #: channels of the "penult" map (D); set by each subclass's constructor
    penult_channels: int
    #: how the CAT-KD reference initialises this family's CAM classifier (CAM_INIT_*);
    #: None where the family has no reference CAM head
    cam_head_init: str | None = None
    #: "linear" or "cam" (see the module docstring); ``use_cam_head`` switches it
    head_kind: str = "linear"
    #: forward_features adds feats["stages"] by default (methods set it on their student)
    collect_stages: bool = False

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

    def linear_head(self) -> nn.Linear:
        """The family's linear classifier (weight [C, D], bias [C])."""
        raise NotImplementedError(f"{type(self).__name__} must implement linear_head")

    def classify_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled features [B, D] -> logits [B, C] by the linear head. Families whose
        classifier holds more than the linear layer (torchvision's MobileNetV2 has a dropout
        before it) override this."""
        return self.linear_head()(pooled)

    def stage_points(self) -> list[tuple[nn.Module, bool]]:
        """(module, relu_after) per stage: mdistiller's ``feats["feats"][1:]`` are these
        modules' outputs (after a ReLU where relu_after). Families override it."""
        raise KdpipeError(f"{type(self).__name__} does not list its stage outputs (AT, FitNet need them).")

    def _stage_hooks(self, found: dict) -> list:
        """Forward hooks that put stage i's output in ``found[i]`` (the last call wins)."""

        def hook_for(index: int, relu: bool):
            def hook(module, inputs, output):
                found[index] = F.relu(output) if relu else output

            return hook

        return [module.register_forward_hook(hook_for(i, relu)) for i, (module, relu) in enumerate(self.stage_points())]

    def stem_point(self) -> tuple[nn.Module, bool] | None:
        """(module, relu_after) whose output is mdistiller's ``feats["feats"][0]`` (the stem's
        output, FSP's first map); None where the family does not say."""
        return None

    def _stem_hooks(self, found: dict) -> list:
        point = self.stem_point()
        if point is None:
            return []
        module, relu = point

        def hook(module, inputs, output):
            found[0] = F.relu(output) if relu else output.clone()

        return [module.register_forward_hook(hook)]

    def preact_points(self) -> list[PreactPoint] | None:
        """Per stage, where its pre-ReLU output is read (mdistiller's ``preact_feats[1:]``);
        None for families whose reference lists none (MobileNetV2, torchvision models)."""
        return None

    def _preact_hooks(self, found: dict) -> list:
        """Forward hooks that put stage i's pre-ReLU output in ``found[i]``."""
        handles = []
        for index, point in enumerate(self.preact_points() or []):
            captured: dict = {}

            def keep(name: str, store: dict):
                def hook(module, inputs, output):
                    store[name] = output

                return hook

            for name in point.capture:
                sub = getattr(point.module, name, None)
                if isinstance(sub, nn.Module):
                    handles.append(sub.register_forward_hook(keep(name, captured)))

            def run(p: PreactPoint, i: int, store: dict):
                def hook(module, inputs, output):
                    found[i] = p.combine(module, inputs[0], output, store)

                return hook

            handles.append(point.module.register_forward_hook(run(point, index, captured)))
        return handles

    @property
    def reused_head(self) -> nn.Module | None:
        """SimKD's head (projector + the teacher's classifier), where a method installed one as
        ``reused_head``: it then classifies the penult map instead of the model's own head, and
        forward_features gives its projected map as feats["projected"] (no "cam")."""
        return self._modules.get("simkd_head")

    def set_reused_head(self, module: nn.Module | None) -> None:
        """Install (or with None remove) the module ``penult -> (projected, logits)``."""
        if module is None:
            self._modules.pop("simkd_head", None)
        else:
            self.simkd_head = module

    # -- the classifier head ---------------------------------------------------------------

    def head(self) -> nn.Linear | nn.Conv2d:
        """The classifier in use: the ``nn.Linear`` (head_kind "linear": weight [C, D], bias
        [C]) or the bias-free 1x1 ``nn.Conv2d`` (head_kind "cam": weight [C, D, 1, 1])."""
        return self.conv_test if self.head_kind == "cam" else self.linear_head()

    def use_cam_head(self) -> None:
        """Replace the linear head by the CAT-KD reference student's CAM head: a bias-free 1x1
        convolution D -> C named ``conv_test``, initialised by the family's
        ``cam_head_init`` (skipped on the meta device). The linear layer (with whatever
        module holds it, e.g. a Sequential with a dropout) leaves the model."""
        if self.head_kind == "cam":
            return
        if self.cam_head_init is None:
            raise KdpipeError(f"{type(self).__name__} has no reference CAM head (head='cam').")
        linear = self.linear_head()
        conv = nn.Conv2d(
            linear.in_features,
            linear.out_features,
            kernel_size=1,
            bias=False,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        if not built_on_meta(conv):
            init_cam_head(conv, self.cam_head_init)
        delattr(self, self._child_holding(linear))
        self.conv_test = conv
        self.head_kind = "cam"

    def _child_holding(self, module: nn.Module) -> str:
        """Name of the direct child that is, or contains, `module`."""
        for name, child in self.named_children():
            if any(m is module for m in child.modules()):
                return name
        raise ValueError(f"{type(self).__name__}: the linear head is not one of its modules")

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
        inference); their scores are dropped and, with the linear head, no CAM is computed."""
        inter = self._apply_tap("inter", self.forward_inter(x), None)
        penult = self._apply_tap("penult", self.forward_penult(inter), None)
        if self.reused_head is not None:
            return self.reused_head(penult)[1]
        if self.head_kind == "cam":
            return _global_pool(self.conv_test(penult))
        return self.classify_pooled(_global_pool(penult))

    def forward_features(self, x: torch.Tensor, stages: bool | None = None) -> tuple[torch.Tensor, dict]:
        """x [B, 3, H, W] -> (logits [B, C], feats).

        feats: "inter" [B, Di, hi, wi] and "penult" [B, D, h, w] as the network produced
        them (before their taps); with a reused head (SimKD), "projected" and no "cam"; else
        "cam" [B, C, h, w] on the penult map after its tap: with
        the linear head, its weight applied as a 1x1 convolution without bias, so that in
        eval mode GAP(cam) + bias == logits; with the CAM head, the head's own output, and
        logits == GAP(cam); "<point>_scores" for each tap returning a pair; with ``stages``
        (default: ``collect_stages``) "stages", the list of stage outputs (``stage_points``),
        "preact_stages" where the family lists them (``preact_points``) and "stem", the stem's
        output, where it names it (``stem_point``).
        """
        if stages if stages is not None else self.collect_stages:
            found: dict = {}
            preact: dict = {}
            stem: dict = {}
            hooks = self._stage_hooks(found) + self._preact_hooks(preact) + self._stem_hooks(stem)
            try:
                logits, feats = self.forward_features(x, stages=False)
            finally:
                for h in hooks:
                    h.remove()
            feats["stages"] = [found[i] for i in sorted(found)]
            if preact:
                feats["preact_stages"] = [preact[i] for i in sorted(preact)]
            if stem:
                feats["stem"] = stem[0]
            return logits, feats
        feats = {}
        inter = self.forward_inter(x)
        feats["inter"] = inter
        inter = self._apply_tap("inter", inter, feats)
        penult = self.forward_penult(inter)
        feats["penult"] = penult
        penult = self._apply_tap("penult", penult, feats)
        if self.reused_head is not None:
            feats["projected"], logits = self.reused_head(penult)
            return logits, feats
        if self.head_kind == "cam":
            feats["cam"] = self.conv_test(penult)
            return _global_pool(feats["cam"]), feats
        logits = self.classify_pooled(_global_pool(penult))
        weight = self.linear_head().weight
        feats["cam"] = F.conv2d(penult, weight.reshape(weight.shape[0], weight.shape[1], 1, 1))
        return logits, feats


def _global_pool(maps: torch.Tensor) -> torch.Tensor:
    """[B, K, h, w] -> [B, K]: the mean over the h*w cells. The references pool with fixed
    kernels (AvgPool2d(8) and the like) sized to their standard inputs, where they equal this."""
    return F.adaptive_avg_pool2d(maps, 1).flatten(1)


def init_cam_head(conv: nn.Conv2d, rule: str) -> None:
    """Initialise a CAM head's weight [C, D, 1, 1] by `rule` (CAM_INIT_*)."""
    if rule == CAM_INIT_HE_FAN_OUT:
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    elif rule == CAM_INIT_TORCH_DEFAULT:
        conv.reset_parameters()
    else:
        raise ValueError(f"unknown CAM head initialisation {rule!r}")
