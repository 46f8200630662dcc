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
  waiting on a busy core can make a forward pass many times slower. Shards go to whichever actor
  is free. Actors are created with `max_restarts` and `max_task_retries` = `max_retries`: a
  worker process that dies is restarted (its worker rebuilt) and its shard retried. An exception raised by a worker is
  not retried: it is re-raised in the driver as itself (a KdpipeError stays one sentence).
- Without `ray_address` and without a running Ray, a local Ray is started for the call and
  shut down after: `num_cpus` = the CPU count, no dashboard, every server bound to
  127.0.0.1 (see `init_local_ray`), so nothing listens on a non-loopback interface. A reaper
  process (`kdpipe.distributed.ray_reaper`) stops that session's Ray processes, agents included,
  when the driver exits or is killed (SIGKILL too). With `ray_address` ("auto",
  "ray://host:10001", "host:6379") it joins that cluster, after a probe of the address
  (`check_ray_address`: a TCP connect and an HTTP/2 greeting, 5 s each at most) so that a wrong
  address is one sentence within seconds instead of Ray's minutes of retries. When Ray is
  already initialised (e.g. inside `ray_cluster()` or a test fixture), it is used as it is.
- A tqdm bar over units (images) shows throughput and ETA.

Fault injection (tests): ``run_shards(..., fault=KillWorkerOnce(shard_id, marker))`` makes the
worker process `os._exit(1)` the first time it starts that shard; the marker file records that
it happened, so the retried task runs normally. It applies to both executors (inline: the
whole process dies, which is how a killed driver is simulated).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass

from tqdm.auto import tqdm

from kdpipe import storage
from kdpipe.errors import KdpipeError


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
    return [Shard(i, s, min(s + shard_size, num_samples)) for i, s in enumerate(range(0, num_samples, shard_size))]


@dataclass(frozen=True)
class KillWorkerOnce:
    """Fault injection: the worker process exits the first time it starts shard ``shard_id``
    (its position when shards carry no id); the file ``marker`` records that it did."""

    shard_id: int
    marker: str

    def strike(self, shard_id: int) -> None:
        if shard_id != self.shard_id or os.path.exists(self.marker):
            return
        with open(self.marker, "w") as f:
            f.write(f"killed at shard {shard_id} in pid {os.getpid()}\n")
            f.flush()
            os.fsync(f.fileno())
        os._exit(1)


class _WorkerHost:
    """Holds one worker; identical in-process and inside a Ray actor."""

    def __init__(self, worker_cls, worker_kwargs, fault: KillWorkerOnce | None = None, threads=None):
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
            self.fault.strike(getattr(shard, "shard_id", index))
        fn = getattr(self.worker, "run", None) or self.worker
        return fn(shard)

    def ping(self):
        return os.getpid()


_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_LOOPBACK_IPS = ("127.0.0.1", "::1")
_REAPERS: list[subprocess.Popen] = []  # one per local Ray this process started and has not shut down


VERBOSE_ENV = "KDPIPE_VERBOSE"  # set by `kdpipe --verbose`


