"""`pipeline submit <stage> [overrides...] cluster=ray cluster.address=http://HOST:8265 [--no-wait]`:
the same stage with the same overrides, run on a Ray cluster through the Ray Jobs API.

Everything that can be checked here is checked before anything is sent, in seconds: the overrides
compose into a valid config, output_dir is a path every node of the cluster can share, and the address
answers as a Ray Jobs API. The job carries the pipeline's code (cluster.runtime_env_working_dir) and runs
`python -m pipeline.cli <stage> <overrides> cluster.address=auto`, which joins the cluster it runs on.

Clusters with Ray's token authentication (RAY_AUTH_MODE=token, as every cluster the project ships runs): the
token is looked for where Ray's own clients look, RAY_AUTH_TOKEN, then the file RAY_AUTH_TOKEN_PATH, then
~/.ray/auth_token, and sent (as `Authorization: Bearer`) only to a cluster that asks for one, and only over https
or to this machine's loopback (an ssh tunnel, kubectl port-forward): never in clear text over the network.

Overrides that carry credentials (tracking.uri=http://user:secret@host, a storage URI with keys) are refused: a
job's entrypoint and environment are kept in Ray's job metadata, readable by anyone holding the cluster's token,
and logged by its runtime-env agent. The cluster's nodes take credentials from their own environment.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import importlib.util
import ipaddress
import json
import os
import shlex
import shutil
import socket
import sys
import tempfile
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from pipeline.cluster.storage import ObjectStore
from pipeline.compose import CONFIG_MODULE, compose_config
from pipeline.config import ClusterConfig, ConfigError
from pipeline.redaction import hide_secret_overrides, redact_uri, scrub

SUBMITTABLE = ("prepare", "train", "evaluate", "run", "sweep", "export")
# Not uploaded when cluster.runtime_env_working_dir names a directory.
EXCLUDES = [".venv", "outputs", ".git", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache", "mlruns"]
# Directories that are private to one machine: other nodes never see what is written there.
NODE_LOCAL_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
# `pipeline jobs stop` sends SIGTERM: the driver asks the workers to checkpoint (see pipeline.train.preemption)
# and Ray waits this long before SIGKILL (its default is 3 s, too short to write a checkpoint).
STOP_GRACE_S = 120
START_CLUSTER_HINT = (
    "start one with `RAY_AUTH_MODE=token ray start --head` (Jobs API on port 8265, token authentication on), "
    "reach a remote one through a tunnel to this machine (`ssh -N -L 8265:localhost:8265 <head>`, "
    "`ray dashboard cluster/ray/cluster.yaml` or `kubectl port-forward svc/<cluster>-head-svc 8265:8265`), "
    "and see cluster/README.md"
)


def parse_jobs_address(address: str | None, option: str = "cluster.address="):
    """The URL of a Ray Jobs API, checked without touching the network. `option` is how the user gave the
    address, for the messages."""
    if not address:
        raise ConfigError(
            f"no cluster address: pass {option}http://HOST:8265 (the Jobs API of a running Ray cluster); "
            f"{START_CLUSTER_HINT}."
        )
    url = urlparse(address)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError(
            f"{option}{address} is not a Ray Jobs API URL: use http://HOST:8265, the dashboard port of "
            f"the head node (not the GCS port 6379, and not `auto`, which only works on the cluster itself); "
            f"{START_CLUSTER_HINT}."
        )
    return url


def tunnel_help(option: str = "cluster.address=") -> str:
    return (f"use the cluster's https:// address, or reach it through a tunnel to this machine and pass "
            f"{option}http://127.0.0.1:8265: `ssh -N -L 8265:localhost:8265 <head node>`, or "
            f"`kubectl port-forward svc/<cluster>-head-svc 8265:8265`")


def private_transport(address: str) -> bool:
    """https, or plain http to this machine's loopback: what is sent there crosses no network in clear text."""
    url = urlparse(address)
    return url.scheme == "https" or _is_loopback_address(url.hostname or "")


def _refuse_clear_text(address: str, what: str, option: str) -> ConfigError:
    return ConfigError(
        f"{what} would go to {redact_uri(address)} over plain http, readable by anyone on the network path; "
        f"stopped before sending: {tunnel_help(option)}."
    )


def _ray_client_adds_token() -> bool:
    """Whether Ray's JobSubmissionClient sends a token on its own (RAY_AUTH_MODE=token in this environment)."""
    try:
        from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled
    except ImportError:  # another Ray: judge by the variable its clients read
        return os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
    return bool(get_auth_headers_if_auth_enabled({}))


