"""A real local Ray cluster of two nodes on loopback: two `ray start` processes, each with its own CPUs, temp
directory and custom resource, as on two machines, with token authentication on as on the clusters the project
ships (RAY_AUTH_MODE=token, the token in a file only this user can read).

Teardown always runs, even when a test fails, and stops exactly this cluster: every process of the two
`ray start` sessions and their descendants (job drivers run in sessions of their own), first with SIGTERM,
then SIGKILL. Not `ray stop --force`, which kills every Ray process of the machine, including other users'
clusters. It then asserts that nothing of this cluster is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from ports import free_port


@dataclass
class LocalCluster:
    jobs_url: str  # Ray Jobs API (dashboard), for `pipeline submit`
    gcs_address: str  # for `ray start --address` / ray.init
    node_ids: dict[str, str]  # custom resource name (head_node, second_node, ...) -> Ray node id
    env: dict[str, str]  # the nodes' environment (token authentication on)
    token_path: Path  # the cluster's token (mode 600)
    # A directory the second node sees as an empty tmpfs of its own (its raylet and workers run in a private
    # mount namespace): output_dir below it is node-local, as on nodes that share no file system. None where
    # the machine cannot make one (unshare and mount need root).
    private_root: Path | None
    sessions: dict[str, int] = field(default_factory=dict)  # node name -> session id of its `ray start`
    temp_dirs: dict[str, str] = field(default_factory=dict)  # node name -> its Ray temp dir

    def join(self, name: str) -> str:
        """Start another node with 2 CPUs and the custom resource `name`, its disk private like the second
        node's (a fresh tmpfs over private_root), as a replacement machine joining; returns its Ray node id.
        The fixture's teardown stops it with the others."""
        self.temp_dirs[name] = tempfile.mkdtemp(prefix="rj", dir="/tmp")
        started: set[int] = set()
        _ray_start([f"--address={self.gcs_address}", "--num-cpus=2", "--node-ip-address=127.0.0.1",
                    f"--temp-dir={self.temp_dirs[name]}", f"--dashboard-agent-listen-port={free_port()}",
                    "--resources=" + json.dumps({name: 1})], self.env, started, self.private_root)
        self.sessions[name] = started.pop()
        deadline = time.time() + 60
        while name not in (ids := _node_ids(self.gcs_address, self.env, (name,))):
            assert time.time() < deadline, f"the node {name} did not join"
            time.sleep(1)
        self.node_ids[name] = ids[name]
        return ids[name]

    def kill_node(self, name: str) -> int:
        """SIGKILL, at once, to every process of that node (its raylet, its workers, every daemon), as when the
        machine dies; returns how many were killed."""
        procs = cluster_processes({self.sessions[name]}, [self.temp_dirs[name]])
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        return len(procs)


def cluster_processes(session_ids: set[int], temp_dirs: list[str]) -> list[psutil.Process]:
    """Living processes of the `ray start` sessions, their descendants, and anything naming our temp dirs."""
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            mine = os.getsid(proc.pid) in session_ids or any(d in " ".join(proc.info["cmdline"] or []) for d in temp_dirs)
            if mine:
                found[proc.pid] = proc
                for child in proc.children(recursive=True):
                    found[child.pid] = child
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return [p for p in found.values() if p.pid != os.getpid()]


def stop_cluster(session_ids: set[int], temp_dirs: list[str]) -> list[psutil.Process]:
    """SIGTERM, a grace period, then SIGKILL; returns what is still alive afterwards."""
    for sig_method, grace_s in (("terminate", 5), ("kill", 10)):
        procs = cluster_processes(session_ids, temp_dirs)
        if not procs:
            return []
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                getattr(proc, sig_method)()
        psutil.wait_procs(procs, timeout=grace_s)
    return [p for p in cluster_processes(session_ids, temp_dirs) if p.is_running()]


def _node_ids(gcs: str, env: dict, names: tuple[str, ...] = ("head_node", "second_node")) -> dict[str, str]:
    code = (f"import json, ray; ray.init(address='{gcs}', logging_level='ERROR', log_to_driver=False); "
            "print(json.dumps({r: n['NodeID'] for n in ray.nodes() if n['Alive'] "
            f"for r in n['Resources'] if r in {names!r}}}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else {}


def _can_hide(directory: str) -> bool:
    """Whether this machine lets a process hide `directory` behind a tmpfs in a mount namespace of its own."""
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            'mount -t tmpfs tmpfs "$0"', directory], capture_output=True, timeout=30)
    return probe.returncode == 0


