"""A real `mlflow server` on loopback for tests: a SQL backend (SQLite) and artifacts served by the server
(proxied, so clients on any node write them through it), in a session of its own so that it can be killed whole."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def start_mlflow_server(root: Path, port: int, artifacts_destination: str | None = None,
                        proxy_artifacts: bool = True, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start it (its log appended to root/server.log) and wait until /health answers. Artifacts go to
    artifacts_destination (default: root/artifacts; s3://... with the store's endpoint and credentials in `env`),
    through the server (proxy_artifacts) or written there by the clients themselves."""
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    root.mkdir(parents=True, exist_ok=True)
    destination = artifacts_destination or (root / "artifacts").as_uri()
    artifacts = (["--serve-artifacts", "--artifacts-destination", destination] if proxy_artifacts
                 else ["--default-artifact-root", destination])
    with open(root / "server.log", "ab") as out:
        server = subprocess.Popen(
            [mlflow, "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", *artifacts,
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server
        except OSError:
            assert server.poll() is None and time.time() < deadline, (root / "server.log").read_text()[-3000:]
            time.sleep(0.5)


def stop_mlflow_server(server: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=30)
