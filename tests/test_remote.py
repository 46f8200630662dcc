"""Checkpoints, data folders, stores and run directories at fsspec URLs (kdpipe.storage).

``memory://`` lives in one process only, so the end-to-end runs use the inline executor; the
S3 round trip runs against moto's S3 server on 127.0.0.1 (skipped where moto or s3fs is not
installed: ``pip install 'kdpipe[test]'``), once inline and once on Ray workers, which must
get the driver's fsspec options (the endpoint) to reach it.
"""

import importlib
import io
import json
import pickle
import socket
import sys
import uuid

import numpy as np
import pytest
import torch
from conftest import TINY_DATA

from kdpipe import storage
from kdpipe.cli import cli
from kdpipe.config.configs import ExtractConfig, StudentConfig
from kdpipe.errors import KdpipeError
from kdpipe.runs.rundir import RunDir
from kdpipe.stages.extract import extract_teacher
from kdpipe.stages.train import train_student

torch.set_num_threads(1)


@pytest.fixture
def memory_root():
    """A fresh memory:// folder, removed afterwards (the memory file system is process-wide)."""
    import fsspec

    name = f"kdpipe-test-{uuid.uuid4().hex[:8]}"
    yield f"memory://{name}"
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/{name}"):
        fs.rm(f"/{name}", recursive=True)


def _put(url: str, data: bytes) -> None:
    fs, path = storage.filesystem(url)
    with fs.open(path, "wb") as fh:
        fh.write(data)


def _teacher_bytes(tiny_store) -> bytes:
    with open(tiny_store["teacher"], "rb") as fh:
        return fh.read()


def _run_files(location: str) -> set[str]:
    fs, root = storage.filesystem(location)
    return {p[len(root) :].lstrip("/") for p in fs.find(root)}


def _assert_complete_run(location: str, epochs: int) -> None:
    files = _run_files(location)
    for name in ("config.json", "metrics.csv", "metrics.jsonl", "summary.json", "checkpoints/latest.pth"):
        assert name in files, (name, sorted(files))
    assert any(f.startswith("tensorboard/events.out.tfevents") for f in files)
    rows = storage.read_bytes(storage.join(location, "metrics.jsonl")).decode().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == list(range(1, epochs + 1))
    state = torch.load(
        io.BytesIO(storage.read_bytes(storage.join(location, "checkpoints/latest.pth"))), weights_only=True
    )
    assert state["epoch"] == epochs


# ----------------------------------------------------------------------------- paths
def test_paths_and_urls(tmp_path):
    assert storage.normalize(f"file://{tmp_path}/a/") == str(tmp_path / "a")
    assert storage.normalize("s3://bucket/key/") == "s3://bucket/key"
    assert storage.join("s3://bucket/runs/", "x", "/y") == "s3://bucket/runs/x/y"
    assert storage.join(str(tmp_path), "x") == str(tmp_path / "x")
    assert storage.basename("s3://bucket/runs/run-1/") == "run-1"
    with pytest.raises(KdpipeError, match="not a path or a URL of a storage protocol"):
        storage.filesystem("nosuchprotocol://x/y")


def _without(monkeypatch, module: str, protocol: str) -> None:
    """Make ``module`` unimportable and forget fsspec's cached class for ``protocol``."""
    monkeypatch.setitem(sys.modules, module, None)
    registry = importlib.import_module("fsspec.registry")
    monkeypatch.delitem(registry._registry, protocol, raising=False)


@pytest.mark.parametrize("protocol, module, extra", [("s3", "s3fs", "s3"), ("gs", "gcsfs", "gcs")])
def test_a_missing_backend_is_one_sentence_naming_the_extra(monkeypatch, protocol, module, extra):
    _without(monkeypatch, module, protocol)
    with pytest.raises(KdpipeError) as err:
        storage.exists(f"{protocol}://bucket/store.zarr")
    assert str(err.value) == (
        f"{protocol}://bucket/store.zarr needs the {module} package, which is not installed; "
        f"install kdpipe's {extra} extra (pip install 'kdpipe[{extra}]')."
    )


