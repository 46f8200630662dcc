"""FSP (kdpipe/methods/fsp.py): the matrices and the loss against values RepDistiller's own
``FSP`` (``distiller_zoo/FSP.py``) produced on the inputs below (the reference is not imported
here); cached = online for ``FSPMatrices``; both stages train cached and online."""

from __future__ import annotations

import pytest
import torch
from method_checks import method_store, replayed_targets, trains_one_epoch_and_evaluates

from kdpipe.methods import get_method
from kdpipe.methods.fsp import FSPMatrices, fsp_loss, fsp_matrices

torch.set_num_threads(1)


def test_matrices_and_loss_equal_repdistiller():
    torch.manual_seed(0)
    g_s = [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4, 4), torch.randn(2, 6, 2, 2)]
    g_t = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8), torch.randn(2, 5, 8, 8), torch.randn(2, 6, 4, 4)]
    teacher = fsp_matrices(g_t)
    # RepDistiller FSP.compute_fsp(g_t): shapes and the sum of the second matrix
    assert [tuple(m.shape) for m in teacher] == [(2, 3, 3), (2, 5, 3), (2, 6, 5)]
    assert float(teacher[1].sum()) == pytest.approx(0.6576095223426819, rel=1e-5)
    # RepDistiller FSP(...)(g_s, g_t): per pair 0.0171996, 0.0435172, 0.0842170; their sum
    assert fsp_loss(fsp_matrices(g_s), teacher).item() == pytest.approx(0.14493373036384583, rel=1e-5)


@pytest.fixture(scope="module")
def store(tiny_store, tmp_path_factory):
    return method_store(tiny_store, tmp_path_factory, "fsp")


def test_cached_matrices_equal_online_on_replayed_views(store):
    from kdpipe.artifacts import open_store

    reader = open_store(store["path"])
    # resnet8: stem 16, stages 16, 32, 64 channels
    assert reader.array("fsp/pair3").shape[1:] == (50, 64, 32)
    for _batch, a, b in replayed_targets(store, FSPMatrices):
        assert set(a) == set(b) == {"fsp1", "fsp2", "fsp3"}
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=2e-3, atol=2e-3)


def test_mismatched_widths_are_one_sentence():
    from kdpipe.errors import KdpipeError
    from kdpipe.methods.base import TeacherInfo
    from kdpipe.models import build

    method = get_method("fsp")
    method.attach_teacher(TeacherInfo(shapes={"fsp/pair1": (16, 16), "fsp/pair2": (32, 16)}, image_size=(16, 16)))
    with pytest.raises(KdpipeError, match="channel counts"):
        method.prepare_student(build("resnet8x4", 4))


@pytest.mark.parametrize("source", ["cached", "online"])
def test_trains_both_stages_and_evaluates(store, tmp_path, source):
    trains_one_epoch_and_evaluates(store, tmp_path, "fsp", source, method_options={"init_epochs": 1}, epochs=2)