def _ray_start(args: list[str], env: dict, session_ids: set[int], private: Path | None = None) -> None:
    """`ray start`; with `private`, inside a new mount namespace where a fresh tmpfs hides that directory (the
    daemons it leaves inherit the namespace)."""
    command = [str(Path(sys.executable).with_name("ray")), "start", *args, "--disable-usage-stats"]
    if private is not None:
        command = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   'mount -t tmpfs -o size=256m tmpfs "$0" && exec "$@"', str(private), *command]
    # A new session: every daemon `ray start` leaves behind keeps its id, which is how teardown finds them.
    proc = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    session_ids.add(proc.pid)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"ray start {' '.join(args)} failed:\n{output[-3000:]}"


def write_token(directory: Path) -> Path:
    path = Path(directory) / "ray_token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


@pytest.fixture(scope="module")
def two_node_ray_cluster():
    """Shared by the tests of a module (starting it takes ~25 s on 2 cores); stopped after the last one. While
    it runs, RAY_AUTH_TOKEN_PATH names its token in this process's environment, so that the `pipeline submit` and
    `pipeline jobs` commands the tests run find it as a user's would."""
    with local_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def cloud_cluster():
    """The two-node cluster beside a moto S3 server (tests/s3_server.py), the store's test credentials in the
    nodes' environment as a cloud cluster's nodes have theirs: yields (cluster, the server's host:port)."""
    from s3_server import moto_s3

    with moto_s3() as endpoint:
        credentials = {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                  "AWS_EC2_METADATA_DISABLED")}
        with local_cluster(credentials) as cluster:
            yield cluster, endpoint


@contextlib.contextmanager
def local_cluster(node_env: dict[str, str] | None = None):
    """The two-node cluster (more nodes may join: LocalCluster.join), its nodes' environment extended by
    node_env (e.g. an object store's credentials, which nodes take from their own environment)."""
    port, dashboard = free_port(), free_port()
    # Short names: Ray's socket paths have a length limit.
    temp_dirs = [tempfile.mkdtemp(prefix="rh", dir="/tmp"), tempfile.mkdtemp(prefix="rw", dir="/tmp"),
                 tempfile.mkdtemp(prefix="rp", dir="/tmp")]
    private = Path(temp_dirs[2]) if _can_hide(temp_dirs[2]) else None
    token_path = write_token(temp_dirs[0])
    # Jobs run `python` from the raylet's PATH: the project's interpreter first.
    env = {**os.environ, **(node_env or {}), "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(token_path),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    saved = os.environ.get("RAY_AUTH_TOKEN_PATH")
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token_path)
    sessions: set[int] = set()
    gcs = f"127.0.0.1:{port}"
    cluster = None
    try:
        # Each node's dashboard agent on a port of its own: both nodes share one address, and Ray's fixed default
        # (52365) would be taken by whichever agent (or leftover of another cluster) came first; the Jobs API
        # submits through the head's agent.
        agent_ports = [f"--dashboard-agent-listen-port={free_port()}" for _ in range(2)]
        _ray_start(["--head", f"--port={port}", "--num-cpus=2", "--node-ip-address=127.0.0.1", agent_ports[0],
                    "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                    f"--temp-dir={temp_dirs[0]}", "--resources=" + json.dumps({"head_node": 1})], env, sessions)
        head_session = next(iter(sessions))
        second = [f"--address={gcs}", "--num-cpus=2", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dirs[1]}",
                  agent_ports[1],
                  "--resources=" + json.dumps({"second_node": 1})]
        _ray_start(second, env, sessions, private)
        deadline = time.time() + 60
        while len(node_ids := _node_ids(gcs, env)) < 2:
            assert time.time() < deadline, f"the two Ray nodes did not both come up: {node_ids}"
            time.sleep(1)
        cluster = LocalCluster(f"http://127.0.0.1:{dashboard}", gcs, node_ids, env, token_path, private,
                               sessions={"head_node": head_session, "second_node": (sessions - {head_session}).pop()},
                               temp_dirs={"head_node": temp_dirs[0], "second_node": temp_dirs[1]})
        yield cluster
    finally:
        if saved is None:
            os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
        else:
            os.environ["RAY_AUTH_TOKEN_PATH"] = saved
        if cluster is not None:  # and the nodes that joined
            sessions |= set(cluster.sessions.values())
            temp_dirs = sorted(set(temp_dirs) | set(cluster.temp_dirs.values()))
        leftovers = stop_cluster(sessions, temp_dirs)
        for d in temp_dirs:
            shutil.rmtree(d, ignore_errors=True)
        assert not leftovers, f"processes of the test's Ray cluster left behind: {[p.pid for p in leftovers]}"
