"""Target kinds and target sources on the session's tiny store (every view, a target set).

The checks of the full-views issue: for every kind, cached (replay) equals online on the same
views up to float16; cluster's assignment pass wrote what the teacher gives live on random
(sample, view) pairs; the fit equals scikit-learn's LDA and a direct faiss K-means on the same
identity-view vectors; streamed and resident targets give identical batches for one seed.
"""

import numpy as np
import pytest
import torch

from kdpipe.artifacts import open_store
from kdpipe.data import load_dataset, normalize
from kdpipe.engine import plan as plans
from kdpipe.engine.fidelity import measure_fidelity, store_kinds
from kdpipe.engine.sources import CachedTargets, NoTargets, OnlineTargets
from kdpipe.errors import KdpipeError, StoreError
from kdpipe.methods.letkd import densify_topk, penult_softmax_targets, penult_topk_targets, topk_for_mass
from kdpipe.methods.letkd.kinds import InterSubclass, PenultSoftmax, PenultTopk
from kdpipe.models import load_teacher
from kdpipe.targets import Cam, Logits, NativeCam, TeacherOutputs

KINDS = {
    "logits": Logits,
    "cam_r2": lambda: Cam(2),
    "cam_r4_from_native": lambda: Cam(4),
    "cam": NativeCam,
    "penult_topk": PenultTopk,
    "inter_subclass": InterSubclass,
}


@pytest.fixture(scope="module")
def parts(tiny_store):
    reader = open_store(tiny_store["path"])
    dataset = load_dataset(tiny_store["data"])
    teacher = load_teacher("resnet8", tiny_store["teacher"], dataset.num_classes)
    return reader, dataset, teacher


def _images(dataset, batch, policy):
    x = policy.apply_images(dataset.get_batch(batch.indices.numpy()), batch.params)
    return normalize(x, dataset.mean, dataset.std)


def _labels(dataset, batch):
    return torch.as_tensor(dataset.labels[batch.indices.numpy()])


def _assert_targets_close(cached: dict, online: dict, kind):
    assert set(cached) == set(online) == set(kind.target_keys)
    for key in kind.target_keys:
        a, b = cached[key], online[key]
        assert a.shape == b.shape, key
        if key == "penult_topk_idx":
            continue  # compared through the densified distribution below
        if a.dtype.is_floating_point:
            torch.testing.assert_close(a, b.to(a.dtype), rtol=2e-3, atol=2e-3)
        else:
            assert torch.equal(a, b), key
    if "penult_topk_idx" in cached:
        K = kind.ts.k_penult
        torch.testing.assert_close(
            densify_topk(cached["penult_topk_idx"], cached["penult_topk_val"], K),
            densify_topk(online["penult_topk_idx"], online["penult_topk_val"], K),
            rtol=2e-3,
            atol=2e-3,
        )


@pytest.mark.parametrize("name", list(KINDS))
def test_cached_replay_equals_online_on_the_same_views(parts, name):
    """Same seed, same epoch: the same plan (order, replayed views); the targets differ by the
    store's float16 rounding alone."""
    reader, dataset, teacher = parts
    make = KINDS[name]
    policy = dataset.policy
    cached = CachedTargets(reader, [make()], device="cpu", policy=policy)
    online = OnlineTargets(teacher, [make()], reader=reader, policy=policy, views="replay")
    if name == "cam_r4_from_native":
        assert cached.kinds[0].from_native  # the store has no cam_r4: served from the native CAM
    indices = torch.arange(reader.num_samples)
    for epoch in (0, 3):
        p_cached, p_online = cached.plan(indices, 7, epoch), online.plan(indices, 7, epoch)
        assert torch.equal(p_cached.order, p_online.order) and torch.equal(p_cached.view_idx, p_online.view_idx)
        assert torch.equal(p_cached.params, p_online.params)
        cached.begin_epoch(p_cached, 8)
        for batch in p_cached.batches(8):
            x = _images(dataset, batch, policy)
            _assert_targets_close(
                cached.targets(batch, x, _labels(dataset, batch)),
                online.targets(batch, x, _labels(dataset, batch)),
                cached.kinds[0],
            )
    cached.close()


