"""NST: the loss against values mdistiller's own ``nst_loss`` produced, the stored factor form
equal to the loss on the teacher's features, the factors cached = online on replayed views,
one epoch from a store and from the online teacher, and mdistiller's configs/cifar100/nst.yaml
read as it is."""

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
from kdpipe.methods import get_method
from kdpipe.methods.nst import NSTFactors, nst_factor, nst_loss, nst_stage_loss_from_factor
from kdpipe.models import build, load_teacher
from kdpipe.targets import TeacherOutputs

torch.set_num_threads(1)


def wave(shape, phase: float, scale: float = 1.0) -> torch.Tensor:
    """Closed-form inputs (the same in the reference script): scale * sin(0.7 i + phase) over
    the flat index i."""
    n = math.prod(shape)
    return (scale * torch.sin(0.7 * torch.arange(n, dtype=torch.float32) + phase)).reshape(shape)


# Values of mdistiller/distillers/NST.py ``nst_loss(g_s, g_t)`` (torch 2.13.0+cpu, float32) on
# g_s[i] = wave(student shape i, 0.1 i), g_t[i] = wave(teacher shape i, 1 + 0.2 i, 2.0): the
# loss, the l2 norm of d loss / d g_s[i] per stage, and d loss / d g_s[0] where given.
MDISTILLER_NST = [
    {  # a student larger than the teacher at stage 2 (pooled); C_t <= cells and C_t > cells
        "student": [(2, 3, 4, 4), (2, 2, 4, 4)],
        "teacher": [(2, 5, 4, 4), (2, 6, 2, 2)],
        "loss": 0.687554657459259,
        "stage_losses": [0.06827801465988159, 0.6192766427993774],
        "grad_norms": [0.03821489214897156, 1.1425590515136719],
        "grad0": None,
    },
    {  # a student smaller than the teacher at stage 1 (the teacher pooled), 20 channels on 16 cells
        "student": [(2, 3, 2, 2), (2, 4, 4, 4)],
        "teacher": [(2, 5, 4, 4), (2, 20, 4, 4)],
        "loss": 1.1496696472167969,
        "stage_losses": None,
        "grad_norms": [0.3729727268218994, 0.048368290066719055],
        "grad0": [-0.18878739, -0.075527221, 0.033718497, 0.0178729, 0.10233179, 0.038425662]
        + [-0.01288271, 0.032601193, 0.016080871, 0.057901338, 0.056425855, -0.02822724]
        + [0.05290544, 0.093591839, 0.088474661, 0.048486933, 0.029884756, 0.010918692]
        + [0.029281981, 0.052313, -0.0063079447, -0.033812478, -0.1178681, -0.18471268],
    },
]


def _inputs(case):
    fs = [wave(s, 0.1 * i).requires_grad_(True) for i, s in enumerate(case["student"])]
    ft = [wave(t, 1.0 + 0.2 * i, 2.0) for i, t in enumerate(case["teacher"])]
    return fs, ft


@pytest.mark.parametrize("case", MDISTILLER_NST)
def test_nst_loss_equals_mdistiller(case):
    fs, ft = _inputs(case)
    loss = nst_loss(fs, ft)
    loss.backward()
    assert loss.item() == pytest.approx(case["loss"], rel=1e-5)
    for f, norm in zip(fs, case["grad_norms"]):
        assert f.grad.norm().item() == pytest.approx(norm, rel=1e-4)
    if case["grad0"] is not None:
        torch.testing.assert_close(fs[0].grad.flatten(), torch.tensor(case["grad0"]), rtol=1e-4, atol=1e-6)
    for a, b, want in zip(fs, ft, case["stage_losses"] or []):
        assert nst_loss([a.detach()], [b]).item() == pytest.approx(want, rel=1e-5)


