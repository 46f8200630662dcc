"""`kdpipe cluster` = fit + assignment pass, on the session's tiny store (a copy where changed).

The fit's arrays equal a direct computation from the stored identity-view features; the
assignment pass's targets are checked against the live teacher in tests/test_targets.py; here:
k chosen for the softmax mass, S and prototypes, determinism, coexisting sets, heterogeneous
grids, resume of an interrupted pass, the teacher check, errors.
"""

from types import SimpleNamespace

import faiss
import numpy as np
import pytest
import torch

from kdpipe.artifacts import StoreWriter, open_store
from kdpipe.cli import cli
from kdpipe.config.configs import ClusterConfig
from kdpipe.distributed.teacher_pass import TeacherPassWorker
from kdpipe.errors import KdpipeError, StoreError
from kdpipe.methods.letkd import subclass_score_matrix
from kdpipe.stages.cluster import cluster as run_cluster
from kdpipe.stages.cluster import plot_subclasses

faiss.omp_set_num_threads(1)

ARRAYS = [
    "penult_centers",
    "penult_topk_idx",
    "penult_topk_val",
    "lda_scalings",
    "lda_xbar",
    "subclass_centers",
    "subclass_prototypes",
    "subclass_scores",
    "subclass_idx",
]
FAST = dict(k_penult=8, k_inter=2, topk=4, executor="inline")


def cluster(path, **kw):
    return run_cluster(ClusterConfig(store=str(path), **{**FAST, **kw}), progress=False, verbose=False)


def _arrays(reader, name):
    return {a: np.asarray(reader[f"targets/{name}/{a}"][...]) for a in ARRAYS}


def _vectors(feat, grid=None):
    """[N, 1, D, h, w] -> [N*h*w, D] float64 in (n, y, x) order (pooled to grid)."""
    t = torch.from_numpy(np.asarray(feat)).float()
    n, v, d, h, w = t.shape
    t = t.reshape(n * v, d, h, w)
    if grid is not None:
        t = torch.nn.functional.adaptive_avg_pool2d(t, grid)
    return t.permute(0, 2, 3, 1).reshape(-1, d).double().numpy()


