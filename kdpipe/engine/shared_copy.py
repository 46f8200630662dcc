"""The shared copy: one node-local, uncompressed, memory-mapped copy of the arrays a method reads.

Many students trained side by side from one store (sweep trials, data-parallel workers) would
each load their own copy of the targets into memory. The ``shared`` tier instead maps one
file per array, made once per machine from the store: every process maps the same pages of
the page cache, so four trials hold about the memory of one (``benchmarks/target_reader.py``
measures it as PSS).

Where: ``$KDPIPE_SHARED_DIR`` when set, else ``$XDG_CACHE_HOME/kdpipe/shared`` (by default
``~/.cache/kdpipe/shared``); ``CachedTargets(shared_dir=...)`` overrides both. The copy is
node-local on purpose: a network file system would serve every row over the network.

A copy is a folder named by the digest of what it holds (``copy_identity``: the store's
identity, the target set, and per array its path, which views, shape, dtype and the sha256
of the store's recorded chunk digests), holding one ``.npy`` per array and ``meta.json``
(that identity, and each file's size and crc32c). It is made once:

- under an exclusive lock (``fcntl.flock`` on ``<key>.lock``), so concurrent trials wait for
  the first one and then map its copy;
- from a store whose chunks are first checked against their recorded digests
  (``verify_source``), every row decoded through its crc32c, NaN/inf refused;
- into a temporary folder renamed into place when complete (a crash leaves no half copy).

When opened, a copy is checked again: the identity it records (another store, another target
set, other chunks are refused), each file's size (truncation) and crc32c (edited bytes). A
damaged or stale copy is rebuilt with one logged sentence, or refused with that sentence
(``rebuild=False``); nothing trains on rows that are not the store's.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from kdpipe.errors import StoreError

__all__ = [
    "SHARED_DIR_ENV",
    "default_shared_dir",
    "copy_identity",
    "verify_source",
    "SharedCopy",
    "load_array",
    "copy_bytes",
]

SHARED_DIR_ENV = "KDPIPE_SHARED_DIR"
#: Threads decoding shards when a whole array is loaded or copied (the codecs release the GIL).
LOAD_WORKERS = max(1, min(4, os.cpu_count() or 1))
#: Bytes per crc32c update when a copy's files are checked.
_CRC_STEP = 64 << 20

log = logging.getLogger("kdpipe")


def default_shared_dir() -> Path:
    """``$KDPIPE_SHARED_DIR``, else ``$XDG_CACHE_HOME/kdpipe/shared`` (``~/.cache/kdpipe/shared``)."""
    if os.environ.get(SHARED_DIR_ENV):
        return Path(os.environ[SHARED_DIR_ENV])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "kdpipe" / "shared"


# ---------------------------------------------------------------------------- reading the store
def _blocks(reader, path: str, per_view: bool):
    """(lo, hi, rows) over the array ``path``: every view, or view 0 only; through the row
    reader (decoded in threads) where the array is in the row layout, else through zarr."""
    rows = reader.row_reader(path)
    if rows is not None:
        view = None if per_view else 0
        with ThreadPoolExecutor(LOAD_WORKERS, thread_name_prefix="kdpipe-load") as pool:
            shards = range(rows.num_shards)
            for shard, block in zip(shards, pool.map(lambda s: rows.read_shard(s, view), shards), strict=True):
                lo = shard * rows.shard_rows
                yield lo, lo + len(block), block
        return
    arr = reader.array(path)
    step = int((getattr(arr, "shards", None) or arr.chunks)[0])
    for lo in range(0, int(arr.shape[0]), step):
        hi = min(lo + step, int(arr.shape[0]))
        yield lo, hi, np.asarray(arr[lo:hi] if per_view else arr.get_orthogonal_selection((slice(lo, hi), 0)))


def _refuse_nonfinite(path: str, root: str, block: np.ndarray, lo: int, hi: int) -> None:
    if block.dtype.kind == "f" and not np.isfinite(block).all():
        raise StoreError(
            f"The store array {path} (samples {lo}..{hi - 1}) at {root} holds NaN or infinite values; "
            "re-extract or re-cluster it."
        )


def use_shape(reader, path: str, per_view: bool) -> tuple[tuple, np.dtype]:
    arr = reader.array(path)
    shape = tuple(int(s) for s in arr.shape)
    return (shape if per_view else (shape[0],) + shape[2:]), np.dtype(arr.dtype)


def load_array(reader, path: str, per_view: bool, finite_check: bool = True) -> np.ndarray:
    """The whole array ``path`` (every view, or view 0: [N, ...]) in memory."""
    shape, dtype = use_shape(reader, path, per_view)
    out = np.empty(shape, dtype=dtype)
    for lo, hi, block in _blocks(reader, path, per_view):
        if finite_check:
            _refuse_nonfinite(path, reader.path, block, lo, hi)
        out[lo:hi] = block
    return out


def copy_bytes(reader, uses) -> int:
    """Bytes of the shared copy of ``uses`` (as stored, uncompressed)."""
    total = 0
    for use in uses:
        shape, dtype = use_shape(reader, use.path, use.per_view)
        total += int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    return total


# ---------------------------------------------------------------------------- identity and checks
def _digests_sha256(reader, path: str) -> str:
    from kdpipe.artifacts.integrity import digest_name

    if digest_name(path) not in reader.group:
        raise StoreError(f"The store array {path} at {reader.path} has no chunk digests; it cannot be shared.")
    recorded = np.ascontiguousarray(np.asarray(reader.group[digest_name(path)][...]))
    return hashlib.sha256(recorded.tobytes()).hexdigest()


def copy_identity(reader, uses, target_set: str | None) -> dict:
    """What a copy holds: the store (its teacher, data and creation time), the target set and,
    per array, its path, views, shape, dtype and the sha256 of the store's chunk digests."""
    m = reader.manifest
    arrays = {}
    for use in uses:
        shape, dtype = use_shape(reader, use.path, use.per_view)
        arrays[use.path] = {
            "per_view": bool(use.per_view),
            "shape": list(shape),
            "dtype": dtype.str,
            "digests_sha256": _digests_sha256(reader, use.path),
        }
    return {
        "store": {
            "created": m.created,
            "teacher_sha256": m.teacher.sha256,
            "dataset_fingerprint": m.dataset.fingerprint,
        },
        # named, or read from the arrays' paths (targets/<name>/...), so every trial agrees
        "target_set": target_set
        or ",".join(sorted({p.split("/")[1] for p in arrays if p.startswith("targets/")}))
        or None,
        "arrays": arrays,
    }


