"""Run directories: config, metrics CSV/JSONL, atomic checkpoints, curves, summary."""

import csv
import json
import os

import pytest
import torch

from kdpipe.errors import KdpipeError
from kdpipe.runs import rundir as rd
from kdpipe.runs.rundir import RunDir


def test_create_is_unique_and_writes_config(tmp_path):
    a = RunDir.create(tmp_path, "teacher-resnet8", {"lr": 0.05, "path": tmp_path, "t": (1, 2)})
    b = RunDir.create(tmp_path, "teacher-resnet8", {"lr": 0.05})
    assert a.path != b.path and a.path.is_dir() and b.path.is_dir()
    assert a.path.name.startswith("teacher-resnet8-")
    cfg = json.loads((a.path / "config.json").read_text())
    assert cfg == {"lr": 0.05, "path": str(tmp_path), "t": [1, 2]}
    assert RunDir.open(a.path).config["lr"] == 0.05
    with pytest.raises(KdpipeError, match="not a kdpipe run directory"):
        RunDir.open(tmp_path)


def test_metrics_csv_columns_and_jsonl(tmp_path):
    run = RunDir.create(tmp_path, "r", {})
    run.log_epoch({"epoch": 1, "train_loss": 2.0, "test_top1": 10.0})
    run.log_epoch({"epoch": 2, "train_loss": torch.tensor(1.5), "test_top1": float("nan"), "extra": 3})
    with open(run.metrics_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["epoch", "train_loss", "test_top1"]
    assert [r["epoch"] for r in rows] == ["1", "2"]
    jl = run.read_metrics()
    assert jl[1]["train_loss"] == 1.5 and jl[1]["test_top1"] is None and jl[1]["extra"] == 3
    run.truncate_metrics(1)
    assert [r["epoch"] for r in run.read_metrics()] == [1]
    with open(run.metrics_csv, newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 1
    png = run.plot_curves()
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    run.write_summary({"top1": 1.0, "bad": float("inf")})
    assert run.summary == {"top1": 1.0, "bad": None}


def test_checkpoint_is_atomic(tmp_path, monkeypatch):
    run = RunDir.create(tmp_path, "r", {})
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [2, 3])
    state = {
        "model": model.state_dict(),
        "epoch": 1,
        "optimizer": opt.state_dict(),
        "scheduler": rd.scheduler_state(sched),
        "rng": rd.rng_state(),
    }
    path = run.save_checkpoint(state)
    loaded = torch.load(path, weights_only=True)  # everything loads with the safe unpickler
    assert loaded["epoch"] == 1 and torch.equal(loaded["model"]["weight"], model.weight)
    rd.load_scheduler_state(sched, loaded["scheduler"])
    before = path.read_bytes()

    # A kill in the middle of the write: the old file stays whole, no temp file is left.
    def torn_save(obj, fh, *a, **k):
        fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        run.save_checkpoint({"model": {}, "epoch": 2})
    assert path.read_bytes() == before
    assert sorted(os.listdir(run.checkpoint_dir)) == ["latest.pth"]
