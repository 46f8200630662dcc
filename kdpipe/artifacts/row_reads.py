"""Row reads: the (sample, view) rows of a sharded store array, read straight from its shards.

A per-view array [N, V, ...] of a new store (``kdpipe.artifacts.writer.row_layout``) is a
zarr v3 array with the sharding codec: one shard object per block of samples (the old chunk
shape, so parallel writers still own whole objects and the chunk digests still cover one
object each), holding one inner chunk per (sample, view) row, each Blosc-compressed and
closed by its crc32c, and ending with the shard's index of (offset, length) pairs (itself
closed by a crc32c). Reading row (s, v) is a read of the index entry and of that row's
bytes: the bytes decoded per byte used are 1, whatever the number of views.

zarr reads such arrays too, but through its asynchronous codec pipeline at tens of
microseconds per inner chunk (``benchmarks/target_reader.py`` measures both); training reads
up to ~10^5 rows a second. ``RowReader`` reads the same bytes with the same components
(numcodecs' Blosc, google-crc32c) without that per-chunk machinery: it checks that the
array's metadata names exactly the codec chain kdpipe writes, and returns ``None`` for any
other array (old stores, remote stores), which callers read through zarr as before.

Integrity is kept: every shard index and every row is checked against its crc32c before it
is decoded; a missing shard, an index or row that fails its crc32c, or a missing row is one
sentence naming the array and the sample (``StoreError``), never a silent zero.
"""

from __future__ import annotations

import json
import mmap
import os
import threading
from dataclasses import dataclass

import numpy as np

from kdpipe.errors import StoreError

__all__ = [
    "RowReader",
    "RowLayout",
    "ReadStats",
    "row_reader",
    "row_layout_of",
    "write_shards",
    "encode_shard",
    "crc32c",
]


@dataclass
class ReadStats:
    """Bytes read from shard files (rows and indices) and bytes decoded, since the last reset."""

    read: int = 0
    decoded: int = 0
    rows: int = 0


#: crc32c(data + crc32c(data) as 4 little-endian bytes) for any data (CRC-32C's residue).
CRC32C_RESIDUE = 0x48674BC7


def crc32c(data, value: int = 0) -> int:
    """The crc32c (Castagnoli) of ``data``, continuing ``value``: google-crc32c, the library
    zarr's and numcodecs' crc32c checksums use."""
    import google_crc32c

    return int(google_crc32c.extend(value, data))


def _kdpipe_chain(codecs: list) -> dict | None:
    """The sharding configuration when ``codecs`` is exactly the chain kdpipe writes
    (sharding_indexed; inner bytes-little + blosc + crc32c; index bytes-little + crc32c, at the
    end), else None."""
    if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
        return None
    cfg = codecs[0].get("configuration") or {}
    inner = [c.get("name") for c in cfg.get("codecs") or []]
    index = [c.get("name") for c in cfg.get("index_codecs") or []]
    little = all(
        (c.get("configuration") or {}).get("endian", "little") == "little"
        for c in (cfg.get("codecs") or []) + (cfg.get("index_codecs") or [])
        if c.get("name") == "bytes"
    )
    if inner != ["bytes", "blosc", "crc32c"] or index != ["bytes", "crc32c"] or not little:
        return None
    if cfg.get("index_location", "end") != "end":
        return None
    return cfg


@dataclass(frozen=True)
class RowLayout:
    """What kdpipe needs to know of an array in the row layout (from its zarr.json)."""

    shape: tuple
    dtype: np.dtype
    shard_rows: int
    blosc: dict  # the inner Blosc codec's configuration (cname, clevel, shuffle, blocksize)

    @property
    def rows_per_shard(self) -> int:
        return self.shard_rows * int(self.shape[1])


def row_layout_of(meta: dict) -> RowLayout | None:
    """The row layout an array's metadata (its zarr.json as a dict) describes, or None."""
    cfg = _kdpipe_chain(meta.get("codecs") or [])
    shape = tuple(int(s) for s in meta.get("shape") or ())
    grid = ((meta.get("chunk_grid") or {}).get("configuration") or {}).get("chunk_shape")
    keys = meta.get("chunk_key_encoding") or {}
    if cfg is None or len(shape) < 2 or not grid or keys.get("name") != "default":
        return None
    if (keys.get("configuration") or {}).get("separator", "/") != "/":
        return None
    inner = tuple(int(c) for c in cfg.get("chunk_shape") or ())
    shard = tuple(int(c) for c in grid)
    if inner != (1, 1) + shape[2:] or shard[1:] != shape[1:]:
        return None
    blosc = next(c.get("configuration") or {} for c in cfg["codecs"] if c.get("name") == "blosc")
    return RowLayout(shape, np.dtype(meta["data_type"]).newbyteorder("<"), shard[0], dict(blosc))


def row_reader(root: str, name: str) -> RowReader | None:
    """A ``RowReader`` of array ``name`` of the local store at ``root``, or None when the array
    is not in kdpipe's row layout (an old store, another codec chain, a remote store)."""
    if "://" in root and not root.startswith("file://"):
        return None
    folder = os.path.join(root.removeprefix("file://"), name)
    try:
        with open(os.path.join(folder, "zarr.json")) as f:
            layout = row_layout_of(json.load(f))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return None if layout is None else RowReader(folder, name, layout)


