"""The cluster files parse, name the keys their engines need, and every `pipeline ...` command they (and the
READMEs) run is a real command whose overrides compose with the Hydra config."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import yaml

from pipeline.cli import CONFIG_STAGES, TOOLS
from pipeline.cluster.submit import SUBMITTABLE, compose_checked
from pipeline.compose import compose_config, compose_node
from pipeline.config import ClusterConfig, validate_cluster

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
TOOL_COMMANDS = set(TOOLS)
HAS_SUBMITIT = importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None


def compose_hydra(overrides: list[str]):
    """Compose with the hydra node, for overrides of hydra/launcher and hydra.* keys."""
    return compose_node(overrides, with_hydra=True)


def first_sweep_value(override: str) -> str:
    """key=a,b,c -> key=a; key=range(n) -> key=0; key=range(a,b) -> key=a; anything else unchanged."""
    key, value = override.split("=", 1)
    swept = re.fullmatch(r"range\((\d+)(?:\s*,\s*\d+)*\)", value)
    if swept:
        return f"{key}={0 if ',' not in value else swept.group(1)}"
    return f"{key}={value.split(',')[0]}" if "[" not in value else override


def check_pipeline_command(command: str) -> None:
    """`pipeline <command> ...` or `python -m pipeline.cli <command> ...`: a command the CLI has; for stages
    (also when submitted) the overrides compose and validate as they would on the cluster."""
    words = shlex.split(command)
    if words[:3] == ["python", "-m", "pipeline.cli"]:
        words = ["pipeline", *words[3:]]
    assert words[0] == "pipeline" and len(words) > 1, command
    command_name, args = words[1], words[2:]
    assert command_name in CONFIG_STAGES or command_name in TOOL_COMMANDS, command
    if command_name == "submit":
        assert args[0] in SUBMITTABLE, command
        command_name, args = args[0], args[1:]
    if command_name not in CONFIG_STAGES or command_name == "params":
        return
    if command_name == "plan":  # its own options aside, a model and a layout that validate
        compose_config([w for w in args if "=" in w and not w.startswith("-")], stage="plan")
        return
    multirun = "-m" in args
    overrides = [w for w in args if "=" in w and not w.startswith("-")]
    if "--config-dir" in args:
        # Group choices from a directory an earlier command writes (`scaling plan`'s sweeps, `scaling
        # recommend`'s configs): tests/pipeline/scaling/test_loop.py composes those files; the rest must compose.
        shipped = {p.stem for p in (REPO / "conf" / "sweep").glob("*.yaml")}
        overrides = [o for o in overrides if not (o.startswith("+recommended=")
                                                  or (o.startswith("sweep=") and o.split("=", 1)[1] not in shipped))]
    if multirun:  # a sweep: each point is one value of every swept key (the first of a list or a range)
        overrides = [first_sweep_value(o) for o in overrides]
    if any(o.startswith("hydra") for o in overrides):
        if "hydra/launcher=pipeline_slurm" in overrides and not HAS_SUBMITIT:
            return  # the launcher comes with the `cluster` extra
        compose_hydra(overrides)
        overrides = [o for o in overrides if not o.startswith("hydra")]
    compose_checked(command_name, overrides)


@pytest.mark.parametrize("name", ["local", "ray", "slurm", "kubernetes"])
def test_cluster_configs_compose(name):
    cfg = compose_checked("train", [f"cluster={name}"])
    assert isinstance(cfg.cluster, ClusterConfig) and cfg.cluster.name == name
    validate_cluster(cfg.cluster)
    if name in ("slurm", "kubernetes"):
        assert cfg.cluster.address == "auto"  # the pipeline runs on the cluster and joins it


def test_kuberay_raycluster():
    doc = yaml.safe_load((CLUSTER / "kubernetes" / "raycluster.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    head = doc["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"  # for the head Service; authenticated below
    (container,) = head["template"]["spec"]["containers"]
    assert 8265 in {p["containerPort"] for p in container["ports"]}  # the Jobs API that `pipeline submit` uses
    groups = doc["spec"]["workerGroupSpecs"]
    assert groups and all(g["groupName"] and g["replicas"] >= 1 for g in groups)
    _check_pods_mount_shared_storage([head, *groups])


def test_kuberay_rayjob_runs_a_pipeline_stage():
    doc = yaml.safe_load((CLUSTER / "kubernetes" / "rayjob.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    cluster_spec = spec["rayClusterSpec"]
    assert {"headGroupSpec", "workerGroupSpecs"} <= set(cluster_spec)
    _check_pods_mount_shared_storage([cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]])
    check_pipeline_command(spec["entrypoint"])
    cfg = compose_checked("run", shlex.split(spec["entrypoint"])[2:])
    assert cfg.cluster.address == "auto" and cfg.output_dir.startswith(cfg.cluster.shared_storage)


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kubernetes_pods_checkpoint_before_they_go(name):
    """Every pod gives `pipeline preempt` (its preStop hook) time to have the runs on the shared volume
    checkpoint before Kubernetes sends SIGTERM: a grace period longer than the hook's wait."""
    doc = yaml.safe_load((CLUSTER / "kubernetes" / name).read_text())
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    shared = compose_checked("train", ["cluster=kubernetes"]).cluster.shared_storage
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        command = container["lifecycle"]["preStop"]["exec"]["command"]
        check_pipeline_command(shlex.join(command))
        assert command[:2] == ["pipeline", "preempt"] and command[2].startswith(shared)
        wait = float(command[command.index("--wait") + 1])
        assert 300 <= wait < pod["terminationGracePeriodSeconds"]