def ray_verbose() -> bool:
    """Whether Ray's own messages are wanted (``kdpipe --verbose``): its token-authentication
    notice, its task-retry warnings, Tune's restore hint. kdpipe says what matters in its own words."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def ray_log_level() -> int:
    """The ``logging_level`` for ``ray.init``: ERROR off ``--verbose`` (no token-authentication
    notice). Ray's C++ warnings are left as they are: RAY_BACKEND_LOG_LEVEL would hide a killed
    worker's "retries remaining", but Ray then prints a line saying it read the variable on every
    start."""
    return logging.WARNING if ray_verbose() else logging.ERROR


def init_local_ray(num_cpus: int | None = None) -> None:
    """Start a single-node Ray whose every server binds to 127.0.0.1, with no dashboard, and a
    reaper process that stops it once this driver is gone (``kdpipe.distributed.ray_reaper``).

    On Linux, Ray binds its servers to the machine's routable address unless its "cluster mode"
    is off, the mode Ray uses on laptops: the documented variable
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which Ray reads when it is first imported. kdpipe
    sets it before that import when Ray is not imported yet; where Ray was imported with cluster
    mode on, a local Ray would listen on every interface, so that is refused in one sentence.
    The new Ray is this process's own even where another runs on the machine (a `ray start
    --head` cluster, or a dead one's address file): only --ray-address joins a cluster.
    """
    prepare_ray_import(None)
    import ray

    if ray.util.get_node_ip_address() not in _LOOPBACK_IPS:
        raise KdpipeError(
            f"Ray was imported before kdpipe could keep its local cluster on 127.0.0.1; set "
            f"{_LOOPBACK_ENV}=0 before importing ray, or pass --ray-address to join a cluster."
        )
    if os.environ.get("RAY_ADDRESS"):
        print(
            f"kdpipe: starting a local Ray of its own; RAY_ADDRESS={os.environ['RAY_ADDRESS']} is not used "
            "(pass --ray-address to join that cluster).",
            file=sys.stderr,
        )
    ctx = ray.init(
        # "local": a new cluster whatever else runs here. Without it Ray joins the cluster named
        # by RAY_ADDRESS or by the address file a `ray start --head` leaves in its temp folder
        # (ray_current_cluster), also a dead one's, and refuses num_cpus for it.
        address="local",
        num_cpus=num_cpus or os.cpu_count() or 1,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        logging_level=ray_log_level(),
    )
    # ray.init returns a RayContext (typed as its BaseContext base), which has address_info.
    session_dir = ctx.address_info["session_dir"]  # type: ignore[attr-defined]
    _REAPERS.append(_start_reaper(os.path.basename(session_dir)))


def prepare_ray_import(ray_address: str | None) -> None:
    """Call before the first ``import ray`` of a process that may start a local Ray (no
    ``ray_address``): Ray decides at import whether its servers may bind to loopback only."""
    if ray_address or "ray" in sys.modules:
        return
    old = os.environ.get(_LOOPBACK_ENV)
    os.environ.setdefault(_LOOPBACK_ENV, "0")
    import ray  # noqa: F401 - reads the variable now

    if old is None:
        os.environ.pop(_LOOPBACK_ENV, None)  # Ray has read it; its child processes need not see it


def _start_reaper(session_name: str) -> subprocess.Popen:
    """The watchdog that stops this session's Ray processes when the driver exits or is killed:
    its own session (a signal to the driver's group spares it), our pipe as its stdin."""
    from kdpipe.distributed import ray_reaper

    return subprocess.Popen(
        [sys.executable, ray_reaper.__file__, str(os.getpid()), session_name],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )


def _release_reapers() -> None:
    """After ray.shutdown(): let each reaper sweep what the shutdown left (agents) and exit."""
    while _REAPERS:
        reaper = _REAPERS.pop()
        if reaper.stdin is not None:  # always a pipe (_start_reaper)
            with contextlib.suppress(OSError):
                reaper.stdin.close()


# Ray's default ports: the head's GCS (`ray start --head`) and the Ray Client server (`ray://`)
_DEFAULT_GCS_PORT, _DEFAULT_CLIENT_PORT = 6379, 10001
PROBE_TIMEOUT_S = 5.0
# An HTTP/2 client preface and an empty SETTINGS frame: a gRPC server (the GCS, the Ray Client
# server) answers with its own SETTINGS frame (RFC 9113, section 3.4)
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def parse_ray_address(address: str) -> tuple[str, int] | None:
    """``host:port``, ``ray://host[:port]``, ``[v6]:port`` -> (host, port); None for ``auto`` /
    ``local`` (Ray finds those itself)."""
    if address in ("auto", "local"):
        return None
    rest, default = (
        (address[len("ray://") :], _DEFAULT_CLIENT_PORT)
        if address.startswith("ray://")
        else (address, _DEFAULT_GCS_PORT)
    )
    host, sep, port = rest.rstrip("/").rpartition(":")
    if not sep or host.endswith(":"):  # no port, or a bare IPv6 address
        host, port = rest.rstrip("/"), str(default)
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise KdpipeError(f"A Ray address is host:port or ray://host:port, not {address!r}.")
    return host, int(port)


def check_ray_address(address: str | None, timeout: float = PROBE_TIMEOUT_S) -> None:
    """One sentence, within ``timeout`` seconds or two, when nothing that speaks gRPC answers at
    ``address`` (Ray itself retries a missing GCS for minutes); nothing when it answers."""
    target = parse_ray_address(address) if address else None
    if target is None:
        return
    try:
        sock = socket.create_connection(target, timeout=timeout)
    except OSError as err:
        reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
        raise KdpipeError(
            f"Cannot reach the Ray cluster at {address} ({reason.rstrip('.').lower()}); start its "
            "head (`ray start --head`) or correct --ray-address."
        ) from None
    with sock:
        if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
            return  # a TLS handshake would come first: the connection is what can be checked
        try:
            sock.sendall(_H2_PREFACE)
            reply = sock.recv(9)
        except OSError:  # a timeout or a reset: not a gRPC server
            reply = b""
    if len(reply) < 9 or reply[3] != 4:
        raise KdpipeError(
            f"{address} accepts connections but does not answer as a Ray head (no gRPC reply); "
            "correct --ray-address (the head's GCS port, 6379 unless changed)."
        )


