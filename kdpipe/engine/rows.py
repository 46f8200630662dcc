"""Where cached targets live during training: on the device, in host memory, shared, or streamed.

Stage two reads, for every batch, the stored rows of the views the batch replays. Four
tiers, chosen from the bytes the method needs and the measured free memory
(``choose_residency``; ``--resident device|host|shared|stream|auto`` overrides it):

- ``device``: every needed array is loaded once onto the training device (as stored:
  float16 / int16); a batch is one gather there. On a CPU-only machine the device is the host.
- ``host``: loaded once into host memory (pinned on CUDA); a batch is gathered on the host
  and copied to the device (through reused pinned buffers, ``kdpipe.engine.staging``).
- ``shared``: as ``host``, but the rows are one node-local memory-mapped copy made once per
  machine (``kdpipe.engine.shared_copy``): every trial and data-parallel worker on the machine
  maps the same pages, so N students hold about the memory of one.
- ``stream``: nothing is loaded up front. Stores in the row layout (one inner chunk per
  (sample, view) row) are read batch by batch in the plan's uniform order by a pool of
  threads, only the rows used (``kdpipe.engine.row_stream.RowStream``). Older stores: each
  epoch visits the store's blocks of samples in the plan's shuffled block order
  (``kdpipe.engine.plan.block_order``), and a background thread reads the blocks ahead of the
  step and hands over each batch's rows in plan order (``StreamRows``).

All three return, for a ``PlanBatch``, ``{array path: rows [B, ...]}`` on the device in the
store's dtype: the row of view ``view_idx[b]`` for arrays with every view (replay), of view 0
otherwise (warp, or identity-only arrays).
"""

from __future__ import annotations

import os
import queue
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from kdpipe.engine.device import host_available_bytes, memory_budget
from kdpipe.engine.shared_copy import load_array
from kdpipe.engine.staging import PinnedStaging
from kdpipe.errors import KdpipeError, StoreError

__all__ = [
    "RESIDENCY",
    "ArrayUse",
    "choose_residency",
    "MemoryRows",
    "SharedRows",
    "StreamRows",
    "to_torch",
    "STREAM_BUFFER",
    "STREAM_AHEAD",
]

RESIDENCY = ("auto", "device", "host", "shared", "stream")
#: Samples in the stream tier's shuffle buffer (rows of one view each: small).
STREAM_BUFFER = 16384
#: Batches the stream tier's reader may run ahead of the step.
STREAM_AHEAD = 8


def to_torch(array) -> torch.Tensor:
    """numpy -> torch without a copy where possible; unsigned and bool widened for torch."""
    a = np.asarray(array)
    if a.dtype.kind == "u" and a.dtype.itemsize > 1:
        a = a.astype(np.int64)
    elif a.dtype.kind == "b":
        a = a.astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(a))


@dataclass(frozen=True)
class ArrayUse:
    """One store array a source reads: its path and whether it reads the batch's replayed
    view (``per_view``) or view 0 (warp, identity-only arrays)."""

    path: str
    per_view: bool

    def nbytes(self, array) -> int:
        """Bytes of the part of ``array`` (a zarr array [N, V, ...]) this use holds."""
        per_row = int(np.prod(array.shape[2:], dtype=np.int64)) * array.dtype.itemsize
        return int(array.shape[0]) * per_row * (int(array.shape[1]) if self.per_view else 1)


#: the environment variable a sweep trial or data-parallel worker finds the number of students
#: running at once on its machine in (``concurrent_students``)
CONCURRENT_STUDENTS_ENV = "KDPIPE_CONCURRENT_STUDENTS"


def concurrent_students() -> int:
    """Students training at once on this machine (set by sweeps and data-parallel runs), 1 alone."""
    try:
        return max(1, int(os.environ.get(CONCURRENT_STUDENTS_ENV, "1")))
    except ValueError:
        return 1