# ---------------------------------------------------------------------------- writing shards
_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


def encode_shard(block: np.ndarray, layout: RowLayout) -> bytes:
    """The shard object of ``block`` [rows, V, ...] (rows <= shard_rows; rows past the array's
    end stay out of the index, as zarr leaves them): every row Blosc-compressed as the
    array's codec says and closed by its crc32c, then the index closed by its crc32c."""
    from numcodecs import blosc

    cfg = layout.blosc
    cname = str(cfg.get("cname", "zstd")).encode()
    clevel = int(cfg.get("clevel", 1))
    shuffle = _SHUFFLE.get(str(cfg.get("shuffle", "shuffle")), 1)
    blocksize = int(cfg.get("blocksize", 0) or 0)
    rows = np.ascontiguousarray(block, dtype=layout.dtype).reshape((-1,) + tuple(layout.shape[2:]))
    index = np.full((layout.rows_per_shard, 2), np.iinfo(np.uint64).max, dtype="<u8")
    parts, offset = [], 0
    for i in range(len(rows)):
        packed = blosc.compress(rows[i], cname, clevel, shuffle, blocksize)
        parts.append(packed)
        parts.append(crc32c(packed).to_bytes(4, "little"))
        index[i] = (offset, len(packed) + 4)
        offset += len(packed) + 4
    raw = index.tobytes()
    parts.append(raw)
    parts.append(crc32c(raw).to_bytes(4, "little"))
    return b"".join(parts)


def write_shards(root: str, name: str, start: int, data: np.ndarray) -> bool:
    """Write rows [start, start + len(data)) of the array ``name`` as whole shard objects when
    it is in the row layout and the rows are whole shards (or end the array); False otherwise
    (the caller writes them through zarr). zarr encodes a shard at about a millisecond per row
    on this machine's cores (``benchmarks/target_reader.py``, ``store_write_s``); this writes the
    same format with the same codecs in a few microseconds per row."""
    from kdpipe.storage import filesystem

    fs, root_path = filesystem(root)
    folder = "/".join([root_path.rstrip("/"), name])
    try:
        layout = row_layout_of(json.loads(fs.cat_file(folder + "/zarr.json")))
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if layout is None:
        return False
    stop, n, rows = start + len(data), int(layout.shape[0]), layout.shard_rows
    if start % rows or (stop % rows and stop != n) or tuple(data.shape[1:]) != layout.shape[1:]:
        return False
    for lo in range(start, stop, rows):
        shard = lo // rows
        key = "/".join([folder, "c", str(shard)] + ["0"] * (len(layout.shape) - 1))
        fs.makedirs(key.rsplit("/", 1)[0], exist_ok=True)  # object stores: a no-op
        fs.pipe_file(key, encode_shard(data[lo - start : min(lo + rows, stop) - start], layout))
    return True


