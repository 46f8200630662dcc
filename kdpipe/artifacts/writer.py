"""Writing a kdpipe store: created by the driver, filled shard by shard, marked complete last.

Extraction (``kdpipe extract-teacher``)::

    w = StoreWriter.create(path, manifest, specs, overwrite=False)   # driver: group + empty arrays
    w = StoreWriter.open_for_resume(path, manifest)                  # driver, --resume
    # workers (one task per shard; a shard owns whole chunks of every array):
    sw = StoreWriter.open(path)
    sw.write_rows("logits", start, block)                            # rows [start, start+len)
    sw.mark_shard_done(shard_id)                                     # its own chunk of shards_done
    # driver, at the end:
    w.finalize()        # every shard done -> manifest shards_done + complete=True; else StoreError

Parallel writers never touch the group attrs: a worker writes only its own chunks and its own
chunk of the ``shards_done`` array; only the driver writes the manifest.

Target sets (``kdpipe cluster`` adds ``targets/<name>/`` to a complete store)::

    w = StoreWriter.open_for_targets(path)             # refuses an incomplete or foreign store
    w.write_target_array("T", "penult_centers", centers, meaning="K-means centres [K, D]")
    arr = w.create_target_array("T", "subclass_idx", shape=(N, V, h, w), dtype="int32",
                                chunk_rows=..., meaning="...")    # for row-wise writes
    StoreWriter.open(path).write_rows("targets/T/subclass_idx", start, block)   # from workers
    w.set_target_attrs("T", {"K": 8, "k": 16, "temperature": 1.0, "seed": 0})
    w.finish_target_set("T")                           # readers list it in target_sets()
    w.delete_target_set("T")                           # re-running cluster with the same name
    w.delete_arrays(["feat/inter"])                    # --drop-features: arrays + manifest

Target arrays keep the dtype they are given (numeric only: no object/string arrays, no
pickles); attrs must be JSON. The manifest (``kdpipe.artifacts.manifest``, read and written
there only) records each target set under ``targets[name]`` (arrays, attrs, complete); the
same attrs are also on the ``targets/<name>`` group itself. The manifest records each array's
zarr.json digest, and, once the store (or a target set) is complete, the root over every
chunk digest (``kdpipe.artifacts.integrity``).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Literal

import numpy as np

from kdpipe import storage
from kdpipe.artifacts import manifest as _manifest
from kdpipe.artifacts.integrity import (
    ARRAY_CONFIG,
    digest_name,
    digest_root,
    metadata_digest,
    num_chunks,
    read_metadata,
    record_digests,
)
from kdpipe.artifacts.manifest import Manifest, same_plan
from kdpipe.artifacts.row_reads import write_shards
from kdpipe.artifacts.schema import (
    SCHEMA_VERSION,
    SHARDS_DONE,
    STATIC_GROUP,
    TARGETS_GROUP,
    ArraySpec,
    compressors,
)
from kdpipe.errors import StoreError

#: The modes ``zarr.open_group`` accepts.
ZarrMode = Literal["r", "r+", "a", "w", "w-"]


def _path(path) -> str:
    """Local paths absolute, ``file://`` URLs local, other URLs as given (``kdpipe.storage``)."""
    return storage.normalize(path)


def _fs(path: str):
    return storage.filesystem(path)


def store_exists(path) -> bool:
    """True when anything exists at `path` (a local path or fsspec URL)."""
    return storage.exists(path)


def _open_group(path: str, mode: ZarrMode):
    import zarr

    try:
        return zarr.open_group(store=path, mode=mode)
    except (FileNotFoundError, KeyError):
        raise StoreError(f"There is no kdpipe store at {path}.") from None
    except Exception as err:  # noqa: BLE001 - zarr raises several kinds for a non-group path
        raise StoreError(f"{path} is not a zarr store kdpipe can open ({type(err).__name__}: {err}).") from None


def _kdpipe_group(path: str):
    """The zarr group at ``path`` when it carries a kdpipe manifest (in any state), else None."""
    if not store_exists(path):
        return None
    try:
        import zarr

        g = zarr.open_group(store=path, mode="r")
    except Exception:  # noqa: BLE001
        return None
    return g if _manifest.has_manifest(g) else None


