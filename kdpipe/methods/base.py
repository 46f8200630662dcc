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

from dataclasses import dataclass, field
from typing import Any

import torch

from kdpipe.errors import KdpipeError
from kdpipe.recipes import RECIPE_DATASETS, dataset_family, is_light_student, reference_recipe

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


def probe_features(student, image_size) -> dict:
    """The student's ``forward_features`` of one zero image [1, 3, *image_size] with its stage
    outputs, in eval mode and without gradient (the training mode is restored): the shapes
    methods size their connectors and regressors from."""
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad():
            return student.forward_features(torch.zeros(1, 3, *image_size), stages=True)[1]
    finally:
        student.train(was_training)


def loss_parts(**terms: torch.Tensor) -> dict:
    """Scalar loss tensors -> {name: detached float32 scalar tensor}: the loop averages them
    on the device, so a step never waits for the device to report its loss parts."""
    return {name: t.detach().float().reshape(()) for name, t in terms.items()}


@dataclass
class TeacherInfo:
    """The teacher's side of a student run, known before the student is built.

    ``shapes``: row shape (without the sample and view axes) of each of the method's arrays;
    ``static``: the whole arrays its kinds write once (``static/<name>``), as numpy;
    ``image_size``: (H, W) of the training images; ``labels``: the training set's labels
    [N] (numpy; CRD sizes its memory bank by N and draws its negatives from other classes)."""

    shapes: dict = field(default_factory=dict)
    static: dict = field(default_factory=dict)
    image_size: tuple = (32, 32)
    labels: Any = None


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
    #: whether some of the student's trainable parameters get no gradient in some steps (a
    #: stage whose loss does not reach the classifier, SimKD's unused own classifier):
    #: data-parallel training then has DDP look for them each step (find_unused_parameters),
    #: which it otherwise refuses on the second step
    leaves_parameters_unused: bool = False

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

    def restarts_optimizer(self, epoch: int) -> bool:
        """True where the reference starts 0-based ``epoch`` with a fresh optimizer (RepDistiller's
        second stage of AB and FSP): the trainer then clears the optimizer's state (momentum)
        before the epoch; the lr follows the schedule as before. Default: never."""
        return False

    def scale_to_run(self, epochs: int, reference_epochs: int) -> None:
        """The run trains ``epochs`` epochs where ``recipe()`` has ``reference_epochs``
        (train-student's ``--epochs``), before training starts. Methods with stages counted in
        epochs scale them as the lr milestones scale (AB's and FSP's initialisation,
        ``kdpipe.methods.two_stage``); the default does nothing."""

    def loss(self, logits: torch.Tensor, feats: dict, targets: dict, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def recipe(self, student_arch: str) -> dict:
        return reference_recipe(student_arch, nesterov=False, dataset=self.dataset)
