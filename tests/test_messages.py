"""What a newcomer reads (issue 24): each message that changed, checked on tiny inputs."""

import json
from types import SimpleNamespace

import pytest
import torch

from kdpipe.cli import cli


def test_print_config_prints_every_setting_once(cli_runner):
    args = ["train-student", "--student", "resnet8", "--method", "cat_kd", "--data", "digits", "--epochs", "2"]
    result = cli_runner.invoke(cli, [*args, "--print-config"])
    assert result.exit_code == 0, result.output
    settings = json.loads(result.output)
    assert "config" not in settings  # no second copy of the given settings
    assert settings["epochs"] == 2 and settings["milestones"] == [1, 2, 2] and settings["subset_seed"] is not None


def test_print_config_prints_even_when_the_store_does_not_match(cli_runner, tmp_path):
    missing = str(tmp_path / "no-such-store.zarr")
    args = ["train-student", "--store", missing, "--student", "resnet8", "--method", "cat_kd", "--data", "digits"]
    result = cli_runner.invoke(cli, [*args, "--print-config"])
    assert result.exit_code == 2
    text = result.output
    settings = json.loads(text[: text.index("\n}\n") + 2])
    assert settings["student"] == "resnet8" and settings["store_mismatch"]
    assert [line for line in text.splitlines() if line.startswith("kdpipe: error: The store does not fit")]


def test_sweep_table_says_unfinished_not_failed():
    from kdpipe.workflows.sweep import aggregate, markdown_table

    rows = [
        {"beta": 1, "seed": 0, "status": "ok", "final_top1": 50.0, "best_top1": 51.0},
        {"beta": 1, "seed": 1, "status": "unfinished"},
        {"beta": 2, "seed": 0, "status": "error: boom"},
    ]
    md = markdown_table(aggregate(rows, ["beta"]), ["beta"], {}, {"beta": [1, 2], "seed": [0, 1]})
    assert "| 1 | 1 (1 unfinished) |" in md and "| 2 | 0 (1 failed) |" in md


def test_interrupted_sweep_says_how_to_continue(capsys):
    from kdpipe.cli import _echo_sweep

    rows = [{"status": "ok", "reused": True}, {"status": "unfinished", "reused": False}]
    _echo_sweep(
        {"markdown": "", "rows": rows, "results_csv": "c", "results_md": "m", "sweep_dir": "/s", "unfinished": 1}
    )
    out = capsys.readouterr().out
    assert "done" not in out and "stopped with 1 of 2 trials unfinished" in out
    assert "kdpipe train-student --resume /s" in out


def test_resumed_sweep_bar_counts_restored_trials():
    from kdpipe.workflows.sweep_tune import SweepCallback

    cb = SweepCallback(total=4, progress=False)
    cb.setup()
    trials = [SimpleNamespace(status=s) for s in ("TERMINATED", "TERMINATED", "PENDING", "PENDING")]
    cb.on_step_begin(0, trials)
    assert cb.bar.n == 2


def test_tune_restore_hint_hidden_unless_verbose(monkeypatch):
    import logging

    from kdpipe.workflows.sweep_tune import _quiet_tune

    monkeypatch.delenv("KDPIPE_VERBOSE", raising=False)
    with _quiet_tune():
        assert logging.getLogger("ray.tune.tune").level == logging.ERROR
    monkeypatch.setenv("KDPIPE_VERBOSE", "1")
    with _quiet_tune():
        assert logging.getLogger("ray.tune.tune").level != logging.ERROR


def test_ctrl_c_is_one_line(cli_runner, monkeypatch):
    import kdpipe.stages.evaluate as ev

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ev, "evaluate", interrupted)
    result = cli_runner.invoke(cli, ["evaluate", "--checkpoint", "x.pth", "--arch", "resnet8", "--data", "digits"])
    assert result.exit_code == 130 and "Traceback" not in result.output
    assert [line for line in result.output.splitlines() if line.strip()] == [
        line for line in result.output.splitlines() if line.startswith("kdpipe: interrupted")
    ]


def test_run_table_marks_overridden_rows_and_single_seeds():
    from kdpipe.workflows.run import _markdown, overridden_keys

    assert overridden_keys(["seeds=[0,1]", "teacher.checkpoint=/t.pth"]) == []
    assert overridden_keys(["teacher.arch=resnet20"]) == ["teacher.arch"]
    row = {
        "config": "catkd-x",
        "overridden": "teacher.arch",
        "teacher": "resnet20",
        "student": "resnet8",
        "method": "cat_kd",
        "seeds": 1,
        "final_top1_mean": 70.0,
        "final_top1_std": 0.0,
        "best_top1_mean": 71.0,
        "best_top1_std": 0.0,
        "paper_top1": None,
    }
    md = _markdown([row])
    assert "catkd-x (overridden: teacher.arch)" in md and "70.00 (1 seed)" in md
    assert "± 0.00" not in md and md.splitlines()[6].endswith("(1 seed) |  |")


