"""Streaming LDA: equals scikit-learn's LinearDiscriminantAnalysis, whatever the chunking."""

import numpy as np
import pytest
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

from kdpipe.errors import KdpipeError
from kdpipe.methods.letkd.fit.lda import LDAStats, fit_lda, lda_project


def _data(n=600, c=5, d=9, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    x = rng.normal(size=(n, d)) * rng.uniform(0.5, 2.0, d) + 3.0 * rng.normal(size=(c, d))[y] + 10.0
    return x, y


def _match_up_to_sign(a, b, rtol=1e-4):
    signs = np.sign((a * b).sum(0))
    assert np.all(signs != 0)
    err = np.abs(a * signs - b).max() / np.abs(b).max()
    assert err < rtol, err


def test_projection_equals_sklearn_eigen_up_to_sign():
    x, y = _data()
    sk = LinearDiscriminantAnalysis(solver="eigen").fit(x, y)
    ref = sk.transform(x)  # X @ scalings_ (the eigen solver does not centre)
    res = fit_lda(x, y)
    d = res.max_components
    assert d == ref.shape[1] == 4
    z = (x - res.xbar) @ res.scalings[:, :d]
    # equal up to the sign of each component, once the constant row xbar @ scalings is removed
    _match_up_to_sign(z, ref - res.xbar @ sk.scalings_[:, :d])
    _match_up_to_sign(res.scalings[:, :d], sk.scalings_[:, :d])
    np.testing.assert_allclose(res.xbar, x.mean(0), rtol=1e-12)


def test_projection_equals_reference_svd_solver_transform():
    # the letKD reference fits LinearDiscriminantAnalysis() (svd solver) and stores
    # scalings_/xbar_; its transform (X - xbar_) @ scalings_ is the same projection
    x, y = _data(seed=1)
    sk = LinearDiscriminantAnalysis().fit(x, y)
    res = fit_lda(x, y)
    _match_up_to_sign(res.transform(x).astype(np.float64), sk.transform(x))
    np.testing.assert_allclose(res.xbar, sk.xbar_, rtol=1e-10)


@pytest.mark.parametrize("chunk", [1, 7, 64, 599])
def test_streaming_equals_one_shot(chunk):
    x, y = _data(seed=2)
    one = fit_lda(x, y)
    stream = fit_lda(x, y, chunk_size=chunk)
    np.testing.assert_allclose(stream.scalings[:, :4], one.scalings[:, :4], rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(stream.xbar, one.xbar, rtol=1e-12)


def test_merge_is_map_reduce():
    x, y = _data(seed=3)
    parts = [LDAStats(5, x.shape[1]).update(x[a:b], y[a:b]) for a, b in [(0, 100), (100, 350), (350, 600)]]
    total = LDAStats(5, x.shape[1])
    for p in reversed(parts):  # any order
        total.merge(LDAStats.from_arrays(p.to_arrays()))
    one = LDAStats(5, x.shape[1]).update(x, y)
    np.testing.assert_allclose(total.within, one.within, rtol=1e-10)
    np.testing.assert_array_equal(total.counts, one.counts)
    np.testing.assert_allclose(total.fit().scalings[:, :4], one.fit().scalings[:, :4], rtol=1e-7, atol=1e-9)


def test_n_components_and_projection_helper():
    x, y = _data(seed=4)
    res = fit_lda(x, y, n_components=2)
    z = lda_project(x, res.scalings, res.xbar, 2)
    assert z.shape == (x.shape[0], 2) and z.dtype == np.float32
    with pytest.raises(KdpipeError):
        fit_lda(x, y, n_components=5)  # > C - 1


def test_singular_within_scatter_gets_a_ridge():
    x, y = _data(seed=5)
    x = np.concatenate([x, np.zeros((x.shape[0], 1))], 1)  # a dead channel
    res = fit_lda(x, y)
    assert res.ridge > 0 and np.isfinite(res.scalings).all()
    assert fit_lda(*_data(seed=5)).ridge == 0.0
