"""The artifact store: layout, manifest, completeness, checks, target sets, no pickles."""

import json
import os
import types

import numpy as np
import pytest

from kdpipe.artifacts import StoreWriter, open_store, sha256_file
from kdpipe.artifacts.manifest import build_manifest
from kdpipe.artifacts.schema import MEANINGS, ArraySpec, chunk_rows, plan_shards
from kdpipe.errors import CheckpointError, DataError, StoreError

N, V, P, C = 20, 2, 3, 5


def extraction_specs(
    num_samples: int,
    num_views: int,
    param_dim: int,
    num_classes: int,
    cam_hw: tuple,
    cam_res=(),
    features: dict | None = None,
) -> list[ArraySpec]:
    """Array specs of an extraction-shaped store: `features` maps layer name -> (D, h, w)."""
    n, v, c = int(num_samples), int(num_views), int(num_classes)
    h, w = map(int, cam_hw)
    specs = [
        ArraySpec("views", (n, v, int(param_dim)), "int32", MEANINGS["views"]),
        ArraySpec("logits", (n, v, c), "float16", MEANINGS["logits"]),
        ArraySpec("cam", (n, v, c, h, w), "float16", MEANINGS["cam"]),
    ]
    for r in cam_res:
        r = int(r)
        specs.append(ArraySpec(f"cam_r{r}", (n, v, c, r, r), "float16", MEANINGS["cam_r"].format(R=r)))
    for layer, shape in (features or {}).items():
        specs.append(
            ArraySpec(f"feat/{layer}", (n, v) + tuple(map(int, shape)), "float16", MEANINGS["feat"].format(layer=layer))
        )
    return specs


def _dataset(**over):
    d = dict(
        name="synthetic",
        split="train",
        fingerprint="abc123",
        num_samples=N,
        num_classes=C,
        mean=[0.5, 0.5, 0.5],
        std=[0.25, 0.25, 0.25],
        image_size=[32, 32],
    )
    d.update(over)
    return d


def _make(path, shard_size=8, cam_res=(2,)):
    specs = [s.with_chunks(shard_size) for s in extraction_specs(N, V, P, C, (4, 4), cam_res, {"penult": (6, 4, 4)})]
    m = build_manifest(
        teacher={"arch": "resnet8", "sha256": "f" * 64, "num_classes": C},
        dataset=_dataset(),
        views={"policy": "cifar", "mode": "1", "num_views": V, "seed": 0, "pad_mode": "constant"},
        layers=["penult"],
        specs=specs,
        shard_size=shard_size,
        num_samples=N,
    )
    return StoreWriter.create(path, m, specs), m, specs


def _fill(w, rng, shard_size=8):
    data = {}
    for sid, (a, b) in enumerate(plan_shards(N, shard_size)):
        for name, record in w.manifest.arrays.items():
            shape = record.shape
            block = rng.standard_normal((b - a,) + tuple(shape[1:])).astype(np.float32)
            w.write_rows(name, a, block)
            data.setdefault(name, []).append(block)
        w.mark_shard_done(sid)
    return {k: np.concatenate(v) for k, v in data.items()}


class _DS(types.SimpleNamespace):
    def __len__(self):
        return N


def test_chunking_is_shard_aligned():
    assert chunk_rows(16, 10) == 16
    assert chunk_rows(16, 10, max_chunk_bytes=45) == 4
    assert chunk_rows(12, 10, max_chunk_bytes=1) == 1
    assert plan_shards(20, 8) == [(0, 8), (8, 16), (16, 20)]


def test_roundtrip_complete_and_layout(tmp_path):
    path = tmp_path / "s.zarr"
    w, m, specs = _make(path)
    data = _fill(w, np.random.default_rng(0))
    with pytest.raises(StoreError, match="incomplete"):
        open_store(path)  # complete is set only by finalize
    w.finalize()
    r = open_store(path)
    assert r.manifest.complete and r.manifest.shards_done == (0, 1, 2)
    assert set(r.array_names()) == {"views", "logits", "cam", "cam_r2", "feat/penult"}
    assert r["logits"].dtype == np.float16 and r["views"].dtype == np.int32
    # per-view arrays: shards of 8 samples x every view, inner chunks of one (sample, view) row
    assert r["cam"].shards[0] == 8 and r["cam"].chunks[:2] == (1, 1) and r["shards_done"].chunks == (1,)
    assert r["views"].shards is None and r["views"].chunks[0] == 8
    np.testing.assert_allclose(r["logits"][:], data["logits"].astype(np.float16))
    np.testing.assert_array_equal(r["views"][:], data["views"].astype(np.int32))
    codecs = r["views"].metadata.codecs
    assert any("Blosc" in type(c).__name__ and c.cname.value == "zstd" for c in codecs)
    inner = r["cam"].metadata.codecs[0].codecs  # a shard's rows: LZ4HC (writer.ROW_CNAME)
    assert any("Blosc" in type(c).__name__ and c.cname.value == "lz4hc" for c in inner)
    # read-only: a reader cannot write
    with pytest.raises(Exception):  # noqa: B017 - zarr's read-only error type differs across zarr 3 releases
        r["logits"][0] = 1
    # no pickles: every metadata file is JSON, every array numeric
    for root, _, files in os.walk(path):
        for f in files:
            if f == "zarr.json":
                json.load(open(os.path.join(root, f)))
    for info in r.array_info():
        assert info["stored_bytes"] > 0 and info["ratio"] > 0