@contextlib.contextmanager
def ray_cluster(ray_address: str | None = None, num_cpus: int | None = None):
    """Use Ray for the duration of the block: join `ray_address`, reuse a running Ray, or start a
    local loopback-only one (shut down on exit, and by its reaper if this process is killed).
    Wrap several run_shards calls in one of these to start Ray once."""
    prepare_ray_import(ray_address)
    import ray

    started = False
    if not ray.is_initialized():
        if ray_address:
            check_ray_address(ray_address)
            try:
                ray.init(address=ray_address, log_to_driver=False, logging_level=ray_log_level())
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
            _release_reapers()


def _unwrap(err: BaseException) -> BaseException:
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else err


def _paths_in(value) -> list:
    """The strings in worker arguments (dicts, lists, dataclasses such as PassSpec)."""
    if isinstance(value, str):
        return [value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return [p for v in value.values() for p in _paths_in(v)]
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in _paths_in(v)]
    return []


def run_shards(
    worker_cls,
    worker_kwargs,
    shards,
    executor: str = "ray",
    num_workers: int | None = None,
    ray_address: str | None = None,
    max_retries: int = 3,
    desc: str = "shards",
    unit: str = "img",
    on_result=None,
    progress: bool = True,
    unit_scale: float = 1,
    fault: KillWorkerOnce | None = None,
    quick_trial: str | None = None,
) -> list:
    """Run `worker.run(shard)` for every shard; return the results in the order of `shards`.

    `on_result(shard, result)` is called in the driver as each shard finishes. The bar counts
    `shard.size` x `unit_scale` units (e.g. samples x views = images). After the first shard a
    line estimates the time left; where that is hours without a GPU it names ``quick_trial``
    (the option that makes a quick trial). ``fault``: fault injection for tests (``KillWorkerOnce``).
    """
    shards = list(shards)
    if executor not in ("ray", "inline"):
        raise KdpipeError(f"The executor must be 'ray' or 'inline', not {executor!r}.")
    if executor == "ray":  # before any worker starts: a worker would see an empty file system
        storage.refuse_in_process_only(_paths_in(worker_kwargs), "Ray workers (--executor ray)")
    total = sum(int(getattr(s, "size", 1)) for s in shards)
    bar = tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit_scale if unit_scale != 1 else False,
        dynamic_ncols=True,
        disable=not progress,
        smoothing=0.1,
    )
    results: list = [None] * len(shards)
    t0, finished = time.perf_counter(), [0]

    def done(i, result):
        results[i] = result
        bar.update(int(getattr(shards[i], "size", 1)))
        finished[0] += int(getattr(shards[i], "size", 1))
        if progress and finished[0] == int(getattr(shards[i], "size", 1)) and total > finished[0]:
            tqdm.write(first_shard_line(desc, time.perf_counter() - t0, finished[0], total, quick_trial))
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


def first_shard_line(desc: str, elapsed: float, done: int, total: int, quick_trial: str | None = None) -> str:
    """The estimate after the first shard: the time left at the first shard's pace (start-up
    included, so rather high; the bar's ETA refines it), and on a machine without a GPU whose
    estimate runs to hours, the option that makes a quick trial."""
    from kdpipe.runs.report import human_seconds

    left = elapsed / max(done, 1) * (total - done)
    line = (
        f"{desc}: first shard done in {human_seconds(elapsed)}; about {human_seconds(left)} left at that pace "
        "(start-up included, so likely less)"
    )
    if left >= 3600 and quick_trial and not _has_gpu():
        line += f". Hours on CPU: {quick_trial} makes a quick trial"
    return line


def _has_gpu() -> bool:
    import torch

    return bool(torch.cuda.is_available())


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
                raise WorkerLost(
                    f"A Ray worker died {max_retries + 1} times while running shard {sid} (out of memory, or killed)",
                    shard_id=sid,
                ) from None
            done(i, result)
            submit(actor)
    finally:
        for actor in actors:
            with contextlib.suppress(Exception):
                # an actor handle; Ray's stub types the list as holding the class
                ray.kill(actor, no_restart=True)  # type: ignore[arg-type]
