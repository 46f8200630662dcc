"""The model zoo: mdistiller state-dict compatibility, the feature interface, load_teacher.

Models are built once per session (the big ones dominate) and run on batches of 2.
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdpipe import models
from kdpipe.errors import CheckpointError, KdpipeError

LISTINGS = Path(__file__).parent / "data" / "mdistiller_state_dicts.json"
NUM_CLASSES = 100

# name -> (inter channels, inter side, penult channels, penult side) on 32x32 inputs
ZOO = {
    "resnet8": (64, 8, 64, 8),
    "resnet14": (64, 8, 64, 8),
    "resnet20": (64, 8, 64, 8),
    "resnet32": (64, 8, 64, 8),
    "resnet44": (64, 8, 64, 8),
    "resnet56": (64, 8, 64, 8),
    "resnet110": (64, 8, 64, 8),
    "resnet8x4": (256, 8, 256, 8),
    "resnet32x4": (256, 8, 256, 8),
    "wrn_16_1": (64, 8, 64, 8),
    "wrn_16_2": (128, 8, 128, 8),
    "wrn_40_1": (64, 8, 64, 8),
    "wrn_40_2": (128, 8, 128, 8),
    "vgg8": (512, 4, 512, 4),
    "vgg11": (512, 4, 512, 4),
    "vgg13": (512, 4, 512, 4),
    "vgg16": (512, 4, 512, 4),
    "vgg19": (512, 4, 512, 4),
    "ShuffleV1": (960, 4, 960, 4),
    "ShuffleV2": (464, 4, 1024, 4),
    "MobileNetV2": (80, 2, 1280, 2),
    "ResNet18": (512, 4, 512, 4),
    "ResNet50": (2048, 4, 2048, 4),
}
ALIASES = {
    "vgg8_bn": "vgg8",
    "vgg11_bn": "vgg11",
    "vgg13_bn": "vgg13",
    "vgg16_bn": "vgg16",
    "vgg19_bn": "vgg19",
    "mobile_half": "MobileNetV2",
}
IMAGENET = ["imagenet_resnet18", "imagenet_resnet34", "imagenet_resnet50", "imagenet_mobilenet_v2"]
# cheap models covering the ways families split at their tap points (ResNet-style stage
# slicing, WRN's final BN, VGG's pooling, ShuffleV2's final conv, MobileNetV2's group lists)
TAP_MODELS = ["resnet8", "wrn_16_1", "vgg8", "ShuffleV2", "MobileNetV2"]

_built: dict[str, models.KDModel] = {}


def zoo_model(name: str) -> models.KDModel:
    """The session's eval-mode instance of `name`, with BN statistics moved away from their
    identity defaults so eval-mode outputs exercise every parameter and buffer."""
    if name not in _built:
        torch.manual_seed(0)
        model = models.build(name, NUM_CLASSES)
        _randomize_batchnorm(model)
        _built[name] = model.eval()
    return _built[name]


def _randomize_batchnorm(model: nn.Module) -> None:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.0)
                module.bias.uniform_(-0.1, 0.1)


def _images(side: int = 32, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(1))


def _assert_cam_gives_logits(model: models.KDModel, logits: torch.Tensor, cam: torch.Tensor) -> None:
    recovered = cam.mean(dim=(2, 3)) + model.head().bias
    torch.testing.assert_close(recovered, logits, atol=1e-4, rtol=1e-4)


class ScoringTap(nn.Module):
    """A tap as letKD's KD layer is shaped: returns (replacement, scores [B, M, h, w])."""

    def __init__(self, num_scores: int = 3) -> None:
        super().__init__()
        self.num_scores = num_scores

    def forward(self, x):
        scores = x[:, : self.num_scores].detach().clone()
        return x * 2, scores


# -- registry ------------------------------------------------------------------------------


def test_available_lists_every_zoo_alias_and_imagenet_name():
    names = set(models.available())
    assert set(ZOO) | set(ALIASES) | set(IMAGENET) <= names


def test_unknown_architecture_names_close_matches():
    with pytest.raises(KdpipeError, match="unknown architecture 'resnet8x5'.*resnet8x4"):
        models.build("resnet8x5")