def test_the_factor_is_smaller_and_gives_the_same_loss():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(3, 12, 2, 2, generator=g).relu()
    factor = nst_factor(teacher)
    assert factor.shape == (3, 4, 2, 2)  # min(12 channels, 4 cells) rows
    t = F.normalize(teacher.reshape(3, 12, 4), dim=2)
    f = factor.reshape(3, 4, 4)
    torch.testing.assert_close(f.transpose(1, 2) @ f, t.transpose(1, 2) @ t / 12, rtol=1e-5, atol=1e-6)
    assert nst_factor(torch.randn(3, 3, 4, 4, generator=g)).shape == (3, 3, 4, 4)  # fewer channels: kept
    student = torch.randn(3, 5, 2, 2, generator=g)
    assert nst_stage_loss_from_factor(student, factor).item() == pytest.approx(nst_loss([student], [teacher]).item())
    assert nst_loss([teacher], [teacher]).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="side=2"):
        nst_stage_loss_from_factor(student, nst_factor(torch.randn(3, 4, 4, 4, generator=g)))
    with pytest.raises(ValueError, match="pairwise"):
        nst_loss([student], [])


# ------------------------------------------------------------------------ from a store
@pytest.fixture(scope="module")
def store(tiny_store, tmp_path_factory):
    return method_store(tiny_store, tmp_path_factory, "nst")


def test_store_holds_the_factors_for_every_view(store):
    reader = open_store(store["path"])
    # resnet8 on 16x16: stages 16 (16 ch), 8 (32 ch), 4 wide (64 ch: 16 rows, one per cell)
    shapes = {n: reader.array(n).shape for n in reader.array_names() if n.startswith("nst/")}
    assert shapes == {
        "nst/stage1": (32, 50, 16, 16, 16),
        "nst/stage1_half": (32, 50, 16, 8, 8),
        "nst/stage2": (32, 50, 32, 8, 8),
        "nst/stage2_half": (32, 50, 16, 4, 4),
        "nst/stage3": (32, 50, 16, 4, 4),
        "nst/stage3_half": (32, 50, 4, 2, 2),
    }


def test_cached_factors_equal_online_on_replayed_views(store):
    keys = set(stored_kind(store, NSTFactors).target_keys)
    for _batch, a, b in replayed_targets(store, NSTFactors):
        assert set(a) == set(b) == keys and len(a) == 6
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=2e-3, atol=2e-3)


def test_method_equals_nst_loss_on_a_smaller_student(store):
    """ShuffleV1 after a resnet8 teacher: every student stage is half the teacher's, so the
    half-side factors give mdistiller's loss (the teacher's features pooled first)."""
    dataset = load_dataset(store["data"])
    teacher = load_teacher("resnet8", store["teacher"], dataset.num_classes)
    x = normalize(dataset.get_batch(np.arange(6)), dataset.mean, dataset.std)
    labels = torch.as_tensor(dataset.labels[:6], dtype=torch.int64)
    method = get_method("nst")
    assert method.options == {"feat_weight": 50.0, "ce_weight": 1.0}  # mdistiller cfg.py CFG.NST
    kind = method.kinds()[0]
    out = TeacherOutputs.of(teacher, x, stages=True)
    targets = kind.online_targets(out)
    for name in ("ShuffleV1", "resnet8"):
        student = method.prepare_student(build(name, dataset.num_classes))
        logits, feats = student.forward_features(x)
        total, parts = method.loss(logits, feats, targets, labels)
        expected = nst_loss(feats["stages"], out.feats["stages"])
        torch.testing.assert_close(parts["nst"], expected.detach(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(total, F.cross_entropy(logits, labels) + 50.0 * expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("source", ["cached", "online"])
def test_trains_one_epoch_cached_and_online(store, tmp_path, source):
    trains_one_epoch_and_evaluates(store, tmp_path, "nst", source)


def test_mdistiller_nst_yaml_is_read_as_it_is(tmp_path):
    """The keys and values of mdistiller configs/cifar100/nst.yaml (resnet32x4 -> resnet8x4)."""
    cfg = read_mdistiller_cifar100_yaml(tmp_path, "NST")
    assert cfg.method_options == {"feat_weight": 50.0, "ce_weight": 1.0}
    cfg = read_mdistiller_cifar100_yaml(tmp_path, "NST", {"NST": {"LOSS": {"FEAT_WEIGHT": 1000.0}}})
    assert cfg.method_options["feat_weight"] == 1000.0
