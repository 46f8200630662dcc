"""Target tiers on both store layouts: row reads, the shared copy and its integrity, the stream.

Tiny stores written through the real StoreWriter (12 samples, 3 views, 5 classes, chunks of
4 samples): one in the row layout new stores use, one in the old (samples, every view) chunks.
"""

import json
import threading

import numpy as np
import pytest
import torch

from kdpipe.artifacts import StoreWriter, open_store
from kdpipe.artifacts import writer as writer_mod
from kdpipe.artifacts.manifest import build_manifest
from kdpipe.artifacts.schema import ArraySpec
from kdpipe.engine.rows import ArrayUse, choose_residency
from kdpipe.engine.shared_copy import SharedCopy
from kdpipe.engine.sources import CachedTargets
from kdpipe.errors import StoreError
from kdpipe.targets import Logits

N, V, C, CHUNK = 12, 3, 80, 4


def _make(path, row_layout: bool) -> str:
    specs = [
        ArraySpec("views", (N, V, 2), "int32", "views", (CHUNK, V, 2)),
        ArraySpec("logits", (N, V, C), "float16", "logits", (CHUNK, V, C)),
    ]
    manifest = build_manifest(
        teacher={"sha256": "t" * 64, "arch": "resnet8", "num_classes": C},
        dataset={
            "name": "toy",
            "split": "train",
            "fingerprint": "fp",
            "num_samples": N,
            "num_classes": C,
            "mean": [0.5, 0.5, 0.5],
            "std": [0.25, 0.25, 0.25],
            "image_size": [16, 16],
        },
        views={"policy": "cifar", "mode": "all", "num_views": V, "seed": 0, "pad_mode": "constant"},
        layers=[],
        specs=specs,
        shard_size=CHUNK,
        num_samples=N,
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(writer_mod, "ROW_CHUNKS", row_layout)
        w = StoreWriter.create(path, manifest, specs)
        rng = np.random.default_rng(1)
        for shard, lo in enumerate(range(0, N, CHUNK)):
            w.write_rows("views", lo, rng.integers(0, 9, (CHUNK, V, 2)).astype(np.int32))
            w.write_rows("logits", lo, rng.standard_normal((CHUNK, V, C)).astype(np.float16))
            w.mark_shard_done(shard)
        w.finalize()
    return str(path)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiers")
    return {"row": _make(root / "row.zarr", True), "old": _make(root / "old.zarr", False)}


@pytest.fixture
def shared_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KDPIPE_SHARED_DIR", str(tmp_path / "shared"))
    return tmp_path / "shared"


def test_row_layout_reads_only_the_rows_used(stores):
    new, old = open_store(stores["row"]), open_store(stores["old"])
    assert new.row_reader("views") is None and old.row_reader("logits") is None  # read through zarr
    rows = new.row_reader("logits")
    samples, views = np.array([11, 0, 5, 5, 7]), np.array([2, 1, 0, 2, 1])
    got = rows.read(samples, views)
    want = np.asarray(new["logits"][...])[samples, views]
    np.testing.assert_array_equal(got, want)
    assert rows.stats.decoded == len(samples) * C * 2  # one row decoded per row used
    np.testing.assert_array_equal(np.asarray(old["logits"][...]), np.asarray(new["logits"][...]))


@pytest.mark.parametrize("layout", ["row", "old"])
def test_every_tier_hands_over_the_same_rows(stores, layout, shared_dir):
    reader = open_store(stores[layout])
    sources = {t: CachedTargets(reader, [Logits()], resident=t) for t in ("device", "host", "shared", "stream")}
    # the row layout streams in the plan's uniform order; the old one in block order
    assert sources["stream"].order == ("uniform" if layout == "row" else "blocks")
    plan = sources["stream"].plan(torch.arange(N), seed=3, epoch=1)
    for source in sources.values():
        source.begin_epoch(plan, 5)
    for batch in plan.batches(5):
        got = {t: s.targets(batch)["logits"] for t, s in sources.items()}
        for tier, rows in got.items():
            assert torch.equal(rows, got["device"]), tier
    for source in sources.values():
        source.close()


def _uses():
    return [ArrayUse("logits", True)]


def test_shared_copy_is_made_once_by_concurrent_openers(stores, shared_dir):
    reader = open_store(stores["row"])
    copies = []
    threads = [threading.Thread(target=lambda: copies.append(SharedCopy.open(reader, _uses()))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(c.made for c in copies) == [False, False, True]
    assert len({c.folder for c in copies}) == 1
    np.testing.assert_array_equal(copies[0].arrays["logits"], np.asarray(reader["logits"][...]))
    assert not list(shared_dir.glob("*.tmp-*"))  # made in a temporary folder, renamed into place


def _edit(folder):
    path = folder / "0.npy"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(folder):
    path = folder / "0.npy"
    path.write_bytes(path.read_bytes()[:-8])


def _stale(folder):
    meta = json.loads((folder / "meta.json").read_text())
    meta["identity"]["store"]["created"] = "another store"
    (folder / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("damage", "said"),
    [(_edit, "bytes differ"), (_truncate, "truncated"), (_stale, "another store")],
    ids=["edited", "truncated", "stale"],
)
def test_damaged_or_stale_shared_copy_is_refused_or_rebuilt(stores, shared_dir, damage, said):
    reader = open_store(stores["row"])
    first = SharedCopy.open(reader, _uses())
    damage(first.folder)
    with pytest.raises(StoreError, match=said):
        SharedCopy.open(reader, _uses(), rebuild=False)
    again = SharedCopy.open(reader, _uses())
    assert again.made and said in again.note
    np.testing.assert_array_equal(again.arrays["logits"], np.asarray(reader["logits"][...]))
    assert not SharedCopy.open(reader, _uses()).made  # the rebuilt copy is good


def test_other_store_content_gets_its_own_copy(stores, shared_dir, tmp_path):
    import shutil

    path = tmp_path / "changed.zarr"
    shutil.copytree(stores["row"], path)
    a = SharedCopy.open(open_store(path), _uses())
    w = StoreWriter.open(path)
    w.write_rows("logits", 4, np.ones((CHUNK, V, C), dtype=np.float16))  # new chunk, new digest
    w.finalize()  # a rewritten store is sealed again (its digest root)
    b = SharedCopy.open(open_store(path), _uses())
    assert b.made and b.folder != a.folder
    assert float(b.arrays["logits"][4, 0, 0]) == 1.0


def test_a_damaged_store_is_not_copied_nor_streamed(stores, shared_dir, tmp_path):
    import shutil

    path = tmp_path / "bad.zarr"
    shutil.copytree(stores["row"], path)
    shard = path / "logits" / "c" / "1" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[20] ^= 0xFF  # inside the first row of the shard: its crc32c fails
    shard.write_bytes(bytes(data))
    reader = open_store(path, check=False)
    with pytest.raises(StoreError, match="logits.*damaged at sample 4: a row fails its crc32c"):
        SharedCopy.open(reader, _uses())
    with pytest.raises(StoreError, match="fails its crc32c"):
        reader.row_reader("logits").read(np.array([4]), np.array([0]))
    assert not list(shared_dir.iterdir()) or not [p for p in shared_dir.iterdir() if p.is_dir()]


def test_auto_counts_the_shared_copy_once():
    cpu = torch.device("cpu")
    assert choose_residency(100, cpu, budget=250) == "device"
    assert choose_residency(100, cpu, budget=250, sharers=4) == "shared"  # 4 own copies do not fit
    assert choose_residency(100, cpu, budget=250, sharers=4, shared=False) == "stream"
    assert choose_residency(1000, cpu, budget=250) == "stream"


def test_students_side_by_side_on_cpu_map_one_shared_copy(tiny_store, tmp_path, monkeypatch):
    """--resident auto with several students on the machine (a sweep's trials, data-parallel
    workers: KDPIPE_CONCURRENT_STUDENTS) picks the shared copy on CPU; one student alone keeps
    its targets resident."""
    import torch

    import kdpipe
    from kdpipe.engine.rows import CONCURRENT_STUDENTS_ENV, choose_residency

    cpu = torch.device("cpu")
    assert choose_residency(1 << 20, cpu, "auto", sharers=1) == "device"
    assert choose_residency(1 << 20, cpu, "auto", sharers=4) == "shared"
    assert choose_residency(1 << 20, cpu, "auto", sharers=4, shared=False) == "device"
    monkeypatch.setenv("KDPIPE_SHARED_DIR", str(tmp_path / "shared"))
    monkeypatch.setenv(CONCURRENT_STUDENTS_ENV, "4")
    training = kdpipe.open_store(tiny_store["path"]).training(method="kd", student="resnet8", epochs=1, device="cpu")
    assert training._source.tier == "shared"
    training.close()


def test_a_sweep_counts_the_trials_a_node_runs_at_once():
    from kdpipe.workflows.sweep_tune import concurrent_trials

    assert concurrent_trials({"cpu": 1.0, "gpu": 0.0}, node_cpus=2, trials=4) == 2
    assert concurrent_trials({"cpu": 1.0, "gpu": 0.25}, node_cpus=16, trials=4) == 4
    assert concurrent_trials({"cpu": 1.0, "gpu": 0.25}, node_cpus=16, trials=2) == 2
    assert concurrent_trials({"cpu": 4.0, "gpu": 1.0}, node_cpus=16, trials=4) == 1
