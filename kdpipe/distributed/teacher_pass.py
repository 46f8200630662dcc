"""The teacher pass: run a teacher over a store's samples and views, shard by shard, and write
the rows of a list of target kinds. ``extract-teacher`` runs it with the extraction kinds
(logits, CAMs, raw features); ``cluster``'s assignment pass runs it with letKD's kinds
(penultimate top-k, sub-class index) bound to the freshly fitted target set.

One ``TeacherPassWorker`` per Ray actor (or one in-process: ``kdpipe.distributed.executor``)
loads the teacher and the data set once; per shard it reads the view parameters of its rows
from the store, applies each view to its images (``policy.apply_images``), normalises, runs
the teacher under ``torch.inference_mode``, lets every kind compute its rows
(``kind.online``), casts them to the store's dtype (refusing NaN and float16 overflow), writes
them, and marks the shard done in the pass's own done array. Kinds whose arrays hold the
identity view only (raw features) take the identity view's outputs: from the views already
run when the identity view is one of them, else from one more forward pass.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from kdpipe import storage
from kdpipe.distributed.executor import KillWorkerOnce, WorkerLost, run_shards
from kdpipe.errors import DataError, KdpipeError, StoreError
from kdpipe.runs.paths import absolute_spec
from kdpipe.targets.base import KindContext, TargetKind, TeacherOutputs, needs_stages

__all__ = ["PassSpec", "TeacherPassWorker", "rows_to_storage", "identity_column", "absolute_spec", "probe_rows"]


def identity_column(table: np.ndarray, identity: np.ndarray) -> int | None:
    """The column j where every sample's view j is the identity view, or None."""
    hits = (table == np.asarray(identity)[None, None, :]).all(axis=2).all(axis=0)
    cols = np.flatnonzero(hits)
    return int(cols[0]) if cols.size else None


def rows_to_storage(path: str, rows: torch.Tensor, dtype: str) -> np.ndarray:
    """A kind's rows cast to the store's dtype; NaN or float16 overflow is one sentence."""
    if np.dtype(dtype).kind == "f":
        out = rows.to(torch.float16 if dtype == "float16" else torch.float32).cpu().numpy()
        if not np.isfinite(out).all():
            raise KdpipeError(
                f"The teacher's {path} is NaN or beyond float16 range (|x| > 65504) for some "
                "images; check the checkpoint and the data normalisation."
            )
        return out.astype(dtype, copy=False)
    return rows.cpu().numpy().astype(dtype)


def probe_rows(kinds, teacher, images_normalized, labels) -> dict[str, tuple]:
    """Row shapes ``{path: shape}`` of the kinds' arrays, from the teacher on a few images."""
    with torch.inference_mode():
        out = TeacherOutputs.of(teacher, images_normalized, labels, stages=needs_stages(kinds))
        return {p: tuple(int(s) for s in r.shape[1:]) for k in kinds for p, r in k.online(out).items()}


@dataclass
class PassSpec:
    """Everything a worker needs (picklable: it travels to Ray actors)."""

    store: str
    teacher: str
    arch: str
    data: str
    split: str
    num_classes: int
    kinds: list
    batch_size: int = 256
    device: str | None = None
    fingerprint: str | None = None
    pad_mode: str | None = None
    identity_index: int | None = None
    done_array: str = "shards_done"
    target_set: str | None = None
    extra: dict = field(default_factory=dict)
    #: the driver's fsspec options (endpoints, credentials): a worker on another node reaches
    #: the same s3:// or gs:// URLs with them (``kdpipe.storage.options``)
    storage_options: dict = field(default_factory=storage.options)


