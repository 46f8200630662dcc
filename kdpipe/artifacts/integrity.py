"""Store integrity: no damaged, missing, misplaced or foreign chunk is ever read as data.

Every array of a store is chunked along its first axis only; a *chunk object* is one stored
object along that axis (a chunk, or a shard of inner chunks).

1. **Checksums.** Every chunk ends with the crc32c of its encoded bytes (zarr v3's
   ``Crc32cCodec`` closes every array's codec chain, ``kdpipe.artifacts.schema.compressors``):
   a corrupted chunk fails to decode. Reads go through ``CheckedArray``, which turns that
   failure into one sentence naming the array and the sample range.
2. **Bound digests** (digest form 2). When a chunk object is written, two digests are recorded
   in ``integrity/<array>`` (int64 [num_chunks, 2], one zarr chunk per row, so parallel writers
   never race; -1 = not written), both keyed by (store id, array path, chunk index):

   - the *locator* ``H(store, array, index, crc32c tail)``: checked when a store is opened
     (a 4-byte read per chunk, no decoding). The tail is the crc32c of the chunk's bytes, which
     the codec checks on every decode, so a chunk moved to another position or array, or copied
     from another store, is refused at open even when its digest row moved with it;
   - the *content* ``H(store, array, index, bytes)``: checked over the chunk object's whole
     bytes the first time a reader touches it (``CheckedArray``) and by ``verify_store``.

   ``digest_root`` hashes every recorded digest, in array and chunk order, into one value the
   manifest records (``kdpipe.artifacts.manifest``), so a digest row that is moved, replaced or
   copied from elsewhere is refused too. Stores written before digest form 2 record the bare
   crc32c tail (int64 [num_chunks], form 1): still checked, but not bound to position or store.
3. **Metadata.** Each array's ``zarr.json`` must agree with the manifest's record of it (shape,
   dtype, a crc32c codec, and for form 2 a sha256 of the whole document): an edited dtype or a
   removed checksum codec is refused at open, in ``--verify`` and in training.
4. **Existence.** ``check_store`` (run when a store is opened for training) refuses a store
   where an array, a chunk file or a digest is missing or does not match. ``verify_store``
   (``kdpipe inspect --verify``) also reads and decodes every chunk and reports each damaged one.

Every chunk is written, also one equal to the fill value (``write_empty_chunks``), so a
missing chunk file always means damage.

Per-view arrays of new stores are zarr shards (``kdpipe.artifacts.row_reads``): one object per
block of samples, as a chunk was, holding one inner chunk per (sample, view) row, each closed
by its crc32c, and an index closed by its crc32c. A shard's digest is its index's crc32c
extended with those of its first and last rows (``_shard_digest``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from kdpipe.errors import StoreError

if TYPE_CHECKING:
    from zarr.core.array_spec import ArrayConfigParams

__all__ = [
    "DIGESTS",
    "DIGEST_FORM",
    "LEGACY_DIGEST_FORM",
    "digest_name",
    "num_chunks",
    "object_rows",
    "chunk_key",
    "locator_digest",
    "content_digest",
    "chunk_digests",
    "check_chunk",
    "digest_root",
    "metadata_digest",
    "read_metadata",
    "record_digests",
    "Binding",
    "ArrayExpectation",
    "check_store",
    "verify_store",
    "CheckedArray",
    "Damage",
    "ARRAY_CONFIG",
]

#: The group of the per-chunk digest arrays.
DIGESTS = "integrity"
#: Digests bound to (store, array, chunk index): [num_chunks, 2] locator and content digests.
DIGEST_FORM = 2
#: Stores written before digest form 2: the bare crc32c tail of each chunk, [num_chunks].
LEGACY_DIGEST_FORM = 1
#: zarr array config: write every chunk, also one equal to the fill value.
ARRAY_CONFIG: ArrayConfigParams = {"write_empty_chunks": True}
#: Digests are blake2b truncated to 63 bits, so they fit int64 and never equal -1 (unwritten).
_DIGEST_BYTES = 8
_DIGEST_MASK = (1 << 63) - 1

MOVED = "it is not the chunk written there (swapped or replaced by one from another position, array or store)"


def digest_name(array: str) -> str:
    return f"{DIGESTS}/{array}"


def object_rows(array) -> int:
    """Samples per stored chunk object along axis 0 (a shard's rows when the array is sharded)."""
    shards = getattr(array, "shards", None)
    grid = shards if shards else array.chunks
    return int(grid[0]) if grid else 1


def num_chunks(array) -> int:
    rows = object_rows(array)
    return max(1, -(-int(array.shape[0]) // rows)) if array.shape else 1


def _fs(root: str):
    from kdpipe.storage import filesystem

    return filesystem(root)


def chunk_key(root_path: str, array: str, index: int, ndim: int) -> str:
    """The object key of chunk ``index`` (along axis 0) of ``array`` (zarr v3 default keys)."""
    return "/".join([root_path.rstrip("/"), array, "c", str(int(index))] + ["0"] * max(0, ndim - 1))


_chunk_key = chunk_key  # the name before digest form 2


def _hash(store_id: str, array: str, index: int, kind: bytes, data: bytes) -> int:
    h = hashlib.blake2b(digest_size=_DIGEST_BYTES, person=b"kdpipe-chunk")
    h.update(kind)
    for part in (store_id.encode(), array.encode(), str(int(index)).encode()):
        h.update(len(part).to_bytes(4, "little"))
        h.update(part)
    h.update(data)
    return int.from_bytes(h.digest(), "little") & _DIGEST_MASK


def locator_digest(store_id: str, array: str, index: int, tail: bytes) -> int:
    """H(store, array, index, the chunk object's last 4 bytes: its crc32c)."""
    return _hash(store_id, array, index, b"L", bytes(tail))


def content_digest(store_id: str, array: str, index: int, data: bytes) -> int:
    """H(store, array, index, every byte of the chunk object)."""
    return _hash(store_id, array, index, b"C", bytes(data))


def chunk_digests(store_id: str, array: str, index: int, data: bytes) -> tuple[int, int]:
    """The (locator, content) digests of one chunk object's bytes: the writer records these for
    a plain chunk; for a shard its locator also hashes the first and last rows' crc32c
    (``_locator_bytes``), the content digest is the same."""
    return locator_digest(store_id, array, index, data[-4:]), content_digest(store_id, array, index, data)


def check_chunk(store_id: str, array: str, index: int, data: bytes, recorded) -> str | None:
    """None when ``data`` is the chunk object written at (store, array, index) with digests
    ``recorded`` (a row of ``integrity/<array>``), else what is wrong. Per chunk or per shard:
    anything that holds a chunk object's bytes (a local copy, a cache) can check it with this."""
    row = np.asarray(recorded).reshape(-1)
    if row.size != 2 or int(row[1]) < 0:
        return "no digest was recorded for it"
    if content_digest(store_id, array, index, data) != int(row[1]):
        return MOVED
    return None


def digest_root(digests: dict[str, np.ndarray]) -> str:
    """sha256 over every recorded digest, in array-name and chunk order (hex)."""
    h = hashlib.sha256()
    for name in sorted(digests):
        values = np.ascontiguousarray(np.asarray(digests[name], dtype="<i8"))
        h.update(name.encode() + b"\0" + str(values.shape).encode() + b"\0")
        h.update(values.tobytes())
    return h.hexdigest()


def metadata_digest(doc: dict) -> str:
    """sha256 of an array's ``zarr.json`` document, canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_metadata(root: str, array: str) -> dict:
    """The ``zarr.json`` document of ``array``; a missing or unreadable one is a StoreError."""
    fs, root_path = _fs(root)
    try:
        doc = json.loads(fs.cat_file(f"{root_path.rstrip('/')}/{array}/zarr.json"))
    except FileNotFoundError:
        raise StoreError(f"its metadata file {array}/zarr.json is missing") from None
    except (ValueError, UnicodeDecodeError):
        raise StoreError(f"its metadata file {array}/zarr.json is not valid JSON") from None
    if not isinstance(doc, dict):
        raise StoreError(f"its metadata file {array}/zarr.json is not a JSON object")
    return doc


def _read_object(fs, key: str) -> bytes | None:
    try:
        return bytes(fs.cat_file(key))
    except (FileNotFoundError, OSError):
        return None


#: Chunk objects fetched at once by a first read (fsspec fetches a list concurrently).
_FETCH_BATCH = 16


def _read_objects(fs, keys: list[str], indices: list[int]) -> dict[int, bytes | None]:
    """Chunk objects by index (None: absent), fetched with one ``fs.cat`` call."""
    found = fs.cat(keys, on_error="return") if keys else {}
    out: dict[int, bytes | None] = {}
    for i, k in zip(indices, keys):
        data = found.get(k, found.get(fs._strip_protocol(k)))
        out[i] = bytes(data) if isinstance(data, (bytes, bytearray)) else None
    return out


def _tail(fs, key: str) -> bytes | None:
    """A chunk object's last 4 bytes (its crc32c), or None when it is absent."""
    try:
        tail = fs.cat_file(key, start=-4)
    except (FileNotFoundError, OSError):
        return None
    return bytes(tail) if len(tail) == 4 else None


def _tail_digest(fs, key: str) -> int | None:
    tail = _tail(fs, key)
    return int.from_bytes(tail, "little") if tail is not None else None


def _shard_locator(fs, key: str, arr) -> bytes | None:
    """A shard's locator bytes: the crc32c its index ends with, extended with the crc32c of its
    first and of its last row. The index alone binds only the rows' sizes (two shards of fixed-size
    rows have equal indices), the rows' own checksums bind their bytes, so a shard moved or
    replaced is refused like a chunk (three small reads, no decoding)."""
    tail = _tail_digest(fs, key)
    if tail is None:
        return None
    inner = int(np.prod([s // c for s, c in zip(arr.shards, arr.chunks, strict=True)]))
    try:
        size = fs.size(key)
        index = fs.cat_file(key, start=size - 4 - 16 * inner, end=size - 4)
        entries = np.frombuffer(index, dtype="<u8").reshape(-1, 2)
        entries = entries[entries[:, 0] != np.iinfo(np.uint64).max]  # rows past the array's end
        if not len(entries):
            return b"\0"  # no row at all: never a recorded digest
        value = tail.to_bytes(4, "little")
        for offset, length in (entries[0], entries[-1]):
            if int(length) < 4 or int(offset) + int(length) > size:
                return b"\0"  # an empty or impossible row: never a recorded digest
            value += fs.cat_file(key, start=int(offset + length) - 4, end=int(offset + length))
    except (FileNotFoundError, OSError, ValueError):
        return None
    return value


def _shard_digest(fs, key: str, arr) -> int | None:
    """A shard's form-1 digest: the crc32c of ``_shard_locator``."""
    import google_crc32c

    value = _shard_locator(fs, key, arr)
    return None if value is None else int(google_crc32c.value(value))


def _locator_bytes(fs, key: str, arr) -> bytes | None:
    """What a bound locator digest hashes: a chunk object's last 4 bytes (its crc32c), or for a
    shard its index's crc32c with its first and last rows' (``_shard_locator``)."""
    return _shard_locator(fs, key, arr) if getattr(arr, "shards", None) else _tail(fs, key)


def _object_digest(fs, key: str, arr) -> int | None:
    """The digest of one chunk object: its crc32c, or a shard's (``_shard_digest``)."""
    return _shard_digest(fs, key, arr) if getattr(arr, "shards", None) else _tail_digest(fs, key)


def record_digests(
    group, root: str, array: str, first_chunk: int, last_chunk: int, store_id: str | None = None
) -> None:
    """Record the digests of chunk objects [first_chunk, last_chunk] of ``array`` just written:
    bound digests (form 2, ``store_id`` given, [num_chunks, 2] digest array) or the bare crc32c
    tail (a form-1 store)."""
    arr = group[array]
    fs, root_path = _fs(root)
    digests = group[digest_name(array)]
    bound = digests.ndim == 2
    if bound and not store_id:
        raise StoreError(f"The store at {root} has bound digests but no store id in its manifest.")
    for index in range(first_chunk, last_chunk + 1):
        key = chunk_key(root_path, array, index, arr.ndim)
        data = _read_object(fs, key) if bound else None
        if bound and data is not None and len(data) >= 4:
            locator = locator_digest(str(store_id), array, index, _locator_bytes(fs, key, arr) or b"")
            content = content_digest(str(store_id), array, index, data)
            digests[index] = np.asarray((locator, content), dtype=np.int64)
            continue
        value = None if bound else _object_digest(fs, key, arr)
        if value is None:
            raise StoreError(f"The chunk {index} of {array} in {root} was not written.")
        digests[index] = value


@dataclass(frozen=True)
class Binding:
    """What a store's digests are bound to: its id and digest form (1: bare crc32c tails)."""

    store_id: str | None = None
    form: int = LEGACY_DIGEST_FORM

    @property
    def bound(self) -> bool:
        return self.form >= DIGEST_FORM and bool(self.store_id)


@dataclass(frozen=True)
class ArrayExpectation:
    """What the manifest records of one array: its ``zarr.json`` must agree."""

    shape: tuple
    dtype: str
    meta_sha256: str | None = None


@dataclass(frozen=True)
class Damage:
    """One damaged chunk (or array): where and what."""

    array: str
    chunk: int | None
    first: int | None
    last: int | None
    what: str

    def sentence(self, root: str) -> str:
        if self.array == DIGESTS:
            return f"The store at {root} is damaged: {self.what}"
        where = f" (chunk {self.chunk}, samples {self.first}..{self.last})" if self.chunk is not None else ""
        return f"The store array {self.array}{where} at {root} is damaged: {self.what}"


def _rows_of(arr, index: int) -> tuple[int, int]:
    rows = object_rows(arr)
    return index * rows, min((index + 1) * rows, int(arr.shape[0]) if arr.shape else 1) - 1


def _codec_names(codecs) -> list[str]:
    """Every codec name in a zarr.json codec list, inner codecs of a sharding codec included."""
    out = []
    for codec in codecs if isinstance(codecs, list) else []:
        if not isinstance(codec, dict):
            continue
        out.append(str(codec.get("name")))
        conf = codec.get("configuration") or {}
        if isinstance(conf, dict):
            out += _codec_names(conf.get("codecs"))
            out += _codec_names(conf.get("index_codecs"))
    return out


def _same_dtype(a, b) -> bool:
    try:
        return np.dtype(str(a)) == np.dtype(str(b))
    except TypeError:
        return False


def check_metadata(root: str, name: str, expected: ArrayExpectation) -> Damage | None:
    """The array's ``zarr.json`` against the manifest's record of it (shape, dtype, crc32c)."""
    try:
        doc = read_metadata(root, name)
    except StoreError as err:
        return Damage(name, None, None, None, str(err))
    shape = doc.get("shape")
    if not isinstance(shape, list) or [int(s) for s in shape if isinstance(s, int)] != list(expected.shape):
        return Damage(
            name, None, None, None, f"its zarr.json has shape {shape}, its manifest records {list(expected.shape)}"
        )
    if not _same_dtype(doc.get("data_type"), expected.dtype):
        return Damage(
            name,
            None,
            None,
            None,
            f"its zarr.json has data type {doc.get('data_type')}, its manifest records {expected.dtype}",
        )
    if "crc32c" not in _codec_names(doc.get("codecs")):
        return Damage(name, None, None, None, "its zarr.json has no crc32c codec, so its chunks are not checksummed")
    if expected.meta_sha256 and metadata_digest(doc) != expected.meta_sha256:
        return Damage(name, None, None, None, "its zarr.json differs from the one written (chunking or codecs edited)")
    return None


def _recorded(group, name: str, binding: Binding) -> np.ndarray | Damage:
    if digest_name(name) not in group:
        return Damage(name, None, None, None, "its chunk digests are missing")
    recorded = np.asarray(group[digest_name(name)][...])
    if recorded.ndim != (2 if binding.bound else 1):
        return Damage(name, None, None, None, "its chunk digests are not of this store's digest form")
    return recorded


def _check_array(group, fs, root_path: str, name: str, binding: Binding) -> list[Damage]:
    if name not in group or not hasattr(group[name], "shape"):
        return [Damage(name, None, None, None, "the array is missing")]
    arr = group[name]
    recorded = _recorded(group, name, binding)
    if isinstance(recorded, Damage):
        return [recorded]
    out = []
    for index in range(num_chunks(arr)):
        first, last = _rows_of(arr, index)
        key = chunk_key(root_path, name, index, arr.ndim)
        tail = _locator_bytes(fs, key, arr) if binding.bound else None
        found = None if binding.bound else _object_digest(fs, key, arr)
        if (tail if binding.bound else found) is None:
            out.append(Damage(name, index, first, last, "the chunk file is missing"))
            continue
        row = recorded[index] if index < len(recorded) else None
        if row is None or int(np.asarray(row).reshape(-1)[0]) < 0:
            out.append(Damage(name, index, first, last, "no digest was recorded for it"))
        elif binding.bound:
            if locator_digest(str(binding.store_id), name, index, tail or b"") != int(row[0]):
                out.append(Damage(name, index, first, last, MOVED))
        elif int(row) != found:
            out.append(Damage(name, index, first, last, "it is not the chunk written there (swapped or replaced)"))
    return out


def _check_all(group, root, names, binding, expected) -> list[Damage]:
    fs, root_path = _fs(root)
    damage: list[Damage] = []
    for name in names:
        meta = check_metadata(root, name, expected[name]) if name in expected else None
        if meta is not None:
            damage.append(meta)
            continue
        damage += _check_array(group, fs, root_path, name, binding)
    return damage


def check_store(
    group,
    root: str,
    names: list[str],
    binding: Binding | None = None,
    expected: dict[str, ArrayExpectation] | None = None,
) -> list[Damage]:
    """The cheap check: metadata as recorded, every array, chunk file and digest present and
    matching (a 4-byte read per chunk, no decoding)."""
    return _check_all(group, root, names, binding or Binding(), expected or {})


def verify_store(
    group,
    root: str,
    names: list[str],
    binding: Binding | None = None,
    expected: dict[str, ArrayExpectation] | None = None,
) -> list[Damage]:
    """``check_store`` plus reading every chunk object (its content digest) and decoding it."""
    binding = binding or Binding()
    damage = check_store(group, root, names, binding, expected)
    bad = {(d.array, d.chunk) for d in damage}
    fs, root_path = _fs(root)
    for name in names:
        if (name, None) in bad:
            continue
        arr = group[name]
        recorded = np.asarray(group[digest_name(name)][...])
        decode = _decoder(arr, root, name)
        for index in range(num_chunks(arr)):
            if (name, index) in bad:
                continue
            first, last = _rows_of(arr, index)
            what = None
            try:
                decode(index, first, last)
            except Exception as err:  # noqa: BLE001 - any decode failure is damage
                what = f"it does not decode ({_reason(err)})"
            if what is None and binding.bound:
                data = _read_object(fs, chunk_key(root_path, name, index, arr.ndim))
                what = (
                    "the chunk file is missing"
                    if data is None
                    else check_chunk(str(binding.store_id), name, index, data, recorded[index])
                )
            if what is not None:
                damage.append(Damage(name, index, first, last, what))
    return damage


def _decoder(arr, root: str, name: str):
    """``decode(chunk, first, last)``: a shard of the row layout through its ``RowReader`` (zarr
    decodes a shard's rows one by one at about a millisecond each), any other chunk by zarr."""
    from kdpipe.artifacts.row_reads import row_reader

    rows = row_reader(root, name) if getattr(arr, "shards", None) else None
    if rows is not None:
        return lambda index, first, last: rows.read_shard(index)
    return lambda index, first, last: arr[first : last + 1]


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


class CheckedArray:
    """A zarr array whose reads turn damage into one sentence (array, sample range).

    The first read that touches a chunk object checks its content digest (bound stores:
    ``check_chunk`` over the object's bytes, once per chunk per handle); every read turns a
    decode failure (crc32c) into a StoreError. Supports what kdpipe reads with: ``arr[...]``,
    ``arr[a:b]`` (and other basic selections) and ``arr.get_orthogonal_selection(sel)``; every
    other attribute is the zarr array's."""

    def __init__(self, array, name: str, root: str, binding: Binding | None = None, digests=None):
        self._array = array
        self._name = name
        self._root = root
        self._binding = binding or Binding()
        self._load_digests = digests  # () -> the recorded digests [num_chunks, 2]
        self._digests: np.ndarray | None = None
        self._verified: set[int] = set()
        self._batch: dict[int, bytes | None] = {}

    def __getattr__(self, attr):
        return getattr(self._array, attr)

    def __len__(self) -> int:
        return len(self._array)

    def _rows(self, selection) -> tuple[int, int] | None:
        """[first, last] samples a selection touches along axis 0 (None: none)."""
        first = selection[0] if isinstance(selection, tuple) and selection else selection
        n = int(self._array.shape[0]) if self._array.shape else 1
        if isinstance(first, slice):
            lo, hi, _ = first.indices(n)
            return (lo, max(lo, hi - 1)) if hi > lo else None
        if isinstance(first, (int, np.integer)):
            i = int(first) + (n if int(first) < 0 else 0)
            return i, i
        if first is Ellipsis or first is None or (isinstance(selection, tuple) and not selection):
            return 0, n - 1
        idx = np.asarray(first).reshape(-1)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        return (int(idx.min()), int(idx.max())) if idx.size else None

    def _range(self, selection) -> str:
        rows = self._rows(selection)
        if rows is None:
            return "no samples"
        return f"sample {rows[0]}" if rows[0] == rows[1] else f"samples {rows[0]}..{rows[1]}"

    def _chunks_of(self, selection) -> list[int]:
        first = selection[0] if isinstance(selection, tuple) and selection else selection
        rows = self._rows(selection)
        if rows is None or not self._array.shape:
            return [0] if not self._array.shape else []
        per = object_rows(self._array)
        if isinstance(first, (list, np.ndarray)) and np.asarray(first).dtype != bool:
            return sorted({int(i) // per for i in np.asarray(first).reshape(-1)})
        return list(range(rows[0] // per, rows[1] // per + 1))

    def _verify(self, selection) -> Damage | None:
        """Check the content digest of every chunk object ``selection`` touches, once each;
        the first that fails, else None."""
        if not self._binding.bound or self._load_digests is None:
            return None
        todo = [i for i in self._chunks_of(selection) if i not in self._verified]
        if not todo:
            return None
        if self._digests is None:
            self._digests = np.asarray(self._load_digests())
        fs, root_path = _fs(self._root)
        keys = {i: chunk_key(root_path, self._name, i, self._array.ndim) for i in todo}
        for index in todo:
            if index not in self._batch:  # one concurrent fetch per batch (remote stores)
                batch = todo[todo.index(index) : todo.index(index) + _FETCH_BATCH]
                self._batch = _read_objects(fs, [keys[i] for i in batch], batch)
            data = self._batch.pop(index)
            row = self._digests[index] if index < len(self._digests) else [-1]
            what = (
                "the chunk file is missing"
                if data is None
                else check_chunk(str(self._binding.store_id), self._name, index, data, row)
            )
            if what is not None:
                first, last = _rows_of(self._array, index)
                return Damage(self._name, index, first, last, what)
            self._verified.add(index)
        return None

    def _read(self, fn, selection):
        try:
            bad = self._verify(selection)
            out = fn(selection)  # a chunk that does not decode: the crc32c sentence below
        except StoreError:
            raise
        except Exception as err:  # noqa: BLE001 - zarr/numcodecs raise several kinds
            raise StoreError(
                f"The store array {self._name} at {self._root} is damaged in {self._range(selection)} "
                f"({_reason(err)}); run `kdpipe inspect {self._root} --verify`."
            ) from None
        if bad is not None:
            raise StoreError(bad.sentence(self._root) + "; re-extract it.")
        return out

    def __getitem__(self, selection):
        return self._read(self._array.__getitem__, selection)

    def get_orthogonal_selection(self, selection):
        return self._read(self._array.get_orthogonal_selection, selection)
