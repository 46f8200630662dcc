"""Store integrity: no damaged, missing or misplaced chunk is ever read as data.

Three layers (every array of a store is chunked along its first axis only):

1. **Checksums.** Every chunk ends with the crc32c of its encoded bytes (zarr v3's
   ``Crc32cCodec`` closes every array's codec chain, ``kdpipe.artifacts.schema.compressors``):
   a corrupted chunk fails to decode. Reads go through ``CheckedArray``, which turns that
   failure into one sentence naming the array and the sample range.
2. **A digest per chunk.** When a chunk is written, its crc32c (the chunk object's last 4
   bytes) is recorded in ``integrity/<array>`` (int64 [num_chunks], one zarr chunk per entry,
   so parallel writers never race; -1 = not written). Two swapped chunk files decode fine but
   carry each other's digest; a replaced chunk carries a foreign one.
3. **Existence.** ``check_store`` (run when a store is opened for training: one listing and a
   4-byte read per chunk, no decoding) refuses a store where an array, a chunk file or a
   digest is missing, or a chunk's digest differs from the recorded one. ``verify_store``
   (``kdpipe inspect --verify``) also decodes every chunk and reports each damaged one.

Every chunk is written, also one equal to the fill value (``write_empty_chunks``), so a
missing chunk file always means damage.

Per-view arrays of new stores are zarr shards (``kdpipe.artifacts.row_reads``): one object per
block of samples, as a chunk was, holding one inner chunk per (sample, view) row, each closed
by its crc32c, and an index closed by its crc32c. A shard's digest is its index's crc32c
extended with those of its first and last rows (``_shard_digest``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from kdpipe.errors import StoreError

if TYPE_CHECKING:
    from zarr.core.array_spec import ArrayConfigParams

__all__ = [
    "DIGESTS",
    "digest_name",
    "num_chunks",
    "record_digests",
    "check_store",
    "verify_store",
    "CheckedArray",
    "Damage",
    "ARRAY_CONFIG",
]

#: The group of the per-chunk digest arrays.
DIGESTS = "integrity"
#: zarr array config: write every chunk, also one equal to the fill value.
ARRAY_CONFIG: ArrayConfigParams = {"write_empty_chunks": True}


def digest_name(array: str) -> str:
    return f"{DIGESTS}/{array}"


def _outer_chunks(array) -> tuple:
    """The chunk shape on storage: the shard's for a sharded array (one object per shard)."""
    return tuple(getattr(array, "shards", None) or array.chunks or ())


