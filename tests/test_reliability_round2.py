"""Reliability, round two (issue 23 items 5-14): each class of bad input or fault is one
sentence and a non-zero exit before any work, or is handled as docs/RELIABILITY.md says.

Grouped by class: typed config values; counts, sizes and sections; resumes that change
options; reuse of finished students; checkpoints on a full disk; URLs and memory://; two
writers of one target set; a machine with a Ray cluster of its own; drop_last."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from kdpipe.cli import cli
from kdpipe.errors import KdpipeError

TINY = "synthetic:n=32,classes=4,size=16,seed=0"
ROOT = Path(__file__).resolve().parents[1]


def one_sentence(result) -> str:
    """The error line of a refused command: exit 2, no traceback, the last line one sentence."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [x for x in result.output.strip().splitlines() if x.strip()]
    assert lines and lines[-1].startswith("kdpipe: error: "), result.output
    assert sum(x.startswith("kdpipe: error: ") for x in lines) == 1, result.output
    return lines[-1]


def _row(tmp_path, teacher: str, extra: str = "", name: str = "row") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"""
name: {name}
teacher: {{arch: resnet8, checkpoint: "{teacher}"}}
data: "{TINY}"
extract: {{views: "4", cam_res: [2], features: [], shard_size: 16}}
student: {{student: resnet8, method: kd, epochs: 1, batch_size: 16}}
{extra}""")
    return path


# ------------------------------------------------------------------------------ item 8: typed config values
@pytest.mark.parametrize(
    "setting, key, value",
    [
        ("student.epochs=abc", "student.epochs", "'abc'"),
        ("student.lr=[1,2]", "student.lr", "[1, 2]"),
        ("student.lr=fast", "student.lr", "'fast'"),
        ("student.batch_size=1.5", "student.batch_size", "1.5"),
        ("student.nesterov=maybe", "student.nesterov", "'maybe'"),
        ("student.milestones=[a]", "student.milestones", "['a']"),
        ("student.method_options=5", "student.method_options", "5"),
        ("student.method_options.temperature=hot", "temperature", "'hot'"),
        ("cluster.k_penult=abc", "cluster.k_penult", "'abc'"),
        ("cluster.temperature=[3]", "cluster.temperature", "[3]"),
        ("extract.seed=x", "extract.seed", "'x'"),
        ("extract.batch_size={a: 1}", "extract.batch_size", "{'a': 1}"),
    ],
)
def test_set_values_are_typed(cli_runner, tmp_path, setting, key, value):
    row = _row(tmp_path, "t.pth", "cluster: {k_penult: 8}")
    line = one_sentence(
        cli_runner.invoke(cli, ["train-student", "--config", str(row), "--set", setting, "--print-config"])
    )
    assert key in line and value in line and "must be" in line


@pytest.mark.parametrize(
    "solver, key",
    [
        ("{EPOCHS: abc}", "SOLVER.EPOCHS"),
        ("{LR: [1]}", "SOLVER.LR"),
        ("{BATCH_SIZE: many}", "SOLVER.BATCH_SIZE"),
        ("{LR_DECAY_STAGES: 5}", "SOLVER.LR_DECAY_STAGES"),
        ("{MOMENTUM: .nan}", "SOLVER.MOMENTUM"),
    ],
)
def test_reference_solver_values_are_typed(cli_runner, tmp_path, solver, key):
    path = tmp_path / "ref.yaml"
    path.write_text(f'DISTILLER: {{TYPE: "KD", TEACHER: "resnet32x4", STUDENT: "resnet8x4"}}\nSOLVER: {solver}\n')
    line = one_sentence(cli_runner.invoke(cli, ["train-student", "--config", str(path), "--print-config"]))
    assert key in line and "must be" in line