TOKEN_HELP = (
    "export RAY_AUTH_TOKEN=<the cluster's token>, or RAY_AUTH_TOKEN_PATH=<a file holding it> (readable by you "
    "only), or write it to ~/.ray/auth_token; on KubeRay: kubectl get secret pipeline-ray-token -o "
    "jsonpath='{.data.auth_token}' | base64 -d; on a Slurm allocation: the job's token file (see cluster/README.md)"
)


@dataclass
class JobsAPI:
    """A Jobs API that answered: its Ray version and the headers it needs (the bearer token, if it asks)."""

    version: str
    headers: dict[str, str] = field(default_factory=dict)


def ray_auth_token() -> tuple[str | None, str]:
    """(token, where it came from) as Ray's clients find it: RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH,
    ~/.ray/auth_token; (None, "") when there is none."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(named).expanduser() if named else Path.home() / ".ray" / "auth_token"
    try:
        token = path.read_text().strip()
    except OSError as err:
        if named:
            raise ConfigError(f"RAY_AUTH_TOKEN_PATH={named} cannot be read ({err.strerror}): point it at the file "
                              f"holding the cluster's token") from err
        return None, ""
    if token and path.stat().st_mode & 0o077:
        print(f"warning: the Ray token file {path} is readable by other users: chmod 600 {path}", file=sys.stderr)
    return (token or None), str(path)


def _get_version(address: str, timeout_s: float, headers: dict[str, str]) -> bytes:
    request = urllib.request.Request(f"{address.rstrip('/')}/api/version", headers=headers)
    with urllib.request.urlopen(request, timeout=timeout_s) as answer:
        return answer.read()


def check_jobs_address(address: str | None, timeout_s: float, option: str = "cluster.address=") -> JobsAPI:
    """The cluster's Jobs API answers at `address` (with the token, if it asks for one, sent only where
    private_transport allows). Fails in timeout_s."""
    url = parse_jobs_address(address, option)
    private = private_transport(address)
    if not private and _ray_client_adds_token():
        raise _refuse_clear_text(address, "the Ray token (RAY_AUTH_MODE=token here makes Ray's client send it with "
                                          "every request)", option)
    headers: dict[str, str] = {}
    try:
        try:
            body = _get_version(address, timeout_s, headers)
        except urllib.error.HTTPError as err:
            if err.code not in (401, 403):
                raise
            if not private:
                raise _refuse_clear_text(address, f"the Ray cluster asks for a token (HTTP {err.code}); the token",
                                         option) from None
            token, where = ray_auth_token()
            if token is None:
                raise ConfigError(
                    f"the Ray cluster at {address} requires an authentication token (HTTP {err.code}) and none was "
                    f"found: {TOKEN_HELP}."
                ) from err
            headers = {"Authorization": f"Bearer {token}"}
            try:
                body = _get_version(address, timeout_s, headers)
            except urllib.error.HTTPError as again:
                if again.code in (401, 403):
                    raise ConfigError(
                        f"the Ray cluster at {address} refused the token from {where} (HTTP {again.code}): it is not "
                        f"this cluster's token; {TOKEN_HELP}."
                    ) from again
                raise
    except urllib.error.HTTPError as err:
        raise ConfigError(
            f"{address} answers HTTP {err.code} on /api/version: it is not a Ray Jobs API; use the head node's "
            f"dashboard port (8265 unless --dashboard-port was given)."
        ) from err
    except http.client.HTTPException as err:  # something answers, but not HTTP (e.g. the GCS port)
        raise ConfigError(
            f"{address} answers, but not as a Ray Jobs API ({err!r}): use the head node's dashboard port (8265 "
            f"unless --dashboard-port was given), not the GCS port."
        ) from err
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ConfigError(
            f"cannot reach the Ray cluster at {address} ({reason}, within {timeout_s:g} s): check that the head "
            f"node runs and that port {url.port or 80} is reachable from here; {START_CLUSTER_HINT}."
        ) from err
    try:
        return JobsAPI(json.loads(body)["ray_version"], headers)
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(
            f"{address} answers, but not as a Ray Jobs API (no ray_version at /api/version): use the head node's "
            f"dashboard port (8265 unless --dashboard-port was given)."
        ) from err


def _is_loopback_address(host: str) -> bool:
    """localhost or a loopback IP (127.0.0.0/8, ::1): not this machine's name, which may resolve to an outward
    address."""
    try:
        return host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _is_loopback(host: str) -> bool:
    if host in ("localhost", socket.gethostname()):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_shared_storage(output_dir: str, cluster: ClusterConfig) -> None:
    """output_dir holds shards, checkpoints and the MLflow store: every node must see the same files there,
    unless cluster.storage_uri names an object store that keeps them (pipeline.cluster.storage): then it must be
    writable from here within cluster.connect_timeout_s, and output_dir is a working directory per node."""
    if "://" in output_dir:
        raise ConfigError(
            f"output_dir={output_dir} is a URI: the pipeline writes shards, DeepSpeed checkpoints and MLflow with "
            f"file-system calls. Keep output_dir a local path and pass the bucket as cluster.storage_uri "
            f"(e.g. output_dir=/tmp/pipeline cluster.storage_uri={output_dir}): data sets and checkpoints are "
            f"then kept there; or mount the bucket on every node and pass the mount path."
        )
    path = Path(os.path.normpath(output_dir))  # /shared/../etc is not below /shared
    if not path.is_absolute():
        raise ConfigError(
            f"output_dir={output_dir} is relative: the job runs on the cluster, so give an absolute path on "
            f"storage every node mounts (e.g. output_dir=/shared/pipeline)."
        )
    if cluster.storage_uri:
        ObjectStore(cluster.storage_uri).check(cluster.connect_timeout_s)
        return  # data sets and checkpoints live in the store; output_dir may be node-local
    shared = cluster.shared_storage
    if shared:
        if "://" in shared or not Path(shared).is_absolute():
            raise ConfigError(
                f"cluster.shared_storage={shared} must be the absolute path where every node mounts the shared "
                f"storage (e.g. /shared)."
            )
        if not path.is_relative_to(shared):
            raise ConfigError(
                f"output_dir={output_dir} is outside cluster.shared_storage={shared}, the storage every node "
                f"mounts: put it below, e.g. output_dir={Path(shared) / 'pipeline'}."
            )
        return  # the cluster mounts it; this machine need not
    host = urlparse(cluster.address or "").hostname or ""
    if not _is_loopback(host) and any(path.is_relative_to(d) for d in NODE_LOCAL_DIRS):
        raise ConfigError(
            f"output_dir={output_dir} is in a node-local directory ({', '.join(NODE_LOCAL_DIRS)}) that the nodes of "
            f"the cluster at {cluster.address} do not share: use shared storage (and set cluster.shared_storage "
            f"to its mount point)."
        )
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"output_dir={output_dir} is not reachable from here: {existing} exists but is not a writable "
            f"directory. Pass a path on the file system the cluster's nodes share, or set cluster.shared_storage "
            f"to its mount point when this machine does not mount it."
        )


def check_job_paths(cfg) -> None:
    """Input paths are read on the cluster, whose working directory is not this one: they must be absolute
    (hub names of hf_hub sources are not paths)."""
    data = cfg.data
    paths = [("data.tokenizer.model_path", data.tokenizer.model_path), ("data.tokenizer.hf", data.tokenizer.hf)]
    if data.source == "mixture":
        paths += [(f"data.mixture.{i}.path", src.path) for i, src in enumerate(data.mixture) if src.source != "hf_hub"]
    elif data.source != "hf_hub":
        paths.append(("data.path", data.path))
    for name, value in paths:
        if value and not Path(value).expanduser().is_absolute():
            raise ConfigError(
                f"{name}={value} is relative: the job runs on the cluster, so give an absolute path on storage "
                f"every node mounts."
            )


def compose_checked(stage: str, overrides: list[str]):
    """Compose and validate the job's config here, as the stage will on the cluster (but input paths, which
    live on the cluster's storage, are not looked up)."""
    cfg = compose_config(overrides, stage="submit")
    check_job_paths(cfg)
    return cfg


