"""SP: the loss against values mdistiller's own ``sp_loss`` produced, the teacher's last stage
cached = online on replayed views, one epoch from a store and from the online teacher, and
mdistiller's configs/cifar100/sp.yaml read as it is."""

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
from kdpipe.methods.sp import LastStage, similarity_loss, sp_loss
from kdpipe.models import build, load_teacher
from kdpipe.targets import TeacherOutputs

torch.set_num_threads(1)


def wave(shape, phase: float, scale: float = 1.0) -> torch.Tensor:
    """Closed-form inputs (the same in the reference script): scale * sin(0.7 i + phase) over
    the flat index i."""
    n = math.prod(shape)
    return (scale * torch.sin(0.7 * torch.arange(n, dtype=torch.float32) + phase)).reshape(shape)


# Values of mdistiller/distillers/SP.py ``sp_loss([f_s], [f_t])`` (torch 2.13.0+cpu, float32)
# on f_s = wave(student shape, phase_s), f_t = wave(teacher shape, phase_t, 2.0), and d loss / d f_s.
MDISTILLER_SP = [
    {
        "shapes": ((3, 2, 2, 2), (3, 4, 2, 2)),
        "phases": (0.0, 1.0),
        "loss": 0.20523643493652344,
        "grad": [-0.07805492, -0.053416319, -0.0036551903, 0.047825072, 0.076812416, 0.069673687]
        + [0.029766344, -0.024140619, -0.001656658, -0.0019934429, -0.0013926935, -0.0001369114]
        + [0.0011832332, 0.0019468851, 0.0017949219, 0.00079872925, 0.0083956439, 0.057967275]
        + [0.080276012, 0.064829655, 0.018892927, -0.035929445, -0.073853649, -0.077043302],
    },
    {"shapes": ((4, 3, 2, 2), (4, 2, 1, 1)), "phases": (0.3, 2.1), "loss": 0.1496700793504715, "grad": None},
]


@pytest.mark.parametrize("case", MDISTILLER_SP)
def test_sp_loss_equals_mdistiller(case):
    fs = wave(case["shapes"][0], case["phases"][0]).requires_grad_(True)
    ft = wave(case["shapes"][1], case["phases"][1], 2.0)
    loss = sp_loss([fs], [ft])
    loss.backward()
    assert loss.item() == pytest.approx(case["loss"], rel=1e-5)
    if case["grad"] is not None:
        torch.testing.assert_close(fs.grad.flatten(), torch.tensor(case["grad"]), rtol=1e-4, atol=1e-7)


def test_sp_hand_cases():
    # two orthogonal unit rows: G = I for the teacher; a student with equal rows has
    # normalised G rows (1, 1) / sqrt 2: ||I - G_s||^2 / 4 = (2 (1 - 1/sqrt 2)^2 + 2 / 2) / 4
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    s = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    want = (2 * (1 - 1 / math.sqrt(2)) ** 2 + 2 * 0.5) / 4
    assert similarity_loss(s, t).item() == pytest.approx(want, rel=1e-6)
    f = wave((4, 3, 2, 2), 0.5)
    assert similarity_loss(f, 7.0 * f).item() == pytest.approx(0.0, abs=1e-7)  # the scale cancels
    assert sp_loss([f, s], [f, t]).item() == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="same size"):
        similarity_loss(f, f[:2])
    with pytest.raises(ValueError, match="pairwise"):
        sp_loss([f], [])


# ------------------------------------------------------------------------ from a store
@pytest.fixture(scope="module")
def store(tiny_store, tmp_path_factory):
    return method_store(tiny_store, tmp_path_factory, "sp")


def test_store_holds_the_last_stage_for_every_view(store):
    reader = open_store(store["path"])
    assert reader.array("stage_last").shape == (32, 50, 64, 4, 4)  # resnet8 on 16x16: layer3, 50 views


