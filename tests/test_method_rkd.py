"""RKD: the loss against values mdistiller's own ``rkd_loss`` produced, the teacher's pooled
feature (shared with PKT) cached = online on replayed views, one epoch from a store and from
the online teacher, and mdistiller's configs/cifar100/rkd.yaml read as it is."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from method_checks import method_store, read_mdistiller_cifar100_yaml, replayed_targets, trains_one_epoch_and_evaluates

from kdpipe.artifacts import open_store
from kdpipe.data import load_dataset, normalize
from kdpipe.methods import get_method
from kdpipe.methods.rkd import pairwise_distances, rkd_loss, triple_angles
from kdpipe.models import build, load_teacher
from kdpipe.targets import PooledFeature, TeacherOutputs

torch.set_num_threads(1)


def wave(shape, phase: float, scale: float = 1.0) -> torch.Tensor:
    """Closed-form inputs (the same in the reference script): scale * sin(0.7 i + phase) over
    the flat index i."""
    n = math.prod(shape)
    return (scale * torch.sin(0.7 * torch.arange(n, dtype=torch.float32) + phase)).reshape(shape)


# Values of mdistiller/distillers/RKD.py ``rkd_loss(f_s, f_t, squared, 1e-12, 25, 50)`` (torch
# 2.13.0+cpu, float32) on f_s = wave(shape, phase_s), f_t = wave(shape, phase_t, 2.0), and
# d loss / d f_s.
MDISTILLER_RKD = [
    {
        "shape": (4, 3),
        "phases": (0.0, 1.0),
        "squared": False,
        "loss": 2.090223789215088,
        "grad": [34.719528, -27.562775, -76.88279, -1.0496188, 0.63432157, 2.0199387]
        + [-1.3026166, -1.1592757, -0.47069767, -32.367294, 28.08773, 75.333534],
    },
    {"shape": (5, 6), "phases": (0.3, 2.1), "squared": False, "loss": 0.794891357421875, "grad": None},
    {
        "shape": (4, 3),
        "phases": (0.0, 1.0),
        "squared": True,
        "loss": 4.225962162017822,
        "grad": [35.817444, -27.546339, -77.955551, -2.0013647, 2.0196836, 5.0908508]
        + [-2.6799035, -2.7105451, -1.4663633, -31.136169, 28.2372, 74.331062],
    },
]


@pytest.mark.parametrize("case", MDISTILLER_RKD)
def test_rkd_loss_equals_mdistiller(case):
    fs = wave(case["shape"], case["phases"][0]).requires_grad_(True)
    ft = wave(case["shape"], case["phases"][1], 2.0)
    loss = rkd_loss(fs, ft, case["squared"], 1e-12, 25.0, 50.0)
    loss.backward()
    assert loss.item() == pytest.approx(case["loss"], rel=1e-5)
    if case["grad"] is not None:
        torch.testing.assert_close(fs.grad.flatten(), torch.tensor(case["grad"]), rtol=1e-4, atol=1e-5)


def test_rkd_hand_cases():
    # three points of a right isosceles triangle: distances 1, 1, sqrt 2 (mean of the positive
    # entries (4 + 2 sqrt 2) / 6), the angle at the corner 90 degrees
    e = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    d = pairwise_distances(e)
    torch.testing.assert_close(d, torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, math.sqrt(2)], [1.0, math.sqrt(2), 0.0]]))
    angles = triple_angles(e).reshape(3, 3, 3)
    assert angles[0, 1, 2].item() == pytest.approx(0.0, abs=1e-7)
    assert angles[1, 0, 2].item() == pytest.approx(1 / math.sqrt(2), rel=1e-6)
    assert angles[0, 0, 1].item() == 0.0  # a zero difference stays 0
    # similar triangles (scaled, moved, rotated into more dimensions) are the same relations
    moved = torch.cat([3.0 * e + 1.0, torch.zeros(3, 2)], dim=1)
    assert rkd_loss(moved, e).item() == pytest.approx(0.0, abs=1e-6)
    assert rkd_loss(e, e, distance_weight=0.0, angle_weight=1.0).item() == 0.0
    with pytest.raises(ValueError, match="at least 2"):
        rkd_loss(e[:1], e[:1])


# ------------------------------------------------------------------------ from a store
@pytest.fixture(scope="module")
def store(tiny_store, tmp_path_factory):
    return method_store(tiny_store, tmp_path_factory, "rkd")


def test_store_holds_the_pooled_feature_for_every_view(store):
    reader = open_store(store["path"])
    assert reader.array("pooled_feat").shape == (32, 50, 64)  # resnet8: 64 channels, 50 views


def test_cached_pooled_feature_equals_online_on_replayed_views(store):
    for batch, a, b in replayed_targets(store, PooledFeature):
        torch.testing.assert_close(a["pooled_feat"], b["pooled_feat"], rtol=2e-3, atol=2e-3)
        s = torch.randn(len(batch.indices), 8, generator=torch.Generator().manual_seed(0))
        assert rkd_loss(s, a["pooled_feat"]).item() == pytest.approx(rkd_loss(s, b["pooled_feat"]).item(), rel=1e-2)


def test_method_is_ce_plus_weighted_rkd_of_pooled_features(store):
    dataset = load_dataset(store["data"])
    teacher = load_teacher("resnet8", store["teacher"], dataset.num_classes)
    x = normalize(dataset.get_batch(np.arange(6)), dataset.mean, dataset.std)
    labels = torch.as_tensor(dataset.labels[:6], dtype=torch.int64)
    method = get_method("rkd", feat_weight=2.0)
    # mdistiller cfg.py CFG.RKD
    assert method.options == {
        "distance_weight": 25.0,
        "angle_weight": 50.0,
        "feat_weight": 2.0,
        "ce_weight": 1.0,
        "eps": 1e-12,
        "squared": False,
    }
    targets = method.kinds()[0].online_targets(TeacherOutputs.of(teacher, x))
    logits, feats = build("resnet8", dataset.num_classes).forward_features(x)
    total, parts = method.loss(logits, feats, targets, labels)
    expected = rkd_loss(feats["penult"].mean(dim=(2, 3)), teacher.forward_features(x)[1]["penult"].mean(dim=(2, 3)))
    torch.testing.assert_close(parts["rkd"], expected.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(total, F.cross_entropy(logits, labels) + 2.0 * expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("source", ["cached", "online"])
def test_trains_one_epoch_cached_and_online(store, tmp_path, source):
    trains_one_epoch_and_evaluates(store, tmp_path, "rkd", source)


def test_mdistiller_rkd_yaml_is_read_as_it_is(tmp_path):
    """The keys and values of mdistiller configs/cifar100/rkd.yaml (resnet32x4 -> resnet8x4)."""
    cfg = read_mdistiller_cifar100_yaml(tmp_path, "RKD")
    assert cfg.method_options == {
        "distance_weight": 25.0,
        "angle_weight": 50.0,
        "feat_weight": 1.0,
        "ce_weight": 1.0,
        "eps": 1e-12,
        "squared": False,
    }
    sections = {"RKD": {"ANGLE_WEIGHT": 10, "PDIST": {"SQUARED": True}}}
    options = read_mdistiller_cifar100_yaml(tmp_path, "RKD", sections).method_options
    assert options["angle_weight"] == 10.0 and options["squared"] is True
