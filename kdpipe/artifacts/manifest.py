"""A store's manifest: one typed record, written and read by this module only.

The manifest is the JSON object in the store group's ``zarr.json`` attributes
(``attributes["kdpipe"]``). ``write_manifest`` seals it (``manifest_sha256``: sha256 of the
canonical JSON of everything else) and ``read_manifest`` checks, in this order: that each
field has its type, that the manifest agrees with itself (views, samples, shards), and then the
seal; each failure is one sentence. ``Manifest`` is a frozen dataclass (as
``kdpipe.artifacts.target_set.TargetSet`` is); readers use its attributes::

    m = open_store(path).manifest
    m.views.num_views, m.views.pad_mode, m.dataset.split, m.teacher.arch, m.arrays["logits"].shape

Transition: ``m["views"]["num_views"]`` and ``m.get(...)`` still work (a read-only mapping
view of the JSON form) for callers written against the dict manifest; new code reads attributes.

Stores written before this record open too: a missing field has its old meaning (no seal,
no digest root, no store id, digest form 1: bare crc32c tails).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import uuid
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from kdpipe.artifacts.integrity import DIGEST_FORM, LEGACY_DIGEST_FORM, ArrayExpectation, Binding
from kdpipe.artifacts.schema import MANIFEST_ATTR, SCHEMA_VERSION, SHARDS_DONE, STATIC_GROUP, TARGETS_GROUP, plan_shards
from kdpipe.errors import StoreError

#: The manifest key of its own seal (excluded from what it hashes).
SEAL = "manifest_sha256"


def _known(cls, record: dict) -> tuple[dict, dict]:
    """Split a JSON object into the dataclass's fields and everything else (kept as ``extra``)."""
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    return {k: v for k, v in record.items() if k in names}, {k: v for k, v in record.items() if k not in names}


def _tuple(value) -> tuple | None:
    return None if value is None else tuple(value)


def _json_of(obj) -> dict:
    """A record's JSON form: its fields (tuples as lists, None-valued optional fields dropped
    only where the stored form never had them) with ``extra`` merged back."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        if f.name == "extra":
            continue
        value = getattr(obj, f.name)
        if isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    out.update(obj.extra)
    return out


@dataclass(frozen=True)
class TeacherInfo:
    """The teacher the store was made with."""

    arch: str
    sha256: str
    num_classes: int
    path: str | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return _json_of(self)


@dataclass(frozen=True)
class DatasetInfo:
    """The data set split the store was made from."""

    name: str
    split: str
    fingerprint: str
    num_samples: int
    num_classes: int
    spec: str | None = None
    mean: tuple | None = None
    std: tuple | None = None
    image_size: tuple | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return _json_of(self)


@dataclass(frozen=True)
class ViewsInfo:
    """The stored views: how many per sample and how they were drawn."""

    num_views: int
    policy: str | None = None
    mode: str | None = None
    seed: int | None = None
    pad_mode: str | None = None
    feature_views: str = "identity"  # "identity": feature arrays hold view identity_index only
    identity_index: int | None = None
    extra: dict = field(default_factory=dict)  # policy_num_views, param_dim, image_size, ...

    def to_json(self) -> dict:
        return _json_of(self)


@dataclass(frozen=True)
class ArrayRecord:
    """One array as the manifest records it; ``meta_sha256`` is the sha256 of its zarr.json."""

    shape: tuple
    dtype: str
    meaning: str = ""
    chunks: tuple = ()
    checked: bool = True  # has chunk digests (control arrays such as shards_done do not)
    meta_sha256: str | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        out = _json_of(self)
        if out["meta_sha256"] is None:
            del out["meta_sha256"]
        return out

    def expectation(self) -> ArrayExpectation:
        return ArrayExpectation(tuple(self.shape), self.dtype, self.meta_sha256)


@dataclass(frozen=True)
class TargetEntry:
    """A target set's arrays, its settings record (``TargetSet.from_json`` reads ``attrs``) and state."""

    arrays: dict[str, ArrayRecord] = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)
    complete: bool = False
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        arrays = {k: v.to_json() for k, v in self.arrays.items()}
        return {"arrays": arrays, "attrs": dict(self.attrs), "complete": self.complete, **self.extra}


