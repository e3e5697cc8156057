"""`python -m pipeline.cluster.reaper <pid>`: stops what an in-process Ray left behind when its driver died.

Ray started inside a process (ray.init on a laptop or a single node) shares that process's fate for its head
processes, but not for all of them: after a kill -9 of the driver, Ray 2.60's DashboardAgent and
RuntimeEnvAgent stay alive forever. The driver starts this small watcher beside it (in a session of its own,
so that it outlives a kill of the driver's process group). Every second it notes the driver's descendants;
once the driver is gone it stops those still running (SIGTERM, then SIGKILL) and exits. A driver that ends
normally has shut Ray down itself, and the watcher then finds nothing to stop.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil

POLL_S = 1.0


def watch(pid: int) -> int:
    try:
        driver = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return 0
    seen: dict[int, float] = {}  # pid -> create_time, so that a reused pid is never stopped
    while True:
        try:
            if not driver.is_running() or driver.status() == psutil.STATUS_ZOMBIE:
                break
            for child in driver.children(recursive=True):
                if child.pid != os.getpid():  # this watcher is the driver's child too
                    seen.setdefault(child.pid, child.create_time())
        except psutil.NoSuchProcess:
            break
        time.sleep(POLL_S)
    left = []
    for child_pid, created in seen.items():
        try:
            proc = psutil.Process(child_pid)
            if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(proc)
        except psutil.NoSuchProcess:
            continue
    for proc in left:
        proc.terminate()
    _, alive = psutil.wait_procs(left, timeout=5)
    for proc in alive:
        proc.kill()
    return len(left)


def start(pid: int | None = None) -> subprocess.Popen:
    """Start the watcher of `pid` (default: this process) in a session of its own."""
    return subprocess.Popen([sys.executable, "-m", "pipeline.cluster.reaper", str(pid or os.getpid())],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


if __name__ == "__main__":
    sys.exit(0 if watch(int(sys.argv[1])) >= 0 else 1)
