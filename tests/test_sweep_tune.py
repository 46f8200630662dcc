"""Sweeps: Ray Tune grids, per-trial resources from the cluster's, resume without reruns.

The Ray tests run 2x2 one-epoch resnet8 trials of the session's tiny store on a local
2-CPU Ray; the others check the resources handed to Tune with a stand-in cluster (no Ray).
"""

import contextlib
import csv
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kdpipe.cli import cli
from kdpipe.config.configs import StudentConfig
from kdpipe.errors import KdpipeError
from kdpipe.workflows.sweep import SweepKilled, SweepOptions, parse_sweep, resume_sweep, run_sweep, run_trial

GRID = ["beta=1,2", "seed=0,1"]


def _base(store, **kw):
    fields = dict(store=store["path"], student="resnet8", method="cat_kd", epochs=1, batch_size=8)
    fields.update(kw)
    return StudentConfig(**fields)


def _trial_dirs(sweep_dir) -> dict:
    """{trial number: [its run directories]} in a sweep directory."""
    out: dict = {}
    for p in sorted(Path(sweep_dir).iterdir()):
        if p.is_dir() and p.name.startswith("trial-"):
            out.setdefault(int(p.name.split("-")[1]), []).append(p)
    return out


def _stamps(run_dir: Path) -> dict:
    return {
        name: (run_dir / name).stat().st_mtime_ns
        for name in ("summary.json", "metrics.csv", "config.json", "checkpoints/latest.pth")
    }


# ------------------------------------------------------------------------------ resources (no Ray)
def test_trial_resources_follow_the_cluster():
    from kdpipe.workflows.sweep_tune import trial_resources

    assert trial_resources({"CPU": 8, "GPU": 2}) == {"cpu": 1.0, "gpu": 1.0}  # a whole GPU by default
    assert trial_resources({"CPU": 8, "GPU": 2}, 0.25, 2) == {"cpu": 2.0, "gpu": 0.25}
    assert trial_resources({"CPU": 2}) == {"cpu": 1.0, "gpu": 0.0}  # no GPU in the cluster: CPUs
    assert trial_resources({"CPU": 8, "GPU": 2}, device="cpu") == {"cpu": 1.0, "gpu": 0.0}
    with pytest.raises(KdpipeError, match="Ray cluster has none"):
        trial_resources({"CPU": 2}, 0.25)
    with pytest.raises(KdpipeError, match="between 0 and 1"):
        trial_resources({"CPU": 8, "GPU": 4}, 2)
    with pytest.raises(KdpipeError, match="at most the Ray cluster's 2 CPUs"):
        trial_resources({"CPU": 2}, 0, 4)


class _Recorder:
    """Stands in for Ray: a cluster with the given resources, and Tune calls recorded."""

    def __init__(self, monkeypatch, cluster: dict):
        from ray import tune

        import kdpipe.workflows.sweep_tune as st

        self.calls: dict = {}
        fake_ray = SimpleNamespace(cluster_resources=lambda: dict(cluster))
        monkeypatch.setattr(st, "ray_cluster", lambda *a, **k: contextlib.nullcontext(fake_ray))
        monkeypatch.setattr(tune, "with_parameters", self._with_parameters)
        monkeypatch.setattr(tune, "with_resources", self._with_resources)
        monkeypatch.setattr(st, "make_tuner", lambda *a, **k: SimpleNamespace(fit=lambda: []))
        # the driver's own devices must not matter
        monkeypatch.setattr(torch.cuda, "is_available", lambda: not cluster.get("GPU"))

    def _with_parameters(self, fn, **kw):
        self.calls["params"] = kw
        return fn

    def _with_resources(self, fn, resources):
        self.calls["resources"] = resources
        return fn


def test_gpu_use_is_decided_from_the_cluster_not_the_driver(monkeypatch, tiny_store, tmp_path):
    from kdpipe.workflows.sweep_tune import run_tune

    points = [{"seed": 0}]
    rec = _Recorder(monkeypatch, {"CPU": 16, "GPU": 1})  # a CPU-only driver on a GPU cluster
    run_tune(str(tmp_path), _base(tiny_store), {"seed": [0]}, points, SweepOptions())
    assert rec.calls["resources"] == {"cpu": 1.0, "gpu": 1.0} and rec.calls["params"]["device"] == "cuda"
    rec = _Recorder(monkeypatch, {"CPU": 16})  # a GPU driver on a CPU cluster
    run_tune(str(tmp_path), _base(tiny_store), {"seed": [0]}, points, SweepOptions())
    assert rec.calls["resources"] == {"cpu": 1.0, "gpu": 0.0} and rec.calls["params"]["device"] == "cpu"