class RowReader:
    """The rows of one array in kdpipe's row layout (see the module docstring). Thread-safe:
    ``read`` may run in several threads at once (file reads and decoding release the GIL).
    Shard files stay open and their indices in memory (16 bytes per row) once read."""

    def __init__(self, folder: str, name: str, layout: RowLayout):
        self.folder = folder
        self.name = name
        self.layout = layout
        self.shape = layout.shape
        self.dtype = layout.dtype
        self.shard_rows = int(layout.shard_rows)
        self.num_views = int(layout.shape[1])
        self.row_shape = tuple(layout.shape[2:])
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self.stats = ReadStats()
        self._per_shard = layout.rows_per_shard
        # (offset, length) of every row, filled shard by shard as they are first read
        self._index = np.zeros((self.num_shards * self._per_shard, 2), dtype=np.uint64)
        self._loaded = np.zeros(self.num_shards, dtype=bool)
        self._maps: list[mmap.mmap | None] = [None] * self.num_shards
        self._lock = threading.Lock()

    @property
    def num_shards(self) -> int:
        return -(-int(self.shape[0]) // self.shard_rows)

    # ------------------------------------------------------------------ shards
    def _key(self, shard: int) -> str:
        return os.path.join(self.folder, "c", str(shard), *(["0"] * (len(self.shape) - 1)))

    def _damaged(self, sample: int, what: str) -> str:
        return (
            f"The store array {self.name} at {os.path.dirname(self.folder)} is damaged at sample {sample}: "
            f"{what}; run `kdpipe inspect --verify` and re-extract or re-cluster it."
        )

    def _open(self, shard: int) -> mmap.mmap:
        """The shard's file, mapped (a row is then a slice: no system call; rows are read at
        random, so no read-ahead), its index loaded and checked; under the lock."""
        mapped = self._maps[shard]
        if mapped is not None:
            return mapped
        try:
            fd = os.open(self._key(shard), os.O_RDONLY)
        except OSError:
            raise StoreError(self._damaged(shard * self.shard_rows, "its shard file is missing")) from None
        size = os.fstat(fd).st_size
        want = self._per_shard * 16 + 4
        raw = os.pread(fd, want, size - want) if size >= want else b""
        if len(raw) != want or crc32c(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
            os.close(fd)
            raise StoreError(self._damaged(shard * self.shard_rows, "its shard index fails its crc32c"))
        lo = shard * self._per_shard
        self._index[lo : lo + self._per_shard] = np.frombuffer(raw, dtype="<u8", count=self._per_shard * 2).reshape(
            -1, 2
        )
        self.stats.read += want
        try:
            mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)  # the map holds its own descriptor
        if hasattr(mapped, "madvise") and hasattr(mmap, "MADV_RANDOM"):
            mapped.madvise(mmap.MADV_RANDOM)
        self._maps[shard] = mapped
        self._loaded[shard] = True
        return mapped

    def _prepare(self, shards: np.ndarray) -> None:
        missing = np.unique(shards[~self._loaded[shards]])
        if missing.size:
            with self._lock:
                for shard in missing.tolist():
                    self._open(shard)

    # ------------------------------------------------------------------ reads
    def read(self, samples, views=None, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [B, ...] of ``samples`` (int [B]) at ``views`` (int [B]; view 0 when None)."""
        samples = np.asarray(samples, dtype=np.int64).reshape(-1)
        views = np.zeros_like(samples) if views is None else np.asarray(views, dtype=np.int64).reshape(-1)
        if out is None:
            out = np.empty((len(samples),) + self.row_shape, dtype=self.dtype)
        shards = samples // self.shard_rows
        self._prepare(shards)
        entries = self._index[shards * self._per_shard + (samples - shards * self.shard_rows) * self.num_views + views]
        maps = [self._maps[s] for s in shards.tolist()]
        dest = out.reshape(len(samples), -1).view(np.uint8)
        read = self._decode(entries, samples, dest, lambda b, length, offset: maps[b][offset : offset + length])
        with self._lock:
            self.stats.read += read
            self.stats.decoded += len(samples) * self.row_bytes
            self.stats.rows += len(samples)
        return out

    def _decode(self, entries: np.ndarray, samples: np.ndarray, dest: np.ndarray, fetch) -> int:
        """Decode row b (``entries[b]`` = (offset, length)) of ``fetch(b, length, offset)`` into
        ``dest[b]`` (uint8 [B, row bytes]) for every b, each checked by its crc32c; bytes read.
        The loop runs for every row of every batch: it is kept to the calls it needs."""
        from google_crc32c import extend
        from numcodecs.blosc import decompress

        read, n = 0, self.row_bytes
        flat = memoryview(dest.reshape(-1).data)  # slice assignment: half numcodecs' cost with dest=
        for b, (offset, length) in enumerate(entries.tolist()):
            if length < 4 or offset == 2**64 - 1:
                raise StoreError(self._damaged(int(samples[b]), "a row was never written"))
            buf = fetch(b, length, offset)
            # a row ends with its crc32c: the crc32c of the whole row is then the constant residue
            if len(buf) != length or extend(0, buf) != CRC32C_RESIDUE:
                raise StoreError(self._damaged(int(samples[b]), "a row fails its crc32c"))
            try:  # Blosc reads the compressed length from its header: the crc32c is ignored
                flat[b * n : (b + 1) * n] = decompress(buf)
            except Exception as err:  # noqa: BLE001 - numcodecs raises RuntimeError/ValueError
                raise StoreError(
                    self._damaged(int(samples[b]), f"a row does not decode ({type(err).__name__})")
                ) from None
            read += length
        return read

    def read_shard(self, shard: int, view: int | None = None) -> np.ndarray:
        """Every row of ``shard``: [rows, V, ...], or [rows, ...] of ``view`` only (the whole
        shard object is read at once; every row is still checked by its crc32c)."""
        lo = shard * self.shard_rows
        hi = min(lo + self.shard_rows, int(self.shape[0]))
        samples = np.arange(lo, hi, dtype=np.int64)
        if view is None:
            samples, views = np.repeat(samples, self.num_views), np.tile(np.arange(self.num_views), hi - lo)
        else:
            views = np.full_like(samples, view)
        with self._lock:
            mapped = self._open(shard)
        size = len(mapped)
        entries = self._index[shard * self._per_shard + (samples - lo) * self.num_views + views]
        out = np.empty((len(samples),) + self.row_shape, dtype=self.dtype)
        dest = out.reshape(len(samples), -1).view(np.uint8)
        self._decode(entries, samples, dest, lambda b, length, offset: mapped[offset : offset + length])
        with self._lock:
            self.stats.read += size
            self.stats.decoded += len(samples) * self.row_bytes
            self.stats.rows += len(samples)
        return out if view is not None else out.reshape((hi - lo, self.num_views) + self.row_shape)

    def close(self) -> None:
        with self._lock:
            for i, mapped in enumerate(self._maps):
                if mapped is not None:
                    mapped.close()
                    self._maps[i] = None
            self._loaded[:] = False

    def __del__(self):  # file descriptors are a limited resource
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110 - interpreter shutdown
            pass
