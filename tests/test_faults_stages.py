"""Bad input and faults in the stages (train-teacher, train-student, sweeps, demo, extract,
cluster): each ends in one sentence and exit 2, never a traceback, and loses nothing finished.
"""

import errno
import json

import torch

from kdpipe.cli import cli
from kdpipe.runs.rundir import RunDir

TEACH = "synthetic:n=16,classes=4,size=16,seed=0"


def one_sentence(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("kdpipe: error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def _student_args(store, tmp_path, *extra):
    return [
        "train-student",
        "--store",
        store["path"],
        "--student",
        "resnet8",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--out",
        str(tmp_path / "runs"),
        *extra,
    ]


def test_read_only_output_folder(cli_runner, tiny_store, tmp_path, monkeypatch):
    def read_only(*a, **kw):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "runs"))

    monkeypatch.setattr(RunDir, "create", read_only)
    line = one_sentence(cli_runner.invoke(cli, _student_args(tiny_store, tmp_path, "--method", "ce")))
    assert "Read-only file system" in line and "runs" in line
    line = one_sentence(
        cli_runner.invoke(
            cli,
            ["train-teacher", "--arch", "resnet8", "--data", TEACH, "--epochs", "1", "--out", str(tmp_path / "runs")],
        )
    )
    assert "Read-only" in line


def test_read_only_store_folder(cli_runner, tiny_store, tmp_path, monkeypatch):
    from kdpipe.artifacts import StoreWriter

    def read_only(*a, **kw):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "s.zarr"))

    monkeypatch.setattr(StoreWriter, "create", read_only)
    line = one_sentence(
        cli_runner.invoke(
            cli,
            [
                "extract-teacher",
                "--teacher",
                tiny_store["teacher"],
                "--arch",
                "resnet8",
                "--data",
                TEACH,
                "--out",
                str(tmp_path / "s.zarr"),
                "--executor",
                "inline",
            ],
        )
    )
    assert "Permission denied" in line


def test_full_disk_while_saving_a_checkpoint_loses_nothing(cli_runner, tiny_store, tmp_path, monkeypatch):
    """The second epoch's checkpoint cannot be written: one sentence; the first epoch's
    checkpoint is intact and --resume finishes the run."""
    real = RunDir.save_checkpoint
    calls = {"n": 0}

    def full_disk(self, state, name="latest.pth"):
        if name == "latest.pth":
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device", str(self.checkpoint_dir / name))
        return real(self, state, name)

    monkeypatch.setattr(RunDir, "save_checkpoint", full_disk)
    args = _student_args(tiny_store, tmp_path, "--method", "ce")
    args[args.index("--epochs") + 1] = "3"
    line = one_sentence(cli_runner.invoke(cli, args))
    assert "No space left on device" in line and "--resume" in line
    monkeypatch.setattr(RunDir, "save_checkpoint", real)
    (run_dir,) = list((tmp_path / "runs").iterdir())
    state = torch.load(run_dir / "checkpoints" / "latest.pth", weights_only=True)
    assert state["epoch"] == 1
    result = cli_runner.invoke(cli, ["train-student", "--resume", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert torch.load(run_dir / "checkpoints" / "latest.pth", weights_only=True)["epoch"] == 3


def test_resume_of_a_garbage_or_foreign_run_directory(cli_runner, tiny_store, tmp_path):
    result = cli_runner.invoke(cli, _student_args(tiny_store, tmp_path, "--method", "ce"))
    assert result.exit_code == 0, result.output
    (run_dir,) = list((tmp_path / "runs").iterdir())
    line = one_sentence(cli_runner.invoke(cli, ["train-teacher", "--resume", str(run_dir)]))
    assert "not a train-teacher run directory" in line
    (run_dir / "config.json").write_text("{ not json")
    line = one_sentence(cli_runner.invoke(cli, ["train-student", "--resume", str(run_dir)]))
    assert "config.json" in line
    (run_dir / "config.json").write_text(json.dumps({"stage": "train-student", "config": "lots"}))
    line = one_sentence(cli_runner.invoke(cli, ["train-student", "--resume", str(run_dir)]))
    assert "damaged" in line


def test_sweep_values_of_the_wrong_type(cli_runner, tiny_store, tmp_path):
    line = one_sentence(
        cli_runner.invoke(
            cli,
            _student_args(tiny_store, tmp_path, "--method", "cat_kd", "--sweep", "beta=a,b", "--executor", "inline"),
        )
    )
    assert "beta" in line and "'a'" in line
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # refused before any trial


def test_demo_refuses_before_any_work(cli_runner, tmp_path):
    afile = tmp_path / "file"
    afile.write_text("x")
    line = one_sentence(cli_runner.invoke(cli, ["demo", "--out", str(afile)]))
    assert "is a file" in line
    line = one_sentence(cli_runner.invoke(cli, ["demo", "--out", str(tmp_path / "d"), "--views", "1000"]))
    assert "81 distinct views" in line
    line = one_sentence(cli_runner.invoke(cli, ["demo", "--out", str(tmp_path / "d"), "--student-epochs", "0"]))
    assert "--student-epochs" in line
    assert not (tmp_path / "d").exists()  # nothing was trained or written


def test_a_store_of_the_test_split_is_refused_for_training(cli_runner, tiny_store, tmp_path):
    out = tmp_path / "test.zarr"
    result = cli_runner.invoke(
        cli,
        [
            "extract-teacher",
            "--teacher",
            tiny_store["teacher"],
            "--arch",
            "resnet8",
            "--data",
            tiny_store["data"],
            "--split",
            "test",
            "--out",
            str(out),
            "--views",
            "1",
            "--executor",
            "inline",
            "--features",
            "none",
        ],
    )
    assert result.exit_code == 0, result.output
    line = one_sentence(
        cli_runner.invoke(
            cli,
            [
                "train-student",
                "--store",
                str(out),
                "--student",
                "resnet8",
                "--method",
                "kd",
                "--epochs",
                "1",
                "--out",
                str(tmp_path),
            ],
        )
    )
    assert "test split" in line


def test_resume_refuses_options_that_differ(cli_runner, tiny_store, tmp_path):
    result = cli_runner.invoke(cli, _student_args(tiny_store, tmp_path, "--method", "ce"))
    (run_dir,) = list((tmp_path / "runs").iterdir())
    line = one_sentence(
        cli_runner.invoke(cli, ["train-student", "--resume", str(run_dir), "--method", "kd", "--epochs", "6"])
    )
    assert "--method" in line and "--epochs" in line
    result = cli_runner.invoke(
        cli, ["train-teacher", "--arch", "resnet8", "--data", TEACH, "--epochs", "1", "--out", str(tmp_path / "t")]
    )
    assert result.exit_code == 0, result.output
    (teacher_dir,) = list((tmp_path / "t").iterdir())
    line = one_sentence(cli_runner.invoke(cli, ["train-teacher", "--resume", str(teacher_dir), "--arch", "resnet20"]))
    assert "--arch" in line
