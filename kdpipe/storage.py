"""Paths and URLs: one place that opens "a local path or an fsspec URL".

Checkpoints (``--teacher``), data folders (``cifar100:<folder>``, ``imagefolder:<folder>``),
stores (``--out``) and run directories take either a local path or a URL of any fsspec
file system: ``s3://bucket/key`` (s3fs, kdpipe's ``s3`` extra), ``gs://bucket/key`` (gcsfs,
the ``gcs`` extra), ``file:///abs/path``, ``memory://name`` (one process only: tests).

``file://`` URLs become plain local paths (``normalize``), so everything local keeps its
atomic renames. Every other URL goes through fsspec. A URL whose backend is not installed is
one sentence naming the extra to install (``filesystem``).

Options of a file system (an endpoint, credentials, a region) are fsspec's own configuration,
``fsspec.config.conf``: fsspec fills it from ``FSSPEC_<PROTOCOL>_<KEY>`` environment variables
(e.g. ``FSSPEC_S3_ENDPOINT_URL``) and ``~/.config/fsspec/*.json`` and applies it to every file
system it creates (zarr's included). Ray workers on other nodes do not see the driver's
environment, so work that travels to them carries ``options()`` and the worker calls
``apply_options`` first. Only fsspec's configuration travels (keys put there included);
credentials a back end finds by itself (AWS_* variables, ~/.aws, instance roles) must be
present on every node.
"""

from __future__ import annotations

import copy
import os
import posixpath
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

from kdpipe.errors import KdpipeError

__all__ = [
    "is_url",
    "normalize",
    "filesystem",
    "open_file",
    "read_bytes",
    "write_bytes",
    "atomic_write_bytes",
    "writer_lock",
    "in_process_only",
    "refuse_in_process_only",
    "exists",
    "isfile",
    "isdir",
    "subfolders",
    "files_under",
    "join",
    "basename",
    "options",
    "apply_options",
    "EXTRAS",
]

#: protocol -> (package, kdpipe extra that installs it)
EXTRAS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs")}


def is_url(path) -> bool:
    """True for ``<protocol>://...`` (any URL, file:// included)."""
    return "://" in os.fspath(path) if isinstance(path, (str, os.PathLike)) else False


def _protocol(url: str) -> str:
    return url.split("://", 1)[0].lower()


def normalize(path) -> str:
    """A path as kdpipe records it: local paths absolute (``~`` expanded), ``file://`` URLs as
    local absolute paths, other URLs unchanged but for a trailing ``/``."""
    path = os.fspath(path)
    if is_url(path):
        if _protocol(path) in ("file", "local"):
            return os.path.abspath(path.split("://", 1)[1] or "/")
        return path.rstrip("/")
    return os.path.abspath(os.path.expanduser(path))


def _missing_backend(url: str, err: ImportError) -> KdpipeError:
    protocol = _protocol(url)
    if protocol in EXTRAS:
        package, extra = EXTRAS[protocol]
        return KdpipeError(
            f"{url} needs the {package} package, which is not installed; install kdpipe's "
            f"{extra} extra (pip install 'kdpipe[{extra}]')."
        )
    return KdpipeError(f"{url} needs an fsspec back end that is not installed ({err}).")


def filesystem(path):
    """(fsspec file system, path inside it) for a local path or URL; one sentence when the
    URL's back end is missing or its protocol unknown."""
    import fsspec.core

    path = normalize(path)
    try:
        fs, inner = fsspec.core.url_to_fs(path)
        if is_url(path):
            _probe(path, fs, inner)
        return fs, inner
    except ImportError as err:
        raise _missing_backend(path, err) from None
    except ValueError as err:
        if "Protocol not known" in str(err):
            raise KdpipeError(
                f"{path} is not a path or a URL of a storage protocol fsspec knows ({_protocol(path)}://)."
            ) from None
        raise


def in_process_only(path) -> bool:
    """Whether ``path`` lives in this process's memory (``memory://``): no other process (a Ray
    worker) sees it."""
    return isinstance(path, (str, os.PathLike)) and is_url(path) and _protocol(os.fspath(path)) == "memory"


def refuse_in_process_only(paths, where: str) -> None:
    """One sentence, before any worker starts, when ``where`` (Ray workers, other processes)
    would need one of ``paths`` that lives in this process only (``memory://``)."""
    for path in paths:
        if in_process_only(path):
            raise KdpipeError(
                f"{path} lives in this process's memory (memory://), which {where} cannot see; use "
                "--executor inline, or a folder or an object-store URL."
            )


#: storage roots (protocol://bucket) already reached in this process
_REACHED: set = set()


def _unreachable(url: str, err: BaseException) -> KdpipeError:
    """One sentence for an object store that cannot be used: what failed and what to set."""
    name = type(err).__name__
    first = (str(err).strip().splitlines() or [name])[0].rstrip(".")
    protocol = _protocol(url)
    if "Credential" in name or "credential" in first.lower():
        hint = {
            "s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)",
            "gs": "set GOOGLE_APPLICATION_CREDENTIALS",
            "gcs": "set GOOGLE_APPLICATION_CREDENTIALS",
        }.get(protocol, "set the storage's credentials")
        return KdpipeError(f"{url} cannot be read: no credentials were found ({first}); {hint}.")
    if "Endpoint" in name or "Connect" in name or "Timeout" in name or isinstance(err, OSError):
        hint = (
            "set AWS_ENDPOINT_URL for an S3-compatible server (MinIO, Ceph) or check the network"
            if protocol in ("s3", "s3a")
            else "check the network and the URL"
        )
        return KdpipeError(f"{url} cannot be reached: its storage endpoint does not answer ({first}); {hint}.")
    return KdpipeError(f"{url} cannot be used ({name}: {first}).")


