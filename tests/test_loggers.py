"""Per-epoch logging (kdpipe.engine.loggers): TensorBoard event files of teacher and student
runs, read back with TensorBoard's own reader; Weights & Biases through a fake module (no
network), and its one sentence when wandb is not installed."""

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import TINY_DATA

from kdpipe.cli import cli
from kdpipe.config.configs import StudentConfig, TeacherConfig
from kdpipe.engine.loggers import scalar_tag
from kdpipe.errors import KdpipeError
from kdpipe.stages.teacher import train_teacher
from kdpipe.stages.train import train_student

torch.set_num_threads(1)


def _events(run_dir) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from the run's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_dir) / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _student(tiny_store, tmp_path, **kwargs) -> dict:
    cfg = StudentConfig(store=tiny_store["path"], student="resnet8", method="kd", epochs=2, batch_size=8)
    return train_student(cfg, out=tmp_path, progress=False, plot=False, **kwargs)


def test_student_run_writes_the_scalars_to_tensorboard(tiny_store, tmp_path):
    s = _student(tiny_store, tmp_path)
    events, rows = _events(s["run_dir"]), _rows(s["run_dir"])
    for tag in (
        "train/loss",
        "train/loss_ce",
        "train/loss_kd",
        "train/top1",
        "test/loss",
        "test/top1",
        "test/top5",
        "lr",
        "speed/img_per_s",
        "speed/epoch_seconds",
    ):
        assert tag in events, (tag, sorted(events))
    for key in ("train_loss", "loss_kd", "test_top1", "test_top5", "lr", "img_per_s"):
        assert [step for step, _ in events[scalar_tag(key)]] == [1, 2]
        assert [v for _, v in events[scalar_tag(key)]] == pytest.approx([r[key] for r in rows], rel=1e-6)


def test_teacher_run_writes_tensorboard_events(tmp_path):
    s = train_teacher(
        TeacherConfig(arch="resnet8", data=TINY_DATA, epochs=1, batch_size=16),
        out=tmp_path,
        device="cpu",
        progress=False,
    )
    events = _events(s["run_dir"])
    assert events["test/top1"] == [(1, pytest.approx(s["top1"]))]
    assert {"train/loss", "train/loss_ce", "lr", "speed/img_per_s"} <= set(events)


def test_wandb_missing_is_one_sentence(monkeypatch, cli_runner, tiny_store, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    result = cli_runner.invoke(
        cli,
        [
            "train-student",
            "--store",
            tiny_store["path"],
            "--student",
            "resnet8",
            "--method",
            "kd",
            "--epochs",
            "1",
            "--out",
            str(tmp_path),
            "--wandb",
            "proj",
        ],
    )
    assert result.exit_code == 2
    assert result.output.strip() == (
        "kdpipe: error: --wandb needs the wandb package, which is not installed; "
        "install it (pip install 'kdpipe[wandb]') or drop --wandb."
    )
    assert not list(tmp_path.iterdir())  # refused before a run directory was made


class _FakeWandb(types.ModuleType):
    """What kdpipe calls of wandb: init -> run with log(dict, step) and finish()."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        fake = self

        class Run:
            def log(self, values, step=None):
                fake.logged.append((step, dict(values)))

            def finish(self):
                fake.finished += 1

        return Run()


def test_wandb_gets_every_epoch(monkeypatch, tiny_store, tmp_path):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    s = _student(tiny_store, tmp_path, wandb="my-project")
    (init,) = fake.inits
    run_name = Path(s["run_dir"]).name
    assert init["project"] == "my-project" and init["name"] == run_name and init["id"] == run_name
    assert init["resume"] == "allow" and init["config"]["stage"] == "train-student"
    assert [step for step, _ in fake.logged] == [1, 2] and fake.finished == 1
    rows = _rows(s["run_dir"])
    assert [v["test/top1"] for _, v in fake.logged] == pytest.approx([r["test_top1"] for r in rows])
    assert {"train/loss", "train/loss_kd", "lr", "speed/img_per_s"} <= set(fake.logged[0][1])


def test_wandb_missing_in_the_stage(monkeypatch, tiny_store, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(KdpipeError, match="--wandb needs the wandb package"):
        train_teacher(TeacherConfig(arch="resnet8", data=TINY_DATA, epochs=1), out=tmp_path, wandb="p")


def test_resumed_run_continues_its_tensorboard_curves(tiny_store, tmp_path):
    def stop_after_first(epoch):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _student(tiny_store, tmp_path, after_epoch=stop_after_first)
    (run,) = tmp_path.iterdir()
    s = train_student(resume=str(run), progress=False, plot=False)
    events = _events(s["run_dir"])
    assert [step for step, _ in events["test/top1"]] == [1, 2]
    assert [v for _, v in events["test/top1"]] == pytest.approx([r["test_top1"] for r in _rows(run)])
