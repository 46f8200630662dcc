"""Stage one, second half: ``kdpipe cluster`` = letKD's fit, then an assignment pass.

**Fit**, on the stored identity-view features (``feat/penult``, ``feat/inter`` [N, 1, D, h, w]:
the un-augmented training images, which is what the letKD reference fits on), every location
vector by default (``max_fit_points`` subsamples, seeded, for users who accept it):

* penultimate: faiss K-means with ``k_penult`` centres (``kdpipe.methods.letkd.fit.clustering.kmeans``);
  the stored k is the smallest that holds ``topk_mass`` of ``softmax_K(-T * ||f - rho||^2)``
  at every fit vector, capped by ``topk`` (``kdpipe.methods.letkd.topk_for_mass``);
* intermediate: LDA on the vectors labelled with their image's class (streamed over shards,
  sklearn's eigen solver exactly: ``kdpipe.methods.letkd.fit.lda``), the first ``lda_dims`` components
  (default: the reference's count, ``reference_lda_dims``); per class a K-means with
  ``k_inter`` centres on the projected vectors; each fit vector's label-constrained nearest
  centre; prototypes (mean of each sub-class's vectors) and the score matrix S.

**Assignment pass**: the teacher (``teacher``, by default the checkpoint the store records,
refused unless its sha256 is the store's) runs over every stored view, on Ray actors or
in-process like extraction (``kdpipe.distributed.teacher_pass``), and writes only the compact
targets of letKD's kinds (``kdpipe.targets.PenultTopk``, ``InterSubclass``): raw features of
augmented views are never read or written. Shards done are recorded in the set's own
``shards_done``; ``resume`` continues an interrupted pass after its fit.

Store layout written (``targets/<name>/``; N samples, V views, C classes; grids after the
``student_grid`` pooling; the settings and fit statistics are the typed record
``kdpipe.artifacts.target_set.TargetSet``, read with ``reader.target_set(name)``):

====================  ======================  ========  ===========================================
array                 shape                   dtype     meaning
====================  ======================  ========  ===========================================
penult_centers        [K_penult, Dp]          float32   K-means centres rho_k of the penult vectors
penult_topk_idx       [N, V, hp, wp, k]       int16*    indices of the k most probable centres
penult_topk_val       [N, V, hp, wp, k]       float16   their probabilities under the softmax over
                                                        all K (not renormalised: their sum is the
                                                        retained mass the record reports)
lda_scalings          [Di, Di]                float32   sklearn ``scalings_`` (eigen solver)
lda_xbar              [Di]                    float32   sklearn ``xbar_``
subclass_centers      [C*K_inter, d]          float32   per-class K-means centres (row c*K + k)
subclass_prototypes   [C*K_inter, d]          float32   mean projected vector of each sub-class
subclass_scores       [C*K_inter, C*K_inter]  float32   S: row a = share of sub-class a's fit
                                                        vectors whose nearest prototype is b
subclass_idx          [N, V, hi, wi]          int16*    label-constrained sub-class y*K + k*
shards_done           [S]                     uint8     the assignment pass's finished shards
retained_mass         [S, 3]                  float64   per shard: min, sum and count of the mass
====================  ======================  ========  ===========================================

``*`` int16 when the index range fits, else int32.

K-means runs on faiss or torch (``kmeans_backend``, ``--kmeans-backend``; the one used is
recorded in the target set's ``extra.kmeans_backend``). Seeds: K-means uses ``seed``, class
c's ``seed + c``; subsamples (only with ``max_fit_points``) ``seed`` and ``seed + 1``. Same
store and settings -> identical arrays.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from kdpipe import storage
from kdpipe.artifacts.target_set import TargetSet
from kdpipe.config.configs import ClusterConfig, check_executor
from kdpipe.errors import KdpipeError, StoreError
from kdpipe.methods.letkd.fit.clustering import resolve_kmeans_backend
from kdpipe.methods.letkd.kinds import InterSubclass, PenultTopk
from kdpipe.runs.paths import absolute_path
from kdpipe.targets import KindContext

if TYPE_CHECKING:
    from kdpipe.artifacts import StoreReader, StoreWriter
    from kdpipe.methods.letkd.fit.lda import LDAStats

__all__ = ["cluster", "plot_subclasses", "parse_grid", "reference_lda_dims", "REFERENCE_LDA_DIMS"]

PENULT = "feat/penult"
INTER = "feat/inter"
# letKD-framework keeps 60 LDA components (its CIFAR-100 sub-class files are named
# centers_subclass_8_60.npy, e.g. experiments/LDA/CIFAR100/resnetv1/RN32x4_downscale/).
REFERENCE_LDA_DIMS = 60


def reference_lda_dims(num_classes: int, dim: int) -> int:
    """The reference's LDA component count, within what LDA can give (C - 1 and D)."""
    return int(min(REFERENCE_LDA_DIMS, num_classes - 1, dim))