def job_entrypoint(stage: str, overrides: list[str]) -> str:
    """The command the cluster runs: the same stage and overrides, joining the cluster it runs on (overrides that
    carry credentials are refused before: see _submit)."""
    kept = [o for o in overrides if o.lstrip("+").split("=", 1)[0] != "cluster.address"]
    return shlex.join(["python", "-m", "pipeline.cli", stage, *kept, "cluster.address=auto"])


def stage_installed_layout(dest: Path) -> Path:
    """Copy the pipeline's packages into dest as they are installed (the Hydra tree as pipeline/conf), so the
    job imports them from its working directory whether or not the cluster has the project installed."""
    def installed(package: str) -> str:
        return importlib.util.find_spec(package).submodule_search_locations[0]

    skip = ("__pycache__", "*.pyc")
    shutil.copytree(installed("pipeline"), dest / "pipeline", ignore=shutil.ignore_patterns(*skip, "conf"))
    shutil.copytree(installed(CONFIG_MODULE), dest / "pipeline" / "conf", ignore=shutil.ignore_patterns(*skip))
    shutil.copytree(installed("data_prep"), dest / "data_prep", ignore=shutil.ignore_patterns(*skip))
    return dest


@contextmanager
def runtime_env(cluster: ClusterConfig, output_dir: str):
    """The job's runtime environment; an "auto" working directory is staged in a temporary directory that lives
    until the job is submitted (the client uploads it during submit_job)."""
    env = {
        "env_vars": {
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONUNBUFFERED": "1",
            "RAY_JOB_STOP_WAIT_TIME_S": str(STOP_GRACE_S),
            # The job works from the shared output_dir: the unpacked code directory is private to one node.
            "PIPELINE_JOB_DIR": output_dir,
        }
    }
    source = cluster.runtime_env_working_dir
    if source is None:
        yield env
    elif source == "auto":
        with tempfile.TemporaryDirectory(prefix="pipeline-job-") as tmp:
            yield {**env, "working_dir": str(stage_installed_layout(Path(tmp)))}
    else:
        if not Path(source).is_dir():
            raise ConfigError(f"cluster.runtime_env_working_dir={source} is not a directory: fix it, or use auto.")
        yield {**env, "working_dir": str(Path(source).resolve()), "excludes": EXCLUDES}