def test_cached_last_stage_equals_online_on_replayed_views(store):
    for batch, a, b in replayed_targets(store, LastStage):
        torch.testing.assert_close(a["stage_last"], b["stage_last"], rtol=2e-3, atol=2e-3)
        s = torch.randn(len(batch.indices), 8, generator=torch.Generator().manual_seed(0))
        want = similarity_loss(s, b["stage_last"]).item()
        assert similarity_loss(s, a["stage_last"]).item() == pytest.approx(want, rel=1e-2)


def test_method_is_ce_plus_weighted_sp_of_the_last_stages(store):
    dataset = load_dataset(store["data"])
    teacher = load_teacher("resnet8", store["teacher"], dataset.num_classes)
    x = normalize(dataset.get_batch(np.arange(6)), dataset.mean, dataset.std)
    labels = torch.as_tensor(dataset.labels[:6], dtype=torch.int64)
    method = get_method("sp")
    assert method.options == {"feat_weight": 3000.0, "ce_weight": 1.0}  # mdistiller cfg.py CFG.SP
    kind = method.kinds()[0]
    targets = kind.online_targets(TeacherOutputs.of(teacher, x, stages=kind.needs_stages))
    student = method.prepare_student(build("ShuffleV1", dataset.num_classes))
    logits, feats = student.forward_features(x)
    total, parts = method.loss(logits, feats, targets, labels)
    expected = sp_loss([feats["stages"][-1]], [teacher.forward_features(x, stages=True)[1]["stages"][-1]])
    torch.testing.assert_close(parts["sp"], expected.detach(), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(total, F.cross_entropy(logits, labels) + 3000.0 * expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("source", ["cached", "online"])
def test_trains_one_epoch_cached_and_online(store, tmp_path, source):
    trains_one_epoch_and_evaluates(store, tmp_path, "sp", source)


def test_mdistiller_sp_yaml_is_read_as_it_is(tmp_path):
    """The keys and values of mdistiller configs/cifar100/sp.yaml (resnet32x4 -> resnet8x4)."""
    cfg = read_mdistiller_cifar100_yaml(tmp_path, "SP")
    assert cfg.method_options == {"feat_weight": 3000.0, "ce_weight": 1.0}
    cfg = read_mdistiller_cifar100_yaml(tmp_path, "SP", {"SP": {"LOSS": {"FEAT_WEIGHT": 1000.0}}})
    assert cfg.method_options["feat_weight"] == 1000.0


# letKD (BMVC 2023) supplement Table 1 (CIFAR-100) and Table 3 (Tiny-ImageNet), the SP row
SP_ROWS = {
    "cifar100": {
        "wrn_40_2-wrn_16_2": 73.83,
        "wrn_40_2-wrn_40_1": 72.43,
        "resnet56-resnet20": 69.67,
        "resnet110-resnet20": 70.04,
        "resnet110-resnet32": 72.69,
        "resnet32x4-resnet8x4": 72.94,
        "wrn_40_2-ShuffleV1": 74.52,
        "resnet32x4-ShuffleV1": 73.48,
        "resnet32x4-ShuffleV2": 74.56,
        "ResNet50-MobileNetV2": 68.08,
    },
    "tinyimagenet": {
        "wrn_40_2-wrn_16_2": 55.69,
        "wrn_40_2-wrn_40_1": 53.74,
        "resnet56-resnet20": 54.03,
        "wrn_40_2-ShuffleV1": 64.62,
        "ResNet50-MobileNetV2": 58.11,
    },
}


@pytest.mark.parametrize("folder", list(SP_ROWS))
def test_sp_rows_carry_mdistillers_values_and_the_papers_number(folder):
    from pathlib import Path

    from kdpipe.config.config_files import load_row

    configs = Path(__file__).resolve().parents[1] / "configs" / folder / "comparison"
    assert {p.name for p in configs.glob("*-sp.yaml")} == {f"{pair}-sp.yaml" for pair in SP_ROWS[folder]}
    for pair, top1 in SP_ROWS[folder].items():
        row = load_row(configs / f"{pair}-sp.yaml", strict=False)
        assert (row.teacher_arch, row.student.student) == tuple(pair.split("-"))
        assert row.student.method == "sp" and row.student.method_options == {"feat_weight": 3000.0, "ce_weight": 1.0}
        assert row.paper["top1"] == top1