def test_replay_draws_every_stored_view_uniformly(parts):
    reader, dataset, _ = parts
    src = CachedTargets(reader, [Logits()], policy=dataset.policy)
    draws = torch.cat([src.plan(torch.arange(reader.num_samples), 0, e).view_idx for e in range(200)])
    counts = torch.bincount(draws, minlength=reader.num_views).double()
    assert reader.num_views == 50 and counts.min() > 0
    # chi-square of 6400 draws over 50 views: mean 49, far below 100
    chi2 = float(((counts - counts.mean()) ** 2 / counts.mean()).sum())
    assert chi2 < 100, chi2


def test_assignment_pass_equals_the_live_teacher_on_random_pairs(parts):
    reader, dataset, teacher = parts
    ts = reader.target_set("default")
    rng = np.random.default_rng(0)
    samples = rng.choice(reader.num_samples, 12, replace=False)
    views = rng.integers(0, reader.num_views, 12)
    params = torch.as_tensor(reader["views"].get_orthogonal_selection((samples, slice(None)))[np.arange(12), views])
    x = normalize(dataset.policy.apply_images(dataset.get_batch(samples), params), dataset.mean, dataset.std)
    out = TeacherOutputs.of(teacher, x, torch.as_tensor(dataset.labels[samples]))

    def stored(name):
        rows = reader[ts.array(name)].get_orthogonal_selection((samples, slice(None)))
        return torch.as_tensor(np.asarray(rows)[np.arange(12), views].astype(np.float64))

    centers = torch.as_tensor(reader[ts.array("penult_centers")][...])
    idx, val = penult_topk_targets(out.feats["penult"], centers, ts.temperature, ts.topk)
    dense_live = densify_topk(idx, val, ts.k_penult, renormalize=False)
    dense_stored = densify_topk(
        stored("penult_topk_idx").long(), stored("penult_topk_val").float(), ts.k_penult, renormalize=False
    )
    torch.testing.assert_close(dense_stored, dense_live, rtol=0, atol=2e-3)
    sub = InterSubclass().bind(_ctx(reader, ts))
    live_sub = sub.online(out)[ts.array("subclass_idx")]
    assert torch.equal(stored("subclass_idx").long(), live_sub)


def _ctx(reader, ts):
    from kdpipe.targets import KindContext

    return KindContext(target_set=ts, load=lambda p: reader[p][...], available=frozenset(reader.array_names()))


def test_fit_equals_sklearn_lda_and_a_direct_faiss_kmeans(parts):
    """The fit uses every identity-view location vector, as the reference does."""
    import faiss
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    from kdpipe.stages.cluster import reference_lda_dims

    reader, dataset, _ = parts
    ts = reader.target_set("default")
    pen = reader["feat/penult"][:, 0].astype(np.float32)  # [N, D, h, w]
    vectors = np.ascontiguousarray(pen.transpose(0, 2, 3, 1).reshape(-1, pen.shape[1]))
    assert ts.fit_points_penult == vectors.shape[0] and ts.fit_views == "identity"
    km = faiss.Kmeans(
        vectors.shape[1], ts.k_penult, niter=20, seed=0, max_points_per_centroid=10_000_000, min_points_per_centroid=1
    )
    km.train(vectors)
    np.testing.assert_allclose(reader[ts.array("penult_centers")][...], km.centroids, rtol=1e-4, atol=1e-4)
    inter = reader["feat/inter"][:, 0].astype(np.float32)
    xi = inter.transpose(0, 2, 3, 1).reshape(-1, inter.shape[1]).astype(np.float64)
    yi = np.repeat(dataset.labels, inter.shape[2] * inter.shape[3])
    lda = LinearDiscriminantAnalysis(solver="eigen").fit(xi, yi)
    d = ts.lda_dims
    assert d == reference_lda_dims(dataset.num_classes, inter.shape[1]) == 3
    ours = reader[ts.array("lda_scalings")][...][:, :d].astype(np.float64)
    theirs = lda.scalings_[:, :d]
    signs = np.sign((ours * theirs).sum(0))
    np.testing.assert_allclose(ours, theirs * signs, rtol=1e-3, atol=1e-3)
    # xbar_: the reference's default (svd) solver keeps it; the mean of every vector
    reference = LinearDiscriminantAnalysis().fit(xi, yi)
    np.testing.assert_allclose(reader[ts.array("lda_xbar")][...], reference.xbar_, rtol=1e-4, atol=1e-5)