def connect(address: str, api: JobsAPI | None = None):
    """A JobSubmissionClient for a Jobs API URL that answered check_jobs_address (with its headers)."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=dict(api.headers) if api else None)
    except Exception as err:  # connection, version or authentication errors
        raise ConfigError(f"the Ray Jobs API at {redact_uri(address)} refused the connection: {scrub(str(err))}"
                          ) from None


def follow(client, job_id: str) -> str:
    """Print the job's logs as they come until it ends; returns its final status (e.g. SUCCEEDED)."""
    import time

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(scrub(lines), end="", flush=True)

    asyncio.run(tail())
    status = client.get_job_status(job_id)
    for _ in range(100):  # the log stream can close just before the status turns terminal
        if status.is_terminal():
            break
        time.sleep(0.2)
        status = client.get_job_status(job_id)
    return str(status.value)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline submit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=SUBMITTABLE)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for the stage itself")
    parser.add_argument("--no-wait", action="store_true", help="print the job id and return without following logs")
    return parser


def _submit(stage: str, overrides: list[str]):
    """Check everything that can be checked here, then send the job: (client, job id, entrypoint, config, the
    cluster's Ray version)."""
    hidden, secret_env = hide_secret_overrides(overrides, taken={})
    if secret_env:
        keys = ", ".join(o.split("=", 1)[0] for o in hidden if "${oc.env:" in o)
        raise ConfigError(
            f"{keys} carries credentials in its URI: a job takes them to the cluster in its entrypoint or its "
            f"environment, which Ray keeps in the job's metadata (shown to anyone holding the cluster's token) and "
            f"writes to its runtime-env agent's log. Give the cluster's nodes the credentials instead (an instance "
            f"role, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or GOOGLE_APPLICATION_CREDENTIALS in the nodes' "
            f"environment or a Kubernetes secret, MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD) and pass the "
            f"URI without them (SECURITY.md)."
        )
    cfg = compose_checked(stage, hidden)
    address = cfg.cluster.address
    parse_jobs_address(address)
    check_shared_storage(cfg.output_dir, cfg.cluster)
    api = check_jobs_address(address, cfg.cluster.connect_timeout_s)
    client = connect(address, api)
    entrypoint = job_entrypoint(stage, overrides)
    with runtime_env(cfg.cluster, cfg.output_dir) as env:
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=env,
                                   metadata={"stage": stage, "run_name": str(cfg.run_name)})
    return client, job_id, entrypoint, cfg, api.version


def main(argv: list[str]) -> int:
    args = _parser().parse_intermixed_args(argv)
    try:
        client, job_id, entrypoint, cfg, ray_version = _submit(args.stage, args.overrides)
    except ConfigError as err:
        print(f"error: {scrub(str(err))}", file=sys.stderr)
        return 2
    import ray

    if ray_version != ray.__version__:
        print(f"warning: the cluster runs Ray {ray_version}, this machine Ray {ray.__version__}", file=sys.stderr)
    address = redact_uri(cfg.cluster.address)
    print(f"submitted job {job_id} to {address}: {entrypoint}", flush=True)
    if args.no_wait:
        print(f"follow it with: pipeline jobs logs {job_id} --follow --address {address}")
        return 0
    try:
        status = follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job goes on. Stop it with: pipeline jobs stop {job_id} --address {address}")
        return 130
    print(f"job {job_id} ended: {status}")
    return 0 if status == "SUCCEEDED" else 1
