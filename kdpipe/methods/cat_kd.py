"""Class Attention Transfer (the `cat_kd` method; CAT-KD, CVPR 2023).

A class activation map (CAM) is the classifier applied at every location of the last
feature map as a 1x1 convolution without bias: [B, C, h, w]. The CAT loss pools the
student's and the teacher's CAMs to r x r, optionally l2-normalises each class map over its
r*r cells, and takes the mean squared error over all B*C*r*r elements (``F.mse_loss``'s
default mean). Total = ce_weight * CE + beta * CAT; ce_weight 0 is the paper's "CAT" (no CE).

Options of the reference implementation kept here:

- binarisation of the teacher CAM before pooling (``binarize_teacher_cam``): per class map,
  threshold = mean absolute value over its h*w cells; 1 strictly above, 0 otherwise;
- transfer of the CAMs of only the teacher's top-n or bottom-n predicted classes
  (``select_classes``). This selects exactly n classes per sample (``torch.topk``, ties by
  index order). The reference's thresholding keeps n-1 classes for "top" and n+1 for
  "bottom" (a strict comparison against the n-th sorted logit); we keep n as documented.

Normalisation rule (appendix A.3, and every CIFAR/ImageNet config of the reference):
normalise when teacher and student are of different architecture families, not when they
are of the same family (``should_normalize``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdpipe.errors import KdpipeError
from kdpipe.methods.base import Method, loss_parts, reference_recipe
from kdpipe.methods.registry import MethodOptions, option, register
from kdpipe.targets import Cam, NativeCam

__all__ = [
    "cat_loss",
    "binarize_teacher_cam",
    "select_classes",
    "gather_classes",
    "arch_family",
    "should_normalize",
    "CatKD",
    "CatKDOptions",
]


# --------------------------------------------------------------------------- losses
def _l2_normalize_maps(cam: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Divide each [h, w] class map by its l2 norm over the h*w cells (norm floored at eps)."""
    norm = cam.flatten(2).norm(p=2, dim=2).clamp_min(eps)
    return cam / norm[:, :, None, None]


def cat_loss(student_cam: torch.Tensor, teacher_cam: torch.Tensor, resolution: int, normalize: bool) -> torch.Tensor:
    """The CAT loss of docs/METHODS.md, without beta.

    Args:
        student_cam: [B, C, h, w] student CAMs.
        teacher_cam: [B, C, h', w'] teacher CAMs (any spatial size; already pooled is fine,
            since adaptive pooling of an r x r map to r x r is the identity).
        resolution: r; both maps are adaptive-average-pooled to r x r.
        normalize: l2-normalise each pooled class map over its r*r cells first.

    Returns:
        scalar: mean over the B*C*r*r elements of the squared difference.
    """
    if student_cam.dim() != 4 or teacher_cam.dim() != 4 or student_cam.shape[:2] != teacher_cam.shape[:2]:
        raise ValueError(
            f"cat_loss expects CAMs [B, C, h, w] with the same B and C; got "
            f"{tuple(student_cam.shape)} and {tuple(teacher_cam.shape)}"
        )
    r = int(resolution)
    s = F.adaptive_avg_pool2d(student_cam, (r, r))
    t = F.adaptive_avg_pool2d(teacher_cam.to(s.dtype), (r, r))
    if normalize:
        s = _l2_normalize_maps(s)
        t = _l2_normalize_maps(t)
    return F.mse_loss(s, t)


def binarize_teacher_cam(cam: torch.Tensor) -> torch.Tensor:
    """Binarise each class map of a native-resolution teacher CAM [B, C, h, w].

    Threshold per (sample, class) = mean of |cam| over the h*w cells; cells strictly above it
    become 1, all others 0 (same dtype as the input). Apply before pooling.
    """
    threshold = cam.abs().mean(dim=(2, 3), keepdim=True)
    return (cam > threshold).to(cam.dtype)