class TeacherPassWorker:
    """Loads the teacher and the data set once; ``run(shard)`` writes that shard's rows."""

    def __init__(self, spec: PassSpec):
        from kdpipe.artifacts import StoreWriter, open_store
        from kdpipe.data import load_dataset
        from kdpipe.engine.device import resolve_device
        from kdpipe.models import load_teacher
        from kdpipe.views import with_pad_mode

        storage.apply_options(spec.storage_options)
        self.spec = spec
        self.device = resolve_device(spec.device)
        self.model = load_teacher(spec.arch, spec.teacher, spec.num_classes).to(self.device).eval()
        self.dataset = load_dataset(spec.data, spec.split)
        if spec.fingerprint is not None and self.dataset.fingerprint != spec.fingerprint:
            raise DataError(
                f"The data set {spec.data} read by this pass (fingerprint {str(self.dataset.fingerprint)[:12]}) "
                f"is not the one the store at {spec.store} records (fingerprint {spec.fingerprint[:12]}); "
                "pass the store's data set (on a cluster, every node must reach the same files)."
            )
        self.policy = with_pad_mode(self.dataset.policy, spec.pad_mode)
        self.labels = torch.as_tensor(np.asarray(self.dataset.labels), dtype=torch.int64)
        self.writer = StoreWriter.open(spec.store)
        reader = open_store(spec.store, allow_incomplete=True)
        ts = reader.target_set(spec.target_set, include_incomplete=True) if spec.target_set else None
        ctx = KindContext(
            device=self.device,
            target_set=ts,
            load=lambda p: reader.array(p)[...],
            available=frozenset(reader.array_names()),
        )
        self.kinds: list[TargetKind] = [k.bind(ctx) for k in spec.kinds]
        self.storage = {p: s for k in self.kinds for p, s in k.storage.items()}

    def _forward(self, images, params, labels) -> TeacherOutputs:
        x = images.to(self.device, non_blocking=True)  # uint8 first: 4x less to move
        x = self.policy.apply_images(x, params.to(self.device))
        from kdpipe.data import normalize

        x = normalize(x, self.dataset.mean, self.dataset.std)
        return TeacherOutputs.of(self.model, x, labels.to(self.device), stages=needs_stages(self.kinds))

    def _collect(self, out: TeacherOutputs, kinds, into: dict, rows: slice, total: int) -> None:
        for kind in kinds:
            for path, value in kind.online(out).items():
                block = rows_to_storage(path, value, self.storage[path].dtype)
                if path not in into:
                    into[path] = np.empty((total,) + block.shape[1:], dtype=block.dtype)
                into[path][rows] = block

    @torch.inference_mode()
    def compute(self, images: torch.Tensor, params: np.ndarray, labels: torch.Tensor) -> dict:
        """Rows of every kind for images [b, 3, H, W] uint8 under views params [b, V, P]:
        ``{path: array [b, V, ...]}`` (identity-only arrays: [b, 1, ...])."""
        b, v = params.shape[:2]
        per_view = [k for k in self.kinds if all(s.views == "all" for s in k.storage.values())]
        identity = [k for k in self.kinds if k not in per_view]
        flat = torch.from_numpy(np.ascontiguousarray(params.reshape(b * v, -1)))
        sample_of = torch.arange(b * v) // v
        out: dict = {}
        ident_out: dict = {}
        j = self.spec.identity_index
        for s in range(0, b * v, self.spec.batch_size):
            rows = slice(s, min(s + self.spec.batch_size, b * v))
            teacher_out = self._forward(images[sample_of[rows]], flat[rows], labels[sample_of[rows]])
            self._collect(teacher_out, per_view, out, rows, b * v)
            if identity and j is not None:
                pos = torch.arange(rows.start, rows.stop)
                keep = (pos % v) == j
                if bool(keep.any()):
                    picked = teacher_out.select(keep)
                    samples = pos[keep] // v
                    self._collect(picked, identity, ident_out, slice(int(samples[0]), int(samples[-1]) + 1), b)
        if identity and j is None:
            ident = torch.from_numpy(self.policy.identity()[None].repeat(b, 0))
            for s in range(0, b, self.spec.batch_size):
                rows = slice(s, min(s + self.spec.batch_size, b))
                self._collect(self._forward(images[rows], ident[rows], labels[rows]), identity, ident_out, rows, b)
        result = {k: a.reshape((b, v) + a.shape[1:]) for k, a in out.items()}
        result.update({k: a.reshape((b, 1) + a.shape[1:]) for k, a in ident_out.items()})
        return result

    def run(self, shard) -> dict:
        t0 = time.perf_counter()
        params = np.asarray(self.writer.array("views")[shard.start : shard.stop])
        indices = np.arange(shard.start, shard.stop)
        images = self.dataset.get_batch(indices)
        labels = self.labels[indices]
        t1 = time.perf_counter()
        outputs = self.compute(images, params, labels)
        t2 = time.perf_counter()
        stats = {}
        for kind in self.kinds:
            stats.update(kind.row_stats({p: outputs[p] for p in kind.arrays()}))
        for path, block in outputs.items():
            self.writer.write_rows(path, shard.start, block)
        self.writer.mark_shard_done(shard.shard_id, self.spec.done_array)
        t3 = time.perf_counter()
        return {
            "shard": shard.shard_id,
            "samples": shard.size,
            "images": int(params.shape[0] * params.shape[1]),
            "read_s": t1 - t0,
            "compute_s": t2 - t1,
            "write_s": t3 - t2,
            "pid": os.getpid(),
            "stats": stats,
        }


