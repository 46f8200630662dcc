"""Stage one, second half: `kdpipe cluster` writes letKD's targets into an extracted store.

Done on the stored teacher features, never on the teacher (METHODS.md, letKD):

* penultimate (letKD-1/2): faiss K-means with ``K_penult`` centres on the location vectors of
  ``feat/penult``; then, for every sample, view and location, the top-k of
  ``softmax_k(-T * ||f - rho_k||^2)`` over all K centres (indices and probabilities).
* intermediate (letKD-2): LDA on the location vectors of ``feat/inter``, each labelled with its
  image's class, fitted streaming over shards (Ray map-reduce or in process); per class a
  K-means with ``K_inter`` centres on the projected vectors; prototypes (mean of each
  sub-class's vectors); the score matrix S; for every sample, view and location the
  label-constrained sub-class index.

Which vectors are used: **every stored view** of every sample, all locations (after the
``student_grid`` pooling). The LDA statistics are exact over all of them. The K-means fits use
a seeded uniform subsample of at most ``max_fit_points`` location vectors (penultimate: seed
``seed``; intermediate: seed ``seed + 1``, drawn over all classes so class proportions are
kept; all vectors when there are fewer). Prototypes and S are computed on that intermediate
fit sample, with the sub-class ids the stage stores; when nothing is subsampled this is the
reference's definition on all vectors. Targets are computed for every vector.

Seeds: the penult subsample and faiss K-means use ``seed``; the inter subsample ``seed + 1``;
class c's K-means ``seed + c``. Same store and arguments -> identical arrays (Ray or inline).

Inputs: a complete store with ``feat/penult`` and ``feat/inter`` [N, V, D, h, w] and the
labels [N] (the store's ``labels`` array; a store without one needs ``dataset``, checked
against the store's fingerprint). LDA follows sklearn's eigen solver exactly
(``kdpipe.methods.lda``); a singular within-class scatter (dead channels) gets a tiny ridge,
recorded as ``lda_ridge``.

Vector order: location vectors of a map [N, V, D, h, w] are flattened in (n, v, y, x) order.

Store layout written (``targets/<name>/``; N samples, V views, C classes; hp x wp and hi x wi
are the penultimate and intermediate grids after ``student_grid`` pooling):

====================  ======================  ========  ===========================================
array                 shape                   dtype     meaning
====================  ======================  ========  ===========================================
penult_centers        [K_penult, Dp]          float32   K-means centres rho_k of the penult vectors
penult_topk_idx       [N, V, hp, wp, topk]    int16*    indices of the topk nearest centres,
                                                        by increasing distance
penult_topk_val       [N, V, hp, wp, topk]    float16   their probabilities under the softmax over
                                                        all K_penult centres (not renormalised;
                                                        their sum is the retained mass)
lda_scalings          [Di, Di]                float32   sklearn ``scalings_`` (columns by
                                                        decreasing eigenvalue; use the first
                                                        lda_dims)
lda_xbar              [Di]                    float32   sklearn ``xbar_``
subclass_centers      [C*K_inter, lda_dims]   float32   per-class K-means centres; row c*K+k is
                                                        sub-class k of class c
subclass_prototypes   [C*K_inter, lda_dims]   float32   mean projected vector of each sub-class
                                                        (its centre where a sub-class is empty)
subclass_scores       [C*K_inter, C*K_inter]  float32   S: row a = share of sub-class a's vectors
                                                        whose nearest prototype is b (rows sum 1)
subclass_idx          [N, V, hi, wi]          int16*    label-constrained sub-class y*K + k*
====================  ======================  ========  ===========================================

``*`` int16 when the index range fits (K_penult, C*K_inter <= 32767), else int32. Readers
should cast indices with ``.long()``.

Attrs (on the ``targets/<name>`` group and in ``manifest["targets"][name]["attrs"]``):
``K_penult``, ``K_inter``, ``topk``, ``temperature``, ``lda_dims``, ``num_classes``,
``retained_mass_min``, ``retained_mass_mean`` (of the top-k probability sums over all
stored locations), ``fit_points_penult``, ``fit_points_inter``, ``max_fit_points``,
``kmeans_niter``, ``kmeans_objective_penult``, ``seed``, ``student_grid`` ([H, W] or null),
``penult_grid`` [hp, wp], ``inter_grid`` [hi, wi], ``penult_layer``/``inter_layer``
(``feat/penult``, ``feat/inter``), ``views_used`` ("all"), ``lda_ridge``,
``empty_subclasses``, ``projection`` and ``pooling`` (the exact recipes below), ``created``.

``--drop-features`` (``drop_features=True``) deletes every ``feat/*`` array once the target set
is complete (``StoreWriter.delete_arrays``: gone from the group, ``manifest["arrays"]`` and
``manifest["layers"]``) and sets ``manifest["features_dropped"] = True`` and
``manifest["features_dropped_by"] = "cluster --name <name>"``; a later ``cluster`` on that store
says the features were dropped.

A target set left incomplete by an interrupted run is replaced by the next run of that name;
a complete one only with ``overwrite``. Other target sets are never touched.

How OnlineTargets reproduces these from a live teacher (exactly the stage's computation):

1. feature maps in float32; if ``student_grid`` is set,
   ``torch.nn.functional.adaptive_avg_pool2d(map, student_grid)`` (the stage pools the stored
   float16 features cast to float32);
2. penultimate: ``kdpipe.methods.letkd.penult_topk_targets(feat, penult_centers, temperature,
   topk)`` computes the same quantity (the stage selects the top-k on the full float32
   distance row with torch.topk, or a faiss GPU search where faiss sees a GPU, and normalises
   with a float32 logsumexp over all K; indices agree except at exact distance ties);
3. intermediate: ``kdpipe.methods.letkd.assign_subclasses(feat, labels, lda_xbar,
   lda_scalings, subclass_centers, K_inter)`` -- the stage calls this very function;
   the sub-class target of a location is ``subclass_scores[subclass_idx]``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kdpipe.errors import KdpipeError, StoreError
from kdpipe.pipeline.executor import ray_cluster, run_shards

__all__ = ["cluster", "plot_subclasses", "parse_grid", "DEFAULT_MAX_FIT_POINTS"]

# kdpipe's cap on the K-means fit sample (2**20 = 1,048,576 vectors). The letKD reference does
# not subsample: its run_kmeans (letKD-framework distillation/algorithms/clustering/
# cluster_utils.py) sets faiss's max_points_per_centroid = 10,000,000, which turns off faiss's
# default subsampling to 256 x K points; METHODS.md: "fitted on all its location vectors".
# Below 2**20 vectors this cap fits all of them, as the reference; it equals faiss's default
# 256 x K only at K = 4096. A smaller fit (e.g. --max-fit-points 256*K) is the user's choice.
DEFAULT_MAX_FIT_POINTS = 1 << 20
PENULT = "feat/penult"
INTER = "feat/inter"
POOLING = "torch.nn.functional.adaptive_avg_pool2d(float32 map, student_grid)"
PROJECTION = "z = (f - lda_xbar) @ lda_scalings[:, :lda_dims] (float32)"


# --------------------------------------------------------------------------- helpers
def parse_grid(grid) -> tuple[int, int] | None:
    """'4x4' / '4' / (4, 4) / None -> (H, W) or None."""
    if grid is None or grid == "":
        return None
    if isinstance(grid, str):
        parts = grid.lower().replace(" ", "").split("x")
        try:
            vals = [int(p) for p in parts]
        except ValueError:
            raise KdpipeError(f"A student grid is HxW (e.g. 4x4), not {grid!r}.") from None
    else:
        vals = [int(v) for v in grid]
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or min(vals) < 1:
        raise KdpipeError(f"A student grid is HxW with positive sizes (e.g. 4x4), not {grid!r}.")
    return int(vals[0]), int(vals[1])


def _index_dtype(n: int) -> str:
    return "int16" if n <= np.iinfo(np.int16).max else "int32"


def _pooled_maps(block: np.ndarray, grid) -> torch.Tensor:
    """[n, V, D, h, w] float16 -> float32 [n*V, D, h', w']."""
    n, v, d, h, w = block.shape
    t = torch.from_numpy(np.ascontiguousarray(block)).float().reshape(n * v, d, h, w)
    if grid is not None and tuple(grid) != (h, w):
        t = F.adaptive_avg_pool2d(t, grid)
    return t


def _vectors(block: np.ndarray, grid) -> tuple[np.ndarray, tuple[int, int]]:
    """[n, V, D, h, w] float16 -> ([n*V*h'*w', D] float32 in (n, v, y, x) order, (h', w'))."""
    t = _pooled_maps(block, grid)
    hh, ww = t.shape[-2:]
    return t.permute(0, 2, 3, 1).reshape(-1, block.shape[2]).numpy(), (int(hh), int(ww))


def _local(sel: np.ndarray | None, lo: int, hi: int) -> np.ndarray | None:
    """Indices of the global selection `sel` in [lo, hi), made local; None = all of them."""
    if sel is None:
        return None
    a, b = np.searchsorted(sel, [lo, hi])
    return sel[a:b] - lo


# --------------------------------------------------------------------------- shard workers
@dataclass(frozen=True)
class ClusterShard:
    """A contiguous sample range [start, stop) plus the local indices of the fit subsamples
    that fall in it (None = every vector of the shard)."""

    shard_id: int
    start: int
    stop: int
    sel_p: np.ndarray | None = None
    sel_i: np.ndarray | None = None

    @property
    def size(self) -> int:
        return self.stop - self.start


class FitWorker:
    """Pass 1 (map): LDA statistics of a shard's inter vectors + its K-means fit samples."""

    def __init__(self, path, labels, grid, num_classes):
        from kdpipe.artifacts import open_store

        self.reader = open_store(path)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.grid = grid
        self.num_classes = int(num_classes)

    def run(self, shard: ClusterShard) -> dict:
        from kdpipe.methods.lda import LDAStats

        a, b = shard.start, shard.stop
        xi, _ = _vectors(self.reader[INTER][a:b], self.grid)
        yi = np.repeat(self.labels[a:b], xi.shape[0] // max(b - a, 1))
        stats = LDAStats(self.num_classes, xi.shape[1]).update(xi, yi)
        out = {"lda": stats.to_arrays(),
               "inter_x": xi if shard.sel_i is None else xi[shard.sel_i],
               "inter_y": yi if shard.sel_i is None else yi[shard.sel_i]}
        del xi
        xp, _ = _vectors(self.reader[PENULT][a:b], self.grid)
        out["penult_x"] = xp if shard.sel_p is None else xp[shard.sel_p]
        return out


class AssignWorker:
    """Pass 2 (map): a shard's top-k and sub-class targets, written in place (its own chunks);
    returns the retained-mass statistics and the sub-class ids of its fit-sample vectors."""

    def __init__(self, path, target, labels, grid, topk, temperature, k_inter):
        from kdpipe.artifacts import StoreWriter, open_store
        from kdpipe.methods.clustering import TopkAssigner

        self.reader = open_store(path)
        self.writer = StoreWriter.open(path)
        self.base = f"targets/{target}/"
        self.labels = np.asarray(labels, dtype=np.int64)
        self.grid = grid
        self.k_inter = int(k_inter)
        r, base = self.reader, self.base
        self.assigner = TopkAssigner(r[base + "penult_centers"][...], topk, temperature)
        self.xbar = torch.from_numpy(r[base + "lda_xbar"][...])
        self.scal = torch.from_numpy(r[base + "lda_scalings"][...])
        self.sub = torch.from_numpy(r[base + "subclass_centers"][...])

    def run(self, shard: ClusterShard) -> dict:
        from kdpipe.methods.letkd import assign_subclasses

        a, b, base, n = shard.start, shard.stop, self.base, shard.stop - shard.start
        fp = self.reader[PENULT]
        v = int(fp.shape[1])
        xp, (hp, wp) = _vectors(fp[a:b], self.grid)
        idx, val = self.assigner(xp)
        del xp
        k = idx.shape[1]
        mass = val.astype(np.float64).sum(1)
        self.writer.write_rows(base + "penult_topk_idx", a, idx.reshape(n, v, hp, wp, k))
        self.writer.write_rows(base + "penult_topk_val", a, val.reshape(n, v, hp, wp, k).astype(np.float16))
        maps = _pooled_maps(self.reader[INTER][a:b], self.grid)
        y = torch.from_numpy(np.repeat(self.labels[a:b], v))
        step = 256
        ids = torch.cat([assign_subclasses(maps[s:s + step], y[s:s + step], self.xbar, self.scal,
                                           self.sub, self.k_inter)
                         for s in range(0, maps.shape[0], step)]).numpy()
        self.writer.write_rows(base + "subclass_idx", a, ids.reshape((n, v) + ids.shape[-2:]))
        flat = ids.reshape(-1)
        return {"mass_min": float(mass.min()) if mass.size else 1.0, "mass_sum": float(mass.sum()),
                "count": int(mass.size), "fit_ids": flat if shard.sel_i is None else flat[shard.sel_i]}


def _store_labels(reader, dataset) -> np.ndarray:
    """The labels [N] of the store's samples: its `labels` array, else the data set's."""
    n = reader.num_samples
    if reader.has("labels"):
        return np.asarray(reader["labels"][...], dtype=np.int64).reshape(n)
    if dataset is None:
        d = reader.manifest.get("dataset") or {}
        spec = d.get("spec") or d.get("name")
        if not spec:
            raise StoreError(f"The store at {reader.path} has no labels array and names no data set; "
                             "pass --dataset.")
        dataset = spec
    if isinstance(dataset, str):
        from kdpipe.data import load_dataset

        split = (reader.manifest.get("dataset") or {}).get("split", "train")
        dataset = load_dataset(dataset, split)
    reader.check_dataset(dataset)
    return np.asarray(dataset.labels, dtype=np.int64).reshape(n)


# --------------------------------------------------------------------------- the stage
def cluster(store, name: str = "default", k_penult: int = 4096, k_inter: int = 8,
            lda_dims: int | None = None, topk: int = 16, temperature: float = 1.0,
            student_grid=None, max_fit_points: int | None = DEFAULT_MAX_FIT_POINTS,
            seed: int = 0, niter: int = 20, drop_features: bool = False, overwrite: bool = False,
            executor: str = "ray", ray_address: str | None = None, dataset=None,
            verbose: bool = True) -> dict:
    """Write the letKD target set ``targets/<name>/`` into the complete store at ``store``.

    Returns a summary dict (also printed when ``verbose``). See the module docstring for the
    arrays and attrs. Raises StoreError (one sentence) for a missing, incomplete or foreign
    store, one without ``feat/penult`` and ``feat/inter``, or an existing target set ``name``
    without ``overwrite``.
    """
    from kdpipe.artifacts import StoreWriter, open_store
    from kdpipe.artifacts.schema import plan_shards
    from kdpipe.methods.clustering import subsample_indices

    t0 = time.perf_counter()
    writer = StoreWriter.open_for_targets(store)
    path = writer.path
    reader = open_store(path)
    missing = [a for a in (PENULT, INTER) if not reader.has(a)]
    if missing:
        dropped = " (they were dropped by --drop-features)" if reader.manifest.get("features_dropped") else ""
        raise StoreError(f"The store at {path} has no {' and '.join(missing)}{dropped}; "
                         "cluster needs the teacher's penult and inter feature maps, so re-extract it with them.")
    if not name or "/" in name:
        raise KdpipeError(f"A target set name must be a non-empty name without '/', not {name!r}.")
    existing = (reader.manifest.get("targets") or {})
    if name in existing and existing[name].get("complete") and not overwrite:
        raise StoreError(f"The store at {path} already has a target set {name!r}; pass --overwrite "
                         "to replace it or choose another --name.")
    for val, what in ((k_penult, "--k-penult"), (k_inter, "--k-inter"), (topk, "--topk")):
        if int(val) < 1:
            raise KdpipeError(f"{what} must be at least 1, got {val}.")
    if not temperature > 0:
        raise KdpipeError(f"--temperature must be positive, got {temperature}.")
    grid = parse_grid(student_grid)

    fp, fi = reader[PENULT], reader[INTER]
    N, V = int(fp.shape[0]), int(fp.shape[1])
    for arr, layer in ((fp, "penult"), (fi, "inter")):
        h, w = arr.shape[-2:]
        if grid is not None and (grid[0] > h or grid[1] > w):
            raise KdpipeError(f"The student grid {grid[0]}x{grid[1]} is larger than the teacher's "
                              f"{layer} map {h}x{w}; pooling only shrinks.")
    hp, wp = grid or tuple(fp.shape[-2:])
    hi, wi = grid or tuple(fi.shape[-2:])
    Dp, Di = int(fp.shape[2]), int(fi.shape[2])
    labels = _store_labels(reader, dataset)
    C = int((reader.manifest.get("dataset") or {}).get("num_classes") or int(labels.max()) + 1)
    if labels.min() < 0 or labels.max() >= C:
        raise StoreError(f"The store at {path} has labels outside 0..{C - 1}.")
    topk = int(min(topk, k_penult))
    if lda_dims is not None and not 1 <= int(lda_dims) <= min(C - 1, Di):
        raise KdpipeError(f"--lda-dims must lie in 1..{min(C - 1, Di)} (classes - 1, inter feature size), "
                          f"got {lda_dims}.")
    if executor not in ("ray", "inline"):
        raise KdpipeError(f"The executor must be 'ray' or 'inline', not {executor!r}.")
    if name in existing:  # replaced (--overwrite) or left incomplete by an interrupted run
        writer.delete_target_set(name)

    shard_size = int(reader.manifest.get("shard_size") or N)
    shards = plan_shards(N, shard_size)
    per_p, per_i = V * hp * wp, V * hi * wi
    sel_p = subsample_indices(N * per_p, max_fit_points, seed)
    sel_i = subsample_indices(N * per_i, max_fit_points, seed + 1)
    cshards = [ClusterShard(i, a, b, _local(sel_p, a * per_p, b * per_p), _local(sel_i, a * per_i, b * per_i))
               for i, (a, b) in enumerate(shards)]
    ctx = ray_cluster(ray_address) if executor == "ray" else contextlib.nullcontext()
    with ctx:
        return _run(writer, reader, path, name, cshards, labels, grid, C, N, V, hp, wp, hi, wi, Dp, Di,
                    per_p, per_i, k_penult, k_inter, lda_dims, topk, temperature, max_fit_points, seed,
                    niter, drop_features, executor, ray_address, verbose, shard_size, t0)


def _run(writer, reader, path, name, cshards, labels, grid, C, N, V, hp, wp, hi, wi, Dp, Di, per_p, per_i,
         k_penult, k_inter, lda_dims, topk, temperature, max_fit_points, seed, niter, drop_features,
         executor, ray_address, verbose, shard_size, t0):
    from kdpipe.artifacts.schema import chunk_rows
    from kdpipe.methods.clustering import faiss_gpu_available, kmeans, per_class_kmeans, subclass_prototypes
    from kdpipe.methods.lda import LDAStats, lda_project
    from kdpipe.methods.letkd import subclass_score_matrix

    # ---- pass 1: LDA statistics (map-reduce) and the K-means fit samples
    parts = run_shards(FitWorker, dict(path=path, labels=labels, grid=grid, num_classes=C), cshards,
                       executor=executor, ray_address=ray_address, desc="cluster: LDA + fit samples",
                       progress=verbose)
    stats = LDAStats(C, Di)
    for p in parts:
        stats.merge(LDAStats.from_arrays(p["lda"]))
    xp_fit = np.concatenate([p["penult_x"] for p in parts])
    xi_fit = np.concatenate([p["inter_x"] for p in parts])
    yi_fit = np.concatenate([p["inter_y"] for p in parts])
    del parts
    t_pass1 = time.perf_counter()

    lda = stats.fit(n_components=lda_dims)
    d = int(lda_dims or lda.max_components)
    scalings = lda.scalings.astype(np.float32)
    xbar = lda.xbar.astype(np.float32)

    # ---- fits
    if verbose:
        print(f"cluster: K-means K={k_penult} on {xp_fit.shape[0]} penult vectors of {xp_fit.shape[1]} dims "
              f"({niter} iterations, faiss{' GPU' if faiss_gpu_available() else ''})...", flush=True)
    km = kmeans(xp_fit, int(k_penult), niter=niter, seed=seed, verbose=verbose)
    del xp_fit
    z_fit = lda_project(xi_fit, scalings, xbar, d)
    del xi_fit
    sub_centers = per_class_kmeans(z_fit, yi_fit, C, int(k_inter), niter=niter, seed=seed, progress=verbose)
    t_fit = time.perf_counter()

    # ---- write the fitted arrays, create the per-sample ones
    writer.write_target_array(name, "penult_centers", km.centers, "K-means centres of the penult vectors [K, D]")
    writer.write_target_array(name, "lda_scalings", scalings, "sklearn LDA scalings_ [D, D] (eigen solver)")
    writer.write_target_array(name, "lda_xbar", xbar, "sklearn LDA xbar_ [D]")
    writer.write_target_array(name, "subclass_centers", sub_centers,
                              "per-class K-means centres of the projected inter vectors [C*K, d]")
    rows_p = chunk_rows(shard_size, per_p * topk * 2)
    rows_i = chunk_rows(shard_size, per_i * 2)
    writer.create_target_array(name, "penult_topk_idx", (N, V, hp, wp, topk), _index_dtype(k_penult), rows_p,
                               "indices of the top-k nearest penult centres")
    writer.create_target_array(name, "penult_topk_val", (N, V, hp, wp, topk), "float16", rows_p,
                               "top-k probabilities of softmax(-T d^2) over all K centres")
    writer.create_target_array(name, "subclass_idx", (N, V, hi, wi), _index_dtype(C * int(k_inter)), rows_i,
                               "label-constrained sub-class y*K + k of each location")

    # ---- pass 2: per-location targets, written shard by shard
    res = run_shards(AssignWorker, dict(path=path, target=name, labels=labels, grid=grid, topk=topk,
                                        temperature=float(temperature), k_inter=int(k_inter)),
                     cshards, executor=executor, ray_address=ray_address, desc="cluster: targets",
                     progress=verbose)
    mass_min = min(r["mass_min"] for r in res)
    mass_mean = sum(r["mass_sum"] for r in res) / max(sum(r["count"] for r in res), 1)
    ids_fit = np.concatenate([r["fit_ids"] for r in res]).astype(np.int64)
    del res

    # ---- prototypes and the score matrix on the fit sample, with the stored ids
    M = C * int(k_inter)
    S = subclass_score_matrix(z_fit, ids_fit, M)
    protos = subclass_prototypes(z_fit, ids_fit, M)
    empty = np.isnan(protos).any(1)
    protos[empty] = sub_centers[empty]
    writer.write_target_array(name, "subclass_prototypes", protos, "mean projected vector of each sub-class [C*K, d]")
    writer.write_target_array(name, "subclass_scores", S.astype(np.float32),
                              "sub-class score matrix S [C*K, C*K], rows sum to 1")
    attrs = {
        "K_penult": int(k_penult), "K_inter": int(k_inter), "topk": int(topk),
        "temperature": float(temperature), "lda_dims": d, "num_classes": C,
        "retained_mass_min": float(mass_min), "retained_mass_mean": float(mass_mean),
        "fit_points_penult": int(km.num_fit), "fit_points_inter": int(z_fit.shape[0]),
        "max_fit_points": None if max_fit_points is None else int(max_fit_points),
        "kmeans_niter": int(niter), "kmeans_objective_penult": float(km.objective),
        "seed": int(seed), "student_grid": None if grid is None else list(grid),
        "penult_grid": [int(hp), int(wp)], "inter_grid": [int(hi), int(wi)],
        "penult_layer": PENULT, "inter_layer": INTER, "views_used": "all",
        "lda_ridge": float(lda.ridge), "empty_subclasses": int(empty.sum()),
        "projection": PROJECTION, "pooling": POOLING if grid is not None else None,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    writer.set_target_attrs(name, attrs)
    writer.finish_target_set(name)
    dropped = []
    if drop_features:
        feats = [a for a in reader.manifest.get("arrays", {}) if a.startswith("feat/")]
        dropped = writer.delete_arrays(feats)
        writer.update_manifest(features_dropped=True, features_dropped_by=f"cluster --name {name}")
    t_end = time.perf_counter()
    summary = {
        "store": path, "name": name, "samples": N, "views": V, "classes": C,
        "penult_vectors": N * per_p, "inter_vectors": N * per_i, "K_penult": int(k_penult),
        "K_inter": int(k_inter), "lda_dims": d, "topk": topk,
        "retained_mass_min": float(mass_min), "retained_mass_mean": float(mass_mean),
        "kmeans_objective_penult": float(km.objective), "fit_points_penult": int(km.num_fit),
        "dropped": dropped,
        "seconds": {"pass1": t_pass1 - t0, "fit": t_fit - t_pass1, "pass2_and_scores": t_end - t_fit,
                    "total": t_end - t0},
    }
    if verbose:
        print(f"cluster: target set {name!r} in {path}: {N} samples x {V} views; "
              f"penult K={k_penult} on {km.num_fit} vectors (objective {km.objective:.4g}), "
              f"top-{topk} keeps mass min {mass_min:.3f} / mean {mass_mean:.3f}; "
              f"LDA {Di}->{d} dims, {C}x{k_inter} sub-classes on {z_fit.shape[0]} vectors"
              f"{f', {int(empty.sum())} empty' if empty.any() else ''}; "
              f"{'dropped ' + ', '.join(dropped) + '; ' if dropped else ''}{t_end - t0:.1f} s.")
    return summary


# --------------------------------------------------------------------------- pictures
def plot_subclasses(reader, target_name: str, num_images: int, png_path, dataset) -> str:
    """letKD supplement Fig. 2: for ``num_images`` images (view 0 of each, spread over the
    classes), the sub-class of every location drawn over the image (colour = sub-class index
    k within the class block), next to the score-matrix rows S[c*K:(c+1)*K] of its class;
    plus a heat map of the whole S. Writes ``png_path`` and returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = f"targets/{target_name}/"
    reader.target_attrs(target_name)
    K = int(reader.target_attrs(target_name)["K_inter"])
    S = np.asarray(reader[base + "subclass_scores"][...])
    M = S.shape[0]
    C = M // K
    labels = np.asarray(dataset.labels, dtype=np.int64)
    # one image per class in turn, first occurrences
    picks: list[int] = []
    for rnd in range(len(labels)):
        for c in range(C):
            where = np.flatnonzero(labels == c)
            if rnd < len(where):
                picks.append(int(where[rnd]))
            if len(picks) >= num_images:
                break
        if len(picks) >= num_images or rnd > len(labels):
            break
    picks = picks[:max(1, int(num_images))]
    cmap = plt.get_cmap("tab10" if K <= 10 else "tab20")
    fig, axes = plt.subplots(len(picks) + 1, 2, figsize=(10, 2.6 * (len(picks) + 1)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 3]})
    for row, i in enumerate(picks):
        img = dataset.get_batch(np.array([i]))
        if reader.has("views"):
            try:
                params = torch.as_tensor(np.asarray(reader["views"][i:i + 1, 0]))
                img = dataset.policy.apply_images(img, params)
            except Exception:  # noqa: BLE001 - drawing only; fall back to the raw image
                pass
        img = img[0].permute(1, 2, 0).numpy()
        ids = np.asarray(reader[base + "subclass_idx"][i, 0]).astype(np.int64)
        c = int(labels[i])
        h, w = ids.shape
        H, W = img.shape[:2]
        ax = axes[row, 0]
        ax.imshow(img if img.shape[2] == 3 else img[..., 0], cmap=None if img.shape[2] == 3 else "gray")
        ys = (np.arange(h) + 0.5) * H / h - 0.5
        xs = (np.arange(w) + 0.5) * W / w - 0.5
        gx, gy = np.meshgrid(xs, ys)
        ax.scatter(gx.ravel(), gy.ravel(), c=[cmap(int(k) % cmap.N) for k in (ids.ravel() % K)], s=40,
                   edgecolors="white", linewidths=0.5)
        ax.set_title(f"#{i} class {c}", fontsize=8)
        ax.axis("off")
        ax = axes[row, 1]
        ax.imshow(S[c * K:(c + 1) * K], aspect="auto", cmap="viridis", interpolation="nearest",
                  vmin=0, vmax=max(float(S[c * K:(c + 1) * K].max()), 1e-9))
        for b in range(1, C):
            ax.axvline(b * K - 0.5, color="white", lw=0.4)
        ax.add_patch(plt.Rectangle((c * K - 0.5, -0.5), K, K, fill=False, ec="red", lw=1.2))
        ax.set_yticks(np.arange(K))
        ax.set_yticklabels([str(k) for k in range(K)], fontsize=6)
        for k, tick in enumerate(ax.get_yticklabels()):
            tick.set_color(cmap(k % cmap.N))
        step = max(1, C // 20)
        ax.set_xticks(np.arange(0, M, K * step) + (K - 1) / 2)
        ax.set_xticklabels([str(j) for j in range(0, C, step)], fontsize=6)
        ax.set_xlabel("target class block of S (columns c*K..c*K+K-1)", fontsize=7)
        ax.set_title(f"S rows of class {c}'s sub-classes (dot colours = row labels)", fontsize=8)
    gs = axes[-1, 0].get_gridspec()
    for ax in axes[-1]:
        ax.remove()
    ax = fig.add_subplot(gs[-1, :])
    im = ax.imshow(S, cmap="viridis", aspect="auto", interpolation="nearest")
    ax.set_title(f"score matrix S ({M} x {M} sub-classes, {C} classes x {K})", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return str(png_path)