def parse_grid(grid) -> tuple[int, int] | None:
    """'4x4' / '4' / (4, 4) / None -> (H, W) or None."""
    if grid is None or grid == "":
        return None
    if isinstance(grid, str):
        try:
            vals = [int(p) for p in grid.lower().replace(" ", "").split("x")]
        except ValueError:
            raise KdpipeError(f"A student grid is HxW (e.g. 4x4), not {grid!r}.") from None
    else:
        vals = [int(v) for v in grid]
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or min(vals) < 1:
        raise KdpipeError(f"A student grid is HxW with positive sizes (e.g. 4x4), not {grid!r}.")
    return int(vals[0]), int(vals[1])


def _pooled_maps(block: np.ndarray, grid) -> torch.Tensor:
    """[n, V, D, h, w] float16 -> float32 [n*V, D, h', w']."""
    n, v, d, h, w = block.shape
    t = torch.from_numpy(np.ascontiguousarray(block)).float().reshape(n * v, d, h, w)
    if grid is not None and tuple(grid) != (h, w):
        t = F.adaptive_avg_pool2d(t, grid)
    return t


def _vectors(block: np.ndarray, grid) -> np.ndarray:
    """[n, V, D, h, w] float16 -> [n*V*h'*w', D] float32 in (n, v, y, x) order."""
    return _pooled_maps(block, grid).permute(0, 2, 3, 1).reshape(-1, block.shape[2]).numpy()


def _local(sel: np.ndarray | None, lo: int, hi: int) -> np.ndarray | None:
    """Indices of the global selection ``sel`` in [lo, hi), made local; None = all of them."""
    if sel is None:
        return None
    a, b = np.searchsorted(sel, [lo, hi])
    return sel[a:b] - lo


# --------------------------------------------------------------------------- the fit's map step
@dataclass(frozen=True)
class FitShard:
    """A contiguous sample range [start, stop) and the local indices of the fit subsamples in
    it (None = every vector)."""

    shard_id: int
    start: int
    stop: int
    sel_p: np.ndarray | None = None
    sel_i: np.ndarray | None = None

    @property
    def size(self) -> int:
        return self.stop - self.start


