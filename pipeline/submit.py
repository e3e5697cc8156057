"""`pipeline submit <stage> [overrides...] cluster.address=http://HOST:8265` and `pipeline jobs ...`:
the same stage and overrides, run on a Ray cluster through the Ray Jobs API.

Everything that can be checked here is checked before anything is sent (in seconds): the overrides
compose into a valid config, the cluster answers, and output_dir is a path the cluster's nodes can share.
The job uploads this source tree as its working directory and runs `python -m pipeline.cli <stage>
<overrides> cluster.address=auto`, which joins the cluster it runs on.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from pipeline.config import ConfigError

SUBMITTABLE = ("prepare", "train", "evaluate", "run", "sweep", "export")
REPO_ROOT = Path(__file__).resolve().parents[1]
# Not uploaded with the working directory.
EXCLUDES = [".venv", "outputs", ".git", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache", "mlruns"]


def check_reachable(address: str, timeout_s: float) -> None:
    """Fail fast (a TCP connect with a timeout) when the Jobs API URL is wrong or the cluster is down."""
    url = urlparse(address)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError(
            f"cluster.address={address} is not a Ray Jobs API URL: use http://HOST:8265 (the dashboard port of "
            f"the head node; for KubeRay, port-forward the head service: kubectl port-forward svc/<cluster>-head-svc 8265)."
        )
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout_s):
            pass
    except OSError as err:
        raise ConfigError(
            f"cannot reach the Ray cluster at {address} ({err}): check that the head node runs "
            f"(`ray start --head --dashboard-host=0.0.0.0`) and that port {port} is reachable from here."
        ) from err


def check_shared_storage(output_dir: str) -> None:
    """output_dir is where shards, checkpoints and MLflow live: every node must see the same path."""
    if "://" in output_dir:
        raise ConfigError(
            f"output_dir={output_dir}: object-store URIs are not written directly; mount the bucket on every node "
            f"(s3fs, gcsfuse, a CSI volume) and pass the mount path."
        )
    path = Path(output_dir)
    if not path.is_absolute():
        raise ConfigError(
            f"output_dir={output_dir} is relative: on a cluster it must be an absolute path on storage every node "
            f"mounts (e.g. output_dir=/shared/pipeline)."
        )
    probe = path if path.exists() else path.parent
    if not probe.is_dir():
        raise ConfigError(
            f"output_dir={output_dir} is not reachable from here ({probe} does not exist): pass a path on the shared "
            f"file system that the cluster's nodes mount (it is checked from the submitting machine)."
        )


def compose_checked(stage: str, overrides: list[str]):
    """Compose and validate the job's config locally; paths on the cluster (data.path) are not checked here."""
    from hydra import compose, initialize_config_module

    from pipeline.config import validate_cluster, validate_model, validate_parallel, validate_train
    from pipeline.schema import register_schema

    register_schema()
    try:
        with initialize_config_module(config_module="pipeline.conf", version_base="1.3"):
            node = compose(config_name="config", overrides=overrides)
    except Exception as err:  # Hydra's override and type errors
        raise ConfigError(f"the overrides do not compose: {err}") from err
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_object(node)
    validate_model(cfg.model)
    validate_parallel(cfg.parallel, cfg.model)
    validate_train(cfg.train, cfg.parallel, cfg.model)
    validate_cluster(cfg.cluster)
    return cfg


def job_entrypoint(stage: str, overrides: list[str]) -> str:
    kept = [o for o in overrides if not o.startswith("cluster.address=")]
    return shlex.join(["python", "-m", "pipeline.cli", stage, *kept, "cluster.address=auto"])


def runtime_env(cfg) -> dict:
    # PIPELINE_JOB_DIR: the job runs from the shared output_dir rather than from the unpacked code, whose
    # directory Ray may unpack again (a new inode) when another node's runtime-env agent shares this disk.
    return {"working_dir": str(REPO_ROOT), "excludes": EXCLUDES,
            "env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1", "PIPELINE_JOB_DIR": cfg.output_dir}}


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def follow(client, job_id: str) -> str:
    """Stream the job's logs until it ends; returns its final status."""

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    for _ in range(50):
        status = client.get_job_status(job_id)
        if status.is_terminal():
            return str(status.value if hasattr(status, "value") else status)
        time.sleep(0.2)
    return str(client.get_job_status(job_id))


def submit(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pipeline submit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=SUBMITTABLE)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for the stage itself")
    parser.add_argument("--no-wait", action="store_true", help="print the job id and return without tailing logs")
    args = parser.parse_args(argv)
    try:
        cfg = compose_checked(args.stage, args.overrides)
        if not cfg.cluster.address:
            raise ConfigError("give the cluster's Jobs API URL: cluster=ray cluster.address=http://HOST:8265")
        check_shared_storage(cfg.output_dir)
        check_reachable(cfg.cluster.address, cfg.cluster.connect_timeout_s)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    client = _client(cfg.cluster.address)
    entrypoint = job_entrypoint(args.stage, args.overrides)
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env(cfg),
                               metadata={"stage": args.stage, "run_name": cfg.run_name})
    print(f"submitted job {job_id} to {cfg.cluster.address}: {entrypoint}", flush=True)
    if args.no_wait:
        print(f"follow it with: pipeline jobs logs {job_id} --address {cfg.cluster.address}")
        return 0
    status = follow(client, job_id)
    print(f"job {job_id} ended: {status}")
    return 0 if status.endswith("SUCCEEDED") else 1


def jobs(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pipeline jobs", description="Jobs on a Ray cluster (Ray Jobs API).")
    parser.add_argument("action", choices=["list", "logs", "stop", "status"])
    parser.add_argument("job_id", nargs="?")
    parser.add_argument("--address", required=True, help="the cluster's Jobs API URL, http://HOST:8265")
    parser.add_argument("--follow", action="store_true", help="with logs: stream until the job ends")
    args = parser.parse_args(argv)
    try:
        check_reachable(args.address, 10.0)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    client = _client(args.address)
    if args.action == "list":
        for info in client.list_jobs():
            print(f"{info.submission_id}  {info.status}  {info.entrypoint}")
        return 0
    if not args.job_id:
        print(f"error: pipeline jobs {args.action} needs a job id", file=sys.stderr)
        return 2
    if args.action == "logs":
        if args.follow:
            print(f"ended: {follow(client, args.job_id)}")
        else:
            print(client.get_job_logs(args.job_id), end="")
    elif args.action == "status":
        print(client.get_job_status(args.job_id))
    else:
        print(f"stop requested: {client.stop_job(args.job_id)}")
    return 0
