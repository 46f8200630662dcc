"""K-means backends: torch Lloyd iterations against faiss, the backend choice, a missing faiss."""

import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kdpipe.errors import KdpipeError
from kdpipe.methods.letkd.fit import clustering
from kdpipe.methods.letkd.fit.clustering import (
    _split_empty,
    kmeans,
    kmeans_objective,
    resolve_kmeans_backend,
    torch_kmeans,
)

torch.set_num_threads(1)


@pytest.fixture
def blobs():
    """16 well-separated blobs in 6 dims, 2,000 vectors."""
    rng = np.random.default_rng(0)
    means = rng.normal(size=(16, 6)) * 20
    return (means[rng.integers(0, 16, 2000)] + rng.normal(size=(2000, 6))).astype(np.float32)


def test_torch_objective_close_to_faiss():
    pytest.importorskip("faiss")
    # 4 separated blobs, K=32: a seeded sample of 32 misses a blob with probability 4e-4, so
    # both backends end in comparable minima (within-blob splits) and their objectives agree
    rng = np.random.default_rng(0)
    means = rng.normal(size=(4, 6)) * 20
    x = (means[rng.integers(0, 4, 2000)] + rng.normal(size=(2000, 6))).astype(np.float32)
    f = np.mean([kmeans(x, 32, seed=s, backend="faiss").objective for s in range(3)])
    t = np.mean([kmeans(x, 32, seed=s, backend="torch").objective for s in range(3)])
    assert abs(t - f) / f < 0.05, (t, f)


def test_same_start_same_result_as_faiss(blobs):
    # from the same initial centres the two backends run the same algorithm: same objective
    faiss = pytest.importorskip("faiss")
    faiss.omp_set_num_threads(1)
    init = clustering.initial_centers(blobs, 32, seed=2)
    f = kmeans(blobs, 32, backend="faiss", init=init)
    t = kmeans(blobs, 32, backend="torch", init=init)
    assert abs(t.objective - f.objective) / f.objective < 1e-3, (t.objective, f.objective)
    np.testing.assert_allclose(np.sort(t.centers, 0), np.sort(f.centers, 0), atol=1e-2)


def test_torch_kmeans_seeded_and_lloyd(blobs):
    a = kmeans(blobs, 32, seed=5, backend="torch")
    b = kmeans(blobs, 32, seed=5, backend="torch")
    np.testing.assert_array_equal(a.centers, b.centers)
    assert a.objective == b.objective and a.backend == "torch-cpu" and a.num_fit == 2000
    assert not np.array_equal(a.centers, kmeans(blobs, 32, seed=6, backend="torch").centers)
    # the reported objective is the last assignment's; the update after it can only lower it
    assert kmeans_objective(blobs, a.centers) <= a.objective * (1 + 1e-6)
    # small distance blocks (many batches, a ragged last one) give the same centres
    small, _ = torch_kmeans(blobs, 32, seed=5, max_batch_elems=32 * 77)
    np.testing.assert_allclose(small, a.centers, rtol=1e-5, atol=1e-5)


def test_split_empty_halves_a_cluster():
    centers = np.array([[0.0, 0.0], [2.0, 4.0], [9.0, 9.0]], dtype=np.float32)
    counts = np.array([0, 10, 1])  # only cluster 1 has points to give (size - 1 > 0)
    assert _split_empty(centers, counts, np.random.default_rng(0)) == 1
    np.testing.assert_allclose(centers[0], [2 * (1 + 1 / 1024), 4 * (1 - 1 / 1024)])
    np.testing.assert_allclose(centers[1], [2 * (1 - 1 / 1024), 4 * (1 + 1 / 1024)])
    assert counts.tolist() == [5, 5, 1]


def test_duplicate_initial_centres_are_split():
    # half the vectors are one point: the seeded initial sample holds it several times, so
    # clusters start empty; the split rule must leave every cluster with vectors
    rng = np.random.default_rng(1)
    x = np.concatenate([np.full((300, 4), 5.0), rng.normal(size=(300, 4)) * 3]).astype(np.float32)
    centers, _ = torch_kmeans(x, 16, seed=0)
    nearest = ((x[:, None, :] - centers[None]) ** 2).sum(-1).argmin(1)
    assert len(np.unique(nearest)) == 16


@pytest.fixture
def machine(monkeypatch):
    """Set what the backend choice sees: CUDA in torch, faiss installed, faiss's GPUs."""

    def set_(cuda: bool, faiss: bool, faiss_gpu: bool):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(clustering, "faiss_installed", lambda: faiss)
        monkeypatch.setattr(clustering, "faiss_gpu_available", lambda: faiss_gpu)
        monkeypatch.setattr(clustering, "import_faiss", lambda: None)

    return set_


@pytest.mark.parametrize(
    "cuda, faiss, faiss_gpu, backend, device, expected",
    [
        (True, True, True, "auto", None, ("faiss", "cuda")),
        (True, True, False, "auto", None, ("torch", "cuda")),
        (True, False, False, "auto", "cuda:1", ("torch", "cuda:1")),
        (False, True, False, "auto", None, ("faiss", "cpu")),
        (False, False, False, "auto", None, ("torch", "cpu")),
        (True, True, True, "auto", "cpu", ("faiss", "cpu")),
        (True, True, True, "torch", None, ("torch", "cuda")),
        (False, True, False, "torch", None, ("torch", "cpu")),
        (True, True, False, "faiss", None, ("faiss", "cpu")),
        (True, True, True, "faiss", None, ("faiss", "cuda")),
    ],
)
def test_backend_choice(machine, cuda, faiss, faiss_gpu, backend, device, expected):
    machine(cuda, faiss, faiss_gpu)
    assert resolve_kmeans_backend(backend, device) == expected


def test_unknown_backend_is_one_sentence():
    with pytest.raises(KdpipeError, match="must be one of auto, faiss, torch"):
        resolve_kmeans_backend("sklearn")


def test_missing_faiss_is_one_sentence_naming_the_extra(monkeypatch, blobs):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(KdpipeError) as err:
        kmeans(blobs, 8, backend="faiss")
    msg = str(err.value)
    assert "kdpipe[faiss-cpu]" in msg and "\n" not in msg and msg.count(". ") == 0
    # auto on a CPU machine without faiss falls back to torch instead of failing
    assert kmeans(blobs, 8, backend="auto").backend == "torch-cpu"
    from kdpipe.cli import cli

    res = CliRunner().invoke(cli, ["cluster", "no-such-store.zarr", "--kmeans-backend", "faiss"])
    assert res.exit_code == 2 and "kdpipe[faiss-cpu]" in res.output, res.output
