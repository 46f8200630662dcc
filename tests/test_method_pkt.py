"""PKT: the loss against values mdistiller's own ``pkt_loss`` produced, the teacher's pooled
feature cached = online on replayed views, one epoch from a store and from the online
teacher, and mdistiller's configs/cifar100/pkt.yaml read as it is."""

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
from kdpipe.methods.pkt import pkt_loss
from kdpipe.models import build, load_teacher
from kdpipe.targets import PooledFeature, TeacherOutputs

torch.set_num_threads(1)


def wave(shape, phase: float, scale: float = 1.0) -> torch.Tensor:
    """Closed-form inputs (the same in the reference script): scale * sin(0.7 i + phase) over
    the flat index i."""
    n = math.prod(shape)
    return (scale * torch.sin(0.7 * torch.arange(n, dtype=torch.float32) + phase)).reshape(shape)


# Values of mdistiller/distillers/PKT.py ``pkt_loss(f_s, f_t)`` (eps 1e-7; torch 2.13.0+cpu,
# float32) on f_s = wave(shape, phase_s), f_t = wave(shape, phase_t, 2.0), and d loss / d f_s.
MDISTILLER_PKT = [
    {
        "shape": (4, 3),
        "phases": (0.0, 1.0),
        "loss": 0.02475086972117424,
        "grad": [0.018225314, 0.0083471639, -0.0054567885, 0.0067574577, 0.040692084, 0.055488586]
        + [-0.0083863549, 0.0010345057, 0.0099688275, 0.018446542, 0.0082626408, -0.0058073075],
    },
    {"shape": (5, 6), "phases": (0.3, 2.1), "loss": 0.006159565411508083, "grad": None},
]


@pytest.mark.parametrize("case", MDISTILLER_PKT)
def test_pkt_loss_equals_mdistiller(case):
    fs = wave(case["shape"], case["phases"][0]).requires_grad_(True)
    ft = wave(case["shape"], case["phases"][1], 2.0)
    loss = pkt_loss(fs, ft)
    loss.backward()
    assert loss.item() == pytest.approx(case["loss"], rel=1e-5)
    if case["grad"] is not None:
        torch.testing.assert_close(fs.grad.flatten(), torch.tensor(case["grad"]), rtol=1e-4, atol=1e-7)


def test_pkt_hand_cases():
    f = wave((5, 4), 0.2)
    assert pkt_loss(f, f).item() == pytest.approx(0.0, abs=1e-7)
    # only directions count: scaling either side leaves it unchanged
    g = wave((5, 4), 1.3)
    assert pkt_loss(3.0 * f, 0.5 * g).item() == pytest.approx(pkt_loss(f, g).item(), rel=1e-4)  # up to the eps
    # a zero row stays finite (its cosines are 0, as mdistiller's NaN guard leaves them)
    z = f.clone()
    z[0] = 0.0
    assert math.isfinite(pkt_loss(z, g).item())
    with pytest.raises(ValueError, match="same batch"):
        pkt_loss(f, g[:3])


# ------------------------------------------------------------------------ from a store
@pytest.fixture(scope="module")
def store(tiny_store, tmp_path_factory):
    return method_store(tiny_store, tmp_path_factory, "pkt")


def test_store_holds_the_pooled_feature_for_every_view(store):
    reader = open_store(store["path"])
    assert reader.array("pooled_feat").shape == (32, 50, 64)  # resnet8: 64 channels, 50 views


def test_cached_pooled_feature_equals_online_on_replayed_views(store):
    for batch, a, b in replayed_targets(store, PooledFeature):
        torch.testing.assert_close(a["pooled_feat"], b["pooled_feat"], rtol=2e-3, atol=2e-3)
        # the loss sees the same relations: PKT of the student against either is the same
        s = torch.randn(len(batch.indices), 8, generator=torch.Generator().manual_seed(0))
        assert pkt_loss(s, a["pooled_feat"]).item() == pytest.approx(pkt_loss(s, b["pooled_feat"]).item(), rel=1e-2)


def test_method_is_ce_plus_weighted_pkt_of_pooled_features(store):
    dataset = load_dataset(store["data"])
    teacher = load_teacher("resnet8", store["teacher"], dataset.num_classes)
    x = normalize(dataset.get_batch(np.arange(6)), dataset.mean, dataset.std)
    labels = torch.as_tensor(dataset.labels[:6], dtype=torch.int64)
    method = get_method("pkt")
    assert method.options == {"feat_weight": 30000.0, "ce_weight": 1.0}  # mdistiller cfg.py CFG.PKT
    targets = method.kinds()[0].online_targets(TeacherOutputs.of(teacher, x))
    logits, feats = build("resnet8", dataset.num_classes).forward_features(x)
    total, parts = method.loss(logits, feats, targets, labels)
    expected = pkt_loss(feats["penult"].mean(dim=(2, 3)), teacher.forward_features(x)[1]["penult"].mean(dim=(2, 3)))
    torch.testing.assert_close(parts["pkt"], expected.detach(), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(total, F.cross_entropy(logits, labels) + 30000.0 * expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("source", ["cached", "online"])
def test_trains_one_epoch_cached_and_online(store, tmp_path, source):
    trains_one_epoch_and_evaluates(store, tmp_path, "pkt", source)


def test_mdistiller_pkt_yaml_is_read_as_it_is(tmp_path):
    """The keys and values of mdistiller configs/cifar100/pkt.yaml (resnet32x4 -> resnet8x4)."""
    cfg = read_mdistiller_cifar100_yaml(tmp_path, "PKT")
    assert cfg.method_options == {"feat_weight": 30000.0, "ce_weight": 1.0}
    cfg = read_mdistiller_cifar100_yaml(tmp_path, "PKT", {"PKT": {"LOSS": {"FEAT_WEIGHT": 1000.0}}})
    assert cfg.method_options["feat_weight"] == 1000.0