def _key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def verify_source(reader, names: list[str]) -> None:
    """Refuse (one sentence) when a chunk of ``names`` is missing or is not the chunk whose
    digest the store recorded (``kdpipe.artifacts.integrity``; kept to this one call so the
    copy follows whatever digests the store records)."""
    from kdpipe.artifacts.integrity import check_store

    found = check_store(reader.group, reader.path, names, reader.manifest.binding)
    if found:
        raise StoreError(found[0].sentence(reader.path) + "; the shared copy is not made from it.")


def _file_crc(path: Path) -> int:
    from kdpipe.artifacts.row_reads import crc32c

    value = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CRC_STEP):
            value = crc32c(chunk, value)
    return int(value)


def _stamp(path: Path) -> list[int]:
    """What changes whenever a file's bytes are written: inode, size, mtime and ctime (ns)."""
    st = path.stat()
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _problem(folder: Path, identity: dict) -> str | None:
    """Why the copy in ``folder`` may not be used for ``identity``, or None when it may. A
    file whose stamp (``_stamp``) is the one recorded when it was made has not been written
    since; any other is read whole and its crc32c compared."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return "has no readable meta.json (an interrupted or damaged copy)"
    if meta.get("identity") != identity:
        return "was made from another store, target set or store content (stale)"
    for path, entry in (meta.get("files") or {}).items():
        file = folder / str(entry.get("file"))
        try:
            size = file.stat().st_size
        except OSError:
            return f"lacks the file of {path}"
        if size != int(entry.get("bytes", -1)):
            return f"has a file of {path} of {size} bytes, not {entry.get('bytes')} (truncated or replaced)"
        if _stamp(file) != entry.get("stamp") and _file_crc(file) != int(entry.get("crc32c", -1)):
            return f"has a file of {path} whose bytes differ from the ones copied (edited or damaged)"
    if sorted(meta.get("files") or {}) != sorted(identity["arrays"]):
        return "does not hold the arrays it is named for"
    return None


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------- the copy
class SharedCopy:
    """The memory-mapped arrays of one verified copy (see the module docstring):
    ``arrays[path]`` is a read-only numpy array over the shared mapping of its file."""

    def __init__(self, folder: Path, arrays: dict[str, np.ndarray], made: bool, seconds: float, note: str | None):
        self.folder = folder
        self.arrays = arrays
        self.made = made  # this process made it (else it mapped one made before)
        self.seconds = seconds  # time to make or to check it
        self.note = note  # the sentence logged when a damaged or stale copy was rebuilt

    @classmethod
    def open(
        cls,
        reader,
        uses,
        target_set: str | None = None,
        shared_dir=None,
        rebuild: bool = True,
        finite_check: bool = True,
    ) -> SharedCopy:
        """Map the copy of ``uses`` of ``reader``; make it first when there is none (or rebuild
        a damaged or stale one; ``rebuild=False`` refuses it in one sentence)."""
        import time

        t0 = time.perf_counter()
        identity = copy_identity(reader, uses, target_set)
        root = Path(shared_dir) if shared_dir is not None else default_shared_dir()
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(
                f"The shared-copy folder {root} cannot be made ({err.strerror}); set {SHARED_DIR_ENV}."
            ) from None
        key = _key(identity)
        folder = root / key
        note, made = None, False
        with _locked(root / f"{key}.lock"):
            if folder.exists():
                why = _problem(folder, identity)
                if why is not None:
                    note = f"The shared copy at {folder} {why}"
                    if not rebuild:
                        raise StoreError(note + "; delete it (kdpipe rebuilds it from the store).")
                    log.warning("%s; rebuilding it from the store.", note)
                    _remove(folder)
            if not folder.exists():
                _make(reader, uses, identity, root, folder, finite_check)
                made = True
        meta = json.loads((folder / "meta.json").read_text())
        arrays = {path: _map(folder / entry["file"]) for path, entry in meta["files"].items()}
        return cls(folder, arrays, made, time.perf_counter() - t0, note)

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays.values())


def _map(path: Path) -> np.ndarray:
    """The array of a ``.npy`` file, mapped read-only (MAP_SHARED: the page cache's own pages,
    whatever the number of processes) and populated up front, so gathers never take a page
    fault. (A private writable map would let torch wrap it without a warning, but populating
    one copies every page: four trials held four copies.)"""
    import mmap

    fmt = np.lib.format
    with open(path, "rb") as f:
        version = fmt.read_magic(f)
        if version not in ((1, 0), (2, 0)):  # open_memmap writes these; anything else: numpy's map
            return np.load(path, mmap_mode="r")
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran, dtype = read(f)
        offset = f.tell()
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        mm = mmap.mmap(f.fileno(), 0, flags=flags, prot=mmap.PROT_READ)
    count = int(np.prod(shape, dtype=np.int64))
    array = np.frombuffer(mm, dtype=dtype, count=count, offset=offset)
    return array.reshape(shape, order="F" if fortran else "C")


def _remove(folder: Path) -> None:
    """Move the folder aside first, so no reader ever sees a half-deleted copy under its name;
    processes that map its files keep their pages until they unmap them."""
    aside = folder.with_name(f"{folder.name}.old-{os.getpid()}")
    os.rename(folder, aside)
    shutil.rmtree(aside, ignore_errors=True)


def _make(reader, uses, identity: dict, root: Path, folder: Path, finite_check: bool) -> None:
    from tqdm import tqdm

    total = copy_bytes(reader, uses)
    free = shutil.disk_usage(root).free
    if total > free:
        raise StoreError(
            f"The shared copy needs {total / 2**30:.1f} GiB and {root} has {free / 2**30:.1f} GiB free; "
            f"set {SHARED_DIR_ENV} to a larger local disk or use --resident stream."
        )
    verify_source(reader, [u.path for u in uses])
    tmp = root / f"{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    files = {}
    try:
        with tqdm(total=total, unit="B", unit_scale=True, desc="shared copy", leave=False, disable=None) as bar:
            for i, use in enumerate(uses):
                shape, dtype = use_shape(reader, use.path, use.per_view)
                name = f"{i}.npy"
                out = np.lib.format.open_memmap(tmp / name, mode="w+", dtype=dtype, shape=shape)
                for lo, hi, block in _blocks(reader, use.path, use.per_view):
                    if finite_check:
                        _refuse_nonfinite(use.path, reader.path, block, lo, hi)
                    out[lo:hi] = block
                    bar.update(block.nbytes)
                out.flush()
                del out
                files[use.path] = {
                    "file": name,
                    "bytes": (tmp / name).stat().st_size,
                    "crc32c": _file_crc(tmp / name),
                    "stamp": _stamp(tmp / name),  # the rename below keeps inode and times
                }
        (tmp / "meta.json").write_text(json.dumps({"identity": identity, "files": files}, indent=1))
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
