"""Sweeps on Ray Tune: the grid of ``kdpipe.workflows.sweep`` as one ``ray.tune.Tuner``.

- The search space is ``tune.grid_search`` over each swept key's values (Tune takes their
  product, one trial per grid point); every trial builds its config with
  ``sweep.trial_config`` and runs ``sweep.run_trial``, as the inline executor does.
- Each trial asks for ``trial_resources(...)`` through ``tune.with_resources``: its CPUs
  (``--cpus-per-trial``, also its torch threads) and its share of a GPU (``--gpus-per-trial``;
  0.25 packs four small students on one GPU, Ray handing each the same device). Whether
  trials use GPUs is decided from ``ray.cluster_resources()``, never from the driver's own
  devices: a CPU-only head node driving GPU workers still trains on the GPUs.
- Storage: Tune's experiment goes to ``RunConfig(storage_path=<sweep dir>, name="tune")`` and
  the trial writes its kdpipe run directory straight into the sweep directory (an absolute
  path or URL the driver chose), not into Tune's trial folder or the worker's working
  directory, which are local to the worker's node.
- Resume: ``Tuner.restore(<sweep dir>/tune, trainable, resume_errored=True)`` when Tune saved
  its experiment; Tune then starts the trials it does not know finished, and each of them
  first looks for its own finished run (``sweep.run_trial``), which is what guarantees that a
  finished trial is never trained again: Tune saves its experiment state periodically, so a
  killed driver can leave trials that finished marked as pending.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time

from ray import tune

from kdpipe.distributed.executor import ray_cluster, ray_verbose
from kdpipe.errors import KdpipeError
from kdpipe.workflows.sweep_trials import SweepOptions, check_fault, run_trial, trial_config

__all__ = ["trial_resources", "make_trainable", "run_tune", "TUNE_NAME"]

TUNE_NAME = "tune"


def _is_cpu(device: str | None) -> bool:
    return device is not None and str(device).startswith("cpu")


def _default_gpus(gpus_in_cluster: float, device: str | None) -> float:
    # A whole GPU per trial where the cluster has GPUs: kdpipe's Ray sweeps before Tune did so.
    return 1.0 if gpus_in_cluster > 0 and not _is_cpu(device) else 0.0


def trial_resources(
    cluster: dict, gpus_per_trial: float | None = None, cpus_per_trial: float = 1.0, device: str | None = None
) -> dict:
    """The resources of one trial, ``{"cpu": c, "gpu": g}`` for ``tune.with_resources``, given
    the Ray cluster's resources (``ray.cluster_resources()``). ``gpus_per_trial`` None: 1 where
    the cluster has GPUs (0 with ``device="cpu"``), else 0."""
    gpus, cpus = float(cluster.get("GPU", 0)), float(cluster.get("CPU", 0))
    gpu = _default_gpus(gpus, device) if gpus_per_trial is None else float(gpus_per_trial)
    cpu = float(cpus_per_trial)
    if not 0 <= gpu <= 1:
        raise KdpipeError(
            f"--gpus-per-trial must be between 0 and 1 (a trial trains on one device; 0.25 packs four "
            f"trials on a GPU), got {gpu:g}."
        )
    if gpu > 0 and _is_cpu(device):
        raise KdpipeError(f"--device cpu and --gpus-per-trial {gpu:g} exclude each other.")
    if gpu > 0 and gpus == 0:
        raise KdpipeError(
            f"--gpus-per-trial {gpu:g} needs GPUs, but the Ray cluster has none; "
            "use --gpus-per-trial 0 to train the trials on CPUs."
        )
    if gpu == 0 and device is not None and str(device).startswith("cuda"):
        raise KdpipeError(
            "--device cuda needs GPUs for the trials: the Ray cluster has none, or --gpus-per-trial is 0."
        )
    if not 0 < cpu <= max(cpus, 1.0):
        raise KdpipeError(
            f"--cpus-per-trial must be more than 0 and at most the Ray cluster's {cpus:g} CPUs, got {cpu:g}."
        )
    return {"cpu": cpu, "gpu": gpu}


def _tune_trial(
    config: dict, *, base, points: list, sweep_dir: str, device: str, threads: int, concurrent: int = 1
) -> None:
    """One Tune trial: the grid point Tune chose, run by ``run_trial`` and reported."""
    import os

    import torch

    from kdpipe.engine.rows import CONCURRENT_STUDENTS_ENV

    torch.set_num_threads(threads)  # torch's default (every core) oversubscribes a node shared by trials
    os.environ[CONCURRENT_STUDENTS_ENV] = str(concurrent)  # --resident auto counts one shared copy
    point = {k: config[k] for k in points[0]}
    n = points.index(point)
    result = run_trial(sweep_dir, n, point, trial_config(base, point), device)
    # A kdpipe error (bad option, NaN loss) is the trial's result, reported like a finished
    # one; an exception or a lost worker leaves the trial errored, for resume_errored to rerun.
    tune.report({"trial": n, **result})


def concurrent_trials(resources: dict, node_cpus: float, trials: int) -> int:
    """How many trials a node runs at once: its CPUs over each trial's, and on a GPU the share
    each trial takes (4 at --gpus-per-trial 0.25), at most the number of trials."""
    at_once = int(node_cpus // resources["cpu"]) if resources["cpu"] > 0 else trials
    if resources["gpu"] > 0:
        at_once = min(at_once, int(1 // resources["gpu"]) if resources["gpu"] <= 1 else 1)
    return max(1, min(at_once, trials))


def make_trainable(base, points: list[dict], sweep_dir: str, resources: dict, node_cpus: float = 1.0):
    """The Tune trainable of a sweep: ``_tune_trial`` with its fixed arguments and resources."""
    device = "cuda" if resources["gpu"] > 0 else "cpu"
    fn = tune.with_parameters(
        _tune_trial,
        base=base,
        points=points,
        sweep_dir=sweep_dir,
        device=device,
        threads=max(1, int(resources["cpu"])),
        concurrent=concurrent_trials(resources, node_cpus, len(points)),
    )
    return tune.with_resources(fn, resources)


class SweepCallback(tune.Callback):
    """The driver's progress bar over finished trials, and the fault hook of the tests."""

    def __init__(self, total: int, progress: bool, stop_after: int | None = None):
        self.total, self.progress, self.finished, self.bar = total, progress, 0, None
        self.stop_after = stop_after

    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info):
        from tqdm.auto import tqdm

        self.finished = 0
        self.bar = tqdm(total=self.total, desc="sweep", unit="trial", disable=not self.progress)

    def on_step_begin(self, iteration, trials, **info):
        # a restored sweep starts with the trials Tune saved as finished: show them at once
        if self.bar is not None:
            done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
            if done > self.bar.n:
                self.bar.n = done
                self.bar.refresh()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._done(trials, trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._done(trials, trial)

    def _done(self, trials, trial) -> None:
        self.finished += 1
        if self.bar is not None:  # counted from Tune's trials: a restored sweep starts with some done
            self.bar.n = 1 + sum(t.status in ("TERMINATED", "ERROR") for t in trials if t is not trial)
            self.bar.refresh()
        check_fault(self.finished, self.stop_after)

    def on_experiment_end(self, trials, **info):
        if self.bar is not None:
            self.bar.close()

    def __getstate__(self):
        # Tune pickles its callbacks with the experiment (Tuner.restore brings them back): a bar
        # does not pickle, and an injected fault belongs to the run that asked for it alone.
        return dict(self.__dict__, bar=None, stop_after=None)


def make_tuner(
    trainable, grid: dict, sweep_dir: str, total: int, progress: bool, restore: bool, stop_after: int | None = None
):
    """A new Tuner over the grid, or the sweep's saved one (``restore``) when Tune saved it."""
    path = sweep_dir.rstrip("/") + "/" + TUNE_NAME
    if restore and tune.Tuner.can_restore(path):
        return tune.Tuner.restore(path, trainable, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space={k: tune.grid_search(list(v)) for k, v in grid.items()},
        run_config=tune.RunConfig(
            name=TUNE_NAME, storage_path=sweep_dir, verbose=0, callbacks=[SweepCallback(total, progress, stop_after)]
        ),
    )


def _first_line(err: BaseException) -> str:
    cause = getattr(err, "cause", None) or err  # Ray wraps the trial's exception
    text = str(cause).strip().splitlines()
    return text[-1] if text else type(cause).__name__


def collect(result_grid, points: list[dict], started: float = 0.0) -> list[dict | None]:
    """The row of each grid point from Tune's results (None for a trial that never reported).
    A result reported before ``started`` comes from an earlier run of the sweep (a trial Tune
    restored as finished): it is marked reused, as a trial that found its finished run is."""
    results: list[dict | None] = [None] * len(points)
    keys = list(points[0])
    for r in result_grid:
        config = r.config or {}
        if any(k not in config for k in keys):
            continue
        n = points.index({k: config[k] for k in keys})
        metrics = r.metrics or {}
        if metrics.get("status"):
            row = {k: v for k, v in metrics.items() if k != "trial"}
            row["reused"] = bool(row.get("reused")) or float(metrics.get("timestamp") or started) < started
            results[n] = row
        elif r.error is not None:
            results[n] = {"status": f"error: {_first_line(r.error)}", "run_dir": None}
    return results


def run_tune(
    sweep_dir: str, base, grid: dict, points: list[dict], options: SweepOptions, restore: bool = False
) -> list[dict | None]:
    """Run the sweep's trials as a Tune grid on Ray (joining ``options.ray_address``, or a local
    loopback-only Ray); the rows in the order of ``points``."""
    started = int(time.time())  # Tune's "timestamp" of a result is in whole seconds
    with ray_cluster(options.ray_address, options.num_cpus) as ray:
        resources = trial_resources(
            ray.cluster_resources(), options.gpus_per_trial, options.cpus_per_trial, options.device
        )
        node_cpus = float(ray.cluster_resources().get("CPU", 1.0))
        trainable = make_trainable(base, points, sweep_dir, resources, node_cpus)
        with _quiet_tune():
            tuner = make_tuner(trainable, grid, sweep_dir, len(points), options.progress, restore, options.stop_after)
            return collect(tuner.fit(), points, started)


@contextlib.contextmanager
def _quiet_tune():
    """Keep Tune's console report off kdpipe's output (the bar and the results table say it):
    its experiment banner goes to stdout even at verbose=0, and on restore it warns about every
    trial whose result file was not synced yet, which kdpipe's own check of the runs covers."""
    # ray.tune.tune: on Ctrl-C, "Resume experiment with: Tuner.restore(...)"; kdpipe's own line
    # names --resume instead. KDPIPE_VERBOSE (kdpipe --verbose) keeps Tune's messages.
    names = ["ray.tune.analysis.experiment_analysis"] + ([] if ray_verbose() else ["ray.tune.tune"])
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
