"""`pipeline submit` refuses bad input quickly, with a message naming the problem."""

from __future__ import annotations

import subprocess
import sys
import time


def submit(*args: str, cwd) -> tuple[subprocess.CompletedProcess, float]:
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "submit", *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd)
    return proc, time.time() - start


def test_unreachable_address(tmp_path):
    proc, seconds = submit("train", "cluster=ray", "cluster.address=http://127.0.0.1:9", f"output_dir={tmp_path}",
                           cwd=tmp_path)
    assert proc.returncode == 2 and seconds < 30
    assert "cannot reach the Ray cluster at http://127.0.0.1:9" in proc.stderr


def test_address_that_is_not_a_jobs_url(tmp_path):
    proc, seconds = submit("train", "cluster=ray", "cluster.address=10.0.0.1:6379", f"output_dir={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 2 and seconds < 30
    assert "is not a Ray Jobs API URL" in proc.stderr


def test_unknown_override(tmp_path):
    proc, seconds = submit("train", "cluster=ray", "cluster.address=http://127.0.0.1:9", "nonsense=1", cwd=tmp_path)
    assert proc.returncode == 2 and seconds < 30
    assert "nonsense" in proc.stderr


def test_storage_the_cluster_cannot_share(tmp_path):
    for output_dir, message in [("relative/out", "is relative"), ("/nonexistent/deep/out", "is not reachable"),
                                ("s3://bucket/out", "mount the bucket")]:
        proc, seconds = submit("train", "cluster=ray", "cluster.address=http://127.0.0.1:9", f"output_dir={output_dir}",
                               cwd=tmp_path)
        assert proc.returncode == 2 and seconds < 30, proc.stderr
        assert message in proc.stderr, proc.stderr