def _check_pods_mount_shared_storage(groups: list[dict]) -> None:
    """Every pod mounts the volume that output_dir lives on, at the mount point cluster=kubernetes names."""
    shared = compose_checked("train", ["cluster=kubernetes"]).cluster.shared_storage
    for group in groups:
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        assert container["image"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert shared in mounts, group
        (volume,) = [v for v in pod["volumes"] if v["name"] == mounts[shared]]
        assert volume["persistentVolumeClaim"]["claimName"]


def _containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_no_shipped_cluster_exposes_ray_without_token_authentication():
    """Every Ray the project ships that listens beyond loopback answers only with a token: KubeRay manifests by
    KubeRay's authOptions or RAY_AUTH_MODE=token with the token from a Secret on every container; commands that
    start Ray (launcher YAML, READMEs, Slurm script) with RAY_AUTH_MODE=token."""
    for name in ("raycluster.yaml", "rayjob.yaml"):
        doc = yaml.safe_load((CLUSTER / "kubernetes" / name).read_text())
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        if spec.get("authOptions", {}).get("mode") == "token":
            continue
        for container in _containers(spec):
            env = {e["name"]: e for e in container.get("env", [])}
            assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", (name, container["name"])
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["key"], (name, container["name"])
    launcher = yaml.safe_load((CLUSTER / "ray" / "cluster.yaml").read_text())
    starts = launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"]
    assert all(c.startswith("RAY_AUTH_MODE=token ray start") for c in starts if "ray start" in c)
    assert "~/.ray/auth_token" in launcher["file_mounts"]
    # Any `ray start` in the docs and scripts binding beyond loopback turns authentication on.
    root = CLUSTER.parent
    for path in [root / "README.md", *CLUSTER.rglob("*")]:
        if not path.is_file() or path.suffix in (".yaml",) and "kubernetes" in path.parts:
            continue
        for line in path.read_text().splitlines():
            if "ray start" in line and "0.0.0.0" in line:
                assert "RAY_AUTH_MODE=token" in line, (path, line)
    slurm = (CLUSTER / "slurm" / "pipeline.sbatch").read_text()
    assert "export RAY_AUTH_MODE=token" in slurm and "--dashboard-host" not in slurm  # the dashboard on loopback


def test_dockerfile_installs_the_project():
    text = (CLUSTER / "kubernetes" / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.\d+", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX=", text, re.M)  # CPU or CUDA torch build
    assert re.search(r'^RUN pip install .*"\.\[cluster\]"', text, re.M)
    for copied in ("pyproject.toml", "pipeline", "data_prep", "conf"):
        assert re.search(rf"^COPY .*\b{copied}\b", text, re.M), copied


def test_ray_cluster_launcher_yaml():
    doc = yaml.safe_load((CLUSTER / "ray" / "cluster.yaml").read_text())
    for key in ("cluster_name", "max_workers", "provider", "auth", "available_node_types", "head_node_type",
                "file_mounts", "setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in doc, key
    assert doc["provider"]["type"]
    assert doc["head_node_type"] in doc["available_node_types"]
    for node_type in doc["available_node_types"].values():
        assert {"node_config", "resources"} <= set(node_type)
    assert any("ray start --head" in c and "--dashboard-host=0.0.0.0" in c for c in doc["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in doc["worker_start_ray_commands"])
    mounted = next(remote for remote, local in doc["file_mounts"].items() if local == ".")
    assert any(f"pip install -e \"{mounted}[cluster]\"" in c for c in doc["setup_commands"])


def test_slurm_script_runs_a_stage_that_composes():
    text = (CLUSTER / "slurm" / "pipeline.sbatch").read_text()
    (driver,) = re.findall(r'^"\$PIPELINE_PYTHON" -m pipeline.cli .*', text, re.M)
    assert driver.endswith('"$STAGE" "$@" cluster=slurm &')
    check_pipeline_command("pipeline train model.n_layer=2 cluster=slurm")


@pytest.mark.skipif(not HAS_SUBMITIT, reason="hydra-submitit-launcher is in the `cluster` extra")
def test_submitit_launcher_config():
    launcher = compose_hydra(["hydra/launcher=pipeline_slurm", "hydra.launcher.partition=gpu"]).hydra.launcher
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.nodes == 1
    assert launcher.signal_delay_s > 0 and launcher.max_num_timeout > 0  # preempted points are resubmitted


@pytest.mark.parametrize("doc", ["cluster/README.md", "README.md"])
def test_documented_pipeline_commands_exist_and_compose(doc):
    text = (REPO / doc).read_text()
    commands = re.findall(r"^\s*(pipeline [a-z]+[^\n#]*)", text, re.M)
    assert commands
    # sbatch ... cluster/slurm/pipeline.sbatch <stage> <overrides>: the script adds cluster=slurm.
    for stage, overrides in re.findall(r"pipeline\.sbatch ([a-z]+)([^\n#]*)", text):
        commands.append(f"pipeline {stage} {overrides} cluster=slurm")
    for command in commands:
        if "<" in command:  # a placeholder such as <job id>
            command = re.sub(r"<[^>]*>", "X", command)
        check_pipeline_command(command.replace("$PWD", "/tmp"))