# -- mdistiller state-dict layout ----------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet8x4", "resnet32x4", "wrn_40_2", "ShuffleV1"])
def test_state_dict_listing_equals_mdistiller(name):
    expected = json.loads(LISTINGS.read_text())["models"][name]
    with torch.device("meta"):
        model = models.build(name, NUM_CLASSES)
    ours = [[key, list(value.shape)] for key, value in model.state_dict().items()]
    assert ours == expected


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_aliases_build_the_same_layout(alias):
    with torch.device("meta"):
        a = models.build(alias, NUM_CLASSES)
        b = models.build(ALIASES[alias], NUM_CLASSES)
    assert models.state_listing(a) == models.state_listing(b)


# -- the feature interface -----------------------------------------------------------------


@pytest.mark.parametrize("name", list(ZOO))
def test_forward_features_shapes_and_cam(name):
    inter_channels, inter_side, penult_channels, penult_side = ZOO[name]
    model = zoo_model(name)
    x = _images()
    with torch.no_grad():
        logits = model(x)
        logits_ff, feats = model.forward_features(x)
    assert logits.shape == (2, NUM_CLASSES)
    torch.testing.assert_close(logits_ff, logits)
    assert set(feats) == {"inter", "penult", "cam"}
    assert feats["inter"].shape == (2, inter_channels, inter_side, inter_side)
    assert feats["penult"].shape == (2, penult_channels, penult_side, penult_side)
    assert feats["cam"].shape == (2, NUM_CLASSES, penult_side, penult_side)
    assert model.feature_channels() == {"inter": inter_channels, "penult": penult_channels}
    assert isinstance(model.head(), nn.Linear)
    assert model.head().in_features == penult_channels
    assert len(model.taps) == 0
    assert not any(key.startswith("taps.") for key in model.state_dict())
    _assert_cam_gives_logits(model, logits, feats["cam"])


@pytest.mark.parametrize("name", TAP_MODELS)
@pytest.mark.parametrize("point", ["inter", "penult"])
def test_scoring_tap_replaces_map_and_reports_scores(name, point):
    model = zoo_model(name)
    x = _images(batch=1)
    with torch.no_grad():
        plain_logits, plain_feats = model.forward_features(x)
        model.set_tap(point, ScoringTap())
        try:
            tapped_logits, feats = model.forward_features(x)
            forward_logits = model(x)
        finally:
            model.set_tap(point, None)
    assert len(model.taps) == 0
    assert not torch.allclose(tapped_logits, plain_logits)
    torch.testing.assert_close(forward_logits, tapped_logits)
    # feats hold the map as the network made it (before the tap) and the tap's scores
    torch.testing.assert_close(feats[point], plain_feats[point])
    torch.testing.assert_close(feats[f"{point}_scores"], feats[point][:, :3])
    # the CAM is taken after the tap, so it still explains the logits
    _assert_cam_gives_logits(model, tapped_logits, feats["cam"])


def test_tap_returning_only_a_map_and_bad_taps():
    model = zoo_model("resnet8")
    x = _images()
    model.set_tap("penult", nn.Identity())
    try:
        with torch.no_grad():
            logits, feats = model.forward_features(x)
        assert set(feats) == {"inter", "penult", "cam"}
        assert any(key.startswith("taps.") for key in model.state_dict()) is False  # Identity has no state
        model.set_tap("penult", nn.Conv2d(64, 32, 1))
        with pytest.raises(ValueError, match="keep the feature map's shape"):
            model(x)
    finally:
        model.set_tap("penult", None)
    with pytest.raises(ValueError, match="tap point"):
        model.set_tap("logits", nn.Identity())


@pytest.mark.parametrize(
    "name,penult_side", [("resnet8", 16), ("wrn_16_1", 16), ("vgg8", 4), ("ShuffleV2", 8), ("MobileNetV2", 4)]
)
def test_64x64_inputs(name, penult_side):
    model = zoo_model(name)
    with torch.no_grad():
        logits, feats = model.forward_features(_images(side=64, batch=1))
    assert logits.shape == (1, NUM_CLASSES)
    assert feats["penult"].shape[-2:] == (penult_side, penult_side)
    _assert_cam_gives_logits(model, logits, feats["cam"])


