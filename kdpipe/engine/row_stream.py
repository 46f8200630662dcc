"""The stream tier over row-addressable stores: only the rows an epoch uses, decoded in threads.

When every array a method reads is stored in the row layout (``kdpipe.artifacts.row_reads``),
streaming needs no block order: a batch's rows are read directly, whatever samples the plan
puts in it. ``RowStream`` therefore keeps the plan's uniform shuffle (the same order as the
in-memory tiers, so a streamed run is the same run), and a pool of ``workers`` threads reads
whole batches ahead of the step (up to ``ahead`` batches; the codecs and the file reads
release the GIL). Every row is decoded once: bytes decoded per byte used are 1. The first
batch waits for its own rows only.

Stores in the old layout (chunks of (samples, every view, ...)) are streamed by
``kdpipe.engine.rows.StreamRows`` in block order, as before.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from kdpipe.engine.staging import PinnedStaging
from kdpipe.errors import KdpipeError, StoreError

__all__ = ["RowStream", "STREAM_WORKERS", "row_readers"]

#: Threads reading batches ahead (each decodes whole batches; the codecs release the GIL).
STREAM_WORKERS = max(2, min(8, os.cpu_count() or 2))


def row_readers(reader, uses) -> dict | None:
    """The row reader of every array of ``uses``, or None when one is not in the row layout."""
    readers = {}
    for use in uses:
        rows = reader.row_reader(use.path)
        if rows is None:
            return None
        readers[use.path] = rows
    return readers


class RowStream:
    """The ``stream`` tier on row-addressable arrays (see the module docstring)."""

    def __init__(
        self,
        reader,
        uses,
        device: torch.device,
        readers: dict,
        finite_check: bool = True,
        ahead: int = 8,
        workers: int = STREAM_WORKERS,
    ):
        self.reader = reader
        self.uses = list(uses)
        self.device = torch.device(device)
        self.readers = readers
        self.finite_check = finite_check
        self.ahead = max(1, int(ahead))
        self.workers = max(1, int(workers))
        self.staging = PinnedStaging(self.device)
        self._pool: ThreadPoolExecutor | None = None
        self._batches = None
        self._pending: deque[tuple[int, Future]] = deque()

    def begin_epoch(self, plan, batch_size: int) -> None:
        self.close()
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="kdpipe-rows")
        self._batches = iter(plan.batches(batch_size))
        self._fill()

    def _fill(self) -> None:
        while self._pool is not None and self._batches is not None and len(self._pending) < self.ahead:
            batch = next(self._batches, None)
            if batch is None:
                self._batches = None
                return
            self._pending.append((batch.start, self._pool.submit(self._read, batch)))

    def _read(self, batch) -> dict[str, torch.Tensor]:
        from kdpipe.engine.rows import to_torch

        samples = batch.indices.numpy()
        views = batch.view_idx.numpy() if batch.view_idx is not None else None
        out = {}
        for use in self.uses:
            rows = self.readers[use.path].read(samples, views if use.per_view else None)
            if self.finite_check and rows.dtype.kind == "f" and not np.isfinite(rows).all():
                raise StoreError(
                    f"The store array {use.path} at {self.reader.path} holds NaN or infinite values "
                    f"(samples {int(samples.min())}..{int(samples.max())}); re-extract or re-cluster it."
                )
            out[use.path] = to_torch(rows)
        return out

    def rows(self, batch) -> dict[str, torch.Tensor]:
        if not self._pending:
            raise KdpipeError("Streamed targets were asked for before the epoch began (or after it ended).")
        start, future = self._pending.popleft()
        if start != batch.start:
            raise KdpipeError(f"The target stream is out of step (batch at {start}, step at {batch.start}).")
        self._fill()
        rows = future.result()
        self.staging.next_batch()
        return {k: self.staging.upload(k, v) for k, v in rows.items()}

    def close(self) -> None:
        for _, future in self._pending:
            future.cancel()
        self._pending.clear()
        self._batches = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