@dataclass(frozen=True)
class Manifest:
    """The store's manifest (see the module docstring)."""

    schema_version: int
    teacher: TeacherInfo
    dataset: DatasetInfo
    views: ViewsInfo
    arrays: dict[str, ArrayRecord]
    shard_size: int
    num_shards: int
    kdpipe_version: str | None = None
    layers: tuple = ()
    shards_done: tuple = ()
    complete: bool = False
    created: str | None = None
    targets: dict[str, TargetEntry] = field(default_factory=dict)
    static: dict[str, ArrayRecord] = field(default_factory=dict)
    extraction: dict | None = None  # the extraction pass's summary (throughput, executor)
    features_dropped: bool = False
    features_dropped_by: str | None = None
    store_id: str | None = None  # what chunk digests are bound to (digest form 2)
    digest_form: int = LEGACY_DIGEST_FORM
    digest_root: str | None = None  # integrity.digest_root over every checked array's digests
    manifest_sha256: str | None = None  # the seal written with it (None: an older store)
    extra: dict = field(default_factory=dict)

    # ----- typed reads -----------------------------------------------------------------------

    @property
    def num_samples(self) -> int:
        return self.dataset.num_samples

    @property
    def num_views(self) -> int:
        return self.views.num_views

    @property
    def binding(self) -> Binding:
        return Binding(self.store_id, self.digest_form)

    def complete_targets(self) -> list[str]:
        return sorted(n for n, e in self.targets.items() if e.complete)

    def checked_arrays(self) -> dict[str, ArrayRecord]:
        """Every array integrity covers, by store path: the extraction's, the static ones and
        the complete target sets' checked arrays."""
        out = dict(self.arrays)
        out.update({f"{STATIC_GROUP}/{k}": v for k, v in self.static.items()})
        for name in self.complete_targets():
            out.update({f"{TARGETS_GROUP}/{name}/{k}": v for k, v in self.targets[name].arrays.items() if v.checked})
        return out

    # ----- JSON ------------------------------------------------------------------------------

    def to_json(self) -> dict:
        out: dict[str, Any] = {
            "schema_version": self.schema_version,
            "kdpipe_version": self.kdpipe_version,
            "teacher": self.teacher.to_json(),
            "dataset": self.dataset.to_json(),
            "views": self.views.to_json(),
            "layers": list(self.layers),
            "arrays": {k: v.to_json() for k, v in self.arrays.items()},
            "shard_size": self.shard_size,
            "num_shards": self.num_shards,
            "shards_done": list(self.shards_done),
            "complete": self.complete,
            "created": self.created,
            "targets": {k: v.to_json() for k, v in self.targets.items()},
        }
        if self.static:
            out["static"] = {k: v.to_json() for k, v in self.static.items()}
        for key in ("extraction", "features_dropped_by", "store_id", "digest_root", "manifest_sha256"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.features_dropped:
            out["features_dropped"] = True
        if self.digest_form != LEGACY_DIGEST_FORM:
            out["digest_form"] = self.digest_form
        out.update(self.extra)
        return out

    @classmethod
    def from_json(cls, record, where: str = "the store") -> Manifest:
        """The typed record of a stored manifest; a missing or mistyped field is one sentence."""
        return _parse(record, where)

    def replace(self, **changes) -> Manifest:
        return dataclasses.replace(self, **changes)

    # ----- transition: a read-only mapping view of the JSON form ------------------------------

    @cached_property
    def _doc(self) -> dict:
        return self.to_json()

    def __getitem__(self, key: str):
        return self._doc[key]

    def get(self, key: str, default=None):
        return self._doc.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._doc

    def keys(self):
        return self._doc.keys()


#: The manifest's keys, as written (a newer kdpipe may add keys: they are kept, in ``extra``).
MANIFEST_KEYS = tuple(f.name for f in dataclasses.fields(Manifest) if f.name != "extra")


# ----------------------------------------------------------------------------- parsing
def _damaged(where: str, what: str) -> StoreError:
    return StoreError(f"The store at {where} has a damaged manifest ({what}); re-extract it.")


def _kind(where: str, key: str, value, kind: type, optional: bool = False):
    if value is None and optional:
        return None
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        shown = type(value).__name__ if not isinstance(value, (int, float, str)) or kind is dict else repr(value)
        raise _damaged(where, f"{key} is {shown}, not {kind.__name__}")
    return value


def _record(cls, where: str, key: str, record) -> Any:
    _kind(where, key, record, dict)
    values, extra = _known(cls, record)
    for name in ("mean", "std", "image_size", "shape", "chunks"):
        if name in values:
            _kind(where, f"{key}.{name}", values[name], list, optional=name not in ("shape",))
            values[name] = _tuple(values[name])
    try:
        return cls(**values, extra=extra)
    except TypeError as err:
        raise _damaged(where, f"{key}: {err}") from None


def _array(where: str, key: str, record) -> ArrayRecord:
    rec = _record(ArrayRecord, where, key, record)
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in rec.shape):
        raise _damaged(where, f"{key}.shape is {list(rec.shape)}")
    _kind(where, f"{key}.dtype", rec.dtype, str)
    return rec


