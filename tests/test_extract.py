"""extract-teacher: exactness against the online teacher, inline == Ray, fault tolerance, bad input."""

import errno
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdpipe.artifacts import StoreWriter, open_store
from kdpipe.cli import cli
from kdpipe.config.configs import ExtractConfig
from kdpipe.data import load_dataset, normalize
from kdpipe.distributed.executor import KillWorkerOnce
from kdpipe.errors import KdpipeError, StoreError
from kdpipe.models import build, load_teacher
from kdpipe.stages.extract import extract_teacher as run_extract
from kdpipe.views import view_table

DATA = "synthetic:n=48,classes=10,seed=3"
ARCH = "resnet8"
ARRAYS = ["views", "labels", "logits", "cam", "cam_r2", "cam_r4", "feat/penult", "feat/inter"]
OPTS = dict(views="2", cam_res=(2, 4), native_cam=True, shard_size=16, batch_size=32, seed=5)


def extract_teacher(teacher, arch, data, out, fault=None, **kw):
    """The stage with this module's defaults: a config from keyword arguments, quiet."""
    return run_extract(
        ExtractConfig(teacher=str(teacher), arch=arch, data=data, out=str(out), **kw),
        progress=False,
        verbose=False,
        fault=fault,
    )


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Two cores shared by several test processes: one torch thread each avoids OpenMP
    # oversubscription, and makes inline and Ray workers (1 CPU each) compute identically.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = build(ARCH, 10)
    # non-trivial BN statistics so the teacher is not near-constant
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("ckpt") / "resnet8.pth"
    torch.save({"model": model.state_dict()}, path)
    return str(path)


