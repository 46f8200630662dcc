"""Target sources: what the training loop gets as teacher targets for a batch.

One interface, four sources; the loop cannot tell them apart::

    plan = source.plan(sample_indices, seed, epoch)     # kdpipe.engine.plan.EpochPlan
    source.begin_epoch(plan, batch_size)
    for batch in plan.batches(batch_size):               # PlanBatch: indices, view_idx, params
        targets = source.targets(batch, images_normalized, labels)   # {key: tensor}
    source.close()

- ``NoTargets(policy)``: plain training (CE, teachers): fresh random views, no targets.
- ``CachedTargets(reader, kinds, ...)``: targets read from a store.
  * ``mode="replay"`` (the default): each position replays one of the sample's V stored views,
    drawn uniformly per epoch; with every view stored (the default store) this is exactly the
    references' fresh crop+flip, with the targets the teacher gave on that very view (equal to
    the online teacher's up to float16);
  * ``mode="warp"``: fresh random views, the identity view's stored maps warped to them
    (approximate, ReLabel-style; for 1-view stores);
  * rows live on the device, in host memory, in the machine's shared copy or are streamed
    (``kdpipe.engine.rows``).
- ``OnlineTargets(teacher, kinds, ...)``: the teacher runs live on the batch. ``views="fresh"``
  (the default) draws fresh random views, which is what the references train on;
  ``views="replay"`` replays the store's views, for parity checks against cached training.

Targets are computed by the kinds (``kdpipe.targets``): cached ``kind.targets(rows)``, online
``kind.targets(kind.online(teacher outputs))``. They are computed outside autocast, in float32.
Where a kind asks for them (``needs_sample_index``), every source adds the batch's data-set
sample indices as ``targets["sample_index"]`` (int64 [B], on the source's device).
"""

from __future__ import annotations

import numpy as np
import torch

from kdpipe.engine import plan as plans
from kdpipe.engine.row_stream import RowStream, row_readers
from kdpipe.engine.rows import (
    STREAM_BUFFER,
    ArrayUse,
    MemoryRows,
    SharedRows,
    StreamRows,
    choose_residency,
    to_torch,
)
from kdpipe.engine.shared_copy import SharedCopy
from kdpipe.errors import KdpipeError, StoreError
from kdpipe.storage import is_url as storage_is_url
from kdpipe.targets.base import KindContext, TargetKind, TeacherOutputs, needs_stages

__all__ = [
    "TargetSource",
    "NoTargets",
    "CachedTargets",
    "OnlineTargets",
    "VIEW_MODES",
    "ONLINE_VIEWS",
    "resolve_target_set",
    "bind_kinds",
    "kind_context",
    "SAMPLE_INDEX",
    "with_sample_index",
]

VIEW_MODES = ("replay", "warp")
ONLINE_VIEWS = ("fresh", "replay")


def resolve_target_set(reader, target_set: str | None) -> str:
    """The target set to use: the one named, or the store's only complete one."""
    sets = reader.target_sets()
    if target_set is not None:
        if target_set not in sets:
            raise StoreError(
                f"The store at {reader.path} has no complete target set {target_set!r} "
                f"(it has: {', '.join(sets) or 'none'}); run `kdpipe cluster "
                f"{reader.path} --name {target_set}` first."
            )
        return target_set
    if len(sets) == 1:
        return sets[0]
    if not sets:
        raise StoreError(f"The store at {reader.path} has no target set; run `kdpipe cluster` first.")
    raise StoreError(
        f"The store at {reader.path} has several target sets ({', '.join(sets)}); name one with --targets."
    )


def kind_context(reader, kinds, target_set: str | None, device) -> KindContext:
    """The binding context of ``kinds`` on ``reader`` (the target set only when one is needed)."""
    ts = None
    if any(k.needs_target_set for k in kinds):
        ts = reader.target_set(resolve_target_set(reader, target_set))
    return KindContext(
        device=torch.device(device),
        target_set=ts,
        load=lambda path: reader.array(path)[...],
        available=frozenset(reader.array_names()),
    )


def bind_kinds(kinds, ctx: KindContext) -> list[TargetKind]:
    return [k.bind(ctx) for k in kinds]


def _views_table(reader) -> torch.Tensor:
    """The store's view parameters int32 [N, V, P] (small: kept on the host)."""
    return to_torch(reader.array("views")[...]).to(torch.int32)


#: the target key of the batch's sample indices (``TargetKind.needs_sample_index``)
SAMPLE_INDEX = "sample_index"