def test_cli_without_s3fs_prints_the_sentence(monkeypatch, cli_runner, tiny_store):
    _without(monkeypatch, "s3fs", "s3")
    result = cli_runner.invoke(
        cli,
        [
            "extract-teacher",
            "--teacher",
            "s3://bucket/teacher.pth",
            "--arch",
            "resnet8",
            "--data",
            TINY_DATA,
            "--out",
            "s3://bucket/store.zarr",
            "--executor",
            "inline",
        ],
    )
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [
        "kdpipe: error: s3://bucket/teacher.pth needs the s3fs package, which is not installed; "
        "install kdpipe's s3 extra (pip install 'kdpipe[s3]')."
    ]
    assert "Traceback" not in result.output


# ----------------------------------------------------------------------------- data folders
def _pickle(obj) -> bytes:
    return pickle.dumps(obj)


def test_cifar_folder_at_a_url(memory_root):
    from kdpipe.data import load_dataset

    rng = np.random.default_rng(0)
    folder = f"{memory_root}/cifar-10-batches-py"
    for name, n in [(f"data_batch_{i}", 2) for i in range(1, 6)] + [("test_batch", 3)]:
        _put(
            f"{folder}/{name}",
            _pickle(
                {
                    b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                    b"labels": [int(v) for v in rng.integers(0, 10, n)],
                }
            ),
        )
    train = load_dataset(f"cifar10:{folder}", "train")
    assert len(train) == 10 and train.images.shape == (10, 3, 32, 32) and train.source == folder
    assert len(load_dataset(f"cifar10:{folder}", "test")) == 3


def test_imagefolder_at_a_url_equals_the_local_one(memory_root, tmp_path):
    from PIL import Image

    from kdpipe.data import load_dataset

    rng = np.random.default_rng(1)
    for split, cls, i, (h, w) in [
        ("train", "ant", 0, (20, 24)),
        ("train", "cat", 1, (18, 30)),
        ("val", "ant", 2, (22, 22)),
    ]:
        folder = tmp_path / split / cls
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    fs, root = storage.filesystem(memory_root)
    fs.put(str(tmp_path) + "/", root, recursive=True)
    local = load_dataset(f"imagefolder:{tmp_path}?size=16", "train")
    remote = load_dataset(f"imagefolder:{memory_root}?size=16", "train")
    assert remote.class_names == local.class_names == ["ant", "cat"]
    assert remote.paths[0].startswith("memory://") and remote.fingerprint == local.fingerprint
    assert remote.image_sizes.tolist() == [[20, 24], [18, 30]]
    assert len(load_dataset(f"imagefolder:{memory_root}?size=16", "test")) == 1


# ----------------------------------------------------------------------------- end to end
def _extract(teacher: str, out: str, executor: str = "inline", **extra) -> dict:
    return extract_teacher(
        ExtractConfig(
            teacher=teacher,
            arch="resnet8",
            data=TINY_DATA,
            out=out,
            cam_res=(2,),
            features=(),
            shard_size=8,
            executor=executor,
            **extra,
        ),
        progress=False,
        verbose=False,
    )


def _student(store: str, out: str, **fields) -> dict:
    cfg = StudentConfig(**dict(dict(store=store, student="resnet8", method="kd", epochs=1, batch_size=8), **fields))
    return train_student(cfg, out=out, progress=False, plot=False)