def _arrays(where: str, key: str, record) -> dict[str, ArrayRecord]:
    _kind(where, key, record, dict)
    return {name: _array(where, f"{key}.{name}", entry) for name, entry in record.items()}


def _target(where: str, name: str, record) -> TargetEntry:
    key = f"targets.{name}"
    _kind(where, key, record, dict)
    values, extra = _known(TargetEntry, record)
    return TargetEntry(
        arrays=_arrays(where, f"{key}.arrays", values.get("arrays") or {}),
        attrs=dict(_kind(where, f"{key}.attrs", values.get("attrs") or {}, dict)),
        complete=_kind(where, f"{key}.complete", values.get("complete", False), bool),
        extra=extra,
    )


def _parse(record, where: str) -> Manifest:
    if not isinstance(record, dict):
        raise StoreError(f"{where} is a zarr group but not a kdpipe store (it has no kdpipe manifest).")
    values, extra = _known(Manifest, record)
    for key in ("teacher", "dataset", "views", "arrays"):
        if key not in values:
            raise _damaged(where, f"{key} is missing")
    teacher = _record(TeacherInfo, where, "teacher", values["teacher"])
    dataset = _record(DatasetInfo, where, "dataset", values["dataset"])
    views = _record(ViewsInfo, where, "views", values["views"])
    for key in ("num_samples", "num_classes"):
        _kind(where, f"dataset.{key}", getattr(dataset, key), int)
    _kind(where, "views.num_views", views.num_views, int)
    _kind(where, "teacher.num_classes", teacher.num_classes, int)
    for key in ("shard_size", "num_shards"):
        _kind(where, key, values.get(key), int)
    _kind(where, "complete", values.get("complete", False), bool)
    _kind(where, "targets", values.get("targets") or {}, dict)
    _kind(where, "shards_done", values.get("shards_done") or [], list)
    values.update(
        teacher=teacher,
        dataset=dataset,
        views=views,
        arrays=_arrays(where, "arrays", values["arrays"]),
        static=_arrays(where, "static", values.get("static") or {}),
        targets={n: _target(where, n, e) for n, e in (values.get("targets") or {}).items()},
        layers=_tuple(values.get("layers") or []),
        shards_done=_tuple(values.get("shards_done") or []),
    )
    try:
        return Manifest(**values, extra=extra)
    except TypeError as err:
        raise _damaged(where, str(err)) from None


# ----------------------------------------------------------------------------- agreement
def _agreement(m: Manifest, where: str) -> None:
    """The manifest against itself: samples, views, shards and completeness agree."""
    n, v = m.dataset.num_samples, m.views.num_views
    if n < 1 or v < 1 or m.shard_size < 1:
        raise _damaged(where, f"{n} samples, {v} views, shard size {m.shard_size}")
    for name, rec in m.arrays.items():
        if not rec.shape or rec.shape[0] != n:
            raise _damaged(where, f"array {name} has {rec.shape[:1]} samples, the data set {n}")
        width = rec.shape[1] if len(rec.shape) > 1 else None
        if name == "views" and width != v or name != "labels" and width not in (None, 1, v):
            raise _damaged(where, f"views.num_views is {v}, but array {name} holds {width} views")
    logits = m.arrays.get("logits")
    if logits is not None and len(logits.shape) > 2 and logits.shape[2] != m.teacher.num_classes:
        raise _damaged(where, f"teacher.num_classes is {m.teacher.num_classes}, but logits hold {logits.shape[2]}")
    expected = len(plan_shards(n, m.shard_size))
    if m.num_shards != expected:
        raise _damaged(where, f"num_shards is {m.num_shards}, {n} samples in shards of {m.shard_size} make {expected}")
    if m.complete and sorted(m.shards_done) != list(range(m.num_shards)):
        missing = sorted(set(range(m.num_shards)) - set(m.shards_done))
        raise _damaged(where, f"complete is true but {SHARDS_DONE} lacks shards {missing or list(m.shards_done)}")


def _canonical(doc: dict) -> bytes:
    return json.dumps({k: v for k, v in doc.items() if k != SEAL}, sort_keys=True, separators=(",", ":")).encode()


