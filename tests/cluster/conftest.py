"""A real local Ray cluster of two nodes on loopback: separate `ray start` processes, each with its own CPUs.
It is always stopped, even when a test fails, and leaves no Ray process behind."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

RAY_PROCESS_NAMES = ("raylet", "gcs_server", "dashboard", "ray::")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_processes() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        text = " ".join([proc.info["name"] or "", *(proc.info["cmdline"] or [])])
        if any(name in text for name in RAY_PROCESS_NAMES) and "pytest" not in text:
            found.append(proc)
    return found


def _count_nodes(address: str, env: dict) -> int:
    code = (f"import ray; ray.init(address='{address}', logging_level='ERROR'); "
            "print(sum(n['Alive'] for n in ray.nodes()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else 0


@pytest.fixture
def two_node_ray_cluster():
    """Yields (jobs_api_url, gcs_address)."""
    ray = str(Path(sys.executable).with_name("ray"))
    port, dashboard = _free_port(), _free_port()
    # Jobs run `python` from the raylet's PATH: the project's interpreter first.
    # Token authentication off: a throwaway cluster on loopback (real clusters keep it on; see cluster/README.md).
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs = f"127.0.0.1:{port}"
    try:
        subprocess.run([ray, "start", "--head", f"--port={port}", "--num-cpus=2", "--node-ip-address=127.0.0.1",
                        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                        f"--temp-dir={temp_dir}", "--resources=" + json.dumps({"head_node": 1}), "--disable-usage-stats"],
                       check=True, env=env, capture_output=True, timeout=120)
        subprocess.run([ray, "start", f"--address={gcs}", "--num-cpus=2", "--node-ip-address=127.0.0.1",
                        "--resources=" + json.dumps({"second_node": 1}), "--disable-usage-stats"],
                       check=True, env=env, capture_output=True, timeout=120)
        deadline = time.time() + 60
        while _count_nodes(gcs, env) < 2:
            assert time.time() < deadline, "the second Ray node did not join"
            time.sleep(1)
        yield f"http://127.0.0.1:{dashboard}", gcs
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)
        deadline = time.time() + 30
        while ray_processes() and time.time() < deadline:
            time.sleep(0.5)
        leftovers = ray_processes()
        for proc in leftovers:
            proc.kill()
        assert not leftovers, f"Ray processes left behind: {[p.pid for p in leftovers]}"
