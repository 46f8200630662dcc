"""Images for the training loop, batch by batch, in the epoch plan's order.

- **resident** (whenever the data set's images are in memory and fit the device's budget:
  digits, CIFAR): the uint8 images and labels are moved to the device once; each batch is a
  gather there, cropped/flipped with ``policy.apply_images`` by the plan's view parameters.
  No DataLoader, no worker processes, no host I/O per step beyond the index vector.
- **decoded** (data sets that are not resident, e.g. ImageFolder): DataLoader workers decode
  and augment each batch of the plan (``dataset.get_views`` through
  ``kdpipe.data.loader.view_batches``), in the plan's order, so targets and images agree.
  A data set without ``get_views`` is read with ``get_batch`` and augmented on the device.

Labels always live on the device (int64 [N]); indices stay the data set's own, so cached
targets are looked up by each sample's original index (also when training on a subset).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from kdpipe.engine.device import memory_budget
from kdpipe.errors import KdpipeError

if TYPE_CHECKING:
    from kdpipe.data.base import Dataset
    from kdpipe.engine.plan import EpochPlan, PlanBatch
    from kdpipe.views import Policy

__all__ = ["DeviceData", "place_dataset", "DATA_PATHS"]

DATA_PATHS = ("auto", "resident", "stream")


@dataclass
class DeviceData:
    """A data set's images (uint8, resident on ``device`` or decoded per batch) and labels."""

    dataset: Dataset
    device: torch.device
    resident: bool
    images: torch.Tensor | None = None  # uint8 [N, 3, H, W] on the device when resident
    labels: torch.Tensor | None = None  # int64 [N] on the device
    indices: torch.Tensor | None = None  # int64 [n] (CPU): the samples trained on, or all
    workers: int = 0
    # The data set's per-channel statistics on the device, set in __post_init__.
    mean: torch.Tensor = field(init=False)
    std: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.mean = torch.as_tensor(self.dataset.mean, dtype=torch.float32).to(self.device)
        self.std = torch.as_tensor(self.dataset.std, dtype=torch.float32).to(self.device)

    @property
    def num_samples(self) -> int:
        return int(self.sample_indices.numel())

    @property
    def sample_indices(self) -> torch.Tensor:
        if self.indices is not None:
            return self.indices
        return torch.arange(len(self.dataset), dtype=torch.int64)

    @property
    def image_sizes(self):
        """Original image sizes [N, 2] where the views depend on them (ImageFolder), else None."""
        return getattr(self.dataset, "image_sizes", None) if not self.resident else None

    def _device_labels(self) -> torch.Tensor:
        if self.labels is None:
            raise KdpipeError("DeviceData has no labels; build it with place_dataset.")
        return self.labels

    def _resident_images(self) -> torch.Tensor:
        if self.images is None:
            raise KdpipeError("resident DeviceData has no images; build it with place_dataset.")
        return self.images

    def labels_of(self, indices: torch.Tensor) -> torch.Tensor:
        return self._device_labels().index_select(0, indices.to(self.device, non_blocking=True))

    # ------------------------------------------------------------------ training batches
    def batches(self, plan: EpochPlan, batch_size: int, policy: Policy) -> Iterator[tuple[PlanBatch, torch.Tensor]]:
        """(PlanBatch, augmented uint8 images [B, 3, H, W] on the device) for one epoch."""
        if self.resident:
            images = self._resident_images()
            for batch in plan.batches(batch_size):
                imgs = images.index_select(0, batch.indices.to(self.device, non_blocking=True))
                yield batch, policy.apply_images(imgs, batch.params.to(self.device, non_blocking=True))
            return
        if hasattr(self.dataset, "get_views"):
            from kdpipe.data.loader import view_batches

            batches = list(plan.batches(batch_size))
            decoded = view_batches(
                self.dataset,
                [(b.indices, b.params) for b in batches],
                workers=self.workers,
                pin_memory=self.device.type == "cuda",
            )
            for batch, imgs in zip(batches, decoded):
                yield batch, imgs.to(self.device, non_blocking=True)
            return
        for batch in plan.batches(batch_size):
            imgs = self.dataset.get_batch(batch.indices.numpy()).to(self.device, non_blocking=True)
            yield batch, policy.apply_images(imgs, batch.params.to(self.device, non_blocking=True))

    # ------------------------------------------------------------------ evaluation batches
    def eval_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(indices, un-augmented uint8 images on the device) over every sample, in order."""
        idx_all = self.sample_indices
        for start in range(0, int(idx_all.numel()), batch_size):
            idx = idx_all[start : start + batch_size]
            if self.resident:
                yield idx, self._resident_images().index_select(0, idx.to(self.device))
            else:
                yield idx, self.dataset.get_batch(idx.numpy()).to(self.device, non_blocking=True)


def place_dataset(
    dataset: Dataset, device: torch.device, indices=None, data_path: str = "auto", workers: int | None = None
) -> DeviceData:
    """Put ``dataset`` on ``device`` when it fits the measured budget (``data_path`` "auto"),
    or force "resident"/"stream". ``indices`` (sample indices) restricts training to a subset.
    ``workers``: DataLoader workers that decode a data set read per batch (None: one per
    usable CPU but one, at most 8: ``kdpipe.data.loader.default_workers``)."""
    if workers is None:
        from kdpipe.data.loader import default_workers

        workers = default_workers()
    if int(workers) < 0:
        raise KdpipeError(f"--workers must be 0 or more, got {workers}.")
    if data_path not in DATA_PATHS:
        raise KdpipeError(f"data_path must be one of {', '.join(DATA_PATHS)}, got {data_path!r}.")
    labels = torch.as_tensor(np.asarray(dataset.labels), dtype=torch.int64).to(device)
    idx = None if indices is None else torch.as_tensor(np.asarray(indices), dtype=torch.int64)
    images = getattr(dataset, "images", None)
    resident = data_path == "resident" or (
        data_path == "auto" and images is not None and images.numel() <= memory_budget(device)
    )
    if not resident:
        return DeviceData(dataset, device, False, None, labels, idx, workers=workers)
    if images is None:
        images = dataset.get_batch(np.arange(len(dataset)))  # small data sets only
    return DeviceData(
        dataset, device, True, images.to(device, non_blocking=True).contiguous(), labels, idx, workers=workers
    )