def read_manifest(path) -> Manifest | None:
    """The manifest of the store at `path`, or None when there is no kdpipe store there; a
    damaged manifest is one sentence (StoreError)."""
    path = _path(path)
    group = _kdpipe_group(path)
    return None if group is None else _manifest.read_manifest(group, path)


def remove_store(path) -> None:
    """Delete the kdpipe store at `path`; refuses to delete anything that is not a kdpipe store."""
    path = _path(path)
    if not store_exists(path):
        return
    if _kdpipe_group(path) is None:
        if not storage.is_url(path) and os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)
            return
        raise StoreError(f"{path} exists and is not a kdpipe store; refusing to overwrite it.")
    if storage.is_url(path):
        fs, p = _fs(path)
        fs.rm(p, recursive=True)
    else:
        shutil.rmtree(path)


def _empty_folder(path: str) -> bool:
    return not storage.is_url(path) and os.path.isdir(path) and not os.listdir(path)


def existing_store(path) -> bool:
    """True when a kdpipe store is at ``path``; False when nothing or an empty folder is; a
    file, or a folder holding something else, is one sentence (never a store to write over)."""
    path = _path(path)
    if not store_exists(path) or _empty_folder(path):
        return False
    if _kdpipe_group(path) is not None:
        return True
    if not storage.is_url(path) and os.path.isfile(path):
        raise StoreError(f"{path} is a file, not a store; choose another --out.")
    raise StoreError(
        f"{path} is a folder with other contents, not a kdpipe store; choose another --out "
        "(kdpipe never deletes what it did not write)."
    )


def _refuse_foreign(path: str) -> None:
    existing_store(path)


def _check_numeric(name: str, data: np.ndarray) -> np.ndarray:
    data = np.asarray(data)
    if data.dtype.kind not in "biuf":
        raise StoreError(f"Store array {name} must be numeric (bool, int or float), not {data.dtype}.")
    return data


