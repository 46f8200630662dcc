"""faiss K-means, exact top-k of the full softmax, per-class K-means and label-constrained ids."""

import faiss
import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from kdpipe.errors import KdpipeError
from kdpipe.methods.letkd import penult_topk_targets, subclass_score_matrix
from kdpipe.methods.letkd.fit.clustering import (
    TopkAssigner,
    constrained_nearest,
    kmeans,
    per_class_kmeans,
    subclass_prototypes,
    subsample_indices,
)

faiss.omp_set_num_threads(1)


@pytest.fixture
def x():
    return np.random.default_rng(0).normal(size=(1500, 12)).astype(np.float32)


def test_kmeans_seeded_and_subsampled(x):
    a, b = kmeans(x, 16, seed=3), kmeans(x, 16, seed=3)
    np.testing.assert_array_equal(a.centers, b.centers)
    assert a.centers.shape == (16, 12) and a.num_fit == 1500
    assert kmeans(x, 16, seed=3, max_fit_points=400).num_fit == 400
    np.testing.assert_array_equal(subsample_indices(1000, 10, 1), subsample_indices(1000, 10, 1))
    assert subsample_indices(10, 100, 0) is None
    with pytest.raises(KdpipeError):
        kmeans(x[:5], 16)


@pytest.mark.parametrize("temperature", [1.0, 0.1])
def test_topk_is_exact_top_of_full_softmax(x, temperature):
    centers = kmeans(x, 32, seed=0).centers
    idx, val = TopkAssigner(centers, 5, temperature, max_batch_elems=32 * 97)(x)  # odd batches
    d = ((x[:, None, :].astype(np.float64) - centers[None].astype(np.float64)) ** 2).sum(-1)
    logp = -temperature * d - logsumexp(-temperature * d, axis=1, keepdims=True)
    ref_idx = np.argsort(d, axis=1, kind="stable")[:, :5]
    assert (idx == ref_idx).mean() > 0.999
    np.testing.assert_allclose(val, np.exp(np.take_along_axis(logp, idx, 1)), atol=1e-5)
    assert (val.sum(1) <= 1 + 1e-5).all()
    # the same quantity as letkd.penult_topk_targets (the online side)
    ti, tv = penult_topk_targets(
        torch.from_numpy(x.T.reshape(1, 12, 1, -1).copy()), torch.from_numpy(centers), temperature, 5
    )
    assert (ti.reshape(-1, 5).numpy() == idx).mean() > 0.999
    np.testing.assert_allclose(tv.reshape(-1, 5).numpy(), val, atol=1e-5)


def test_per_class_kmeans_and_constrained_nearest(x):
    y = np.arange(len(x)) % 4
    centers = per_class_kmeans(x, y, 4, 3, seed=0)
    assert centers.shape == (12, 12)
    ids = constrained_nearest(x, y, centers, 3)
    assert ((ids // 3) == y).all()
    d = ((x[:, None, :] - centers[None]) ** 2).sum(-1)
    d[np.arange(12)[None, :] // 3 != y[:, None]] = np.inf
    np.testing.assert_array_equal(ids, d.argmin(1))


def test_prototypes():
    z = np.array([[0.0, 0], [2, 0], [10, 10]])
    p = subclass_prototypes(z, np.array([0, 0, 2]), 3)
    np.testing.assert_allclose(p[0], [1, 0])
    assert np.isnan(p[1]).all()


def test_score_matrix_hand_case():
    # 1-D, sub-classes 0, 1 (class 0) and 2, 3 (class 1); prototypes = means = 1, 3, 10, 20
    z = np.array([[0.0], [0.0], [3.0], [2.5], [2.5], [4.0], [10.0], [10.0], [20.0], [20.0]])
    ids = np.array([0, 0, 0, 1, 1, 1, 2, 2, 3, 3])
    S = subclass_score_matrix(z, ids, 4)
    expected = np.array(
        [
            [2 / 3, 1 / 3, 0, 0],  # 0 -> 1, 0 -> 1, 3 -> 3
            [0, 1, 0, 0],  # 2.5 -> 3 (0.5 < 1.5), 4 -> 3
            [0, 0, 1, 0],
            [0, 0, 0, 1],
        ]
    )
    np.testing.assert_allclose(S, expected)
    np.testing.assert_allclose(S.sum(1), 1.0)
