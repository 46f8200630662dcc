"""Run one task per shard on Ray actors, or in-process with the same worker class.

    results = run_shards(MyWorker, {"store": path, ...}, shards, executor="ray")

- `worker_cls(**worker_kwargs)` is built once per Ray actor (or once in-process for
  `executor="inline"`), so expensive state (a teacher, a data set) loads once per worker.
  Then, for each shard, `worker.run(shard)` (or `worker(shard)` when there is no `run`) is
  called; its return value (small, picklable: a dict of numbers) comes back to the driver.
  `worker_cls` must be importable by the Ray workers (defined in a module, not in `__main__`).
- A shard is any object; the bar counts `shard.size` units (1 when it has no `size`) and the
  fault hook below uses `shard.shard_id` (its position when it has none). `Shard` below is the
  usual one: a contiguous sample range [start, stop).
- Ray: one actor per GPU (`num_gpus=1`, up to 4 CPUs each) when the cluster has GPUs, else
  one per CPU slot (`num_cpus=1`; with fewer workers than CPUs each actor gets an equal
  share). Each actor sets `torch.set_num_threads` to its CPU share: torch's default (all
  cores, per process) oversubscribes a machine shared by several actors, and OpenMP threads
  waiting on a busy core can make a forward pass many times slower. Shards go to whichever actor is free. Actors are created
  with `max_restarts` and `max_task_retries` = `max_retries`: a worker process that dies is
  restarted (its worker rebuilt) and its shard retried. An exception raised by a worker is
  not retried: it is re-raised in the driver as itself (a KdpipeError stays one sentence).
- Without `ray_address` and without a running Ray, a local Ray is started for the call and
  shut down after: `num_cpus` = the CPU count, no dashboard, every server bound to
  127.0.0.1 (see `init_local_ray`), so nothing listens on a non-loopback interface. With
  `ray_address` ("auto", "ray://host:10001", "host:6379") it joins that cluster. When Ray is
  already initialised (e.g. inside `ray_cluster()` or a test fixture), it is used as it is.
- A tqdm bar over units (images) shows throughput and ETA.

Test hook (for fault tests only, not a feature): the environment variable
``KDPIPE_FAULT_KILL_SHARD="<shard_id>:<marker_file>"``, read by the driver when run_shards is
called, makes the worker process `os._exit(1)` the first time it starts that shard; the marker
file records that it happened, so the retried task runs normally. It applies to both
executors (inline: the whole process dies, which is how a killed driver is simulated).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import deque
from dataclasses import dataclass

from tqdm.auto import tqdm

from kdpipe.errors import KdpipeError

FAULT_ENV = "KDPIPE_FAULT_KILL_SHARD"


class WorkerLost(KdpipeError):
    """A Ray worker died more often than `max_retries` allows while running one shard."""

    def __init__(self, message, shard_id=None):
        super().__init__(message)
        self.shard_id = shard_id


@dataclass(frozen=True)
class Shard:
    """A contiguous range of samples [start, stop), written by exactly one task."""

    shard_id: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def plan(num_samples: int, shard_size: int) -> list[Shard]:
    """Contiguous shards of `shard_size` samples (the last may be shorter)."""
    return [Shard(i, s, min(s + shard_size, num_samples))
            for i, s in enumerate(range(0, num_samples, shard_size))]


def _fault_spec() -> tuple[int, str] | None:
    raw = os.environ.get(FAULT_ENV)
    if not raw:
        return None
    sid, _, marker = raw.partition(":")
    return int(sid), marker


class _WorkerHost:
    """Holds one worker; identical in-process and inside a Ray actor."""

    def __init__(self, worker_cls, worker_kwargs, fault=None, threads=None):
        if threads:
            try:
                import torch

                torch.set_num_threads(int(threads))
            except ImportError:  # pragma: no cover - torch is a dependency
                pass
        self.fault = fault
        self.worker = worker_cls(**(worker_kwargs or {}))

    def run(self, shard, index=0):
        if self.fault is not None:
            sid, marker = self.fault
            if getattr(shard, "shard_id", index) == sid and not os.path.exists(marker):
                with open(marker, "w") as f:
                    f.write(f"killed at shard {sid} in pid {os.getpid()}\n")
                    f.flush()
                    os.fsync(f.fileno())
                os._exit(1)
        fn = getattr(self.worker, "run", None) or self.worker
        return fn(shard)

    def ping(self):
        return os.getpid()


_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def init_local_ray(num_cpus: int | None = None) -> None:
    """Start a single-node Ray whose every server binds to 127.0.0.1 and no dashboard.

    On Linux, Ray 2.x rewrites `_node_ip_address="127.0.0.1"` to the machine's routable address
    unless its "cluster mode" is off (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, the mode Ray uses on
    laptops). That switch is set only while the GCS and raylet start (they and the workers they
    spawn inherit it) and restored afterwards.
    """
    import ray
    from ray._private import ray_constants

    old_env, old_const = os.environ.get(_LOOPBACK_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_LOOPBACK_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
                 _node_ip_address="127.0.0.1", log_to_driver=False, logging_level=logging.WARNING)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old_const
        if old_env is None:
            os.environ.pop(_LOOPBACK_ENV, None)
        else:
            os.environ[_LOOPBACK_ENV] = old_env


@contextlib.contextmanager
def ray_cluster(ray_address: str | None = None, num_cpus: int | None = None):
    """Use Ray for the duration of the block: join `ray_address`, reuse a running Ray, or start a
    local loopback-only one (shut down on exit). Wrap several run_shards calls in one of these to
    start Ray once."""
    import ray

    started = False
    if not ray.is_initialized():
        if ray_address:
            try:
                ray.init(address=ray_address, log_to_driver=False, logging_level=logging.WARNING)
            except Exception as err:  # noqa: BLE001 - ConnectionError, ValueError, RuntimeError, ...
                first = (str(err).strip().splitlines() or [type(err).__name__])[0].rstrip(".")
                raise KdpipeError(f"Cannot join the Ray cluster at {ray_address} ({first}).") from None
        else:
            init_local_ray(num_cpus)
        started = True
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def _unwrap(err: BaseException) -> BaseException:
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else err


def run_shards(worker_cls, worker_kwargs, shards, executor: str = "ray", num_workers: int | None = None,
               ray_address: str | None = None, max_retries: int = 3, desc: str = "shards",
               unit: str = "img", on_result=None, progress: bool = True, unit_scale: float = 1) -> list:
    """Run `worker.run(shard)` for every shard; return the results in the order of `shards`.

    `on_result(shard, result)` is called in the driver as each shard finishes. The bar counts
    `shard.size` x `unit_scale` units (e.g. samples x views = images).
    """
    shards = list(shards)
    if executor not in ("ray", "inline"):
        raise KdpipeError(f"The executor must be 'ray' or 'inline', not {executor!r}.")
    total = sum(int(getattr(s, "size", 1)) for s in shards)
    bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale if unit_scale != 1 else False,
               dynamic_ncols=True,
               disable=not progress, smoothing=0.1)
    results: list = [None] * len(shards)
    fault = _fault_spec()

    def done(i, result):
        results[i] = result
        bar.update(int(getattr(shards[i], "size", 1)))
        if on_result is not None:
            on_result(shards[i], result)

    try:
        if not shards:
            return results
        if executor == "inline":
            host = _WorkerHost(worker_cls, worker_kwargs, fault=fault)
            for i, shard in enumerate(shards):
                done(i, host.run(shard, i))
            return results
        with ray_cluster(ray_address):
            _run_ray(worker_cls, worker_kwargs, shards, num_workers, max_retries, fault, done)
        return results
    finally:
        bar.close()


def _run_ray(worker_cls, worker_kwargs, shards, num_workers, max_retries, fault, done):
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), max(1, int(res.get("CPU", 1)))
    if gpus > 0:
        n = min(num_workers or gpus, gpus)
        opts = dict(num_gpus=1, num_cpus=max(1, min(cpus // n, 4)))
        threads = opts["num_cpus"]
    else:
        n = num_workers or cpus
        share = max(1, cpus // n) if n <= cpus else 1
        opts, threads = dict(num_cpus=share if n <= cpus else 0), share
    n = max(1, min(n, len(shards)))
    host_cls = ray.remote(_WorkerHost).options(max_restarts=max_retries, max_task_retries=max_retries, **opts)
    actors = [host_cls.remote(worker_cls, worker_kwargs, fault, threads) for _ in range(n)]
    pending = deque(range(len(shards)))
    in_flight = {}

    def submit(actor):
        if pending:
            i = pending.popleft()
            in_flight[actor.run.remote(shards[i], i)] = (actor, i)

    try:
        for actor in actors:
            submit(actor)
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            ref = ready[0]
            actor, i = in_flight.pop(ref)
            try:
                result = ray.get(ref)
            except RayTaskError as err:
                raise _unwrap(err) from None
            except RayActorError:
                sid = getattr(shards[i], "shard_id", i)
                raise WorkerLost(f"A Ray worker died {max_retries + 1} times while running shard {sid} "
                                 "(out of memory, or killed)", shard_id=sid) from None
            done(i, result)
            submit(actor)
    finally:
        for actor in actors:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
