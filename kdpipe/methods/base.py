"""The `Method` interface every distillation method implements (mdistiller-style).

A method is a small object the training loop and the target sources talk to:

- ``name``: its registry name (``ce``, ``kd``, ``cat_kd``, ``letkd1``, ``letkd2``);
- ``options``: the resolved options, a JSON-able dict (written into the run's config.json);
- ``kinds()``: the target kinds it needs (``kdpipe.targets``), e.g. ``[Cam(r=2)]``,
  ``[Logits()]``, ``[PenultTopk(), InterSubclass()]``: extraction and cluster write what
  they declare, and the cached and online sources deliver their targets;
- ``bind(teacher_arch, student_arch)``: resolves options that depend on the pair;
- ``prepare_student(student, target_set)``: installs KD-layer taps on the student, if any
  (``target_set``: the store's ``kdpipe.artifacts.target_set.TargetSet`` or None);
- ``loss(logits, feats, targets, labels) -> (total, parts)``: ``total`` a scalar tensor,
  ``parts`` a dict of detached scalar tensors (for metrics; no device sync per step);
- ``recipe(student_arch)``: the reference training settings (docs/METHODS.md);
- ``begin_epoch(epoch)``: the loop's 0-based epoch before its steps (DKD's warm-up);
- ``attach_teacher(info)``: what the store (or the online teacher) says about the teacher's
  targets before the student is built: array row shapes, whole arrays (SimKD's classifier),
  the image size (``TeacherInfo``).

The target dict holds the keys of the method's kinds (shapes in ``kdpipe.targets``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from kdpipe.errors import KdpipeError

__all__ = [
    "Method",
    "TeacherInfo",
    "DEFAULT_TARGET_SET",
    "reference_recipe",
    "is_light_student",
    "loss_parts",
    "dataset_family",
    "RECIPE_DATASETS",
]

#: Name of the store's target set (``targets/<name>/``) used when none is given.
DEFAULT_TARGET_SET = "default"

_LIGHT = re.compile(r"shuffle|mobile", re.IGNORECASE)


def is_light_student(student_arch: str) -> bool:
    """True for ShuffleNet / MobileNet students, which the references train with lr 0.01."""
    return bool(_LIGHT.search(str(student_arch)))


#: The data-set families whose reference recipes differ.
RECIPE_DATASETS = ("cifar", "imagenet", "tinyimagenet")


def dataset_family(data_spec: str | None) -> str:
    """ "imagenet" for ImageFolder data, "cifar" for CIFAR, digits and synthetic (32x32)."""
    return "imagenet" if str(data_spec or "").split(":", 1)[0].strip().lower() == "imagefolder" else "cifar"


def reference_recipe(student_arch: str, nesterov: bool = False, dataset: str = "cifar") -> dict:
    """The references' schedules (docs/METHODS.md).

    CIFAR-100 (mdistiller configs/cifar100/*.yaml, CAT-KD configs/cifar100/CAT_KD/*.yaml,
    letKD supplement "Training details"): SGD, momentum 0.9, weight decay 5e-4, batch 64, 240
    epochs, lr x0.1 at 150/180/210; lr 0.05, or 0.01 for ShuffleNet/MobileNet students;
    Nesterov momentum for letKD. ImageNet (mdistiller configs/imagenet/r34_r18/kd.yaml and
    CAT-KD configs/imagenet/CAT-KD/r50_mv2.yaml): batch 512, lr 0.2, weight decay 1e-4, 100
    epochs, lr x0.1 at 30/60/90. Tiny-ImageNet trains as CIFAR-100 does (letKD supplement:
    "For CIFAR-100 and Tiny-ImageNet, we trained for 240 epochs ...").
    """
    if dataset not in RECIPE_DATASETS:
        raise KdpipeError(f"The recipe must be one of {', '.join(RECIPE_DATASETS)}, not {dataset!r}.")
    if dataset == "imagenet":
        return {
            "optimizer": "sgd",
            "lr": 0.2,
            "momentum": 0.9,
            "nesterov": bool(nesterov),
            "weight_decay": 1e-4,
            "batch_size": 512,
            "epochs": 100,
            "milestones": [30, 60, 90],
            "lr_decay": 0.1,
        }
    return {
        "optimizer": "sgd",
        "lr": 0.01 if is_light_student(student_arch) else 0.05,
        "momentum": 0.9,
        "nesterov": bool(nesterov),
        "weight_decay": 5e-4,
        "batch_size": 64,
        "epochs": 240,
        "milestones": [150, 180, 210],
        "lr_decay": 0.1,
    }


def loss_parts(**terms: torch.Tensor) -> dict:
    """Scalar loss tensors -> {name: detached float32 scalar tensor}: the loop averages them
    on the device, so a step never waits for the device to report its loss parts."""
    return {name: t.detach().float().reshape(()) for name, t in terms.items()}


@dataclass
class TeacherInfo:
    """The teacher's side of a student run, known before the student is built.

    ``shapes``: row shape (without the sample and view axes) of each of the method's arrays;
    ``static``: the whole arrays its kinds write once (``static/<name>``), as numpy;
    ``image_size``: (H, W) of the training images."""

    shapes: dict = field(default_factory=dict)
    static: dict = field(default_factory=dict)
    image_size: tuple = (32, 32)


class Method:
    """Base class: subclasses override what they use."""

    name: str = "method"
    #: constructor arguments a run records for evaluate's rebuild that are not user options
    #: (e.g. FitNet's probed hint shapes): ``get_method`` passes them through unchecked
    recorded_options: tuple[str, ...] = ()
    #: the student classifier the method's reference trains (``models.build(head=...)``)
    default_head: str = "linear"
    #: whether the reference drops an epoch's last incomplete batch (StudentConfig.drop_last
    #: None takes this): mdistiller and CAT-KD keep it (mdistiller/dataset/cifar100.py
    #: DataLoader(shuffle=True), no drop_last)
    reference_drop_last: bool = False

    @classmethod
    def options_from_reference(cls, options: dict, values: dict) -> dict:
        """Options read from a mdistiller / CAT-KD YAML file (``values``: every key of it with
        the reference's defaults) beyond the one-to-one keys of the options' ``yaml``."""
        return options

    def __init__(self, **options):
        self.options = dict(options)
        self.dataset = "cifar"  # the data-set family the recipe and pair defaults follow

    def _bad_option(self, option: str, value, expected: str):
        raise KdpipeError(f"Method {self.name!r}: option {option} must be {expected}, got {value!r}.")

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({opts})"

    # --------------------------------------------------------------- interface
    def kinds(self) -> list:
        """The target kinds this method needs (fresh, unbound instances); [] for none."""
        return []

    @property
    def needs_store(self) -> bool:
        return bool(self.kinds())

    @property
    def needs_target_set(self) -> bool:
        return any(k.needs_target_set for k in self.kinds())

    def bind(self, teacher_arch: str | None = None, student_arch: str | None = None, dataset: str = "cifar"):
        """Tell the method the teacher and student architectures and the data-set family
        (options that depend on them, e.g. CAT-KD's normalisation rule, resolve here). Returns
        self."""
        self.dataset = dataset
        return self

    def prepare_student(self, student, target_set=None):
        """Install taps on ``student`` (a KDModel); the default installs nothing."""
        return student

    def attach_teacher(self, info: TeacherInfo) -> None:
        """Take what the method needs to know of the teacher's targets (default: nothing)."""

    def begin_epoch(self, epoch: int) -> None:
        """The loop starts 0-based ``epoch`` (default: nothing to do)."""

    def loss(self, logits: torch.Tensor, feats: dict, targets: dict, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def recipe(self, student_arch: str) -> dict:
        return reference_recipe(student_arch, nesterov=False, dataset=self.dataset)
