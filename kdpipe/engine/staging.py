"""Host rows to the device through reused pinned buffers.

Copying a pageable host tensor to CUDA is synchronous and slow; pinning a fresh tensor every
batch (``tensor.pin_memory()``) costs a page-locking allocation per batch. ``PinnedStaging``
keeps, per array, two page-locked buffers of the largest batch seen and alternates between
them: a batch's rows are gathered (or copied) into one, sent with ``non_blocking=True``, and
that buffer is written again only after the CUDA event recorded behind its copy has passed,
so the next batch's gather overlaps the previous copy and no copy ever reads a buffer being
refilled. On a CPU device the rows are simply gathered (the host is the device).
"""

from __future__ import annotations

import torch

__all__ = ["PinnedStaging"]

#: Buffers per array, used in turn.
SLOTS = 2


class PinnedStaging:
    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._buffers: dict[tuple[str, int], torch.Tensor] = {}
        self._events: dict[tuple[str, int], torch.cuda.Event] = {}
        self._turn = 0

    def next_batch(self) -> None:
        """Call once per batch: the next batch uses the other buffer of every array."""
        self._turn = (self._turn + 1) % SLOTS

    def _buffer(self, key: str, like: torch.Tensor, rows: int) -> torch.Tensor:
        slot = (key, self._turn)
        buf = self._buffers.get(slot)
        if buf is None or buf.shape[0] < rows or buf.shape[1:] != like.shape[1:] or buf.dtype != like.dtype:
            buf = torch.empty((rows,) + tuple(like.shape[1:]), dtype=like.dtype).pin_memory()
            self._buffers[slot] = buf
        event = self._events.get(slot)
        if event is not None:
            event.synchronize()  # the copy out of this buffer (two batches ago) has finished
        return buf[:rows]

    def _send(self, key: str, staged: torch.Tensor) -> torch.Tensor:
        out = staged.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._events[(key, self._turn)] = event
        return out

    def gather(self, key: str, data: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``data.index_select(0, index)`` (host) on the device."""
        if not self.cuda:
            return data.index_select(0, index)
        buf = self._buffer(key, data, int(index.numel()))
        torch.index_select(data, 0, index, out=buf)
        return self._send(key, buf)

    def upload(self, key: str, rows: torch.Tensor) -> torch.Tensor:
        """Host ``rows`` on the device (copied through the pinned buffer on CUDA)."""
        if not self.cuda:
            return rows
        buf = self._buffer(key, rows, int(rows.shape[0]))
        buf.copy_(rows)
        return self._send(key, buf)
