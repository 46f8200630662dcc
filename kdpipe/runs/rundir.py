"""Run directories: one folder per training run with everything needed to read or resume it.

Layout of a run directory (``RunDir.create(root, prefix, config)``)::

    <root>/<prefix>-<YYYYmmdd-HHMMSS>[-<n>]/
        config.json          the resolved configuration (every argument the run used)
        metrics.csv          one row per epoch (columns fixed by the first row)
        metrics.jsonl        the same rows as JSON lines (extra keys allowed)
        curves.png           loss and top-1 against epoch (``plot_curves``)
        summary.json         final numbers (``write_summary``)
        checkpoints/
            latest.pth       full state after the last finished epoch (model, optimizer,
                             scheduler, RNG states, epoch): what ``--resume`` reads
            best.pth         {"model": state_dict, "epoch", "top1"} of the best test top-1

        tensorboard/         TensorBoard event files (``kdpipe.engine.loggers``)

Checkpoints are written atomically (temporary file in the same folder, fsync, ``os.replace``),
so a run killed at any moment leaves either the previous file or the new one, never a torn one.
Everything in a checkpoint loads with ``torch.load(..., weights_only=True)``.

**Run directories at a URL** (``--out s3://bucket/runs``, ``--resume s3://bucket/runs/x``;
``kdpipe.storage``): the run is written to a local staging folder (``RunDir.path``, a temporary
folder removed when the process ends) exactly as a local one, and every write is followed by
``sync()``, which uploads each file changed since the last upload as one whole object, in a
fixed order: the metrics and everything else first, ``checkpoints/best.pth`` next,
``checkpoints/latest.pth`` last. Object stores replace an object atomically (S3, GCS), so the
remote run never holds a torn file, and a kill between two uploads leaves at most a metrics
row past the checkpoint, which ``--resume`` drops, as locally. Opening a URL run directory
(``--resume``, data-parallel workers) downloads it into a fresh staging folder first.
``RunDir.location`` is what the user named (the URL), ``RunDir.path`` the local folder.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import tempfile
import time
import weakref
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from kdpipe import storage
from kdpipe.engine.state import (  # noqa: F401 - BEST/TENSORBOARD and the state helpers, named where the loop writes them
    BEST,
    TENSORBOARD,
    load_scheduler_state,
    restore_rng_state,
    rng_state,
    scheduler_state,
)
from kdpipe.errors import KdpipeError
from kdpipe.storage import atomic_write_bytes

CONFIG = "config.json"
METRICS_CSV = "metrics.csv"
METRICS_JSONL = "metrics.jsonl"
SUMMARY = "summary.json"
CURVES = "curves.png"
CHECKPOINTS = "checkpoints"
LATEST = "latest.pth"


def _jsonable(obj: Any):
    """json.dumps default: paths, tuples, numpy and torch scalars become plain JSON."""
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return obj.tolist()
    if isinstance(obj, torch.device):
        return str(obj)
    return str(obj)


def _clean(value):
    """NaN/inf are not JSON: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda fh: fh.write(text.encode("utf-8")))


class _WriteErrors:
    """A file handle that remembers the OSError its ``write`` raised: torch's zip writer turns
    it into ``RuntimeError: [enforce fail at inline_container.cc] ... file write failed``."""

    def __init__(self, fh):
        self.fh = fh
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as err:
            self.error = err
            raise

    def __getattr__(self, name):
        return getattr(self.fh, name)


def save_checkpoint_file(path, state: dict) -> Path:
    """``torch.save(state, path)`` atomically (a temporary sibling, then ``os.replace``: the
    previous checkpoint stays whole). Returns the path. A write that fails (a full disk) is
    the OSError it is, with the checkpoint's path, not torch's zip-writer RuntimeError."""
    path = Path(path)

    def write(fh) -> None:
        handle = _WriteErrors(fh)
        try:
            torch.save(state, handle)
        except RuntimeError as err:
            cause = handle.error
            if cause is None and "write" not in str(err):
                raise
            errno_ = cause.errno if cause is not None else None
            reason = cause.strerror if cause is not None else str(err).strip().splitlines()[-1]
            raise OSError(errno_, reason or "the write failed", str(path)) from None

    atomic_write_bytes(path, write)
    return path


