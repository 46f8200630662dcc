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
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from kdpipe.errors import StoreError

__all__ = ["RowReader", "ReadStats", "row_reader", "crc32c"]

#: Shard files kept open at once (each row read is one pread on one of them).
OPEN_SHARDS = 256
_EMPTY = np.uint64(2**64 - 1)


@dataclass
class ReadStats:
    """Bytes read from shard files (rows and indices) and bytes decoded, since the last reset."""

    read: int = 0
    decoded: int = 0
    rows: int = 0


def crc32c(data, value: int = 0) -> int:
    """The crc32c (Castagnoli) of ``data``, continuing ``value``: google-crc32c, the library
    zarr's and numcodecs' crc32c checksums use."""
    import google_crc32c

    return int(google_crc32c.extend(value, data))


def _decompress(buf, out: np.ndarray) -> None:
    from numcodecs import blosc

    blosc.decompress(buf, out)


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


def row_reader(root: str, name: str) -> RowReader | None:
    """A ``RowReader`` of array ``name`` of the local store at ``root``, or None when the array
    is not in kdpipe's row layout (an old store, another codec chain, a remote store)."""
    if "://" in root and not root.startswith("file://"):
        return None
    folder = os.path.join(root.removeprefix("file://"), name)
    try:
        with open(os.path.join(folder, "zarr.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
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
    return RowReader(folder, name, shape, np.dtype(meta["data_type"]), shard[0])


class RowReader:
    """The rows of one array in kdpipe's row layout (see the module docstring). Thread-safe:
    ``read`` may run in several threads at once (the decoding releases the GIL)."""

    def __init__(self, folder: str, name: str, shape: tuple, dtype: np.dtype, shard_rows: int):
        self.folder = folder
        self.name = name
        self.shape = shape
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.shard_rows = int(shard_rows)
        self.num_views = int(shape[1])
        self.row_shape = tuple(shape[2:])
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self.stats = ReadStats()
        self._per_shard = self.shard_rows * self.num_views
        self._indices: dict[int, np.ndarray] = {}
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ shards
    def _key(self, shard: int) -> str:
        return os.path.join(self.folder, "c", str(shard), *(["0"] * (len(self.shape) - 1)))

    def _fd(self, shard: int) -> int:
        with self._lock:
            fd = self._fds.get(shard)
            if fd is not None:
                self._fds.move_to_end(shard)
                return fd
            try:
                fd = os.open(self._key(shard), os.O_RDONLY)
            except OSError:
                raise StoreError(self._damaged(shard * self.shard_rows, "its shard file is missing")) from None
            self._fds[shard] = fd
            while len(self._fds) > OPEN_SHARDS:
                os.close(self._fds.popitem(last=False)[1])
            return fd

    def _index(self, shard: int) -> np.ndarray:
        """uint64 [rows * views, 2]: (offset, length) of every row of ``shard``."""
        index = self._indices.get(shard)
        if index is not None:
            return index
        fd = self._fd(shard)
        size = os.fstat(fd).st_size
        want = self._per_shard * 16 + 4
        raw = os.pread(fd, want, size - want) if size >= want else b""
        if len(raw) != want or crc32c(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
            raise StoreError(self._damaged(shard * self.shard_rows, "its shard index fails its crc32c"))
        index = np.frombuffer(raw, dtype="<u8", count=self._per_shard * 2).reshape(-1, 2)
        self.stats.read += want
        self._indices[shard] = index
        return index

    def _damaged(self, sample: int, what: str) -> str:
        return (
            f"The store array {self.name} at {os.path.dirname(self.folder)} is damaged at sample {sample}: "
            f"{what}; run `kdpipe inspect --verify` and re-extract or re-cluster it."
        )

    def _decode_row(self, fd: int, entry: np.ndarray, sample: int, out: np.ndarray) -> int:
        offset, length = entry
        if offset == _EMPTY:
            raise StoreError(self._damaged(sample, "a row was never written"))
        buf = os.pread(fd, int(length), int(offset))
        if len(buf) != int(length) or crc32c(buf[:-4]) != int.from_bytes(buf[-4:], "little"):
            raise StoreError(self._damaged(sample, "a row fails its crc32c"))
        try:
            _decompress(memoryview(buf)[:-4], out)
        except Exception as err:  # noqa: BLE001 - numcodecs raises RuntimeError/ValueError
            raise StoreError(self._damaged(sample, f"a row does not decode ({type(err).__name__})")) from None
        return len(buf)

    # ------------------------------------------------------------------ reads
    def read(self, samples, views=None, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [B, ...] of ``samples`` (int [B]) at ``views`` (int [B]; view 0 when None)."""
        samples = np.asarray(samples, dtype=np.int64).reshape(-1)
        views = np.zeros_like(samples) if views is None else np.asarray(views, dtype=np.int64).reshape(-1)
        if out is None:
            out = np.empty((len(samples),) + self.row_shape, dtype=self.dtype)
        flat = out.reshape(len(samples), -1).view(np.uint8)
        shards = samples // self.shard_rows
        inner = (samples - shards * self.shard_rows) * self.num_views + views
        read = 0
        for b in range(len(samples)):
            shard = int(shards[b])
            index = self._index(shard)
            read += self._decode_row(self._fd(shard), index[inner[b]], int(samples[b]), flat[b])
        with self._lock:
            self.stats.read += read
            self.stats.decoded += len(samples) * self.row_bytes
            self.stats.rows += len(samples)
        return out

    def read_shard(self, shard: int, view: int | None = None) -> np.ndarray:
        """Every row of ``shard``: [rows, V, ...], or [rows, ...] of ``view`` only."""
        lo = shard * self.shard_rows
        hi = min(lo + self.shard_rows, int(self.shape[0]))
        samples = np.arange(lo, hi, dtype=np.int64)
        if view is not None:
            return self.read(samples, np.full_like(samples, view))
        rep = np.repeat(samples, self.num_views)
        rows = self.read(rep, np.tile(np.arange(self.num_views), hi - lo))
        return rows.reshape((hi - lo, self.num_views) + self.row_shape)

    @property
    def num_shards(self) -> int:
        return -(-int(self.shape[0]) // self.shard_rows)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._indices.clear()

    def __del__(self):  # file descriptors are a limited resource
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110 - interpreter shutdown
            pass
