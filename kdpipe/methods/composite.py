"""Sums of methods: ``at+kd`` trains with the sum of AT's and KD's losses, on the union of
their targets (the letKD supplement's "AT+KD" and "CRD+KD" rows).

Each part keeps its own options and weights, so a sum counts CE once per part that weighs it:
a row sets a part's ``ce_weight`` to 0 where its reference trains CE once (RepDistiller's
``-r/-a/-b`` weights: CE, KD and the other method's term, each once).
"""

from __future__ import annotations

import torch

from kdpipe.methods.base import Method, TeacherInfo

__all__ = ["CompositeMethod", "SEPARATOR", "split_name"]

#: The separator of a sum's parts in a method name (``at+kd``).
SEPARATOR = "+"


def split_name(name: str) -> list[str]:
    """``"at+kd"`` -> ``["at", "kd"]`` (one part for a plain method name)."""
    return [part.strip() for part in str(name).split(SEPARATOR)]


class CompositeMethod(Method):
    """The sum of ``parts`` (built ``Method`` instances, each with its own options)."""

    def __init__(self, parts: list[Method]):
        super().__init__()
        self.parts = list(parts)
        self.name = SEPARATOR.join(p.name for p in self.parts)
        self.options = {p.name: p.options for p in self.parts}

    @property
    def leaves_parameters_unused(self) -> bool:  # type: ignore[override]
        return any(part.leaves_parameters_unused for part in self.parts)

    @property
    def default_head(self) -> str:  # type: ignore[override]
        """The first part's head that is not the plain linear classifier (CAT-KD's CAM head)."""
        return next((p.default_head for p in self.parts if p.default_head != "linear"), "linear")

    def kinds(self) -> list:
        union: list = []
        for part in self.parts:
            union += [k for k in part.kinds() if k not in union]
        return union

    def bind(self, teacher_arch=None, student_arch=None, dataset: str = "cifar"):
        self.dataset = dataset
        for part in self.parts:
            part.bind(teacher_arch, student_arch, dataset)
        self.options = {p.name: p.options for p in self.parts}
        return self

    def prepare_student(self, student, target_set=None):
        for part in self.parts:
            student = part.prepare_student(student, target_set)
        return student

    def attach_teacher(self, info: TeacherInfo) -> None:
        for part in self.parts:
            part.attach_teacher(info)

    def restarts_optimizer(self, epoch: int) -> bool:
        return any(part.restarts_optimizer(epoch) for part in self.parts)

    def scale_to_run(self, epochs: int, reference_epochs: int) -> None:
        for part in self.parts:
            part.scale_to_run(epochs, reference_epochs)

    def begin_epoch(self, epoch: int) -> None:
        for part in self.parts:
            part.begin_epoch(epoch)

    def loss(self, logits, feats, targets, labels) -> tuple[torch.Tensor, dict]:
        total: torch.Tensor | None = None
        parts: dict = {}
        for part in self.parts:
            part_total, part_terms = part.loss(logits, feats, targets, labels)
            total = part_total if total is None else total + part_total
            parts.update({f"{part.name}.{k}": v for k, v in part_terms.items() if k != "total"})
        assert total is not None
        parts["total"] = total.detach().float().reshape(())
        return total, parts

    def recipe(self, student_arch: str) -> dict:
        """The first part's recipe (the references train a sum with its base method's schedule)."""
        return self.parts[0].recipe(student_arch)
