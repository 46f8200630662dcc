"""K-means and nearest-centre assignment for letKD (faiss; GPU when faiss sees one).

* ``kmeans(x, k, niter=20, seed=0, max_fit_points=None)``: faiss K-means, as the letKD
  reference runs it (``faiss.Clustering``, 20 iterations, L2). faiss's own sub-sampling is
  switched off (``max_points_per_centroid`` huge, like the reference, whose ``run_kmeans``
  sets it to 10,000,000; faiss's defaults, ``faiss.ClusteringParameters()`` in faiss 1.15.1,
  are ``max_points_per_centroid=256``, ``min_points_per_centroid=39``, ``niter=25``,
  ``seed=1234``, i.e. a fit on at most 256 x K points); instead, when
  ``max_fit_points`` is given and smaller than ``len(x)``, a seeded uniform subsample
  (``subsample_indices``) is fitted. Returns ``KMeansResult(centers [k, D] float32, objective,
  num_fit)``, ``objective`` = faiss's objective of the last iteration divided by the number
  of fitted vectors (mean squared distance to the centre each was assigned to in that
  iteration; ``kmeans_objective`` gives it for the final centres).
* ``TopkAssigner(centers, k, temperature, search="auto")``: for vectors ``x`` [n, D] returns
  the ``k`` nearest centres and their probabilities under
  ``p_j = softmax_j(-T * ||x - c_j||^2)`` over *all* K centres. The log-normaliser is a
  logsumexp over the full distance row, computed exactly in batches (torch, float32), so the
  stored values are the true top-k entries of the full softmax and their sum is the
  probability mass the top-k keeps.
  Why the top-k is selected with ``torch.topk`` on that row by default (``search="torch"``):
  the exact normaliser needs all K distances of every vector, so the row is computed anyway;
  a separate nearest-centre search (faiss ``IndexFlatL2``) recomputes the same K distances
  and, on CPU, only repeats work (it was half of the assignment time on digits). ``"auto"``
  (default) uses ``search="faiss"`` (GPU index) only where faiss sees a GPU, else torch;
  ``search="faiss"`` keeps the separate search available on any machine. Both give the same
  indices except at exact distance ties. In the torch path the row's maximum is its top-1,
  so the logsumexp is ``m + log(sum(exp(row - m)))`` computed in place on the row.
* ``per_class_kmeans(z, labels, num_classes, k)``: one K-means per class (letKD's sub-classes);
  centre ``c*k + j`` is sub-class ``j`` of class ``c``; class ``c`` uses seed ``seed + c``.
* ``constrained_nearest(z, labels, centers, k)``: per vector, ``c*k + argmin_j ||z - centers[c*k+j]||^2``
  with ``c`` its label (ties: lowest j), distances in float64.
* ``subclass_prototypes(z, ids, m)``: mean of the vectors of each sub-class ([m, d]; NaN rows
  for empty sub-classes).
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
import torch

from kdpipe.errors import KdpipeError

__all__ = [
    "faiss_gpu_available",
    "subsample_indices",
    "KMeansResult",
    "kmeans",
    "kmeans_objective",
    "TopkAssigner",
    "topk_assign",
    "per_class_kmeans",
    "constrained_nearest",
    "subclass_prototypes",
]

_NO_SUBSAMPLE = 1 << 30


def faiss_gpu_available() -> bool:
    """True when this faiss build sees at least one GPU."""
    get = getattr(faiss, "get_num_gpus", None)
    try:
        return bool(get and get() > 0)
    except Exception:  # pragma: no cover - broken CUDA runtime
        return False


def subsample_indices(n: int, max_points: int | None, seed: int) -> np.ndarray | None:
    """Sorted indices of a seeded uniform subsample of ``range(n)`` of size ``max_points``,
    or None when ``max_points`` is None or ``n <= max_points`` (use everything)."""
    if max_points is None or n <= max_points:
        return None
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=int(max_points), replace=False))


@dataclass
class KMeansResult:
    centers: np.ndarray  # [k, D] float32
    objective: float  # faiss's last-iteration objective / num_fit
    num_fit: int  # vectors the centres were fitted on


def kmeans(
    x,
    k: int,
    niter: int = 20,
    seed: int = 0,
    max_fit_points: int | None = None,
    gpu: bool | None = None,
    verbose: bool = False,
) -> KMeansResult:
    """faiss K-means on ``x`` [n, D] (subsampled to ``max_fit_points`` with ``seed``)."""
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim != 2:
        raise ValueError(f"kmeans expects [n, D] vectors, got shape {x.shape}")
    idx = subsample_indices(x.shape[0], max_fit_points, seed)
    if idx is not None:
        x = np.ascontiguousarray(x[idx])
    n, d = x.shape
    if n < k:
        raise KdpipeError(f"K-means with K={k} needs at least {k} vectors, found {n}.")
    use_gpu = faiss_gpu_available() if gpu is None else bool(gpu)
    km = faiss.Kmeans(
        d,
        int(k),
        niter=int(niter),
        seed=int(seed),
        gpu=use_gpu,
        verbose=verbose,
        max_points_per_centroid=_NO_SUBSAMPLE,
        min_points_per_centroid=1,
    )
    km.train(x)
    centers = np.ascontiguousarray(km.centroids, dtype=np.float32)
    # faiss's objective of the last iteration (sum of squared distances of the assignment that
    # produced these centres); no extra search pass
    obj = float(km.obj[-1]) / n if len(km.obj) else kmeans_objective(x, centers, gpu=use_gpu)
    return KMeansResult(centers=centers, objective=obj, num_fit=n)


def _flat_index(centers: np.ndarray, gpu: bool):
    index = faiss.IndexFlatL2(centers.shape[1])
    if gpu:
        res = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, 0, index)
        index._kdpipe_res = res  # keep the resources alive with the index
    index.add(centers)
    return index


def kmeans_objective(x, centers, gpu: bool | None = None, batch: int = 65536) -> float:
    """Mean squared L2 distance of each vector to its nearest centre."""
    x = np.asarray(x, dtype=np.float32)
    centers = np.ascontiguousarray(centers, dtype=np.float32)
    index = _flat_index(centers, faiss_gpu_available() if gpu is None else gpu)
    total = 0.0
    for s in range(0, x.shape[0], batch):
        dist, _ = index.search(np.ascontiguousarray(x[s : s + batch]), 1)
        total += float(np.maximum(dist, 0).astype(np.float64).sum())
    return total / max(x.shape[0], 1)


class TopkAssigner:
    """Top-k of ``softmax(-T * ||x - c||^2)`` over all K centres; see the module docstring.

    ``search``: ``"torch"`` (top-k selected on the distance row the normaliser needs anyway),
    ``"faiss"`` (a separate ``IndexFlatL2`` search, GPU index when faiss sees a GPU) or
    ``"auto"`` (default: ``"faiss"`` when faiss sees a GPU, else ``"torch"``)."""

    def __init__(self, centers, k: int, temperature: float = 1.0, gpu: bool | None = None,
                 device: str | None = None, max_batch_elems: int = 1 << 22, search: str = "auto"):
        self.centers = np.ascontiguousarray(np.asarray(centers, dtype=np.float32))
        self.num_centers = self.centers.shape[0]
        self.k = int(min(k, self.num_centers))
        self.temperature = float(temperature)
        self.gpu = faiss_gpu_available() if gpu is None else bool(gpu)
        if search not in ("auto", "faiss", "torch"):
            raise ValueError(f"search must be 'auto', 'faiss' or 'torch', not {search!r}")
        if search == "auto":
            search = "faiss" if self.gpu else "torch"
        self.search = search
        self.index = _flat_index(self.centers, self.gpu) if search == "faiss" else None
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self._c = torch.from_numpy(self.centers).to(self.device)
        self._c2 = (self._c * self._c).sum(1)
        self.batch = max(1, int(max_batch_elems // max(self.num_centers, 1)))

    def __call__(self, x):
        """x [n, D] -> (indices int64 [n, k] by increasing distance, probabilities float32 [n, k])."""
        x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
        n = x.shape[0]
        idx_out = np.empty((n, self.k), dtype=np.int64)
        val_out = np.empty((n, self.k), dtype=np.float32)
        t = self.temperature
        for s in range(0, n, self.batch):
            xb = x[s : s + self.batch]
            xt = torch.from_numpy(xb).to(self.device)
            # full squared-distance row, exact normaliser over all K centres
            dist = torch.addmm(self._c2[None, :], xt, self._c.T, beta=1.0, alpha=-2.0)
            dist += (xt * xt).sum(1, keepdim=True)
            dist.clamp_(min=0)
            logits = dist.mul_(-t)
            if self.index is not None:
                lse = torch.logsumexp(logits, dim=1, keepdim=True)
                _, ib = self.index.search(xb, self.k)
                it = torch.from_numpy(ib).to(self.device)
                sel = logits.gather(1, it) - lse
            else:  # the row is already there: select on it, and its top-1 is the row's max
                top, it = torch.topk(logits, self.k, dim=1)
                m = top[:, :1]
                # logsumexp = m + log(sum(exp(logits - m))), in place on the row (as torch.logsumexp)
                lse = m + logits.sub_(m).exp_().sum(1, keepdim=True).log_()
                sel = top - lse
                ib = it.cpu().numpy()
            idx_out[s : s + len(xb)] = ib
            val_out[s : s + len(xb)] = sel.exp_().cpu().numpy()
        return idx_out, val_out


def topk_assign(x, centers, k: int, temperature: float = 1.0, gpu: bool | None = None):
    """One-shot ``TopkAssigner(centers, k, temperature)(x)``."""
    return TopkAssigner(centers, k, temperature, gpu=gpu)(x)


def per_class_kmeans(
    z,
    labels,
    num_classes: int,
    k: int,
    niter: int = 20,
    seed: int = 0,
    gpu: bool | None = None,
    progress: bool = False,
) -> np.ndarray:
    """K-means with ``k`` centres on each class's vectors; returns centres [C*k, d] float32,
    rows ``c*k .. c*k + k - 1`` for class ``c`` (fitted with seed ``seed + c``)."""
    from tqdm.auto import tqdm

    z = np.asarray(z, dtype=np.float32)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    out = np.empty((num_classes * k, z.shape[1]), dtype=np.float32)
    for c in tqdm(range(num_classes), desc="cluster: per-class K-means", unit="class", disable=not progress,
                  leave=False):
        zc = z[labels == c]
        if zc.shape[0] < k:
            raise KdpipeError(
                f"class {c} has {zc.shape[0]} vectors to fit, fewer than its {k} sub-classes "
                "(lower --k-inter or raise --max-fit-points)."
            )
        out[c * k : (c + 1) * k] = kmeans(zc, k, niter=niter, seed=seed + c, gpu=gpu).centers
    return out


def constrained_nearest(z, labels, centers, k: int, batch: int = 16384) -> np.ndarray:
    """``labels*k + argmin_j ||z - centers[labels*k + j]||^2`` (int64 [n]), float64 distances."""
    z = np.asarray(z)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    blocks = np.asarray(centers, dtype=np.float64).reshape(-1, k, np.asarray(centers).shape[1])
    out = np.empty(z.shape[0], dtype=np.int64)
    for s in range(0, z.shape[0], batch):
        zb = z[s : s + batch].astype(np.float64)
        lb = labels[s : s + batch]
        diff = zb[:, None, :] - blocks[lb]
        out[s : s + batch] = lb * k + np.argmin(np.einsum("nkd,nkd->nk", diff, diff), axis=1)
    return out


def subclass_prototypes(z, ids, m: int) -> np.ndarray:
    """Mean of the vectors of each of the ``m`` sub-classes: [m, d] float32 (NaN if empty)."""
    z = np.asarray(z, dtype=np.float64)
    ids = np.asarray(ids).astype(np.int64).reshape(-1)
    counts = np.bincount(ids, minlength=m).astype(np.float64)
    sums = np.stack([np.bincount(ids, weights=z[:, j], minlength=m) for j in range(z.shape[1])], 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sums / counts[:, None]).astype(np.float32)
