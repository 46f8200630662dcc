"""AB (kdpipe/methods/ab.py): the loss against values RepDistiller's own ``ABLoss``
(``distiller_zoo/AB.py``) produced on the inputs below (the reference is not imported here);
the stored signs equal the online ones; the two stages; one epoch cached and online."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from method_checks import method_store, replayed_targets, trains_one_epoch_and_evaluates

from kdpipe.config.configs import StudentConfig
from kdpipe.methods import get_method
from kdpipe.methods.ab import PreactSigns, ab_loss, ab_stage_loss

torch.set_num_threads(1)


def test_loss_equals_repdistiller_abloss():
    torch.manual_seed(0)
    g_s = [torch.randn(2, 3, 8, 8) * 2, torch.randn(2, 5, 4, 4) * 2, torch.randn(2, 7, 2, 2) * 2]
    g_t = [torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4, 4), torch.randn(2, 7, 2, 2)]
    # RepDistiller ABLoss(3)(g_s, g_t): per stage, and their sum
    expected = [0.5880584716796875, 0.6217635273933411, 0.2560325264930725]
    for i, (s, t, want) in enumerate(zip(g_s, g_t, expected)):
        weight = 2.0 ** (i - 2) / 2 / 1000 * 3
        assert (weight * ab_stage_loss(s, t > 0)).item() == pytest.approx(want, rel=1e-5)
    signs = [(t > 0).float() for t in g_t]  # the stored form
    assert ab_loss(g_s, signs).item() == pytest.approx(1.4658544063568115, rel=1e-5)


def test_two_stages_and_the_recipe():
    method = get_method("ab")
    assert method.recipe("resnet8x4")["epochs"] == 270
    assert method.recipe("resnet8x4")["milestones"] == [180, 210, 240]
    method.begin_epoch(29)
    assert method.initialising
    method.begin_epoch(30)
    assert not method.initialising


@pytest.fixture(scope="module")
def store(tiny_store, tmp_path_factory):
    return method_store(tiny_store, tmp_path_factory, "ab")


def test_cached_signs_equal_online_on_replayed_views(store):
    from kdpipe.artifacts import open_store

    reader = open_store(store["path"])
    assert reader.array("ab_signs/stage1").dtype == "uint8"
    for _batch, a, b in replayed_targets(store, PreactSigns):
        assert set(a) == set(b) == {"ab_sign1", "ab_sign2", "ab_sign3"}
        for key in a:
            torch.testing.assert_close(a[key], b[key])


def test_method_loss_by_stage():
    from kdpipe.methods.base import TeacherInfo
    from kdpipe.models import build

    method = get_method("ab", init_epochs=1)
    shapes = {"ab_signs/stage1": (16, 16, 16), "ab_signs/stage2": (32, 8, 8), "ab_signs/stage3": (64, 4, 4)}
    method.attach_teacher(TeacherInfo(shapes=shapes, image_size=(16, 16)))
    student = method.prepare_student(build("resnet8x4", 4))  # wider: regressors on every stage
    x, labels = torch.randn(2, 3, 16, 16), torch.tensor([0, 1])
    logits, feats = student.forward_features(x)
    targets = {f"ab_sign{i}": (torch.randn(2, *s) > 0).float() for i, s in enumerate(shapes.values(), start=1)}
    method.begin_epoch(0)
    total, parts = method.loss(logits, feats, targets, labels)
    connected = [c(f) for c, f in zip(student.ab_connectors, feats["preact_stages"])]
    torch.testing.assert_close(total, ab_loss(connected, list(targets.values())))
    method.begin_epoch(1)
    total, parts = method.loss(logits, feats, targets, labels)
    torch.testing.assert_close(total, F.cross_entropy(logits, labels))


@pytest.mark.parametrize("source", ["cached", "online"])
def test_trains_both_stages_and_evaluates(store, tmp_path, source):
    trains_one_epoch_and_evaluates(store, tmp_path, "ab", source, method_options={"init_epochs": 1}, epochs=2)


def test_own_loop_equals_train_student_through_both_stages(store, tmp_path):
    # the second stage starts with a fresh optimizer (RepDistiller), the first leaves the
    # classifier untouched (its loss does not reach it), and the API's scheduler follows the
    # recipe's moved milestones: an own loop over kdpipe.api ends with train-student's weights
    import kdpipe
    from kdpipe.stages.train import train_student

    settings = {"method_options": {"init_epochs": 1}, "epochs": 3, "batch_size": 16, "lr": 0.01, "seed": 2}
    training = kdpipe.open_store(store["path"]).training(method="ab", student="resnet8", device="cpu", **settings)
    model = training.build_student()
    optimizer = training.make_optimizer(model)
    scheduler = training.make_scheduler(optimizer)
    assert sorted(scheduler.milestones.elements()) == training.recipe["milestones"]  # 151/181/211 of 241, scaled
    classifier = model.linear_head().weight.detach().clone()
    for epoch in range(training.epochs):
        model.train()
        for step, batch in enumerate(training.batches(epoch)):
            if epoch == 1 and step == 0:
                assert not optimizer.state  # cleared where the second stage begins
            logits, features = training.forward(model, batch.images)
            loss, _ = training.method.loss(logits, features, batch.targets, batch.labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
        if epoch == 0:
            assert torch.equal(model.linear_head().weight, classifier) and optimizer.state
    training.close()
    run = train_student(
        StudentConfig(store=store["path"], student="resnet8", method="ab", **settings),
        out=tmp_path,
        progress=False,
        plot=False,
    )
    theirs = torch.load(f"{run['run_dir']}/checkpoints/latest.pth", map_location="cpu", weights_only=True)["model"]
    ours = model.state_dict()
    assert ours.keys() == theirs.keys()
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []
