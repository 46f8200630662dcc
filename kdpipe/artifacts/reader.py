"""Reading a kdpipe store, read-only, so any number of student runs can share one at once.

    store = open_store("runs/rn32x4-cifar100.zarr")      # refuses an incomplete store
    store.check_dataset(dataset)                          # fingerprint, classes, normalisation
    store.check_teacher("ckpt_epoch_240.pth")             # optional: sha256 of the checkpoint
    cams = store["cam_r2"][idx]                           # zarr array, sliced -> numpy
    store.has("feat/inter"); store.target_sets(); store.manifest.views.num_views

Every refusal is a StoreError (or DataError for a data-set mismatch) with one sentence.
"""

from __future__ import annotations

import numpy as np

from kdpipe.artifacts.integrity import (
    DIGESTS,
    CheckedArray,
    Damage,
    check_store,
    digest_name,
    digest_root,
    verify_store,
)
from kdpipe.artifacts.manifest import Manifest, read_manifest
from kdpipe.artifacts.schema import SCHEMA_VERSION, SHARDS_DONE, STATIC_GROUP, TARGETS_GROUP
from kdpipe.artifacts.target_set import TargetSet, check_arrays
from kdpipe.artifacts.writer import _open_group, _path, store_exists
from kdpipe.errors import DataError, StoreError


def open_store(path, allow_incomplete: bool = False, check: bool = True) -> StoreReader:
    """Open the store at `path` (local path or fsspec URL) read-only.

    Refuses a missing path, a zarr group that is not a kdpipe store, another schema version
    and, unless `allow_incomplete` (inspect uses it), a store whose `complete` flag is unset.
    The manifest is checked always (types, agreement, its seal: ``kdpipe.artifacts.manifest``).
    A complete store is checked (``check``): every array's metadata as the manifest records it,
    every chunk and chunk digest present, in place and of this store, and the digests' root
    (``kdpipe.artifacts.integrity.check_store``; no decoding, one small read per chunk).
    """
    path = _path(path)
    if not store_exists(path):
        raise StoreError(f"There is no kdpipe store at {path}.")
    reader = StoreReader(path, _open_group(path, "r"))
    if not allow_incomplete:
        reader.require_complete()
        if check:
            reader.refuse_damage()
    return reader


