"""Data-parallel training: which worker this process is, and the model as DDP sees it.

One process trains alone (``Workers()``: rank 0 of 1). Under Ray Train
(``kdpipe.distributed.data_parallel``) every worker runs the same epoch loop: the epoch plan is
drawn identically everywhere (same seed) and each worker takes every ``world_size``-th
position of it (``EpochPlan.shard``), so the workers' batches of one step together are
exactly the single-process batch of that step; gradients are averaged by
``DistributedDataParallel``; metrics are summed across workers; rank 0 alone evaluates,
logs and checkpoints. BatchNorm statistics are per worker (as mdistiller's DataParallel
computes them) unless ``sync_bn`` converts the model to ``SyncBatchNorm`` (CUDA only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, cast

import torch
import torch.nn as nn

from kdpipe.errors import KdpipeError

__all__ = ["Workers", "Forward", "wrap_for_training"]


@dataclass(frozen=True)
class Workers:
    """This process's place among the data-parallel workers (rank 0 of 1 when alone)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world_size > 1

    @classmethod
    def current(cls) -> Workers:
        """The process group torch.distributed is in (Ray Train sets it up), else alone."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of ``tensor`` over the workers (in place; itself when alone)."""
        if self.parallel:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.parallel:
            import torch.distributed as dist

            dist.barrier()


class FeatureModel(Protocol):
    """What distillation needs of a model besides its logits (``KDModel`` provides it)."""

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


class Forward(nn.Module):
    """The model's two forwards behind one ``forward``: DDP only sees ``forward`` calls, and
    distillation needs ``forward_features`` (CAMs, feature maps, KD-layer scores) too."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, features: bool = False):
        if not features:
            return self.model(x)
        # torch's stubs type a sub-module attribute as ``Tensor | Module``; the model trained
        # here is a KDModel (or a test double) that has ``forward_features``.
        return cast(FeatureModel, self.model).forward_features(x)


def wrap_for_training(
    model: nn.Module, workers: Workers, device: torch.device, sync_bn: bool = False, find_unused: bool = False
) -> nn.Module:
    """``Forward(model)``, inside DistributedDataParallel when there are several workers;
    ``find_unused``: some parameters get no gradient in some steps (the method's
    ``leaves_parameters_unused``), which DDP must then look for."""
    if sync_bn:
        if device.type != "cuda":
            raise KdpipeError("--sync-bn needs CUDA (torch's SyncBatchNorm runs on GPUs only); drop it on CPU.")
        if workers.parallel:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    net = Forward(model)
    if not workers.parallel:
        return net
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return DistributedDataParallel(net, device_ids=ids, find_unused_parameters=find_unused)
