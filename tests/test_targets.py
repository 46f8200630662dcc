"""Target sources: cached (replay / warp) against the online teacher on a tiny store.

The store is built here with the artifact writer directly (the way extract-teacher and
cluster fill it: float16 tensors, targets computed from the stored float16 features), from
a tiny random teacher on the `synthetic` data set.
"""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdpipe.artifacts import StoreWriter, open_store
from kdpipe.artifacts.schema import build_manifest, extraction_specs
from kdpipe.data import load_dataset, normalize
from kdpipe.errors import StoreError
from kdpipe.methods import get_method
from kdpipe.methods.letkd import (assign_subclasses, densify_topk, penult_topk_targets,
                                  subclass_score_matrix)
from kdpipe.stages.targets import (CachedTargets, NoTargets, OnlineTargets, target_set_info,
                                   warp_fidelity)
from kdpipe.views import view_table

torch.set_num_threads(1)

C, N, K_PEN, TOPK, K_INTER, LDA_D = 4, 12, 6, 3, 2, 3


class TinyTeacher(nn.Module):
    """KDModel-like: inter [B, 6, 8, 8], penult [B, 8, 4, 4], cam [B, C, 4, 4]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 6, 3, stride=4, padding=1)
        self.c2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, C)
        self.taps = nn.ModuleDict()

    def feature_channels(self):
        return {"inter": 6, "penult": 8}

    def forward_features(self, x):
        inter = torch.relu(self.c1(x))
        penult = torch.relu(self.c2(inter))
        cam = F.conv2d(penult, self.fc.weight[:, :, None, None])
        return cam.mean(dim=(2, 3)) + self.fc.bias, {"inter": inter, "penult": penult, "cam": cam}


def _build_store(path, dataset, teacher, views_mode, with_targets=True):
    policy = dataset.policy
    views = view_table(policy, N, views_mode, seed=1)
    V = views.shape[1]
    specs = [s.with_chunks(N) for s in extraction_specs(
        N, V, policy.param_dim, C, (4, 4), cam_res=(2,),
        features={"penult": (8, 4, 4), "inter": (6, 8, 8)})]
    manifest = build_manifest(
        teacher={"arch": "tiny", "sha256": "0" * 64, "num_classes": C},
        dataset={"name": dataset.name, "split": dataset.split,
                 "fingerprint": dataset.fingerprint, "num_samples": N, "num_classes": C,
                 "mean": list(dataset.mean), "std": list(dataset.std),
                 "image_size": list(dataset.image_size)},
        views={"policy": policy.name, "mode": str(views_mode), "num_views": V, "seed": 1,
               "pad_mode": "zero"},
        layers=["penult", "inter"], specs=specs, shard_size=N, num_samples=N)
    w = StoreWriter.create(path, manifest, specs)
    out = {k: [] for k in ("logits", "cam", "cam_r2", "feat/penult", "feat/inter")}
    with torch.no_grad():
        imgs = dataset.get_batch(np.arange(N))
        for v in range(V):
            x = normalize(policy.apply_images(imgs, views[:, v]), dataset.mean, dataset.std)
            logits, f = teacher.forward_features(x)
            out["logits"].append(logits)
            out["cam"].append(f["cam"])
            out["cam_r2"].append(F.adaptive_avg_pool2d(f["cam"], 2))
            out["feat/penult"].append(f["penult"])
            out["feat/inter"].append(f["inter"])
    w.write_rows("views", 0, views)
    for k, v in out.items():
        w.write_rows(k, 0, torch.stack(v, 1).numpy().astype(np.float16))
    w.mark_shard_done(0)
    w.finalize()
    if not with_targets:
        return open_store(path)
    # the cluster stage, in miniature, from the stored float16 features
    reader = open_store(path)
    pen = torch.from_numpy(reader["feat/penult"][:].astype(np.float32))   # [N, V, 8, 4, 4]
    inter = torch.from_numpy(reader["feat/inter"][:].astype(np.float32))  # [N, V, 6, 8, 8]
    pen_flat = pen.reshape(N * V, 8, 4, 4)
    vecs = pen_flat.permute(0, 2, 3, 1).reshape(-1, 8)
    g = torch.Generator().manual_seed(0)
    centers = vecs[torch.randperm(vecs.shape[0], generator=g)[:K_PEN]].clone()
    ti, tv = penult_topk_targets(pen_flat, centers, 1.0, TOPK)
    labels = torch.as_tensor(dataset.labels[:N])
    xbar = torch.randn(6, generator=g) * 0.1
    scal = torch.randn(6, 6, generator=g)
    inter_flat = inter.reshape(N * V, 6, 8, 8)
    z = ((inter_flat.permute(0, 2, 3, 1).reshape(N * V, 64, 6) - xbar) @ scal[:, :LDA_D])
    lab_rep = labels.repeat_interleave(V)
    sub_centers = torch.zeros(C * K_INTER, LDA_D)
    for c in range(C):
        zc = z[lab_rep == c].reshape(-1, LDA_D)
        sub_centers[c * K_INTER:(c + 1) * K_INTER] = zc[torch.randperm(len(zc), generator=g)[:K_INTER]]
    sub_idx = assign_subclasses(inter_flat, lab_rep, xbar, scal, sub_centers, K_INTER)
    S = subclass_score_matrix(z.reshape(-1, LDA_D), sub_idx.reshape(-1), C * K_INTER)
    tw = StoreWriter.open_for_targets(path)
    tw.write_target_array("T", "penult_centers", centers.numpy())
    tw.write_target_array("T", "penult_topk_idx", ti.reshape(N, V, 4, 4, TOPK).numpy().astype(np.int32))
    tw.write_target_array("T", "penult_topk_val", tv.reshape(N, V, 4, 4, TOPK).numpy().astype(np.float16))
    tw.write_target_array("T", "lda_scalings", scal.numpy().astype(np.float64))
    tw.write_target_array("T", "lda_xbar", xbar.numpy().astype(np.float64))
    tw.write_target_array("T", "subclass_centers", sub_centers.numpy())
    tw.write_target_array("T", "subclass_scores", S.astype(np.float32))
    tw.write_target_array("T", "subclass_idx", sub_idx.reshape(N, V, 8, 8).numpy().astype(np.int32))
    tw.set_target_attrs("T", {"K_penult": K_PEN, "topk": TOPK, "temperature": 1.0,
                              "K_inter": K_INTER, "lda_dims": LDA_D, "student_grid": None,
                              "penult_grid": [4, 4], "inter_grid": [8, 8]})
    tw.finish_target_set("T")
    return open_store(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ds = load_dataset(f"synthetic:n={N},classes={C},size=32,seed=0", "train")
    teacher = TinyTeacher().eval()
    root = tmp_path_factory.mktemp("stores")
    replay = _build_store(root / "replay.zarr", ds, teacher, 3)
    warp = _build_store(root / "warp.zarr", ds, teacher, 1)
    return ds, teacher, replay, warp


def _methods():
    return [get_method("kd"), get_method("cat_kd", normalize=False),
            get_method("cat_kd", normalize=True, binarize=True, top_n=2),
            get_method("letkd1"), get_method("letkd2")]


def _batch(ds, src, idx, gen, epoch=0):
    view_idx, params = src.views_for(torch.as_tensor(idx), epoch, gen)
    imgs = ds.policy.apply_images(ds.get_batch(idx), params)
    return view_idx, params, normalize(imgs, ds.mean, ds.std)


@pytest.mark.parametrize("resident", [True, False])
def test_replay_equals_online(setup, resident):
    ds, teacher, store, _ = setup
    idx = np.array([0, 3, 5, 7, 11, 2])
    labels = torch.as_tensor(ds.labels[idx])
    for m in _methods():
        cached = CachedTargets(store, m, None, "cpu", "replay", policy=ds.policy,
                               max_resident_bytes=(1 << 40) if resident else 0)
        assert cached.resident is resident and cached.mode == "replay"
        online = OnlineTargets(teacher, m, store, ds.policy, "cpu", labels=ds.labels)
        view_idx, params, x = _batch(ds, cached, idx, torch.Generator().manual_seed(3))
        assert view_idx.shape == (6,) and params.shape == (6, 3)
        a = cached.targets(torch.as_tensor(idx), view_idx, params, x)
        b = online.targets(torch.as_tensor(idx), view_idx, params, x, labels=labels)
        assert list(a) == list(m.target_keys) == list(b)
        for key in ("logits", "cam"):
            if key in a:
                assert a[key].dtype == torch.float32 and a[key].shape == b[key].shape
                assert torch.allclose(a[key], b[key], rtol=2e-3, atol=2e-3), (m, key)
        if "penult_topk_idx" in a:
            assert a["penult_topk_idx"].dtype == torch.int64
            assert a["penult_topk_idx"].shape == (6, 4, 4, TOPK)
            da = densify_topk(a["penult_topk_idx"], a["penult_topk_val"], K_PEN)
            db = densify_topk(b["penult_topk_idx"], b["penult_topk_val"], K_PEN)
            assert (da - db).abs().max() < 1e-2
        if "inter_probs" in a:
            assert a["inter_probs"].shape == (6, 8, 8, C * K_INTER)
            agree = (a["inter_probs"] - b["inter_probs"]).abs().amax(-1) < 1e-6
            assert agree.float().mean() > 0.97   # float16 features may flip near-ties


def test_views_for_replay_draws_stored_views(setup):
    ds, _, store, _ = setup
    src = CachedTargets(store, get_method("kd"), None, "cpu", "replay", policy=ds.policy)
    idx = torch.arange(N)
    v1, p1 = src.views_for(idx, 0, torch.Generator().manual_seed(0))
    v2, p2 = src.views_for(idx, 0, torch.Generator().manual_seed(0))
    assert torch.equal(v1, v2) and torch.equal(p1, p2)
    stored = torch.from_numpy(store["views"][:])
    assert torch.equal(p1, stored[idx, v1])
    assert set(v1.tolist()) <= {0, 1, 2}


def test_warp_shapes_and_identity(setup):
    ds, teacher, _, store = setup
    idx = np.arange(5)
    for m in _methods():
        src = CachedTargets(store, m, None, "cpu", "warp", policy=ds.policy)
        view_idx, params, x = _batch(ds, src, idx, torch.Generator().manual_seed(1))
        assert view_idx is None and params.shape == (5, 3)
        t = src.targets(torch.as_tensor(idx), None, params, x)
        if "cam" in t:
            r = m.cam_resolution
            assert t["cam"].shape == ((5, C, r, r) if r else (5, C, 4, 4))
        if "penult_topk_idx" in t:
            assert t["penult_topk_idx"].shape == (5, 4, 4, TOPK)
            assert t["penult_topk_idx"].dtype == torch.int64
        if "inter_probs" in t:
            assert t["inter_probs"].shape == (5, 8, 8, C * K_INTER)
            assert torch.allclose(t["inter_probs"].sum(-1), torch.ones(5, 8, 8), atol=1e-5)
        # the identity view warps to the stored targets themselves
        ident = torch.as_tensor(ds.policy.identity())[None].expand(5, -1)
        xi = normalize(ds.get_batch(idx), ds.mean, ds.std)
        a = src.targets(torch.as_tensor(idx), None, ident, xi)
        b = OnlineTargets(teacher, m, store, ds.policy, "cpu", labels=ds.labels).targets(
            torch.as_tensor(idx), None, ident, xi)
        for key in a:
            if a[key].dtype.is_floating_point and key != "inter_probs":
                assert torch.allclose(a[key], b[key], rtol=2e-3, atol=1e-2), (m, key)


def test_policy_from_manifest(setup):
    ds, _, _, store = setup
    src = CachedTargets(store, get_method("kd"), None, "cpu", "warp")     # no policy given
    assert src.policy == ds.policy


def test_warp_refuses_multiview_store(setup):
    ds, _, replay, _ = setup
    with pytest.raises(StoreError, match="identity view"):
        CachedTargets(replay, get_method("kd"), None, "cpu", "warp", policy=ds.policy)


def test_refusals(setup, tmp_path):
    ds, teacher, _, _ = setup
    store = _build_store(tmp_path / "bare.zarr", ds, teacher, 1, with_targets=False)
    with pytest.raises(StoreError, match="no complete target set 'T'"):
        CachedTargets(store, get_method("letkd1"), "T", "cpu", "replay")
    with pytest.raises(StoreError, match="cluster"):
        CachedTargets(store, get_method("letkd2"), None, "cpu", "replay")
    # a target set with the penultimate arrays only: letKD-1 works, letKD-2 is refused
    _, _, _, full = setup
    w = StoreWriter.open_for_targets(tmp_path / "bare.zarr")
    for name in ("penult_centers", "penult_topk_idx", "penult_topk_val"):
        w.write_target_array("P", name, full[f"targets/T/{name}"][:])
    w.finish_target_set("P")
    store = open_store(tmp_path / "bare.zarr")
    CachedTargets(store, get_method("letkd1"), None, "cpu", "replay")
    with pytest.raises(StoreError, match="lacks targets/P/subclass_idx"):
        CachedTargets(store, get_method("letkd2"), None, "cpu", "replay")
    with pytest.raises(StoreError, match="cam_r4"):
        w = StoreWriter.open_for_targets(tmp_path / "bare.zarr")
        w.delete_arrays(["cam"])
        CachedTargets(open_store(tmp_path / "bare.zarr"),
                      get_method("cat_kd", resolution=4, normalize=False), None, "cpu", "replay")
    # NaN in a target array is refused at load, resident or streamed
    w = StoreWriter.open(tmp_path / "bare.zarr")
    logits = w.array("logits")
    block = logits[:]
    block[3, 0, 1] = np.nan
    logits[:] = block
    for budget in (1 << 40, 0):
        with pytest.raises(StoreError, match="NaN"):
            CachedTargets(open_store(tmp_path / "bare.zarr"), get_method("kd"), None, "cpu",
                          "replay", max_resident_bytes=budget)


def test_pooled_from_native_when_no_pooled_array(setup, tmp_path):
    ds, teacher, _, _ = setup
    store = _build_store(tmp_path / "native.zarr", ds, teacher, 3, with_targets=False)
    m = get_method("cat_kd", resolution=1, normalize=False)        # no cam_r1 stored
    src = CachedTargets(store, m, None, "cpu", "replay", policy=ds.policy)
    assert src._plan["cam"] == "cam"
    idx = torch.arange(4)
    v, p = src.views_for(idx, 0, torch.Generator().manual_seed(0))
    t = src.targets(idx, v, p, None)["cam"]
    full = torch.from_numpy(store["cam"][:].astype(np.float32))[idx, v]
    assert torch.allclose(t, full.mean(dim=(2, 3), keepdim=True), atol=1e-6)


def test_no_targets_and_target_set_info(setup):
    ds, _, store, _ = setup
    src = NoTargets(ds.policy)
    v, p = src.views_for(torch.arange(7), 0, torch.Generator().manual_seed(0))
    assert v is None and p.shape == (7, 3) and src.targets(None, None, p, None) == {}
    info = target_set_info(store, "T")
    assert (info["K"], info["k"], info["penult_grid"], info["inter_grid"], info["K_inter"],
            info["d"], info["M"]) == (K_PEN, TOPK, (4, 4), (8, 8), K_INTER, LDA_D, C * K_INTER)


def test_warp_fidelity(setup):
    ds, teacher, _, store = setup
    rep = warp_fidelity(store, teacher, ds, num_samples=8, seed=0, batch_size=4)
    for name in ("logits", "cam", "cam_r2", "feat/penult", "feat/inter", "penult_topk",
                 "inter_probs"):
        assert name in rep, name
        assert -1.0 <= rep[name]["cosine"] <= 1.0 + 1e-6 and rep[name]["rel_error"] >= 0
        assert rep[name]["num_samples"] == 8
    assert rep["logits"]["cosine"] > 0.5


# ------------------------------------------------- the real stages: extract + cluster
@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    extract = pytest.importorskip("kdpipe.stages.extract")
    cluster = pytest.importorskip("kdpipe.stages.cluster")
    from kdpipe.models import build, load_teacher

    root = tmp_path_factory.mktemp("pipeline")
    torch.manual_seed(0)
    torch.save({"model": build("resnet8", num_classes=C).state_dict()}, root / "t.pth")
    data = f"synthetic:n={N},classes={C},size=32,seed=0"
    stores = {}
    for views in ("3", "1"):
        path = root / f"v{views}.zarr"
        extract.extract_teacher(root / "t.pth", "resnet8", data, path, views=views, cam_res=(2,),
                                executor="inline", progress=False, verbose=False)
        cluster.cluster(path, k_penult=8, k_inter=2, topk=4, executor="inline", verbose=False)
        stores[views] = open_store(path)
    return load_dataset(data, "train"), load_teacher("resnet8", root / "t.pth", C), stores


def test_pipeline_replay_equals_online(pipeline):
    ds, teacher, stores = pipeline
    idx = torch.arange(N)
    for m in _methods():
        cached = CachedTargets(stores["3"], m, None, "cpu", "replay")   # policy from manifest
        online = OnlineTargets(teacher, m, stores["3"], ds.policy, "cpu", labels=ds.labels)
        v, p, x = _batch(ds, cached, idx.numpy(), torch.Generator().manual_seed(7))
        a, b = cached.targets(idx, v, p, x), online.targets(idx, v, p, x)
        for key in a:
            if key == "penult_topk_val":
                da = densify_topk(a["penult_topk_idx"], a[key], 8)
                db = densify_topk(b["penult_topk_idx"], b[key], 8)
                assert (da - db).abs().max() < 1e-2, m
            elif key == "inter_probs":
                agree = (a[key] - b[key]).abs().amax(-1) < 1e-6
                assert agree.float().mean() > 0.97, m
            elif key != "penult_topk_idx":
                tol = 2e-3 * float(b[key].abs().max()) + 1e-3
                assert (a[key] - b[key]).abs().max() < tol, (m, key)


def test_pipeline_warp_and_fidelity(pipeline):
    ds, teacher, stores = pipeline
    idx = torch.arange(6)
    for m in _methods():
        src = CachedTargets(stores["1"], m, None, "cpu", "warp")
        v, p, x = _batch(ds, src, idx.numpy(), torch.Generator().manual_seed(2))
        t = src.targets(idx, v, p, x)
        assert v is None and list(t) == list(m.target_keys)
        assert all(torch.isfinite(val.float()).all() for val in t.values())
    rep = warp_fidelity(stores["1"], teacher, ds, num_samples=6, seed=0, batch_size=3)
    assert {"logits", "cam", "cam_r2", "feat/penult", "feat/inter", "penult_topk",
            "inter_probs"} <= set(rep)


def test_replay_fidelity_is_exact_up_to_float16(pipeline):
    """Replay applies exactly a stored view, so its targets match the online teacher's."""
    ds, teacher, stores = pipeline
    rep = warp_fidelity(stores["3"], teacher, ds, num_samples=12, seed=0, batch_size=5, mode="replay")
    for name in ("logits", "cam", "cam_r2", "feat/penult", "feat/inter"):
        assert rep[name]["cosine"] > 0.9999, name
        assert rep[name]["rel_error"] < 2e-3, name
    assert rep["penult_topk"]["rel_error"] < 2e-2
    assert rep["inter_probs"]["cosine"] > 0.97
    with pytest.raises(StoreError, match="identity view"):
        warp_fidelity(stores["3"], teacher, ds, num_samples=4, seed=0, mode="warp")
