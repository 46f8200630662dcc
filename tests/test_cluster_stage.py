"""`kdpipe cluster` on a tiny store: stored targets equal a direct numpy computation from the
stored features, S equals letkd.subclass_score_matrix, target sets coexist, errors are clear."""

from types import SimpleNamespace

import faiss
import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from kdpipe.artifacts import StoreWriter, open_store
from kdpipe.artifacts.schema import ArraySpec, build_manifest, extraction_specs, plan_shards
from kdpipe.cli import cli
from kdpipe.errors import StoreError
from kdpipe.methods.letkd import subclass_score_matrix
from kdpipe.stages.cluster import cluster, plot_subclasses

faiss.omp_set_num_threads(1)

ARRAYS = ["penult_centers", "penult_topk_idx", "penult_topk_val", "lda_scalings", "lda_xbar",
          "subclass_centers", "subclass_prototypes", "subclass_scores", "subclass_idx"]
FAST = dict(k_penult=16, k_inter=3, topk=4, executor="inline", verbose=False)


def make_store(path, N=48, V=2, C=4, Dp=8, Di=6, hw=(4, 4), shard=16, seed=0, features=("penult", "inter"),
               complete=True):
    """A complete store written with the writer API: labels, feat/penult, feat/inter (float16)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(N) % C
    feats = {}
    if "penult" in features:
        feats["penult"] = (Dp,) + hw
    if "inter" in features:
        feats["inter"] = (Di,) + hw
    specs = extraction_specs(N, V, 3, C, hw, features=feats)
    specs.append(ArraySpec("labels", (N,), "int64", "class label of each sample"))
    specs = [s.with_chunks(shard) for s in specs]
    man = build_manifest(
        teacher={"arch": "toy", "sha256": "0", "num_classes": C},
        dataset={"name": "toy", "split": "train", "fingerprint": "f", "num_samples": N, "num_classes": C,
                 "mean": [0, 0, 0], "std": [1, 1, 1], "image_size": [16, 16]},
        views={"policy": "cifar", "mode": str(V), "num_views": V, "seed": 0, "pad_mode": "zero"},
        layers=list(feats), specs=specs, shard_size=shard, num_samples=N)
    w = StoreWriter.create(str(path), man, specs, overwrite=True)
    means = rng.normal(size=(C, Di)) * 2
    for sid, (a, b) in enumerate(plan_shards(N, shard)):
        n = b - a
        w.write_rows("labels", a, labels[a:b])
        if "penult" in feats:
            w.write_rows("feat/penult", a, rng.gamma(2.0, size=(n, V, Dp) + hw).astype(np.float16))
        if "inter" in feats:
            x = rng.normal(size=(n, V, Di) + hw) + means[labels[a:b]][:, None, :, None, None]
            w.write_rows("feat/inter", a, x.astype(np.float16))
        if complete or sid == 0:
            w.mark_shard_done(sid)
    if complete:
        w.finalize()
    return str(path), labels


def _vectors(feat, grid=None):
    """[N, V, D, h, w] -> [N*V*h*w, D] float64 in (n, v, y, x) order (pooled to grid)."""
    t = torch.from_numpy(np.asarray(feat)).float()
    n, v, d, h, w = t.shape
    t = t.reshape(n * v, d, h, w)
    if grid is not None:
        t = torch.nn.functional.adaptive_avg_pool2d(t, grid)
    return t.permute(0, 2, 3, 1).reshape(-1, d).double().numpy(), t.shape[-2:]


def _arrays(reader, name):
    return {a: np.asarray(reader[f"targets/{name}/{a}"][...]) for a in ARRAYS}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    path, labels = make_store(tmp_path_factory.mktemp("st") / "s.zarr")
    cluster(path, name="default", **FAST)
    return path, labels


@pytest.mark.parametrize("grid", [None, (2, 2)])
def test_targets_equal_direct_computation(tmp_path, grid):
    path, labels = make_store(tmp_path / "s.zarr")
    cluster(path, name="t", student_grid=grid, **FAST)
    _check_against_numpy(open_store(path), "t", labels, grid)


@pytest.mark.slow
def test_on_a_store_made_by_extract(tmp_path):
    """The real stage-one chain: extract-teacher (resnet8, synthetic data, 2 seeded views)."""
    extract = pytest.importorskip("kdpipe.stages.extract")
    from kdpipe.models import build

    torch.manual_seed(0)
    torch.save({"model": build("resnet8", num_classes=4).state_dict()}, tmp_path / "t.pth")
    path = tmp_path / "x.zarr"
    extract.extract_teacher(tmp_path / "t.pth", "resnet8", "synthetic:n=24,classes=4,size=16,seed=0", path,
                            views="2", cam_res=(2,), executor="inline", progress=False, verbose=False)
    cluster(str(path), name="t", **{**FAST, "k_penult": 8, "k_inter": 2})
    r = open_store(str(path))
    _check_against_numpy(r, "t", np.asarray(r["labels"][...]).astype(np.int64), None)


def _check_against_numpy(r, name, labels, grid):
    a = _arrays(r, name)
    attrs = r.target_attrs(name)
    N, V = r["feat/penult"].shape[:2]
    K, k, C = attrs["K_inter"], attrs["topk"], attrs["num_classes"]
    # penultimate: top-k of the full softmax over all centres
    xp, (hp, wp) = _vectors(r["feat/penult"][...], grid)
    c = a["penult_centers"].astype(np.float64)
    d2 = ((xp[:, None, :] - c[None]) ** 2).sum(-1)
    logp = -d2 - logsumexp(-d2, axis=1, keepdims=True)
    ref_idx = np.argsort(d2, 1, kind="stable")[:, :k]
    got_idx = a["penult_topk_idx"].reshape(-1, k).astype(np.int64)
    assert a["penult_topk_idx"].shape == (N, V, hp, wp, k)
    assert (got_idx == ref_idx).mean() > 0.995
    np.testing.assert_allclose(a["penult_topk_val"].reshape(-1, k).astype(np.float64),
                               np.exp(np.take_along_axis(logp, got_idx, 1)), atol=2e-3)
    mass = a["penult_topk_val"].astype(np.float64).sum(-1)
    assert abs(attrs["retained_mass_min"] - mass.min()) < 5e-3
    assert abs(attrs["retained_mass_mean"] - mass.mean()) < 5e-3
    # intermediate: label-constrained nearest sub-class of the LDA projection
    xi, (hi, wi) = _vectors(r["feat/inter"][...], grid)
    dl = attrs["lda_dims"]
    z = (xi - a["lda_xbar"]) @ a["lda_scalings"][:, :dl].astype(np.float64)
    y = np.repeat(labels, V * hi * wi)
    dist = ((z[:, None, :] - a["subclass_centers"].astype(np.float64)[None]) ** 2).sum(-1)
    dist[np.arange(C * K)[None, :] // K != y[:, None]] = np.inf
    ids = a["subclass_idx"].reshape(-1).astype(np.int64)
    assert a["subclass_idx"].shape == (N, V, hi, wi)
    assert (ids // K == y).all()  # always in the label's block
    assert (ids == dist.argmin(1)).mean() > 0.995
    # S: rows sum to 1 and equal subclass_score_matrix on the same vectors and ids
    S = a["subclass_scores"]
    np.testing.assert_allclose(S.sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(S, subclass_score_matrix(z, ids, C * K), atol=1e-6)
    assert attrs["student_grid"] == (None if grid is None else list(grid))


def test_same_seed_identical_and_names_coexist(built):
    path, _ = built
    first = _arrays(open_store(path), "default")
    attrs0 = open_store(path).target_attrs("default")
    cluster(path, name="again", **FAST)
    r = open_store(path)
    assert set(r.target_sets()) >= {"default", "again"}
    again = _arrays(r, "again")
    for name in ARRAYS:
        np.testing.assert_array_equal(first[name], again[name], err_msg=name)
    untouched = _arrays(r, "default")
    for name in ARRAYS:
        np.testing.assert_array_equal(first[name], untouched[name], err_msg=name)
    assert r.target_attrs("default") == attrs0
    # a different configuration under a third name
    cluster(path, name="k8", **{**FAST, "k_penult": 8, "seed": 1})
    r = open_store(path)
    assert r["targets/k8/penult_centers"].shape[0] == 8
    np.testing.assert_array_equal(_arrays(r, "default")["penult_topk_idx"], first["penult_topk_idx"])


def test_same_name_needs_overwrite(built):
    path, _ = built
    with pytest.raises(StoreError, match="already has a target set"):
        cluster(path, name="default", **FAST)
    cluster(path, name="default", overwrite=True, **FAST)
    assert "default" in open_store(path).target_sets()


def test_cli_errors_exit_2(tmp_path, cli_runner):
    p1, _ = make_store(tmp_path / "nofeat.zarr", features=("penult",))
    res = cli_runner.invoke(cli, ["cluster", p1, "--executor", "inline", "--k-penult", "8"])
    assert res.exit_code == 2 and "feat/inter" in res.output and "Traceback" not in res.output
    p2, _ = make_store(tmp_path / "partial.zarr", complete=False)
    res = cli_runner.invoke(cli, ["cluster", p2, "--executor", "inline"])
    assert res.exit_code == 2 and "incomplete" in res.output
    res = cli_runner.invoke(cli, ["cluster", str(tmp_path / "none.zarr"), "--executor", "inline"])
    assert res.exit_code == 2 and "no kdpipe store" in res.output
    p3, _ = make_store(tmp_path / "ok.zarr")
    res = cli_runner.invoke(cli, ["cluster", p3, "--executor", "inline", "--k-penult", "8", "--k-inter", "2",
                                  "--topk", "3", "--student-grid", "2x2"])
    assert res.exit_code == 0, res.output
    assert open_store(p3).target_attrs("default")["penult_grid"] == [2, 2]


def test_drop_features(tmp_path):
    path, _ = make_store(tmp_path / "s.zarr")
    cluster(path, name="t", drop_features=True, **FAST)
    r = open_store(path)
    assert not r.has("feat/penult") and not r.has("feat/inter")
    assert r.manifest.get("features_dropped") is True
    assert not any(a.startswith("feat/") for a in r.manifest["arrays"])
    assert r["targets/t/subclass_idx"].shape[0] == 48
    with pytest.raises(StoreError, match="dropped"):
        cluster(path, name="u", **FAST)


def test_plot_subclasses(built, tmp_path):
    path, labels = built
    ds = SimpleNamespace(labels=labels, policy=None,
                         get_batch=lambda idx: torch.full((len(idx), 3, 16, 16), 128, dtype=torch.uint8))
    png = plot_subclasses(open_store(path), "default", 3, tmp_path / "sub.png", ds)
    assert (tmp_path / "sub.png").stat().st_size > 1000 and png.endswith("sub.png")


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    from kdpipe.pipeline.executor import init_local_ray

    init_local_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.mark.ray
@pytest.mark.slow
def test_ray_map_reduce_equals_inline(built, ray_local):
    path, _ = built
    cluster(path, name="viaray", **{**FAST, "executor": "ray"})
    r = open_store(path)
    ray_arrays, inline = _arrays(r, "viaray"), _arrays(r, "default")
    for name in ARRAYS:
        np.testing.assert_array_equal(ray_arrays[name], inline[name], err_msg=name)


def test_interrupted_set_is_replaced_and_bad_options_refused(tmp_path):
    path, _ = make_store(tmp_path / "s.zarr")
    w = StoreWriter.open_for_targets(path)
    w.create_target_array("t", "penult_centers", (4, 8), "float32")  # a run that died early
    assert open_store(path).target_sets() == []
    cluster(path, name="t", **FAST)  # no --overwrite needed
    assert open_store(path).target_sets() == ["t"]
    from kdpipe.errors import KdpipeError

    with pytest.raises(KdpipeError, match="lda-dims"):
        cluster(path, name="u", lda_dims=4, **FAST)  # C - 1 = 3
    with pytest.raises(KdpipeError, match="larger than"):
        cluster(path, name="u", student_grid="8x8", **FAST)
    assert open_store(path).target_sets() == ["t"]