@pytest.mark.parametrize(
    "cls, kwargs, key",
    [
        ("StudentConfig", {"epochs": "abc"}, "student.epochs"),
        ("StudentConfig", {"data_parallel": 0}, "student.data_parallel"),
        ("StudentConfig", {"subset_fraction": 2.0}, "student.subset_fraction"),
        ("StudentConfig", {"amp": "perhaps"}, "student.amp"),
        ("ClusterConfig", {"store": "s", "niter": -1}, "cluster.niter"),
        ("ClusterConfig", {"store": "s", "topk_mass": 0}, "cluster.topk_mass"),
        (
            "ExtractConfig",
            {"teacher": "t", "arch": "a", "data": "d", "out": "o", "shard_size": 0},
            "extract.shard_size",
        ),
        ("ExtractConfig", {"teacher": "t", "arch": "a", "data": "d", "out": "o", "views": [1]}, "extract.views"),
        ("TeacherConfig", {"arch": "resnet8", "lr": "fast"}, "teacher.lr"),
        ("TeacherConfig", {"arch": "resnet8", "momentum": 2}, "teacher.momentum"),
    ],
)
def test_every_config_field_is_typed(cls, kwargs, key):
    from kdpipe.config import configs

    with pytest.raises(KdpipeError, match=key.replace(".", r"\.")):
        getattr(configs, cls)(**kwargs)


def test_typed_values_are_converted():
    from kdpipe.config.configs import ClusterConfig, StudentConfig

    cfg = StudentConfig(epochs="3", lr=1, milestones=[2.0], nesterov="true")
    assert (cfg.epochs, cfg.lr, cfg.milestones, cfg.nesterov) == (3, 1.0, [2], True)
    assert ClusterConfig(store="s", student_grid=[2, 2]).student_grid == (2, 2)


