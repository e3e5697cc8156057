"""The cluster files parse, name the keys their engines need, and run commands the CLI has."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.cli import CONFIG_STAGES
from pipeline.submit import compose_checked

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
TOOL_COMMANDS = {"data", "checkpoint", "scaling", "submit", "jobs"}


def check_pipeline_command(command: str) -> None:
    """`pipeline <stage> overrides...` (or python -m pipeline.cli ...): a real stage whose overrides compose."""
    words = shlex.split(command)
    if words[:3] == ["python", "-m", "pipeline.cli"]:
        words = ["pipeline", *words[3:]]
    assert words[0] == "pipeline", command
    stage, overrides = words[1], [w for w in words[2:] if "=" in w and not w.startswith("-")]
    assert stage in CONFIG_STAGES or stage in TOOL_COMMANDS, command
    if stage in CONFIG_STAGES:
        compose_checked(stage, overrides)


def test_kuberay_raycluster():
    doc = yaml.safe_load((CLUSTER / "kubernetes" / "raycluster.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    head = doc["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    ports = {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert 8265 in ports  # the Jobs API that `pipeline submit` talks to
    groups = doc["spec"]["workerGroupSpecs"]
    assert groups and all(g["template"]["spec"]["containers"][0]["image"] for g in groups)


def test_kuberay_rayjob_runs_a_pipeline_stage():
    doc = yaml.safe_load((CLUSTER / "kubernetes" / "rayjob.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert {"headGroupSpec", "workerGroupSpecs"} <= set(spec["rayClusterSpec"])
    check_pipeline_command(spec["entrypoint"])


def test_dockerfile_installs_the_project():
    text = (CLUSTER / "kubernetes" / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.\d+", text, re.M)
    assert "pip install" in text and "TORCH_SPEC" in text and "COPY conf" in text


def test_ray_cluster_launcher_yaml():
    doc = yaml.safe_load((CLUSTER / "ray" / "cluster.yaml").read_text())
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in doc, key
    assert doc["head_node_type"] in doc["available_node_types"]
    assert any("ray start --head" in c for c in doc["head_start_ray_commands"])
    assert any("pip install" in c for c in doc["setup_commands"])


def test_slurm_script_is_valid_bash_and_forwards_preemption():
    script = CLUSTER / "slurm" / "pipeline.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "#SBATCH --signal=B:USR1@" in text and "trap forward USR1 TERM" in text
    assert "start --head" in text and "--address=" in text
    assert '-m pipeline.cli "$STAGE" "$@" cluster=slurm' in text
    compose_checked("train", ["cluster=slurm"])


def test_submitit_launcher_config():
    doc = yaml.safe_load((REPO / "conf" / "hydra" / "launcher" / "pipeline_slurm.yaml").read_text())
    assert "submitit_slurm" in doc["defaults"]
    assert doc["signal_delay_s"] > 0 and doc["nodes"] == 1


@pytest.mark.parametrize("doc", ["cluster/README.md", "README.md"])
def test_documented_pipeline_commands_exist(doc):
    text = (REPO / doc).read_text()
    commands = re.findall(r"^\s*(pipeline [a-z]+[^\n#]*)", text, re.M)
    assert commands
    for command in commands:
        words = shlex.split(command.replace("<", "").replace(">", ""))
        assert words[1] in CONFIG_STAGES or words[1] in TOOL_COMMANDS, command
