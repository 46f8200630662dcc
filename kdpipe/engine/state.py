"""What a training run saves and restores besides its weights: the lr scheduler's and the RNGs'
state, in a form ``torch.load(weights_only=True)`` accepts; the names of the files the loop
writes into a run directory.
"""

from __future__ import annotations

from collections import Counter

import torch

__all__ = ["BEST", "TENSORBOARD", "scheduler_state", "load_scheduler_state", "rng_state", "restore_rng_state"]

#: the best epoch's weights, in the run directory's checkpoints folder
BEST = "best.pth"
#: the TensorBoard event files' folder of a run directory
TENSORBOARD = "tensorboard"


def scheduler_state(scheduler) -> dict:
    """A scheduler's state_dict made loadable with weights_only=True (MultiStepLR keeps its
    milestones in a Counter, which the safe unpickler refuses)."""
    sd = dict(scheduler.state_dict())
    if isinstance(sd.get("milestones"), Counter):
        sd["milestones"] = {int(k): int(v) for k, v in sd["milestones"].items()}
    return sd


def load_scheduler_state(scheduler, sd: dict) -> None:
    sd = dict(sd)
    if isinstance(sd.get("milestones"), dict):
        sd["milestones"] = Counter({int(k): int(v) for k, v in sd["milestones"].items()})
    scheduler.load_state_dict(sd)


def rng_state(generator: torch.Generator | None = None) -> dict:
    """The RNG states a run depends on (global torch CPU/CUDA and an optional generator)."""
    state: dict[str, object] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def restore_rng_state(state: dict, generator: torch.Generator | None = None) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except Exception:  # another number of GPUs than when saved: not fatal
            pass
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])
