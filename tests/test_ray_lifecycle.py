"""Ray's lifecycle around kdpipe: a wrong --ray-address is one sentence within seconds, and a
local Ray started by kdpipe does not outlive its driver (not even a SIGKILLed one)."""

import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from kdpipe.distributed import ray_reaper
from kdpipe.distributed.executor import check_ray_address, parse_ray_address
from kdpipe.errors import KdpipeError

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def test_unreachable_ray_address_is_one_sentence_within_30_s():
    t = time.monotonic()
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            "from kdpipe.cli import main; main()",
            "cluster",
            "no-store.zarr",
            "--ray-address",
            "127.0.0.1:1",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
    )
    assert time.monotonic() - t < 30
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kdpipe: error: Cannot reach the Ray cluster at 127.0.0.1:1"), (
        res.stderr
    )


def test_a_port_that_is_not_ray_is_one_sentence():
    # accepts connections and never answers: Ray would retry it for minutes
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(4)
        port = srv.getsockname()[1]
        threading.Thread(target=srv.accept, daemon=True).start()
        t = time.monotonic()
        with pytest.raises(KdpipeError, match="does not answer as a Ray head"):
            check_ray_address(f"127.0.0.1:{port}", timeout=1.0)
        assert time.monotonic() - t < 5


@pytest.mark.parametrize(
    "address, expected",
    [
        ("10.0.0.5:6380", ("10.0.0.5", 6380)),
        ("head", ("head", 6379)),
        ("ray://head", ("head", 10001)),
        ("ray://head:10002", ("head", 10002)),
        ("[::1]:7000", ("::1", 7000)),
        ("auto", None),
    ],
)
def test_parse_ray_address(address, expected):
    assert parse_ray_address(address) == expected


def test_reaper_stops_only_its_session_when_the_driver_goes():
    mine, other = f"session_test_{uuid.uuid4().hex}", f"session_test_{uuid.uuid4().hex}"
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", name]) for name in (mine, other)]
    try:
        reaper = subprocess.Popen(
            [sys.executable, ray_reaper.__file__, str(os.getpid()), mine], stdin=subprocess.PIPE, start_new_session=True
        )
        time.sleep(0.5)
        assert reaper.poll() is None and procs[0].poll() is None  # waits while the driver lives
        reaper.stdin.close()  # what the kernel does when the driver dies
        assert reaper.wait(timeout=10) == 0
        assert procs[0].wait(timeout=5) == -signal.SIGTERM
        assert procs[1].poll() is None  # another session's process is left alone
    finally:
        for p in procs:
            p.kill()
            p.wait()


DRIVER = """
import os, time
from kdpipe.distributed import executor
with executor.ray_cluster(num_cpus=2) as ray:
    ray.get(ray.remote(lambda: os.getpid()).remote())  # a worker process exists too
    print(executor._REAPERS[-1].args[-1], flush=True)
    time.sleep(600)
"""


@pytest.mark.slow
@pytest.mark.ray
def test_sigkilled_driver_leaves_no_ray_processes():
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        ready, _, _ = select.select([driver.stdout], [], [], 180)
        assert ready, "the driver did not start Ray within 180 s"
        session = driver.stdout.readline().strip()
        assert session.startswith("session_")
        names = {
            Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[0].rsplit(b"/", 1)[-1]
            for p in ray_reaper.session_pids(session)
        }
        assert b"raylet" in names and b"gcs_server" in names, names
    finally:
        driver.kill()
        driver.wait()
    deadline = time.monotonic() + 20
    while ray_reaper.session_pids(session) and time.monotonic() < deadline:
        time.sleep(0.25)
    assert ray_reaper.session_pids(session) == []