def test_cli_gpus_per_trial_reaches_tune_resources(monkeypatch, cli_runner, tiny_store, tmp_path):
    rec = _Recorder(monkeypatch, {"CPU": 8, "GPU": 1})
    r = cli_runner.invoke(
        cli,
        [
            "train-student",
            "--store",
            tiny_store["path"],
            "--student",
            "resnet8",
            "--method",
            "cat_kd",
            "--sweep",
            "seed=0,1",
            "--gpus-per-trial",
            "0.25",
            "--cpus-per-trial",
            "2",
            "--out",
            str(tmp_path),
        ],
    )
    assert rec.calls["resources"] == {"cpu": 2.0, "gpu": 0.25}
    assert rec.calls["params"]["threads"] == 2
    assert r.exit_code == 2 and "No trial of the sweep" in r.output  # the stand-in Tuner ran nothing


def test_sweep_refuses_repeated_values_and_data_parallel(tiny_store, tmp_path):
    with pytest.raises(KdpipeError, match="lists 1 twice"):
        parse_sweep(["beta=1,1"])
    with pytest.raises(KdpipeError, match="leave out --gpus"):
        run_sweep(_base(tiny_store, data_parallel=2), {"seed": [0]}, out=tmp_path)


# ------------------------------------------------------------------------------ inline executor
def test_inline_sweep_resumes_without_rerunning_finished_trials(monkeypatch, tiny_store, tmp_path):
    with pytest.raises(SweepKilled):
        run_sweep(
            _base(tiny_store),
            {"seed": [0, 1]},
            out=tmp_path,
            options=SweepOptions(executor="inline", progress=False, stop_after=1),
        )
    (sweep_dir,) = tmp_path.iterdir()
    (first,) = _trial_dirs(sweep_dir)[0]
    before = _stamps(first)
    r = resume_sweep(sweep_dir, SweepOptions(executor="inline", progress=False))
    assert [row["status"] for row in r["rows"]] == ["ok", "ok"]
    assert [row["reused"] for row in r["rows"]] == [True, False]
    assert _stamps(first) == before and {n: len(d) for n, d in _trial_dirs(sweep_dir).items()} == {0: 1, 1: 1}


def test_an_interrupted_trial_continues_from_its_last_epoch(tiny_store, tmp_path):
    from kdpipe.stages.train import train_student

    class Killed(Exception):
        pass

    def kill(epoch):
        raise Killed

    cfg = _base(tiny_store, epochs=2, lr=0.01, method_options={"beta": 1.0})
    with pytest.raises(Killed):
        train_student(cfg, out=tmp_path, progress=False, plot=False, run_prefix="trial-000-seed=0", after_epoch=kill)
    (run_dir,) = _trial_dirs(tmp_path)[0]
    row = run_trial(str(tmp_path), 0, {"seed": 0}, cfg)
    assert row["status"] == "ok" and row["run_dir"] == str(run_dir) and not row["reused"]
    with open(run_dir / "metrics.csv", newline="") as fh:
        assert [r["epoch"] for r in csv.DictReader(fh)] == ["1", "2"]


# ------------------------------------------------------------------------------ Ray Tune
@pytest.mark.ray
@pytest.mark.slow
def test_tune_sweep_killed_after_a_trial_resumes_without_rerunning_it(monkeypatch, cli_runner, tiny_store, tmp_path):
    out = tmp_path / "shared"
    with pytest.raises(SweepKilled):  # the driver stops abruptly once one trial finished
        run_sweep(
            _base(tiny_store),
            parse_sweep(GRID),
            out=out,
            options=SweepOptions(num_cpus=2, progress=False, stop_after=1),
        )
    (sweep_dir,) = out.iterdir()
    assert (sweep_dir / "tune").is_dir()  # Tune's experiment, on the same storage
    finished = {n: dirs[-1] for n, dirs in _trial_dirs(sweep_dir).items() if (dirs[-1] / "summary.json").is_file()}
    assert finished, "no trial finished before the stop"
    before = {n: _stamps(d) for n, d in finished.items()}

    r = cli_runner.invoke(cli, ["train-student", "--resume", str(sweep_dir)])
    assert r.exit_code == 0, r.output
    assert "| beta | n | final top-1 (%) | best top-1 (%) |" in r.output
    with open(sweep_dir / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted((row["beta"], row["seed"]) for row in rows) == [("1", "0"), ("1", "1"), ("2", "0"), ("2", "1")]
    assert all(row["status"] == "ok" for row in rows), rows
    for row in rows:  # every trial's run directory is in the sweep directory, not Tune's trial folder
        assert Path(row["run_dir"]).parent == sweep_dir
    dirs = _trial_dirs(sweep_dir)
    for n, run_dir in finished.items():  # finished trials: not run again, nothing rewritten
        assert dirs[n] == [run_dir] and _stamps(run_dir) == before[n]
        assert {row["run_dir"]: row["reused"] for row in rows}[str(run_dir)] == "True"
    md = (sweep_dir / "results.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert len(table) == 2 and all(
        line.count("±") == 2 and line.startswith(("| 1 | 2 |", "| 2 | 2 |")) for line in table
    )
    assert os.path.isfile(sweep_dir / "summary.json")
