"""The comparison methods dkd, at, fitnet and simkd from a store (issue 16).

A store of the session's tiny data set extracted with ``methods=("at", "fitnet", "simkd")``
(resnet8 teacher, every one of the 50 views): for each new kind, cached (replay) equals online
on the same views up to float16; the methods' losses equal the pure functions on the same
tensors; each method trains one epoch cached and online, and evaluate rebuilds its student.
The pure losses themselves are checked by hand and against mdistiller in test_losses_extra.py.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdpipe.artifacts import open_store
from kdpipe.config.configs import ExtractConfig, StudentConfig
from kdpipe.data import load_dataset, normalize
from kdpipe.engine.sources import CachedTargets, OnlineTargets
from kdpipe.errors import KdpipeError
from kdpipe.methods import available, get_method
from kdpipe.methods.at import at_loss
from kdpipe.methods.dkd import dkd_loss
from kdpipe.models import build, load_teacher
from kdpipe.targets import AttentionMaps, HintFeature, PenultMap, TeacherOutputs
from kdpipe.targets.stages import CLASSIFIER_BIAS, CLASSIFIER_WEIGHT, PENULT_SIDE

torch.set_num_threads(1)

NEW_METHODS = ("dkd", "at", "fitnet", "simkd")


@pytest.fixture(scope="module")
def store(tiny_store, tmp_path_factory):
    from kdpipe.stages.extract import extract_teacher

    path = tmp_path_factory.mktemp("comparison") / "store.zarr"
    extract_teacher(
        ExtractConfig(
            teacher=tiny_store["teacher"],
            arch="resnet8",
            data=tiny_store["data"],
            out=str(path),
            cam_res=(),
            features=(),
            methods=("at", "fitnet", "simkd"),
            shard_size=8,
            executor="inline",
        ),
        progress=False,
        verbose=False,
    )
    return dict(tiny_store, path=str(path))


@pytest.fixture(scope="module")
def parts(store):
    reader = open_store(store["path"])
    dataset = load_dataset(store["data"])
    return reader, dataset, load_teacher("resnet8", store["teacher"], dataset.num_classes)


def test_extraction_writes_the_named_methods_arrays(parts):
    reader, dataset, teacher = parts
    names = set(reader.array_names())
    # resnet8 on 16x16 images: stages 16, 8, 4 wide; the hint is feats[2] = layer2 (32 x 8 x 8)
    assert {"logits", "at_p2/stage1", "at_p2/stage1_half", "at_p2/stage3", "hint/feats2", "penult_map"} <= names
    assert reader.array("at_p2/stage1").shape[1:] == (50, 16, 16)
    assert reader.array("at_p2/stage1_half").shape[1:] == (50, 8, 8)
    assert reader.array("hint/feats2").shape[1:] == (50, 32, 8, 8)
    weight, bias = reader.static(CLASSIFIER_WEIGHT), reader.static(CLASSIFIER_BIAS)
    torch.testing.assert_close(torch.from_numpy(weight), teacher.fc.weight.detach())
    torch.testing.assert_close(torch.from_numpy(bias), teacher.fc.bias.detach())
    assert int(reader.static(PENULT_SIDE)[0]) == 4
    assert any(n.startswith("static/") for n in reader.checked_arrays()) and not reader.damage()


def test_unknown_method_named_at_extraction_is_one_sentence(store, tmp_path):
    from kdpipe.stages.extract import extract_teacher

    with pytest.raises(KdpipeError, match="Unknown method 'nope'"):
        extract_teacher(
            ExtractConfig(
                teacher=store["teacher"],
                arch="resnet8",
                data=store["data"],
                out=str(tmp_path / "s.zarr"),
                methods=("nope",),
                executor="inline",
            ),
            progress=False,
            verbose=False,
        )


KINDS = {"at": lambda: AttentionMaps(2.0), "fitnet": lambda: HintFeature(2), "simkd": PenultMap}


@pytest.mark.parametrize("name", list(KINDS))
def test_cached_replay_equals_online_on_the_same_views(parts, name):
    reader, dataset, teacher = parts
    policy = dataset.policy
    cached = CachedTargets(reader, [KINDS[name]()], device="cpu", policy=policy)
    online = OnlineTargets(teacher, [KINDS[name]()], reader=reader, policy=policy, views="replay")
    indices = torch.arange(reader.num_samples)
    plan = cached.plan(indices, 3, 1)
    assert torch.equal(plan.params, online.plan(indices, 3, 1).params)
    cached.begin_epoch(plan, 8)
    for batch in plan.batches(8):
        x = normalize(
            policy.apply_images(dataset.get_batch(batch.indices.numpy()), batch.params), dataset.mean, dataset.std
        )
        a, b = cached.targets(batch, x), online.targets(batch, x)
        assert set(a) == set(b) == set(cached.kinds[0].target_keys) and a
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=2e-3, atol=2e-3)
    cached.close()


def _batch(dataset, n=6):
    x = normalize(dataset.get_batch(np.arange(n)), dataset.mean, dataset.std)
    return x, torch.as_tensor(dataset.labels[:n], dtype=torch.int64)


def test_dkd_method_is_ce_plus_the_warmed_up_loss(parts):
    _, dataset, teacher = parts
    x, labels = _batch(dataset)
    student = build("resnet8", dataset.num_classes)
    method = get_method("dkd").bind("resnet56", "resnet20")
    assert method.options["beta"] == 2.0  # mdistiller configs/cifar100/dkd/res56_res20.yaml
    logits, t_logits = student(x), teacher(x).detach()
    expected = dkd_loss(logits, t_logits, labels, 1.0, 2.0, 4.0)
    for epoch, factor in ((0, 1 / 20), (9, 10 / 20), (30, 1.0)):
        method.begin_epoch(epoch)
        total, parts_ = method.loss(logits, {}, {"logits": t_logits}, labels)
        torch.testing.assert_close(total, F.cross_entropy(logits, labels) + factor * expected)
        torch.testing.assert_close(parts_["tckd"] + 2.0 * parts_["nckd"], expected.detach())


def test_dkd_two_class_hand_case():
    # T 1, label 0: p_t = (3/4, 1/4), p_s = (1/2, 1/2); NCKD is over one class (0), so
    # DKD = TCKD = 3/4 ln(3/2) + 1/4 ln(1/2)
    s, t = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])
    value = dkd_loss(s, t, torch.tensor([0]), alpha=1.0, beta=8.0, temperature=1.0)
    assert float(value) == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), abs=1e-6)


def test_at_hand_case():
    # student: uniform map over 4 cells (each 1/2 after l2-normalising); teacher: one hot cell
    s = torch.ones(1, 3, 2, 2)
    t = torch.zeros(1, 5, 2, 2)
    t[0, :, 0, 0] = 1.0
    assert float(at_loss([s], [t], 2.0)) == pytest.approx(((0.5 - 1) ** 2 + 3 * 0.25) / 4)


def _teacher_targets(teacher, kind, x, labels):
    out = TeacherOutputs.of(teacher, x, labels, stages=kind.needs_stages)
    return kind.online_targets(out), out


def test_at_method_equals_mdistiller_at_loss_on_a_smaller_student(parts):
    """ShuffleV1 after a resnet8 teacher: every student stage is half the teacher's, so the
    stored half-side maps give mdistiller's loss (teacher features pooled first)."""
    _, dataset, teacher = parts
    x, labels = _batch(dataset)
    method = get_method("at")
    student = method.prepare_student(build("ShuffleV1", dataset.num_classes).eval())
    targets, out = _teacher_targets(teacher, method.kinds()[0], x, labels)
    logits, feats = student.forward_features(x)
    total, parts_ = method.loss(logits, feats, targets, labels)
    expected = at_loss(feats["stages"], out.feats["stages"], 2.0)
    torch.testing.assert_close(parts_["at"], expected.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(total, F.cross_entropy(logits, labels) + 1000.0 * expected, rtol=1e-5, atol=1e-6)


def test_fitnet_method_regresses_the_student_hint(parts):
    _, dataset, teacher = parts
    x, labels = _batch(dataset)
    method = get_method("fitnet", teacher_hint_shape=[32, 8, 8])
    method._image_size = dataset.image_size
    student = method.prepare_student(build("resnet8", dataset.num_classes))
    assert method.options["student_hint_shape"] == [32, 8, 8]
    assert any(n.startswith("fitnet_regressor.") for n, _ in student.named_parameters())
    targets, out = _teacher_targets(teacher, method.kinds()[0], x, labels)
    logits, feats = student.forward_features(x)
    total, parts_ = method.loss(logits, feats, targets, labels)
    expected = F.mse_loss(student.fitnet_regressor(feats["stages"][1]), out.feats["stages"][1])
    torch.testing.assert_close(parts_["hint"], expected.detach())
    torch.testing.assert_close(total, F.cross_entropy(logits, labels) + 100.0 * expected)


def test_simkd_student_classifies_with_the_teacher_classifier(parts):
    reader, dataset, teacher = parts
    from kdpipe.methods.base import TeacherInfo

    x, labels = _batch(dataset)
    method = get_method("simkd")
    method.attach_teacher(TeacherInfo(static={n: reader.static(n) for n in reader.static_names()}))
    student = method.prepare_student(build("resnet8", dataset.num_classes)).eval()
    logits, feats = student.forward_features(x)
    pooled = feats["projected"].mean(dim=(2, 3))
    torch.testing.assert_close(logits, pooled @ teacher.fc.weight.detach().T + teacher.fc.bias.detach())
    torch.testing.assert_close(student(x), logits)
    targets, _ = _teacher_targets(teacher, method.kinds()[0], x, labels)
    total, parts_ = method.loss(logits, feats, targets, labels)
    torch.testing.assert_close(total, F.mse_loss(feats["projected"], targets["penult_map"]))
    assert not any(n.startswith("simkd_head.teacher") for n, _ in student.named_parameters())


@pytest.mark.parametrize("method", NEW_METHODS)
@pytest.mark.parametrize("source", ["cached", "online"])
def test_each_method_trains_one_epoch_and_evaluates(store, tmp_path, method, source):
    from kdpipe.stages.evaluate import evaluate
    from kdpipe.stages.train import train_student

    online = {"online_teacher": store["teacher"]} if source == "online" else {}
    s = train_student(
        StudentConfig(store=store["path"], student="resnet8", method=method, epochs=1, batch_size=8, **online),
        out=tmp_path,
        progress=False,
        plot=False,
    )
    assert s["target_source"] == source and s["final_top1"] is not None
    assert evaluate(s["run_dir"])["top1"] == pytest.approx(s["best_top1"])


def test_cli_lists_every_method():
    from click.testing import CliRunner

    from kdpipe.cli import cli

    text = " ".join(CliRunner().invoke(cli, ["train-student", "--help"]).output.split())
    assert all(name in text for name in available()), text
    assert set(NEW_METHODS) <= set(available())
