"""Stop a local Ray session's processes once the driver that started it is gone.

    python ray_reaper.py <driver_pid> <session_name>

Started by ``kdpipe.distributed.executor.init_local_ray`` in a new session (so a signal to the
driver's process group does not reach it) with a pipe as stdin. It waits until the pipe reaches
end of file (the driver closed it, or the kernel did because the driver died, SIGKILL included)
or its parent is no longer the driver; then it sends SIGTERM, and after a grace period SIGKILL,
to every process of this user whose command line names ``session_name`` (Ray puts its session
directory, ``.../session_<date>_<pid>``, in the arguments of the GCS, the raylet, the agents,
the monitors and the workers). Other Ray sessions on the machine are left alone.

Standard library only (no ``import ray``, no kdpipe import): it starts in milliseconds and works
whatever the driver's ``sys.path`` was. Linux (/proc); elsewhere it does nothing.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time

GRACE_S = 3.0  # SIGTERM first: Ray's processes flush their logs and remove their sockets


def session_pids(session_name: str) -> list[int]:
    """PIDs of this user's processes whose command line names the session (not this one)."""
    me, uid, out = os.getpid(), os.getuid(), []
    needle = session_name.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid != uid:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if needle in f.read():
                    out.append(int(entry))
        except OSError:  # the process ended while we looked
            continue
    return out


def stop_session(session_name: str, grace_s: float = GRACE_S) -> int:
    """SIGTERM the session's processes, SIGKILL those left after ``grace_s``; returns how many."""
    pids = session_pids(session_name)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + grace_s
        while sig == signal.SIGTERM and time.monotonic() < deadline and session_pids(session_name):
            time.sleep(0.1)
        pids = session_pids(session_name)
        if not pids:
            break
    return len(pids)


def wait_for_driver(driver_pid: int) -> None:
    """Return when stdin reaches end of file or the driver is no longer this process's parent."""
    while os.getppid() == driver_pid:
        ready, _, _ = select.select([sys.stdin], [], [], 0.5)
        if ready and not os.read(sys.stdin.fileno(), 4096):
            return


def main(argv: list[str]) -> int:
    driver_pid, session_name = int(argv[0]), argv[1]
    if not session_name.startswith("session_") or not os.path.isdir("/proc"):
        return 0
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the driver must not stop the reaper
    wait_for_driver(driver_pid)
    stop_session(session_name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
