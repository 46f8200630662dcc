"""Losses, KD layer and Method objects of kdpipe.methods, against hand computations."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdpipe.errors import KdpipeError
from kdpipe.methods import available, get_method
from kdpipe.methods.cat_kd import (
    arch_family,
    binarize_teacher_cam,
    cat_loss,
    gather_classes,
    select_classes,
    should_normalize,
)
from kdpipe.methods.kd import kd_loss
from kdpipe.methods.letkd import (
    CosConv,
    KDLayer,
    assign_subclasses,
    densify_topk,
    location_kl,
    location_kl_topk,
    penult_topk_targets,
    subclass_score_matrix,
)

torch.set_num_threads(1)


# ------------------------------------------------------------------------------ KD
def test_kd_loss_hand_case():
    # T = 1, teacher p = (2/3, 1/3), student uniform: KL = 2/3 ln(4/3) + 1/3 ln(2/3).
    s = torch.zeros(1, 2)
    t = torch.tensor([[math.log(2.0), 0.0]])
    want = 2 / 3 * math.log(4 / 3) + 1 / 3 * math.log(2 / 3)
    assert kd_loss(s, t, 1.0).item() == pytest.approx(want, rel=1e-6)


def test_kd_loss_explicit_formula_batchmean_and_T2():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    T = 4.0
    total = 0.0
    for b in range(5):
        ps = [math.exp(v / T) for v in s[b].tolist()]
        pt = [math.exp(v / T) for v in t[b].tolist()]
        zs, zt = sum(ps), sum(pt)
        total += sum(q / zt * math.log((q / zt) / (p / zs)) for p, q in zip(ps, pt))
    want = total / 5 * T * T  # summed over classes, mean over batch, times T^2
    assert kd_loss(s, t, T).item() == pytest.approx(want, rel=1e-5)
    assert kd_loss(t, t, T).item() == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------- CAT-KD
def test_cat_loss_2x2_by_hand():
    # Student 4x4 map whose 2x2 quadrant means are 1, 2, 3, 4; teacher already 2x2.
    s = torch.tensor([[1.0, 1.0, 2.0, 2.0], [1.0, 1.0, 2.0, 2.0], [3.0, 3.0, 4.0, 4.0], [3.0, 3.0, 4.0, 4.0]]).view(
        1, 1, 4, 4
    )
    t = torch.tensor([[0.0, 2.0], [3.0, 6.0]]).view(1, 1, 2, 2)
    # differences 1, 0, 0, -2 -> mean of squares 5/4
    assert cat_loss(s, t, 2, False).item() == pytest.approx(1.25)
    # normalised: s/||s|| = (1,2,3,4)/sqrt(30), t/||t|| = (0,2,3,6)/7
    sn = np.array([1, 2, 3, 4]) / math.sqrt(30)
    tn = np.array([0, 2, 3, 6]) / 7.0
    assert cat_loss(s, t, 2, True).item() == pytest.approx(float(((sn - tn) ** 2).mean()), rel=1e-6)


def test_cat_loss_mean_over_all_elements_and_resolution_1():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    ms, mt = s.mean(dim=(2, 3)), t.mean(dim=(2, 3))
    assert cat_loss(s, t, 1, False).item() == pytest.approx(((ms - mt) ** 2).mean().item(), rel=1e-5)
    ps, pt = F.avg_pool2d(s, 4), F.avg_pool2d(t, 2)
    assert cat_loss(s, t, 2, False).item() == pytest.approx(((ps - pt) ** 2).mean().item(), rel=1e-5)


def test_binarize_teacher_cam():
    cam = torch.tensor([[[[1.0, -3.0], [2.0, 0.0]], [[5.0, 5.0], [5.0, 5.0]]]])
    # map 0: mean |v| = 6/4 = 1.5 -> only 2 is above; map 1: all equal the threshold -> 0
    want = torch.tensor([[[[0.0, 0.0], [1.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]]])
    assert torch.equal(binarize_teacher_cam(cam), want)


def test_select_and_gather_classes():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0], [5.0, 0.0, 1.0, -2.0]])
    top = select_classes(logits, 2, "top")
    assert top.tolist() == [[False, True, False, True], [True, False, True, False]]
    bottom = select_classes(logits, 1, "bottom")
    assert bottom.tolist() == [[False, False, True, False], [False, False, False, True]]
    cam = torch.arange(2 * 4 * 1 * 1, dtype=torch.float32).view(2, 4, 1, 1)
    assert gather_classes(cam, top).flatten().tolist() == [1.0, 3.0, 4.0, 6.0]
    with pytest.raises(KdpipeError):
        select_classes(logits, 5, "top")


def test_normalization_rule_matches_reference_configs():
    same = [
        ("resnet110", "resnet32"),
        ("resnet56", "resnet20"),
        ("resnet32x4", "resnet8x4"),
        ("wrn_40_2", "wrn_16_2"),
        ("wrn_40_2", "wrn_40_1"),
        ("vgg13", "vgg8"),
        ("ResNet34", "ResNet18"),
    ]
    different = [
        ("resnet32x4", "ShuffleV1"),
        ("resnet32x4", "ShuffleV2"),
        ("wrn_40_2", "ShuffleV1"),
        ("ResNet50", "MobileNetV2"),
        ("vgg13", "MobileNetV2"),
    ]
    assert not any(should_normalize(t, s) for t, s in same)
    assert all(should_normalize(t, s) for t, s in different)
    assert arch_family("resnet8x4") == arch_family("resnet32x4") == "resnet"
    assert arch_family("ShuffleV1") == arch_family("ShuffleV2") == "shufflenet"
    assert arch_family("mobile_half") == arch_family("imagenet_mobilenet_v2") == "mobilenet"
    assert arch_family("imagenet_mobilenet_v1") == arch_family("MobileNetV1") == "mobilenet"
    assert arch_family("imagenet_resnet18") == "resnet" and arch_family("vgg13_bn") == "vgg"
    assert should_normalize("imagenet_resnet50", "imagenet_mobilenet_v2")
    assert should_normalize("imagenet_resnet50", "imagenet_mobilenet_v1")  # r50_mv2.yaml: IF_NORMALIZE
    assert not should_normalize("imagenet_resnet34", "imagenet_resnet18")


# ---------------------------------------------------------------------------- letKD
def test_location_kl_vs_explicit_loop():
    g = torch.Generator().manual_seed(2)
    B, M, h, w = 2, 5, 3, 2
    scores = torch.randn(B, M, h, w, generator=g)
    target4 = torch.softmax(torch.randn(B, h, w, M, generator=g), dim=-1)
    target4[0, 1, 1] = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0])  # zeros count as 0 log 0 = 0
    total, n = 0.0, 0
    for b in range(B):
        for y in range(h):
            for x in range(w):
                z = scores[b, :, y, x].tolist()
                lse = math.log(sum(math.exp(v) for v in z))
                for m in range(M):
                    p = target4[b, y, x, m].item()
                    if p > 0:
                        total += p * (math.log(p) - (z[m] - lse))
                n += 1
    want = total / n
    flat = target4.reshape(B * h * w, M)  # (b, y, x) order
    assert location_kl(scores, flat).item() == pytest.approx(want, rel=1e-5)
    assert location_kl(scores, target4).item() == pytest.approx(want, rel=1e-5)
    # another location order gives another value
    wrong = target4.permute(0, 2, 1, 3).reshape(B * h * w, M)
    assert location_kl(scores, wrong).item() != pytest.approx(want, rel=1e-3)
    with pytest.raises(KdpipeError):
        location_kl(scores, flat[:-1])


def test_location_kl_topk_equals_dense_on_renormalised_target():
    g = torch.Generator().manual_seed(3)
    B, M, h, w, k = 2, 9, 2, 3, 4
    scores = torch.randn(B, M, h, w, generator=g, requires_grad=True)
    full = torch.softmax(torch.randn(B, h, w, M, generator=g) * 2, dim=-1)
    val, idx = torch.topk(full, k, dim=-1)  # retained mass < 1
    dense = densify_topk(idx, val, M)
    assert torch.allclose(dense.sum(-1), torch.ones(B, h, w))
    a = location_kl_topk(scores, idx, val)
    b = location_kl(scores, dense)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    (ga,) = torch.autograd.grad(a, scores)
    (gb,) = torch.autograd.grad(location_kl(scores, dense), scores)
    assert torch.allclose(ga, gb, atol=1e-6)
    # stored values that already sum to 1 are left as they are
    assert location_kl_topk(scores, idx, val / val.sum(-1, keepdim=True)).item() == pytest.approx(a.item(), rel=1e-6)


def test_subclass_score_matrix_six_points():
    # Sub-classes 0, 1, 2 on a line; prototypes (means) at 0, 10 and 20.
    z = np.array([[-1.0], [1.0], [9.0], [11.0], [14.0], [26.0]])
    ids = np.array([0, 0, 1, 1, 2, 2])
    S = subclass_score_matrix(z, ids, 4)  # sub-class 3 is empty
    # point 14 (sub-class 2) is nearest prototype 10 (sub-class 1); all others their own.
    want = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.5, 0.5, 0.0], [0.0, 0.0, 0.0, 1.0]])
    assert S.dtype == np.float64
    np.testing.assert_allclose(S, want)
    np.testing.assert_allclose(S.sum(1), 1.0)
    # torch input and small chunks give the same matrix
    S2 = subclass_score_matrix(torch.tensor(z), torch.tensor(ids), 4, chunk=2)
    np.testing.assert_allclose(S2, want)


def test_cosconv_and_kdlayer_manual():
    torch.manual_seed(4)
    D, M = 6, 5
    layer = KDLayer(D, M, alpha=0.5)
    assert layer.score.scale.item() == 3.0 and layer.value.scale.item() == 1.0
    assert layer.score.scale.requires_grad and layer.value.scale.requires_grad
    layer.train()
    x = torch.randn(3, D, 2, 2)
    x_hat, s = layer(x)
    # manual: cosine scores, batch-norm with batch statistics, ReLU, cosine back, residual
    xv = x.permute(0, 2, 3, 1).reshape(-1, D)
    xn = xv / xv.norm(dim=1, keepdim=True)
    W1 = layer.score.weight.detach().view(M, D)
    s_man = 3.0 * xn @ (W1 / W1.norm(dim=1, keepdim=True)).t()
    mu, var = s_man.mean(0), s_man.var(0, unbiased=False)
    a = torch.relu((s_man - mu) / torch.sqrt(var + 1e-5))  # BN init: gamma 1, beta 0
    an = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    W2 = layer.value.weight.detach().view(D, M)
    v = 1.0 * an @ (W2 / W2.norm(dim=1, keepdim=True)).t()
    xh_man = xv + 0.5 * v
    assert torch.allclose(s.permute(0, 2, 3, 1).reshape(-1, M), s_man, atol=1e-5)
    assert torch.allclose(x_hat.permute(0, 2, 3, 1).reshape(-1, D), xh_man, atol=1e-5)
    assert x_hat.shape == x.shape and s.shape == (3, M, 2, 2)
    c = CosConv(4, 3, scale_init=2.0)
    assert c.weight.shape == (3, 4, 1, 1) and c.scale.item() == 2.0


def test_penult_topk_targets_and_assign_subclasses():
    feat = torch.tensor([0.0, 1.0, 3.0]).view(1, 1, 1, 3)  # D = 1, 1 x 3 grid
    centers = torch.tensor([[0.0], [1.0], [2.0]])
    idx, val = penult_topk_targets(feat, centers, 1.0, 2)
    d = torch.tensor([[0.0, 1.0, 4.0], [1.0, 0.0, 1.0], [9.0, 4.0, 1.0]])
    p = torch.softmax(-d, dim=1)
    ev, ei = torch.topk(p, 2, dim=1)
    assert torch.equal(idx.view(3, 2), ei) and torch.allclose(val.view(3, 2), ev)
    # sub-classes: C = 2 classes, K = 2; identity LDA (xbar 0, scalings I)
    sc = torch.tensor([[0.0], [10.0], [0.0], [1.0]])
    f = torch.tensor([[0.4, 9.0], [0.9, 0.2]]).view(2, 1, 1, 2)
    got = assign_subclasses(f, torch.tensor([0, 1]), torch.zeros(1), torch.eye(1), sc, 2)
    assert got.tolist() == [[[0, 1]], [[3, 2]]]


# -------------------------------------------------------------------------- methods
class TinyKDModel(nn.Module):
    """A KDModel-like module honouring the contract of docs/ARCHITECTURE.md."""

    def __init__(self, num_classes=4):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.block1 = nn.Conv2d(6, 6, 3, stride=2, padding=1)  # "inter" (4x4)
        self.block2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)  # "penult" (2x2)
        self.fc = nn.Linear(8, num_classes)
        self.taps = nn.ModuleDict()

    def feature_channels(self):
        return {"inter": 6, "penult": 8}

    def set_tap(self, point, module):
        assert point in ("inter", "penult")
        self.taps[point] = module

    def _tap(self, point, x, feats):
        if point in self.taps:
            out = self.taps[point](x)
            if isinstance(out, tuple):
                out, feats[f"{point}_scores"] = out
            return out
        return x

    def forward_features(self, x):
        feats = {}
        x = torch.relu(self.stem(x))
        x = torch.relu(self.block1(x))
        feats["inter"] = x
        x = self._tap("inter", x, feats)
        x = self.block2(x)
        feats["penult"] = x
        x = self._tap("penult", x, feats)
        feats["cam"] = F.conv2d(x, self.fc.weight[:, :, None, None])
        logits = feats["cam"].mean(dim=(2, 3)) + self.fc.bias
        return logits, feats

    def forward(self, x):
        return self.forward_features(x)[0]


def _target_set(C, K, K_inter):
    from kdpipe.artifacts.target_set import TargetSet

    return TargetSet(
        name="T",
        num_classes=C,
        k_penult=K,
        k_inter=K_inter,
        lda_dims=2,
        topk=3,
        topk_cap=3,
        topk_mass=0.999,
        temperature=1.0,
        penult_grid=(2, 2),
        inter_grid=(4, 4),
    )


def _batch(B=3, C=4):
    g = torch.Generator().manual_seed(5)
    return torch.randn(B, 3, 8, 8, generator=g), torch.tensor([0, 1, 3])[:B]


def test_methods_loss_and_backward():
    x, y = _batch()
    g = torch.Generator().manual_seed(6)
    C, K, k, Kin = 4, 7, 3, 2
    teacher_logits = torch.randn(3, C, generator=g)
    for name, opts in [
        ("ce", {}),
        ("kd", {}),
        ("cat_kd", {"normalize": False}),
        ("cat_kd", {"normalize": True, "binarize": True, "top_n": 2}),
        (
            "cat_kd",
            {"ce_weight": 0.0, "bottom_n": 1, "beta": 2.0, "teacher_arch": "resnet32x4", "student_arch": "ShuffleV1"},
        ),
        ("letkd1", {}),
        ("letkd2", {"alpha_inter": 0.5}),
    ]:
        m = get_method(name, **opts)
        model = TinyKDModel(C)
        m.prepare_student(model, _target_set(C, K, Kin))
        logits, feats = model.forward_features(x)
        targets = {
            "logits": teacher_logits,
            "cam": torch.randn(3, C, 4, 4, generator=g),
            "penult_topk_idx": torch.randint(0, K, (3, 2, 2, k), generator=g),
            "penult_topk_val": torch.rand(3, 2, 2, k, generator=g),
            "inter_probs": torch.softmax(torch.randn(3, 4, 4, C * Kin, generator=g), -1),
        }
        targets = {key: targets[key] for kind in m.kinds() for key in kind.target_keys}
        total, parts = m.loss(logits, feats, targets, y)
        assert total.dim() == 0 and math.isfinite(total.item())
        assert parts["total"].item() == pytest.approx(total.item())
        # detached scalar tensors: the loop averages them without a device sync per step
        assert all(torch.is_tensor(v) and v.dim() == 0 and not v.requires_grad for v in parts.values())
        total.backward()
        assert model.fc.weight.grad is not None


def test_method_totals():
    x, y = _batch()
    model = TinyKDModel()
    logits, feats = model.forward_features(x)
    t = torch.randn(3, 4)
    total, parts = get_method("kd", temperature=2, ce_weight=0.5, kd_weight=2).loss(logits, feats, {"logits": t}, y)
    want = 0.5 * F.cross_entropy(logits, y) + 2 * kd_loss(logits, t, 2)
    assert total.item() == pytest.approx(want.item(), rel=1e-6)
    cam = torch.randn(3, 4, 4, 4)
    m = get_method("cat_kd", beta=10, teacher_arch="resnet32x4", student_arch="resnet8x4")
    assert m.options["normalize"] is False
    total, parts = m.loss(logits, feats, {"cam": cam}, y)
    want = F.cross_entropy(logits, y) + 10 * cat_loss(feats["cam"], cam, 2, False)
    assert total.item() == pytest.approx(want.item(), rel=1e-6)
    only = get_method("cat_kd", beta=10, normalize=True, ce_weight=0)
    total, parts = only.loss(logits, feats, {"cam": cam}, y)
    assert "ce" not in parts
    assert total.item() == pytest.approx(10 * cat_loss(feats["cam"], cam, 2, True).item())
    with pytest.raises(KdpipeError):
        get_method("cat_kd").loss(logits, feats, {"cam": cam}, y)  # rule unresolved


def test_get_method_options_and_errors():
    assert available() and len(set(available())) == len(available())
    with pytest.raises(KdpipeError) as e:
        get_method("nope")
    assert all(n in str(e.value) for n in available())
    with pytest.raises(KdpipeError):
        get_method("kd", beta=1.0)
    with pytest.raises(KdpipeError):
        get_method("cat_kd", top_n=2, bottom_n=2)
    with pytest.raises(KdpipeError):
        get_method("kd", temperature=0)
    kd = get_method("kd")
    assert kd.options == {"temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9}
    from kdpipe.methods.letkd.kinds import InterSubclass, PenultSoftmax, PenultTopk
    from kdpipe.targets import Cam, Logits, NativeCam

    cat = get_method("cat_kd", top_n=3)
    assert cat.kinds() == [Cam(2)] and get_method("kd").kinds() == [Logits()]
    assert get_method("cat_kd", binarize=True, resolution=4).kinds() == [NativeCam()]
    assert get_method("ce").kinds() == [] and not get_method("ce").needs_store
    cat.bind("resnet32x4", "ShuffleV1")
    assert cat.options["normalize"] is True and cat.options["beta"] == 600.0
    assert get_method("letkd2").kinds() == [PenultTopk(), InterSubclass()]
    assert get_method("letkd1", penult_target="full").kinds() == [PenultSoftmax()]
    assert get_method("letkd2").needs_target_set and not cat.needs_target_set
    l2 = get_method("letkd2")
    model = TinyKDModel()
    l2.prepare_student(model, _target_set(4, 5, 2))
    assert l2.options == {"alpha_penult": 1.0, "alpha_inter": 1.0, "penult_target": "topk"}
    assert model.taps["penult"].alpha == 1.0 and model.taps["inter"].num_clusters == 8
    assert get_method("letkd2").bind("ResNet50", "MobileNetV2").options == {
        "alpha_penult": 0.1,
        "alpha_inter": 0.2,
        "penult_target": "topk",
    }
    assert get_method("letkd2", alpha_inter=0.5).bind("ResNet50", "MobileNetV2").options == {
        "alpha_penult": 0.1,
        "alpha_inter": 0.5,
        "penult_target": "topk",
    }
    assert get_method("letkd1").bind("resnet32x4", "resnet8x4").options == {
        "alpha_penult": 1.0,
        "penult_target": "topk",
    }
    import json

    for n in available():
        json.dumps(get_method(n).options)
    with pytest.raises(KdpipeError):
        get_method("letkd1").prepare_student(TinyKDModel())


def test_recipes():
    r = get_method("kd").recipe("resnet8x4")
    assert (
        r["lr"],
        r["momentum"],
        r["weight_decay"],
        r["batch_size"],
        r["epochs"],
        r["milestones"],
        r["nesterov"],
    ) == (0.05, 0.9, 5e-4, 64, 240, [150, 180, 210], False)
    assert get_method("cat_kd").recipe("ShuffleV1")["lr"] == 0.01
    assert get_method("letkd2").recipe("MobileNetV2")["lr"] == 0.01
    assert get_method("kd").recipe("mobile_half")["lr"] == 0.01
    assert get_method("letkd1").recipe("resnet8x4")["nesterov"] is True


def test_reference_pairs_are_found_under_model_aliases():
    # The references' own spellings (mdistiller vgg13_bn / mobile_half) name the same pair as
    # kdpipe's canonical names, so the per-pair defaults must not depend on the spelling.
    from kdpipe.methods import get_method
    from kdpipe.methods.cat_kd import reference_settings

    assert reference_settings("vgg13_bn", "mobile_half") == reference_settings("vgg13", "MobileNetV2")
    assert reference_settings("vgg13_bn", "mobile_half")["beta"] == 15.0
    assert reference_settings("vgg13_bn", "vgg8_bn") == {"beta": 4.5, "resolution": 2, "normalize": False}
    letkd = get_method("letkd2").bind("ResNet50", "mobile_half", "cifar")
    assert (letkd.options["alpha_penult"], letkd.options["alpha_inter"]) == (0.1, 0.2)
