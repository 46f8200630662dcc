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
        return fsspec.core.url_to_fs(path)
    except ImportError as err:
        raise _missing_backend(path, err) from None
    except ValueError as err:
        if "Protocol not known" in str(err):
            raise KdpipeError(
                f"{path} is not a path or a URL of a storage protocol fsspec knows ({_protocol(path)}://)."
            ) from None
        raise


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
