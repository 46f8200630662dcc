"""Streaming linear discriminant analysis (letKD's intermediate-layer projection).

letKD projects the teacher's intermediate location vectors with an LDA fitted on all of them,
each labelled with its image's class; the reference fits scikit-learn's
``LinearDiscriminantAnalysis`` in memory and keeps ``scalings_`` and ``xbar_``. Here the same
fit is done over chunks, in memory independent of the number of vectors:

* ``LDAStats.update(x [n, D], y [n])`` accumulates, in float64, per-class counts, per-class sums
  and the within-class scatter ``W = sum_c sum_{y_i = c} (x_i - mu_c)(x_i - mu_c)^T``. Each
  chunk's scatter is taken about the chunk's own class means and combined with the pairwise
  (Chan et al.) update, so nothing is computed as a difference of large raw moments.
* ``LDAStats.merge(other)`` combines two partial statistics the same way (the reduce step of a
  map-reduce over shards); the result does not depend on how the data were split, up to
  float64 rounding.
* ``LDAStats.fit(n_components)`` solves scikit-learn's ``solver="eigen"`` problem
  (sklearn/discriminant_analysis.py, ``_solve_eigen``) exactly: with empirical priors
  ``p_c = n_c / N`` and sklearn's biased per-class covariances, the within-class covariance
  ``Sw = sum_c p_c Cov_c`` equals ``W / N`` and the between-class scatter ``Sb = St - Sw``
  equals ``B / N`` with ``B = sum_c n_c (mu_c - xbar)(mu_c - xbar)^T``. The generalised
  symmetric problem ``Sb w = lambda Sw w`` is solved with ``scipy.linalg.eigh(Sb, Sw)`` (so
  ``W^T Sw W = I``, sklearn's normalisation), eigenvectors sorted by decreasing eigenvalue.

``scalings`` [D, D] are those sorted eigenvectors (sklearn's ``scalings_``), ``xbar`` [D] the
priors-weighted mean of the class means (sklearn's ``xbar_``, i.e. the mean of all vectors).
The projection is ``z = (f - xbar) @ scalings[:, :d]`` with ``d <= min(C - 1, D)``: sklearn's
eigen-solver ``transform`` is ``X @ scalings_`` without centering, so the two differ only by
the constant row ``xbar @ scalings[:, :d]`` (and, as for any eigenvector, by sign).

Sign convention: each column of ``scalings`` is flipped so that its entry of largest absolute
value is positive, so shard size, worker count and LAPACK build do not flip components.

Singular within-class scatter (e.g. a ReLU channel that is zero on every vector, or fewer
vectors than dimensions) makes the eigenproblem ill-posed; sklearn would fail. ``fit`` then
adds a ridge ``1e-6 * mean(diag(Sw))`` (or ``ridge`` if given) to ``Sw`` and reports it in
``LDAResult.ridge``; with a positive-definite ``Sw`` the ridge is 0 and the result is sklearn's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from kdpipe.errors import KdpipeError

__all__ = ["LDAStats", "LDAResult", "lda_project", "fit_lda"]


@dataclass
class LDAResult:
    """A fitted LDA. ``scalings`` [D, D] float64 (columns sorted by decreasing eigenvalue),
    ``xbar`` [D] float64, ``eigenvalues`` [D] (sorted), ``priors`` [C] (0 for absent classes),
    ``max_components`` = min(classes present - 1, D), ``ridge`` added to Sw (0 when Sw is PD),
    ``num_samples`` N."""

    scalings: np.ndarray
    xbar: np.ndarray
    eigenvalues: np.ndarray
    priors: np.ndarray
    max_components: int
    ridge: float
    num_samples: int

    def transform(self, x, n_components: int | None = None) -> np.ndarray:
        """z = (x - xbar) @ scalings[:, :d]; d defaults to max_components."""
        d = self.max_components if n_components is None else int(n_components)
        return lda_project(x, self.scalings, self.xbar, d)


def lda_project(x, scalings, xbar, n_components: int, dtype=np.float32) -> np.ndarray:
    """The letKD projection ``z = (x - xbar) @ scalings[:, :n_components]`` in ``dtype``
    (float32 in the cluster stage: x, xbar and scalings are cast to float32 first)."""
    x = np.asarray(x, dtype=dtype)
    w = np.asarray(scalings, dtype=dtype)[:, :n_components]
    return (x - np.asarray(xbar, dtype=dtype)) @ w


class LDAStats:
    """Sufficient statistics of a streaming LDA; memory O(C*D + D^2), independent of N.

    ``counts`` int64 [C], ``sums`` float64 [C, D], ``within`` float64 [D, D] (scatter about
    the class means). Labels must be integers in [0, num_classes).
    """

    def __init__(self, num_classes: int, dim: int):
        self.num_classes = int(num_classes)
        self.dim = int(dim)
        self.counts = np.zeros(self.num_classes, dtype=np.int64)
        self.sums = np.zeros((self.num_classes, self.dim), dtype=np.float64)
        self.within = np.zeros((self.dim, self.dim), dtype=np.float64)

    # -- accumulation ---------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return int(self.counts.sum())

    def _means(self) -> np.ndarray:
        n = np.maximum(self.counts, 1)[:, None]
        return self.sums / n

    #: rows per float64 block in ``update`` (a block's float64 copy is block x D x 8 bytes)
    block_rows = 32768

    def update(self, x, y) -> LDAStats:
        """Add a chunk of vectors ``x`` [n, D] with class labels ``y`` [n].

        The chunk is taken in blocks of ``block_rows`` rows, each cast to float64 once (no sort,
        no gather of the whole chunk): class counts by ``np.bincount``, class sums by a sparse
        one-hot product (``onehot [C, b] @ xb``, O(b*D) whatever C), the block centred in place
        on its own class means (``xb -= means[yb]``) and its scatter ``xb^T xb`` (one BLAS
        syrk/gemm), folded in with the pairwise update of ``merge``.
        """
        x = np.asarray(x)
        y = np.asarray(y).astype(np.int64, copy=False).reshape(-1)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"LDAStats.update expects x of shape [n, {self.dim}], got {x.shape}")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} rows but y has {y.shape[0]} labels")
        if x.shape[0] == 0:
            return self
        if y.min() < 0 or y.max() >= self.num_classes:
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got {y.min()}..{y.max()}")
        import scipy.sparse

        c = self.num_classes
        step = max(1, int(self.block_rows))
        for s in range(0, x.shape[0], step):
            yb = y[s : s + step]
            nb = yb.shape[0]
            xb = np.array(x[s : s + step], dtype=np.float64, order="C")  # the block's one copy
            other = LDAStats(c, self.dim)
            other.counts = np.bincount(yb, minlength=c).astype(np.int64)
            onehot = scipy.sparse.csr_matrix((np.ones(nb), (yb, np.arange(nb))), shape=(c, nb))
            other.sums = np.asarray(onehot @ xb)
            xb -= other._means()[yb]
            other.within = xb.T @ xb
            self.merge(other)
        return self

    def merge(self, other: LDAStats) -> LDAStats:
        """Fold ``other`` into ``self`` (in place) and return ``self``."""
        if other.num_classes != self.num_classes or other.dim != self.dim:
            raise ValueError("cannot merge LDA statistics of different shapes")
        na = self.counts.astype(np.float64)
        nb = other.counts.astype(np.float64)
        n = na + nb
        both = (na > 0) & (nb > 0)
        within = self.within + other.within
        if both.any():
            diff = self._means()[both] - other._means()[both]
            w = na[both] * nb[both] / n[both]
            within += (diff * w[:, None]).T @ diff
        self.within = within
        self.counts = self.counts + other.counts
        self.sums = self.sums + other.sums
        return self

    # -- transport (Ray, JSON-free pickling is fine, but plain arrays travel lighter) -------
    def to_arrays(self) -> dict:
        return {"counts": self.counts, "sums": self.sums, "within": self.within}

    @classmethod
    def from_arrays(cls, arrays: dict) -> LDAStats:
        counts = np.asarray(arrays["counts"], dtype=np.int64)
        sums = np.asarray(arrays["sums"], dtype=np.float64)
        s = cls(counts.shape[0], sums.shape[1])
        s.counts, s.sums = counts.copy(), sums.copy()
        s.within = np.asarray(arrays["within"], dtype=np.float64).copy()
        return s

    # -- the fit -----------------------------------------------------------------------------
    def fit(self, n_components: int | None = None, ridge: float | None = None) -> LDAResult:
        """Solve ``Sb w = lambda Sw w`` as sklearn's eigen solver does; see the module docstring."""
        n_total = self.num_samples
        present = self.counts > 0
        n_present = int(present.sum())
        if n_present < 2:
            raise KdpipeError(f"LDA needs vectors of at least 2 classes, found {n_present} class(es) with data.")
        if n_total <= n_present:
            raise KdpipeError(f"LDA needs more vectors than classes, found {n_total} vectors for {n_present} classes.")
        max_components = min(n_present - 1, self.dim)
        if n_components is not None and not 1 <= n_components <= max_components:
            raise KdpipeError(
                f"LDA dimension must lie in 1..{max_components} (classes - 1, feature size), got {n_components}."
            )
        priors = self.counts / float(n_total)
        means = self._means()
        xbar = priors @ means
        sw = self.within / n_total
        dm = (means - xbar)[present]
        sb = (dm * priors[present][:, None]).T @ dm
        sw = (sw + sw.T) / 2
        sb = (sb + sb.T) / 2
        added = 0.0
        if ridge is not None and ridge > 0:
            added = float(ridge)
        else:
            try:
                np.linalg.cholesky(sw)
            except np.linalg.LinAlgError:
                added = 1e-6 * max(float(np.mean(np.diag(sw))), np.finfo(np.float64).tiny)
        if added:
            sw = sw + added * np.eye(self.dim)
        try:
            evals, evecs = scipy.linalg.eigh(sb, sw)
        except np.linalg.LinAlgError as err:  # pragma: no cover - ridge makes Sw PD
            raise KdpipeError(f"LDA eigenproblem failed even with a ridge of {added:g}: {err}.") from err
        order = np.argsort(evals)[::-1]
        evals, evecs = evals[order], evecs[:, order]
        pivot = np.argmax(np.abs(evecs), axis=0)
        signs = np.sign(evecs[pivot, np.arange(evecs.shape[1])])
        signs[signs == 0] = 1.0
        evecs = evecs * signs
        return LDAResult(
            scalings=evecs,
            xbar=xbar,
            eigenvalues=evals,
            priors=priors,
            max_components=max_components,
            ridge=added,
            num_samples=n_total,
        )


def fit_lda(x, y, num_classes: int | None = None, chunk_size: int | None = None, **kw) -> LDAResult:
    """Convenience: fit on in-memory data (optionally in chunks of ``chunk_size`` rows)."""
    x = np.asarray(x)
    y = np.asarray(y).astype(np.int64)
    c = int(y.max()) + 1 if num_classes is None else int(num_classes)
    stats = LDAStats(c, x.shape[1])
    step = x.shape[0] if not chunk_size else int(chunk_size)
    for s in range(0, x.shape[0], max(step, 1)):
        stats.update(x[s : s + step], y[s : s + step])
    return stats.fit(**kw)
