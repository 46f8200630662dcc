"""Issue 23, items 1-4 and 12: damage that moves chunks, edits metadata or the manifest is a
clear refusal (one sentence naming the array and sample range), never a silent success; old
stores (bare crc32c digests, no manifest seal) still open and train. Grouped by class."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from kdpipe.artifacts import StoreWriter, open_store
from kdpipe.artifacts.integrity import check_chunk, chunk_digests, digest_name
from kdpipe.artifacts.manifest import Manifest
from kdpipe.cli import cli
from kdpipe.errors import StoreError
from tests.test_faults import chunk_file, one_sentence
from tests.test_store import N, _fill, _make


# ------------------------------------------------------------------------------ helpers
def digest_file(store: str, array: str, index: int) -> Path:
    """The file of chunk ``index``'s digest row (``integrity/<array>``, one zarr chunk per row)."""
    return Path(store, digest_name(array), "c", str(index), "0")


def swap(a: Path, b: Path) -> None:
    tmp = a.with_suffix(".swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


def group_doc(store) -> dict:
    return json.loads(Path(store, "zarr.json").read_text())


def edit_manifest(store, change) -> None:
    """Edit the manifest JSON in place (its seal, where it has one, is left as it was)."""
    doc = group_doc(store)
    change(doc["attributes"]["kdpipe"])
    Path(store, "zarr.json").write_text(json.dumps(doc))


def edit_array_meta(store, array: str, change) -> None:
    meta = Path(store, array, "zarr.json")
    doc = json.loads(meta.read_text())
    change(doc)
    meta.write_text(json.dumps(doc))


def tiny(tmp_path, name="s.zarr", seed=0) -> str:
    path = tmp_path / name
    w, _, _ = _make(path)
    _fill(w, np.random.default_rng(seed))
    w.finalize()
    return str(path)


def make_legacy(store: str) -> None:
    """Turn a store into what today's release writes: bare crc32c digests ([num_chunks]), no
    store id, digest form, digest root, array metadata digests or manifest seal."""
    import zarr

    group = zarr.open_group(store, mode="r+")
    m = group.attrs["kdpipe"]
    names = list(Manifest.from_json(m).checked_arrays())
    from kdpipe.artifacts.integrity import _fs, _object_digest, chunk_key, num_chunks

    fs, root_path = _fs(store)
    for name in names:
        arr = group[name]
        n = num_chunks(arr)
        # form 1: a chunk object's crc32c (a shard's: its index's with its first and last rows')
        tails = [_object_digest(fs, chunk_key(root_path, name, i, arr.ndim), arr) for i in range(n)]
        del group[digest_name(name)]
        d = group.create_array(
            digest_name(name), shape=(n,), chunks=(1,), dtype="int64", fill_value=-1, compressors=None
        )
        d[:] = np.asarray(tails, dtype=np.int64)
    for key in ("store_id", "digest_form", "digest_root", "manifest_sha256"):
        m.pop(key, None)
    for entries in [m["arrays"], m.get("static") or {}] + [t["arrays"] for t in (m.get("targets") or {}).values()]:
        for entry in entries.values():
            entry.pop("meta_sha256", None)
    group.attrs["kdpipe"] = m


def train_kd(cli_runner, store, tmp_path, method="kd"):
    args = ["train-student", "--store", store, "--student", "resnet8", "--method", method, "--epochs", "1"]
    return cli_runner.invoke(cli, args + ["--out", str(tmp_path / "runs")])


# ------------------------------------------------------- 1. chunks moved with their digests
def test_chunks_swapped_with_their_digest_files_are_refused(store_copy, cli_runner, tmp_path):
    path = store_copy["path"]
    swap(chunk_file(path, "logits", 1), chunk_file(path, "logits", 2))
    swap(digest_file(path, "logits", 1), digest_file(path, "logits", 2))
    with pytest.raises(StoreError, match=r"logits \(chunk 1, samples 8\.\.15\).*swapped or replaced"):
        open_store(path)
    result = cli_runner.invoke(cli, ["inspect", path, "--verify"])
    assert "DAMAGED     logits chunk 1" in result.output and "DAMAGED     logits chunk 2" in result.output
    one_sentence(result)
    line = one_sentence(train_kd(cli_runner, path, tmp_path), code=2)
    assert "logits" in line and "samples 8..15" in line


def test_a_chunk_and_digest_from_another_store_of_the_same_teacher_are_refused(tmp_path, cli_runner):
    ours, theirs = tiny(tmp_path, "a.zarr", seed=0), tiny(tmp_path, "b.zarr", seed=1)
    for src, dst in ((chunk_file(theirs, "logits", 0), chunk_file(ours, "logits", 0)),):
        shutil.copyfile(src, dst)
    shutil.copyfile(digest_file(theirs, "logits", 0), digest_file(ours, "logits", 0))
    with pytest.raises(StoreError, match=r"logits \(chunk 0, samples 0\.\.7\).*another position, array or store"):
        open_store(ours)
    # the read-time content check catches it too (a reader opened without the open check)
    reader = open_store(ours, check=False)
    with pytest.raises(StoreError, match=r"logits \(chunk 0, samples 0\.\.7\).*array or store"):
        reader["logits"][2:4]
    result = cli_runner.invoke(cli, ["inspect", ours, "--verify"])
    assert "DAMAGED     logits chunk 0" in result.output
    one_sentence(result)


def test_a_moved_digest_row_alone_breaks_the_recorded_root(tmp_path):
    path = tiny(tmp_path)
    import zarr

    d = zarr.open_group(path, mode="r+")[digest_name("cam")]
    row = np.asarray(d[0])
    row[1] ^= 1  # the content digest only: the locator still matches the chunk
    d[0] = row
    with pytest.raises(StoreError, match="do not match the root its manifest records"):
        open_store(path)


def test_the_digest_api_checks_one_chunk_object(tmp_path):
    """What a node-local copy or cache calls per chunk (or shard) object it holds."""
    path = tiny(tmp_path)
    reader = open_store(path)
    store_id = reader.manifest.store_id
    recorded = np.asarray(reader.group[digest_name("logits")][...])
    data0 = chunk_file(path, "logits", 0).read_bytes()
    data1 = chunk_file(path, "logits", 1).read_bytes()
    # the content digest binds every byte; a shard's locator also hashes its first and last
    # rows' crc32c (kdpipe.artifacts.integrity._locator_bytes), so compare the content digest
    assert int(recorded[0][1]) == chunk_digests(store_id, "logits", 0, data0)[1]
    assert check_chunk(store_id, "logits", 0, data0, recorded[0]) is None
    assert "swapped or replaced" in check_chunk(store_id, "logits", 0, data1, recorded[0])  # another position
    assert "swapped or replaced" in check_chunk(store_id, "cam", 0, data0, recorded[0])  # another array
    assert "swapped or replaced" in check_chunk("other", "logits", 0, data0, recorded[0])  # another store


# ------------------------------------------------------------- 2. edited array metadata
def drop_crc32c(doc: dict) -> None:
    """Remove every crc32c codec of an array's zarr.json: its own and, for a sharded array
    (the row layout), its inner chunks' and its index's."""

    def strip(codecs: list) -> list:
        kept = []
        for codec in codecs:
            if codec.get("name") == "crc32c":
                continue
            config = codec.get("configuration") or {}
            for key in ("codecs", "index_codecs"):
                if key in config:
                    config[key] = strip(config[key])
            kept.append(codec)
        return kept

    doc["codecs"] = strip(doc["codecs"])


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda d: d.update(data_type="int16"), "data type int16, its manifest records float16"),
        (drop_crc32c, "no crc32c codec"),
        (lambda d: d["chunk_grid"]["configuration"].update(chunk_shape=[4, 50, 4]), "chunking or codecs edited"),
        (lambda d: d.update(shape=[30, 50, 4]), "shape [30, 50, 4], its manifest records [32, 50, 4]"),
    ],
    ids=["dtype", "crc32c removed", "chunking", "shape"],
)
def test_edited_array_metadata_is_refused(store_copy, cli_runner, tmp_path, edit, words):
    path = store_copy["path"]
    edit_array_meta(path, "logits", edit)
    with pytest.raises(StoreError, match=r"logits at .* is damaged: its zarr.json"):
        open_store(path)
    result = cli_runner.invoke(cli, ["inspect", path, "--verify"])
    assert "DAMAGED     logits whole array" in result.output and words in result.output
    one_sentence(result)
    line = one_sentence(train_kd(cli_runner, path, tmp_path))
    assert "logits" in line and words in line


