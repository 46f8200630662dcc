"""The `Method` interface every distillation method implements (mdistiller-style).

A method is a small object the training loop (``kdpipe.stages.train``) and the target
sources (``kdpipe.stages.targets``) talk to:

- ``name``: its registry name (``ce``, ``kd``, ``cat_kd``, ``letkd1``, ``letkd2``);
- ``options``: the resolved options, a JSON-able dict (written into the run's config.json);
- ``target_keys``: the keys of the per-batch target dict it consumes, a subset of
  ``TARGET_KEYS``;
- ``store_artifacts(target_set)``: the store arrays it needs (``artifacts`` is the same list
  for the default target set);
- ``prepare_student(student, ...)``: installs KD-layer taps on the student, if any;
- ``loss(logits, feats, targets, labels) -> (total, parts)``: ``total`` a scalar tensor,
  ``parts`` a dict of Python floats (for metrics);
- ``recipe(student_arch)``: the reference training settings (METHODS.md).

Shapes of the target dict (float32 unless noted), B the batch, C classes, (h, w) the
student's grid at the supervised layer, k the stored top-k, M = C * K_inter sub-classes:

- ``logits`` [B, C];
- ``cam`` [B, C, r, r] pooled at the method's resolution, or native [B, C, h_t, w_t] where the
  method asks for the native map (CAT-KD with binarisation);
- ``penult_topk_idx`` int64 [B, h, w, k], ``penult_topk_val`` [B, h, w, k];
- ``inter_probs`` [B, h, w, M] (a row of the sub-class score matrix per location).
"""

from __future__ import annotations

import re

import torch

from kdpipe.errors import KdpipeError

__all__ = ["Method", "TARGET_KEYS", "DEFAULT_TARGET_SET", "reference_recipe",
           "is_light_student", "loss_parts"]

#: Name of the store's target set (``targets/<name>/``) used when none is given.
DEFAULT_TARGET_SET = "default"

TARGET_KEYS = ("logits", "cam", "penult_topk_idx", "penult_topk_val", "inter_probs")

_LIGHT = re.compile(r"shuffle|mobile", re.IGNORECASE)


def is_light_student(student_arch: str) -> bool:
    """True for ShuffleNet / MobileNet students, which the references train with lr 0.01."""
    return bool(_LIGHT.search(str(student_arch)))


def reference_recipe(student_arch: str, nesterov: bool = False) -> dict:
    """CIFAR-100 reference schedule of METHODS.md (CAT-KD / mdistiller and letKD alike).

    SGD, momentum 0.9, weight decay 5e-4, batch 64, 240 epochs, lr x0.1 at 150/180/210;
    lr 0.05, or 0.01 for ShuffleNet/MobileNet students; Nesterov momentum for letKD.
    """
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
    """Scalar loss tensors -> {name: float}, with one device synchronisation for all."""
    names = list(terms)
    values = torch.stack([terms[n].detach().float().reshape(()) for n in names]).tolist()
    return dict(zip(names, values))


class Method:
    """Base class: CE-free defaults; subclasses override what they use."""

    name: str = "method"
    target_keys: tuple[str, ...] = ()

    def __init__(self, **options):
        self.options = dict(options)

    # ----------------------------------------------------------------- helpers
    def _bad_option(self, option: str, value, expected: str):
        raise KdpipeError(
            f"Method {self.name!r}: option {option} must be {expected}, got {value!r}.")

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({opts})"

    # --------------------------------------------------------------- interface
    def store_artifacts(self, target_set: str | None = None) -> list[str]:
        """Store array names this method needs (``[]`` when it needs no store)."""
        return []

    @property
    def artifacts(self) -> list[str]:
        """``store_artifacts`` for the default target set (``DEFAULT_TARGET_SET``)."""
        return self.store_artifacts(None)

    @property
    def needs_store(self) -> bool:
        return bool(self.target_keys)

    def bind(self, teacher_arch: str | None = None, student_arch: str | None = None):
        """Tell the method the teacher and student architectures (options that depend on
        the pair, e.g. CAT-KD's normalisation rule, resolve here). Returns self."""
        return self

    def prepare_student(self, student, num_penult_clusters: int | None = None,
                        num_subclasses: int | None = None):
        """Install taps on ``student`` (a KDModel); the default installs nothing."""
        return student

    def loss(self, logits: torch.Tensor, feats: dict, targets: dict,
             labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def recipe(self, student_arch: str) -> dict:
        return reference_recipe(student_arch, nesterov=False)