def test_stream_and_resident_give_identical_batches(parts):
    reader, dataset, _ = parts
    kinds = lambda: [Cam(2), Logits(), PenultTopk(), InterSubclass()]  # noqa: E731
    resident = CachedTargets(reader, kinds(), policy=dataset.policy, resident="device")
    stream = CachedTargets(reader, kinds(), policy=dataset.policy, resident="stream", stream_buffer=6)
    # the store is in the row layout: the stream reads any order, so it keeps the uniform one
    assert resident.tier == "device" and stream.tier == "stream" and stream.order == "uniform"
    indices = torch.arange(reader.num_samples)
    for epoch in range(2):
        plan_a, plan_b = resident.plan(indices, 3, epoch), stream.plan(indices, 3, epoch)
        assert torch.equal(plan_a.order, plan_b.order) and torch.equal(plan_a.view_idx, plan_b.view_idx)
        resident.begin_epoch(plan_a, 5)
        stream.begin_epoch(plan_b, 5)
        for batch in plan_a.batches(5):
            a, b = resident.targets(batch), stream.targets(batch)
            assert a.keys() == b.keys()
            for key in a:
                assert torch.equal(a[key], b[key]), key
    stream.close()
    # every sample once per epoch
    p = stream.plan(indices, 3, 5)
    assert sorted(p.order.tolist()) == list(range(reader.num_samples))


def test_block_order_reads_each_block_before_its_samples():
    idx = torch.arange(100)
    order, blocks, ranks = plans.block_order(idx, 10, 15, seed=1, epoch=2)
    assert sorted(order.tolist()) == list(range(100)) and len(blocks) == 10
    # the reader can stream: by position p, at most ranks[:p+1].max() + 1 blocks are needed
    assert all(ranks[p] == [b for b, (lo, hi) in enumerate(blocks) if lo <= int(order[p]) < hi][0] for p in range(100))
    again, _, _ = plans.block_order(idx, 10, 15, seed=1, epoch=2)
    assert torch.equal(order, again)
    assert not torch.equal(order, plans.block_order(idx, 10, 15, seed=1, epoch=3)[0])


def test_fidelity_replay_is_exact_up_to_float16(parts):
    reader, dataset, teacher = parts
    fid = measure_fidelity(reader, teacher, dataset, num_samples=16, seed=0)
    assert {"logits", "cam_r2", "cam", "feat/penult", "feat/inter", "penult_topk", "inter_subclass"} <= set(fid)
    for name, row in fid.items():
        assert row["cosine"] > 0.999 and row["rel_error"] < 5e-3, (name, row)


def test_warp_from_a_one_view_store(tiny_store, tmp_path, parts):
    from kdpipe.config.configs import ExtractConfig
    from kdpipe.stages.extract import extract_teacher

    reader, dataset, teacher = parts
    out = tmp_path / "one.zarr"
    extract_teacher(
        ExtractConfig(
            teacher=tiny_store["teacher"],
            arch="resnet8",
            data=tiny_store["data"],
            out=str(out),
            views="1",
            cam_res=(2,),
            native_cam=True,
            features=(),
            executor="inline",
        ),
        progress=False,
        verbose=False,
    )
    one = open_store(str(out))
    src = CachedTargets(one, [Cam(2)], policy=dataset.policy, mode="warp")
    plan = src.plan(torch.arange(one.num_samples), 0, 0)
    assert plan.view_idx is None and plan.params.shape == (one.num_samples, 3)
    batch = next(plan.batches(8))
    assert src.targets(batch)["cam"].shape == (8, 4, 2, 2)
    fid = measure_fidelity(one, teacher, dataset, num_samples=16, seed=0)
    assert fid["cam_r2"]["cosine"] > 0.5 and fid["logits"]["rel_error"] > 0  # warp is approximate
    with pytest.raises(StoreError, match="identity view"):
        CachedTargets(reader, [Cam(2)], policy=dataset.policy, mode="warp")