def choose_residency(
    nbytes: int,
    device: torch.device,
    requested: str = "auto",
    budget: int | None = None,
    sharers: int = 1,
    shared: bool = True,
) -> str:
    """``device``, ``shared`` or ``stream`` for ``nbytes`` of targets (see the module docstring;
    ``host`` only when asked for). ``budget`` replaces the measured memory budget (benchmarks
    use it to force the tiers). ``sharers``: students running at once on this machine (sweep
    trials, data-parallel workers): each would hold its own device copy, while the shared copy
    is counted once. ``shared``: whether a shared copy can be made (a local store)."""
    if requested not in RESIDENCY:
        raise KdpipeError(f"--resident must be one of {', '.join(RESIDENCY)}, not {requested!r}.")
    if requested != "auto":
        return requested
    host = host_available_bytes() // 2 if budget is None else budget
    if device.type != "cuda" and int(sharers) > 1 and shared and nbytes <= host:
        # on CPU the "device" is host memory: students side by side map one shared copy (which
        # reads at least as fast as a private gather, benchmarks/target_reader.py)
        return "shared"
    if nbytes * max(1, int(sharers)) <= (memory_budget(device) if budget is None else budget):
        return "device"
    if shared and nbytes <= host:
        return "shared"
    if device.type == "cuda" and nbytes <= host // max(1, int(sharers)):
        return "host"
    return "stream"


def _refuse_nonfinite(path: str, where: str, lo: int | None = None, hi: int | None = None):
    span = f" (samples {lo}..{hi - 1})" if lo is not None and hi is not None else ""
    raise StoreError(
        f"The store array {path}{span} at {where} holds NaN or infinite values; re-extract or re-cluster it."
    )


def check_finite(path: str, block, where: str, lo: int | None = None, hi: int | None = None) -> None:
    t = block if torch.is_tensor(block) else to_torch(block)
    if t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
        _refuse_nonfinite(path, where, lo, hi)


class MemoryRows:
    """The ``device`` and ``host`` tiers: arrays loaded once, one gather per batch."""

    def __init__(self, reader, uses: list[ArrayUse], device: torch.device, tier: str, finite_check: bool = True):
        self.device = device
        self.tier = tier
        self.uses = list(uses)
        self.tensors: dict[str, torch.Tensor] = {}
        self.staging = PinnedStaging(device)
        hold = device if tier == "device" else torch.device("cpu")
        for use in self.uses:
            data = to_torch(load_array(reader, use.path, use.per_view, finite_check))
            self.tensors[use.path] = data.to(hold)

    def begin_epoch(self, plan, batch_size: int) -> None:
        """Nothing to prepare: every row is already in memory."""

    def rows(self, batch) -> dict[str, torch.Tensor]:
        out = {}
        hold = next(iter(self.tensors.values())).device if self.tensors else self.device
        idx = batch.indices.to(hold, non_blocking=True)
        views = batch.view_idx.to(hold, non_blocking=True) if batch.view_idx is not None else None
        self.staging.next_batch()  # host rows are gathered into the other pinned buffers
        for use in self.uses:
            data = self.tensors[use.path]
            if hold != self.device:
                if use.per_view:  # rows (s, v) of [N, V, ...] are rows s * V + v of [N * V, ...]
                    flat = data.reshape((-1,) + tuple(data.shape[2:]))
                    out[use.path] = self.staging.gather(use.path, flat, idx * data.shape[1] + views)
                else:
                    out[use.path] = self.staging.gather(use.path, data, idx)
            else:
                out[use.path] = data[idx, views] if use.per_view else data[idx]
        return out

    def close(self) -> None:
        """Nothing runs in the background; the loaded rows go with the object."""


class SharedRows(MemoryRows):
    """The ``shared`` tier: the rows of the machine's one shared copy
    (``kdpipe.engine.shared_copy.SharedCopy``), gathered on the host and staged to the device."""

    def __init__(self, copy, uses: list[ArrayUse], device: torch.device):
        self.device = device
        self.tier = "shared"
        self.uses = list(uses)
        self.copy = copy
        self.staging = PinnedStaging(device)
        with warnings.catch_warnings():  # read-only maps: torch warns that they are not writable
            warnings.simplefilter("ignore", UserWarning)  # nothing writes them: rows are gathered
            self.tensors = {use.path: to_torch(copy.arrays[use.path]) for use in self.uses}

    def rows(self, batch) -> dict[str, torch.Tensor]:
        out = {}
        idx, views = batch.indices, batch.view_idx
        self.staging.next_batch()
        for use in self.uses:
            data = self.tensors[use.path]
            if use.per_view:
                flat = data.reshape((-1,) + tuple(data.shape[2:]))
                out[use.path] = self.staging.gather(use.path, flat, idx * data.shape[1] + views)
            else:
                out[use.path] = self.staging.gather(use.path, data, idx)
        return out


