"""Decoded batches in a given order, from DataLoader worker processes.

For data sets that are decoded per batch (ImageFolder): the training loop hands over the
epoch's batches (indices and view parameters, in plan order) and receives the augmented uint8
images in exactly that order, decoded by `workers` processes ahead of the step.

- `view_batches(dataset, batches, workers)`: training views (`dataset.get_views`).
- `test_batches(dataset, indices, batch_size, workers)`: test views (`dataset.get_test`, or
  `get_batch` for data sets without one), for evaluation.
- `default_workers()`: the worker count the CLI's ``--workers`` defaults to.

Each DataLoader item is one whole batch (a batch-level map-style dataset, ``batch_size=None``),
so a worker decodes a batch at a time and the DataLoader's in-order delivery keeps the given
order. An error while decoding (an unreadable image) comes back as one `DataError` sentence,
not as a worker traceback.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from kdpipe.errors import DataError, KdpipeError

__all__ = ["view_batches", "test_batches", "default_workers", "MAX_DEFAULT_WORKERS"]

#: The most workers `default_workers` picks: PIL decoding of ImageNet JPEGs at a few hundred
#: images/s per process feeds a ResNet-18 step on one GPU with about this many.
MAX_DEFAULT_WORKERS = 8


def _usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_workers() -> int:
    """DataLoader workers for this machine: min(8, usable CPUs - 1), at least 0 (one CPU is
    left to the training loop)."""
    return max(0, min(MAX_DEFAULT_WORKERS, _usable_cpus() - 1))


class _DecodeFailure:
    """What a worker returns instead of raising: the sentence of the `KdpipeError`."""

    def __init__(self, message: str):
        self.message = message


class _BatchJobs(torch.utils.data.Dataset):
    """Item b = batch b decoded: dataset.get_views(indices_b, params_b) or get_test(indices_b).

    The batches are kept as flat numpy arrays with offsets: a worker started by spawn or
    forkserver receives them pickled, and a few arrays pickle in one copy each.
    """

    def __init__(self, dataset, index_parts: Sequence[np.ndarray], param_parts: Sequence[np.ndarray] | None):
        self.dataset = dataset
        lengths = np.asarray([len(part) for part in index_parts], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.indices = np.concatenate(index_parts).astype(np.int64) if len(index_parts) else np.zeros(0, dtype=np.int64)
        self.params = None
        if param_parts is not None:
            self.params = (
                np.concatenate(param_parts).astype(np.int32) if len(param_parts) else np.zeros((0, 5), dtype=np.int32)
            )

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, b: int):
        start, stop = int(self.offsets[b]), int(self.offsets[b + 1])
        indices = self.indices[start:stop]
        try:
            if self.params is not None:
                return self.dataset.get_views(indices, self.params[start:stop])
            get_test = getattr(self.dataset, "get_test", self.dataset.get_batch)
            return get_test(indices)
        except KdpipeError as error:
            return _DecodeFailure(str(error))


def _as_numpy(array, dtype) -> np.ndarray:
    if torch.is_tensor(array):
        array = array.detach().cpu().numpy()
    return np.asarray(array, dtype=dtype)


def _decoded(jobs: _BatchJobs, workers: int, pin_memory: bool, prefetch: int) -> Iterator[torch.Tensor]:
    workers = int(workers)
    if workers < 0:
        raise KdpipeError(f"the number of data loading workers must be 0 or more; got {workers}.")
    pin_memory = bool(pin_memory) and torch.cuda.is_available()
    items: Iterable[Any]  # decoded uint8 batches, or a _DecodeFailure in their place
    if workers == 0:
        items = (jobs[b] for b in range(len(jobs)))
    else:
        items = torch.utils.data.DataLoader(
            jobs,
            batch_size=None,
            shuffle=False,
            num_workers=workers,
            pin_memory=pin_memory,
            prefetch_factor=max(1, int(prefetch)),
            persistent_workers=False,
        )
    return _raising(items, pin_memory and workers == 0)


def _raising(items, pin: bool) -> Iterator[torch.Tensor]:
    """The decoded batches; a worker's failure raised here as its one sentence."""
    for item in items:
        if isinstance(item, _DecodeFailure):
            raise DataError(item.message)
        yield item.pin_memory() if pin else item


def view_batches(
    dataset, batches: Sequence[tuple], workers: int, pin_memory: bool = False, prefetch: int = 2
) -> Iterator[torch.Tensor]:
    """Training views of `batches`, in their order: torch.uint8 [B, 3, S, S] per batch.

    dataset: a data set with `get_views(indices, params)` (ImageFolder).
    batches: a list of (indices int64 [B], params int32 [B, P]) (numpy or torch), in the
        order the batches must come out.
    workers: DataLoader worker processes decoding ahead (`prefetch` batches each); 0 decodes
        in this process, batch by batch, when the iterator is advanced.
    pin_memory: page-locked output for asynchronous copies to a CUDA device.
    """
    if not hasattr(dataset, "get_views"):
        raise TypeError(
            f"view_batches needs a data set with get_views; {type(dataset).__name__} "
            "has none (augment its get_batch images with policy.apply_images)"
        )
    index_parts = [_as_numpy(indices, np.int64).reshape(-1) for indices, _ in batches]
    param_parts = [_as_numpy(params, np.int32) for _, params in batches]
    for indices, params in zip(index_parts, param_parts):
        if params.ndim != 2 or params.shape[0] != len(indices):
            raise ValueError(f"each batch's params must be [B, P] with B = {len(indices)}, got {params.shape}")
    return _decoded(_BatchJobs(dataset, index_parts, param_parts), workers, pin_memory, prefetch)


def test_batches(
    dataset, indices, batch_size: int, workers: int, pin_memory: bool = False, prefetch: int = 2
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(indices int64 [B], test views torch.uint8 [B, 3, S, S]) over `indices`, in order,
    `batch_size` at a time (the last batch may be smaller).

    The test view is `dataset.get_test` (ImageFolder: Resize + CenterCrop) or, for data sets
    without one, `dataset.get_batch`.
    """
    batch_size = int(batch_size)
    if batch_size < 1:
        raise KdpipeError(f"the evaluation batch size must be at least 1; got {batch_size}.")
    index = _as_numpy(indices, np.int64).reshape(-1)
    parts = [index[start : start + batch_size] for start in range(0, len(index), batch_size)]
    decoded = _decoded(_BatchJobs(dataset, parts, None), workers, pin_memory, prefetch)
    return zip((torch.from_numpy(part) for part in parts), decoded)


# The name is the engine's contract; keep pytest from taking it for a test where imported.
# (mypy does not model attributes set on a function object.)
test_batches.__test__ = False  # type: ignore[attr-defined]