class _Mirror:
    """Uploads a local staging folder to a URL, file by file, each changed file whole; downloads
    the URL's files into the staging folder (see the module docstring)."""

    def __init__(self, url: str, local: Path):
        self.url = url
        self.local = local
        self.fs, self.root = storage.filesystem(url)
        # relative path -> (inode, size, mtime_ns) when uploaded: an atomic rewrite is a new inode,
        # an append a new size, whatever the clock's granularity
        self.sent: dict[str, tuple[int, int, int]] = {}

    def _order(self, rel: str) -> tuple:
        # checkpoints last, latest.pth very last: a remote checkpoint never runs ahead of its metrics
        return (rel == f"{CHECKPOINTS}/{LATEST}", rel.startswith(CHECKPOINTS + "/"), rel)

    def _local_files(self) -> dict[str, tuple[int, int, int]]:
        out = {}
        for root, _, files in os.walk(self.local):
            for name in files:
                if name.startswith(".") and ".tmp-" in name:  # an atomic write in progress
                    continue
                full = os.path.join(root, name)
                st = os.stat(full)
                out[os.path.relpath(full, self.local).replace(os.sep, "/")] = (st.st_ino, st.st_size, st.st_mtime_ns)
        return out

    def sync(self) -> None:
        files = self._local_files()
        for rel in sorted((r for r in files if self.sent.get(r) != files[r]), key=self._order):
            self.fs.put_file(str(self.local / rel), f"{self.root}/{rel}")
            self.sent[rel] = files[rel]
        for rel in [r for r in self.sent if r not in files]:  # removed locally (truncated metrics)
            self.fs.rm_file(f"{self.root}/{rel}")
            del self.sent[rel]

    def pull(self) -> None:
        if not self.fs.exists(self.root):
            return
        for remote in self.fs.find(self.root):
            rel = remote[len(self.root) :].lstrip("/")
            target = self.local / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(remote, str(target))
        self.sent = self._local_files()


