"""Bad input and faults around the store, inspect, evaluate, checkpoints and CIFAR files: each
ends in one sentence and a non-zero exit, never a traceback, and nothing damaged is ever read
as data (tests/test_faults_stages.py covers the training stages)."""

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from kdpipe.artifacts import open_store
from kdpipe.cli import cli
from kdpipe.errors import DataError, StoreError


def one_sentence(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("kdpipe: error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def chunk_file(store: str, array: str, index: int) -> Path:
    """The file of chunk ``index`` (along samples) of ``array`` (zarr v3 default keys)."""
    arr = open_store(store, check=False).group[array]
    return Path(store, array, "c", str(index), *["0"] * (arr.ndim - 1))


DAMAGED_ARRAYS = ["logits", "cam_r2", "targets/default/penult_topk_idx"]


@pytest.mark.parametrize("array", DAMAGED_ARRAYS)
def test_a_deleted_chunk_is_refused_not_read_as_zeros(store_copy, cli_runner, tmp_path, array):
    path = store_copy["path"]
    chunk_file(path, array, 1).unlink()
    with pytest.raises(StoreError, match=rf"{array} \(chunk 1, samples \d+\.\.\d+\).*chunk file is missing"):
        open_store(path)
    line = one_sentence(
        cli_runner.invoke(
            cli,
            [
                "train-student",
                "--store",
                path,
                "--student",
                "resnet8",
                "--method",
                "letkd1" if "targets" in array else "kd",
                "--epochs",
                "1",
                "--out",
                str(tmp_path),
            ],
        )
    )
    assert array in line and "missing" in line


def test_swapped_chunks_are_refused(store_copy):
    path = store_copy["path"]
    a, b = chunk_file(path, "cam_r2", 0), chunk_file(path, "cam_r2", 2)
    tmp = a.with_suffix(".tmp")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    with pytest.raises(StoreError, match=r"cam_r2 \(chunk 0, samples 0\.\.\d+\).*swapped or replaced"):
        open_store(path)


def test_a_corrupted_chunk_is_one_sentence_at_read_and_in_verify(store_copy, cli_runner):
    path = store_copy["path"]
    f = chunk_file(path, "logits", 2)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the middle: the recorded digest (the tail) still matches
    f.write_bytes(bytes(data))
    reader = open_store(path)  # the cheap check does not decode
    with pytest.raises(StoreError, match=r"logits at .* is damaged in samples 0\.\.\d+ .*--verify"):
        reader["logits"][...]
    result = cli_runner.invoke(cli, ["inspect", path, "--verify"])
    assert "DAMAGED     logits chunk 2" in result.output and "does not decode" in result.output
    line = one_sentence(result)
    assert "1 damaged" in line


def test_verify_reports_every_damaged_chunk(store_copy, cli_runner):
    path = store_copy["path"]
    chunk_file(path, "logits", 0).unlink()
    shutil.rmtree(Path(path, "feat", "inter"))
    result = cli_runner.invoke(cli, ["inspect", path, "--verify"])
    assert "DAMAGED     logits chunk 0" in result.output and "DAMAGED     feat/inter whole array" in result.output
    one_sentence(result)
    ok = cli_runner.invoke(cli, ["inspect", store_copy["path"].replace("store.zarr", "none.zarr")])
    assert ok.exit_code == 2


def test_a_clean_store_verifies(tiny_store, cli_runner):
    result = cli_runner.invoke(cli, ["inspect", tiny_store["path"], "--verify"])
    assert result.exit_code == 0, result.output
    assert "every chunk" in result.output


def test_damaged_manifest_and_metadata(store_copy, cli_runner):
    import json

    path = store_copy["path"]
    meta = Path(path, "zarr.json")
    doc = json.loads(meta.read_text())
    good = json.dumps(doc)
    doc["attributes"]["kdpipe"]["dataset"]["num_samples"] = "lots"
    meta.write_text(json.dumps(doc))
    line = one_sentence(cli_runner.invoke(cli, ["inspect", path]))
    assert "num_samples" in line
    doc = json.loads(good)
    doc["attributes"]["kdpipe"]["teacher"] = "x"
    meta.write_text(json.dumps(doc))
    assert "teacher is str" in one_sentence(cli_runner.invoke(cli, ["inspect", path]))
    meta.write_text(good)
    Path(path, "logits", "zarr.json").write_text("garbage {")
    line = one_sentence(
        cli_runner.invoke(
            cli, ["train-student", "--store", path, "--student", "resnet8", "--method", "kd", "--epochs", "1"]
        )
    )
    assert "logits" in line or "metadata" in line


def test_out_that_is_not_a_store(tiny_store, cli_runner, tmp_path):
    base = [
        "extract-teacher",
        "--teacher",
        tiny_store["teacher"],
        "--arch",
        "resnet8",
        "--data",
        tiny_store["data"],
        "--executor",
        "inline",
        "--views",
        "1",
        "--features",
        "none",
    ]
    afile = tmp_path / "file"
    afile.write_text("x")
    assert "is a file" in one_sentence(cli_runner.invoke(cli, base + ["--out", str(afile)]))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    line = one_sentence(cli_runner.invoke(cli, base + ["--out", str(folder), "--overwrite"]))
    assert "other contents" in line and (folder / "notes.txt").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli_runner.invoke(cli, base + ["--out", str(empty)])
    assert result.exit_code == 0, result.output  # an empty folder becomes the store


def test_inspect_options(tiny_store, cli_runner, tmp_path):
    path = tiny_store["path"]
    assert "--cams" in one_sentence(cli_runner.invoke(cli, ["inspect", path, "--cams", "-3", "--png", "x.png"]))
    assert "--num-samples" in one_sentence(
        cli_runner.invoke(
            cli, ["inspect", path, "--fidelity", "--teacher", tiny_store["teacher"], "--num-samples", "0"]
        )
    )
    line = one_sentence(cli_runner.invoke(cli, ["inspect", path, "--cams", "2", "--png", str(tmp_path / "c.xyz")]))
    assert ".xyz" in line
    result = cli_runner.invoke(cli, ["inspect", path, "--cams", "2", "--png", str(tmp_path / "new" / "cams")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "new" / "cams.png").is_file() and "cams.png" in result.output


def test_evaluate_refusals(tiny_store, cli_runner, tmp_path):
    cli_runner.invoke(
        cli,
        [
            "train-student",
            "--store",
            tiny_store["path"],
            "--student",
            "resnet8",
            "--method",
            "ce",
            "--epochs",
            "1",
            "--out",
            str(tmp_path),
        ],
    )
    (run,) = list(tmp_path.iterdir())
    line = one_sentence(cli_runner.invoke(cli, ["evaluate", "--checkpoint", str(run), "--arch", "resnet20"]))
    assert "resnet8" in line and "resnet20" in line
    # a 4-class teacher on 10-class data
    line = one_sentence(
        cli_runner.invoke(
            cli,
            [
                "evaluate",
                "--checkpoint",
                tiny_store["teacher"],
                "--arch",
                "resnet8",
                "--data",
                "synthetic:n=16,classes=10,size=16",
            ],
        )
    )
    assert "10" in line or "4" in line


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch /tmp/kdpipe-pwned-by-pickle",))


def test_a_pickled_checkpoint_names_the_forbidden_global(tmp_path, cli_runner):
    torch.save({"model": _RunsCode()}, tmp_path / "evil.pth")
    line = one_sentence(
        cli_runner.invoke(
            cli,
            [
                "evaluate",
                "--checkpoint",
                str(tmp_path / "evil.pth"),
                "--arch",
                "resnet8",
                "--data",
                "synthetic:n=8,classes=4,size=16",
            ],
        )
    )
    assert "system" in line and not os.path.exists("/tmp/kdpipe-pwned-by-pickle")


def _cifar_folder(tmp_path, train_payload):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    good = {
        b"data": np.zeros((4, 3072), np.uint8),
        b"fine_labels": [0, 1, 2, 3],
        b"coarse_labels": [0, 0, 1, 1],
        b"filenames": [b"a", b"b", b"c", b"d"],
    }
    with open(root / "test", "wb") as f:
        pickle.dump(good, f, protocol=2)
    with open(root / "train", "wb") as f:
        pickle.dump(train_payload if train_payload is not None else good, f, protocol=2)
    with open(root / "meta", "wb") as f:
        pickle.dump(
            {
                b"fine_label_names": [f"c{i}".encode() for i in range(100)],
                b"coarse_label_names": [f"s{i}".encode() for i in range(20)],
            },
            f,
            protocol=2,
        )
    return root


def test_cifar_pickles_cannot_run_code(tmp_path):
    from kdpipe.data import load_dataset

    marker = "/tmp/kdpipe-pwned-by-cifar"
    if os.path.exists(marker):
        os.unlink(marker)
    root = _cifar_folder(tmp_path, {b"data": _RunsCode()})
    with pytest.raises(DataError, match=r"posix\.system|os\.system"):
        load_dataset(f"cifar100:{root}", "train")
    assert not os.path.exists("/tmp/kdpipe-pwned-by-pickle")
    (tmp_path / "ok").mkdir()
    ok = _cifar_folder(tmp_path / "ok", None)  # a legitimate file (numpy arrays) still loads
    ds = load_dataset(f"cifar100:{ok}", "test")
    assert len(ds) == 4 and ds.num_classes == 100