def test_missing_teacher_names_the_key(tmp_path, monkeypatch):
    from kdpipe.errors import KdpipeError
    from kdpipe.workflows.run import run_configs

    monkeypatch.setenv("KDPIPE_TEACHERS", str(tmp_path))
    monkeypatch.setenv("KDPIPE_CIFAR100", str(tmp_path))
    row = sorted((__import__("pathlib").Path(__file__).parents[1] / "configs" / "cifar100" / "cat_kd").glob("*.yaml"))[
        0
    ]
    with pytest.raises(KdpipeError, match="--set teacher.checkpoint=PATH.*KDPIPE_TEACHERS"):
        run_configs([str(row)], out=str(tmp_path / "runs"), verbose=False)


def test_work_size_and_first_shard_lines(monkeypatch):
    import kdpipe.distributed.executor as ex
    from kdpipe.stages.extract import work_line

    shards = [SimpleNamespace(size=1000), SimpleNamespace(size=1000)]
    assert work_line("resnet20", shards, 162) == (
        "extract-teacher: 2,000 images x 162 views = 324,000 resnet20 passes in 2 shards "
        "(an estimate follows the first shard)"
    )
    monkeypatch.setattr(ex, "_has_gpu", lambda: False)
    line = ex.first_shard_line("extract resnet20", 1800.0, 1000, 4000, "--views 8")
    assert "about 1 h 30 min left" in line and "--views 8 makes a quick trial" in line
    assert "quick trial" not in ex.first_shard_line("extract resnet20", 10.0, 1000, 4000, "--views 8")


def test_schedule_line():
    from kdpipe.engine.schedule import describe_schedule, milestones

    assert describe_schedule(0.05, 2, milestones(2)).startswith("lr 0.05 (epoch 1), then 0.005 (epoch 2)")


def test_loss_scale_warning_names_the_option():
    from kdpipe.engine.loop import loss_scale_warning
    from kdpipe.engine.student import weight_options

    assert weight_options({"beta": 15.0, "ce_weight": 1.0, "resolution": 2}) == ["beta"]
    assert weight_options({"kd": {"kd_weight": 1.0}, "at": {"feat_weight": 1000.0}}) == ["feat_weight", "kd_weight"]
    msg = loss_scale_warning({"train_loss": 447.0, "loss_ce": 2.3}, ["beta"])
    assert "--beta" in msg and "193-fold" in msg
    assert loss_scale_warning({"train_loss": 4.0, "loss_ce": 2.3}, ["beta"]) is None


def test_teacher_run_directory_is_taken_as_its_checkpoint(tmp_path):
    from kdpipe.runs.paths import checkpoint_in, teacher_checkpoint_name

    run = tmp_path / "teacher-run"
    ckpt = run / teacher_checkpoint_name("resnet8", 3)
    ckpt.parent.mkdir(parents=True)
    torch.save({"model": {}}, ckpt)
    (run / "config.json").write_text(json.dumps({"stage": "train-teacher", "arch": "resnet8", "epochs": 3}))
    assert checkpoint_in(str(run)) == str(ckpt)
    assert checkpoint_in(str(ckpt)) == str(ckpt)


def test_extract_teacher_takes_a_run_directory(cli_runner, tmp_path):
    run = tmp_path / "teacher-run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"stage": "train-teacher", "arch": "resnet8", "epochs": 3}))
    args = ["extract-teacher", "--teacher", str(run), "--arch", "resnet8", "--data", "digits", "--out", str(tmp_path)]
    result = cli_runner.invoke(cli, args)
    assert result.exit_code == 2 and "holds no checkpoint yet" in result.output  # the folder was read as a run


def test_subclass_panel_shows_a_few_class_blocks_of_many():
    import numpy as np

    from kdpipe.runs.plots import MAX_BLOCKS, shown_blocks

    K, C = 2, 100
    rows = np.zeros((K, C * K))
    rows[0, 7 * K] = 0.9  # class 3's sub-class 0 scores class 7 highly
    blocks = shown_blocks(rows, 3, K)
    assert len(blocks) == MAX_BLOCKS and 3 in blocks and 7 in blocks and blocks == sorted(blocks)
    assert shown_blocks(np.zeros((K, 10 * K)), 3, K) == list(range(10))


def test_time_left_after_the_first_epoch(capsys):
    from kdpipe.engine.loop import _say_time_left

    _say_time_left("resnet8 cat_kd", 20.0, 239, "cpu")
    out = capsys.readouterr().out
    assert "about 1:19:40 of training left" in out and "--subset-fraction" in out
    _say_time_left("resnet8 cat_kd", 5.0, 3, "cpu")
    assert "quick trial" not in capsys.readouterr().out


def test_interrupted_teacher_pass_is_one_sentence():
    from kdpipe.distributed.teacher_pass import _fail_resumable
    from kdpipe.errors import KdpipeError

    writer = SimpleNamespace(
        path="/s.zarr",
        done_shards=lambda name: [0],
        array=lambda name: SimpleNamespace(shape=(4,)),
        mark_incomplete=lambda: None,
    )
    with pytest.raises(KdpipeError, match=r"interrupted.*1 of 4 shards written.*--resume"):
        _fail_resumable(writer, SimpleNamespace(done_array="shards_done"), KeyboardInterrupt())
