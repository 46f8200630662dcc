"""The references' optimiser and learning-rate schedule.

SGD (momentum 0.9, weight decay 5e-4; Nesterov for letKD), lr x0.1 at epochs 150/180/210 of
240 (mdistiller's CIFAR-100 solver, mdistiller/engine/cfg.py; letKD-framework's LUT_lr in its
CIFAR100 configs), scaled to the run's epoch count when it is not 240; no warm-up.
"""

from __future__ import annotations

import torch

from kdpipe.recipes import CIFAR

__all__ = [
    "REFERENCE_EPOCHS",
    "REFERENCE_MILESTONES",
    "describe_schedule",
    "milestones",
    "make_optimizer",
    "make_scheduler",
]

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


def describe_schedule(lr: float, epochs: int, steps, gamma: float = 0.1) -> str:
    """The lr of every epoch in words, as MultiStepLR stepped once per epoch gives it: epoch e
    (1-based) runs at lr * gamma ** (milestones <= e - 1). Short runs scale the milestones, so a
    2-epoch run has [1, 2, 2] and runs epoch 2 at lr/10: printed at the start of every run."""
    steps = sorted(int(m) for m in steps)
    spans: list[list] = []  # [lr, first epoch, last epoch]
    for epoch in range(1, int(epochs) + 1):
        value = lr * gamma ** sum(m <= epoch - 1 for m in steps)
        if spans and abs(spans[-1][0] - value) <= 1e-12 * max(abs(value), 1e-30):
            spans[-1][2] = epoch
        else:
            spans.append([value, epoch, epoch])
    parts = [f"{v:.4g} (epoch{'s' if a != b else ''} {a}{f'-{b}' if a != b else ''})" for v, a, b in spans]
    return f"lr {', then '.join(parts)}; x{gamma:g} at milestones {steps} of {int(epochs)} epochs"
