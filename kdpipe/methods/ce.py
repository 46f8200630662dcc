"""Plain cross-entropy training (the `ce` method): the baseline, no teacher, no store."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from kdpipe.methods.base import Method, loss_parts, reference_recipe
from kdpipe.methods.registry import MethodOptions, register

__all__ = ["CE", "CEOptions"]


@dataclass
class CEOptions(MethodOptions):
    """CE has no options."""


@register(
    "ce",
    options=CEOptions,
    summary="plain cross-entropy on the labels: the baseline, no teacher",
    paper="mdistiller/distillers/_base.py Vanilla",
    yaml_names=("NONE",),
)
class CE(Method):
    """Total = CE(logits, labels). Consumes no targets; needs no store."""

    name = "ce"

    def __init__(self):
        super().__init__()

    def loss(self, logits, feats, targets, labels):
        ce = F.cross_entropy(logits, labels)
        return ce, loss_parts(ce=ce, total=ce)

    def recipe(self, student_arch: str) -> dict:
        return reference_recipe(student_arch, nesterov=False, dataset=self.dataset)