def test_edited_labels_shape_is_one_sentence_not_an_lda_error(store_copy, cli_runner):
    path = store_copy["path"]
    edit_array_meta(path, "labels", lambda d: d.update(shape=[30]))
    result = cli_runner.invoke(
        cli, ["cluster", path, "--name", "again", "--k-penult", "8", "--k-inter", "2", "--executor", "inline"]
    )
    line = one_sentence(result)
    assert "labels" in line and "shape [30]" in line


def test_an_old_store_refuses_edited_dtype_and_removed_crc32c_too(tmp_path):
    path = tiny(tmp_path)
    make_legacy(path)
    open_store(path)
    edit_array_meta(path, "cam", lambda d: d.update(data_type="int16"))
    with pytest.raises(StoreError, match="cam at .* data type int16"):
        open_store(path)
    edit_array_meta(path, "cam", lambda d: d.update(data_type="float16"))
    edit_array_meta(path, "cam", drop_crc32c)
    with pytest.raises(StoreError, match="cam at .* no crc32c codec"):
        open_store(path)


# --------------------------------------------------------------------- 3. edited manifest
def test_edited_num_views_is_refused_everywhere(store_copy, cli_runner, tmp_path):
    path = store_copy["path"]
    edit_manifest(path, lambda m: m["views"].update(num_views=3))
    line = one_sentence(cli_runner.invoke(cli, ["inspect", path, "--verify"]))
    assert "num_views is 3" in line and "holds 50 views" in line
    assert "num_views" in one_sentence(train_kd(cli_runner, path, tmp_path))
    line = one_sentence(cli_runner.invoke(cli, ["cluster", path, "--name", "x", "--executor", "inline"]))
    assert "num_views" in line