class FitWorker:
    """LDA statistics of a shard's inter vectors, and its fit vectors (penult and inter)."""

    def __init__(self, path, labels, grid, num_classes, views, storage_options=None):
        from kdpipe.artifacts import open_store

        storage.apply_options(storage_options)  # the driver's fsspec options (s3:// endpoints, ...)
        self.reader = open_store(path)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.grid = grid
        self.num_classes = int(num_classes)
        self.views = views  # slice of the feature arrays' view axis used by the fit

    def run(self, shard: FitShard) -> dict:
        from kdpipe.methods.letkd.fit.lda import LDAStats

        a, b = shard.start, shard.stop
        xi = _vectors(self.reader[INTER][a:b, self.views], self.grid)
        yi = np.repeat(self.labels[a:b], xi.shape[0] // max(b - a, 1))
        stats = LDAStats(self.num_classes, xi.shape[1]).update(xi, yi)
        out = {
            "lda": stats.to_arrays(),
            "inter_x": xi if shard.sel_i is None else xi[shard.sel_i],
            "inter_y": yi if shard.sel_i is None else yi[shard.sel_i],
        }
        del xi
        xp = _vectors(self.reader[PENULT][a:b, self.views], self.grid)
        out["penult_x"] = xp if shard.sel_p is None else xp[shard.sel_p]
        return out


# --------------------------------------------------------------------------- planning
@dataclass
class ClusterPlan:
    """Everything the fit and the assignment pass need, checked up front."""

    cfg: ClusterConfig
    writer: StoreWriter
    reader: StoreReader
    labels: np.ndarray
    num_classes: int
    grid: tuple | None
    penult_grid: tuple
    inter_grid: tuple
    fit_views: slice
    teacher: str
    data: str
    lda_dims: int
    topk_cap: int
    resume_assign: bool = False
    seconds: dict = field(default_factory=dict)

    @property
    def path(self) -> str:
        return self.writer.path

    @property
    def name(self) -> str:
        return self.cfg.name


def _check_options(cfg: ClusterConfig) -> None:
    if not cfg.name or "/" in cfg.name:
        raise KdpipeError(f"A target set name must be a non-empty name without '/', not {cfg.name!r}.")
    for val, what in (
        (cfg.k_penult, "--k-penult"),
        (cfg.k_inter, "--k-inter"),
        (cfg.topk, "--topk"),
        (cfg.niter, "--niter"),
        (cfg.batch_size, "--batch-size"),
    ):
        if int(val) < 1:
            raise KdpipeError(f"{what} must be at least 1, got {val}.")
    if not cfg.temperature > 0:
        raise KdpipeError(f"--temperature must be positive, got {cfg.temperature}.")
    if not 0 < cfg.topk_mass <= 1:
        raise KdpipeError(f"--topk-mass must lie in (0, 1], got {cfg.topk_mass}.")
    if cfg.max_fit_points is not None and int(cfg.max_fit_points) < 1:
        raise KdpipeError(f"--max-fit-points must be at least 1, got {cfg.max_fit_points}.")
    if cfg.fit_views not in ("identity", "all"):
        raise KdpipeError(f"--fit-views must be identity or all, not {cfg.fit_views!r}.")
    resolve_kmeans_backend(cfg.kmeans_backend, cfg.device)  # a bad name or a missing faiss: one sentence
    if cfg.resume and cfg.overwrite:
        raise KdpipeError("--resume and --overwrite exclude each other: continue the target set or replace it.")
    check_executor(cfg.executor)
    if cfg.executor == "ray":
        storage.refuse_in_process_only(
            [cfg.store, cfg.teacher, (cfg.data or "").split(":", 1)[-1]], "Ray workers (--executor ray)"
        )


def _store_labels(reader) -> np.ndarray:
    if not reader.has("labels"):
        raise StoreError(f"The store at {reader.path} has no labels array; re-extract it with this kdpipe.")
    labels = np.asarray(reader["labels"][...], dtype=np.int64).reshape(-1)
    num_classes = reader.manifest.dataset.num_classes
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise StoreError(f"The store at {reader.path} has labels outside 0..{num_classes - 1}.")
    return labels


def _feature_inputs(cfg, reader, grid) -> tuple[slice, tuple, tuple]:
    """The view slice the fit reads and the penult / inter grids; refuses what cannot work."""
    missing = [a for a in (PENULT, INTER) if not reader.has(a)]
    if missing:
        dropped = " (they were dropped by --drop-features)" if reader.manifest.features_dropped else ""
        raise StoreError(
            f"The store at {reader.path} has no {' and '.join(missing)}{dropped}; cluster needs the "
            "teacher's penult and inter feature maps, so re-extract it with --features penult,inter."
        )
    fp, fi = reader[PENULT], reader[INTER]
    for arr, layer in ((fp, "penult"), (fi, "inter")):
        h, w = arr.shape[-2:]
        if grid is not None and (grid[0] > h or grid[1] > w):
            raise KdpipeError(
                f"The student grid {grid[0]}x{grid[1]} is larger than the teacher's {layer} map "
                f"{h}x{w}; pooling only shrinks."
            )
    stored_views = reader.manifest.views.feature_views
    if cfg.fit_views == "all" and stored_views != "all":
        raise KdpipeError(
            f"--fit-views all needs features of every view, but the store at {reader.path} holds "
            "the identity view only; re-extract with --feature-views all."
        )
    if cfg.fit_views == "identity" and stored_views == "all":
        j = reader.manifest.views.identity_index
        if j is None:
            raise KdpipeError(
                f"The store at {reader.path} does not hold the identity view's features; use --fit-views all."
            )
        views = slice(int(j), int(j) + 1)
    else:
        views = slice(None)
    return views, grid or tuple(fp.shape[-2:]), grid or tuple(fi.shape[-2:])


def _teacher_path(cfg, reader) -> str:
    path = cfg.teacher or reader.manifest.teacher.path
    if not path:
        raise StoreError(f"The store at {reader.path} records no teacher checkpoint path; pass --teacher.")
    if not storage.isfile(path):
        raise KdpipeError(
            f"The teacher checkpoint {path} does not exist; pass --teacher with the checkpoint the store was made with."
        )
    reader.check_teacher(path)
    return absolute_path(path)


def _check_data(reader, data: str) -> None:
    """Refuse a data set other than the store's (--data, or an edited manifest) before any work."""
    from kdpipe.data import load_dataset

    reader.check_dataset(load_dataset(data, reader.manifest.dataset.split))


def _recorded_options(cfg: ClusterConfig, attrs: dict) -> dict:
    """option -> (the value given now, the value the interrupted pass was fitted with), for
    every option that changes the fit or the targets (ClusterConfig field names)."""
    extra = attrs.get("extra") or {}
    grid = attrs.get("student_grid")
    pairs = {
        "k_penult": (int(cfg.k_penult), attrs.get("k_penult")),
        "k_inter": (int(cfg.k_inter), attrs.get("k_inter")),
        "topk": (int(min(cfg.topk, cfg.k_penult)), attrs.get("topk_cap")),
        "topk_mass": (float(cfg.topk_mass), attrs.get("topk_mass")),
        "temperature": (float(cfg.temperature), attrs.get("temperature")),
        "student_grid": (parse_grid(cfg.student_grid), tuple(grid) if grid else None),
        "max_fit_points": (cfg.max_fit_points, attrs.get("max_fit_points")),
        "fit_views": (cfg.fit_views, attrs.get("fit_views")),
        "seed": (int(cfg.seed), attrs.get("seed")),
        "niter": (int(cfg.niter), attrs.get("kmeans_niter")),
    }
    if cfg.lda_dims is not None:
        pairs["lda_dims"] = (int(cfg.lda_dims), attrs.get("lda_dims"))
    if cfg.kmeans_backend != "auto" and extra.get("kmeans_backend"):
        pairs["kmeans_backend"] = (cfg.kmeans_backend, extra.get("kmeans_backend"))
    if extra.get("assign_batch_size") is not None:  # the teacher's float16 outputs depend on it
        pairs["batch_size"] = (int(cfg.batch_size), extra.get("assign_batch_size"))
    return pairs


def _check_resume_options(cfg: ClusterConfig, attrs: dict, given) -> None:
    """--resume continues the pass as it was fitted: options that differ from it (among
    ``given``, the ones the user typed; every option when None) are refused, naming them."""
    pairs = _recorded_options(cfg, attrs)
    differ = [k for k, (now, then) in pairs.items() if (given is None or k in given) and now != then]
    if differ:
        listed = ", ".join(f"--{k.replace('_', '-')} {pairs[k][0]} (fitted with {pairs[k][1]})" for k in differ)
        raise KdpipeError(
            f"--resume continues the target set {cfg.name!r} as it was fitted; these options differ from "
            f"it: {listed}; leave them out, or pass --overwrite to fit it again."
        )


def _existing_set(cfg, writer, reader, given=None) -> bool:
    """Handle a target set of the same name: refuse, replace, or resume its assignment pass.
    Returns True when the assignment pass is resumed (its fit is kept)."""
    existing = reader.manifest.targets.get(cfg.name)
    if existing is None:
        if cfg.resume:
            raise StoreError(f"The store at {writer.path} has no target set {cfg.name!r} to resume.")
        return False
    if existing.complete and not cfg.overwrite:
        raise StoreError(
            f"The store at {writer.path} already has a target set {cfg.name!r}; pass --overwrite to "
            "replace it or choose another --name."
        )
    if cfg.resume and (existing.attrs.get("extra") or {}).get("fit_done"):
        _check_resume_options(cfg, existing.attrs, given)
        return True
    writer.delete_target_set(cfg.name)  # replaced (--overwrite) or left incomplete by an interrupted run
    return False


def _prepare(cfg: ClusterConfig, given=None) -> ClusterPlan:
    from kdpipe.artifacts import StoreWriter, open_store

    _check_options(cfg)
    writer = StoreWriter.open_for_targets(cfg.store)
    reader = open_store(writer.path)
    grid = parse_grid(cfg.student_grid)
    fit_views, penult_grid, inter_grid = _feature_inputs(cfg, reader, grid)
    labels = _store_labels(reader)
    num_classes = reader.manifest.dataset.num_classes
    dim_inter = int(reader[INTER].shape[2])
    if cfg.lda_dims is not None and not 1 <= int(cfg.lda_dims) <= min(num_classes - 1, dim_inter):
        raise KdpipeError(
            f"--lda-dims must lie in 1..{min(num_classes - 1, dim_inter)} (classes - 1, inter "
            f"feature size), got {cfg.lda_dims}."
        )
    teacher = _teacher_path(cfg, reader)
    data = cfg.data or reader.manifest.dataset.spec
    if not data:
        raise StoreError(f"The store at {reader.path} does not record its data set; pass --data.")
    _check_data(reader, data)
    resume = _existing_set(cfg, writer, reader, given)
    return ClusterPlan(
        cfg=cfg,
        writer=writer,
        reader=open_store(writer.path),
        labels=labels,
        num_classes=num_classes,
        grid=grid,
        penult_grid=tuple(penult_grid),
        inter_grid=tuple(inter_grid),
        fit_views=fit_views,
        teacher=teacher,
        data=data,
        lda_dims=int(cfg.lda_dims or reference_lda_dims(num_classes, dim_inter)),
        topk_cap=int(min(cfg.topk, cfg.k_penult)),
        resume_assign=resume,
    )


# --------------------------------------------------------------------------- the fit
#: (sample, view) pairs drawn (seeded) to check the top-k width on augmented views.
PROBE_VIEWS = 1024


def _augmented_vectors(plan: ClusterPlan, count: int) -> np.ndarray:
    """Penultimate location vectors [n, D] of ``count`` seeded random (sample, view) pairs of
    the store, from the teacher run now (pooled to the target set's grid)."""
    from kdpipe.data import load_dataset, normalize
    from kdpipe.models import load_teacher
    from kdpipe.targets import pool_to
    from kdpipe.views import with_pad_mode

    r = plan.reader
    manifest = r.manifest
    dataset = load_dataset(plan.data, manifest.dataset.split)
    policy = with_pad_mode(dataset.policy, manifest.views.pad_mode)
    teacher = load_teacher(manifest.teacher.arch, plan.teacher, plan.num_classes).eval()
    rng = np.random.default_rng(plan.cfg.seed + 2)
    count = min(int(count), r.num_samples * r.num_views)
    samples = np.sort(rng.choice(r.num_samples, size=count, replace=count > r.num_samples))
    views = rng.integers(0, r.num_views, size=count)
    uniq, inverse = np.unique(samples, return_inverse=True)
    table = np.asarray(r["views"].get_orthogonal_selection((uniq, slice(None))))
    out = []
    with torch.inference_mode():
        for s in range(0, count, 256):
            idx = slice(s, s + 256)
            params = torch.from_numpy(table[inverse[idx], views[idx]])
            x = normalize(policy.apply_images(dataset.get_batch(samples[idx]), params), dataset.mean, dataset.std)
            feat = pool_to(teacher.forward_features(x)[1]["penult"].float(), plan.penult_grid)
            out.append(feat.permute(0, 2, 3, 1).reshape(-1, feat.shape[1]).numpy())
    return np.concatenate(out)


def _fit_shards(plan: ClusterPlan) -> list[FitShard]:
    from kdpipe.artifacts.schema import plan_shards
    from kdpipe.methods.letkd.fit.clustering import subsample_indices

    r, cfg = plan.reader, plan.cfg
    n = r.num_samples
    views = int(r[PENULT][:1, plan.fit_views].shape[1])
    per_p = views * plan.penult_grid[0] * plan.penult_grid[1]
    per_i = views * plan.inter_grid[0] * plan.inter_grid[1]
    sel_p = subsample_indices(n * per_p, cfg.max_fit_points, cfg.seed)
    sel_i = subsample_indices(n * per_i, cfg.max_fit_points, cfg.seed + 1)
    shards = plan_shards(n, r.manifest.shard_size)
    return [
        FitShard(i, a, b, _local(sel_p, a * per_p, b * per_p), _local(sel_i, a * per_i, b * per_i))
        for i, (a, b) in enumerate(shards)
    ]


@dataclass
class _FitVectors:
    """What the fit's map step gathered: merged LDA statistics, penult and inter vectors."""

    lda_stats: LDAStats
    penult_x: np.ndarray
    inter_x: np.ndarray
    inter_y: np.ndarray


@dataclass
class _Subclasses:
    """letKD's intermediate fit: LDA, per-class centres, prototypes and the score matrix S."""

    scalings: np.ndarray
    xbar: np.ndarray
    lda_ridge: float
    centers: np.ndarray
    prototypes: np.ndarray
    scores: np.ndarray
    empty: np.ndarray
    num_points: int


def _read_fit_vectors(plan: ClusterPlan, progress: bool) -> _FitVectors:
    from kdpipe.distributed.executor import run_shards
    from kdpipe.methods.letkd.fit.lda import LDAStats

    cfg, C = plan.cfg, plan.num_classes
    worker_kwargs = dict(
        path=plan.path,
        labels=plan.labels,
        grid=plan.grid,
        num_classes=C,
        views=plan.fit_views,
        storage_options=storage.options(),
    )
    parts = run_shards(
        FitWorker,
        worker_kwargs,
        _fit_shards(plan),
        executor=cfg.executor,
        ray_address=cfg.ray_address,
        num_workers=cfg.num_workers,
        desc="cluster: read fit vectors",
        progress=progress,
    )
    stats = LDAStats(C, int(plan.reader[INTER].shape[2]))
    for p in parts:
        stats.merge(LDAStats.from_arrays(p["lda"]))
    return _FitVectors(
        stats,
        np.concatenate([p["penult_x"] for p in parts]),
        np.concatenate([p["inter_x"] for p in parts]),
        np.concatenate([p["inter_y"] for p in parts]),
    )


def _kmeans_work_line(cfg, n: int, d: int) -> str:
    """What the penult K-means will do (vectors x K x iterations) and, where it runs on the CPU,
    about how long; hours name the options of a quick trial."""
    from kdpipe.methods.letkd.fit.clustering import kmeans_seconds, resolve_kmeans_backend
    from kdpipe.runs.report import human_seconds

    line = f"cluster: K-means K={cfg.k_penult} on {n:,} penult vectors of {d} dims ({cfg.niter} iterations)"
    _, dev = resolve_kmeans_backend(cfg.kmeans_backend, cfg.device)
    if str(dev) != "cpu":
        return line + "..."
    n = min(n, int(cfg.max_fit_points or n))  # K-means fits on a subsample of this many
    seconds = kmeans_seconds(n, d, int(cfg.k_penult), int(cfg.niter))
    line += f": about {human_seconds(seconds)} on this CPU"
    if seconds >= 3600:
        line += "; hours: --k-penult 512 or --max-fit-points 100000 makes a quick trial"
    return line + "..."


def _fit_penult(plan: ClusterPlan, xp: np.ndarray, progress: bool):
    """K-means of the penult vectors and the top-k width; (kmeans result, k for the fit set,
    k for a probe of augmented views)."""
    from kdpipe.methods.letkd import topk_for_mass
    from kdpipe.methods.letkd.fit.clustering import kmeans

    cfg = plan.cfg
    if progress:
        print(_kmeans_work_line(cfg, xp.shape[0], xp.shape[1]), flush=True)
    km = kmeans(
        xp,
        int(cfg.k_penult),
        niter=cfg.niter,
        seed=cfg.seed,
        verbose=progress,
        backend=cfg.kmeans_backend,
        device=cfg.device,
    )
    _, k_fit = topk_for_mass(xp, km.centers, cfg.temperature, cfg.topk_mass, plan.topk_cap)
    # The fit set holds the identity view only; augmented views can need a wider k, so a
    # seeded sample of stored views is run through the teacher too before the width is fixed.
    probe = _augmented_vectors(plan, PROBE_VIEWS)
    _, k_probe = topk_for_mass(probe, km.centers, cfg.temperature, cfg.topk_mass, plan.topk_cap)
    return km, int(k_fit), int(k_probe)


def _fit_subclasses(plan: ClusterPlan, vectors: _FitVectors, progress: bool) -> _Subclasses:
    from kdpipe.methods.letkd import subclass_score_matrix
    from kdpipe.methods.letkd.fit.clustering import constrained_nearest, per_class_kmeans, subclass_prototypes
    from kdpipe.methods.letkd.fit.lda import lda_project

    cfg, C = plan.cfg, plan.num_classes
    lda = vectors.lda_stats.fit(n_components=plan.lda_dims)
    scalings, xbar = lda.scalings.astype(np.float32), lda.xbar.astype(np.float32)
    z = lda_project(vectors.inter_x, scalings, xbar, plan.lda_dims)
    yi = vectors.inter_y
    centers = per_class_kmeans(
        z,
        yi,
        C,
        int(cfg.k_inter),
        niter=cfg.niter,
        seed=cfg.seed,
        progress=progress,
        backend=cfg.kmeans_backend,
        device=cfg.device,
    )
    ids = constrained_nearest(z, yi, centers, int(cfg.k_inter))
    M = C * int(cfg.k_inter)
    scores = subclass_score_matrix(z, ids, M).astype(np.float32)
    protos = subclass_prototypes(z, ids, M)
    empty = np.isnan(protos).any(1)
    protos[empty] = centers[empty]  # an empty sub-class keeps its K-means centre
    return _Subclasses(scalings, xbar, float(lda.ridge), centers, protos, scores, empty, int(z.shape[0]))


def _write_fitted(plan: ClusterPlan, km, sub: _Subclasses) -> None:
    name, w = plan.name, plan.writer
    w.write_target_array(name, "penult_centers", km.centers, "K-means centres of the penult vectors [K, D]")
    w.write_target_array(name, "lda_scalings", sub.scalings, "sklearn LDA scalings_ [D, D] (eigen solver)")
    w.write_target_array(name, "lda_xbar", sub.xbar, "sklearn LDA xbar_ [D]")
    w.write_target_array(
        name, "subclass_centers", sub.centers, "per-class K-means centres of the projected inter vectors [C*K, d]"
    )
    w.write_target_array(
        name, "subclass_prototypes", sub.prototypes, "mean projected vector of each sub-class [C*K, d]"
    )
    w.write_target_array(name, "subclass_scores", sub.scores, "sub-class score matrix S [C*K, C*K], rows sum to 1")


def _fit(plan: ClusterPlan, progress: bool) -> dict:
    """LDA, K-means, sub-classes, S and the top-k width; writes the fitted arrays and the record."""
    cfg = plan.cfg
    t0 = time.perf_counter()
    vectors = _read_fit_vectors(plan, progress)
    t_read = time.perf_counter()
    km, k_fit, k_probe = _fit_penult(plan, vectors.penult_x, progress)
    vectors.penult_x = np.empty((0, 0), np.float32)  # freed before the inter fit
    sub = _fit_subclasses(plan, vectors, progress)
    _write_fitted(plan, km, sub)
    t_fit = time.perf_counter()
    k_needed = max(k_fit, k_probe)
    record = TargetSet(
        name=plan.name,
        num_classes=plan.num_classes,
        k_penult=int(cfg.k_penult),
        k_inter=int(cfg.k_inter),
        lda_dims=plan.lda_dims,
        topk=int(min(k_needed, plan.topk_cap)),
        topk_cap=plan.topk_cap,
        topk_mass=float(cfg.topk_mass),
        temperature=float(cfg.temperature),
        penult_grid=plan.penult_grid,
        inter_grid=plan.inter_grid,
        student_grid=plan.grid,
        fit_views=cfg.fit_views,
        fit_points_penult=int(km.num_fit),
        fit_points_inter=sub.num_points,
        max_fit_points=cfg.max_fit_points,
        kmeans_niter=int(cfg.niter),
        kmeans_objective_penult=float(km.objective),
        lda_ridge=sub.lda_ridge,
        empty_subclasses=int(sub.empty.sum()),
        seed=int(cfg.seed),
        teacher_sha256=plan.reader.manifest.teacher.sha256,
        created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        extra={
            "fit_done": True,
            "k_needed_for_mass": int(k_needed),
            "k_needed_fit_set": int(k_fit),
            "k_needed_view_probe": int(k_probe),
            "view_probe_images": PROBE_VIEWS,
            "kmeans_backend": km.backend,
            "assign_batch_size": int(cfg.batch_size),  # a resume keeps it (_check_resume_options)
            "seconds": {"fit_read": round(t_read - t0, 3), "fit": round(t_fit - t_read, 3)},
        },
    )
    plan.writer.set_target_attrs(plan.name, record.to_json())
    return record.to_json()


# --------------------------------------------------------------------------- the assignment pass
def _assign_arrays(plan: ClusterPlan, record: TargetSet) -> None:
    """Create the per-sample target arrays, the done array and the per-shard mass array."""
    from kdpipe.artifacts.schema import chunk_rows

    r, w, name = plan.reader, plan.writer, plan.name
    n, v = r.num_samples, r.num_views
    shard_size = r.manifest.shard_size
    num_shards = r.manifest.num_shards
    hp, wp = record.penult_grid
    hi, wi = record.inter_grid
    k = record.topk
    rows_p = chunk_rows(shard_size, v * hp * wp * k * 2)
    rows_i = chunk_rows(shard_size, v * hi * wi * 2)
    for kind in (PenultTopk(), InterSubclass()):
        kind.bind(KindContext(target_set=record))  # the array layout needs the record only
        for path, stored in kind.storage.items():
            short = path.rsplit("/", 1)[1]
            shape = (n, v, hp, wp, k) if short.startswith("penult") else (n, v, hi, wi)
            w.create_target_array(
                name, short, shape, stored.dtype, rows_p if short.startswith("penult") else rows_i, stored.meaning
            )
    w.create_target_array(
        name, "shards_done", (num_shards,), "uint8", 1, "assignment pass: shards finished", checked=False
    )
    w.create_target_array(
        name, "retained_mass", (num_shards, 3), "float64", 1, "per shard: min, sum and count of the retained top-k mass"
    )


def _assign(plan: ClusterPlan, record: TargetSet, progress: bool) -> dict:
    """Run the teacher over every stored view and write the compact targets, shard by shard."""
    from kdpipe.distributed.executor import plan as plan_shards
    from kdpipe.distributed.teacher_pass import PassSpec, pass_summary, run_pass
    from kdpipe.runs.paths import absolute_spec

    r, w, name = plan.reader, plan.writer, plan.name
    done_array = record.array("shards_done")
    shards = plan_shards(r.num_samples, r.manifest.shard_size)
    done = w.done_shards(done_array)
    todo = [s for s in shards if s.shard_id not in done]
    spec = PassSpec(
        store=plan.path,
        teacher=plan.teacher,
        arch=r.manifest.teacher.arch,
        data=absolute_spec(plan.data),
        split=r.manifest.dataset.split,
        num_classes=plan.num_classes,
        kinds=[PenultTopk(), InterSubclass()],
        batch_size=int(plan.cfg.batch_size),
        device=plan.cfg.device,
        fingerprint=r.manifest.dataset.fingerprint,
        pad_mode=r.manifest.views.pad_mode,
        done_array=done_array,
        target_set=name,
    )
    if progress and done:
        print(f"cluster: resuming the assignment pass of {name!r}: {len(done)} of {len(shards)} shards done")
    mass_array = record.array("retained_mass")

    def keep_mass(shard, result):
        lo, total, count = result["stats"].get("retained_mass", (1.0, 0.0, 0))
        w.write_rows(mass_array, shard.shard_id, np.asarray([[lo, total, count]], dtype=np.float64))

    results, seconds = run_pass(
        w,
        spec,
        todo,
        plan.cfg,
        desc=f"cluster {name}: assign",
        unit_scale=r.num_views,
        progress=progress,
        on_result=keep_mass,
    )
    return pass_summary(results, seconds, plan.cfg.executor)


def _retained_mass(plan: ClusterPlan, record: TargetSet) -> tuple[float, float]:
    rows = np.asarray(plan.writer.array(record.array("retained_mass"))[...], dtype=np.float64)
    count = rows[:, 2].sum()
    return float(rows[:, 0].min()) if len(rows) else float("nan"), float(rows[:, 1].sum() / max(count, 1))


# --------------------------------------------------------------------------- the stage
def cluster(cfg: ClusterConfig, progress: bool = True, verbose: bool = True, given=None) -> dict:
    """Fit letKD's targets and write them for every stored view into ``targets/<name>/``.

    ``given``: the option names the user typed (the CLI); a resume refuses those that differ
    from the interrupted pass (every option when None). Returns a summary dict (also printed
    when ``verbose``)."""
    t0 = time.perf_counter()
    _check_options(cfg)
    with storage.writer_lock(cfg.store, f"the target set {cfg.name!r}", "kdpipe cluster"):
        return _cluster(cfg, given, t0, progress, verbose)


def _cluster(cfg: ClusterConfig, given, t0: float, progress: bool, verbose: bool) -> dict:
    from kdpipe.distributed.executor import ray_cluster

    plan = _prepare(cfg, given)
    ctx = ray_cluster(cfg.ray_address) if cfg.executor == "ray" else contextlib.nullcontext()
    with ctx:
        if plan.resume_assign:
            record = plan.reader.target_set(plan.name, include_incomplete=True)
            recorded_batch = record.extra.get("assign_batch_size")
            if recorded_batch is not None:  # the rest of the pass as its start: bit for bit
                plan.cfg = dataclasses.replace(plan.cfg, batch_size=int(recorded_batch))
        else:
            record = TargetSet.from_json(plan.name, _fit(plan, progress))
            _assign_arrays(plan, record)
        t_assign = time.perf_counter()
        assign = _assign(plan, record, progress)
    return _finish(plan, record, assign, t0, t_assign, verbose)


def _finish(plan: ClusterPlan, record: TargetSet, assign: dict, t0: float, t_assign: float, verbose: bool) -> dict:
    cfg, w = plan.cfg, plan.writer
    mass_min, mass_mean = _retained_mass(plan, record)
    t_end = time.perf_counter()
    seconds = dict(record.extra.get("seconds", {}))
    seconds["assign"] = round(t_end - t_assign, 3)
    extra = dict(record.extra, seconds=seconds, assign=assign)
    w.set_target_attrs(plan.name, {"retained_mass_min": mass_min, "retained_mass_mean": mass_mean, "extra": extra})
    w.finish_target_set(plan.name)
    dropped = []
    if cfg.drop_features:
        dropped = w.delete_arrays([a for a in plan.reader.manifest.arrays if a.startswith("feat/")])
        w.update_manifest(features_dropped=True, features_dropped_by=f"cluster --name {plan.name}")
    r = plan.reader
    summary = {
        "store": plan.path,
        "name": plan.name,
        "samples": r.num_samples,
        "views": r.num_views,
        "classes": plan.num_classes,
        "K_penult": record.k_penult,
        "K_inter": record.k_inter,
        "lda_dims": record.lda_dims,
        "topk": record.topk,
        "topk_cap": record.topk_cap,
        "k_needed_for_mass": record.extra.get("k_needed_for_mass"),
        "topk_mass": record.topk_mass,
        "retained_mass_min": mass_min,
        "retained_mass_mean": mass_mean,
        "kmeans_objective_penult": record.kmeans_objective_penult,
        "fit_points_penult": record.fit_points_penult,
        "fit_points_inter": record.fit_points_inter,
        "dropped": dropped,
        "seconds": dict(seconds, total=round(t_end - t0, 3)),
        "assign": assign,
    }
    if verbose:
        print(_format(summary, record))
    return summary


def _format(s: dict, record: TargetSet) -> str:
    warn = ""
    if s["retained_mass_min"] < s["topk_mass"] - 1e-6:
        warn = (
            f" (below --topk-mass {s['topk_mass']}: "
            f"{'raise --topk' if s['topk'] >= s['topk_cap'] else 'augmented views need more than the fit set'})"
        )
    return (
        f"cluster: target set {s['name']!r} in {s['store']}: {s['samples']:,} samples x {s['views']} views\n"
        f"  penult  K={s['K_penult']} on {s['fit_points_penult']:,} vectors (objective "
        f"{s['kmeans_objective_penult']:.4g}); top-{s['topk']} (cap {s['topk_cap']}) keeps mass min "
        f"{s['retained_mass_min']:.4f} / mean {s['retained_mass_mean']:.4f}{warn}\n"
        f"  inter   LDA to {s['lda_dims']} dims, {s['classes']} x {s['K_inter']} sub-classes on "
        f"{s['fit_points_inter']:,} vectors{f', {record.empty_subclasses} empty' if record.empty_subclasses else ''}\n"
        f"  time    fit {s['seconds'].get('fit_read', 0) + s['seconds'].get('fit', 0):.1f} s, assignment pass "
        f"{s['seconds']['assign']:.1f} s, total {s['seconds']['total']:.1f} s"
        + (f"\n  dropped {', '.join(s['dropped'])}" if s["dropped"] else "")
    )


# --------------------------------------------------------------------------- pictures
def plot_subclasses(reader, target_name: str, num_images: int, png_path, dataset) -> str:
    """letKD supplement Fig. 2: for ``num_images`` images (view 0 of each, spread over the
    classes), the sub-class of every location drawn over the image (colour = sub-class index
    k within the class block), next to the score-matrix rows S[c*K:(c+1)*K] of its class;
    plus a heat map of the whole S. Writes ``png_path`` and returns it."""
    from kdpipe.runs.plots import plot_subclass_maps

    record = reader.target_set(target_name)
    return plot_subclass_maps(reader, record, num_images, png_path, dataset)