_END = object()


class StreamRows:
    """The ``stream`` tier: a reader thread per epoch follows the plan's block order."""

    def __init__(
        self,
        reader,
        uses: list[ArrayUse],
        device: torch.device,
        block_rows: int,
        finite_check: bool = True,
        ahead: int = STREAM_AHEAD,
    ):
        self.reader = reader
        self.uses = list(uses)
        self.device = device
        self.block_rows = int(block_rows)
        self.finite_check = finite_check
        self.ahead = int(ahead)
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # -------------------------------------------------------------------- the reader
    def begin_epoch(self, plan, batch_size: int) -> None:
        if plan.blocks is None or plan.block_rank is None:
            raise KdpipeError("Streamed targets need an epoch plan in block order.")
        self.close()
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.ahead)
        self._thread = threading.Thread(
            target=self._produce,
            args=(plan, batch_size, self._queue, self._stop),
            name="kdpipe-target-stream",
            daemon=True,
        )
        self._thread.start()

    def _read_block(self, arrays, lo: int, hi: int, members: np.ndarray, views: np.ndarray) -> dict:
        """The rows of ``members`` (sample indices in [lo, hi)) at ``views``, per array."""
        local = members - lo
        picked = {}
        for use in self.uses:
            block = np.asarray(arrays[use.path][lo:hi])
            if self.finite_check and block.dtype.kind == "f" and not np.isfinite(block).all():
                _refuse_nonfinite(use.path, self.reader.path, lo, hi)
            picked[use.path] = block[local, views] if use.per_view else block[local, 0]
        return picked

    def _produce(self, plan, batch_size, out: queue.Queue, stop: threading.Event) -> None:
        try:
            n_total = int(self.reader.num_samples)
            arrays = {u.path: self.reader.array(u.path) for u in self.uses}
            order = plan.order.numpy()
            view_of = np.zeros(n_total, dtype=np.int64)
            if plan.view_idx is not None:
                view_of[order] = plan.view_idx.numpy()
            in_plan = np.zeros(n_total, dtype=bool)
            in_plan[order] = True
            slot = {}  # sample -> (block rows dict, row position)
            blocks_read = 0
            for batch in plan.batches(batch_size):
                need = int(plan.block_rank[batch.start : batch.stop].max())
                while blocks_read <= need:
                    lo, hi = plan.blocks[blocks_read]
                    hi = min(hi, n_total)
                    members = np.flatnonzero(in_plan[lo:hi]) + lo
                    picked = self._read_block(arrays, lo, hi, members, view_of[members])
                    for pos, m in enumerate(members.tolist()):
                        slot[m] = (picked, pos)
                    blocks_read += 1
                rows = {}
                samples = batch.indices.tolist()
                for use in self.uses:
                    rows[use.path] = to_torch(np.stack([slot[m][0][use.path][slot[m][1]] for m in samples]))
                for m in samples:
                    slot.pop(m, None)
                if stop.is_set():
                    return
                out.put((batch.start, rows))
            out.put(_END)
        except BaseException as err:  # noqa: BLE001 - handed to the training thread
            out.put(err)

    # -------------------------------------------------------------------- the step side
    def rows(self, batch) -> dict[str, torch.Tensor]:
        if self._queue is None:
            raise KdpipeError("Streamed targets were asked for before the epoch began.")
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        if item is _END:
            raise KdpipeError("The target stream ended before the epoch did.")
        start, rows = item
        if start != batch.start:
            raise KdpipeError(f"The target stream is out of step (batch at {start}, step at {batch.start}).")
        pin = self.device.type == "cuda"
        return {k: (v.pin_memory() if pin else v).to(self.device, non_blocking=True) for k, v in rows.items()}

    def close(self) -> None:
        if self._thread is not None:
            if self._queue is None:  # begin_epoch sets both together
                raise KdpipeError("The target stream has a producer thread but no queue.")
            self._stop.set()
            while self._thread.is_alive():
                try:  # unblock a producer waiting on a full queue
                    self._queue.get_nowait()
                except queue.Empty:
                    self._thread.join(timeout=0.05)
            self._thread = None
        self._queue = None