def test_complete_with_a_shard_missing_is_refused(tmp_path):
    path = tiny(tmp_path)
    edit_manifest(path, lambda m: m.update(shards_done=[0, 2]))
    with pytest.raises(StoreError, match=r"complete is true but shards_done lacks shards \[1\]"):
        open_store(path)
    # the shards_done array itself disagreeing with complete (an older store, no seal)
    path = tiny(tmp_path, "b.zarr")
    import zarr

    zarr.open_group(path, mode="r+")["shards_done"][1] = 0
    with pytest.raises(StoreError, match="says it is complete, but its shards_done array records 2 of 3"):
        open_store(path)


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m["views"].update(seed=1),
        lambda m: m["dataset"].update(name="cifar100"),
        lambda m: m["teacher"].update(arch="resnet20"),
        lambda m: m["arrays"]["logits"].update(meaning="x"),
    ],
    ids=["views.seed", "dataset.name", "teacher.arch", "array meaning"],
)
def test_any_other_manifest_edit_breaks_its_seal(tmp_path, change):
    path = tiny(tmp_path)
    edit_manifest(path, change)
    with pytest.raises(StoreError, match="does not match the digest it was written with"):
        open_store(path, allow_incomplete=True)
    edit_manifest(path, lambda m: m.pop("manifest_sha256"))  # and the seal dropped with it
    with pytest.raises(StoreError, match="has lost the digest it was written with"):
        open_store(path, allow_incomplete=True)


def test_the_manifest_is_one_typed_record(tmp_path):
    path = tiny(tmp_path)
    m = open_store(path).manifest
    assert isinstance(m, Manifest) and m.views.num_views == 2 and m.views.pad_mode == "constant"
    assert m.dataset.num_samples == N and m.arrays["logits"].dtype == "float16" and m.complete
    assert m.digest_form == 2 and m.store_id and m.digest_root and m.manifest_sha256
    assert m["views"]["num_views"] == 2  # the read-only mapping view (transition)
    assert Manifest.from_json(m.to_json()) == m


# --------------------------------------------------- 4. target sets and data-set mismatches
def test_a_target_set_with_edited_k_penult_is_one_sentence(store_copy, cli_runner, tmp_path):
    path = store_copy["path"]
    edit_manifest(path, lambda m: m["targets"]["default"]["attrs"].update(k_penult=4))
    assert "does not match the digest" in one_sentence(train_kd(cli_runner, path, tmp_path, "letkd2"))
    # an older store (no seal): the record is checked against its own arrays
    make_legacy(path)
    line = one_sentence(train_kd(cli_runner, path, tmp_path, "letkd2"))
    assert "disagrees with its arrays" in line and "penult_centers has shape [8," in line


def test_a_target_set_with_edited_grid_is_one_sentence(store_copy):
    path = store_copy["path"]
    make_legacy(path)
    edit_manifest(path, lambda m: m["targets"]["default"]["attrs"].update(inter_grid=[1, 1]))
    with pytest.raises(StoreError, match="subclass_idx has shape .* the settings make a \\(1, 1\\) grid"):
        open_store(path).target_set("default")