def test_reader_refusals(tmp_path):
    with pytest.raises(StoreError, match="no kdpipe store"):
        open_store(tmp_path / "nothing")
    import zarr

    zarr.open_group(str(tmp_path / "foreign"), mode="w")
    with pytest.raises(StoreError, match="not a kdpipe store"):
        open_store(tmp_path / "foreign")
    path = tmp_path / "s.zarr"
    w, _, _ = _make(path)
    _fill(w, np.random.default_rng(0))
    w.finalize()
    r = open_store(path)
    good = dict(
        name="synthetic",
        split="train",
        fingerprint="abc123",
        num_classes=C,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
    )
    r.check_dataset(_DS(**good))
    for change, match in [
        (dict(fingerprint="zzz"), "fingerprint"),
        (dict(num_classes=7), "classes"),
        (dict(mean=(0.4, 0.5, 0.5)), "normalisation"),
    ]:
        with pytest.raises(DataError, match=match):
            r.check_dataset(_DS(**{**good, **change}))
    with pytest.raises(StoreError, match="no array"):
        r["feat/inter"]
    ck = tmp_path / "t.pth"
    ck.write_bytes(b"abc")
    with pytest.raises(StoreError, match="another teacher checkpoint"):
        r.check_teacher(ck)
    with pytest.raises(CheckpointError, match="does not exist"):
        r.check_teacher(tmp_path / "missing.pth")


def test_finalize_refuses_missing_shard_and_create_refuses_existing(tmp_path):
    path = tmp_path / "s.zarr"
    w, m, specs = _make(path)
    w.mark_shard_done(0)
    with pytest.raises(StoreError, match=r"incomplete \(1 of 3"):
        w.finalize()
    assert open_store(path, allow_incomplete=True).done_shards() == [0]
    with pytest.raises(StoreError, match="already exists"):
        StoreWriter.create(path, m, specs)
    StoreWriter.create(path, m, specs, overwrite=True)
    assert open_store(path, allow_incomplete=True).done_shards() == []
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("x")
    with pytest.raises(StoreError, match="not a kdpipe store"):
        StoreWriter.create(tmp_path / "other", m, specs, overwrite=True)
    assert (tmp_path / "other" / "precious.txt").exists()


def test_target_sets_and_drop_features(tmp_path):
    path = tmp_path / "s.zarr"
    w, _, _ = _make(path)
    with pytest.raises(StoreError, match="incomplete"):
        StoreWriter.open_for_targets(path)
    _fill(w, np.random.default_rng(0))
    w.finalize()
    t = StoreWriter.open_for_targets(path)
    t.write_target_array("T", "subclass_scores", np.eye(4, dtype=np.float32), meaning="S matrix")
    arr = t.create_target_array("T", "subclass_idx", (N, V, 4, 4), "int32", chunk_rows=8)
    StoreWriter.open(path).write_rows("targets/T/subclass_idx", 8, np.ones((8, V, 4, 4), np.int32))
    t.set_target_attrs("T", {"K": 8, "temperature": 1.0})
    with pytest.raises(StoreError, match="JSON"):
        t.set_target_attrs("T", {"bad": object()})
    with pytest.raises(StoreError, match="numeric"):
        t.write_target_array("T", "names", np.array(["a", "b"], dtype=object))
    assert open_store(path).target_sets() == []
    t.finish_target_set("T")
    # rows 0..7 and 16.. of subclass_idx were never written: refused, never read as zeros
    with pytest.raises(StoreError, match=r"targets/T/subclass_idx \(chunk 0, samples 0..7\).*missing"):
        open_store(path)
    for start in range(0, N, 8):
        if start != 8:
            StoreWriter.open(path).write_rows(
                "targets/T/subclass_idx", start, np.zeros((min(8, N - start), V, 4, 4), np.int32)
            )
    with pytest.raises(StoreError, match="do not match the root its manifest records"):
        open_store(path)  # rows written after the set was finished: its digests changed
    t.finish_target_set("T")  # finishing records the digests' root again
    r = open_store(path)
    assert r.target_sets() == ["T"] and r.manifest.targets["T"].attrs["K"] == 8
    np.testing.assert_array_equal(r["targets/T/subclass_scores"][:], np.eye(4))
    assert r["targets/T/subclass_idx"][:8].sum() == 0 and r["targets/T/subclass_idx"][8:16].min() == 1
    assert arr.shards[0] == 8 and arr.chunks[:2] == (1, 1)
    assert r.group["targets/T"].attrs["K"] == 8
    t.delete_arrays(["feat/penult"])
    r = open_store(path)
    assert not r.has("feat/penult") and "feat/penult" not in r.manifest.arrays
    assert r.manifest.layers == ()
    t.delete_target_set("T")
    assert open_store(path).target_sets(include_incomplete=True) == []


def test_fsspec_memory_url_and_sha256(tmp_path):
    url = "memory://kdpipe-test/s.zarr"
    w, _, _ = _make(url)
    _fill(w, np.random.default_rng(1))
    w.finalize()
    r = open_store(url)
    assert r["logits"].shape == (N, V, C)
    ck = tmp_path / "c.bin"
    ck.write_bytes(os.urandom(10_000))
    import hashlib

    assert sha256_file(ck, chunk_size=999) == hashlib.sha256(ck.read_bytes()).hexdigest()
