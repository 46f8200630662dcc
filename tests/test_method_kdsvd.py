"""KDSVD: the loss against values mdistiller's own ``kdsvd_loss`` produced, the teacher's
singular vectors and values cached = online on replayed views, one epoch from a store and
from the online teacher, and mdistiller's configs/cifar100/kdsvd.yaml read as it is."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from method_checks import (
    method_store,
    read_mdistiller_cifar100_yaml,
    replayed_targets,
    stored_kind,
    trains_one_epoch_and_evaluates,
)

from kdpipe.artifacts import open_store
from kdpipe.data import load_dataset, normalize
from kdpipe.errors import KdpipeError
from kdpipe.methods import get_method
from kdpipe.methods.kdsvd import SVDTargets, align_vectors, kdsvd_loss, kdsvd_loss_from_teacher, right_singular
from kdpipe.models import build, load_teacher
from kdpipe.targets import TeacherOutputs

torch.set_num_threads(1)


def wave(shape, phase: float, scale: float = 1.0) -> torch.Tensor:
    """Closed-form inputs (the same in the reference script): scale * sin(0.7 i + phase) over
    the flat index i."""
    n = math.prod(shape)
    return (scale * torch.sin(0.7 * torch.arange(n, dtype=torch.float32) + phase)).reshape(shape)


# Values of mdistiller/distillers/KDSVD.py ``kdsvd_loss(g_s, g_t, k)`` (torch 2.13.0+cpu,
# float32) on g_s[i] = wave(student shape i, 0.1 i), g_t[i] = wave(teacher shape i, 1 + 0.2 i,
# 2.0): the loss, the l2 norm of d loss / d g_s[i] per stage and the first entries of
# d loss / d g_s[0].
STUDENT_SHAPES = [(2, 3, 4, 4), (2, 2, 4, 4), (2, 4, 4, 4)]
TEACHER_SHAPES = [(2, 5, 4, 4), (2, 3, 4, 4), (2, 2, 4, 4)]
MDISTILLER_KDSVD = [
    {
        "k": 1,
        "loss": 0.031035328283905983,
        "grad_norms": [0.09170641750097275, 0.22304323315620422, 0.05609068647027016],
        "grad0": [-0.0035449485, -0.001524223, -0.00032259218, 0.00069584791, 0.0033412219, 0.00093646435],
    },
    {
        "k": 2,
        "loss": 0.01759025827050209,
        "grad_norms": [0.05097219720482826, 0.11689914017915726, 0.02983136847615242],
        "grad0": [-0.0020796198, -0.0010823807, -0.00024704836, 0.0005768438, 0.0018989264, 0.00075824803],
    },
]


def _inputs():
    fs = [wave(s, 0.1 * i).requires_grad_(True) for i, s in enumerate(STUDENT_SHAPES)]
    ft = [wave(t, 1.0 + 0.2 * i, 2.0) for i, t in enumerate(TEACHER_SHAPES)]
    return fs, ft


@pytest.mark.parametrize("case", MDISTILLER_KDSVD)
def test_kdsvd_loss_equals_mdistiller(case):
    fs, ft = _inputs()
    loss = kdsvd_loss(fs, ft, case["k"])
    loss.backward()
    assert loss.item() == pytest.approx(case["loss"], rel=1e-5)
    for f, norm in zip(fs, case["grad_norms"]):
        assert f.grad.norm().item() == pytest.approx(norm, rel=1e-4)
    torch.testing.assert_close(fs[0].grad.flatten()[:6], torch.tensor(case["grad0"]), rtol=1e-4, atol=1e-7)


def test_degenerate_maps_give_no_gradient_instead_of_nan():
    # a map with all-zero columns (blank borders after a ReLU) repeats the zero singular value:
    # torch's (and mdistiller's) SVD gradient is NaN there; the KD-SVD authors' code zeroes the
    # gradient of such samples, and every other sample keeps its own
    torch.manual_seed(0)
    blank = torch.relu(torch.randn(1, 8, 8, 8))
    blank[..., :5] = 0
    normal = torch.relu(torch.randn(1, 8, 8, 8)) + 0.1
    deeper = torch.relu(torch.randn(2, 16, 4, 4)) + 0.1
    teacher = [torch.relu(torch.randn(2, 8, 8, 8)), torch.relu(torch.randn(2, 16, 4, 4))]
    first = torch.cat([blank, normal]).requires_grad_(True)
    second = deeper.clone().requires_grad_(True)
    loss = kdsvd_loss([first, second], teacher, 1)
    loss.backward()
    assert first.grad is not None and second.grad is not None
    assert torch.isfinite(first.grad).all() and torch.isfinite(second.grad).all()
    assert float(first.grad[0].abs().sum()) == 0.0
    # the healthy sample's gradient is the one it has alone (the loss is a mean over the batch)
    alone = normal.clone().requires_grad_(True)
    kdsvd_loss([alone, deeper[1:].clone()], [t[1:] for t in teacher], 1).backward()
    assert alone.grad is not None
    torch.testing.assert_close(first.grad[1], alone.grad[0] / 2)


def test_stored_vectors_give_the_same_loss_and_alignment_follows_signs():
    fs, ft = _inputs()
    teacher = [right_singular(t, 1) for t in ft]
    assert [tuple(v.shape) for v, _ in teacher] == [(2, 4, 1)] * 3 and teacher[0][1].shape == (2, 1)
    from_stored = kdsvd_loss_from_teacher(fs, [v for v, _ in teacher], [s for _, s in teacher], 1)
    assert from_stored.item() == pytest.approx(kdsvd_loss(fs, ft, 1).item(), rel=1e-6)
    # a student vector of opposite sign is flipped onto the teacher's
    v = F.normalize(torch.tensor([[[1.0], [2.0], [0.0]]]), dim=1)
    torch.testing.assert_close(align_vectors(torch.cat([-v, torch.zeros_like(v)], dim=2), v), v)
    assert kdsvd_loss(fs[:1], ft[:1]).item() == 0.0  # relations need two stages
    with pytest.raises(KdpipeError, match="equal widths"):
        kdsvd_loss([torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2)], [torch.randn(2, 3, 8, 8)] * 2)


# ------------------------------------------------------------------------ from a store
@pytest.fixture(scope="module")
def store(tiny_store, tmp_path_factory):
    return method_store(tiny_store, tmp_path_factory, "kdsvd")


def test_store_holds_vectors_and_values_for_every_view(store):
    reader = open_store(store["path"])
    # resnet8 on 16x16: stages 16, 8 and 4 wide, k = 1
    shapes = {n: reader.array(n).shape for n in reader.array_names() if n.startswith("kdsvd_k1/")}
    assert shapes == {
        "kdsvd_k1/stage1_v": (32, 50, 16, 1),
        "kdsvd_k1/stage1_s": (32, 50, 1),
        "kdsvd_k1/stage2_v": (32, 50, 8, 1),
        "kdsvd_k1/stage2_s": (32, 50, 1),
        "kdsvd_k1/stage3_v": (32, 50, 4, 1),
        "kdsvd_k1/stage3_s": (32, 50, 1),
    }


def test_cached_vectors_equal_online_on_replayed_views(store):
    keys = set(stored_kind(store, lambda: SVDTargets(1)).target_keys)
    for _batch, a, b in replayed_targets(store, lambda: SVDTargets(1)):
        assert set(a) == set(b) == keys and len(a) == 6
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=2e-3, atol=2e-3)


def test_method_is_ce_plus_weighted_kdsvd(store):
    dataset = load_dataset(store["data"])
    teacher = load_teacher("resnet8", store["teacher"], dataset.num_classes)
    x = normalize(dataset.get_batch(np.arange(6)), dataset.mean, dataset.std)
    labels = torch.as_tensor(dataset.labels[:6], dtype=torch.int64)
    method = get_method("kdsvd", feat_weight=3.0)
    assert method.options == {"k": 1, "feat_weight": 3.0, "ce_weight": 1.0}  # mdistiller cfg.py CFG.KDSVD
    out = TeacherOutputs.of(teacher, x, stages=True)
    targets = method.kinds()[0].online_targets(out)
    student = method.prepare_student(build("resnet8", dataset.num_classes))
    logits, feats = student.forward_features(x)
    total, parts = method.loss(logits, feats, targets, labels)
    expected = kdsvd_loss(feats["stages"], out.feats["stages"], 1)
    torch.testing.assert_close(parts["kdsvd"], expected.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(total, F.cross_entropy(logits, labels) + 3.0 * expected, rtol=1e-5, atol=1e-6)
    # a student with other stage widths (ShuffleV1's are half) is one sentence, as mdistiller cannot align them
    shuffle = method.prepare_student(build("ShuffleV1", dataset.num_classes))
    with pytest.raises(KdpipeError, match="equal widths"):
        method.loss(*shuffle.forward_features(x), targets, labels)


@pytest.mark.parametrize("source", ["cached", "online"])
def test_trains_one_epoch_cached_and_online(store, tmp_path, source):
    trains_one_epoch_and_evaluates(store, tmp_path, "kdsvd", source)


def test_mdistiller_kdsvd_yaml_is_read_as_it_is(tmp_path):
    """The keys and values of mdistiller configs/cifar100/kdsvd.yaml (resnet32x4 -> resnet8x4)."""
    cfg = read_mdistiller_cifar100_yaml(tmp_path, "KDSVD")
    assert cfg.method_options == {"k": 1, "feat_weight": 1.0, "ce_weight": 1.0}
    assert read_mdistiller_cifar100_yaml(tmp_path, "KDSVD", {"KDSVD": {"K": 2}}).method_options["k"] == 2
