"""DKD, AT, FitNet and SimKD: pure losses and student-side modules, against hand-checkable
cases, independent computations, and values the references' own code produced
(tests/data/mdistiller_losses.json; its "command" and "sources" say how and from which
commits)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdpipe import models
from kdpipe.errors import KdpipeError
from kdpipe.methods.at import REFERENCE_AT, at_loss, at_loss_from_maps, attention_map
from kdpipe.methods.dkd import DEFAULT_DKD, REFERENCE_DKD, dkd_loss, dkd_terms, dkd_warmup_factor
from kdpipe.methods.fitnet import DEFAULT_FITNET, HintRegressor, fitnet_loss
from kdpipe.methods.kd import kd_loss
from kdpipe.methods.simkd import DEFAULT_SIMKD, SimKDHead, simkd_loss

torch.set_num_threads(1)

REFERENCE = json.loads((Path(__file__).parent / "data" / "mdistiller_losses.json").read_text())
TOL = dict(rtol=1e-5, atol=1e-6)


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# ----------------------------------------------------------------------------- DKD
def test_dkd_two_classes_is_tckd_by_hand():
    # T = 1, label 0; student (1/2, 1/2), teacher (2/3, 1/3): TCKD is their KL, NCKD 0.
    s, t, y = torch.zeros(1, 2), _t([[math.log(2.0), 0.0]]), torch.tensor([0])
    tckd, nckd = dkd_terms(s, t, y, 1.0)
    assert tckd.item() == pytest.approx(2 / 3 * math.log(4 / 3) + 1 / 3 * math.log(2 / 3), rel=1e-6)
    assert nckd.item() == 0.0
    assert dkd_loss(s, t, y, 2.0, 8.0, 1.0).item() == pytest.approx(2 * tckd.item(), rel=1e-6)


def test_dkd_three_classes_by_hand():
    # label 0; student logits (0, 0, 0): binary (1/3, 2/3), non-target (1/2, 1/2);
    # teacher logits (ln 4, ln 3, 0): binary (1/2, 1/2), non-target (3/4, 1/4).
    s, t, y = torch.zeros(1, 3), _t([[math.log(4.0), math.log(3.0), 0.0]]), torch.tensor([0])
    tckd, nckd = dkd_terms(s, t, y, 1.0)
    assert tckd.item() == pytest.approx(0.5 * math.log(1.5) + 0.5 * math.log(0.75), rel=1e-6)
    assert nckd.item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-6)
    want = 0.5 * tckd.item() + 3.0 * nckd.item()
    assert dkd_loss(s, t, y, 0.5, 3.0, 1.0).item() == pytest.approx(want, rel=1e-6)


def test_dkd_decomposes_kd_per_sample():
    # The DKD paper's identity: KD = TCKD + (1 - p_t[gt]) * NCKD, sample by sample.
    g = torch.Generator().manual_seed(0)
    T = 4.0
    for b in range(4):
        s, t = torch.randn(1, 6, generator=g) * 3, torch.randn(1, 6, generator=g) * 3
        y = torch.tensor([b])
        tckd, nckd = dkd_terms(s, t, y, T)
        p_gt = F.softmax(t / T, dim=1)[0, b].item()
        assert kd_loss(s, t, T).item() == pytest.approx(tckd.item() + (1 - p_gt) * nckd.item(), rel=1e-5)


def test_dkd_zero_for_equal_logits_and_temperature_scaling():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    y = torch.randint(0, 7, (5,), generator=g)
    assert dkd_loss(t, t, y, 1.0, 8.0, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    # terms at T on logits x2 equal the terms at T/2 times (T / (T/2))^2 = 4
    a = dkd_terms(2 * s, 2 * t, y, 2.0)
    b = dkd_terms(s, t, y, 1.0)
    for x, z in zip(a, b):
        assert x.item() == pytest.approx(4 * z.item(), rel=1e-5)


@pytest.mark.parametrize("case", range(len(REFERENCE["dkd"])))
def test_dkd_equals_mdistiller(case):
    ref = REFERENCE["dkd"][case]
    s = _t(ref["student_logits"]).requires_grad_(True)
    t, y = _t(ref["teacher_logits"]), torch.tensor(ref["labels"])
    loss = dkd_loss(s, t, y, ref["alpha"], ref["beta"], ref["temperature"])
    loss.backward()
    tckd, nckd = dkd_terms(s.detach(), t, y, ref["temperature"])
    assert loss.item() == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6)
    assert tckd.item() == pytest.approx(ref["tckd"], rel=1e-5, abs=1e-6)
    assert nckd.item() == pytest.approx(ref["nckd"], rel=1e-5, abs=1e-6)
    torch.testing.assert_close(s.grad, _t(ref["grad_student_logits"]), **TOL)


def test_dkd_stays_finite_where_softmax_underflows():
    # The student puts ~e^-200 on the target class: mdistiller's log(sum of softmax) is
    # log(0) = -inf there; the log-space form gives the float64 value.
    s, t, y = _t([[0.0, 200.0, 0.0]]), _t([[1.0, 0.0, 0.0]]), torch.tensor([0])
    loss = dkd_loss(s, t, y, 1.0, 8.0, 1.0)
    want = dkd_loss(s.double(), t.double(), y, 1.0, 8.0, 1.0)
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)


def test_dkd_shape_errors():
    with pytest.raises(ValueError, match="same shape"):
        dkd_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.tensor([0, 1]), 1, 8, 4)
    with pytest.raises(ValueError, match="two classes"):
        dkd_loss(torch.zeros(2, 1), torch.zeros(2, 1), torch.tensor([0, 0]), 1, 8, 4)
    with pytest.raises(ValueError, match="labels"):
        dkd_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0]), 1, 8, 4)


def test_dkd_warmup_counts_epochs_from_one():
    assert dkd_warmup_factor(1, 20) == pytest.approx(0.05)
    assert dkd_warmup_factor(10, 20) == pytest.approx(0.5)
    assert dkd_warmup_factor(20, 20) == 1.0
    assert dkd_warmup_factor(240, 20) == 1.0
    assert dkd_warmup_factor(1, 1) == 1.0
    with pytest.raises(ValueError, match="from 1"):
        dkd_warmup_factor(0, 20)
    with pytest.raises(ValueError, match="positive"):
        dkd_warmup_factor(3, 0)


def test_reference_tables_name_registered_models():
    from kdpipe.models.registry import canonical_or_same

    known = set(models.available())
    for table in (REFERENCE_DKD, REFERENCE_AT):
        for teacher, student in table:
            assert teacher in known and student in known, (teacher, student)
            # the methods look pairs up by canonical name
            assert (canonical_or_same(teacher), canonical_or_same(student)) == (teacher, student)
    assert DEFAULT_DKD.beta == 8.0 and DEFAULT_DKD.temperature == 4.0 and DEFAULT_DKD.warmup == 20
    assert REFERENCE_DKD[("resnet56", "resnet20")].beta == 2.0
    assert REFERENCE_DKD[("imagenet_resnet34", "imagenet_resnet18")].temperature == 1.0
    assert DEFAULT_FITNET.hint_layer == 2 and DEFAULT_FITNET.feat_weight == 100.0
    assert DEFAULT_SIMKD.factor == 2 and DEFAULT_SIMKD.ce_weight == 0.0


# ------------------------------------------------------------------------------ AT
def _at_numpy(fs: np.ndarray, ft: np.ndarray, p: float) -> float:
    """One stage in float64 with explicit block means for the pooling (integer ratios)."""

    def pool(f, side):
        k = f.shape[2] // side
        return f.reshape(f.shape[0], f.shape[1], side, k, side, k).mean(axis=(3, 5))

    side = min(fs.shape[2], ft.shape[2])
    fs, ft = pool(fs, side), pool(ft, side)

    def amap(f):
        a = (f**p).mean(axis=1).reshape(f.shape[0], -1)
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    return float(((amap(fs) - amap(ft)) ** 2).mean())


def test_at_hand_case():
    # student cells (1, 1) -> map (1, 1)/sqrt 2; teacher cells (2, 0) -> (4, 0) -> (1, 0).
    fs, ft = _t([1.0, 1.0]).view(1, 1, 1, 2), _t([2.0, 0.0]).view(1, 1, 1, 2)
    assert at_loss([fs], [ft], 2).item() == pytest.approx(1 - 1 / math.sqrt(2), rel=1e-6)
    torch.testing.assert_close(attention_map(ft, 2), _t([[[1.0, 0.0]]]))


def test_at_against_numpy_with_pooling_either_way():
    g = torch.Generator().manual_seed(2)
    shapes = [((2, 3, 8, 8), (2, 5, 8, 8)), ((2, 4, 4, 4), (2, 2, 8, 8)), ((2, 3, 8, 8), (2, 6, 2, 2))]
    fs = [torch.randn(*s, generator=g).relu() for s, _ in shapes]
    ft = [torch.randn(*t, generator=g).relu() for _, t in shapes]
    want = sum(_at_numpy(a.double().numpy(), b.double().numpy(), 2.0) for a, b in zip(fs, ft))
    assert at_loss(fs, ft, 2).item() == pytest.approx(want, rel=1e-5)
    assert at_loss(ft[:1], ft[:1], 2).item() == pytest.approx(0.0, abs=1e-7)


def test_at_loss_from_teacher_maps_equals_at_loss():
    g = torch.Generator().manual_seed(3)
    shapes = [((2, 3, 8, 8), (2, 5, 8, 8)), ((2, 4, 4, 4), (2, 2, 8, 8)), ((2, 3, 8, 8), (2, 6, 2, 2))]
    fs = [torch.randn(*s, generator=g) for s, _ in shapes]
    ft = [torch.randn(*t, generator=g) for _, t in shapes]
    # the store's maps: at the teacher's own size, or at the student's where it is smaller
    maps = [attention_map(t, 2, size=min(s.shape[2], t.shape[2])) for s, t in zip(fs, ft)]
    assert [tuple(m.shape) for m in maps] == [(2, 8, 8), (2, 4, 4), (2, 2, 2)]
    torch.testing.assert_close(at_loss_from_maps(fs, maps, 2), at_loss(fs, ft, 2))
    with pytest.raises(ValueError, match="size=4"):
        at_loss_from_maps([fs[1]], [attention_map(ft[1], 2)], 2)
    with pytest.raises(ValueError, match="one teacher map per student stage"):
        at_loss_from_maps(fs, maps[:2], 2)


def test_attention_map_is_unit_norm_and_pools_down_only():
    f = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    amap = attention_map(f, 2)
    torch.testing.assert_close(amap.flatten(1).norm(dim=1), torch.ones(3))
    pooled = attention_map(f, 2, size=4)
    torch.testing.assert_close(pooled, attention_map(F.avg_pool2d(f, 2), 2))
    with pytest.raises(ValueError, match="down only"):
        attention_map(f, 2, size=16)


@pytest.mark.parametrize("case", range(len(REFERENCE["at"])))
def test_at_equals_mdistiller(case):
    ref = REFERENCE["at"][case]
    fs = [_t(f).requires_grad_(True) for f in ref["student_feats"]]
    ft = [_t(f) for f in ref["teacher_feats"]]
    loss = at_loss(fs, ft, ref["p"])
    loss.backward()
    assert loss.item() == pytest.approx(ref["loss"], rel=1e-5)
    for a, b, want in zip(fs, ft, ref["stage_losses"]):
        assert at_loss([a.detach()], [b], ref["p"]).item() == pytest.approx(want, rel=1e-5)
    for f, grad in zip(fs, ref["grad_student_feats"]):
        torch.testing.assert_close(f.grad, _t(grad), **TOL)


# -------------------------------------------------------------------------- FitNet
@pytest.mark.parametrize(
    "s_side,t_side,conv,kernel",
    [
        (8, 4, nn.Conv2d, (3, 3)),
        (4, 8, nn.ConvTranspose2d, (4, 4)),
        (6, 4, nn.Conv2d, (3, 3)),
        (4, 4, nn.Conv2d, (1, 1)),
    ],
)
def test_hint_regressor_maps_to_the_teacher_shape(s_side, t_side, conv, kernel):
    reg = HintRegressor(3, 5, (s_side, s_side), (t_side, t_side))
    assert type(reg.conv) is conv and reg.conv.kernel_size == kernel
    assert reg.conv.bias is not None
    out = reg(torch.randn(2, 3, s_side, s_side))
    assert out.shape == (2, 5, t_side, t_side)
    assert bool((out >= 0).all())  # ends with a ReLU
    assert not bool(
        (
            HintRegressor(3, 5, (s_side,) * 2, (t_side,) * 2, use_relu=False)(torch.randn(2, 3, s_side, s_side)) >= 0
        ).all()
    )


def test_hint_regressor_refuses_unsupported_sizes():
    with pytest.raises(KdpipeError, match="ConvReg.*cannot map a 3x3 student map to a 8x8 teacher map"):
        HintRegressor(3, 5, (3, 3), (8, 8))


def test_fitnet_loss_is_the_element_mean():
    a, b = _t([[[[1.0, 2.0]]]]), _t([[[[0.0, 0.0]]]])
    assert fitnet_loss(a, b).item() == pytest.approx(2.5)
    with pytest.raises(ValueError, match="same shape"):
        fitnet_loss(a, torch.zeros(1, 1, 1, 3))


@pytest.mark.parametrize("case", range(len(REFERENCE["fitnet"])))
def test_fitnet_equals_mdistiller(case):
    ref = REFERENCE["fitnet"][case]
    s_shape, t_shape = ref["student_shape"], ref["teacher_shape"]
    reg = HintRegressor(s_shape[1], t_shape[1], s_shape[2:], t_shape[2:])
    assert type(reg.conv).__name__ == ref["conv"]
    reg.load_state_dict({k: _t(v) for k, v in ref["state_dict"].items()}, strict=False)
    reg.train()
    out = reg(_t(ref["student_hint"]))
    torch.testing.assert_close(out, _t(ref["regressed"]), **TOL)
    assert fitnet_loss(out, _t(ref["teacher_hint"])).item() == pytest.approx(ref["loss"], rel=1e-5)


# --------------------------------------------------------------------------- SimKD
def _simkd_head(s_channels=3, t_channels=4, classes=5, side=None, seed=5):
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(classes, t_channels, generator=g), torch.randn(classes, generator=g)
    return SimKDHead(s_channels, t_channels, w, b, factor=2, teacher_side=side), w, b


def test_simkd_projector_layout():
    head, w, b = _simkd_head(s_channels=6, t_channels=8)
    convs = [m for m in head.projector if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (6, 4, (1, 1), (0, 0)),
        (4, 4, (3, 3), (1, 1)),
        (4, 8, (1, 1), (0, 0)),
    ]
    assert all(c.bias is None for c in convs)
    assert [type(m).__name__ for m in head.projector] == ["Conv2d", "BatchNorm2d", "ReLU"] * 3
    # the teacher's classifier is kept (saved with the student) but never trained
    assert {"teacher_weight", "teacher_bias"} <= set(head.state_dict())
    assert "teacher_weight" not in dict(head.named_parameters())
    with pytest.raises(KdpipeError, match="factor"):
        SimKDHead(6, 8, w, b, factor=3)


def test_simkd_logits_are_the_teacher_classifier_on_pooled_projection():
    head, w, b = _simkd_head()
    head.eval()
    x = torch.randn(2, 3, 4, 4)
    projected, logits = head(x)
    assert projected.shape == (2, 4, 4, 4)
    torch.testing.assert_close(logits, projected.mean(dim=(2, 3)) @ w.T + b)
    # a student map larger than the teacher's is pooled to the teacher's side first
    head.teacher_side = 2
    projected, _ = head(torch.randn(2, 3, 8, 8))
    assert projected.shape == (2, 4, 2, 2)


def test_simkd_loss_pools_a_larger_teacher_and_trains_the_projector_only():
    head, _, _ = _simkd_head()
    projected, logits = head(torch.randn(2, 3, 4, 4))
    teacher = torch.randn(2, 4, 8, 8)
    loss = simkd_loss(projected, teacher)
    assert loss.item() == pytest.approx(F.mse_loss(projected, F.avg_pool2d(teacher, 2)).item(), rel=1e-6)
    assert simkd_loss(projected, projected.detach()).item() == 0.0
    (loss + logits.sum()).backward()
    assert all(p.grad is not None for p in head.parameters())
    assert head.teacher_weight.grad is None
    with pytest.raises(ValueError, match="pool the student first"):
        simkd_loss(projected, torch.randn(2, 4, 2, 2))


@pytest.mark.parametrize("case", range(len(REFERENCE["simkd"])))
def test_simkd_equals_the_authors_module(case):
    ref = REFERENCE["simkd"][case]
    s_shape, t_shape = ref["student_shape"], ref["teacher_shape"]
    head = SimKDHead(
        s_shape[1],
        t_shape[1],
        _t(ref["teacher_classifier_weight"]),
        _t(ref["teacher_classifier_bias"]),
        factor=ref["factor"],
        teacher_side=t_shape[2],
    )
    state = {k.replace("transfer.", "projector.", 1): _t(v) for k, v in ref["state_dict"].items()}
    missing, unexpected = head.load_state_dict(state, strict=False)
    assert not unexpected
    assert {k for k in missing if not k.endswith("num_batches_tracked")} == {"teacher_weight", "teacher_bias"}
    head.train()
    projected, logits = head(_t(ref["student_feat"]))
    torch.testing.assert_close(projected, _t(ref["projected"]), **TOL)
    torch.testing.assert_close(logits, _t(ref["logits"]), **TOL)
    assert simkd_loss(projected, _t(ref["teacher_feat"])).item() == pytest.approx(ref["loss"], rel=1e-5)