def num_chunks(array) -> int:
    rows = int(_outer_chunks(array)[0]) if _outer_chunks(array) else 1
    return max(1, -(-int(array.shape[0]) // rows)) if array.shape else 1


def _fs(root: str):
    from kdpipe.storage import filesystem

    return filesystem(root)


def _chunk_key(root_path: str, array: str, index: int, ndim: int) -> str:
    return "/".join([root_path.rstrip("/"), array, "c", str(int(index))] + ["0"] * max(0, ndim - 1))


def _tail_digest(fs, key: str) -> int | None:
    """The crc32c a chunk object ends with (little-endian uint32), or None when it is absent."""
    try:
        tail = fs.cat_file(key, start=-4)
    except (FileNotFoundError, OSError):
        return None
    return int.from_bytes(tail, "little") if len(tail) == 4 else None


def _shard_digest(fs, key: str, arr) -> int | None:
    """A shard's digest: the crc32c its index ends with, extended with the crc32c of its first
    and of its last row. The index alone binds only the rows' sizes (two shards of fixed-size
    rows have equal indices), the rows' own checksums bind their bytes, so a shard moved or
    replaced is refused like a chunk (three small reads, no decoding)."""
    import google_crc32c

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
            return 0  # no row at all: never a recorded digest
        value = tail.to_bytes(4, "little")
        for offset, length in (entries[0], entries[-1]):
            if int(length) < 4 or int(offset) + int(length) > size:
                return 0  # an empty or impossible row: never a recorded digest
            value += fs.cat_file(key, start=int(offset + length) - 4, end=int(offset + length))
    except (FileNotFoundError, OSError, ValueError):
        return None
    return int(google_crc32c.value(value))


def _object_digest(fs, key: str, arr) -> int | None:
    """The digest of one chunk object: its crc32c, or a shard's (``_shard_digest``)."""
    return _shard_digest(fs, key, arr) if getattr(arr, "shards", None) else _tail_digest(fs, key)


def record_digests(group, root: str, array: str, first_chunk: int, last_chunk: int) -> None:
    """Record the digests of chunks [first_chunk, last_chunk] of ``array`` just written."""
    arr = group[array]
    fs, root_path = _fs(root)
    digests = group[digest_name(array)]
    for index in range(first_chunk, last_chunk + 1):
        value = _object_digest(fs, _chunk_key(root_path, array, index, arr.ndim), arr)
        if value is None:
            raise StoreError(f"The chunk {index} of {array} in {root} was not written.")
        digests[index] = value


@dataclass(frozen=True)
class Damage:
    """One damaged chunk (or array): where and what."""

    array: str
    chunk: int | None
    first: int | None
    last: int | None
    what: str

    def sentence(self, root: str) -> str:
        where = f" (chunk {self.chunk}, samples {self.first}..{self.last})" if self.chunk is not None else ""
        return f"The store array {self.array}{where} at {root} is damaged: {self.what}"


def _rows_of(arr, index: int) -> tuple[int, int]:
    rows = int(_outer_chunks(arr)[0]) if _outer_chunks(arr) else 1
    return index * rows, min((index + 1) * rows, int(arr.shape[0]) if arr.shape else 1) - 1


def _check_array(group, fs, root_path: str, name: str) -> list[Damage]:
    if name not in group or not hasattr(group[name], "shape"):
        return [Damage(name, None, None, None, "the array is missing")]
    arr = group[name]
    if digest_name(name) not in group:
        return [Damage(name, None, None, None, "its chunk digests are missing")]
    recorded = np.asarray(group[digest_name(name)][...])
    out = []
    for index in range(num_chunks(arr)):
        first, last = _rows_of(arr, index)
        found = _object_digest(fs, _chunk_key(root_path, name, index, arr.ndim), arr)
        if found is None:
            out.append(Damage(name, index, first, last, "the chunk file is missing"))
        elif index >= len(recorded) or recorded[index] < 0:
            out.append(Damage(name, index, first, last, "no digest was recorded for it"))
        elif int(recorded[index]) != found:
            out.append(Damage(name, index, first, last, "it is not the chunk written there (swapped or replaced)"))
    return out


def check_store(group, root: str, names: list[str]) -> list[Damage]:
    """The cheap check: every array, chunk file and digest present and matching."""
    fs, root_path = _fs(root)
    damage: list[Damage] = []
    for name in names:
        damage += _check_array(group, fs, root_path, name)
    return damage


def verify_store(group, root: str, names: list[str]) -> list[Damage]:
    """``check_store`` plus decoding every chunk (crc32c, codecs)."""
    damage = check_store(group, root, names)
    bad = {(d.array, d.chunk) for d in damage}
    for name in names:
        if (name, None) in bad:
            continue
        arr = group[name]
        decode = _decoder(arr, root, name)
        for index in range(num_chunks(arr)):
            if (name, index) in bad:
                continue
            first, last = _rows_of(arr, index)
            try:
                decode(index, first, last)
            except Exception as err:  # noqa: BLE001 - any decode failure is damage
                damage.append(Damage(name, index, first, last, f"it does not decode ({_reason(err)})"))
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
    """A zarr array whose reads turn decode failures into one sentence (array, sample range).

    Supports what kdpipe reads with: ``arr[...]``, ``arr[a:b]`` (and other basic selections)
    and ``arr.get_orthogonal_selection(sel)``; every other attribute is the zarr array's."""

    def __init__(self, array, name: str, root: str):
        self._array = array
        self._name = name
        self._root = root

    def __getattr__(self, attr):
        return getattr(self._array, attr)

    def __len__(self) -> int:
        return len(self._array)

    def _range(self, selection) -> str:
        first = selection[0] if isinstance(selection, tuple) and selection else selection
        n = int(self._array.shape[0]) if self._array.shape else 1
        if isinstance(first, slice):
            lo, hi, _ = first.indices(n)
            return f"samples {lo}..{max(lo, hi - 1)}"
        if isinstance(first, (int, np.integer)):
            return f"sample {int(first)}"
        if first is Ellipsis or first is None:
            return f"samples 0..{n - 1}"
        idx = np.asarray(first).reshape(-1)
        return f"samples {int(idx.min())}..{int(idx.max())}" if idx.size else "no samples"

    def _read(self, fn, selection):
        try:
            return fn(selection)
        except StoreError:
            raise
        except Exception as err:  # noqa: BLE001 - zarr/numcodecs raise several kinds
            raise StoreError(
                f"The store array {self._name} at {self._root} is damaged in {self._range(selection)} "
                f"({_reason(err)}); run `kdpipe inspect {self._root} --verify`."
            ) from None

    def __getitem__(self, selection):
        return self._read(self._array.__getitem__, selection)

    def get_orthogonal_selection(self, selection):
        return self._read(self._array.get_orthogonal_selection, selection)