def test_training_mode_backward_reaches_every_parameter():
    model = models.build("resnet8", 10).train()
    logits, feats = model.forward_features(_images())
    loss = F.cross_entropy(logits, torch.tensor([1, 2])) + feats["cam"].pow(2).mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


# -- ImageNet models -----------------------------------------------------------------------


def test_imagenet_model_without_torchvision_says_so(monkeypatch):
    # A None entry in sys.modules makes `import torchvision` raise ImportError.
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    with pytest.raises(KdpipeError, match="torchvision is required for ImageNet models and did not import"):
        models.build("imagenet_resnet18", 10)


def _torchvision_imports() -> bool:
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision.models  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.skipif(not _torchvision_imports(), reason="torchvision does not import here")
@pytest.mark.parametrize("name,arch", [("imagenet_resnet18", "resnet18"), ("imagenet_mobilenet_v2", "mobilenet_v2")])
def test_imagenet_wrapper_matches_torchvision(name, arch):
    import torchvision.models as tv

    reference = getattr(tv, arch)(weights=None, num_classes=10).eval()
    model = models.build(name, 10).eval()
    assert models.state_listing(model) == models.state_listing(reference)
    model.load_state_dict(reference.state_dict())
    x = _images(side=64, batch=1)
    with torch.no_grad():
        logits, feats = model.forward_features(x)
        torch.testing.assert_close(logits, reference(x), atol=1e-4, rtol=1e-4)
    _assert_cam_gives_logits(model, logits, feats["cam"])


# -- load_teacher ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet8x4_checkpoint(tmp_path_factory):
    """resnet8x4's state dict saved as mdistiller does: {"model": state_dict}."""
    path = tmp_path_factory.mktemp("ckpt") / "resnet8x4_vanilla" / "ckpt_epoch_240.pth"
    path.parent.mkdir()
    torch.save({"model": zoo_model("resnet8x4").state_dict()}, path)
    return path


@pytest.mark.parametrize("layout", ["mdistiller", "module_prefix", "bare"])
def test_load_teacher_round_trip(layout, resnet8x4_checkpoint, tmp_path):
    source = zoo_model("resnet8x4")
    state = source.state_dict()
    if layout == "mdistiller":
        path = resnet8x4_checkpoint
    else:
        path = tmp_path / f"{layout}.pth"
        if layout == "module_prefix":
            torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, path)
        else:
            torch.save(state, path)
    teacher = models.load_teacher("resnet8x4", path, NUM_CLASSES)
    assert not teacher.training
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), source(x), atol=0, rtol=0)


def test_load_teacher_accepts_checkpoints_without_bn_counters(tmp_path):
    source = zoo_model("resnet8")
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pth"
    torch.save({"model": state}, path)
    teacher = models.load_teacher("resnet8", path, NUM_CLASSES)
    with torch.no_grad():
        torch.testing.assert_close(teacher(_images()), source(_images()))


def test_load_teacher_accepts_numpy_metrics_but_not_pickled_objects(tmp_path):
    import numpy as np

    source = zoo_model("resnet8")
    with_metrics = tmp_path / "metrics.pth"
    torch.save({"model": source.state_dict(), "best_acc": np.float64(71.5), "epoch": 240}, with_metrics)
    teacher = models.load_teacher("resnet8", with_metrics, NUM_CLASSES)
    with torch.no_grad():
        torch.testing.assert_close(teacher(_images()), source(_images()))
    with_object = tmp_path / "object.pth"
    torch.save({"model": source.state_dict(), "config": ScoringTap()}, with_object)
    with pytest.raises(CheckpointError, match="could not be read by torch.load"):
        models.load_teacher("resnet8", with_object, NUM_CLASSES)


def test_load_teacher_wrong_architecture_names_both(resnet8x4_checkpoint):
    with pytest.raises(CheckpointError, match=r"holds a resnet8x4 state dict \(num_classes=100\), not resnet32x4"):
        models.load_teacher("resnet32x4", resnet8x4_checkpoint, NUM_CLASSES)