def test_memory_store_and_run_directory_end_to_end(memory_root, tiny_store):
    """extract-teacher writes a memory:// store from a memory:// checkpoint; train-student reads
    it and writes its run directory to memory://; a run killed after its first epoch resumes
    from the URL."""
    teacher, store, runs = f"{memory_root}/teacher.pth", f"{memory_root}/store.zarr", f"{memory_root}/runs"
    _put(teacher, _teacher_bytes(tiny_store))
    assert _extract(teacher, store)["store"] == store
    manifest = json.loads(storage.read_bytes(f"{store}/zarr.json"))["attributes"]["kdpipe"]
    assert manifest["complete"] and manifest["teacher"]["path"] == teacher

    def stop_after_first(epoch):
        if epoch == 1:
            raise KeyboardInterrupt

    cfg = StudentConfig(store=store, student="resnet8", method="kd", epochs=2, batch_size=8)
    with pytest.raises(KeyboardInterrupt):
        train_student(cfg, out=runs, progress=False, plot=False, after_epoch=stop_after_first)
    (location,) = {storage.join(runs, p.split("/")[0]) for p in _run_files(runs)}
    s = train_student(resume=location, progress=False, plot=False)
    assert s["run_dir"] == location and s["epochs"] == 2
    _assert_complete_run(location, epochs=2)
    assert RunDir.open(location).summary["run_dir"] == location
    from kdpipe.stages.evaluate import evaluate

    assert evaluate(location)["top1"] == pytest.approx(s["best_top1"])


def test_teacher_run_directory_at_a_url(memory_root):
    from kdpipe.config.configs import TeacherConfig
    from kdpipe.stages.evaluate import evaluate
    from kdpipe.stages.teacher import train_teacher

    s = train_teacher(
        TeacherConfig(arch="resnet8", data=TINY_DATA, epochs=1, batch_size=16),
        out=f"{memory_root}/runs",
        device="cpu",
        progress=False,
    )
    assert s["checkpoint"] == f"{s['run_dir']}/resnet8_vanilla/ckpt_epoch_1.pth"
    assert storage.isfile(s["checkpoint"])
    _assert_complete_run(s["run_dir"], epochs=1)
    assert evaluate(s["run_dir"])["top1"] == pytest.approx(s["top1"])