# ------------------------------------------------------------------------------ running a pass
def run_pass(
    writer,
    spec: PassSpec,
    todo,
    cfg,
    desc: str,
    unit_scale: int,
    progress: bool,
    on_result=None,
    fault: KillWorkerOnce | None = None,
    quick_trial: str | None = None,
) -> tuple[list, float]:
    """Run the teacher pass over the shards ``todo``; on failure leave the store resumable and
    say so in one sentence. Returns (per-shard results, seconds)."""
    t0 = time.perf_counter()
    try:
        results = run_shards(
            TeacherPassWorker,
            {"spec": spec},
            todo,
            executor=cfg.executor,
            num_workers=cfg.num_workers,
            ray_address=cfg.ray_address,
            desc=desc,
            unit="img",
            progress=progress,
            unit_scale=unit_scale,
            on_result=on_result,
            fault=fault,
            quick_trial=quick_trial,
        )
    except BaseException as err:
        _fail_resumable(writer, spec, err)
        raise
    return results, time.perf_counter() - t0


def _fail_resumable(writer, spec: PassSpec, err: BaseException) -> None:
    """Turn a failed pass into one sentence that says how far it got and how to resume."""
    try:
        count = f"{len(writer.done_shards(spec.done_array))} of {writer.array(spec.done_array).shape[0]} shards written"
        if spec.done_array == "shards_done":
            writer.mark_incomplete()
    except Exception:  # noqa: BLE001 - the disk may still be full; the flag is already false
        count = "some shards written"
    if isinstance(err, KeyboardInterrupt):  # Ctrl-C: one kdpipe line, not Ray's retries and a traceback
        raise StoreError(
            f"The teacher pass was interrupted; the store at {writer.path} is incomplete ({count}): "
            "the same command with --resume continues it."
        ) from None
    if isinstance(err, WorkerLost):
        raise StoreError(
            f"{err}, so the store at {writer.path} is incomplete ({count}); resume it with --resume."
        ) from None
    if isinstance(err, OSError) and not isinstance(err, KdpipeError):
        reason = err.strerror or str(err) or type(err).__name__
        raise StoreError(
            f"Writing the store at {writer.path} failed ({reason}); it is incomplete ({count}) and "
            "can be resumed with --resume once that is fixed."
        ) from None


def pass_summary(results: list, seconds: float, executor: str) -> dict:
    """Throughput of a teacher pass: images/s overall and per busiest worker, compute/write time."""
    images = sum(r["images"] for r in results)
    busy: dict = {}
    for r in results:
        busy[r.get("pid")] = busy.get(r.get("pid"), 0.0) + r["read_s"] + r["compute_s"] + r["write_s"]
    busiest = max(busy.values()) if busy else 0.0
    return {
        # images / the busiest worker's time in run(): throughput without worker start-up
        "busy_img_per_s": round(images / busiest, 2) if busiest > 0 and images else None,
        "samples_processed": int(sum(r["samples"] for r in results)),
        "images_processed": int(images),
        "shard_seconds": round(seconds, 3),
        "img_per_s": round(images / seconds, 2) if seconds > 0 and images else None,
        "compute_s": round(sum(r["compute_s"] for r in results), 3),
        "write_s": round(sum(r["write_s"] for r in results), 3),
        "executor": executor,
    }