def test_refusals_are_one_sentence(parts, store_copy):
    from kdpipe.artifacts import StoreWriter

    reader, dataset, teacher = parts
    StoreWriter.open(store_copy["path"]).delete_arrays(["cam"])
    with pytest.raises(StoreError, match="lacks cam_r3.*--cam-res"):
        CachedTargets(open_store(store_copy["path"]), [Cam(3)], policy=dataset.policy)
    with pytest.raises(KdpipeError, match="online only"):
        CachedTargets(reader, [PenultSoftmax()], policy=dataset.policy)
    with pytest.raises(StoreError, match="no complete target set 'nope'"):
        CachedTargets(reader, [PenultTopk()], target_set="nope", policy=dataset.policy)
    with pytest.raises(KdpipeError, match="resident must be one of"):
        CachedTargets(reader, [Logits()], policy=dataset.policy, resident="disk")


def test_full_softmax_online_target(parts):
    reader, dataset, teacher = parts
    src = OnlineTargets(teacher, [PenultSoftmax()], reader=reader, policy=dataset.policy)
    p = src.plan(torch.arange(8), 0, 0)
    batch = next(p.batches(8))
    probs = src.targets(batch, _images(dataset, batch, dataset.policy), _labels(dataset, batch))["penult_probs"]
    ts = reader.target_set("default")
    assert probs.shape == (8,) + ts.penult_grid + (ts.k_penult,)
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))


def test_topk_for_mass_hand_case():
    # two centres at distance^2 0 and 1 from x, T = ln(3): p = (3/4, 1/4)
    centers = np.array([[0.0], [1.0], [10.0]], dtype=np.float32)
    x = np.array([[0.0]], dtype=np.float32)
    T = float(np.log(3.0))
    k, needed = topk_for_mass(x, centers, T, mass=0.7, cap=3)
    assert (k, needed) == (1, 1)
    k, needed = topk_for_mass(x, centers, T, mass=0.9, cap=3)
    assert (k, needed) == (2, 2)
    k, needed = topk_for_mass(x, centers, T, mass=0.9, cap=1)
    assert (k, needed) == (1, 2)
    dense = penult_softmax_targets(torch.zeros(1, 1, 1, 1), torch.as_tensor(centers), T)
    torch.testing.assert_close(dense[0, 0, 0, :2], torch.tensor([0.75, 0.25]), rtol=1e-5, atol=1e-6)


def test_target_set_record_is_typed(parts):
    reader, _, _ = parts
    ts = reader.target_set("default")
    assert (ts.k_penult, ts.k_inter, ts.topk_cap) == (8, 2, 4) and 1 <= ts.topk <= 4
    assert ts.num_subclasses == 8 and ts.penult_grid == (4, 4) and ts.inter_grid == (4, 4)
    assert 0 < ts.retained_mass_min <= ts.retained_mass_mean <= 1.0 + 1e-6
    assert ts.extra["fit_done"] and ts.extra["seconds"]["assign"] >= 0
    assert [type(k).__name__ for k in store_kinds(reader)] == [
        "Logits",
        "Cam",
        "NativeCam",
        "Feature",
        "Feature",
        "PenultTopk",
        "InterSubclass",
    ]


def test_no_targets_views_are_a_function_of_seed_and_epoch(parts):
    _, dataset, _ = parts
    src = NoTargets(dataset.policy)
    a, b = src.plan(torch.arange(32), 1, 4), src.plan(torch.arange(32), 1, 4)
    assert torch.equal(a.order, b.order) and torch.equal(a.params, b.params)
    assert not torch.equal(a.params, src.plan(torch.arange(32), 1, 5).params)
