"""OFD (kdpipe/methods/ofd.py): the margins and the loss against values mdistiller's own
``mdistiller/distillers/OFD.py`` produced (``OFD.init_ofd_modules`` and ``OFD.ofd_loss`` on the
inputs below; the reference is not imported here); cached = online for ``PreactStages``; one
epoch cached and online."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from method_checks import method_store, replayed_targets, trains_one_epoch_and_evaluates

from kdpipe.methods import get_method
from kdpipe.methods.ofd import MARGIN, Connector, PreactStages, ofd_loss, ofd_margin

torch.set_num_threads(1)


def test_margins_and_loss_equal_mdistiller():
    torch.manual_seed(0)
    bns = []
    for d in (4, 6):
        bns.append((torch.randn(d), torch.randn(d) * 2))
    bns[1][1][0] = 8.0  # a channel whose negative tail is under 0.001: margin -3 s
    fs = [torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4, 4)]
    ft = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 8, 8)]
    w = [torch.randn(4, 3, 1, 1), torch.randn(6, 5, 1, 1)]
    margins = [ofd_margin(weight, bias) for weight, bias in bns]
    # mdistiller OFD.init_ofd_modules(self, [4, 6], [3, 5], bns, 1).margins
    expected = [
        [-2.41709041595459, -2.7971909046173096, -1.4757381677627563, -0.16300927102565765],
        [-2.1577727794647217, -0.24721048772335052, -1.1730705499649048, -0.5461094379425049],
        [-1.8238208293914795, -3.028468370437622],
    ]
    assert margins[0].tolist() == pytest.approx(expected[0], rel=1e-6)
    assert margins[1].tolist() == pytest.approx(expected[1] + expected[2], rel=1e-6)
    connectors = [Connector(3, 4), Connector(5, 6)]  # training mode, as mdistiller's
    with torch.no_grad():
        for c, weight in zip(connectors, w):
            c[0].weight.copy_(weight)
    # mdistiller OFD.ofd_loss(self, fs, ft) with those connectors (the teacher pooled to 4x4 for stage 2)
    value = ofd_loss([c(f) for c, f in zip(connectors, fs)], ft, margins)
    assert value.item() == pytest.approx(309.23480224609375, rel=1e-5)


@pytest.fixture(scope="module")
def store(tiny_store, tmp_path_factory):
    return method_store(tiny_store, tmp_path_factory, "ofd")


def test_cached_preact_stages_equal_online_and_margins_are_stored(store):
    from kdpipe.artifacts import open_store
    from kdpipe.data import load_dataset
    from kdpipe.models import load_teacher

    reader, dataset = open_store(store["path"]), load_dataset(store["data"])
    teacher = load_teacher("resnet8", store["teacher"], dataset.num_classes)
    assert reader.array("preact_feats/stage2").shape[1:] == (50, 32, 8, 8)
    bn = teacher.layer3[-1].bn2  # mdistiller resnet.py get_bn_before_relu()[2]
    np.testing.assert_allclose(reader.static(MARGIN.format(3)), ofd_margin(bn.weight, bn.bias).numpy())
    for _batch, a, b in replayed_targets(store, PreactStages):
        assert set(a) == set(b) == {"preact_stage1", "preact_stage2", "preact_stage3"}
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=2e-3, atol=2e-3)


def test_method_loss_uses_the_last_matched_stages():
    from kdpipe.methods.base import TeacherInfo
    from kdpipe.models import build

    method = get_method("ofd")
    shapes = {"preact_feats/stage1": (16, 16, 16), "preact_feats/stage2": (32, 8, 8), "preact_feats/stage3": (64, 4, 4)}
    static = {MARGIN.format(i): -np.ones(s[0], np.float32) for i, s in enumerate(shapes.values(), start=1)}
    method.attach_teacher(TeacherInfo(shapes=shapes, static=static, image_size=(16, 16)))
    student = method.prepare_student(build("resnet8", 4))
    x, labels = torch.randn(2, 3, 16, 16), torch.tensor([0, 1])
    logits, feats = student.forward_features(x)
    targets = {f"preact_stage{i}": torch.randn(2, *s) for i, s in enumerate(shapes.values(), start=1)}
    total, parts = method.loss(logits, feats, targets, labels)
    connected = [c(f) for c, f in zip(student.ofd_connectors, feats["preact_stages"])]
    expected = ofd_loss(connected, list(targets.values()), [-torch.ones(s[0]) for s in shapes.values()])
    torch.testing.assert_close(parts["ofd"], expected.detach())
    torch.testing.assert_close(total, F.cross_entropy(logits, labels) + 0.001 * expected)


@pytest.mark.parametrize("source", ["cached", "online"])
def test_trains_one_epoch_and_evaluates(store, tmp_path, source):
    trains_one_epoch_and_evaluates(store, tmp_path, "ofd", source)
