"""The public API for your own loop (kdpipe.api): examples/own_loop.py trains a student from a
store and ends with exactly the weights `kdpipe train-student` ends with at the same seed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kdpipe

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _run(args: list[str], cwd: Path) -> None:
    done = subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["cat_kd", "letkd2"])
def test_example_loop_equals_train_student_bit_for_bit(tiny_store, tmp_path, method):
    common = [
        "--student",
        "resnet8",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--lr",
        "0.005",
        "--seed",
        "3",
        "--device",
        "cpu",
    ]
    _run([sys.executable, str(ROOT / "examples" / "own_loop.py"), tiny_store["path"], "--method", method, *common,
          "--out", str(tmp_path / "own.pth")], tmp_path)  # fmt: skip
    cli = [sys.executable, "-m", "kdpipe.cli", "train-student", "--store", tiny_store["path"], "--method", method]
    _run([*cli, *common, "--out", str(tmp_path / "runs"), "--executor", "inline"], tmp_path)
    (latest,) = (tmp_path / "runs").glob("*/checkpoints/latest.pth")
    theirs = torch.load(latest, map_location="cpu", weights_only=True)["model"]
    ours = torch.load(tmp_path / "own.pth", map_location="cpu", weights_only=True)
    assert ours.keys() == theirs.keys()
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not different, f"weights differ from train-student's: {different[:5]}"


def test_api_batches_hold_the_methods_targets(tiny_store):
    store = kdpipe.open_store(tiny_store["path"])
    assert store.manifest.teacher.arch == "resnet8"
    training = store.training(method="letkd2", student="resnet8", epochs=1, batch_size=8, device="cpu")
    model = training.build_student()
    batches = list(training.batches(0))
    assert sum(b.labels.numel() for b in batches) == 32
    first = batches[0]
    assert first.images.dtype == torch.float32 and first.images.shape[0] == 8
    assert set(first.targets) == {k for kind in training.method.kinds() for k in kind.target_keys}
    logits, features = training.forward(model, first.images)
    loss, parts = training.method.loss(logits, features, first.targets, first.labels)
    assert torch.isfinite(loss) and "kd_inter" in parts
    again = list(training.batches(0))  # an epoch's plan is a function of seed and epoch
    assert all(torch.equal(a.indices, b.indices) for a, b in zip(batches, again))
    training.close()


def test_api_errors_are_sentences(tiny_store):
    store = kdpipe.open_store(tiny_store["path"])
    with pytest.raises(kdpipe.KdpipeError):
        store.training(method="no_such_method", student="resnet8")
    training = store.training(method="kd", student="resnet8", epochs=1, device="cpu")
    with pytest.raises(kdpipe.KdpipeError, match="build_student"):
        training.forward(torch.nn.Identity(), torch.zeros(1, 3, 16, 16))