def test_load_teacher_wrong_class_count(resnet8x4_checkpoint):
    with pytest.raises(
        CheckpointError, match=r"resnet8x4 state dict \(num_classes=100\), not resnet8x4 \(num_classes=10\)"
    ):
        models.load_teacher("resnet8x4", resnet8x4_checkpoint, 10)


def test_load_teacher_unrecognised_state_dict(tmp_path):
    state = dict(zoo_model("resnet8").state_dict())
    state.pop("fc.bias")
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="does not fit resnet8 .*missing keys .*fc.bias.*no registered"):
        models.load_teacher("resnet8", path, NUM_CLASSES)


def test_load_teacher_refuses_student_with_taps_saying_so(tmp_path):
    student = models.build("resnet8", NUM_CLASSES)
    student.set_tap("penult", nn.Conv2d(64, 64, 1))
    path = tmp_path / "student.pth"
    torch.save({"model": student.state_dict()}, path)
    with pytest.raises(CheckpointError, match="student with KD-layer taps at penult"):
        models.load_teacher("resnet8", path, NUM_CLASSES)


def test_load_teacher_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        models.load_teacher("resnet8x4", tmp_path / "nope.pth", NUM_CLASSES)


def test_load_teacher_unreadable_and_foreign_files(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="could not be read"):
        models.load_teacher("resnet8x4", garbage, NUM_CLASSES)
    foreign = tmp_path / "foreign.pth"
    torch.save({"epoch": 3}, foreign)
    with pytest.raises(CheckpointError, match="holds neither"):
        models.load_teacher("resnet8x4", foreign, NUM_CLASSES)


def test_load_teacher_unknown_architecture(resnet8x4_checkpoint):
    with pytest.raises(KdpipeError, match="unknown architecture"):
        models.load_teacher("resnet8y4", resnet8x4_checkpoint, NUM_CLASSES)


def test_identify_architecture_from_listing():
    with torch.device("meta"):
        listing = models.state_listing(models.build("wrn_40_2", 10))
    assert models.identify_architecture(listing) == ("wrn_40_2", 10)


# -- the CAT-KD reference student head (head="cam") ----------------------------------------

CAM_LISTINGS = Path(__file__).parent / "data" / "catkd_cam_state_dicts.json"
# one model per CIFAR family -> the reference's initialisation of its conv_test
# (CAT-KD mdistiller/models/cifar/*.py, the *_test classes; see each family file)
CAM_FAMILIES = {
    "resnet8": "he_normal_fan_out",
    "ResNet18": "he_normal_fan_out",
    "wrn_16_1": "he_normal_fan_out",
    "MobileNetV2": "he_normal_fan_out",
    "vgg8": "torch_default",
    "ShuffleV1": "torch_default",
    "ShuffleV2": "torch_default",
    # CAT-KD mdistiller/models/imagenet/mobilenetv2.py MobileNetV2_test: no init loop
    "imagenet_mobilenet_v1": "torch_default",
}
_built_cam: dict[str, models.KDModel] = {}


def cam_model(name: str) -> models.KDModel:
    """The session's eval-mode head="cam" instance of `name`, BN statistics randomised."""
    if name not in _built_cam:
        torch.manual_seed(0)
        model = models.build(name, NUM_CLASSES, head="cam")
        _randomize_batchnorm(model)
        _built_cam[name] = model.eval()
    return _built_cam[name]