def _probe(url: str, fs, inner: str) -> None:
    """Reach a URL's storage once per process and root, so that missing credentials or an
    endpoint that does not answer are one sentence before any work, not a botocore traceback
    from the middle of it."""
    root = url.split("://", 1)[0] + "://" + url.split("://", 1)[1].split("/", 1)[0]
    if root in _REACHED or _protocol(url) in ("memory", "file", "local"):
        return
    try:
        fs.exists(inner)
    except (FileNotFoundError, PermissionError):
        pass  # reached: what is (not) there is the caller's question
    except Exception as err:  # noqa: BLE001 - botocore / google-auth / aiohttp errors
        raise _unreachable(url, err) from None
    _REACHED.add(root)


@contextmanager
def open_file(path, mode: str = "rb") -> Iterator[IO]:
    """A file object for a local path or URL (a plain ``open`` for local paths)."""
    path = normalize(path)
    if not is_url(path):
        with open(path, mode) as fh:
            yield fh
        return
    fs, inner = filesystem(path)
    with fs.open(inner, mode) as fh:
        yield fh


def read_bytes(path) -> bytes:
    with open_file(path, "rb") as fh:
        return fh.read()


def atomic_write_bytes(path, write) -> None:
    """Write a local file through a temporary sibling (``write(fh)``, fsync) and ``os.replace``:
    a reader, or a process killed midway, sees the old file or the new one, never a torn one."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


@contextmanager
def writer_lock(path, what: str, who: str) -> Iterator[None]:
    """Hold the one-writer lock of ``what`` (e.g. "the target set 'default'") of the store at
    ``path`` for the block: a second process that asks for it while the first writes gets one
    sentence instead of writing over the first's arrays.

    The lock is an OS file lock (``filelock``: fcntl / msvcrt, released when its process dies,
    so a killed writer never leaves it held) in the temporary folder, keyed by the store's
    absolute location, so nothing is added to the store. It covers writers on this machine."""
    import hashlib
    import tempfile

    from filelock import FileLock, Timeout

    key = normalize(path)
    if not is_url(key):
        key = os.path.abspath(key)
    digest = hashlib.sha256(f"{key}\0{what}".encode()).hexdigest()[:24]
    folder = os.path.join(tempfile.gettempdir(), "kdpipe-locks")
    os.makedirs(folder, exist_ok=True)
    lock = FileLock(os.path.join(folder, f"{digest}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise KdpipeError(
            f"Another {who} is writing {what} of the store at {path} (it holds that lock); wait for it to "
            "finish, or choose another name or store."
        ) from None
    try:
        yield
    finally:
        lock.release()


def write_bytes(path, data: bytes) -> None:
    """A whole file at a local path (atomically) or a URL (one object, one PUT)."""
    path = normalize(path)
    if not is_url(path):
        atomic_write_bytes(path, lambda fh: fh.write(data))
        return
    fs, inner = filesystem(path)
    fs.pipe_file(inner, data)


def exists(path) -> bool:
    path = normalize(path)
    if not is_url(path):
        return os.path.exists(path)
    fs, inner = filesystem(path)
    return fs.exists(inner)


def isfile(path) -> bool:
    path = normalize(path)
    if not is_url(path):
        return os.path.isfile(path)
    fs, inner = filesystem(path)
    return fs.isfile(inner)


def isdir(path) -> bool:
    path = normalize(path)
    if not is_url(path):
        return os.path.isdir(path)
    fs, inner = filesystem(path)
    return fs.isdir(inner)


def subfolders(path) -> list[str]:
    """Names of the folders directly in ``path`` (hidden ones left out), sorted."""
    path = normalize(path)
    if not is_url(path):
        return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))
    fs, inner = filesystem(path)
    names = (
        posixpath.basename(e["name"].rstrip("/")) for e in fs.ls(inner, detail=True) if e.get("type") == "directory"
    )
    return sorted(n for n in names if n and not n.startswith("."))


def files_under(path) -> list[str]:
    """Every file below ``path`` (recursively, following links locally), as paths or URLs
    of the same kind as ``path``, sorted."""
    path = normalize(path)
    if not is_url(path):
        return sorted(os.path.join(root, f) for root, _, files in os.walk(path, followlinks=True) for f in files)
    fs, inner = filesystem(path)
    return sorted(fs.unstrip_protocol(p) for p in fs.find(inner))


def join(base, *parts: str) -> str:
    """``base/part/...`` for a local path (os.path.join) or a URL ('/'-joined)."""
    base = os.fspath(base)
    if is_url(base):
        return "/".join([base.rstrip("/")] + [str(p).strip("/") for p in parts])
    return os.path.join(base, *map(str, parts))


def basename(path) -> str:
    path = os.fspath(path)
    return posixpath.basename(path.rstrip("/")) if is_url(path) else os.path.basename(path.rstrip(os.sep))


def options() -> dict:
    """A copy of fsspec's configuration (per-protocol options): what a Ray worker needs to
    reach the same URLs as the driver."""
    import fsspec.config

    return copy.deepcopy(dict(fsspec.config.conf))


def apply_options(snapshot: dict | None) -> None:
    """Merge a driver's ``options()`` into this process's fsspec configuration (a worker's own
    settings for a protocol are kept where the driver has none)."""
    if not snapshot:
        return
    import fsspec.config

    for protocol, values in snapshot.items():
        merged = dict(fsspec.config.conf.get(protocol) or {})
        merged.update(values or {})
        fsspec.config.conf[protocol] = merged
