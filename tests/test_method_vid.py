"""VID (kdpipe/methods/vid.py): the stage loss against values mdistiller's own ``vid_loss``
(``mdistiller/distillers/VID.py``) produced on the inputs below (the reference is not imported
here); the fixed variance as mdistiller keeps it; cached = online for ``StageFeatures``; one
epoch cached and online."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from method_checks import method_store, replayed_targets, trains_one_epoch_and_evaluates

from kdpipe.methods import get_method
from kdpipe.methods.vid import StageFeatures, VIDHead, VIDRegressor, vid_stage_loss

torch.set_num_threads(1)


def test_stage_loss_equals_mdistiller_vid_loss():
    # mdistiller VID.py vid_loss(regressor, log_scale, f_s, f_t, 1e-5), inputs drawn in this order
    # from torch.manual_seed(0): student pooled to the teacher's side, teacher pooled to the
    # student's, equal sides
    expected = [0.8993161916732788, 71.86326599121094, 5.754701137542725]
    torch.manual_seed(0)
    cases = [((2, 3, 4, 4), (2, 5, 2, 2)), ((2, 3, 2, 2), (2, 5, 4, 4)), ((2, 3, 3, 3), (2, 5, 3, 3))]
    for (fs_shape, ft_shape), want in zip(cases, expected):
        fs, ft = torch.randn(fs_shape), torch.randn(ft_shape)
        w1, w2, w3 = torch.randn(5, 3, 1, 1), torch.randn(5, 5, 1, 1), torch.randn(5, 5, 1, 1)
        log_scale = torch.randn(5)
        reg = VIDRegressor(3, 5)
        with torch.no_grad():
            reg[0].weight.copy_(w1)
            reg[2].weight.copy_(w2)
            reg[4].weight.copy_(w3)
        assert vid_stage_loss(reg, log_scale, fs, ft, 1e-5).item() == pytest.approx(want, rel=1e-5)


def test_variance_starts_at_init_pred_var_and_is_fixed_by_default():
    head = VIDHead([3], [5])
    # mdistiller: np.log(np.exp(5.0 - 1e-5) - 1.0)
    assert head.log_scales()[0][0].item() == pytest.approx(4.9932291827136215, rel=1e-6)
    assert math.log1p(math.exp(head.log_scales()[0][0].item())) + 1e-5 == pytest.approx(5.0, rel=1e-6)
    assert not any("log_scale" in n for n, _ in head.named_parameters())
    learnt = VIDHead([3], [5], learn_variance=True)
    assert any("log_scale" in n for n, _ in learnt.named_parameters())


@pytest.fixture(scope="module")
def store(tiny_store, tmp_path_factory):
    return method_store(tiny_store, tmp_path_factory, "vid")


def test_cached_stage_features_equal_online_on_replayed_views(store):
    from kdpipe.artifacts import open_store

    reader = open_store(store["path"])
    # resnet8 on 16x16 images: stages 16 x 16 x 16, 32 x 8 x 8, 64 x 4 x 4
    assert reader.array("stage_feats/stage1").shape[1:] == (50, 16, 16, 16)
    assert reader.array("stage_feats/stage3").shape[1:] == (50, 64, 4, 4)
    for _batch, a, b in replayed_targets(store, StageFeatures):
        assert set(a) == set(b) == {"stage_feat1", "stage_feat2", "stage_feat3"}
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=2e-3, atol=2e-3)


def test_method_loss_sums_the_stages():
    from kdpipe.methods.base import TeacherInfo
    from kdpipe.models import build

    method = get_method("vid")
    shapes = {"stage_feats/stage1": (16, 16, 16), "stage_feats/stage2": (32, 8, 8), "stage_feats/stage3": (64, 4, 4)}
    method.attach_teacher(TeacherInfo(shapes=shapes, image_size=(16, 16)))
    student = method.prepare_student(build("ShuffleV1", 4))
    assert method.options["teacher_channels"] == [16, 32, 64]
    x, labels = torch.randn(2, 3, 16, 16), torch.tensor([0, 1])
    logits, feats = student.forward_features(x)
    targets = {f"stage_feat{i}": torch.randn(2, *s) for i, s in enumerate(shapes.values(), start=1)}
    total, parts = method.loss(logits, feats, targets, labels)
    head = student.vid_head
    expected = sum(
        vid_stage_loss(r, s, f, targets[f"stage_feat{i}"], 1e-5)
        for i, (r, s, f) in enumerate(zip(head.regressors, head.log_scales(), feats["stages"]), start=1)
    )
    torch.testing.assert_close(parts["vid"], expected.detach())
    torch.testing.assert_close(total, F.cross_entropy(logits, labels) + expected)


@pytest.mark.parametrize("source", ["cached", "online"])
def test_trains_one_epoch_and_evaluates(store, tmp_path, source):
    trains_one_epoch_and_evaluates(store, tmp_path, "vid", source)
