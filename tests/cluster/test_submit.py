"""What `pipeline submit` sends: the entrypoint and the runtime environment (code that imports on its own)."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cluster.submit import EXCLUDES, STOP_GRACE_S, compose_checked, job_entrypoint, runtime_env
from pipeline.config import ClusterConfig, ConfigError


def test_entrypoint_keeps_the_overrides_and_joins_the_cluster():
    entry = job_entrypoint("train", ["model.n_layer=2", "cluster=ray", "cluster.address=http://h:8265",
                                     "++cluster.address=http://h:8265", "eval.prompt='ROMEO: hi'"])
    words = shlex.split(entry)
    assert words == ["python", "-m", "pipeline.cli", "train", "model.n_layer=2", "cluster=ray",
                     "eval.prompt='ROMEO: hi'", "cluster.address=auto"]
    compose_checked("train", words[4:])  # what runs on the cluster composes too


def test_auto_working_dir_is_the_installed_layout_and_imports_on_its_own(tmp_path):
    with runtime_env(ClusterConfig(runtime_env_working_dir="auto"), "/shared/out") as env:
        staged = Path(env["working_dir"])
        assert (staged / "pipeline" / "conf" / "config.yaml").is_file()
        assert (staged / "pipeline" / "conf" / "cluster" / "ray.yaml").is_file()
        assert (staged / "data_prep" / "prepare.py").is_file()
        assert not list(staged.rglob("__pycache__"))
        # As on a cluster node: run from the unpacked directory; the Hydra tree must come from it too.
        code = "import pipeline.cli, pipeline.conf; print(pipeline.cli.__file__); print(pipeline.conf.__path__[0])"
        out = subprocess.run([sys.executable, "-c", code], cwd=staged, capture_output=True, text=True, check=True)
        assert all(line.startswith(str(staged)) for line in out.stdout.split()), out.stdout
        params = subprocess.run([sys.executable, "-m", "pipeline.cli", "params", "model=gpt3_175b"], cwd=staged,
                                capture_output=True, text=True, timeout=60)
        assert "175,181,291,520" in params.stdout, params.stderr
    assert not staged.exists()  # removed once submitted
    assert env["env_vars"]["PIPELINE_JOB_DIR"] == "/shared/out"
    assert env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"] == str(STOP_GRACE_S)


def test_working_dir_modes(tmp_path):
    with runtime_env(ClusterConfig(runtime_env_working_dir=None), "/shared/out") as env:
        assert "working_dir" not in env  # the image has the project installed
    with runtime_env(ClusterConfig(runtime_env_working_dir=str(tmp_path)), "/shared/out") as env:
        assert env["working_dir"] == str(tmp_path) and env["excludes"] == EXCLUDES
    with pytest.raises(ConfigError, match="runtime_env_working_dir=/nonexistent is not a directory"), \
            runtime_env(ClusterConfig(runtime_env_working_dir="/nonexistent"), "/shared/out"):
        pass
