"""Reading a kdpipe store, read-only, so any number of student runs can share one at once.

    store = open_store("runs/rn32x4-cifar100.zarr")      # refuses an incomplete store
    store.check_dataset(dataset)                          # fingerprint, classes, normalisation
    store.check_teacher("ckpt_epoch_240.pth")             # optional: sha256 of the checkpoint
    cams = store["cam_r2"][idx]                           # zarr array, sliced -> numpy
    store.has("feat/inter"); store.target_sets(); store.manifest["views"]

Every refusal is a StoreError (or DataError for a data-set mismatch) with one sentence.
"""

from __future__ import annotations

import numpy as np

from kdpipe.artifacts.integrity import CheckedArray, check_store, verify_store
from kdpipe.artifacts.schema import MANIFEST_ATTR, SCHEMA_VERSION, SHARDS_DONE, STATIC_GROUP, TARGETS_GROUP
from kdpipe.artifacts.target_set import TargetSet
from kdpipe.artifacts.writer import _open_group, _path, store_exists
from kdpipe.errors import DataError, StoreError


def open_store(path, allow_incomplete: bool = False, check: bool = True) -> StoreReader:
    """Open the store at `path` (local path or fsspec URL) read-only.

    Refuses a missing path, a zarr group that is not a kdpipe store, another schema version
    and, unless `allow_incomplete` (inspect uses it), a store whose `complete` flag is unset.
    A complete store is checked (``check``): every array, chunk and chunk digest present and
    matching (``kdpipe.artifacts.integrity.check_store``; no decoding, one small read per chunk).
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


#: Manifest keys readers rely on, and the JSON type each must have.
_MANIFEST_TYPES = {
    "teacher": dict,
    "dataset": dict,
    "views": dict,
    "arrays": dict,
    "targets": dict,
    "shard_size": int,
    "num_shards": int,
    "complete": bool,
}
_DATASET_TYPES = {"num_samples": int, "num_classes": int}


def _check_manifest(path: str, m: dict) -> None:
    for key, kind in _MANIFEST_TYPES.items():
        if key in m and not isinstance(m[key], kind):
            raise StoreError(
                f"The store at {path} has a damaged manifest ({key} is {type(m[key]).__name__}, "
                f"not {kind.__name__}); re-extract it."
            )
    for key, kind in _DATASET_TYPES.items():
        value = (m.get("dataset") or {}).get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise StoreError(f"The store at {path} has a damaged manifest (dataset.{key} is {value!r}); re-extract it.")


class StoreReader:
    """A read-only view of one store: its manifest and its arrays."""

    def __init__(self, path: str, group):
        self.path = path
        self.group = group
        m = group.attrs.get(MANIFEST_ATTR)
        if not isinstance(m, dict):
            raise StoreError(f"{path} is a zarr group but not a kdpipe store (it has no kdpipe manifest).")
        if m.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(
                f"The store at {path} has schema version {m.get('schema_version')}, "
                f"this kdpipe reads version {SCHEMA_VERSION}; re-extract it."
            )
        _check_manifest(path, m)
        self.manifest = dict(m)
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
        """Every array integrity covers: the extraction's and the complete target sets'."""
        names = list(self.manifest.get("arrays") or {})
        names += [f"{STATIC_GROUP}/{name}" for name in (self.manifest.get("static") or {})]
        for target in self.target_sets():
            for short, entry in ((self.manifest["targets"][target].get("arrays")) or {}).items():
                if entry.get("checked", True):
                    names.append(f"{TARGETS_GROUP}/{target}/{short}")
        return names

    def damage(self, decode: bool = False) -> list:
        """Damaged arrays and chunks (``kdpipe.artifacts.integrity``); ``decode`` reads every
        chunk too (``inspect --verify``)."""
        fn = verify_store if decode else check_store
        try:
            return fn(self.group, self.path, self.checked_arrays())
        except StoreError:
            raise
        except Exception as err:  # noqa: BLE001 - damaged metadata of an array
            raise StoreError(
                f"The store at {self.path} cannot be checked ({type(err).__name__}: {err}); its "
                "metadata is damaged: re-extract it."
            ) from None

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
                arr = CheckedArray(self.group[name], name, self.path)
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
        return [n for n in self.manifest.get("arrays", {}) if n in self.group]

    def static_names(self) -> list[str]:
        """The whole arrays extraction wrote once (``static/<name>``), e.g. the teacher's classifier."""
        return sorted(self.manifest.get("static") or {})

    def static(self, name: str) -> np.ndarray:
        """The whole array static/<name> as numpy (checked as every array is)."""
        if name not in (self.manifest.get("static") or {}):
            raise StoreError(
                f"The store at {self.path} has no static array {name} (it has: "
                f"{', '.join(self.static_names()) or 'none'}); re-extract it with the method named."
            )
        return np.asarray(self.array(f"{STATIC_GROUP}/{name}")[...])

    def target_sets(self, include_incomplete: bool = False) -> list[str]:
        """Names of the target sets under targets/ (complete ones unless include_incomplete)."""
        sets = self.manifest.get("targets") or {}
        return sorted(n for n, e in sets.items() if include_incomplete or e.get("complete"))

    def target_attrs(self, name: str) -> dict:
        sets = self.manifest.get("targets") or {}
        if name not in sets:
            raise StoreError(
                f"The store at {self.path} has no target set {name} "
                f"(it has: {', '.join(sorted(sets)) or 'none'}); run `kdpipe cluster` first."
            )
        return dict(sets[name].get("attrs") or {})

    def target_set(self, name: str, include_incomplete: bool = False) -> TargetSet:
        """The typed record of target set ``name`` (``kdpipe.artifacts.target_set.TargetSet``)."""
        sets = self.manifest.get("targets") or {}
        entry = sets.get(name) if isinstance(sets, dict) else None
        if not isinstance(entry, dict) or not (include_incomplete or entry.get("complete")):
            have = ", ".join(self.target_sets()) or "none"
            raise StoreError(
                f"The store at {self.path} has no complete target set {name!r} (it has: {have}); "
                f"run `kdpipe cluster {self.path} --name {name}` first."
            )
        return TargetSet.from_json(name, entry.get("attrs"), where=f"the store at {self.path}")

    # ----- state ---------------------------------------------------------------------------

    @property
    def num_samples(self) -> int:
        return int(self.manifest["dataset"]["num_samples"])

    @property
    def num_views(self) -> int:
        return int(self.manifest["views"]["num_views"])

    def done_shards(self) -> list[int]:
        """Shards written so far, read from the shards_done array (current even mid-run)."""
        if SHARDS_DONE not in self.group:
            return list(self.manifest.get("shards_done") or [])
        return [int(i) for i in np.flatnonzero(self.group[SHARDS_DONE][:])]

    def is_complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def require_complete(self) -> StoreReader:
        if not self.is_complete():
            done, total = len(self.done_shards()), self.manifest.get("num_shards", "?")
            raise StoreError(
                f"The store at {self.path} is incomplete ({done} of {total} shards written); "
                "finish it with `kdpipe extract-teacher --resume`."
            )
        return self

    # ----- checks --------------------------------------------------------------------------

    def check_dataset(self, dataset) -> StoreReader:
        """Refuse a data set other than the one the store was made from."""
        d = self.manifest.get("dataset") or {}
        name = getattr(dataset, "name", "?")
        if d.get("fingerprint") != getattr(dataset, "fingerprint", None):
            raise DataError(
                f"The store at {self.path} was made from data set {d.get('name')} "
                f"({d.get('split')}, fingerprint {str(d.get('fingerprint'))[:12]}), not from this "
                f"{name} ({getattr(dataset, 'split', '?')}, fingerprint "
                f"{str(getattr(dataset, 'fingerprint', None))[:12]})."
            )
        if int(d.get("num_classes", -1)) != int(dataset.num_classes):
            raise DataError(
                f"The store at {self.path} has {d.get('num_classes')} classes, "
                f"the data set {name} has {dataset.num_classes}."
            )
        if int(d.get("num_samples", -1)) != len(dataset):
            raise DataError(
                f"The store at {self.path} has {d.get('num_samples')} samples, the data set {name} has {len(dataset)}."
            )
        for key in ("mean", "std"):
            a, b = d.get(key), getattr(dataset, key, None)
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

        want = (self.manifest.get("teacher") or {}).get("sha256")
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
            for a in self.manifest["targets"][t].get("arrays") or {}:
                names.append(f"{TARGETS_GROUP}/{t}/{a}")
        for name in names:
            if not self.has(name):
                continue
            arr = self.group[name]
            raw = int(arr.nbytes)
            stored = int(arr.nbytes_stored())
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
