"""K-means and nearest-centre assignment for letKD (faiss or torch; GPU where there is one).

* ``kmeans(x, k, niter=20, seed=0, max_fit_points=None, backend="auto")``: K-means as the
  letKD reference runs it (``faiss.Clustering``, 20 iterations, L2), by one of two backends
  (``resolve_kmeans_backend``): faiss (CPU, or GPU where the installed faiss build sees one),
  or Lloyd iterations in torch (``torch_kmeans``) on CUDA or the CPU, for machines with a CUDA
  torch and no faiss GPU build. ``"auto"``: faiss-gpu when faiss sees a GPU, else torch on
  CUDA when torch sees one, else faiss-cpu (torch on the CPU where faiss is not installed).
  faiss is imported only when used; a missing faiss is one sentence naming the extra.
  faiss's own sub-sampling is
  switched off (``max_points_per_centroid`` huge, like the reference, whose ``run_kmeans``
  sets it to 10,000,000; faiss's defaults, ``faiss.ClusteringParameters()`` in faiss 1.15.1,
  are ``max_points_per_centroid=256``, ``min_points_per_centroid=39``, ``niter=25``,
  ``seed=1234``, i.e. a fit on at most 256 x K points); instead, when
  ``max_fit_points`` is given and smaller than ``len(x)``, a seeded uniform subsample
  (``subsample_indices``) is fitted. Returns ``KMeansResult(centers [k, D] float32, objective,
  num_fit)``, ``objective`` = faiss's objective of the last iteration divided by the number
  of fitted vectors (mean squared distance to the centre each was assigned to in that
  iteration; ``kmeans_objective`` gives it for the final centres).
* ``torch_kmeans``: faiss's algorithm in torch: the initial centres are ``k`` distinct vectors
  of a seeded random permutation (faiss: ``rand_perm`` with the clustering seed), then
  ``niter`` rounds of assign (squared distances as ``|x|^2 - 2 x.c + |c|^2``, one matmul per
  batch of rows, so 3.2M x 256 vectors against 4,096 centres fit a GPU) and update (the mean
  of each cluster, summed in float64); an empty cluster takes half of a cluster drawn with
  probability proportional to its size - 1, both centres nudged apart by 1/1024 in opposite
  directions per dimension (faiss ``Clustering.cpp`` ``split_clusters``).
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

import importlib.util
from dataclasses import dataclass

import numpy as np
import torch

from kdpipe.errors import KdpipeError

__all__ = [
    "KMEANS_BACKENDS",
    "import_faiss",
    "faiss_installed",
    "faiss_gpu_available",
    "resolve_kmeans_backend",
    "initial_centers",
    "torch_kmeans",
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
KMEANS_BACKENDS = ("auto", "faiss", "torch")
# faiss Clustering.cpp: an empty cluster's new centre and the one it splits are moved apart by
# this relative amount, alternating direction per dimension
_SPLIT_EPS = 1.0 / 1024.0


def import_faiss():
    """The faiss module, or one sentence naming the extras that install it."""
    try:
        import faiss
    except ImportError:
        raise KdpipeError(
            "faiss is not installed: install kdpipe's faiss-cpu extra (pip install "
            "'kdpipe[faiss-cpu]'), or its gpu extra on a CUDA machine, or use "
            "--kmeans-backend torch."
        ) from None
    return faiss


def faiss_installed() -> bool:
    """True when a faiss module can be imported (without importing it)."""
    return importlib.util.find_spec("faiss") is not None


def faiss_gpu_available() -> bool:
    """True when faiss is installed and its build sees at least one GPU."""
    if not faiss_installed():
        return False
    get = getattr(import_faiss(), "get_num_gpus", None)
    try:
        return bool(get and get() > 0)
    except Exception:  # pragma: no cover - broken CUDA runtime
        return False


def resolve_kmeans_backend(backend: str = "auto", device: str | None = None) -> tuple[str, str]:
    """``(backend, device)`` K-means runs on: ``("faiss" | "torch", "cpu" | "cuda[:i]")``.

    ``device`` (None, "cpu", "cuda") limits the choice: "cpu" keeps K-means off the GPU.
    ``"auto"``: faiss on the GPU when faiss sees one and torch sees CUDA, else torch on CUDA,
    else faiss on the CPU, else (faiss not installed) torch on the CPU."""
    if backend not in KMEANS_BACKENDS:
        raise KdpipeError(f"The K-means backend must be one of {', '.join(KMEANS_BACKENDS)}, not {backend!r}.")
    want_cpu = device is not None and torch.device(device).type == "cpu"
    cuda = not want_cpu and torch.cuda.is_available()
    if backend == "faiss":
        import_faiss()  # one sentence now, not a traceback later
        return "faiss", "cuda" if cuda and faiss_gpu_available() else "cpu"
    if backend == "torch":
        return "torch", (device or "cuda") if cuda else "cpu"
    if cuda and faiss_gpu_available():
        return "faiss", "cuda"
    if cuda:
        return "torch", device or "cuda"
    return ("faiss" if faiss_installed() else "torch"), "cpu"


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
    objective: float  # the last iteration's objective / num_fit (faiss's definition)
    num_fit: int  # vectors the centres were fitted on
    backend: str = "faiss-cpu"  # which backend fitted them: faiss-cpu, faiss-gpu, torch-cpu, torch-cuda


def kmeans(
    x,
    k: int,
    niter: int = 20,
    seed: int = 0,
    max_fit_points: int | None = None,
    gpu: bool | None = None,
    verbose: bool = False,
    backend: str = "auto",
    device: str | None = None,
    init=None,
) -> KMeansResult:
    """K-means on ``x`` [n, D] (subsampled to ``max_fit_points`` with ``seed``) by ``backend``
    (``resolve_kmeans_backend``; ``gpu`` forces faiss's GPU use on or off). ``init`` [k, D]:
    initial centres for either backend (default: each backend's seeded sample)."""
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim != 2:
        raise ValueError(f"kmeans expects [n, D] vectors, got shape {x.shape}")
    idx = subsample_indices(x.shape[0], max_fit_points, seed)
    if idx is not None:
        x = np.ascontiguousarray(x[idx])
    n = x.shape[0]
    if n < k:
        raise KdpipeError(f"K-means with K={k} needs at least {k} vectors, found {n}.")
    name, dev = resolve_kmeans_backend(backend, device)
    if name == "torch":
        centers, obj = torch_kmeans(x, int(k), niter=niter, seed=seed, device=dev, init=init, verbose=verbose)
        return KMeansResult(centers, obj / n, n, f"torch-{torch.device(dev).type}")
    use_gpu = dev != "cpu" if gpu is None else bool(gpu)
    centers, obj = _faiss_kmeans(x, int(k), niter, seed, use_gpu, verbose, init)
    return KMeansResult(centers, obj / n, n, "faiss-gpu" if use_gpu else "faiss-cpu")


def _faiss_kmeans(
    x: np.ndarray, k: int, niter: int, seed: int, gpu: bool, verbose: bool, init=None
) -> tuple[np.ndarray, float]:
    """faiss K-means without faiss's sub-sampling; (centres, last iteration's objective sum)."""
    faiss = import_faiss()
    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=int(niter),
        seed=int(seed),
        gpu=gpu,
        verbose=verbose,
        max_points_per_centroid=_NO_SUBSAMPLE,
        min_points_per_centroid=1,
    )
    km.train(x, init_centroids=None if init is None else np.ascontiguousarray(init, dtype=np.float32))
    centers = np.ascontiguousarray(km.centroids, dtype=np.float32)
    # faiss's objective of the last iteration (sum of squared distances of the assignment that
    # produced these centres); no extra search pass
    obj = float(km.obj[-1]) if len(km.obj) else kmeans_objective(x, centers) * x.shape[0]
    return centers, obj


def _batch_rows(k: int, max_batch_elems: int) -> int:
    """Rows per distance block so that a [rows, k] float32 block holds ``max_batch_elems``."""
    return max(1, int(max_batch_elems) // max(int(k), 1))


def _assign(
    xb: torch.Tensor, c: torch.Tensor, c2: torch.Tensor, x2b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centre and squared distance of each row of ``xb`` (one matmul for the block)."""
    dist = torch.addmm(c2[None, :], xb, c.T, beta=1.0, alpha=-2.0)
    val, ids = dist.min(dim=1)
    return ids, (val + x2b).clamp_(min=0)


def _add_to_clusters(sums: torch.Tensor, ids: torch.Tensor, xb: torch.Tensor) -> None:
    """sums[ids[i]] += xb[i] in float64. On CUDA a one-hot matmul: index_add_ there uses
    atomics whose order (so the last bits of the sums) changes from run to run."""
    if xb.is_cuda:
        onehot = torch.zeros(ids.shape[0], sums.shape[0], device=xb.device, dtype=xb.dtype)
        onehot[torch.arange(ids.shape[0], device=xb.device), ids] = 1
        sums += (onehot.T @ xb).double()
    else:
        sums.index_add_(0, ids, xb.double())


def _lloyd_step(
    xt: torch.Tensor, x2: torch.Tensor, c: torch.Tensor, rows: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One assign pass: per-cluster float64 sums, counts, and the objective (sum of squared distances)."""
    k = c.shape[0]
    c2 = (c * c).sum(1)
    sums = torch.zeros(k, xt.shape[1], dtype=torch.float64, device=xt.device)
    counts = torch.zeros(k, dtype=torch.int64, device=xt.device)
    obj = torch.zeros((), dtype=torch.float64, device=xt.device)
    for s in range(0, xt.shape[0], rows):
        xb = xt[s : s + rows]
        ids, d = _assign(xb, c, c2, x2[s : s + rows])
        obj += d.double().sum()
        counts += torch.bincount(ids, minlength=k)
        _add_to_clusters(sums, ids, xb)
    return sums, counts, float(obj)


def _split_empty(centers: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> int:
    """faiss's empty-cluster rule, in place: each empty cluster takes a copy of a cluster drawn
    with probability proportional to (its size - 1); the two centres move apart by _SPLIT_EPS."""
    d = centers.shape[1]
    sign = np.where(np.arange(d) % 2 == 0, 1.0, -1.0).astype(np.float32)
    empty = np.flatnonzero(counts == 0)
    for ci in empty:
        weight = np.maximum(counts - 1, 0).astype(np.float64)
        cj = int(rng.choice(len(counts), p=weight / weight.sum()))
        centers[ci] = centers[cj] * (1 + _SPLIT_EPS * sign)
        centers[cj] = centers[cj] * (1 - _SPLIT_EPS * sign)
        counts[ci] = counts[cj] // 2
        counts[cj] -= counts[ci]
    return len(empty)


def initial_centers(x, k: int, seed: int = 0) -> np.ndarray:
    """faiss's initialisation: the first ``k`` entries of a seeded random permutation of the
    vectors (faiss draws its permutation with its own generator, so the sample differs)."""
    x = np.asarray(x)
    return np.ascontiguousarray(x[np.random.default_rng(seed).permutation(x.shape[0])[:k]], dtype=np.float32)


def torch_kmeans(
    x,
    k: int,
    niter: int = 20,
    seed: int = 0,
    device: str = "cpu",
    init=None,
    max_batch_elems: int = 1 << 24,
    verbose: bool = False,
) -> tuple[np.ndarray, float]:
    """Lloyd K-means in torch, faiss's algorithm (module docstring): returns the centres
    [k, D] float32 and the last iteration's objective (sum of squared distances of the
    assignment the final centres were computed from, as faiss's ``obj[-1]``).

    ``init`` [k, D]: start from these centres instead of ``initial_centers(x, k, seed)``.
    ``max_batch_elems`` bounds the [rows, k] distance block (float32): 2^24 = 64 MiB."""
    xt = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32)).to(device)
    n = xt.shape[0]
    if n < k:
        raise KdpipeError(f"K-means with K={k} needs at least {k} vectors, found {n}.")
    c = torch.as_tensor(initial_centers(x, k, seed) if init is None else np.asarray(init, dtype=np.float32))
    c = c.to(xt.device).clone()
    rng = np.random.default_rng((seed, 1))  # draws which cluster an empty one splits
    x2 = (xt * xt).sum(1)
    rows = _batch_rows(k, max_batch_elems)
    obj = 0.0
    for it in range(int(niter)):
        sums, counts, obj = _lloyd_step(xt, x2, c, rows)
        cnt = counts.cpu().numpy()
        centers = (sums / counts.clamp(min=1)[:, None].double()).float().cpu().numpy()
        split = _split_empty(centers, cnt, rng) if (cnt == 0).any() else 0
        c = torch.from_numpy(centers).to(xt.device)
        if verbose:
            print(f"torch K-means iteration {it}: objective {obj:.6g}, {split} empty cluster(s) split", flush=True)
    return c.cpu().numpy(), obj


def _flat_index(centers: np.ndarray, gpu: bool):
    faiss = import_faiss()
    index = faiss.IndexFlatL2(centers.shape[1])
    if gpu:
        res = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, 0, index)
        index._kdpipe_res = res  # keep the resources alive with the index
    index.add(centers)
    return index


def kmeans_seconds(n: int, d: int, k: int, niter: int, probe: int = 8192) -> float:
    """An estimate of a CPU K-means's seconds (n vectors of d dims, k centres, niter
    iterations) from timing one distance product of ``probe`` vectors here: each iteration is
    dominated by the n x k x d distance products. Rough: on digits' 38,400 x 64 vectors, K=128,
    it said 6-10 s where faiss-cpu took 4.7 s (2 loaded cores)."""
    import time

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((min(probe, n), d), dtype=np.float32))
    c = torch.from_numpy(rng.standard_normal((k, d), dtype=np.float32))
    t0 = time.perf_counter()
    (x @ c.T).argmax(dim=1)
    per_vector = (time.perf_counter() - t0) / x.shape[0]
    return per_vector * n * niter


