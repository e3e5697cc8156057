"""`pipeline submit` and `pipeline jobs` refuse bad input before sending anything, within seconds, with a
message that names the problem and the fix."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import time

import pytest

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens there


def pipeline(*args: str, cwd) -> tuple[subprocess.CompletedProcess, float]:
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd)
    return proc, time.time() - start


def refused(proc: subprocess.CompletedProcess, seconds: float, *messages: str) -> None:
    assert proc.returncode == 2 and seconds < 30, (proc.returncode, seconds, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    for message in messages:
        assert message in proc.stderr, proc.stderr


def test_unreachable_address(tmp_path):
    proc, seconds = pipeline("submit", "train", "cluster=ray", f"cluster.address={UNREACHABLE}",
                             f"output_dir={tmp_path}", cwd=tmp_path)
    refused(proc, seconds, f"cannot reach the Ray cluster at {UNREACHABLE}", "ray start --head", "port-forward")


def test_address_that_is_not_a_jobs_url(tmp_path):
    proc, seconds = pipeline("submit", "train", "cluster=ray", "cluster.address=10.0.0.1:6379",
                             f"output_dir={tmp_path}", cwd=tmp_path)
    refused(proc, seconds, "cluster.address=10.0.0.1:6379 is not a Ray Jobs API URL", "http://HOST:8265")


def test_missing_address(tmp_path):
    proc, seconds = pipeline("submit", "train", "cluster=ray", f"output_dir={tmp_path}", cwd=tmp_path)
    refused(proc, seconds, "no cluster address: pass cluster.address=http://HOST:8265")


@pytest.fixture
def not_ray_server():
    """An HTTP server that is not Ray's dashboard (a wrong port): answers 404 to everything."""
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_address_of_something_else(tmp_path, not_ray_server):
    proc, seconds = pipeline("submit", "train", "cluster=ray", f"cluster.address={not_ray_server}",
                             f"output_dir={tmp_path}", cwd=tmp_path)
    refused(proc, seconds, f"{not_ray_server} answers HTTP", "not a Ray Jobs API", "8265")


def test_unknown_override(tmp_path):
    proc, seconds = pipeline("submit", "train", "cluster=ray", f"cluster.address={UNREACHABLE}", "nonsense=1",
                             f"output_dir={tmp_path}", cwd=tmp_path)
    refused(proc, seconds, "the overrides do not compose", "nonsense")


def test_invalid_config_is_refused_before_the_cluster_is_contacted(tmp_path):
    proc, seconds = pipeline("submit", "train", "cluster=ray", f"cluster.address={UNREACHABLE}", "model.n_head=3",
                             f"output_dir={tmp_path}", cwd=tmp_path)
    refused(proc, seconds, "model.d_model=128 is not divisible by model.n_head=3")


@pytest.mark.parametrize(("overrides", "message"), [
    (["output_dir=relative/out"], "output_dir=relative/out is relative"),
    (["output_dir=s3://bucket/out"], "pass the bucket as cluster.storage_uri"),
    (["output_dir=/tmp/out", "cluster.storage_uri=ftp://host/x"], "is not an object store URI"),
    # Nothing listens on port 1: the store's probe write fails (or times out) within cluster.connect_timeout_s.
    (["output_dir=/tmp/out", "cluster.storage_uri='s3://bucket/p?endpoint_override=127.0.0.1:1&scheme=http'",
      "cluster.connect_timeout_s=5"], "cluster.storage_uri=s3://bucket/p"),
    (["output_dir=/etc/hostname/out"], "is not reachable from here: /etc/hostname exists but is not a writable"),
    (["output_dir=/data/out", "cluster.shared_storage=/shared"], "is outside cluster.shared_storage=/shared"),
    (["output_dir=/tmp/out", "cluster.address=http://10.1.2.3:8265"], "node-local directory"),
    (["data.source=text", "data.path=corpus.txt", "output_dir={tmp}"], "data.path=corpus.txt is relative"),
    (["data=mixture", "output_dir={tmp}"], "data.mixture.1.path=corpus/notes is relative"),
])
def test_storage_the_cluster_cannot_share(tmp_path, overrides, message):
    overrides = [o.replace("{tmp}", str(tmp_path)) for o in overrides]
    proc, seconds = pipeline("submit", "train", "cluster=ray", f"cluster.address={UNREACHABLE}", *overrides,
                             cwd=tmp_path)
    refused(proc, seconds, message)


def test_storage_under_shared_mount_is_trusted_without_mounting_it_here(tmp_path):
    # /shared does not exist on this machine: with cluster.shared_storage the check moves on to the address.
    proc, seconds = pipeline("submit", "train", "cluster=ray", f"cluster.address={UNREACHABLE}",
                             "output_dir=/shared/pipeline", "cluster.shared_storage=/shared", cwd=tmp_path)
    refused(proc, seconds, "cannot reach the Ray cluster")


def test_storage_in_an_object_store_lets_output_dir_be_node_local(tmp_path):
    # A writable store: output_dir may be node-local (/tmp) even for a remote cluster; the check moves on.
    proc, seconds = pipeline("submit", "train", "cluster=ray", f"cluster.address={UNREACHABLE}",
                             "output_dir=/tmp/pipeline", f"cluster.storage_uri=file://{tmp_path}/bucket", cwd=tmp_path)
    refused(proc, seconds, "cannot reach the Ray cluster")
    assert not list((tmp_path / "bucket").iterdir())  # the probe object was removed


def test_jobs_refuses_bad_addresses(tmp_path):
    proc, seconds = pipeline("jobs", "list", "--address", UNREACHABLE, cwd=tmp_path)
    refused(proc, seconds, f"cannot reach the Ray cluster at {UNREACHABLE}")
    proc, seconds = pipeline("jobs", "stop", "--address", UNREACHABLE, cwd=tmp_path)
    refused(proc, seconds, "needs a job id")