@pytest.mark.parametrize("name", list(CAM_FAMILIES))
def test_cam_head_logits_are_gap_of_the_bias_free_cam(name):
    model = cam_model(name)
    x = _images()
    with torch.no_grad():
        logits = model(x)
        logits_ff, feats = model.forward_features(x)
        independent = F.conv2d(feats["penult"], model.conv_test.weight).mean(dim=(2, 3))
    assert model.head_kind == "cam"
    assert set(feats) == {"inter", "penult", "cam"}
    assert feats["cam"].shape == (2, NUM_CLASSES, *feats["penult"].shape[-2:])
    torch.testing.assert_close(logits_ff, logits)
    torch.testing.assert_close(feats["cam"].mean(dim=(2, 3)), logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(independent, logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(CAM_FAMILIES))
def test_cam_head_replaces_the_linear_layer(name):
    with torch.device("meta"):
        linear = models.build(name, NUM_CLASSES)
        cam = models.build(name, NUM_CLASSES, head="cam")
    head = cam.head()
    assert isinstance(head, nn.Conv2d) and head is cam.conv_test
    assert head.bias is None and head.kernel_size == (1, 1)
    assert tuple(head.weight.shape) == (NUM_CLASSES, cam.penult_channels, 1, 1)
    assert not any(isinstance(m, nn.Linear) for m in cam.modules())
    head_name = next(n for n, m in linear.named_modules() if m is linear.head())
    linear_keys = {f"{head_name}.weight", f"{head_name}.bias"}
    expected = {k: s for k, s in models.state_listing(linear).items() if k not in linear_keys}
    expected["conv_test.weight"] = (NUM_CLASSES, cam.penult_channels, 1, 1)
    assert models.state_listing(cam) == expected
    assert linear.head_kind == "linear" and isinstance(linear.head(), nn.Linear)


@pytest.mark.parametrize("name", ["resnet8x4", "wrn_16_2", "vgg8", "MobileNetV2", "ShuffleV2"])
def test_cam_head_state_dict_equals_catkd_reference(name):
    reference = dict((k, tuple(s)) for k, s in json.loads(CAM_LISTINGS.read_text())["models"][name])
    if name == "MobileNetV2":
        # the reference's MobileNetV2_test keeps its unused nn.Linear ("classifier.0");
        # kdpipe's CAM-head model has no linear layer
        reference = {k: s for k, s in reference.items() if not k.startswith("classifier.")}
    with torch.device("meta"):
        model = models.build(name, NUM_CLASSES, head="cam")
    assert models.state_listing(model) == reference


@pytest.mark.parametrize("name,rule", list(CAM_FAMILIES.items()))
def test_cam_head_initialisation_follows_the_reference(name, rule):
    torch.manual_seed(1)
    model = models.build(name, NUM_CLASSES, head="cam")
    assert model.cam_head_init == rule
    weight = model.conv_test.weight.detach().double()
    fan_in = model.penult_channels
    if rule == "he_normal_fan_out":  # N(0, 2 / fan_out), fan_out = C * 1 * 1
        std = math.sqrt(2.0 / NUM_CLASSES)
        assert weight.std().item() == pytest.approx(std, rel=0.05)
        assert weight.abs().max().item() > 3 * std  # a normal, not a bounded uniform
    else:  # PyTorch's Conv2d default: U(-1/sqrt(D), 1/sqrt(D))
        bound = 1.0 / math.sqrt(fan_in)
        assert weight.abs().max().item() <= bound
        assert weight.abs().max().item() > 0.95 * bound
        assert weight.std().item() == pytest.approx(bound / math.sqrt(3.0), rel=0.05)
    assert abs(weight.mean().item()) < 0.05 * weight.std().item() + 1e-3


def test_cam_head_with_taps_larger_inputs_and_training():
    model = cam_model("resnet8")
    with torch.no_grad():
        model.set_tap("penult", ScoringTap())
        try:
            logits, feats = model.forward_features(_images(batch=1))
            forward_logits = model(_images(batch=1))
        finally:
            model.set_tap("penult", None)
        torch.testing.assert_close(forward_logits, logits)
        torch.testing.assert_close(feats["cam"].mean(dim=(2, 3)), logits, atol=1e-5, rtol=1e-5)
        logits, feats = cam_model("wrn_16_1").forward_features(_images(side=64, batch=1))
        assert feats["cam"].shape[-2:] == (16, 16)
        torch.testing.assert_close(feats["cam"].mean(dim=(2, 3)), logits, atol=1e-5, rtol=1e-5)
    student = models.build("resnet8", 10, head="cam").train()
    logits, feats = student.forward_features(_images())
    (F.cross_entropy(logits, torch.tensor([1, 2])) + feats["cam"].pow(2).mean()).backward()
    assert all(p.grad is not None for p in student.parameters())


def test_head_option_is_checked_and_linear_stays_the_default():
    with pytest.raises(KdpipeError, match="head must be one of linear, cam, got 'conv'"):
        models.build("resnet8", 10, head="conv")
    with torch.device("meta"):
        default, linear = models.build("resnet8x4", 10), models.build("resnet8x4", 10, head="linear")
    assert default.head_kind == linear.head_kind == "linear"
    assert models.state_listing(default) == models.state_listing(linear)
    model = models.build("resnet8", 10, head="cam")
    before = model.conv_test
    model.use_cam_head()  # already a CAM head: unchanged
    assert model.conv_test is before


@pytest.mark.skipif(not _torchvision_imports(), reason="torchvision does not import here")
@pytest.mark.parametrize(
    "name,rule", [("imagenet_resnet18", "he_normal_fan_out"), ("imagenet_mobilenet_v2", "torch_default")]
)
def test_imagenet_cam_head(name, rule):
    torch.manual_seed(0)
    model = models.build(name, 10, head="cam").eval()
    assert model.cam_head_init == rule and model.head().bias is None
    assert not any(isinstance(m, (nn.Linear, nn.Dropout)) for m in model.modules())
    with torch.no_grad():
        logits, feats = model.forward_features(_images(side=64, batch=1))
    torch.testing.assert_close(feats["cam"].mean(dim=(2, 3)), logits, atol=1e-5, rtol=1e-5)


# mdistiller's preact_feats[1:] of each family (mdistiller/models/cifar/*.py) on the weights
# below (built by kdpipe, loaded into mdistiller's model; BN statistics and affine drawn from
# torch.manual_seed(0) in module order; x = randn(2, 3, 32, 32) after torch.manual_seed(1)): the
# sums of each map.
PREACT_SUMS = {
    "resnet8": [7293.9561, 783.8903, -444.5894],
    "wrn_16_2": [-9084.1631, -7439.0176, 2978.8787],
    "vgg8": [425.6942, -19.9997, 99.2086, -277.5938],
    "ShuffleV1": [28820.0742, 27067.4258, 10798.959],
    "ShuffleV2": [2778.5964, 1384.6376, 679.4641],
    "ResNet18": [39345.1094, 52454.8281, 34205.7422, 27614.957],
}


@pytest.mark.parametrize("arch", list(PREACT_SUMS))
def test_preact_stages_equal_mdistiller_preact_feats(arch):
    torch.manual_seed(0)
    model = models.build(arch, num_classes=10)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    model.eval()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, feats = model.forward_features(x, stages=True)
    sums = [float(t.sum()) for t in feats["preact_stages"]]
    assert sums == pytest.approx(PREACT_SUMS[arch], rel=1e-4, abs=1e-2)
    # the ReLU of each pre-activation is the stage output where the stage ends with that ReLU
    if arch in ("resnet8", "vgg8", "ShuffleV1"):
        for pre, out in zip(feats["preact_stages"], feats["stages"]):
            torch.testing.assert_close(torch.relu(pre), out)


# mdistiller's feats[0] (the stem's output) on the same weights and input as PREACT_SUMS: sums
STEM_SUMS = {"resnet8": 9981.8047, "wrn_16_2": 7.8389, "vgg8": 18660.9023, "ShuffleV2": 12386.4785}


@pytest.mark.parametrize("arch", list(STEM_SUMS))
def test_stem_equals_mdistiller_feats0(arch):
    torch.manual_seed(0)
    model = models.build(arch, num_classes=10)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    model.eval()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, feats = model.forward_features(x, stages=True)
    assert float(feats["stem"].sum()) == pytest.approx(STEM_SUMS[arch], rel=1e-4, abs=1e-2)


# -- the references' ImageNet MobileNet (v1) -------------------------------------------------

REFERENCE_IMAGENET = Path(__file__).parent / "data" / "reference_imagenet_mobilenet_state_dicts.json"
# mdistiller's MobileNetV1 forward (mdistiller/models/imagenet/mobilenetv1.py) on kdpipe's
# weights loaded into it: torch.manual_seed(0) build with num_classes=1000, BN statistics and
# affine drawn as in PREACT_SUMS, x = randn(2, 3, 224, 224) after torch.manual_seed(1); sums of
# preact_feats[1:], feats[0], the logits and pooled_feat
MOBILENET_V1_SUMS = {
    "preact_feats[1:]": [8055.9321, -1095.4712, 733.1336],
    "feats[0]": 89133.3203,
    "logits": -5.2175,
    "pooled_feat": 206.1775,
}


def test_imagenet_mobilenet_v1_state_dict_is_the_references():
    listings = json.loads(REFERENCE_IMAGENET.read_text())["models"]
    with torch.device("meta"):
        linear = models.build("imagenet_mobilenet_v1", 1000)
        cam = models.build("imagenet_mobilenet_v1", 1000, head="cam")
        alias = models.build("MobileNetV1", 1000)
    assert [[k, list(v.shape)] for k, v in linear.state_dict().items()] == listings["MobileNetV1"]
    assert [[k, list(v.shape)] for k, v in cam.state_dict().items()] == listings["MobileNetV2_test"]
    assert models.state_listing(alias) == models.state_listing(linear)
    assert linear.feature_channels() == {"inter": 1024, "penult": 1024}


def test_imagenet_mobilenet_v1_features_equal_mdistillers_forward():
    torch.manual_seed(0)
    model = models.build("imagenet_mobilenet_v1", num_classes=1000)
    _randomize_batchnorm_wide(model)
    model.eval()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        logits, feats = model.forward_features(x, stages=True)
        pooled = feats["penult"].mean(dim=(2, 3))
    expected = MOBILENET_V1_SUMS
    assert [float(t.sum()) for t in feats["preact_stages"]] == pytest.approx(expected["preact_feats[1:]"], rel=1e-4)
    assert float(feats["stem"].sum()) == pytest.approx(expected["feats[0]"], rel=1e-4)
    assert float(logits.sum()) == pytest.approx(expected["logits"], rel=1e-3, abs=1e-3)
    assert float(pooled.sum()) == pytest.approx(expected["pooled_feat"], rel=1e-4)
    # feats[1:] are the ReLU of preact_feats[1:]; the last one is the penult map
    for pre, out in zip(feats["preact_stages"], feats["stages"]):
        torch.testing.assert_close(torch.relu(pre), out)
    assert [tuple(t.shape[1:]) for t in feats["stages"]] == [(256, 28, 28), (512, 14, 14), (1024, 7, 7)]
    torch.testing.assert_close(feats["stages"][-1], feats["penult"])
    assert tuple(feats["inter"].shape) == (2, 1024, 7, 7)
    # OFD's margins come from the BN before each pre-ReLU stage (get_bn_before_relu()[1:])
    assert [p.bn for p in model.preact_points()] == [model.model[i][-2] for i in (5, 11, 13)]


def test_imagenet_mobilenet_v1_needs_no_torchvision_and_trains(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    model = models.build("imagenet_mobilenet_v1", 10, head="cam").train()
    assert model.cam_head_init == "torch_default"
    logits, feats = model.forward_features(_images(side=64, batch=2))
    torch.testing.assert_close(feats["cam"].mean(dim=(2, 3)), logits)
    F.cross_entropy(logits, torch.tensor([1, 2])).backward()
    assert all(p.grad is not None for p in model.parameters())


def _randomize_batchnorm_wide(model: nn.Module) -> None:
    """BN statistics and affine as PREACT_SUMS draws them (module order, the global generator)."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)


@pytest.mark.parametrize("method", ["cat_kd", "ofd"])
def test_imagenet_mobilenet_v1_student_trains_from_a_store(tiny_store, tmp_path, method):
    # CAT-KD with its CAM head (conv_test), OFD on the pre-ReLU stages and their BN margins
    from kdpipe.config.configs import StudentConfig
    from kdpipe.stages.train import train_student

    summary = train_student(
        StudentConfig(
            store=tiny_store["path"],
            student="imagenet_mobilenet_v1",
            method=method,
            epochs=1,
            batch_size=16,
            online_teacher=tiny_store["teacher"] if method == "ofd" else None,
        ),
        out=tmp_path,
        progress=False,
        plot=False,
    )
    assert summary["final_top1"] is not None