@pytest.fixture(scope="module")
def reference(ckpt, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref") / "ref.zarr")
    summary = extract_teacher(ckpt, ARCH, DATA, out, executor="inline", **OPTS)
    return out, summary


def _same_arrays(a, b):
    ra, rb = open_store(a), open_store(b)
    for name in ARRAYS:
        np.testing.assert_array_equal(ra[name][:], rb[name][:], err_msg=name)
    assert ra.manifest.shards_done == rb.manifest.shards_done == (0, 1, 2)


def test_stored_targets_equal_the_online_teacher(ckpt, reference):
    out, summary = reference
    assert summary["samples"] == 48 and summary["views"] == 2 and summary["shards"] == 3
    r = open_store(out)
    ds = load_dataset(DATA)
    r.check_dataset(ds)
    r.check_teacher(ckpt)
    assert r.manifest.views.mode == "2" and r.manifest.layers == ("penult", "inter")
    views = r["views"][:]
    np.testing.assert_array_equal(views, view_table(ds.policy, 48, "2", seed=5))
    assert (views[:, 0] != views[:, 1]).any()  # two different views per sample
    np.testing.assert_array_equal(r["labels"][:], ds.labels)
    teacher = load_teacher(ARCH, ckpt, 10)
    bias = teacher.head().bias.detach().numpy()
    rng = np.random.default_rng(0)
    picks = [(int(i), int(v)) for i, v in zip(rng.choice(48, 8, replace=False), rng.integers(0, 2, 8))]
    for i, v in picks:
        x = ds.policy.apply_images(ds.get_batch([i]), torch.from_numpy(views[i, v][None]))
        with torch.no_grad():
            logits, feats = teacher.forward_features(normalize(x, ds.mean, ds.std))
        tol = dict(rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(r["logits"][i, v].astype(np.float32), logits[0].numpy(), **tol)
        cam = r["cam"][i, v].astype(np.float32)
        np.testing.assert_allclose(cam, feats["cam"][0].numpy(), **tol)
        for res in (2, 4):
            pooled = F.adaptive_avg_pool2d(torch.from_numpy(cam), res).numpy()
            np.testing.assert_allclose(r[f"cam_r{res}"][i, v].astype(np.float32), pooled, **tol)
        np.testing.assert_allclose(
            cam.mean(axis=(1, 2)) + bias, r["logits"][i, v].astype(np.float32), rtol=2e-3, atol=4e-3
        )
    # raw features: the identity view only (letKD's fit set), [N, 1, D, h, w]
    assert r["feat/penult"].shape[1] == 1 and r.manifest.views.feature_views == "identity"
    ident = torch.from_numpy(ds.policy.identity()[None])
    for i, _ in picks:
        x = ds.policy.apply_images(ds.get_batch([i]), ident)
        with torch.no_grad():
            _, feats = teacher.forward_features(normalize(x, ds.mean, ds.std))
        for layer in ("penult", "inter"):
            np.testing.assert_allclose(
                r[f"feat/{layer}"][i, 0].astype(np.float32), feats[layer][0].numpy(), rtol=4e-3, atol=4e-3
            )


def test_resume_after_the_driver_is_killed(ckpt, reference, tmp_path):
    out = str(tmp_path / "s.zarr")
    marker = tmp_path / "killed"
    code = (
        f"from kdpipe.stages.extract import extract_teacher; from kdpipe.config.configs import ExtractConfig; "
        f"from kdpipe.distributed.executor import KillWorkerOnce; "
        f"import torch; torch.set_num_threads(1); extract_teacher(ExtractConfig({ckpt!r}, {ARCH!r}, {DATA!r}, "
        f"{out!r}, executor='inline', **{OPTS!r}), progress=False, fault=KillWorkerOnce(2, {str(marker)!r}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and marker.exists(), proc.stderr[-2000:]  # died at shard 2
    with pytest.raises(StoreError, match=r"incomplete \(2 of 3 shards"):
        open_store(out)
    with pytest.raises(StoreError, match=r"other settings .*views"):
        extract_teacher(ckpt, ARCH, DATA, out, executor="inline", resume=True, **dict(OPTS, views="3"))
    summary = extract_teacher(
        ckpt, ARCH, DATA, out, executor="inline", resume=True, **dict(OPTS, shard_size=None)
    )  # the store's shard size is used
    assert summary["shards_run"] == 1
    _same_arrays(out, reference[0])
    again = extract_teacher(ckpt, ARCH, DATA, out, executor="inline", resume=True, **OPTS)
    assert again["shards_run"] == 0


def test_write_error_leaves_the_store_incomplete(ckpt, tmp_path, monkeypatch):
    out = str(tmp_path / "s.zarr")
    real = StoreWriter.write_rows

    def failing(self, name, start, data):
        if name == "logits" and start >= 16:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, name, start, data)

    monkeypatch.setattr(StoreWriter, "write_rows", failing)
    with pytest.raises(StoreError, match=r"No space left on device.*incomplete \(1 of 3 shards.*--resume"):
        extract_teacher(ckpt, ARCH, DATA, out, executor="inline", **OPTS)
    with pytest.raises(StoreError, match="incomplete"):
        open_store(out)
    m = open_store(out, allow_incomplete=True).manifest
    assert m.complete is False and m.shards_done == (0,)


def test_nan_teacher_is_refused(tmp_path):
    model = build(ARCH, 10)
    with torch.no_grad():
        model.head().weight[0, 0] = float("nan")
    ck = tmp_path / "nan.pth"
    torch.save({"model": model.state_dict()}, ck)
    out = str(tmp_path / "s.zarr")
    with pytest.raises(KdpipeError, match="NaN"):
        extract_teacher(str(ck), ARCH, DATA, out, executor="inline", **OPTS)
    assert open_store(out, allow_incomplete=True).manifest.complete is False


def _one_line_error(result):
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("kdpipe: error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_bad_input_gets_one_line_and_exit_2(cli_runner, ckpt, reference, tmp_path):
    base = ["extract-teacher", "--teacher", ckpt, "--executor", "inline", "--shard-size", "16"]
    out = str(tmp_path / "new.zarr")
    line = _one_line_error(cli_runner.invoke(cli, base + ["--arch", "resnet14", "--data", DATA, "--out", out]))
    assert "resnet8" in line and "resnet14" in line
    line = _one_line_error(
        cli_runner.invoke(cli, base + ["--arch", ARCH, "--data", f"cifar10:{tmp_path}/nope", "--out", out])
    )
    assert "nope" in line
    line = _one_line_error(cli_runner.invoke(cli, base + ["--arch", ARCH, "--data", DATA, "--out", reference[0]]))
    assert "already exists" in line and "--overwrite" in line
    line = _one_line_error(
        cli_runner.invoke(cli, base + ["--arch", ARCH, "--data", DATA, "--out", out, "--features", "penult,logitz"])
    )
    assert "logitz" in line
    line = _one_line_error(
        cli_runner.invoke(
            cli, base + ["--arch", ARCH, "--data", DATA, "--out", out, "--teacher", str(tmp_path / "missing.pth")]
        )
    )
    assert "missing.pth" in line
    assert not os.path.exists(out)  # nothing was created by any refused run


def test_cli_extracts_and_overwrites(cli_runner, ckpt, tmp_path):
    out = str(tmp_path / "s.zarr")
    args = [
        "extract-teacher",
        "--teacher",
        ckpt,
        "--arch",
        ARCH,
        "--data",
        "synthetic:n=16,classes=10",
        "--out",
        out,
        "--executor",
        "inline",
        "--views",
        "1",
        "--cam-res",
        "2",
        "--features",
        "penult",
        "--shard-size",
        "8",
    ]
    result = cli_runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "compression" in result.output and "img/s" in result.output
    r = open_store(out)
    assert r.has("feat/penult") and not r.has("feat/inter") and r["cam_r2"].shape == (16, 1, 10, 2, 2)
    assert not r.has("cam")  # the native CAM only when asked for (--cam-res native,...)
    assert cli_runner.invoke(cli, args + ["--overwrite"]).exit_code == 0


def test_default_store_holds_every_view_and_identity_features(ckpt, tmp_path):
    """--views auto: every one of the policy's distinct views (the references' RandomCrop +
    flip); raw features for the identity view only, taken from the views already run."""
    data = "synthetic:n=6,classes=10,size=16"
    out = tmp_path / "all.zarr"
    extract_teacher(ckpt, ARCH, data, out, executor="inline", cam_res=(2,))
    r = open_store(str(out))
    ds = load_dataset(data)
    assert ds.policy.num_views == 50 and r.num_views == 50 and r.manifest.views.mode == "all"
    np.testing.assert_array_equal(r["views"][0], ds.policy.enumerate())
    j = r.manifest.views.identity_index
    assert j is not None and (r["views"][0, j] == ds.policy.identity()).all()
    assert r["feat/inter"].shape[:2] == (6, 1)
    teacher = load_teacher(ARCH, ckpt, 10)
    x = normalize(
        ds.policy.apply_images(
            ds.get_batch(np.arange(6)), torch.from_numpy(np.repeat(ds.policy.identity()[None], 6, 0))
        ),
        ds.mean,
        ds.std,
    )
    with torch.no_grad():
        logits, feats = teacher.forward_features(x)
    np.testing.assert_allclose(r["feat/inter"][:, 0].astype(np.float32), feats["inter"].numpy(), rtol=4e-3, atol=4e-3)
    np.testing.assert_allclose(r["logits"][:, j].astype(np.float32), logits.numpy(), rtol=2e-3, atol=2e-3)


def test_more_views_than_distinct_ones_is_refused(cli_runner, ckpt, tmp_path):
    out = str(tmp_path / "s.zarr")
    line = _one_line_error(
        cli_runner.invoke(
            cli,
            [
                "extract-teacher",
                "--teacher",
                ckpt,
                "--arch",
                ARCH,
                "--data",
                "synthetic:n=4,classes=10,size=16",
                "--out",
                out,
                "--executor",
                "inline",
                "--views",
                "51",
            ],
        )
    )
    assert "51" in line and "50 distinct views" in line and "--views all" in line
    assert not os.path.exists(out)


@pytest.mark.ray
def test_ray_with_a_killed_worker_equals_inline(ckpt, reference, tmp_path, monkeypatch):
    from kdpipe.distributed.executor import ray_cluster

    out = str(tmp_path / "ray.zarr")
    marker = tmp_path / "killed"
    with ray_cluster(num_cpus=2) as ray:
        summary = extract_teacher(
            ckpt, ARCH, DATA, out, executor="ray", num_workers=2, fault=KillWorkerOnce(1, str(marker)), **OPTS
        )
        # the local cluster listens on loopback only
        assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
        assert ray.util.get_node_ip_address() == "127.0.0.1"
        assert [n["NodeManagerAddress"] for n in ray.nodes()] == ["127.0.0.1"]
    assert marker.exists()  # the worker that started shard 1 died; Ray restarted it and retried
    assert summary["shards_run"] == 3
    _same_arrays(out, reference[0])