def kmeans_objective(x, centers, batch: int = 65536, device: str = "cpu") -> float:
    """Mean squared L2 distance of each vector to its nearest centre (torch, float64 sum)."""
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    c = torch.as_tensor(np.ascontiguousarray(centers, dtype=np.float32)).to(device)
    c2 = (c * c).sum(1)
    total = 0.0
    for s in range(0, x.shape[0], batch):
        xb = torch.from_numpy(x[s : s + batch]).to(device)
        _, d = _assign(xb, c, c2, (xb * xb).sum(1))
        total += float(d.double().sum())
    return total / max(x.shape[0], 1)


class TopkAssigner:
    """Top-k of ``softmax(-T * ||x - c||^2)`` over all K centres; see the module docstring.

    ``search``: ``"torch"`` (top-k selected on the distance row the normaliser needs anyway),
    ``"faiss"`` (a separate ``IndexFlatL2`` search, GPU index when faiss sees a GPU) or
    ``"auto"`` (default: ``"faiss"`` when faiss sees a GPU, else ``"torch"``)."""

    def __init__(
        self,
        centers,
        k: int,
        temperature: float = 1.0,
        gpu: bool | None = None,
        device: str | None = None,
        max_batch_elems: int = 1 << 22,
        search: str = "auto",
    ):
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
    backend: str = "auto",
    device: str | None = None,
) -> np.ndarray:
    """K-means with ``k`` centres on each class's vectors; returns centres [C*k, d] float32,
    rows ``c*k .. c*k + k - 1`` for class ``c`` (fitted with seed ``seed + c``, by ``backend``)."""
    from tqdm.auto import tqdm

    z = np.asarray(z, dtype=np.float32)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    out = np.empty((num_classes * k, z.shape[1]), dtype=np.float32)
    for c in tqdm(
        range(num_classes), desc="cluster: per-class K-means", unit="class", disable=not progress, leave=False
    ):
        zc = z[labels == c]
        if zc.shape[0] < k:
            raise KdpipeError(
                f"class {c} has {zc.shape[0]} vectors to fit, fewer than its {k} sub-classes "
                "(lower --k-inter or raise --max-fit-points)."
            )
        out[c * k : (c + 1) * k] = kmeans(
            zc, k, niter=niter, seed=seed + c, gpu=gpu, backend=backend, device=device
        ).centers
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
