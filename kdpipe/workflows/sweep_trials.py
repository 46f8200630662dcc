"""One trial of a sweep, wherever it runs (a Ray Tune trial or the driver): its config, its
run directory in the sweep folder (found again on resume), its result row; and how a sweep
runs (``SweepOptions``). ``kdpipe.workflows.sweep`` (the grid, results) and
``kdpipe.workflows.sweep_tune`` (Ray Tune) both build on this module.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import time
from pathlib import Path

from kdpipe.errors import KdpipeError
from kdpipe.runs.paths import is_url
from kdpipe.runs.rundir import CHECKPOINTS, LATEST, SUMMARY, atomic_write_text

RESULT_METRICS = ("final_top1", "best_top1", "final_top5", "wall_seconds", "img_per_s")


def trial_config(base, point: dict):
    """The StudentConfig of one grid point: a field of the config is set directly, every other
    key becomes a method option (``dataclasses.replace(base, **point)``)."""
    fields = {f.name for f in dataclasses.fields(base)}
    direct, opts = {}, dict(base.method_options)
    for k, v in point.items():
        if k == "method_options":
            raise KdpipeError("--sweep cannot vary method_options as a whole; sweep its options by name.")
        if k in fields:
            direct[k] = v
        else:
            opts[k] = v
    return dataclasses.replace(base, **direct, method_options=opts)


def trial_name(n: int, point: dict) -> str:
    """The run-directory prefix of trial ``n``: ``trial-<n>-<key>=<value>...``."""
    parts = [f"{k}={v}" for k, v in point.items()]
    return f"trial-{n:03d}" + ("-" + "-".join(parts) if parts else "")


class SweepKilled(BaseException):
    """Raised by the fault hook: a BaseException, so that nothing on the way catches it as a
    trial error and the sweep stops as abruptly as a killed driver."""


def check_fault(finished: int, stop_after: int | None) -> None:
    """Fault injection: stop the sweep once ``finished`` reaches ``stop_after`` (None: never)."""
    if stop_after is not None and finished >= stop_after:
        raise SweepKilled(f"sweep stopped after {finished} finished trials (stop_after={stop_after})")


# ------------------------------------------------------------------------------ one trial
@dataclasses.dataclass
class PriorRun:
    """A run directory an earlier attempt of this trial left in the sweep directory."""

    path: str
    summary: dict | None  # its summary.json: the trial finished; None: it has a checkpoint to continue from


def join_path(root: str, *parts: str) -> str:
    return posixpath.join(root, *parts) if is_url(root) else os.path.join(root, *parts)


def read_json(target: str) -> dict:
    """A JSON file at a local path or URL (FileNotFoundError when absent)."""
    import fsspec

    with fsspec.open(target, "r") as fh:
        return json.load(fh)


def write_text(sweep_dir: str, name: str, text: str) -> str:
    """A small file of the sweep directory written whole: locally through a temporary file and
    os.replace, at a URL as one object (object stores replace objects atomically)."""
    target = join_path(sweep_dir, name)
    if is_url(sweep_dir):
        import fsspec

        with fsspec.open(target, "w") as fh:
            fh.write(text)
    else:
        atomic_write_text(Path(target), text)
    return target


def find_trial_run(sweep_dir: str, n: int) -> PriorRun | None:
    """The run directory of trial ``n`` in ``sweep_dir`` to carry on from: a finished one, else
    the latest with a checkpoint, else None (a run killed before its first checkpoint starts
    again). Works on local paths and fsspec URLs."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(sweep_dir)
    prefix = f"trial-{n:03d}-"
    try:
        entries = fs.ls(root, detail=True)
    except FileNotFoundError:
        return None
    names = sorted(
        e["name"]
        for e in entries
        if e.get("type") == "directory" and posixpath.basename(e["name"].rstrip("/")).startswith(prefix)
    )
    best = None
    for name in names:  # in timestamp order
        path = fs.unstrip_protocol(name) if is_url(sweep_dir) else name
        summary_path = posixpath.join(name, SUMMARY)
        if fs.exists(summary_path):
            with fs.open(summary_path, "r") as fh:
                return PriorRun(path, json.load(fh))
        if fs.exists(posixpath.join(name, CHECKPOINTS, LATEST)):
            best = PriorRun(path, None)
    return best


def _row(summary: dict, reused: bool) -> dict:
    return {
        "status": "ok",
        **{k: summary.get(k) for k in RESULT_METRICS},
        "run_dir": summary.get("run_dir"),
        "reused": reused,
    }


def run_trial(sweep_dir: str, n: int, point: dict, cfg, device: str | None = None) -> dict:
    """Trial ``n`` of a sweep, wherever it runs (a Tune trial or this process): a finished run
    of it is read back, an interrupted one continued, else a new run directory is made under
    ``sweep_dir``. A KdpipeError becomes the row's status (one sentence), not an exception."""
    from kdpipe.stages.train import train_student

    prior = find_trial_run(sweep_dir, n)
    if prior is not None and prior.summary is not None:
        return _row(prior.summary, reused=True)
    t0 = time.perf_counter()
    try:
        if prior is not None:
            summary = train_student(resume=prior.path, device=device, progress=False)
        else:
            summary = train_student(cfg, out=sweep_dir, device=device, progress=False, run_prefix=trial_name(n, point))
        return _row(summary, reused=False)
    except KdpipeError as err:
        return {"status": f"error: {err}", "wall_seconds": time.perf_counter() - t0, "run_dir": None, "reused": False}


# ------------------------------------------------------------------------------ the sweep
@dataclasses.dataclass(frozen=True)
class SweepOptions:
    """How a sweep runs (not what it computes): executor, cluster, per-trial resources."""

    executor: str = "ray"
    ray_address: str | None = None
    num_cpus: int | None = None  # CPUs of a local Ray started for the sweep (None: all)
    gpus_per_trial: float | None = None  # None: 1 where the Ray cluster has GPUs, else 0
    cpus_per_trial: float = 1.0
    device: str | None = None  # "cpu" keeps trials off GPUs
    progress: bool = True
    stop_after: int | None = None  # fault injection (tests): stop abruptly after this many trials