def test_fit_equals_a_direct_computation(tiny_store):
    r = open_store(tiny_store["path"])
    ts = r.target_set("default")
    a = _arrays(r, "default")
    labels = np.asarray(r["labels"][...]).astype(np.int64)
    C, K = ts.num_classes, ts.k_inter
    # penultimate: k = the smallest holding topk_mass at every identity fit vector, capped
    xp = _vectors(r["feat/penult"][...])
    c = a["penult_centers"].astype(np.float64)
    d2 = ((xp[:, None, :] - c[None]) ** 2).sum(-1) * ts.temperature
    p = np.exp(-d2 - np.log(np.exp(-(d2 - d2.min(1, keepdims=True))).sum(1, keepdims=True)) + d2.min(1, keepdims=True))
    needed = (np.cumsum(np.sort(p, 1)[:, ::-1], 1) < ts.topk_mass - 1e-6).sum(1).max() + 1
    assert ts.extra["k_needed_fit_set"] == min(needed, ts.k_penult)
    # a seeded sample of augmented views, run through the teacher, may widen k
    k_needed = max(ts.extra["k_needed_fit_set"], ts.extra["k_needed_view_probe"])
    assert ts.extra["k_needed_for_mass"] == k_needed and ts.topk == min(k_needed, ts.topk_cap)
    assert a["penult_topk_idx"].shape == (r.num_samples, r.num_views, 4, 4, ts.topk)
    # intermediate: per-class faiss K-means (seed + c) on the LDA projection, label-constrained ids
    xi = _vectors(r["feat/inter"][...])
    y = np.repeat(labels, 16)
    z = (xi - a["lda_xbar"]) @ a["lda_scalings"][:, : ts.lda_dims].astype(np.float64)
    for cls in range(C):
        km = faiss.Kmeans(
            z.shape[1], K, niter=20, seed=cls, max_points_per_centroid=10_000_000, min_points_per_centroid=1
        )
        km.train(np.ascontiguousarray(z[y == cls], dtype=np.float32))
        np.testing.assert_allclose(a["subclass_centers"][cls * K : (cls + 1) * K], km.centroids, rtol=1e-3, atol=1e-3)
    dist = ((z[:, None, :] - a["subclass_centers"].astype(np.float64)[None]) ** 2).sum(-1)
    dist[np.arange(C * K)[None, :] // K != y[:, None]] = np.inf
    ids = dist.argmin(1)
    np.testing.assert_allclose(a["subclass_scores"], subclass_score_matrix(z, ids, C * K), atol=1e-5)
    np.testing.assert_allclose(a["subclass_scores"].sum(1), 1.0, atol=1e-6)
    proto = np.stack([z[ids == m].mean(0) if (ids == m).any() else a["subclass_centers"][m] for m in range(C * K)])
    np.testing.assert_allclose(a["subclass_prototypes"], proto, rtol=1e-4, atol=1e-4)
    # the assignment pass put every location in its label's block
    assert (a["subclass_idx"].astype(np.int64) // K == labels[:, None, None, None]).all()
    mass = a["penult_topk_val"].astype(np.float64).sum(-1)
    assert abs(ts.retained_mass_min - mass.min()) < 5e-3 and abs(ts.retained_mass_mean - mass.mean()) < 5e-3


def test_same_seed_identical_and_names_coexist(store_copy, tiny_store):
    path = store_copy["path"]
    first = _arrays(open_store(path), "default")
    record = open_store(path).target_set("default")
    cluster(path, name="again")
    r = open_store(path)
    assert set(r.target_sets()) == {"default", "again"}
    again, untouched = _arrays(r, "again"), _arrays(r, "default")
    for name in ARRAYS:
        np.testing.assert_array_equal(first[name], again[name], err_msg=name)
        np.testing.assert_array_equal(first[name], untouched[name], err_msg=name)
    assert r.target_set("default") == record
    with pytest.raises(StoreError, match="already has a target set"):
        cluster(path, name="default")
    cluster(path, name="default", overwrite=True, seed=1, k_penult=6)
    assert open_store(path).target_set("default").k_penult == 6


def test_heterogeneous_grid_pools_the_teacher_first(store_copy):
    path = store_copy["path"]
    cluster(path, name="g", student_grid="2x2")
    r = open_store(path)
    ts = r.target_set("g")
    assert ts.penult_grid == ts.inter_grid == ts.student_grid == (2, 2)
    assert r[ts.array("subclass_idx")].shape[2:] == (2, 2)
    assert r[ts.array("penult_topk_val")].shape[2:4] == (2, 2)


def test_an_interrupted_assignment_pass_resumes(store_copy, monkeypatch):
    path = store_copy["path"]
    real = TeacherPassWorker.run

    class Killed(Exception):
        pass

    def dies_at_shard_2(self, shard):
        if shard.shard_id == 2 and self.spec.done_array.startswith("targets/"):
            raise Killed
        return real(self, shard)

    monkeypatch.setattr(TeacherPassWorker, "run", dies_at_shard_2)
    with pytest.raises(Killed):
        cluster(path, name="r")
    monkeypatch.setattr(TeacherPassWorker, "run", real)
    r = open_store(path)
    assert "r" not in r.target_sets() and r.target_set("r", include_incomplete=True).extra["fit_done"]
    done = StoreWriter.open(path).done_shards("targets/r/shards_done")
    assert done == {0, 1}
    calls = []
    monkeypatch.setattr(TeacherPassWorker, "run", lambda self, shard: calls.append(shard.shard_id) or real(self, shard))
    cluster(path, name="r", resume=True)
    assert calls == [2, 3]  # only the shards not done
    r = open_store(path)
    for name in ARRAYS:
        np.testing.assert_array_equal(_arrays(r, "r")[name], _arrays(r, "default")[name], err_msg=name)
    assert r.target_set("r").retained_mass_min == pytest.approx(r.target_set("default").retained_mass_min)


def test_the_teacher_must_be_the_stores(store_copy, tmp_path):
    from tests.conftest import calibrated_teacher

    other = tmp_path / "other.pth"
    torch.save({"model": calibrated_teacher("resnet8", 4, seed=1).state_dict()}, other)
    with pytest.raises(StoreError, match="another teacher checkpoint"):
        cluster(store_copy["path"], name="x", teacher=str(other))
    with pytest.raises(KdpipeError, match="does not exist"):
        cluster(store_copy["path"], name="x", teacher=str(tmp_path / "missing.pth"))


def test_drop_features(store_copy):
    path = store_copy["path"]
    cluster(path, name="t", drop_features=True)
    r = open_store(path)
    assert not r.has("feat/penult") and not r.has("feat/inter")
    assert r.manifest.features_dropped is True
    assert r["targets/t/subclass_idx"].shape[0] == r.num_samples
    with pytest.raises(StoreError, match="dropped"):
        cluster(path, name="u")


def test_bad_options_are_refused_before_any_work(store_copy, cli_runner):
    path = store_copy["path"]
    with pytest.raises(KdpipeError, match="lda-dims"):
        cluster(path, name="u", lda_dims=4)  # C - 1 = 3
    with pytest.raises(KdpipeError, match="larger than"):
        cluster(path, name="u", student_grid="8x8")
    with pytest.raises(KdpipeError, match="topk-mass"):
        cluster(path, name="u", topk_mass=1.5)
    with pytest.raises(StoreError, match="no target set 'u' to resume"):
        cluster(path, name="u", resume=True)
    res = cli_runner.invoke(cli, ["cluster", path, "--executor", "inline", "--k-penult", "0"])
    assert res.exit_code == 2 and "--k-penult" in res.output and "Traceback" not in res.output
    res = cli_runner.invoke(cli, ["cluster", path + "-none", "--executor", "inline"])
    assert res.exit_code == 2 and "no kdpipe store" in res.output
    assert open_store(path).target_sets() == ["default"]


def test_plot_subclasses(tiny_store, tmp_path):
    r = open_store(tiny_store["path"])
    labels = np.asarray(r["labels"][...]).astype(np.int64)
    ds = SimpleNamespace(
        labels=labels, policy=None, get_batch=lambda idx: torch.full((len(idx), 3, 16, 16), 128, dtype=torch.uint8)
    )
    png = plot_subclasses(r, "default", 3, tmp_path / "sub.png", ds)
    assert (tmp_path / "sub.png").stat().st_size > 1000 and png.endswith("sub.png")


@pytest.mark.ray
@pytest.mark.slow
def test_ray_equals_inline(store_copy):
    from kdpipe.distributed.executor import ray_cluster

    path = store_copy["path"]
    with ray_cluster(num_cpus=2):
        cluster(path, name="viaray", executor="ray")
    r = open_store(path)
    for name in ARRAYS:
        np.testing.assert_array_equal(_arrays(r, "viaray")[name], _arrays(r, "default")[name], err_msg=name)
