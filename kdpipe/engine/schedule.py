"""The references' optimiser and learning-rate schedule.

SGD (momentum 0.9, weight decay 5e-4; Nesterov for letKD), lr x0.1 at epochs 150/180/210 of
240 (mdistiller's CIFAR-100 solver, mdistiller/engine/cfg.py; letKD-framework's LUT_lr in its
CIFAR100 configs), scaled to the run's epoch count when it is not 240; no warm-up.
"""

from __future__ import annotations

import torch

from kdpipe.recipes import CIFAR

__all__ = ["REFERENCE_EPOCHS", "REFERENCE_MILESTONES", "milestones", "make_optimizer", "make_scheduler"]

# the CIFAR recipe's lr steps (kdpipe.recipes), scaled to other epoch counts
REFERENCE_EPOCHS = CIFAR.epochs
REFERENCE_MILESTONES = CIFAR.milestones


def milestones(epochs: int, reference=REFERENCE_MILESTONES, reference_epochs=REFERENCE_EPOCHS) -> list[int]:
    """The reference lr steps (150/180/210 of 240) scaled to ``epochs``: round(e * m / 240)."""
    return [max(1, int(round(epochs * m / reference_epochs))) for m in reference]


def make_optimizer(
    model: torch.nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4, nesterov: bool = False
) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)


def make_scheduler(optimizer, epochs: int, steps=None, gamma: float = 0.1):
    """MultiStepLR stepped once per epoch; ``steps`` defaults to ``milestones(epochs)``."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(steps or milestones(epochs)), gamma=gamma)
