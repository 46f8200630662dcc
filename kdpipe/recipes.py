"""The references' training recipes: the one place their schedules are written.

CIFAR-100 (mdistiller configs/cifar100/*.yaml, CAT-KD configs/cifar100/CAT_KD/*.yaml, letKD
supplement "Training details"): SGD, momentum 0.9, weight decay 5e-4, batch 64, 240 epochs,
lr x0.1 at 150/180/210; lr 0.05, or 0.01 for ShuffleNet/MobileNet students; Nesterov momentum
for letKD. ImageNet (mdistiller configs/imagenet/r34_r18/kd.yaml and CAT-KD
configs/imagenet/CAT-KD/r50_mv2.yaml): batch 512, lr 0.2, weight decay 1e-4, 100 epochs, lr
x0.1 at 30/60/90. Tiny-ImageNet trains as CIFAR-100 does (letKD supplement: "For CIFAR-100 and
Tiny-ImageNet, we trained for 240 epochs ..."). Teachers train with the CIFAR recipe
(mdistiller's vanilla teachers, ``ckpt_epoch_240.pth``).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace

from kdpipe.errors import KdpipeError

__all__ = [
    "Recipe",
    "RECIPES",
    "RECIPE_DATASETS",
    "CIFAR",
    "IMAGENET",
    "reference_recipe",
    "is_light_student",
    "dataset_family",
]


@dataclass(frozen=True)
class Recipe:
    """One reference schedule: SGD and a multi-step lr decay."""

    lr: float
    momentum: float
    weight_decay: float
    batch_size: int
    epochs: int
    milestones: tuple[int, ...]
    lr_decay: float
    nesterov: bool = False
    optimizer: str = "sgd"

    def as_dict(self) -> dict:
        d = asdict(self)
        d["milestones"] = list(self.milestones)
        return d


CIFAR = Recipe(
    lr=0.05, momentum=0.9, weight_decay=5e-4, batch_size=64, epochs=240, milestones=(150, 180, 210), lr_decay=0.1
)
IMAGENET = Recipe(
    lr=0.2, momentum=0.9, weight_decay=1e-4, batch_size=512, epochs=100, milestones=(30, 60, 90), lr_decay=0.1
)
#: lr of ShuffleNet / MobileNet students on CIFAR (mdistiller configs/cifar100/*shuv1*, *mv2*)
LIGHT_STUDENT_LR = 0.01
RECIPES = {"cifar": CIFAR, "imagenet": IMAGENET, "tinyimagenet": CIFAR}
#: The data-set families whose reference recipes differ.
RECIPE_DATASETS = tuple(RECIPES)

_LIGHT = re.compile(r"shuffle|mobile", re.IGNORECASE)


def is_light_student(student_arch: str) -> bool:
    """True for ShuffleNet / MobileNet students, which the references train with lr 0.01."""
    return bool(_LIGHT.search(str(student_arch)))


def dataset_family(data_spec: str | None) -> str:
    """ "imagenet" for ImageFolder data, "cifar" for CIFAR, digits and synthetic (32x32)."""
    return "imagenet" if str(data_spec or "").split(":", 1)[0].strip().lower() == "imagefolder" else "cifar"


def reference_recipe(student_arch: str, nesterov: bool = False, dataset: str = "cifar") -> dict:
    """The recipe of ``dataset`` for ``student_arch`` as a dict (the keys a run records)."""
    if dataset not in RECIPES:
        raise KdpipeError(f"The recipe must be one of {', '.join(RECIPE_DATASETS)}, not {dataset!r}.")
    recipe = replace(RECIPES[dataset], nesterov=bool(nesterov))
    if dataset != "imagenet" and is_light_student(student_arch):
        recipe = replace(recipe, lr=LIGHT_STUDENT_LR)
    return recipe.as_dict()
