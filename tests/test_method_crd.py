"""CRD (kdpipe/methods/crd.py): the loss, memory banks and Z against values mdistiller's own
``mdistiller/distillers/CRD.py`` produced (``Embed``, ``ContrastMemory``, ``ContrastLoss`` run on
CPU on the inputs below, ``AliasMethod.cuda`` made a no-op; the reference is not imported
here); the negatives' sampling; cached = online for ``PooledPenult``; one epoch cached and
online, and ``crd+kd``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from method_checks import method_store, replayed_targets, trains_one_epoch_and_evaluates

from kdpipe.methods import get_method
from kdpipe.methods.crd import CRDHead, PooledPenult, nce_loss, sample_contrast_index

torch.set_num_threads(1)


def _reference_inputs():
    """The scratch script's inputs, drawn in its order from torch.manual_seed(0)."""
    torch.manual_seed(0)
    n, d, b, ds, dt = 12, 6, 3, 5, 7
    fs, ft = torch.randn(b, ds), torch.randn(b, dt)
    ws, bs, wt, bt = torch.randn(d, ds), torch.randn(d), torch.randn(d, dt), torch.randn(d)
    mem1, mem2 = torch.rand(n, d) - 0.5, torch.rand(n, d) - 0.5
    head = CRDHead(ds, dt, d, n)
    with torch.no_grad():
        head.embed_s.linear.weight.copy_(ws)
        head.embed_s.linear.bias.copy_(bs)
        head.embed_t.linear.weight.copy_(wt)
        head.embed_t.linear.bias.copy_(bt)
        head.student_memory.copy_(mem1)
        head.teacher_memory.copy_(mem2)
    index = torch.tensor([2, 7, 10])
    contrast = torch.tensor([[2, 0, 5, 9, 11], [7, 1, 1, 3, 4], [10, 6, 8, 0, 2]])
    return head, fs, ft, index, contrast


def test_crd_head_equals_mdistiller_over_two_steps():
    head, fs, ft, index, contrast = _reference_inputs()
    # mdistiller CRD.py: crit_s(out_s) + crit_t(out_t) of ContrastMemory(6, 12, 4, 0.07, 0.5)
    # called twice on the same batch (Z fixed by the first call, banks moved after each)
    expected = [11.29318904876709, 9.704105377197266]
    for want in expected:
        assert head(fs, ft, index, contrast, 0.07, 0.5).item() == pytest.approx(want, rel=1e-5)
    assert head.z.tolist() == pytest.approx([1363.5118408203125, 922.2050170898438], rel=1e-5)
    # memory_v1 (the student's bank) and memory_v2 (the teacher's) row sums after the 2 steps
    mem1 = [-0.17260712, 0.13919544, 1.46004653, -0.62730181, 0.14763802, 0.09655833]
    mem1 += [0.0964871, -0.72609675, -0.87697059, -0.64395553, -0.18134215, 0.81715095]
    mem2 = [-0.98096704, -0.22976011, 1.13775420, 0.03336537, -0.25258720, -0.36587387]
    mem2 += [-0.34994853, -0.85612273, -0.03800607, 1.43046999, -0.09121276, 1.78295732]
    torch.testing.assert_close(head.student_memory.sum(1), torch.tensor(mem1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head.teacher_memory.sum(1), torch.tensor(mem2), rtol=1e-5, atol=1e-5)


def test_nce_loss_equals_mdistiller_contrast_loss():
    torch.manual_seed(1)
    x = torch.rand(2, 6)
    # mdistiller CRD.py ContrastLoss(100)(x)
    assert nce_loss(x, 100).item() == pytest.approx(11.479066848754883, rel=1e-6)


def test_contrast_index_negatives_are_other_classes():
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])
    index = torch.tensor([0, 4, 7])
    g = torch.Generator().manual_seed(0)
    exact = sample_contrast_index(index, labels, 5, "exact", generator=g)
    assert exact.shape == (3, 6) and torch.equal(exact[:, 0], index)
    for row, i in zip(exact, index):
        assert (labels[row[1:]] != labels[i]).all()
    few = sample_contrast_index(index, labels, 3, "exact", generator=g)  # 6, 5, 7 negatives: no repeats
    assert all(len(set(r[1:].tolist())) == 3 for r in few)
    relax = sample_contrast_index(index, labels, 9, "relax", generator=g)  # 9 > 5: with replacement
    assert torch.equal(labels[relax[:, 0]], labels[index])
    assert all((labels[r[1:]] != labels[i]).all() for r, i in zip(relax, index))


@pytest.fixture(scope="module")
def store(tiny_store, tmp_path_factory):
    return method_store(tiny_store, tmp_path_factory, "crd")


def test_cached_pooled_penult_equals_online_on_replayed_views(store):
    from kdpipe.artifacts import open_store

    reader = open_store(store["path"])
    assert reader.array("penult_pooled").shape[1:] == (50, 64)
    for batch, a, b in replayed_targets(store, PooledPenult):
        assert set(a) == set(b) == {"penult_pooled", "sample_index"}
        assert torch.equal(a["sample_index"], batch.indices) and torch.equal(b["sample_index"], batch.indices)
        torch.testing.assert_close(a["penult_pooled"], b["penult_pooled"], rtol=2e-3, atol=2e-3)


def test_method_loss_is_ce_plus_weighted_crd():
    from kdpipe.methods.base import TeacherInfo
    from kdpipe.models import build

    method = get_method("crd", nce_k=3)
    method.attach_teacher(TeacherInfo(shapes={"penult_pooled": (64,)}, labels=[0, 1, 2, 3] * 3))
    student = method.prepare_student(build("resnet8", 4))
    assert method.options["student_dim"] == 64 and method.options["num_data"] == 12
    x, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    logits, feats = student.forward_features(x)
    targets = {"penult_pooled": torch.randn(4, 64), "sample_index": torch.tensor([0, 5, 10, 3])}
    total, parts = method.loss(logits, feats, targets, labels)
    torch.testing.assert_close(total, F.cross_entropy(logits, labels) + 0.8 * parts["crd"], rtol=1e-5, atol=1e-6)
    assert any(n.startswith("crd_head.embed_t") for n, _ in student.named_parameters())


@pytest.mark.parametrize(("method", "source"), [("crd", "cached"), ("crd", "online"), ("crd+kd", "cached")])
def test_trains_one_epoch_and_evaluates(store, tmp_path, method, source):
    trains_one_epoch_and_evaluates(store, tmp_path, method, source)
