"""An epoch's plan: which samples, in which order, under which views.

Every epoch of teacher or student training starts from an ``EpochPlan``, a pure function of
(seed, epoch) and the data, so a run resumed at an epoch boundary trains on exactly what an
unbroken run would, and the images and the targets of a batch always agree:

- ``order`` int64 [n]: the data set's own sample indices in visiting order;
- ``view_idx`` int64 [n] or None: for replay, the stored view drawn for each position
  (uniformly among the sample's V stored views: the references' fresh crop+flip when the
  store holds every view);
- ``params`` int32 [n, P]: the augmentation parameters applied to each image (the stored
  view's parameters for replay; fresh random views otherwise).

Two orders:

- ``uniform_order``: a uniform random permutation (the references' shuffle). Used whenever
  the targets are in memory (device or host).
- ``block_order``: blocks of consecutive samples (the store's chunks) visited in a seeded
  shuffled order, their samples passed through a seeded shuffle buffer. Used when targets are
  streamed from the store, so each chunk is read once per epoch. The order is computed up
  front (indices only), so the prefetching reader knows what each batch needs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["EpochPlan", "PlanBatch", "epoch_seed", "uniform_order", "block_order", "draw_views", "steps_per_epoch"]

# Salts keep the streams of one (seed, epoch) independent of each other.
SALT_ORDER, SALT_VIEWS, SALT_TORCH, SALT_PARAMS = 1, 5, 3, 4


def epoch_seed(seed: int, epoch: int, salt: int = 0) -> int:
    """A 63-bit seed that is a pure function of (seed, epoch, salt) (splitmix64 mixing)."""
    x = int(seed) * 0x9E3779B97F4A7C15 + int(epoch) * 0xBF58476D1CE4E5B9 + int(salt) * 0x94D049BB133111EB
    x &= (1 << 64) - 1
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & ((1 << 64) - 1)
    x ^= x >> 32
    return x & ((1 << 63) - 1)


def _generator(seed: int, epoch: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(epoch_seed(seed, epoch, salt))


@dataclass(frozen=True)
class PlanBatch:
    """Positions [start, stop) of an epoch plan: sample indices, stored views, parameters."""

    start: int
    stop: int
    indices: torch.Tensor  # int64 [B] (CPU)
    view_idx: torch.Tensor | None  # int64 [B] (CPU) or None
    params: torch.Tensor  # int32 [B, P] (CPU)

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass
class EpochPlan:
    """See the module docstring."""

    order: torch.Tensor
    params: torch.Tensor
    view_idx: torch.Tensor | None = None
    block_rank: np.ndarray | None = None  # block_order: each position's block, in reading order
    blocks: list | None = None  # block_order: (start, stop) sample ranges, in reading order

    @property
    def num_samples(self) -> int:
        return int(self.order.numel())

    def batches(self, batch_size: int) -> Iterator[PlanBatch]:
        """Consecutive batches; a trailing batch of one sample is dropped (BatchNorm cannot
        train on it)."""
        n = self.num_samples
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            if stop - start < 2 and n >= 2:
                return
            yield PlanBatch(
                start,
                stop,
                self.order[start:stop],
                None if self.view_idx is None else self.view_idx[start:stop],
                self.params[start:stop],
            )

    def head(self, count: int) -> EpochPlan:
        """The first ``count`` positions (``drop_last``: the plan cut to whole batches)."""
        if count >= self.num_samples:
            return self
        return EpochPlan(
            self.order[:count],
            self.params[:count],
            None if self.view_idx is None else self.view_idx[:count],
            None if self.block_rank is None else self.block_rank[:count],
            self.blocks,
        )

    def shard(self, rank: int, world_size: int) -> EpochPlan:
        """Every ``world_size``-th position from ``rank``: one data-parallel worker's share.
        The plan is first cut to a multiple of ``world_size`` positions, so every worker runs
        the same number of steps; step s of all workers together is step s of the whole plan.
        Itself when alone."""
        if world_size == 1:
            return self
        usable = self.num_samples - self.num_samples % world_size
        sel = slice(rank, usable, world_size)
        return EpochPlan(
            self.order[sel],
            self.params[sel],
            None if self.view_idx is None else self.view_idx[sel],
            None if self.block_rank is None else self.block_rank[sel],
            self.blocks,
        )


def steps_per_epoch(n: int, batch_size: int) -> int:
    full, rest = divmod(int(n), int(batch_size))
    return full + (1 if rest >= 2 or (rest and n < 2) else 0)


# ------------------------------------------------------------------------------ orders
def uniform_order(indices: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
    """A uniform random permutation of ``indices`` (int64 [n]), seeded by (seed, epoch)."""
    n = int(indices.numel())
    return indices[torch.randperm(n, generator=_generator(seed, epoch, SALT_ORDER))]


def block_order(
    indices: torch.Tensor, block_rows: int, buffer: int, seed: int, epoch: int
) -> tuple[torch.Tensor, list, np.ndarray]:
    """Blocks of ``block_rows`` consecutive sample indices in a shuffled order, streamed
    through a shuffle buffer of ``buffer`` samples.

    Returns (order int64 [n], blocks [(start, stop)] in reading order, block rank int64 [n]:
    for each position, the reading rank of its sample's block). A sample leaves the buffer
    only after its block was read, which is what lets a reader stream the blocks in order.
    """
    idx = indices.numpy().astype(np.int64)
    rng = np.random.default_rng(epoch_seed(seed, epoch, SALT_ORDER))
    block_of = idx // int(block_rows)
    block_ids = np.unique(block_of)
    reading = block_ids[rng.permutation(len(block_ids))]
    rank_of_block = {int(b): r for r, b in enumerate(reading)}
    members = {int(b): idx[block_of == b] for b in block_ids}
    order, pool = [], []
    for b in reading:
        pool.extend(members[int(b)].tolist())
        while len(pool) >= buffer:
            j = int(rng.integers(len(pool)))
            pool[j], pool[-1] = pool[-1], pool[j]
            order.append(pool.pop())
    rng.shuffle(pool)
    order.extend(pool)
    order_np = np.asarray(order, dtype=np.int64)
    ranks = np.asarray([rank_of_block[int(s // block_rows)] for s in order_np], dtype=np.int64)
    blocks = [(int(b) * block_rows, (int(b) + 1) * block_rows) for b in reading]
    return torch.from_numpy(order_np), blocks, ranks


def draw_views(order: torch.Tensor, num_views: int, seed: int, epoch: int) -> torch.Tensor:
    """One stored view per position, uniform over ``num_views`` (int64 [n])."""
    gen = _generator(seed, epoch, SALT_VIEWS)
    return torch.randint(0, int(num_views), (int(order.numel()),), generator=gen, dtype=torch.int64)


def fresh_params(policy, order: torch.Tensor, seed: int, epoch: int, image_sizes=None) -> torch.Tensor:
    """Fresh random augmentation views for every position (int32 [n, P]), seeded by (seed,
    epoch). ``image_sizes`` [N, 2] is passed to policies whose views depend on the image
    size (ImageFolder's RandomResizedCrop boxes)."""
    gen = _generator(seed, epoch, SALT_PARAMS)
    n = int(order.numel())
    if image_sizes is not None:
        sizes = np.asarray(image_sizes)[order.numpy()]
        return policy.random(gen, n, device="cpu", sizes=sizes).to(torch.int32)
    return policy.random(gen, n, device="cpu").to(torch.int32)