def _check_json(what: str, obj) -> None:
    try:
        json.dumps(obj, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise StoreError(f"{what} must be plain JSON (no NaN, no objects): {err}.") from None


#: Per-view arrays [N, V, ...] (every array with more than one view, ``views`` excepted) are
#: written as zarr v3 shards of the sample-block chunk shape whose inner chunks are one
#: (sample, view) row, so reading one row decodes that row only (``kdpipe.artifacts.row_reads``).
#: Stores written before this layout (plain (samples, all views, ...) chunks) read as they are.
ROW_CHUNKS = True
#: Blosc's compressor inside those rows: LZ4HC. c-blosc1 makes a zstd context for every chunk
#: it decodes, 30-55 us for a 2 KB row on this machine against 5-12 us for LZ4 (LZ4HC decodes
#: as LZ4, compresses more), and a row is decoded for every sample of every step. The price
#: is size: the benchmark's CIFAR-shaped store took 1.6 GB, 1.4 GB in zstd chunks
#: (benchmarks/target_reader.py, docs/BENCHMARKS.md).
ROW_CNAME: Literal["lz4hc"] = "lz4hc"


def row_layout(name: str, shape, chunks, dtype) -> dict:
    """``create_array``'s ``chunks``, ``shards`` and ``compressors`` for an array chunked as
    ``chunks`` (see ``ROW_CHUNKS``)."""
    shape, chunks = tuple(int(s) for s in shape), tuple(int(c) for c in chunks)
    if ROW_CHUNKS and name != "views" and len(shape) >= 2 and shape[1] > 1 and chunks:
        return {"shards": chunks, "chunks": (1, 1) + shape[2:], "compressors": compressors(dtype, ROW_CNAME)}
    return {"chunks": chunks or None, "compressors": compressors(dtype)}


def _create_digests(group, name: str, arr, bound: bool = True) -> None:
    """The digest array of ``name``: per chunk object its (locator, content) digests (``bound``,
    digest form 2) or its crc32c (a form-1 store), -1 until the chunk is written."""
    group.create_array(
        digest_name(name),
        shape=(num_chunks(arr), 2) if bound else (num_chunks(arr),),
        chunks=(1, 2) if bound else (1,),
        dtype="int64",
        fill_value=-1,
        compressors=None,
        overwrite=True,
    )


class StoreWriter:
    """Read-write handle on a store. Build it with one of the class methods below."""

    def __init__(self, path, group):
        self.path = _path(path)
        self.group = group
        self._arrays: dict = {}
        self._binding = None  # the manifest's store id and digest form, read once

    def _meta(self, name: str) -> str:
        """The sha256 of array ``name``'s zarr.json as just written (recorded in the manifest)."""
        return metadata_digest(read_metadata(self.path, name))

    # ----- opening -------------------------------------------------------------------------

    @classmethod
    def create(cls, path, manifest: Manifest | dict, specs: list[ArraySpec], overwrite: bool = False) -> StoreWriter:
        """Create a new store with empty arrays (chunks from `specs`) and an incomplete manifest."""
        import zarr

        path = _path(path)
        _refuse_foreign(path)
        if store_exists(path) and not _empty_folder(path):
            if not overwrite:
                raise StoreError(
                    f"A store already exists at {path}; pass --overwrite to replace it or --resume to continue it."
                )
            remove_store(path)
        group = zarr.open_group(store=path, mode="w")
        m = manifest if isinstance(manifest, Manifest) else Manifest.from_json(manifest, path)
        w = cls(path, group)
        for spec in specs:
            if not spec.chunks:
                raise ValueError(f"array spec {spec.name} has no chunks")
            arr = group.create_array(
                spec.name,
                shape=tuple(spec.shape),
                **row_layout(spec.name, spec.shape, spec.chunks, spec.dtype),
                dtype=spec.dtype,
                fill_value=0,
                config=ARRAY_CONFIG,
            )
            _create_digests(group, spec.name, arr, m.binding.bound)
        group.create_array(
            SHARDS_DONE, shape=(m.num_shards,), chunks=(1,), dtype="uint8", compressors=None, fill_value=0
        )
        doc = m.to_json()
        for name in doc["arrays"]:
            doc["arrays"][name]["meta_sha256"] = w._meta(name)
        doc.update(complete=False, shards_done=[])
        _manifest.write_manifest(group, doc, path)
        return w

    @classmethod
    def open(cls, path) -> StoreWriter:
        """Open an existing store read-write (workers writing their shards use this)."""
        path = _path(path)
        if not store_exists(path):
            raise StoreError(f"There is no kdpipe store at {path}.")
        group = _open_group(path, "r+")
        if not _manifest.has_manifest(group):
            raise StoreError(f"{path} is a zarr group but not a kdpipe store (it has no kdpipe manifest).")
        return cls(path, group)

    @classmethod
    def open_for_resume(cls, path, manifest: Manifest) -> StoreWriter:
        """Open a store to continue an interrupted extraction with the same inputs and layout."""
        w = cls.open(path)
        old = w.manifest
        diff = same_plan(old, manifest)
        if diff is not None:
            raise StoreError(
                f"The store at {w.path} was made with other settings than this run ({diff} "
                "differs); repeat the original options to resume, or pass --overwrite to replace it."
            )
        return w

    @classmethod
    def open_for_targets(cls, path) -> StoreWriter:
        """Open a complete store to add, replace or drop target sets and arrays (`kdpipe cluster`)."""
        w = cls.open(path)
        m = w.manifest
        if m.schema_version != SCHEMA_VERSION:
            raise StoreError(
                f"The store at {w.path} has schema version {m.schema_version}, "
                f"this kdpipe reads version {SCHEMA_VERSION}."
            )
        if not m.complete:
            raise StoreError(
                f"The store at {w.path} is incomplete; finish it with `kdpipe extract-teacher --resume` first."
            )
        return w

    # ----- manifest ------------------------------------------------------------------------

    @property
    def manifest(self) -> Manifest:
        """The typed manifest as stored now (``kdpipe.artifacts.manifest``)."""
        return _manifest.read_manifest(self.group, self.path)

    def update_manifest(self, **changes) -> Manifest:
        """Driver only: merge `changes` (JSON values) into the manifest and write it back."""
        return self._write(dict(self.manifest.to_json(), **changes))

    def _write(self, doc: dict, reroot: bool = False) -> Manifest:
        """Write the manifest JSON ``doc``; ``reroot``: a complete store records the root over
        every checked array's chunk digests (after the set of checked arrays changed)."""
        m = Manifest.from_json(doc, self.path)
        if reroot:
            root = self._digest_root(m) if m.complete else None
            m = m.replace(digest_root=root)
        return _manifest.write_manifest(self.group, m, self.path)

    def _digest_root(self, m: Manifest) -> str:
        digests = {}
        for name in m.checked_arrays():
            if digest_name(name) not in self.group:
                raise StoreError(f"The store at {self.path} has no chunk digests for {name}.")
            digests[name] = np.asarray(self.group[digest_name(name)][...])
        return digest_root(digests)

    def _store_id(self) -> str | None:
        if self._binding is None:
            self._binding = self.manifest.binding
        return self._binding.store_id if self._binding.bound else None

    # ----- shards --------------------------------------------------------------------------

    def array(self, name: str):
        arr = self._arrays.get(name)
        if arr is None:
            try:
                # zarr does not persist write_empty_chunks: ask for it on every handle that writes
                arr = self.group[name].with_config(ARRAY_CONFIG)
            except KeyError:
                raise StoreError(f"The store at {self.path} has no array {name}.") from None
            self._arrays[name] = arr
        return arr

    def write_rows(self, name: str, start: int, data) -> None:
        """Write `data` into rows [start, start + len(data)) of array `name` (chunk-aligned) and
        record the digests of the chunks written (``kdpipe.artifacts.integrity``)."""
        data = _check_numeric(name, data)
        arr = self.array(name)
        stop = start + data.shape[0]
        if not (getattr(arr, "shards", None) and write_shards(self.path, name, start, data)):
            arr[start:stop] = data.astype(arr.dtype, copy=False)
        if digest_name(name) in self.group and stop > start:
            rows = int((arr.shards or arr.chunks)[0])
            record_digests(self.group, self.path, name, start // rows, (stop - 1) // rows, self._store_id())

    def mark_shard_done(self, shard_id: int, array: str = SHARDS_DONE) -> None:
        """Mark shard ``shard_id`` written in the done array (extraction's ``shards_done``, or a
        target set's own, ``targets/<name>/shards_done``); each entry is its own chunk."""
        self.array(array)[int(shard_id)] = 1

    def done_shards(self, array: str = SHARDS_DONE) -> set[int]:
        return {int(i) for i in np.flatnonzero(self.array(array)[:])}

    def finalize(self) -> Manifest:
        """Driver, last step: record the done shards; set complete only when every shard is done."""
        done = sorted(self.done_shards())
        total = self.manifest.num_shards
        if len(done) != total:
            self.update_manifest(shards_done=done, complete=False)
            raise StoreError(
                f"The store at {self.path} is incomplete ({len(done)} of {total} shards written); "
                "re-run with --resume to finish it."
            )
        return self._write(dict(self.manifest.to_json(), shards_done=done, complete=True), reroot=True)

    def mark_incomplete(self) -> Manifest:
        """Driver, after a failure: record the shards done so far and leave complete false."""
        return self.update_manifest(shards_done=sorted(self.done_shards()), complete=False)

    # ----- whole arrays (extraction) -------------------------------------------------------

    def write_static(self, name: str, data, meaning: str = "") -> None:
        """Write (or replace) the whole array static/<name>, with chunk digests, and record it
        in manifest["static"] (driver only; idempotent, so a resume rewrites it)."""
        data = _check_numeric(name, np.asarray(data))
        full = f"{STATIC_GROUP}/{name}"
        for old in (full, digest_name(full)):
            if old in self.group:
                del self.group[old]
        shape = data.shape or (1,)
        arr = self.group.create_array(
            full,
            shape=shape,
            chunks=shape,
            dtype=data.dtype,
            compressors=compressors(data.dtype),
            fill_value=0,
            config=ARRAY_CONFIG,
        )
        _create_digests(self.group, full, arr, self._store_id() is not None)
        self._arrays.pop(full, None)
        self.write_rows(full, 0, data.reshape(shape))
        m = self.manifest.to_json()
        m.setdefault("static", {})[name] = {
            "shape": list(shape),
            "dtype": data.dtype.name,
            "meaning": meaning,
            "meta_sha256": self._meta(full),
        }
        self._write(m, reroot=True)

    # ----- target sets (kdpipe cluster) ----------------------------------------------------

    def _target_entry(self, m: dict, target: str) -> dict:
        if not target or "/" in target:
            raise StoreError(f"A target set name must be a non-empty name without '/', not {target!r}.")
        targets = m.setdefault("targets", {})
        return targets.setdefault(target, {"arrays": {}, "attrs": {}, "complete": False})

    def create_target_array(
        self,
        target: str,
        name: str,
        shape,
        dtype,
        chunk_rows: int | None = None,
        meaning: str = "",
        checked: bool = True,
    ):
        """Create an empty array targets/<target>/<name> (chunked along axis 0) for row writes;
        ``checked`` arrays get chunk digests (control arrays such as shards_done do not)."""
        dtype = np.dtype(dtype)
        if dtype.kind not in "biuf":
            raise StoreError(f"Target array {name} must be numeric, not {dtype}.")
        shape = tuple(int(s) for s in shape)
        rows = int(chunk_rows) if chunk_rows else max(1, shape[0] if shape else 1)
        chunks = (min(rows, max(1, shape[0])),) + shape[1:] if shape else ()
        full = f"{TARGETS_GROUP}/{target}/{name}"
        m = self.manifest.to_json()
        entry = self._target_entry(m, target)
        for old in (full, digest_name(full)):
            if old in self.group:
                del self.group[old]
        arr = self.group.create_array(
            full,
            shape=shape,
            **row_layout(name, shape, chunks, dtype),
            dtype=dtype,
            fill_value=0,
            config=ARRAY_CONFIG,
        )
        if checked:
            _create_digests(self.group, full, arr, self._store_id() is not None)
        arr = arr.with_config(ARRAY_CONFIG)
        entry["arrays"][name] = {
            "shape": list(shape),
            "dtype": dtype.name,
            "meaning": meaning,
            "chunks": list(chunks),
            "checked": bool(checked),
            "meta_sha256": self._meta(full),
        }
        was_complete, entry["complete"] = bool(entry.get("complete")), False
        self._write(m, reroot=was_complete)
        self._arrays[full] = arr
        return arr

    def write_target_array(self, target: str, name: str, data, meaning: str = "", chunk_rows: int | None = None):
        """Write a whole array targets/<target>/<name> (replacing one of that name)."""
        data = _check_numeric(name, data)
        arr = self.create_target_array(target, name, data.shape, data.dtype, chunk_rows, meaning)
        self.write_rows(f"{TARGETS_GROUP}/{target}/{name}", 0, data.reshape(data.shape or (1,)))
        return arr

    def set_target_attrs(self, target: str, attrs: dict) -> None:
        """Merge JSON `attrs` (K, k, temperature, retained mass, seed, ...) into the target set."""
        _check_json(f"The attrs of target set {target}", attrs)
        m = self.manifest.to_json()
        entry = self._target_entry(m, target)
        entry["attrs"].update(attrs)
        full = f"{TARGETS_GROUP}/{target}"
        grp = self.group.require_group(full)
        grp.attrs.update(attrs)
        self._write(m)

    def finish_target_set(self, target: str) -> None:
        """Mark a target set complete: readers list only complete target sets."""
        m = self.manifest.to_json()
        entry = self._target_entry(m, target)
        entry["complete"] = True
        self._write(m, reroot=True)

    def delete_target_set(self, target: str) -> None:
        m = self.manifest.to_json()
        full = f"{TARGETS_GROUP}/{target}"
        for old in (full, digest_name(full)):
            if old in self.group:
                del self.group[old]
        m.setdefault("targets", {}).pop(target, None)
        self._arrays = {k: v for k, v in self._arrays.items() if not k.startswith(full + "/")}
        self._write(m, reroot=True)

    def delete_arrays(self, names) -> list[str]:
        """Drop per-sample arrays (e.g. ["feat/inter"] for --drop-features); updates the manifest."""
        m = self.manifest.to_json()
        dropped = []
        for name in names:
            if name == SHARDS_DONE or name.startswith(TARGETS_GROUP + "/"):
                raise StoreError(f"{name} cannot be dropped with delete_arrays.")
            for old in (name, digest_name(name)):
                if old in self.group:
                    del self.group[old]
            if m["arrays"].pop(name, None) is not None:
                dropped.append(name)
            if name.startswith("feat/"):
                layer = name.split("/", 1)[1]
                m["layers"] = [x for x in m.get("layers", []) if x != layer]
            self._arrays.pop(name, None)
        self._write(m, reroot=True)
        return dropped