class StoreReader:
    """A read-only view of one store: its manifest and its arrays."""

    def __init__(self, path: str, group):
        self.path = path
        self.group = group
        #: the typed manifest (``kdpipe.artifacts.manifest.Manifest``)
        self.manifest: Manifest = read_manifest(group, path, schema_version=SCHEMA_VERSION)
        self._arrays: dict = {}

    def __repr__(self):
        return f"StoreReader({self.path!r})"

    # ----- arrays --------------------------------------------------------------------------

    def has(self, name: str) -> bool:
        try:
            return name in self.group and hasattr(self.group[name], "shape")
        except Exception:  # noqa: BLE001 - damaged metadata: refused when the array is read
            return True

    # ----- integrity -----------------------------------------------------------------------

    def checked_arrays(self) -> list[str]:
        """Every array integrity covers: the extraction's, the static ones and the complete
        target sets' checked arrays."""
        return list(self.manifest.checked_arrays())

    def damage(self, decode: bool = False) -> list:
        """Damaged arrays and chunks (``kdpipe.artifacts.integrity``), else a digest root that
        differs from the manifest's; ``decode`` reads every chunk too (``inspect --verify``)."""
        fn = verify_store if decode else check_store
        records = self.manifest.checked_arrays()
        expected = {name: rec.expectation() for name, rec in records.items()}
        try:
            found = fn(self.group, self.path, list(records), self.manifest.binding, expected)
            if not found and self.manifest.digest_root is not None and self.manifest.complete:
                found = self._root_damage(records)
            return found
        except StoreError:
            raise
        except Exception as err:  # noqa: BLE001 - damaged metadata of an array
            raise StoreError(
                f"The store at {self.path} cannot be checked ({type(err).__name__}: {err}); its "
                "metadata is damaged: re-extract it."
            ) from None

    def _root_damage(self, records: dict) -> list:
        digests = {name: np.asarray(self.group[digest_name(name)][...]) for name in records}
        if digest_root(digests) == self.manifest.digest_root:
            return []
        what = (
            "its chunk digests do not match the root its manifest records (a digest file was moved, "
            "replaced or copied from another store)"
        )
        return [Damage(DIGESTS, None, None, None, what)]

    def refuse_damage(self) -> StoreReader:
        """One sentence for the first damaged chunk, with the count of all of them."""
        found = self.damage()
        if found:
            more = (
                f" ({len(found)} damaged in all; `kdpipe inspect {self.path} --verify` lists them)"
                if len(found) > 1
                else ""
            )
            raise StoreError(found[0].sentence(self.path) + more + "; re-extract or re-cluster it.")
        return self

    def array(self, name: str):
        """The array `name` (e.g. "logits", "cam_r2", "feat/penult", "targets/T/subclass_scores"):
        a zarr array whose reads turn a damaged chunk into one sentence (``CheckedArray``)."""
        arr = self._arrays.get(name)
        if arr is None:
            if not self.has(name):
                known = ", ".join(self.array_names()) or "none"
                raise StoreError(f"The store at {self.path} has no array {name} (it has: {known}).")
            try:
                arr = CheckedArray(
                    self.group[name],
                    name,
                    self.path,
                    self.manifest.binding,
                    digests=(lambda: self.group[digest_name(name)][...]) if digest_name(name) in self.group else None,
                )
            except Exception as err:  # noqa: BLE001 - a garbage zarr.json of the array
                raise StoreError(
                    f"The store array {name} at {self.path} cannot be opened ({type(err).__name__}); "
                    "its metadata is damaged: re-extract the store."
                ) from None
            self._arrays[name] = arr
        return arr

    __getitem__ = array

    def row_reader(self, name: str):
        """A ``kdpipe.artifacts.row_reads.RowReader`` of array ``name`` when it is stored in the
        row layout (one inner chunk per (sample, view) row), else None (read it with ``array``)."""
        from kdpipe.artifacts.row_reads import row_reader

        readers = self.__dict__.setdefault("_row_readers", {})
        if name not in readers:
            readers[name] = row_reader(self.path, name) if self.has(name) else None
        return readers[name]

    def array_names(self) -> list[str]:
        """Per-sample arrays of the extraction, as recorded in the manifest."""
        return [n for n in self.manifest.arrays if self.has(n)]

    def static_names(self) -> list[str]:
        """The whole arrays extraction wrote once (``static/<name>``), e.g. the teacher's classifier."""
        return sorted(self.manifest.static)

    def static(self, name: str) -> np.ndarray:
        """The whole array static/<name> as numpy (checked as every array is)."""
        if name not in self.manifest.static:
            raise StoreError(
                f"The store at {self.path} has no static array {name} (it has: "
                f"{', '.join(self.static_names()) or 'none'}); re-extract it with the method named."
            )
        return np.asarray(self.array(f"{STATIC_GROUP}/{name}")[...])

    def target_sets(self, include_incomplete: bool = False) -> list[str]:
        """Names of the target sets under targets/ (complete ones unless include_incomplete)."""
        return sorted(n for n, e in self.manifest.targets.items() if include_incomplete or e.complete)

    def target_attrs(self, name: str) -> dict:
        sets = self.manifest.targets
        if name not in sets:
            raise StoreError(
                f"The store at {self.path} has no target set {name} "
                f"(it has: {', '.join(sorted(sets)) or 'none'}); run `kdpipe cluster` first."
            )
        return dict(sets[name].attrs)

    def target_set(self, name: str, include_incomplete: bool = False) -> TargetSet:
        """The typed record of target set ``name`` (``kdpipe.artifacts.target_set.TargetSet``)."""
        entry = self.manifest.targets.get(name)
        if entry is None or not (include_incomplete or entry.complete):
            have = ", ".join(self.target_sets()) or "none"
            raise StoreError(
                f"The store at {self.path} has no complete target set {name!r} (it has: {have}); "
                f"run `kdpipe cluster {self.path} --name {name}` first."
            )
        where = f"the store at {self.path}"
        info = TargetSet.from_json(name, entry.attrs, where=where)
        if entry.complete:
            shapes = {short: tuple(rec.shape) for short, rec in entry.arrays.items()}
            check_arrays(info, shapes, self.manifest.dataset.num_classes, where)
        return info

    # ----- state ---------------------------------------------------------------------------

    @property
    def num_samples(self) -> int:
        return self.manifest.num_samples

    @property
    def num_views(self) -> int:
        return self.manifest.num_views

    def done_shards(self) -> list[int]:
        """Shards written so far, read from the shards_done array (current even mid-run)."""
        try:
            if SHARDS_DONE not in self.group:
                return list(self.manifest.shards_done)
            return [int(i) for i in np.flatnonzero(self.group[SHARDS_DONE][:])]
        except Exception as err:  # noqa: BLE001 - a garbage zarr.json or chunk of the control array
            raise StoreError(
                f"The store array {SHARDS_DONE} at {self.path} cannot be read ({type(err).__name__}); "
                "its metadata is damaged: re-extract the store."
            ) from None

    def is_complete(self) -> bool:
        return self.manifest.complete

    def require_complete(self) -> StoreReader:
        if self.is_complete() and len(self.done_shards()) != self.manifest.num_shards:
            raise StoreError(
                f"The store at {self.path} says it is complete, but its {SHARDS_DONE} array records "
                f"{len(self.done_shards())} of {self.manifest.num_shards} shards written; finish it with "
                "`kdpipe extract-teacher --resume`."
            )
        if not self.is_complete():
            done, total = len(self.done_shards()), self.manifest.num_shards
            raise StoreError(
                f"The store at {self.path} is incomplete ({done} of {total} shards written); "
                "finish it with `kdpipe extract-teacher --resume`."
            )
        return self

    # ----- checks --------------------------------------------------------------------------

    def check_dataset(self, dataset) -> StoreReader:
        """Refuse a data set other than the one the store was made from."""
        d = self.manifest.dataset
        name = getattr(dataset, "name", "?")
        if d.fingerprint != getattr(dataset, "fingerprint", None):
            raise DataError(
                f"The store at {self.path} was made from data set {d.name} "
                f"({d.split}, fingerprint {str(d.fingerprint)[:12]}), not from this "
                f"{name} ({getattr(dataset, 'split', '?')}, fingerprint "
                f"{str(getattr(dataset, 'fingerprint', None))[:12]})."
            )
        if d.num_classes != int(dataset.num_classes):
            raise DataError(
                f"The store at {self.path} has {d.num_classes} classes, the data set {name} has {dataset.num_classes}."
            )
        if d.num_samples != len(dataset):
            raise DataError(
                f"The store at {self.path} has {d.num_samples} samples, the data set {name} has {len(dataset)}."
            )
        for key in ("mean", "std"):
            a, b = getattr(d, key), getattr(dataset, key, None)
            if (
                a is not None
                and b is not None
                and not np.allclose(np.asarray(a, float), np.asarray(b, float), rtol=0, atol=1e-6)
            ):
                raise DataError(
                    f"The store at {self.path} was made with normalisation {key} {list(a)}, "
                    f"the data set {name} uses {list(b)}."
                )
        return self

    def check_teacher(self, ckpt_path) -> StoreReader:
        """Refuse when the checkpoint file's sha256 differs from the one the store was made with."""
        from kdpipe.artifacts.fingerprint import sha256_file

        want = self.manifest.teacher.sha256
        got = sha256_file(ckpt_path)
        if want != got:
            raise StoreError(
                f"The store at {self.path} was made with another teacher checkpoint "
                f"(sha256 {str(want)[:12]}), not {ckpt_path} (sha256 {got[:12]})."
            )
        return self

    # ----- sizes ---------------------------------------------------------------------------

    def array_info(self) -> list[dict]:
        """Per array: name, shape, dtype, chunks, raw bytes, stored bytes, compression ratio."""
        out = []
        names = list(self.array_names())
        for t in self.target_sets(include_incomplete=True):
            for a in self.manifest.targets[t].arrays:
                names.append(f"{TARGETS_GROUP}/{t}/{a}")
        for name in names:
            if not self.has(name):
                continue
            try:
                arr = self.group[name]
                raw = int(arr.nbytes)
                stored = int(arr.nbytes_stored())
            except Exception as err:  # noqa: BLE001 - a garbage or edited zarr.json of the array
                raise StoreError(
                    f"The store array {name} at {self.path} cannot be opened ({type(err).__name__}); "
                    "its metadata is damaged: re-extract the store."
                ) from None
            out.append(
                {
                    "name": name,
                    "shape": tuple(arr.shape),
                    "dtype": str(arr.dtype),
                    "chunks": tuple(getattr(arr, "shards", None) or arr.chunks),  # objects: shards
                    "bytes": raw,
                    "stored_bytes": stored,
                    "ratio": raw / stored if stored else float("inf"),
                }
            )
        return out
