"""Shared test fixtures: tiny data, tiny models, no downloads."""

import os

import pytest
import torch

# Ray decides when it is first imported whether a local cluster may bind to 127.0.0.1 only
# (kdpipe.distributed.executor.init_local_ray); tests import ray in many places, so say it first.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

# Tests run on 2 CPU cores next to each other; keep torch from oversubscribing them.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def cli_runner():
    from click.testing import CliRunner

    return CliRunner()


# ------------------------------------------------------------------------------ the tiny store
#: The session's tiny data set: 32 synthetic 16x16 images of 4 classes (the CIFAR policy on
#: 16x16 images pads by 2: 5 x 5 offsets x 2 flips = 50 distinct views).
TINY_DATA = "synthetic:n=32,classes=4,size=16,seed=0"
TINY_CLASSES = 4


def calibrated_teacher(arch: str, num_classes: int, seed: int = 0):
    """A random teacher with non-trivial BatchNorm statistics (so it is not near-constant)."""
    from kdpipe.models import build

    torch.manual_seed(seed)
    model = build(arch, num_classes)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory):
    """One store for the whole test session, made by the real stages (inline executor):
    every view, CAMs pooled to 2 and native, identity-view features, and a target set
    "default" (K_penult 8, K_inter 2, top-k capped at 4). Tests that change a store copy it
    (``store_copy``)."""
    from kdpipe.config.configs import ClusterConfig, ExtractConfig
    from kdpipe.stages.cluster import cluster
    from kdpipe.stages.extract import extract_teacher

    root = tmp_path_factory.mktemp("tiny-store")
    teacher = root / "teacher.pth"
    torch.save({"model": calibrated_teacher("resnet8", TINY_CLASSES).state_dict()}, teacher)
    path = root / "store.zarr"
    extract_teacher(
        ExtractConfig(
            teacher=str(teacher),
            arch="resnet8",
            data=TINY_DATA,
            out=str(path),
            cam_res=(2,),
            native_cam=True,
            shard_size=8,
            executor="inline",
        ),
        progress=False,
        verbose=False,
    )
    cluster(
        ClusterConfig(store=str(path), k_penult=8, k_inter=2, topk=4, executor="inline"), progress=False, verbose=False
    )
    return {"path": str(path), "teacher": str(teacher), "data": TINY_DATA, "root": root}


@pytest.fixture
def store_copy(tiny_store, tmp_path):
    """A private copy of the session's tiny store (for tests that modify a store)."""
    import shutil

    path = tmp_path / "store.zarr"
    shutil.copytree(tiny_store["path"], path)
    return dict(tiny_store, path=str(path))


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (``make test`` runs two workers), every test that starts a local Ray
    cluster runs on one worker, one after another: two local clusters at once would compete
    for the machine's CPUs and Ray's own files."""
    for item in items:
        if item.get_closest_marker("ray") is not None:
            item.add_marker(pytest.mark.xdist_group("ray"))