def test_cluster_data_of_another_data_set_is_the_mismatch_message(store_copy, cli_runner):
    other = "synthetic:n=32,classes=4,size=16,seed=5"
    line = one_sentence(
        cli_runner.invoke(cli, ["cluster", store_copy["path"], "--name", "y", "--data", other, "--executor", "inline"])
    )
    assert "was made from data set" in line and "fingerprint" in line


def test_an_edited_fingerprint_does_not_blame_ray_workers(store_copy, cli_runner):
    path = store_copy["path"]
    make_legacy(path)
    edit_manifest(path, lambda m: m["dataset"].update(fingerprint="0" * 64))
    line = one_sentence(cli_runner.invoke(cli, ["cluster", path, "--name", "z", "--executor", "inline"]))
    assert "was made from data set" in line and "worker" not in line


# ------------------------------------------------------------ 12. garbage array metadata
def test_inspect_on_a_garbage_array_zarr_json_is_one_sentence(store_copy, cli_runner):
    path = store_copy["path"]
    Path(path, "logits", "zarr.json").write_text("garbage {")
    line = one_sentence(cli_runner.invoke(cli, ["inspect", path]))
    assert "logits" in line and "metadata" in line
    line = one_sentence(cli_runner.invoke(cli, ["inspect", path, "--verify"]))
    assert "logits" in line


def test_garbage_control_and_digest_metadata_is_one_sentence(store_copy, cli_runner):
    path = store_copy["path"]
    meta = Path(path, digest_name("logits"), "zarr.json")
    meta.write_text("garbage {")
    assert "metadata is damaged" in one_sentence(cli_runner.invoke(cli, ["inspect", path, "--verify"]))
    shutil.copytree(Path(store_copy["root"], "store.zarr", digest_name("logits")), meta.parent, dirs_exist_ok=True)
    Path(path, "shards_done", "zarr.json").write_text("garbage {")
    assert "shards_done" in one_sentence(cli_runner.invoke(cli, ["inspect", path]))
    with pytest.raises(StoreError, match="shards_done at .* cannot be read"):
        open_store(path)


def test_an_old_store_refuses_a_manifest_that_disagrees_with_itself(tmp_path):
    for change, words in [
        (lambda m: m["teacher"].update(num_classes=7), "teacher.num_classes is 7, but logits hold 5"),
        (lambda m: m["dataset"].update(num_samples=16), "array views has"),
        (lambda m: m.update(num_shards=2), "num_shards is 2"),
        (lambda m: m.update(shard_size=0), "shard size 0"),
        (lambda m: m["arrays"]["cam"].update(shape=[20, 3, 5, 4, 4]), "array cam holds 3 views"),
    ]:
        path = tiny(tmp_path, f"s{len(list(tmp_path.iterdir()))}.zarr")
        make_legacy(path)
        edit_manifest(path, change)
        with pytest.raises(StoreError, match=f"damaged manifest.*{words}"):
            open_store(path)


# ------------------------------------------------------------------------ old stores
def test_an_old_store_opens_trains_and_verify_names_its_digest_form(store_copy, cli_runner, tmp_path):
    path = store_copy["path"]
    make_legacy(path)
    reader = open_store(path)
    assert reader.manifest.digest_form == 1 and reader.manifest.store_id is None
    result = cli_runner.invoke(cli, ["inspect", path, "--verify"])
    assert result.exit_code == 0, result.output
    assert "the older form" in result.output and "every chunk" in result.output
    result = train_kd(cli_runner, path, tmp_path)
    assert result.exit_code == 0, result.output
    # its bare digests still refuse a plain swap
    swap(chunk_file(path, "logits", 0), chunk_file(path, "logits", 1))
    with pytest.raises(StoreError, match="logits .*swapped or replaced"):
        open_store(path)


def test_cluster_adds_a_target_set_to_an_old_store_in_its_own_form(tmp_path):
    path = tiny(tmp_path)
    make_legacy(path)
    t = StoreWriter.open_for_targets(path)
    t.write_target_array("T", "subclass_scores", np.eye(4, dtype=np.float32))
    t.finish_target_set("T")
    r = open_store(path)
    assert r.group[digest_name("targets/T/subclass_scores")].ndim == 1 and r.manifest.manifest_sha256
    np.testing.assert_array_equal(r["targets/T/subclass_scores"][...], np.eye(4))
