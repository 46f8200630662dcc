"""kdpipe inspect: the description, the CAM grid, refusals with one sentence."""

import numpy as np
import pytest
import torch

from kdpipe.artifacts import StoreWriter
from kdpipe.cli import cli
from kdpipe.config.configs import ExtractConfig
from kdpipe.models import build
from kdpipe.stages.extract import extract_teacher
from kdpipe.stages.inspect import describe, inspect_store

DATA = "synthetic:n=16,classes=4,seed=1"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("inspect")
    torch.manual_seed(0)
    ckpt = root / "t.pth"
    torch.save({"model": build("resnet8", 4).state_dict()}, ckpt)
    out = str(root / "s.zarr")
    extract_teacher(
        ExtractConfig(
            teacher=str(ckpt),
            arch="resnet8",
            data=DATA,
            out=out,
            views="1",
            cam_res=(2,),
            native_cam=True,
            features=("penult",),
            shard_size=8,
            executor="inline",
        ),
        progress=False,
        verbose=False,
    )
    yield out, str(ckpt)
    torch.set_num_threads(old)


def _one_line_error(result):
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("kdpipe: error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_describe_lists_manifest_arrays_and_shards(cli_runner, store):
    result = cli_runner.invoke(cli, ["inspect", store[0]])
    assert result.exit_code == 0, result.output
    text = result.output
    for word in (
        "complete",
        "resnet8",
        "synthetic train: 16 images",
        "cam_r2",
        "feat/penult",
        "float16",
        "2 of 2 done",
        "target sets none",
        "ratio",
        "total",
    ):
        assert word in text, word


def test_cams_grid_png(cli_runner, store, tmp_path):
    png = tmp_path / "cams.png"
    result = cli_runner.invoke(cli, ["inspect", store[0], "--cams", "3", "--png", str(png)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _one_line_error(cli_runner.invoke(cli, ["inspect", store[0], "--cams", "3"]))


def test_refusals(cli_runner, store, tmp_path):
    line = _one_line_error(cli_runner.invoke(cli, ["inspect", str(tmp_path / "nothing.zarr")]))
    assert "no kdpipe store" in line
    line = _one_line_error(
        cli_runner.invoke(cli, ["inspect", store[0], "--subclasses", "2", "--png", str(tmp_path / "s.png")])
    )
    assert "cluster" in line
    line = _one_line_error(cli_runner.invoke(cli, ["inspect", store[0], "--fidelity"]))
    assert "--teacher" in line


def test_fidelity_delegates_to_the_engine(store):
    res = inspect_store(store[0], fidelity=True, teacher=store[1], num_samples=8, verbose=False)
    assert "logits" in res["fidelity"] and "cosine" in res["fidelity"]["logits"]


def test_incomplete_store_is_shown_but_not_drawn(store, tmp_path):
    import shutil

    out = str(tmp_path / "copy.zarr")
    shutil.copytree(store[0], out)
    w = StoreWriter.open(out)
    w.array("shards_done")[1] = 0
    w.mark_incomplete()
    from kdpipe.artifacts import open_store

    text = describe(open_store(out, allow_incomplete=True))
    assert "INCOMPLETE" in text and "1 of 2 done" in text
    from kdpipe.errors import StoreError

    with pytest.raises(StoreError, match="incomplete"):
        inspect_store(out, cams=2, png=str(tmp_path / "x.png"), verbose=False)
    assert np.asarray(open_store(out, allow_incomplete=True).done_shards()).tolist() == [0]