def select_classes(teacher_logits: torch.Tensor, n: int, mode: str = "top") -> torch.Tensor:
    """Boolean mask [B, C] of the n classes with the highest ("top") or lowest ("bottom")
    teacher logits of each sample; exactly n True per row (ties: ``torch.topk`` order)."""
    if mode not in ("top", "bottom"):
        raise ValueError(f"select_classes mode must be 'top' or 'bottom', got {mode!r}")
    B, C = teacher_logits.shape
    n = int(n)
    if not 1 <= n <= C:
        raise KdpipeError(f"CAT-KD class selection needs 1 <= n <= {C} classes, got {n}.")
    idx = torch.topk(teacher_logits, n, dim=1, largest=(mode == "top")).indices
    mask = torch.zeros(B, C, dtype=torch.bool, device=teacher_logits.device)
    mask.scatter_(1, idx, True)
    return mask


def gather_classes(cam: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Keep the class maps where ``mask`` [B, C] is True: [B, C, h, w] -> [B, n, h, w].

    Every row of the mask must hold the same number n of True entries; classes keep their
    index order.
    """
    B, C = mask.shape
    counts = mask.sum(dim=1)
    n = int(counts[0]) if B else 0
    if B and not bool((counts == n).all()):
        raise ValueError("gather_classes needs the same number of selected classes per row")
    # Stable sort puts the selected indices first, in increasing class order.
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :n]
    index = order[:, :, None, None].expand(B, n, cam.shape[2], cam.shape[3])
    return torch.gather(cam, 1, index)


# --------------------------------------------------------------- architecture rule
# Family of an architecture name. CIFAR ResNets (resnet8 ... resnet110, resnet8x4,
# resnet32x4), the bottleneck ResNets (ResNet18/34/50, CIFAR and ImageNet) are one family
# "resnet"; wide ResNets (wrn_16_2, wrn_40_2) are "wrn"; vgg8/vgg13(_bn) "vgg"; ShuffleV1/V2
# "shufflenet"; MobileNetV2 / mobile_half "mobilenet". A leading "imagenet_" (kdpipe's
# torchvision wrappers) is ignored. Any other name: its leading letters, lower-cased.
_FAMILY_PATTERNS = (
    (re.compile(r"^wrn|^wide_?resnet", re.I), "wrn"),
    (re.compile(r"^resnet|^resnext", re.I), "resnet"),
    (re.compile(r"^vgg", re.I), "vgg"),
    (re.compile(r"^shuffle", re.I), "shufflenet"),
    (re.compile(r"^mobile", re.I), "mobilenet"),
)
# Prefixes that name a model's source, not its family (kdpipe's torchvision wrappers).
_SOURCE_PREFIX = re.compile(r"^(imagenet|torchvision|tv)[_-]", re.I)


def arch_family(arch: str) -> str:
    """Architecture family of a model name (see the table above); used by the CAT-KD rule."""
    name = _SOURCE_PREFIX.sub("", str(arch).strip())
    for pattern, family in _FAMILY_PATTERNS:
        if pattern.search(name):
            return family
    m = re.match(r"[A-Za-z]+", name)
    return (m.group(0) if m else name).lower()


def should_normalize(teacher_arch: str, student_arch: str) -> bool:
    """CAT-KD's rule: normalise the CAMs iff teacher and student families differ.

    Checked against the reference configs: resnet110->resnet32, resnet56->resnet20,
    resnet32x4->resnet8x4, wrn_40_2->wrn_16_2 / wrn_40_1, vgg13->vgg8, ResNet34->ResNet18
    (ImageNet): no normalisation; resnet32x4->ShuffleV1 / ShuffleV2, wrn_40_2->ShuffleV1,
    ResNet50->MobileNetV2, vgg13->MobileNetV2: normalisation.
    """
    return arch_family(teacher_arch) != arch_family(student_arch)


# (teacher, student) -> (beta, CAM resolution) of the reference's CIFAR-100 configs
# (GzyAftermath/CAT-KD configs/cifar100/CAT_KD/<file>); normalisation follows the rule above,
# which every one of these files obeys (IF_NORMALIZE).
_CIFAR_PAIRS = {
    ("resnet110", "resnet32"): (1.8, 2),  # res110_res32.yaml
    ("resnet56", "resnet20"): (0.7, 2),  # res56_res20.yaml
    ("resnet32x4", "resnet8x4"): (15.0, 2),  # res32x4_res8x4.yaml
    ("resnet32x4", "ShuffleV1"): (600.0, 4),  # res32x4_shuv1.yaml
    ("resnet32x4", "ShuffleV2"): (600.0, 4),  # res32x4_shuv2.yaml
    ("ResNet50", "MobileNetV2"): (40.0, 2),  # res50_mv2.yaml
    ("vgg13", "MobileNetV2"): (15.0, 2),  # vgg13_mv2.yaml
    ("vgg13", "vgg8"): (4.5, 2),  # vgg13_vgg8.yaml
    ("wrn_40_2", "ShuffleV1"): (80.0, 4),  # wrn40_2_shuv1.yaml
    ("wrn_40_2", "wrn_16_2"): (12.0, 2),  # wrn_40_2_wrn_16_2.yaml
    ("wrn_40_2", "wrn_40_1"): (1.5, 2),  # wrn_40_2_wrn_40_1.yaml
}
# ImageNet (configs/imagenet/CAT-KD/r34_r18.yaml, r50_mv2.yaml) in kdpipe's names: r50_mv2's
# "MobileNetV2" student is a MobileNet (v1), imagenet_mobilenet_v1.
_IMAGENET_PAIRS = {
    ("imagenet_resnet34", "imagenet_resnet18"): (0.5, 4),
    ("imagenet_resnet50", "imagenet_mobilenet_v1"): (10.0, 2),
}
_CFG = "GzyAftermath/CAT-KD mdistiller/engine/cfg.py"


@dataclass
class CatKDOptions(MethodOptions):
    """CAT-KD's options. beta, resolution and normalize left unset follow the reference config
    of the bound pair (``reference_settings``); the defaults below apply where none exists."""

    beta: float | None = option(
        15.0,
        source="CAT-KD configs/cifar100/CAT_KD/res32x4_res8x4.yaml (used where the pair has no config)",
        help="CAT weight (the reference pair's where one exists)",
        yaml="CAT_KD.LOSS.CAT_loss_weight",
        yaml_default=400.0,  # cfg.py's CAT_KD.LOSS.CAT_loss_weight
    )
    resolution: int | None = option(
        2,
        source=_CFG + " CAT_KD.LOSS.CAM_RESOLUTION (the pair's config where one exists)",
        help="CAM pooling size r",
        yaml="CAT_KD.LOSS.CAM_RESOLUTION",
    )
    normalize: bool | None = option(
        None,
        source="CAT-KD appendix A.3: normalise across architecture families (every config obeys it)",
        help="l2-normalise pooled CAMs",
        yaml="CAT_KD.IF_NORMALIZE",
        yaml_default=True,
        unset="the architecture rule",
    )
    ce_weight: float | None = option(
        1.0, source=_CFG + " CAT_KD.LOSS.CE_WEIGHT", help="weight of CE (0 = CAT only)", yaml="CAT_KD.LOSS.CE_WEIGHT"
    )
    binarize: bool | None = option(
        False,
        source=_CFG + " CAT_KD.IF_BINARIZE",
        help="binarise the teacher CAM before pooling",
        yaml="CAT_KD.IF_BINARIZE",
    )
    top_n: int | None = option(
        None,
        source=_CFG + " CAT_KD.IF_OnlyTransferPartialCAMs, Strategy 0",
        help="transfer only the teacher's top-n classes' CAMs",
        unset="every class",
    )
    bottom_n: int | None = option(
        None,
        source=_CFG + " CAT_KD.IF_OnlyTransferPartialCAMs, Strategy 1",
        help="transfer only the bottom-n classes' CAMs",
        unset="every class",
    )


#: beta when no reference config exists for the pair (RN32x4 -> RN8x4's; tune it so the CAT
#: loss sits near 1..50 after the first epoch, as the authors advise).
DEFAULT_BETA = float(CatKDOptions.defaults()["beta"])
#: CAT without CE (the appendix's CAT experiments, configs/cifar100/CAT/**): CAMs normalised,
#: beta 50 (CAT/res32x4_res32x4.yaml, CAT_Dataset_Reduction) or 300 with binarisation or a
#: class selection (CAT_Binarization, CAT_Only_Transfer_Certain_Classes).
CAT_ONLY_BETA = 50.0
CAT_ONLY_BETA_MASKED = 300.0


def reference_settings(
    teacher_arch: str, student_arch: str, dataset: str = "cifar", cat_only: bool = False, masked: bool = False
) -> dict:
    """beta, resolution and normalize of the reference's config for this setting: the pair's
    CAT-KD config, or the CAT (no CE) rules; beta None where the reference has no config."""
    from kdpipe.models.registry import canonical_or_same

    pair = (canonical_or_same(teacher_arch), canonical_or_same(student_arch))
    if cat_only:
        return {"beta": CAT_ONLY_BETA_MASKED if masked else CAT_ONLY_BETA, "resolution": 2, "normalize": True}
    table = _IMAGENET_PAIRS if dataset == "imagenet" else _CIFAR_PAIRS
    beta, resolution = table.get(pair, (None, 2))
    return {"beta": beta, "resolution": resolution, "normalize": should_normalize(*pair)}


# --------------------------------------------------------------------------- method
@register(
    "cat_kd",
    options=CatKDOptions,
    summary="class attention transfer: ce_weight * CE + beta * MSE of pooled (normalised) CAMs",
    paper="Guo et al., CVPR 2023; GzyAftermath/CAT-KD mdistiller/distillers/CAT_KD.py",
    yaml_names=("CAT_KD", "CAT-KD"),
    yaml_extra={
        "CAT_KD.onlyCAT": False,
        "CAT_KD.IF_OnlyTransferPartialCAMs": False,
        "CAT_KD.CAMs_Nums": 100,
        "CAT_KD.Strategy": 0,
    },
    aliases=("catkd",),
)
class CatKD(Method):
    """CAT-KD: total = ce_weight * CE + beta * cat_loss.

    Options:
        beta: CAT weight. None: the reference config's beta for the bound pair (``bind``),
            CAT-only's 50 / 300 with ``ce_weight`` 0, else ``DEFAULT_BETA`` (15).
        resolution: r. None: the pair's reference resolution (4 for the ShuffleNet pairs and
            ResNet34 -> ResNet18 on ImageNet), else 2.
        normalize: True / False, or None: the architecture rule (``should_normalize``) for
            CAT-KD, always for CAT only (``ce_weight`` 0), as the reference configs do.
        ce_weight: 1.0; 0 means "CAT only" (CE not computed).
        binarize: binarise the teacher CAM before pooling (needs the native ``cam``).
        top_n / bottom_n: transfer only the CAMs of the teacher's n top / bottom classes
            ranked by the bias-free teacher logits (the CAM's average, as the reference's
            converted teacher has no bias); at most one of them.
    """

    name = "cat_kd"
    recorded_options = ("teacher_arch", "student_arch")
    default_head = "cam"  # CAT-KD's student classifier: a bias-free 1x1 conv (CAT_KD.py)

    @classmethod
    def options_from_reference(cls, options: dict, values: dict) -> dict:
        """The reference file's switches that are not options: onlyCAT (CE weight 0) and the
        partial-CAM transfer. The reference keeps the classes strictly above the n-th largest
        logit (n - 1 classes) for Strategy 0, and the complement of those above the
        (100 - n)-th largest (n + 1 classes, its index 99 - n) for Strategy 1 (CAT_KD.py
        forward_train)."""
        options = dict(options)
        if values["CAT_KD.onlyCAT"]:
            options["ce_weight"] = 0.0
        if values["CAT_KD.IF_OnlyTransferPartialCAMs"]:
            n, top = int(values["CAT_KD.CAMs_Nums"]), int(values["CAT_KD.Strategy"]) == 0
            options["top_n" if top else "bottom_n"] = n - 1 if top else n + 1
        return options

    def __init__(
        self,
        beta: float | None = None,
        resolution: int | None = None,
        normalize: bool | None = None,
        ce_weight: float | None = None,
        binarize: bool | None = None,
        top_n: int | None = None,
        bottom_n: int | None = None,
        teacher_arch: str | None = None,
        student_arch: str | None = None,
    ):
        super().__init__()
        if beta is not None and not float(beta) >= 0:
            self._bad_option("beta", beta, "a non-negative number")
        if resolution is not None and (int(resolution) < 1 or int(resolution) != float(resolution)):
            self._bad_option("resolution", resolution, "a positive integer")
        defaults = CatKDOptions.defaults()
        ce_weight = defaults["ce_weight"] if ce_weight is None else ce_weight
        binarize = defaults["binarize"] if binarize is None else binarize
        if float(ce_weight) < 0:
            self._bad_option("ce_weight", ce_weight, "a non-negative number")
        if top_n is not None and bottom_n is not None:
            raise KdpipeError("Method 'cat_kd': give at most one of top_n and bottom_n.")
        for opt, v in (("top_n", top_n), ("bottom_n", bottom_n)):
            if v is not None and (int(v) != float(v) or int(v) < 1):
                self._bad_option(opt, v, "a positive integer")
        self.options = {
            "beta": None if beta is None else float(beta),
            "resolution": None if resolution is None else int(resolution),
            "normalize": None if normalize is None else bool(normalize),
            "ce_weight": float(ce_weight),
            "binarize": bool(binarize),
            "top_n": None if top_n is None else int(top_n),
            "bottom_n": None if bottom_n is None else int(bottom_n),
            "teacher_arch": teacher_arch,
            "student_arch": student_arch,
        }
        if teacher_arch is not None and student_arch is not None:
            self.bind(teacher_arch, student_arch)

    # --------------------------------------------------------------- resolution
    def bind(self, teacher_arch: str | None = None, student_arch: str | None = None, dataset: str = "cifar"):
        """Resolve the options left None from the reference's config for the pair (or the
        CAT-only rules): normalize, beta, resolution."""
        self.dataset = dataset
        o = self.options
        if teacher_arch is not None:
            o["teacher_arch"] = str(teacher_arch)
        if student_arch is not None:
            o["student_arch"] = str(student_arch)
        cat_only = o["ce_weight"] == 0
        if o["teacher_arch"] is not None and o["student_arch"] is not None:
            ref = reference_settings(
                o["teacher_arch"], o["student_arch"], dataset, cat_only, masked=bool(o["binarize"] or self.selection)
            )
            for key in ("normalize", "resolution"):
                if o[key] is None:
                    o[key] = ref[key]
            if o["beta"] is None:
                o["beta"] = ref["beta"] if ref["beta"] is not None else DEFAULT_BETA
        elif cat_only and o["normalize"] is None:
            o["normalize"] = True
        return self

    @property
    def resolution(self) -> int:
        """r: the option, or 2 until a pair is bound."""
        return self.options["resolution"] if self.options["resolution"] is not None else 2

    @property
    def selection(self) -> tuple[str, int] | None:
        o = self.options
        if o["top_n"] is not None:
            return ("top", o["top_n"])
        if o["bottom_n"] is not None:
            return ("bottom", o["bottom_n"])
        return None

    def kinds(self) -> list:
        """The CAM pooled to r (native when binarising: the threshold is over the native
        cells). The class selection needs no logits: the reference's converted teacher has no
        classifier bias, so its logits are the CAM's average (CAT-KD tools/train.py), which the
        pooled CAM gives exactly when r divides the native grid."""
        return [NativeCam() if self.options["binarize"] else Cam(self.resolution)]

    # --------------------------------------------------------------------- loss
    def loss(self, logits, feats, targets, labels):
        o = self.options
        normalize = o["normalize"]
        if normalize is None:
            raise KdpipeError(
                "Method 'cat_kd' needs normalize=True/False or the teacher and student "
                "architectures (Method.bind) to apply the normalisation rule."
            )
        beta = o["beta"] if o["beta"] is not None else DEFAULT_BETA
        student_cam = feats["cam"]
        teacher_cam = targets["cam"].to(student_cam.dtype)
        teacher_scores = teacher_cam.mean(dim=(2, 3))  # bias-free teacher logits, before binarising
        if o["binarize"]:
            teacher_cam = binarize_teacher_cam(teacher_cam)
        sel = self.selection
        if sel is not None:
            mask = select_classes(teacher_scores, sel[1], sel[0])
            teacher_cam = gather_classes(teacher_cam, mask)
            student_cam = gather_classes(student_cam, mask)
        cat = cat_loss(student_cam, teacher_cam, self.resolution, normalize)
        total = beta * cat
        if o["ce_weight"] > 0:
            ce = F.cross_entropy(logits, labels)
            total = total + o["ce_weight"] * ce
            return total, loss_parts(ce=ce, cat=cat, total=total)
        return total, loss_parts(cat=cat, total=total)

    def recipe(self, student_arch: str) -> dict:
        return reference_recipe(student_arch, nesterov=False, dataset=self.dataset)
