"""<Method name> (<authors>, <venue>): one line on what it distils.

Copy this file to ``kdpipe/methods/<name>.py`` and fill it in; copy ``test_method.py`` to
``tests/test_method_<name>.py``. That is all a method takes: the registry finds the module,
the CLI gets its flags, ``--print-config``, ``kdpipe methods`` and the docs table its options,
stage one writes the arrays its kinds declare. (docs/ARCHITECTURE.md, "Add a method".)

This template is a working method: logit matching by mean squared error, as RepDistiller's
``--distill`` baselines compute it on logits. Replace the loss, the options and the kinds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdpipe.methods.base import Method, loss_parts, reference_recipe
from kdpipe.methods.registry import MethodOptions, option, register
from kdpipe.targets import Logits

__all__ = ["logit_mse_loss", "TemplateOptions", "TemplateMethod"]


# ------------------------------------------------------------------ the loss: a pure function
def logit_mse_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean squared error between logits.

    Args:
        student_logits: [B, C]; teacher_logits: [B, C] (no gradient needed through them).

    Returns:
        scalar: mean over the B * C elements of (student - teacher)^2.
    """
    return F.mse_loss(student_logits, teacher_logits.to(student_logits.dtype))


# ------------------------------------------------------------------ options: default + where from
@dataclass
class TemplateOptions(MethodOptions):
    """Each field: the reference's default, the file it comes from, the help text, and the key
    of mdistiller / CAT-KD YAML files it is read from (if any)."""

    feat_weight: float | None = option(1.0, source="<reference repo>/<file> (<key>)", help="weight of the MSE term")
    ce_weight: float | None = option(1.0, source="<reference repo>/<file> (<key>)", help="weight of CE")


# ------------------------------------------------------------------ the method
@register(
    "template_method",
    options=TemplateOptions,
    summary="CE + weight * MSE between student and teacher logits (the method template)",
    paper="<authors>, <venue>; <reference repo>",
)
class TemplateMethod(Method):
    """total = ce_weight * CE + feat_weight * logit_mse_loss."""

    name = "template_method"

    def __init__(self, feat_weight: float | None = None, ce_weight: float | None = None):
        given = {"feat_weight": feat_weight, "ce_weight": ce_weight}
        super().__init__(**{**TemplateOptions.defaults(), **{k: float(v) for k, v in given.items() if v is not None}})

    def kinds(self) -> list:
        """What stage one must store for it (and the online teacher computes): here the logits.
        A kind only this method uses is a ``TargetKind`` subclass defined in this file."""
        return [Logits()]

    def loss(self, logits, feats, targets, labels):
        o = self.options
        ce = F.cross_entropy(logits, labels)
        mse = logit_mse_loss(logits, targets["logits"])
        total = o["ce_weight"] * ce + o["feat_weight"] * mse
        return total, loss_parts(ce=ce, mse=mse, total=total)

    def recipe(self, student_arch: str) -> dict:
        return reference_recipe(student_arch, nesterov=False, dataset=self.dataset)