def test_file_urls_through_the_cli(tmp_path, tiny_store, cli_runner):
    store, runs = f"file://{tmp_path}/store.zarr", f"file://{tmp_path}/runs"
    result = cli_runner.invoke(
        cli,
        [
            "extract-teacher",
            "--teacher",
            f"file://{tiny_store['teacher']}",
            "--arch",
            "resnet8",
            "--data",
            TINY_DATA,
            "--out",
            store,
            "--executor",
            "inline",
            "--cam-res",
            "2",
            "--features",
            "none",
            "--shard-size",
            "8",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "store.zarr" / "zarr.json").is_file()
    result = cli_runner.invoke(
        cli,
        [
            "train-student",
            "--store",
            store,
            "--student",
            "resnet8",
            "--method",
            "kd",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--out",
            runs,
        ],
    )
    assert result.exit_code == 0, result.output
    (run,) = (tmp_path / "runs").iterdir()
    assert (run / "metrics.csv").is_file() and (run / "checkpoints" / "latest.pth").is_file()


# ----------------------------------------------------------------------------- S3 (moto)
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1 (a real S3 API over HTTP), one bucket per module."""
    pytest.importorskip("s3fs", reason="the S3 round trip needs s3fs: pip install 'kdpipe[test]'")
    server_mod = pytest.importorskip(
        "moto.server", reason="the S3 round trip needs moto[server]: pip install 'kdpipe[test]'"
    )
    port = _free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    """fsspec's S3 options pointing at moto (what FSSPEC_S3_ENDPOINT_URL etc. would set), and a
    fresh bucket."""
    import fsspec.config

    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"})
    bucket = f"kdpipe-{uuid.uuid4().hex[:8]}"
    fs, _ = storage.filesystem(f"s3://{bucket}")
    fs.mkdir(bucket)
    return f"s3://{bucket}"


def test_s3_round_trip(s3, tiny_store):
    """A teacher checkpoint read from s3://, a store written to s3:// by extract-teacher and
    read by train-student, whose run directory goes to s3:// too."""
    teacher, store, runs = f"{s3}/teacher.pth", f"{s3}/store", f"{s3}/runs"
    _put(teacher, _teacher_bytes(tiny_store))
    _extract(teacher, store)
    s = _student(store, runs)
    assert s["run_dir"].startswith(f"{runs}/student-resnet8-kd-")
    _assert_complete_run(s["run_dir"], epochs=1)
    from kdpipe.artifacts import open_store

    reader = open_store(store)  # the integrity check reads every chunk's digest over S3
    assert reader.manifest.teacher.path == teacher and reader.manifest.complete


@pytest.mark.ray
@pytest.mark.slow
def test_s3_store_written_by_ray_workers(s3, tiny_store):
    """Ray actors are other processes: they reach moto only with the driver's fsspec options."""
    from kdpipe.artifacts import open_store
    from kdpipe.distributed.executor import ray_cluster

    teacher, store = f"{s3}/teacher.pth", f"{s3}/store-ray"
    _put(teacher, _teacher_bytes(tiny_store))
    with ray_cluster(num_cpus=1):
        summary = _extract(teacher, store, executor="ray", num_workers=1)
    assert summary["shards_run"] == 4
    assert open_store(store).manifest.complete


def test_run_command_with_stores_and_runs_at_urls(memory_root, tiny_store, tmp_path):
    """``kdpipe run``: the teacher, the stores folder and the runs folder at URLs; a second
    call reuses the store and the finished run."""
    from kdpipe.workflows.run import run_configs

    teacher = f"{memory_root}/teacher.pth"
    _put(teacher, _teacher_bytes(tiny_store))
    row = tmp_path / "kd.yaml"
    row.write_text(f"""
name: tiny-kd
teacher: {{arch: resnet8, checkpoint: "{teacher}"}}
data: "{TINY_DATA}"
extract: {{views: "4", cam_res: [2], features: [], shard_size: 16}}
student: {{student: resnet8, method: kd, method_options: {{}}, epochs: 1, batch_size: 16}}
seeds: [0]
""")
    kwargs = dict(out=f"{memory_root}/runs", stores=f"{memory_root}/stores", executor="inline", verbose=False)
    first = run_configs([str(row)], **kwargs)
    assert first["stores_built"] == 1 and first["stores"][0].startswith(f"{memory_root}/stores/")
    second = run_configs([str(row)], **kwargs)
    assert second["stores_built"] == 0 and second["rows"][0]["run_dirs"] == first["rows"][0]["run_dirs"]
    assert "| tiny-kd | resnet8 | resnet8 | kd | 1 |" in storage.read_bytes(second["results_md"]).decode()


def test_url_run_directory_uploads_checkpoints_last(memory_root, monkeypatch):
    """Changed files go up whole, metrics first and checkpoints/latest.pth last; a file removed
    locally (truncated metrics) is removed at the URL; reopening downloads the run."""
    run = RunDir.create(f"{memory_root}/runs", "r", {"stage": "test"})
    assert run.remote and run.location.startswith(f"{memory_root}/runs/r-")
    sent = []
    real = run._mirror.fs.put_file
    monkeypatch.setattr(run._mirror.fs, "put_file", lambda lpath, rpath, **kw: (sent.append(rpath), real(lpath, rpath)))
    for name in ("checkpoints/latest.pth", "checkpoints/best.pth", "metrics.jsonl", "tensorboard/events"):
        (run.path / name).parent.mkdir(parents=True, exist_ok=True)
        (run.path / name).write_bytes(b"x")
    run.sync()
    assert [p.split(run._mirror.root + "/")[1] for p in sent] == [
        "metrics.jsonl",
        "tensorboard/events",
        "checkpoints/best.pth",
        "checkpoints/latest.pth",
    ]
    sent.clear()
    run.sync()
    assert sent == []  # nothing changed, nothing uploaded
    (run.path / "metrics.jsonl").unlink()
    run.sync()
    assert not storage.exists(run.url("metrics.jsonl"))
    again = RunDir.open(run.location)
    assert again.path != run.path and (again.path / "checkpoints" / "latest.pth").read_bytes() == b"x"
    assert again.config == {"stage": "test"}
