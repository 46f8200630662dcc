"""ReviewKD (kdpipe/methods/reviewkd.py): the fused levels and the loss against values
mdistiller's own ``mdistiller/distillers/ReviewKD.py`` produced (``ReviewKD.forward_train`` with
its ``ABF`` modules and ``hcl_loss`` on the inputs below; the reference is not imported here);
one epoch cached and online (its kinds are OFD's and CRD's, whose cached = online tests
cover them)."""

from __future__ import annotations

import pytest
import torch
from method_checks import method_store, trains_one_epoch_and_evaluates

from kdpipe.methods.reviewkd import ReviewHead, hcl_loss

torch.set_num_threads(1)


def test_review_loss_equals_mdistiller():
    torch.manual_seed(0)
    b = 2
    s_feats = [torch.randn(b, 3, 16, 16), torch.randn(b, 4, 16, 16), torch.randn(b, 6, 8, 8), torch.randn(b, 8, 4, 4)]
    s_pooled = torch.randn(b, 8)
    t_pre = [torch.randn(b, 3, 16, 16), torch.randn(b, 5, 8, 8), torch.randn(b, 7, 8, 8), torch.randn(b, 9, 4, 4)]
    t_pooled = torch.randn(b, 9)
    # deepest first: the pooled level, then stages 3, 2, 1 (student sides 1, 4, 8, 16; teacher's 1, 4, 8, 8)
    head = ReviewHead([8, 8, 6, 4], [9, 9, 7, 5], [1, 4, 8, 16], [1, 4, 8, 8])
    torch.manual_seed(1)
    with torch.no_grad():
        for value in head.abfs.state_dict().values():
            if value.dtype.is_floating_point:
                value.copy_(torch.randn(value.shape) * 0.5)
    levels = [s_pooled[:, :, None, None]] + s_feats[1:][::-1]
    teacher = t_pre[1:] + [t_pooled[:, :, None, None]]
    # mdistiller ReviewKD.forward_train's loss_kd (REVIEWKD_WEIGHT 5, WARMUP_EPOCHS 20) at epochs 1 and 30
    for factor, want in ((1 / 20, 1.0618089437484741), (1.0, 21.23617935180664)):
        assert (5.0 * factor * hcl_loss(head(levels), teacher)).item() == pytest.approx(want, rel=1e-5)
    # mdistiller hcl_loss on one pair
    value = hcl_loss([torch.randn(2, 3, 8, 8)], [torch.randn(2, 3, 8, 8)])
    assert value.item() == pytest.approx(1.1474913358688354, rel=1e-6)


def test_warmup_counts_epochs_from_one():
    from kdpipe.methods import get_method

    method = get_method("reviewkd")
    method.begin_epoch(0)
    assert method.warmup_factor() == pytest.approx(1 / 20)
    method.begin_epoch(19)
    assert method.warmup_factor() == 1.0


@pytest.fixture(scope="module")
def store(tiny_store, tmp_path_factory):
    return method_store(tiny_store, tmp_path_factory, "reviewkd")


@pytest.mark.parametrize("source", ["cached", "online"])
def test_trains_one_epoch_and_evaluates(store, tmp_path, source):
    trains_one_epoch_and_evaluates(store, tmp_path, "reviewkd", source)