# ------------------------------------------------------------------------------ items 7, 11: counts, sizes, sections
def test_sections_and_counts_are_checked(cli_runner, tmp_path, tiny_store):
    row = _row(tmp_path, tiny_store["teacher"])
    line = one_sentence(cli_runner.invoke(cli, ["run", str(row), "--set", "student=null"]))
    assert "student must be a mapping" in line
    line = one_sentence(cli_runner.invoke(cli, ["run", str(row), "--set", "seeds=[99999999999999999999999]"]))
    assert "seeds" in line
    line = one_sentence(cli_runner.invoke(cli, ["run", str(row), "--set", "paper=3"]))
    assert "paper must be a mapping" in line
    for size in ("-1", "0"):
        line = one_sentence(cli_runner.invoke(cli, ["evaluate", "--checkpoint", "x.pth", "--batch-size", size]))
        assert "--batch-size" in line and size in line
    base = ["--teacher", tiny_store["teacher"], "--arch", "resnet8", "--data", TINY, "--out", str(tmp_path / "s.zarr")]
    line = one_sentence(cli_runner.invoke(cli, ["extract-teacher", *base, "--num-workers", "-1"]))
    assert "num_workers" in line and "-1" in line
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize(
    "command",
    [
        ["extract-teacher", "--teacher", "t.pth", "--arch", "resnet8", "--data", TINY, "--out", "o.zarr"],
        ["train-student", "--store", "s.zarr", "--student", "resnet8", "--method", "kd"],
        ["train-teacher", "--arch", "resnet8", "--data", TINY],
    ],
)
def test_absurd_seeds_are_refused_up_front(cli_runner, tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    line = one_sentence(cli_runner.invoke(cli, [*command, "--seed", "99999999999999999999999"]))
    assert "seed" in line and "9223372036854775807" in line
    assert not list(tmp_path.iterdir())  # nothing was made


@pytest.mark.parametrize("spec", ["synthetic:n=1000000000000", "synthetic:classes=100000000", "synthetic:size=100000"])
def test_absurd_synthetic_sizes_are_refused(spec):
    from kdpipe.data import load_dataset

    with pytest.raises(KdpipeError, match="synthetic"):
        load_dataset(spec, "train")


def test_absurd_picture_and_cam_sizes(cli_runner, tiny_store, tmp_path):
    line = one_sentence(cli_runner.invoke(cli, ["inspect", tiny_store["path"], "--cams", "100000", "--png", "x.png"]))
    assert "--cams" in line and "64" in line
    line = one_sentence(
        cli_runner.invoke(cli, ["inspect", tiny_store["path"], "--fidelity", "--num-samples", "10000000"])
    )
    assert "--num-samples" in line
    out = tmp_path / "big.zarr"
    args = ["--teacher", tiny_store["teacher"], "--arch", "resnet8", "--data", TINY, "--out", str(out)]
    line = one_sentence(cli_runner.invoke(cli, ["extract-teacher", *args, "--cam-res", "64", "--executor", "inline"]))
    assert "--cam-res 64" in line and "larger than the teacher's" in line
    assert not out.exists()


def test_demo_sizes_are_refused_before_any_work(cli_runner, tmp_path):
    out = tmp_path / "demo"
    line = one_sentence(cli_runner.invoke(cli, ["demo", "--out", str(out), "--fast", "--k-penult", "1000000000"]))
    assert "--k-penult" in line
    line = one_sentence(cli_runner.invoke(cli, ["demo", "--out", str(out), "--fast", "--k-penult", "500000"]))
    assert "--k-penult 500000" in line and "penult vectors" in line
    assert not out.exists()


def test_nan_method_options_are_refused_up_front(cli_runner, tmp_path):
    args = ["train-student", "--store", str(tmp_path / "none.zarr"), "--student", "resnet8", "--method", "letkd2"]
    line = one_sentence(cli_runner.invoke(cli, [*args, "--alpha-penult", "nan"]))
    assert "alpha_penult" in line and "nan" in line
    line = one_sentence(cli_runner.invoke(cli, [*args[:-1], "kd", "--temperature", "inf"]))
    assert "temperature" in line


# ------------------------------------------------------------------------------ item 5: resumes that change options
def _interrupted_target_set(path, monkeypatch, name="r"):
    from kdpipe.config.configs import ClusterConfig
    from kdpipe.distributed.teacher_pass import TeacherPassWorker
    from kdpipe.stages.cluster import cluster

    real = TeacherPassWorker.run

    class Killed(Exception):
        pass

    def dies_at_shard_2(self, shard):
        if shard.shard_id == 2 and self.spec.done_array.startswith("targets/"):
            raise Killed
        return real(self, shard)

    monkeypatch.setattr(TeacherPassWorker, "run", dies_at_shard_2)
    with pytest.raises(Killed):
        cfg = ClusterConfig(store=path, name=name, k_penult=8, k_inter=2, topk=4, executor="inline")
        cluster(cfg, progress=False, verbose=False)
    monkeypatch.setattr(TeacherPassWorker, "run", real)


def test_cluster_resume_refuses_changed_options(cli_runner, store_copy, monkeypatch):
    from kdpipe.artifacts import open_store

    path = store_copy["path"]
    _interrupted_target_set(path, monkeypatch)
    base = ["cluster", path, "--name", "r", "--executor", "inline", "--resume"]
    for changed, named in (
        (["--k-penult", "32"], ["--k-penult 32"]),
        (["--topk", "3", "--temperature", "3"], ["--topk 3", "--temperature 3.0"]),
        (["--k-inter", "3"], ["--k-inter 3"]),
        (["--batch-size", "7"], ["--batch-size 7"]),
    ):
        line = one_sentence(cli_runner.invoke(cli, [*base, *changed]))
        assert all(n in line for n in named) and "fitted with" in line, line
    # the options it was fitted with, given again or left out, continue it
    result = cli_runner.invoke(cli, [*base, "--k-penult", "8", "--topk", "4"])
    assert result.exit_code == 0, result.output
    assert "r" in open_store(path).target_sets()


def test_extract_resume_keeps_its_batch_size(cli_runner, store_copy):
    s = store_copy
    args = ["extract-teacher", "--teacher", s["teacher"], "--arch", "resnet8", "--data", TINY, "--out", s["path"]]
    args += ["--cam-res", "2,native", "--shard-size", "8", "--executor", "inline", "--resume"]
    line = one_sentence(cli_runner.invoke(cli, [*args, "--batch-size", "7"]))
    assert "--batch-size 7" in line and "256" in line
    assert cli_runner.invoke(cli, [*args, "--batch-size", "256"]).exit_code == 0
    assert cli_runner.invoke(cli, args).exit_code == 0


# ------------------------------------------------------------------------------ item 6: reuse of finished students
@pytest.mark.slow
def test_run_reuses_a_student_only_of_the_same_store_and_config(tiny_store, tmp_path):
    from kdpipe.workflows.run import run_configs
    from tests.conftest import calibrated_teacher

    row = _row(tmp_path, tiny_store["teacher"], "seeds: [0]")
    kw = dict(out=tmp_path / "runs", stores=tmp_path / "stores", executor="inline", verbose=False)
    first = run_configs([str(row)], **kw)
    assert run_configs([str(row)], **kw)["rows"][0]["run_dirs"] == first["rows"][0]["run_dirs"]  # reused
    # another teacher at the same path: a new store, and a new student trained from it
    torch.save({"model": calibrated_teacher("resnet8", 4, seed=5).state_dict()}, tmp_path / "t2.pth")
    other = _row(tmp_path, str(tmp_path / "t2.pth"), "seeds: [0]")
    second = run_configs([str(other)], **kw)
    assert second["stores_built"] == 1
    assert second["rows"][0]["run_dirs"] != first["rows"][0]["run_dirs"]
    # another resolved config (one more epoch) of the first store: trained again too
    third = run_configs([str(row)], sets=["student.epochs=2"], **kw)
    assert third["rows"][0]["run_dirs"] != first["rows"][0]["run_dirs"]
    saved = json.loads((Path(third["rows"][0]["run_dirs"][0]) / "config.json").read_text())
    assert saved["store_identity"]["teacher_sha256"] and saved["epochs"] == 2


# ------------------------------------------------------------------------------ item 10: checkpoints on a full disk
def test_a_full_disk_while_torch_writes_a_checkpoint(cli_runner, tiny_store, tmp_path, monkeypatch):
    from kdpipe.runs import rundir

    real = rundir.atomic_write_bytes
    calls = {"n": 0}

    class FullDisk:
        """A file that takes 1 kB and then says the disk is full (torch's zip writer sees it)."""

        def __init__(self, fh):
            self.fh, self.written = fh, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 1024:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.fh.write(data)

        def __getattr__(self, name):
            return getattr(self.fh, name)

    def second_latest_fails(path, write):
        if str(path).endswith("latest.pth"):
            calls["n"] += 1
            if calls["n"] == 2:
                return real(path, lambda fh: write(FullDisk(fh)))
        return real(path, write)

    monkeypatch.setattr(rundir, "atomic_write_bytes", second_latest_fails)
    args = ["train-student", "--store", tiny_store["path"], "--student", "resnet8", "--method", "ce"]
    args += ["--epochs", "3", "--batch-size", "16", "--out", str(tmp_path / "runs"), "--device", "cpu"]
    line = one_sentence(cli_runner.invoke(cli, args))
    assert "No space left on device" in line and "latest.pth" in line and "--resume" in line
    monkeypatch.setattr(rundir, "atomic_write_bytes", real)
    (run_dir,) = list((tmp_path / "runs").iterdir())
    assert torch.load(run_dir / "checkpoints" / "latest.pth", weights_only=True)["epoch"] == 1  # the last whole one
    assert not [p for p in (run_dir / "checkpoints").iterdir() if ".tmp-" in p.name]
    assert cli_runner.invoke(cli, ["train-student", "--resume", str(run_dir)]).exit_code == 0


# ------------------------------------------------------------------------------ item 9: URLs
def test_object_store_without_credentials_or_endpoint(cli_runner, monkeypatch):
    pytest.importorskip("s3fs")
    import s3fs

    from kdpipe import storage

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()
    monkeypatch.setattr(storage, "_REACHED", set())
    line = one_sentence(cli_runner.invoke(cli, ["inspect", "s3://kdpipe-no-bucket/store.zarr"]))
    assert "s3://kdpipe-no-bucket/store.zarr" in line and "AWS_ACCESS_KEY_ID" in line
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()
    line = one_sentence(cli_runner.invoke(cli, ["inspect", "s3://kdpipe-no-bucket/store.zarr"]))
    assert "s3://kdpipe-no-bucket/store.zarr" in line and "does not answer" in line
    s3fs.S3FileSystem.clear_instance_cache()


def test_memory_urls_with_ray_workers_are_refused_before_any_worker(cli_runner, tiny_store):
    args = ["extract-teacher", "--teacher", tiny_store["teacher"], "--arch", "resnet8", "--data", TINY]
    line = one_sentence(cli_runner.invoke(cli, [*args, "--out", "memory://kdpipe-r2/s.zarr", "--executor", "ray"]))
    assert "memory://" in line and "--executor inline" in line
    import sys as _sys

    assert "ray" not in _sys.modules or not _sys.modules["ray"].is_initialized()


# ------------------------------------------------------------------------------ item 12: two writers, quiet exits
def test_a_second_cluster_writer_of_one_target_set_is_refused(cli_runner, store_copy):
    from kdpipe import storage

    path = store_copy["path"]
    with storage.writer_lock(path, "the target set 'x'", "kdpipe cluster"):
        line = one_sentence(cli_runner.invoke(cli, ["cluster", path, "--name", "x", "--executor", "inline"]))
    assert "Another kdpipe cluster is writing the target set 'x'" in line
    # released: the same command now runs (another name was never locked)
    args = ["cluster", path, "--name", "x", "--k-penult", "8", "--k-inter", "2", "--topk", "4", "--executor", "inline"]
    assert cli_runner.invoke(cli, args).exit_code == 0


def test_no_asyncio_lines_after_a_clear_error(cli_runner, tmp_path):
    one_sentence(cli_runner.invoke(cli, ["inspect", str(tmp_path / "missing.zarr")]))
    assert logging.getLogger("asyncio").getEffectiveLevel() > logging.CRITICAL
    logging.getLogger("asyncio").setLevel(logging.NOTSET)


# ------------------------------------------------------------------------------ item 13: a machine with a Ray cluster
def _extract_with_ray(tiny_store, env, out: Path) -> None:
    """A plain extract-teacher (Ray executor, no --ray-address) in a fresh process."""
    args = ["extract-teacher", "--teacher", tiny_store["teacher"], "--arch", "resnet8", "--data", TINY]
    args += ["--out", str(out), "--views", "1", "--cam-res", "none", "--features", "none", "--num-workers", "1"]
    proc = subprocess.run(
        [sys.executable, "-m", "kdpipe.cli", *args], env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and (out / "zarr.json").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_a_machine_with_a_stale_or_a_live_ray_cluster(tiny_store):
    """Ray's address file names a dead GCS, then a live `ray start --head` cluster: a plain
    extract-teacher starts and uses its own local Ray both times, and leaves the head alone."""
    pytest.importorskip("ray")
    import shutil
    import signal
    import socket
    import time

    tmp = Path(tempfile.mkdtemp(prefix="kr", dir="/tmp"))  # short: Ray's socket paths
    (tmp / "ray").mkdir()
    address_file = tmp / "ray" / "ray_current_cluster"
    address_file.write_text("127.0.0.1:9")  # stale: nothing listens there
    env = dict(os.environ, RAY_TMPDIR=str(tmp), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    _extract_with_ray(tiny_store, env, tmp / "stale.zarr")

    address_file.unlink()
    with socket.socket() as sock:  # a free loopback port for the head's GCS
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray_bin = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=1"]
        + ["--include-dashboard=false", f"--temp-dir={tmp / 'ray'}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: stopped below with everything it started
    )
    try:
        deadline = time.monotonic() + 120
        while not address_file.exists() and head.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        if not address_file.exists():
            pytest.skip("`ray start --head` did not come up on this machine")
        _extract_with_ray(tiny_store, env, tmp / "live.zarr")
        assert head.poll() is None  # the user's cluster was left alone
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------ item 14: drop_last
def test_drop_last_follows_the_rows_reference(cli_runner):
    from kdpipe.config.config_files import load_row

    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        row = load_row(path, strict=False)
        assert row.student.drop_last is row.student.method.startswith("letkd"), path
    from kdpipe.engine.plan import EpochPlan

    plan = EpochPlan(torch.arange(10), torch.zeros(10, 2, dtype=torch.int32))
    assert [b.size for b in plan.batches(4)] == [4, 4, 2]
    assert [b.size for b in plan.head(8).batches(4)] == [4, 4]


def test_drop_last_drops_the_last_incomplete_batch(tiny_store, tmp_path):
    from kdpipe.config.configs import StudentConfig
    from kdpipe.stages.train import train_student

    def steps(batch_size=12, **kw):
        seen = []
        cfg = StudentConfig(
            store=tiny_store["path"], student="resnet8", method="ce", epochs=1, batch_size=batch_size, **kw
        )
        s = train_student(
            cfg, out=tmp_path / "runs", progress=False, plot=False, on_step=lambda e, i, *a: seen.append(i)
        )
        return len(seen), json.loads((Path(s["run_dir"]) / "config.json").read_text())["drop_last"]

    assert steps() == (3, False)  # 32 images: 12 + 12 + 8, as mdistiller
    assert steps(drop_last=True) == (2, True)  # 12 + 12, as letKD's reference
    with pytest.raises(KdpipeError, match="drop_last"):
        steps(drop_last=True, batch_size=64)