def seal_of(doc: dict) -> str:
    """The sha256 a manifest JSON object is sealed with (its own seal left out)."""
    return hashlib.sha256(_canonical(doc)).hexdigest()


# ----------------------------------------------------------------------------- the store
def has_manifest(group) -> bool:
    """True when the zarr group carries a kdpipe manifest (whatever its state)."""
    return isinstance(group.attrs.get(MANIFEST_ATTR), dict)


def read_manifest(group, where: str, schema_version: int | None = None) -> Manifest:
    """The store's manifest: typed, agreeing with itself, its seal (when it has one) intact;
    ``schema_version``: refuse a store of another schema version first."""
    doc = group.attrs.get(MANIFEST_ATTR)
    if schema_version is not None and isinstance(doc, dict) and doc.get("schema_version") != schema_version:
        raise StoreError(
            f"The store at {where} has schema version {doc.get('schema_version')}, "
            f"this kdpipe reads version {schema_version}; re-extract it."
        )
    m = _parse(doc, where)
    _agreement(m, where)
    if m.manifest_sha256 is None and m.digest_form >= DIGEST_FORM:
        raise StoreError(
            f"The manifest of the store at {where} has lost the digest it was written with; re-extract the store."
        )
    if m.manifest_sha256 is not None and seal_of(doc) != m.manifest_sha256:
        raise StoreError(
            f"The manifest of the store at {where} does not match the digest it was written with "
            "(it was edited after kdpipe wrote it); re-extract the store."
        )
    return m


def write_manifest(group, manifest: Manifest | dict, where: str) -> Manifest:
    """Check, seal and write the manifest (driver only); returns what was written."""
    m = manifest if isinstance(manifest, Manifest) else _parse(manifest, where)
    doc = m.replace(manifest_sha256=None).to_json()
    try:
        json.dumps(doc, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise StoreError(f"The manifest must be plain JSON (no NaN, no objects): {err}.") from None
    doc[SEAL] = seal_of(doc)
    group.attrs[MANIFEST_ATTR] = doc
    return m.replace(manifest_sha256=doc[SEAL])


def new_manifest(
    *,
    teacher: dict,
    dataset: dict,
    views: dict,
    layers: list,
    arrays: dict[str, dict],
    shard_size: int,
    num_shards: int,
    schema_version: int,
) -> Manifest:
    """The manifest of a new store: ``complete`` false, no shard done, a fresh store id."""
    from kdpipe.version import __version__

    return _parse(
        {
            "schema_version": schema_version,
            "kdpipe_version": __version__,
            "teacher": dict(teacher),
            "dataset": dict(dataset),
            "views": dict(views),
            "layers": list(layers),
            "arrays": arrays,
            "shard_size": int(shard_size),
            "num_shards": int(num_shards),
            "shards_done": [],
            "complete": False,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "targets": {},
            "store_id": uuid.uuid4().hex,
            "digest_form": DIGEST_FORM,
        },
        "a new store",
    )


def same_plan(a: Manifest, b: Manifest) -> str | None:
    """None when two manifests describe the same extraction, else the first thing that differs.

    Used by resume: a store may only be continued by a run with identical inputs and layout.
    """
    checks = [
        ("schema_version", lambda m: m.schema_version),
        ("teacher", lambda m: m.teacher.sha256),
        ("teacher architecture", lambda m: m.teacher.arch),
        ("dataset fingerprint", lambda m: m.dataset.fingerprint),
        ("dataset split", lambda m: m.dataset.split),
        ("views (--views, --seed)", lambda m: m.views.to_json()),
        ("shard size", lambda m: m.shard_size),
        ("the set of arrays (--features, --cam-res)", lambda m: {k: v.shape for k, v in m.arrays.items()}),
    ]
    for key, get in checks:
        if get(a) != get(b):
            return key
    return None


def build_manifest(
    *,
    teacher: dict,
    dataset: dict,
    views: dict,
    layers: list,
    specs: list,
    shard_size: int,
    num_samples: int,
):
    """The manifest of a new store (``kdpipe.artifacts.manifest.Manifest``), `complete` false
    and no shard done."""
    return new_manifest(
        teacher=teacher,
        dataset=dataset,
        views=views,
        layers=layers,
        arrays={s.name: s.to_json() for s in specs},
        shard_size=shard_size,
        num_shards=len(plan_shards(num_samples, shard_size)),
        schema_version=SCHEMA_VERSION,
    )
