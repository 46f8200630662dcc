"""letKD: the knowledge-distillation layer that lets the student decide (BMVC 2023).

Pieces (docs/METHODS.md, "letKD"):

- ``CosConv``: 1x1 convolution with l2-normalised kernels on l2-normalised input vectors,
  times a learnable scalar scale; no bias. Kernels start N(0, 2 / in_channels), as in the
  reference's ``Conv2dCos``.
- ``KDLayer(channels, num_clusters, alpha)``: s = CosConv(x) (M channels, scale init 3.0);
  v = CosConv'(ReLU(BN(s))) back to D channels (scale init 1.0); x_hat = x + alpha * v;
  ``forward(x) -> (x_hat, s)``. Installed as a tap on the student (``KDModel.set_tap``).
- ``LetKD``: the method (letkd1, letkd2): CE + the location KL of each KD layer
  (``kdpipe.methods.letkd.functional``) against the kinds' targets
  (``kdpipe.methods.letkd.kinds``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdpipe.errors import KdpipeError
from kdpipe.methods.base import Method, loss_parts, reference_recipe
from kdpipe.methods.letkd.functional import location_kl, location_kl_topk
from kdpipe.methods.registry import MethodOptions, option, register

__all__ = ["CosConv", "KDLayer", "LetKD", "LetKD1Options", "LetKD2Options", "PENULT_TARGETS"]


# --------------------------------------------------------------------------- layers
class CosConv(nn.Module):
    """Cosine 1x1 convolution: ``scale * conv1x1(x / ||x||, W / ||W_row||)``, no bias.

    Input [B, in_channels, h, w] -> [B, out_channels, h, w]. Vectors are normalised over the
    channel dimension at each location (``F.normalize``, eps 1e-12); each kernel over its
    in_channels. ``scale`` is one learnable scalar starting at ``scale_init``.
    """

    def __init__(self, in_channels: int, out_channels: int, scale_init: float = 1.0, learn_scale: bool = True):
        super().__init__()
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.weight = nn.Parameter(
            torch.randn(self.out_channels, self.in_channels, 1, 1) * math.sqrt(2.0 / self.in_channels)
        )
        self.scale = nn.Parameter(torch.full((1,), float(scale_init)), requires_grad=learn_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x, p=2, dim=1, eps=1e-12)
        w = F.normalize(self.weight, p=2, dim=1, eps=1e-12) * self.scale.view(1, 1, 1, 1)
        return F.conv2d(x, w)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}"


class KDLayer(nn.Module):
    """The letKD KD layer on a D x h x w feature map with M teacher clusters.

    ``forward(x) -> (x_hat, s)``: s [B, M, h, w] the student's cluster scores (the KD loss
    takes softmax over M of them); x_hat [B, D, h, w] = x + alpha * v replaces x in the rest of
    the network. ``alpha`` is a fixed float (the reference's ``value_ratio``).
    """

    def __init__(
        self,
        channels: int,
        num_clusters: int,
        alpha: float = 1.0,
        score_scale_init: float = 3.0,
        value_scale_init: float = 1.0,
    ):
        super().__init__()
        self.channels = int(channels)
        self.num_clusters = int(num_clusters)
        self.alpha = float(alpha)
        self.score = CosConv(self.channels, self.num_clusters, scale_init=score_scale_init)
        self.bn = nn.BatchNorm2d(self.num_clusters)
        self.value = CosConv(self.num_clusters, self.channels, scale_init=value_scale_init)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.score(x)
        v = self.value(F.relu(self.bn(s)))
        return x + self.alpha * v, s

    def extra_repr(self) -> str:
        return f"channels={self.channels}, num_clusters={self.num_clusters}, alpha={self.alpha}"


# --------------------------------------------------------------------------- method
PENULT_TARGETS = ("topk", "full")
_SUPPLEMENT = "letKD supplement, Hyperparameters (1 except RN50 -> MobileNetV2)"


@dataclass
class LetKD1Options(MethodOptions):
    """letKD-1's options (the KD layer on the penultimate map)."""

    alpha_penult: float | None = option(
        1.0, source=_SUPPLEMENT, help="alpha of the penultimate KD layer (default: the pair's)"
    )
    penult_target: str | None = option(
        "topk",
        source="kdpipe: the store's top-k renormalised; full = the reference's whole softmax (online only)",
        help="penultimate target: stored top-k or the full softmax over all K",
        choices=PENULT_TARGETS,
    )


@dataclass
class LetKD2Options(LetKD1Options):
    """letKD-2's options: letKD-1's and the intermediate KD layer's alpha."""

    alpha_inter: float | None = option(
        1.0, source=_SUPPLEMENT, help="alpha of the intermediate KD layer (default: the pair's)"
    )


_LETKD_PAPER = "Gorgun et al., BMVC 2023; adagorgun/letKD-framework"


@register(
    "letkd2",
    options=LetKD2Options,
    fixed={"level": 2},
    paper=_LETKD_PAPER,
    summary="letKD-2: letKD-1 + a KD layer on the intermediate map vs label-constrained sub-class scores",
)
@register(
    "letkd1",
    options=LetKD1Options,
    fixed={"level": 1},
    paper=_LETKD_PAPER,
    summary="letKD-1: CE + location KL of a cosine KD layer on the penultimate map vs K-means top-k targets",
)
class LetKD(Method):
    """letKD-1 (penultimate KD layer) and letKD-2 (plus the intermediate KD layer).

    Total = CE + KD_penult + KD_inter (coefficients 1; KD_inter only for letkd2).
    Options: ``alpha_penult``, ``alpha_inter`` (letkd2): the KD layers' alphas. Left None they
    take the reference's value for the pair given to ``bind``: 1.0, except ResNet50 ->
    MobileNetV2 where the reference's CIFAR-100 configs use alpha_penult 0.1 and alpha_inter
    0.2 (``value_ratio`` of its penultimate / intermediate value layers); 1.0 when unbound.
    ``penult_target``: ``"topk"`` (the store's top-k, renormalised) or ``"full"`` (the whole
    softmax over the K centres, as the reference computes it each step: online only).
    """

    #: letKD-framework distillation/dataloaders/basic_dataloaders.py SimpleDataloader:
    #: DataLoader(..., shuffle=train, drop_last=train)
    reference_drop_last = True

    def __init__(
        self,
        level: int = 1,
        alpha_penult: float | None = None,
        alpha_inter: float | None = None,
        penult_target: str | None = None,
    ):
        defaults = LetKD2Options.defaults()
        penult_target = defaults["penult_target"] if penult_target is None else penult_target
        if level not in (1, 2):
            raise KdpipeError(f"letKD level must be 1 or 2, got {level!r}.")
        if penult_target not in PENULT_TARGETS:
            raise KdpipeError(f"letKD penult_target must be {' or '.join(PENULT_TARGETS)}, got {penult_target!r}.")
        self.level = level
        self.name = f"letkd{level}"
        super().__init__(alpha_penult=None if alpha_penult is None else float(alpha_penult))
        if level == 2:
            self.options["alpha_inter"] = None if alpha_inter is None else float(alpha_inter)
        self.options["penult_target"] = penult_target

    # letKD supplement "Hyperparameters": (alpha_inter, alpha_penult) = (1, 1) except RN50-MNV2:
    # CIFAR-100 penult 0.1 / inter 0.2 (letKD-framework CIFAR100/cross_model/RN50_MNv2/letKD-2.py
    # value_ratio), Tiny-ImageNet penult 0.5 / inter 1.
    _REFERENCE_ALPHAS = {
        ("resnet50", "mobilenetv2", "cifar"): {"alpha_penult": 0.1, "alpha_inter": 0.2},
        ("resnet50", "mobilenetv2", "tinyimagenet"): {"alpha_penult": 0.5, "alpha_inter": 1.0},
    }

    def _reference_alphas(self, teacher_arch: str | None, student_arch: str | None, dataset: str) -> dict[str, float]:
        """The supplement's per-pair alphas; none where either architecture is unknown."""
        from kdpipe.models.registry import canonical_or_same

        if teacher_arch is None or student_arch is None:
            return {}
        pair = (canonical_or_same(teacher_arch).lower(), canonical_or_same(student_arch).lower(), dataset)
        return self._REFERENCE_ALPHAS.get(pair, {})

    def bind(self, teacher_arch: str | None = None, student_arch: str | None = None, dataset: str = "cifar"):
        self.dataset = dataset
        ref = self._reference_alphas(teacher_arch, student_arch, dataset)
        for key in ("alpha_penult", "alpha_inter"):
            if key in self.options and self.options[key] is None:
                self.options[key] = float(ref.get(key, LetKD2Options.defaults()[key]))
        return self

    def _alpha(self, key: str) -> float:
        if self.options.get(key) is None:
            self.options[key] = float(LetKD2Options.defaults()[key])
        return self.options[key]

    def kinds(self) -> list:
        from kdpipe.methods.letkd.kinds import InterSubclass, PenultSoftmax, PenultTopk

        penult = PenultSoftmax() if self.options["penult_target"] == "full" else PenultTopk()
        return [penult, InterSubclass()] if self.level == 2 else [penult]

    def prepare_student(self, student, target_set=None):
        """Install a KDLayer tap on "penult" (M = K_penult) and, for letkd2, on "inter"
        (M = C * K_inter), sized from ``student.feature_channels()`` and the target set."""
        if target_set is None:
            raise KdpipeError(
                f"Method {self.name!r} needs the store's target set (its K-means "
                "sizes) to build the student's KD layers."
            )
        ch = student.feature_channels()
        student.set_tap("penult", KDLayer(ch["penult"], int(target_set.k_penult), self._alpha("alpha_penult")))
        if self.level == 2:
            student.set_tap("inter", KDLayer(ch["inter"], int(target_set.num_subclasses), self._alpha("alpha_inter")))
        return student

    def loss(self, logits, feats, targets, labels):
        ce = F.cross_entropy(logits, labels)
        if "penult_probs" in targets:
            kd_p = location_kl(feats["penult_scores"], targets["penult_probs"])
        else:
            kd_p = location_kl_topk(feats["penult_scores"], targets["penult_topk_idx"], targets["penult_topk_val"])
        total = ce + kd_p
        if self.level == 2:
            kd_i = location_kl(feats["inter_scores"], targets["inter_probs"])
            total = total + kd_i
            return total, loss_parts(ce=ce, kd_penult=kd_p, kd_inter=kd_i, total=total)
        return total, loss_parts(ce=ce, kd_penult=kd_p, total=total)

    def recipe(self, student_arch: str) -> dict:
        recipe = reference_recipe(student_arch, nesterov=True, dataset=self.dataset)
        if self.dataset == "imagenet":
            # letKD supplement: 100 epochs, lr 0.1 divided by 10 at 30/60/90 (Nesterov); batch
            # and weight decay are not stated: torchvision's ResNet recipe (256, 1e-4).
            recipe.update(lr=0.1, batch_size=256, weight_decay=1e-4)
        return recipe
