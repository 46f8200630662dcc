"""Teacher training and evaluation: run directory, mdistiller checkpoint, load_teacher, CLI."""

import csv
import json

import pytest
import torch

from kdpipe.cli import cli
from kdpipe.config.configs import TeacherConfig
from kdpipe.engine.schedule import milestones
from kdpipe.models import load_teacher
from kdpipe.stages.evaluate import evaluate
from kdpipe.stages.teacher import train_teacher as run_teacher

torch.set_num_threads(1)

DATA = "synthetic:n=24,classes=4,size=16,seed=0"


def train_teacher(arch, data, out, **kw):
    runtime = {k: kw.pop(k) for k in ("data_path", "loader_workers") if k in kw}
    return run_teacher(TeacherConfig(arch=arch, data=data, **kw), out=out, progress=False, **runtime)


def test_milestones_scale_with_epochs():
    assert milestones(240) == [150, 180, 210]
    assert milestones(15) == [9, 11, 13]
    assert milestones(1) == [1, 1, 1]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return train_teacher("resnet8", DATA, out, epochs=2, batch_size=16, seed=0)


def test_train_teacher_writes_run_directory(teacher_run):
    s = teacher_run
    run = s["run_dir"]
    import pathlib

    run = pathlib.Path(run)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["arch"] == "resnet8" and cfg["epochs"] == 2 and cfg["milestones"] == [1, 2, 2]
    with open(run / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for col in ("lr", "train_loss", "train_top1", "test_top1", "test_top5", "img_per_s"):
        assert col in rows[0]
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (run / "checkpoints" / "latest.pth").is_file()
    assert s["checkpoint"].endswith("resnet8_vanilla/ckpt_epoch_2.pth")
    # mdistiller's format: {"model": state_dict}; loads with load_teacher (weights_only)
    state = torch.load(s["checkpoint"], weights_only=True)
    assert set(state) >= {"model"}
    model = load_teacher("resnet8", s["checkpoint"], 4)
    assert not model.training
    assert 0.0 <= s["top1"] <= 100.0 and s["top5"] >= s["top1"]


def test_evaluate_matches_training_metrics(teacher_run):
    r = evaluate(teacher_run["checkpoint"], "resnet8", DATA)
    assert r["top1"] == pytest.approx(teacher_run["top1"])
    assert r["top5"] == pytest.approx(teacher_run["top5"])
    r2 = evaluate(teacher_run["run_dir"])  # a run directory is enough
    assert r2["top1"] == pytest.approx(r["top1"])


def test_training_is_reproducible(tmp_path):
    a = train_teacher("resnet8", DATA, tmp_path, epochs=1, batch_size=16, seed=3)
    b = train_teacher("resnet8", DATA, tmp_path, epochs=1, batch_size=16, seed=3)
    sa = torch.load(a["checkpoint"], weights_only=True)["model"]
    sb = torch.load(b["checkpoint"], weights_only=True)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_streamed_images_train_like_resident_ones(tmp_path):
    """Images read per batch (the path of data sets that are not resident) follow the same
    plan as resident ones: the same run, step for step."""
    a = train_teacher("resnet8", DATA, tmp_path / "a", epochs=1, batch_size=16, data_path="stream")
    b = train_teacher("resnet8", DATA, tmp_path / "b", epochs=1, batch_size=16)
    sa = torch.load(a["checkpoint"], weights_only=True)["model"]
    sb = torch.load(b["checkpoint"], weights_only=True)["model"]
    assert all(torch.allclose(sa[k].float(), sb[k].float(), atol=1e-5) for k in sa)


def test_cli_train_teacher_and_evaluate(cli_runner, tmp_path, teacher_run):
    r = cli_runner.invoke(
        cli, ["evaluate", "--checkpoint", teacher_run["checkpoint"], "--arch", "resnet8", "--data", DATA]
    )
    assert r.exit_code == 0, r.output
    assert "top-1" in r.output
    r = cli_runner.invoke(
        cli, ["evaluate", "--checkpoint", teacher_run["checkpoint"], "--arch", "resnet20", "--data", DATA]
    )
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.output.count("\n") == 1 and "kdpipe: error:" in r.output
    r = cli_runner.invoke(cli, ["train-teacher", "--arch", "nonet", "--data", DATA, "--out", str(tmp_path)])
    assert r.exit_code == 2 and "nonet" in r.output