def with_sample_index(out: dict, kinds, batch, device) -> dict:
    """``out`` plus the batch's sample indices where one of ``kinds`` needs them."""
    if any(getattr(k, "needs_sample_index", False) for k in kinds):
        out[SAMPLE_INDEX] = batch.indices.to(device=device, dtype=torch.int64)
    return out


class TargetSource:
    """Base class: a uniform order and fresh random views, no targets."""

    mode = "none"
    policy = None
    image_sizes = None  # [N, 2] for policies whose views depend on the image size

    def plan(self, indices: torch.Tensor, seed: int, epoch: int) -> plans.EpochPlan:
        order = plans.uniform_order(indices, seed, epoch)
        return plans.EpochPlan(order, plans.fresh_params(self.policy, order, seed, epoch, self.image_sizes))

    def begin_epoch(self, plan, batch_size: int) -> None:
        """Called before an epoch's first batch (the stream tier starts its reader here)."""

    def targets(self, batch, images_normalized: torch.Tensor, labels: torch.Tensor) -> dict:
        return {}

    def close(self) -> None:
        """Stop background readers; the source can be used again after ``begin_epoch``."""


class NoTargets(TargetSource):
    """Plain training: a fresh random view per sample, no targets."""

    def __init__(self, policy, image_sizes=None):
        self.policy = policy
        self.image_sizes = image_sizes


def _replay_plan(
    views_table: torch.Tensor,
    order: torch.Tensor,
    seed: int,
    epoch: int,
    blocks: list | None = None,
    block_rank: np.ndarray | None = None,
) -> plans.EpochPlan:
    view_idx = plans.draw_views(order, views_table.shape[1], seed, epoch)
    return plans.EpochPlan(order, views_table[order, view_idx], view_idx, block_rank=block_rank, blocks=blocks)


class CachedTargets(TargetSource):
    """Targets read from a store (see the module docstring)."""

    def __init__(
        self,
        reader,
        kinds: list[TargetKind],
        target_set: str | None = None,
        device="cpu",
        mode: str = "replay",
        policy=None,
        resident: str = "auto",
        order: str | None = None,
        finite_check: bool = True,
        stream_buffer: int = STREAM_BUFFER,
        budget: int | None = None,
        shared_dir=None,
        sharers: int = 1,
    ):
        if mode not in VIEW_MODES:
            raise KdpipeError(f"--views must be {' or '.join(VIEW_MODES)}, not {mode!r}.")
        self.reader = reader
        self.mode = mode
        self.device = torch.device(device)
        self.policy = policy
        kinds = list(kinds)
        not_stored = [k.name for k in kinds if not k.cacheable]
        if not_stored:
            raise KdpipeError(
                f"The targets {', '.join(not_stored)} are computed online only; train "
                "with --online-teacher or choose stored targets."
            )
        self.kinds = bind_kinds(kinds, kind_context(reader, kinds, target_set, self.device))
        self.uses = self._array_uses()
        self.views_table = _views_table(reader)
        if mode == "warp":
            self._check_identity_view()
        self.resident_bytes = sum(u.nbytes(reader.array(u.path)) for u in self.uses)
        local = not storage_is_url(reader.path)
        self.tier = choose_residency(self.resident_bytes, self.device, resident, budget, sharers, shared=local)
        if order not in (None, "uniform", "blocks"):
            raise KdpipeError(f"The epoch order must be uniform or blocks, not {order!r}.")
        # row-addressable arrays stream in any order: the plan keeps the uniform shuffle
        self.row_readers = row_readers(reader, self.uses) if self.tier == "stream" else None
        self.order = order or ("blocks" if self.tier == "stream" and self.row_readers is None else "uniform")
        self.block_rows = self._block_rows()
        self.stream_buffer = int(stream_buffer)
        self.rows_source: StreamRows | RowStream | MemoryRows
        if self.tier == "stream" and self.row_readers is not None:
            self.rows_source = RowStream(reader, self.uses, self.device, self.row_readers, finite_check)
        elif self.tier == "stream":
            self.rows_source = StreamRows(reader, self.uses, self.device, self.block_rows, finite_check)
        elif self.tier == "shared":
            copy = SharedCopy.open(reader, self.uses, None, shared_dir, finite_check=finite_check)
            self.shared_copy = copy
            self.rows_source = SharedRows(copy, self.uses, self.device)
        else:
            self.rows_source = MemoryRows(reader, self.uses, self.device, self.tier, finite_check)

    # ------------------------------------------------------------------ checks
    def _array_uses(self) -> list[ArrayUse]:
        uses, missing = [], []
        for kind in self.kinds:
            for path, stored in kind.storage.items():
                if not self.reader.has(path):
                    missing.append((kind, path))
                    continue
                per_view = self.mode == "replay" and stored.views == "all"
                uses.append(ArrayUse(path, per_view))
        if missing:
            kind, path = missing[0]
            how = (
                "run `kdpipe cluster` to build it"
                if kind.writer == "cluster"
                else "re-extract the store with it (`kdpipe extract-teacher`, see --cam-res)"
            )
            raise StoreError(
                f"The store at {self.reader.path} lacks {path}, which the {kind.name} targets need; {how}."
            )
        return uses

    def _check_identity_view(self) -> None:
        if self.policy is None:
            raise StoreError(f"Warp needs the store's view policy, which was not given for {self.reader.path}.")
        ident = torch.as_tensor(np.asarray(self.policy.identity()), dtype=torch.int32)
        if not bool((self.views_table[:, 0] == ident).all()):
            raise StoreError(
                f"Warp needs a store whose view 0 is the identity view (--views 1); the store "
                f"at {self.reader.path} holds other views: use --views replay."
            )

    def _block_rows(self) -> int:
        """Samples per streamed block: a whole number of every needed array's chunks."""
        rows = 1
        for use in self.uses:
            arr = self.reader.array(use.path)
            rows = int(np.lcm(rows, int((getattr(arr, "shards", None) or arr.chunks)[0])))
        return rows

    # ------------------------------------------------------------------ interface
    def plan(self, indices, seed, epoch):
        blocks: list | None = None
        ranks: np.ndarray | None = None
        if self.order == "blocks":
            order, blocks, ranks = plans.block_order(indices, self.block_rows, self.stream_buffer, seed, epoch)
        else:
            order = plans.uniform_order(indices, seed, epoch)
        if self.mode == "replay":
            return _replay_plan(self.views_table, order, seed, epoch, blocks=blocks, block_rank=ranks)
        params = plans.fresh_params(self.policy, order, seed, epoch, self.image_sizes)
        return plans.EpochPlan(order, params, None, block_rank=ranks, blocks=blocks)

    def begin_epoch(self, plan, batch_size):
        self.rows_source.begin_epoch(plan, batch_size)

    def targets(self, batch, images_normalized=None, labels=None) -> dict:
        rows = self.rows_source.rows(batch)
        out: dict = {}
        params = batch.params.to(self.device) if self.mode == "warp" else None
        for kind in self.kinds:
            own = {p: rows[p] for p in kind.arrays()}
            if params is not None:
                own = kind.warp(own, self.policy, params)
            out.update(kind.targets(own))
        return with_sample_index(out, self.kinds, batch, self.device)

    def close(self):
        self.rows_source.close()


class OnlineTargets(TargetSource):
    """The teacher live on the student's batch (see the module docstring)."""

    mode = "online"

    def __init__(
        self,
        teacher,
        kinds: list[TargetKind],
        reader=None,
        target_set: str | None = None,
        device="cpu",
        policy=None,
        views: str = "fresh",
    ):
        if views not in ONLINE_VIEWS:
            raise KdpipeError(f"Online views must be {' or '.join(ONLINE_VIEWS)}, not {views!r}.")
        self.device = torch.device(device)
        self.teacher = teacher.to(self.device).eval()
        self.policy = policy
        self.views = views
        kinds = list(kinds)
        needs_store = any(k.needs_target_set for k in kinds) or views == "replay"
        if needs_store and reader is None:
            raise KdpipeError(
                "Online letKD targets (and replayed views) need the store (--store): "
                "its target set holds the centres, the LDA and the score matrix."
            )
        ctx = (
            kind_context(reader, kinds, target_set, self.device)
            if reader is not None
            else KindContext(device=self.device)
        )
        self.kinds = bind_kinds(kinds, ctx)
        self.views_table = _views_table(reader) if views == "replay" else None

    def plan(self, indices, seed, epoch):
        if self.views == "replay":
            if self.views_table is None:  # set in __init__ whenever views == "replay"
                raise KdpipeError("Replayed views need the store's view table; none was read.")
            return _replay_plan(self.views_table, plans.uniform_order(indices, seed, epoch), seed, epoch)
        return super().plan(indices, seed, epoch)

    @torch.no_grad()
    def targets(self, batch, images_normalized, labels=None) -> dict:
        out = TeacherOutputs.of(
            self.teacher, images_normalized.to(self.device), labels, stages=needs_stages(self.kinds)
        )
        result: dict = {}
        for kind in self.kinds:
            result.update(kind.online_targets(out))
        return with_sample_index(result, self.kinds, batch, self.device)
