"""Loopback ports for the servers tests start (gloo rendezvous, mlflow, moto, Ray, the MLflow UI).

A port from bind(("127.0.0.1", 0)) comes from the kernel's ephemeral range, the same range every outgoing
connection takes its source port from; with Ray, gloo and MLflow clients busy in the same run, such a port was
taken between the pick and the server's bind (CI: EADDRINUSE on a gloo TCPStore). These ports come from below
the ephemeral range and above Ray's worker ports (10002-19999), where nothing is handed out implicitly.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

RAY_WORKER_PORTS_END = 19999


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port that binds on 127.0.0.1 now, outside the ephemeral range and Ray's worker ports."""
    low, high = RAY_WORKER_PORTS_END + 1, _ephemeral_start() - 1
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randint(low, high)
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free loopback port in {low}-{high}")