class RunDir:
    """One run's folder. Create with ``RunDir.create``; reopen (for --resume) with ``RunDir.open``.

    ``path`` is the local folder written to; ``location`` the run directory as the user named
    it (the same path, or a URL whose files ``path`` stages and ``sync`` uploads)."""

    def __init__(self, path):
        self.location = storage.normalize(path)
        self._mirror: _Mirror | None = None
        if storage.is_url(self.location):
            staging = tempfile.mkdtemp(prefix="kdpipe-run-")
            weakref.finalize(self, shutil.rmtree, staging, True)
            self.path = Path(staging)
            self._mirror = _Mirror(self.location, self.path)
            self._mirror.pull()
        else:
            self.path = Path(self.location)

    @property
    def remote(self) -> bool:
        return self._mirror is not None

    def sync(self) -> None:
        """Upload what changed to the URL (a no-op for a local run directory)."""
        if self._mirror is not None:
            self._mirror.sync()

    def refresh(self) -> None:
        """Download the URL's files again (after other processes wrote to it); local: no-op."""
        if self._mirror is not None:
            self._mirror.pull()

    def url(self, *parts: str) -> str:
        """A file of the run as the user reaches it: ``location/part/...``."""
        return storage.join(self.location, *parts)

    # -- creation -------------------------------------------------------------------------
    @classmethod
    def create(cls, root, prefix: str, config: dict) -> RunDir:
        """A new, unique ``<root>/<prefix>-<timestamp>[-n]`` with ``config.json`` written."""
        root = storage.normalize(root)
        remote = storage.is_url(root)
        if not remote:
            Path(root).mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        safe = "".join(c if (c.isalnum() or c in "-_.") else "_" for c in str(prefix)) or "run"
        for n in range(1, 10_000):
            name = f"{safe}-{stamp}" if n == 1 else f"{safe}-{stamp}-{n}"
            path = storage.join(root, name)
            if remote:
                if storage.exists(path):
                    continue
            else:
                try:
                    Path(path).mkdir()
                except FileExistsError:
                    continue
            run = cls(path)
            (run.path / CHECKPOINTS).mkdir(exist_ok=True)
            run.write_config(config)
            return run
        raise KdpipeError(f"could not create a new run directory under {root}.")  # pragma: no cover

    @classmethod
    def open(cls, path) -> RunDir:
        """An existing run directory (for --resume); one sentence if it is not one."""
        location = storage.normalize(path)
        if not storage.isfile(storage.join(location, CONFIG)):
            raise KdpipeError(f"{location} is not a kdpipe run directory (no {CONFIG} in it).")
        return cls(location)

    # -- config ---------------------------------------------------------------------------
    def write_config(self, config: dict) -> None:
        atomic_write_text(self.path / CONFIG, json.dumps(config, indent=2, sort_keys=True, default=_jsonable) + "\n")
        self.sync()

    @property
    def config(self) -> dict:
        return json.loads((self.path / CONFIG).read_text())

    # -- metrics --------------------------------------------------------------------------
    @property
    def metrics_csv(self) -> Path:
        return self.path / METRICS_CSV

    @property
    def metrics_jsonl(self) -> Path:
        return self.path / METRICS_JSONL

    def log_epoch(self, row: dict) -> None:
        """Append one row to metrics.csv and metrics.jsonl. The CSV's columns are the first
        row's keys (later keys not among them go to the JSONL only)."""
        row = {k: _clean(v.item() if hasattr(v, "item") else v) for k, v in row.items()}
        csv_path = self.metrics_csv
        if csv_path.is_file() and csv_path.stat().st_size > 0:
            with open(csv_path, newline="") as fh:
                columns = next(csv.reader(fh))
            with open(csv_path, "a", newline="") as fh:
                csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore").writerow(row)
        else:
            with open(csv_path, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=list(row))
                writer.writeheader()
                writer.writerow(row)
        with open(self.metrics_jsonl, "a") as fh:
            fh.write(json.dumps(row, default=_jsonable) + "\n")
        self.sync()

    def read_metrics(self) -> list[dict]:
        """All rows logged so far (from metrics.jsonl)."""
        if not self.metrics_jsonl.is_file():
            return []
        rows = []
        for line in self.metrics_jsonl.read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line torn by a kill: ignore it
                    continue
        return rows

    def truncate_metrics(self, last_epoch: int) -> None:
        """Keep only rows with epoch <= last_epoch (resume after a kill that logged an epoch
        whose checkpoint never landed). Rewrites both files atomically."""
        rows = [r for r in self.read_metrics() if int(r.get("epoch", 0)) <= last_epoch]
        atomic_write_text(self.metrics_jsonl, "".join(json.dumps(r, default=_jsonable) + "\n" for r in rows))
        if rows:
            columns = None
            if self.metrics_csv.is_file():
                with open(self.metrics_csv, newline="") as fh:
                    columns = next(csv.reader(fh), None)
            columns = columns or list(rows[0])
            import io

            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            for r in rows:
                writer.writerow(r)
            atomic_write_text(self.metrics_csv, buf.getvalue())
        elif self.metrics_csv.exists():
            self.metrics_csv.unlink()
        self.sync()

    # -- checkpoints ----------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.path / CHECKPOINTS

    def save_checkpoint(self, state: dict, name: str = LATEST) -> Path:
        """Write ``state`` (mdistiller layout: {"model": state_dict, "epoch", "optimizer",
        "scheduler", "rng", ...}) to checkpoints/<name>, atomically."""
        return self.save_state(f"{CHECKPOINTS}/{name}", state)

    def save_state(self, relative: str, state: dict) -> Path:
        """``torch.save(state)`` to ``<run>/<relative>`` atomically (and uploaded, for a URL)."""
        path = save_checkpoint_file(self.path / relative, state)
        self.sync()
        return path

    def load_checkpoint(self, name: str = LATEST, map_location="cpu") -> dict:
        path = self.checkpoint_dir / name
        if not path.is_file():
            raise KdpipeError(f"run directory {self.location} has no checkpoint {CHECKPOINTS}/{name} to resume from.")
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as err:
            raise KdpipeError(
                f"checkpoint {self.url(CHECKPOINTS, name)} could not be read ({type(err).__name__})."
            ) from None

    # -- plots and summary ----------------------------------------------------------------
    def plot_curves(self, path: str | Path | None = None) -> Path | None:
        """Loss and top-1 against epoch as a PNG (``kdpipe.runs.plots.draw_run_curves``)."""
        from kdpipe.runs.plots import draw_run_curves

        rows = self.read_metrics()
        if not rows:
            return None
        out = Path(path) if path else self.path / CURVES
        atomic_write_bytes(out, lambda fh: draw_run_curves(rows, storage.basename(self.location), fh))
        self.sync()
        return out

    def write_summary(self, summary: dict) -> Path:
        summary = {k: _clean(v) for k, v in summary.items()}
        out = self.path / SUMMARY
        atomic_write_text(out, json.dumps(summary, indent=2, sort_keys=True, default=_jsonable) + "\n")
        self.sync()
        return out

    @property
    def summary(self) -> dict | None:
        p = self.path / SUMMARY
        return json.loads(p.read_text()) if p.is_file() else None

    def __repr__(self) -> str:
        return f"RunDir({self.location!r})"

    def __fspath__(self) -> str:
        return str(self.path)
