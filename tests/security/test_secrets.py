"""Credentials stay out of everything the pipeline writes, logs, prints or sends in clear text, and its own Ray is
reachable from this machine only.

Real processes throughout: an `mlflow server` and a moto S3 server on loopback, `pipeline train` and `pipeline
submit` as subprocesses, an HTTP server reached through this machine's outward address, Ray started by ensure_ray.
"""

from __future__ import annotations

import base64
import contextlib
import io
import ipaddress
import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest
from ports import free_port

from pipeline.cluster.submit import compose_checked
from pipeline.config import ClusterConfig, PipelineConfig, TrackingConfig, flatten
from pipeline.redaction import (
    RedactingFilter,
    hide_secret_overrides,
    redact_uri,
    remember_secrets,
    scrub,
    secrets_of,
)

TINY = [
    "model.context_length=32", "model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.d_ff=64",
    "data.tokenizer.vocab_size=400", "train.max_steps=6", "train.warmup_steps=2", "train.micro_batch_size=4",
    "train.global_batch_tokens=128", "train.log_interval_steps=2", "train.save_interval_steps=3",
    "train.eval_interval_steps=0", "eval.max_tokens=2000", "parallel.num_workers=1", "parallel.precision=fp32",
    "run_name=secrets",
]
# Credentials of the environment that would let a run work without the ones in its URIs.
CLEAN_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
             "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_URI")


def new_secret(tag: str) -> str:
    return f"sekrit{tag}{secrets.token_hex(8)}"


def run_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV and not k.startswith("PIPELINE_SECRET_")}
    return {**env, "AWS_EC2_METADATA_DISABLED": "true"}


def wait_until_listening(port: int, proc: subprocess.Popen, what: str, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            assert proc.poll() is None and time.time() < deadline, f"{what} did not start"
            time.sleep(0.2)


@contextlib.contextmanager
def process(args: list[str], log: Path, port: int, what: str):
    with open(log, "ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_listening(port, proc, what)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait(timeout=30)


def files_holding(root: Path, needles: list[str]) -> list[str]:
    """Every file below root whose bytes hold one of the needles (name: needle)."""
    found = []
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file() and not p.is_symlink()):
        data = path.read_bytes()
        found += [f"{path}: {n}" for n in needles if n.encode() in data]
    return found


# ------------------------------------------------------------------------------------------ redaction itself


def test_uris_lose_their_credentials_and_keep_everything_else():
    assert redact_uri("http://user:pw-1234@mlflow.example:5000/x") == "http://***@mlflow.example:5000/x"
    assert redact_uri("s3://AKID:se%2Fcret@bucket/p?endpoint_override=h:9000&scheme=http") == \
        "s3://***@bucket/p?endpoint_override=h:9000&scheme=http"
    signed = "https://b.s3.amazonaws.com/k?X-Amz-Credential=AKID%2F2024&X-Amz-Signature=abcdef&X-Amz-Expires=60"
    assert redact_uri(signed) == \
        "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Expires=60"
    plain = "s3://bucket/p?region=us-east-1&endpoint_override=h%3A9000&key_prefix=a"
    assert redact_uri(plain) == plain  # nothing secret: character for character
    assert secrets_of("http://u:p%40ss-word@h") == ["u:p%40ss-word", "u:p@ss-word", "p%40ss-word", "p@ss-word"]


def test_texts_and_log_records_are_scrubbed():
    secret = new_secret("log")
    remember_secrets(f"gs://bucket/p?access_token={secret}")
    text = f"failed: 'http://me:{secret}@h:5000/api', then s3://K:{secret}x@b/p. And the value {secret} alone."
    clean = scrub(text)
    assert secret not in clean
    assert "'http://***@h:5000/api'" in clean and "s3://***@b/p." in clean and "value *** alone" in clean

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("test_secrets.scrubbed")
    logger.addHandler(handler)
    try:
        logger.warning("store %s is down", f"s3://K:{secret}@b/p")
        try:
            raise OSError(f"cannot reach http://u:{secret}@h")
        except OSError:
            logger.exception("upload failed")
    finally:
        logger.removeHandler(handler)
    assert secret not in stream.getvalue() and "s3://***@b/p is down" in stream.getvalue()
    assert "OSError: cannot reach http://***@h" in stream.getvalue()


def test_params_of_a_config_hold_no_credentials():
    secret = new_secret("param")
    cfg = PipelineConfig(tracking=TrackingConfig(uri=f"http://me:{secret}@mlflow:5000"),
                         cluster=ClusterConfig(storage_uri=f"s3://AKID:{secret}@bucket/p?region=us-east-1"))
    params = flatten(cfg)
    assert params["tracking.uri"] == "http://***@mlflow:5000"
    assert params["cluster.storage_uri"] == "s3://***@bucket/p?region=us-east-1"
    assert params["model.n_layer"] == cfg.model.n_layer
    assert not [k for k, v in params.items() if secret in str(v)]


# ---------------------------------------------------------------------------------- (e) submit's entrypoint


def test_hidden_overrides_compose_back_from_the_environment(monkeypatch):
    """What a Hydra multirun saves (overrides.yaml, multirun.yaml) holds `${oc.env:PIPELINE_SECRET_<i>}`, and the
    config composes back from those variables."""
    tracking, storage = new_secret("track"), new_secret("store")
    tracking_uri = f"http://me:{tracking}@mlflow.example:5000"
    storage_uri = f"s3://AKID:{storage}@bucket/p?endpoint_override=s3.example:9000&scheme=http"
    overrides = ["model.n_layer=2", f"tracking.uri={tracking_uri}", f"cluster.storage_uri='{storage_uri}'"]
    hidden, secret_env = hide_secret_overrides(overrides, taken={})
    assert hidden == ["model.n_layer=2", "tracking.uri=${oc.env:PIPELINE_SECRET_0}",
                      "cluster.storage_uri=${oc.env:PIPELINE_SECRET_1}"]
    assert secret_env == {"PIPELINE_SECRET_0": tracking_uri, "PIPELINE_SECRET_1": storage_uri}
    for name, value in secret_env.items():
        monkeypatch.setenv(name, value)
    cfg = compose_checked("train", hidden)
    assert (cfg.tracking.uri, cfg.cluster.storage_uri, cfg.model.n_layer) == (tracking_uri, storage_uri, 2)


def test_a_multirun_saves_its_overrides_and_config_without_the_secret(tmp_path):
    """Hydra saves a multirun's config and overrides (multirun.yaml); the override names the variable instead."""
    secret = new_secret("multirun")
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "params", "-m", "model.n_layer=1,2",
         f"tracking.uri=http://me:{secret}@mlflow.example:5000", f"output_dir={tmp_path / 'out'}"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=run_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = (tmp_path / "out" / "multirun" / "multirun.yaml").read_text()
    assert "tracking.uri=${oc.env:PIPELINE_SECRET_0}" in saved and "non-embedding" in proc.stdout
    assert secret not in proc.stdout + proc.stderr and not files_holding(tmp_path, [secret])


def test_hidden_overrides_never_reuse_a_name_that_holds_another_value():
    hidden, env = hide_secret_overrides(["tracking.uri=http://u:pw-123@h", "model.n_layer=2"],
                                        taken={"PIPELINE_SECRET_0": "someone else's"})
    assert hidden == ["tracking.uri=${oc.env:PIPELINE_SECRET_1}", "model.n_layer=2"]
    assert env == {"PIPELINE_SECRET_1": "http://u:pw-123@h"}


# ------------------------------------------------------------------ (c) the Ray token and clear-text http


class RecordingServer:
    """An HTTP server on every interface that records each request's headers: 401 without the expected bearer
    token, a Jobs API /api/version answer with it."""

    def __init__(self, token: str | None = None):
        self.requests: list[dict[str, str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                outer.requests.append(dict(self.headers))
                if token is not None and self.headers.get("Authorization") == f"Bearer {token}":
                    body, code = json.dumps({"ray_version": "2.60.0"}).encode(), 200
                else:
                    body, code = b"Unauthorized: Missing authentication token", 401
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.port = free_port()
        self.server = ThreadingHTTPServer(("0.0.0.0", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def outward_address() -> str | None:
    """An IPv4 address of this machine that is not loopback (what another machine would reach it by)."""
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not ipaddress.ip_address(address.address).is_loopback:
                return address.address
    return None


CHECK_ADDRESS = """
import json, sys
from pipeline.cluster.submit import check_jobs_address
from pipeline.config import ConfigError
try:
    api = check_jobs_address(sys.argv[1], timeout_s=10)
    print(json.dumps({"version": api.version}))
except ConfigError as err:
    print(json.dumps({"refused": str(err)}))
"""


def check_address_in_a_fresh_process(address: str, env: dict[str, str]) -> dict:
    """check_jobs_address in its own process: Ray's C++ side fixes the auth mode it reads from RAY_AUTH_MODE once
    per process, so a neighbouring test that started a token cluster would decide the branch taken here."""
    proc = subprocess.run([sys.executable, "-c", CHECK_ADDRESS, address], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("auth_mode", [None, "token"])
def test_the_token_never_goes_in_clear_text_to_another_machine(auth_mode):
    """Whether the token would go because the cluster asks for it (401) or because RAY_AUTH_MODE=token makes Ray's
    client send it with every request, it is never sent over plain http to another machine; over loopback (a
    tunnel's end) it is."""
    ip = outward_address()
    if ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address to reach a server by")
    token = new_secret("token")
    env = {k: v for k, v in run_env().items() if not k.startswith("RAY_AUTH")}
    env["RAY_AUTH_TOKEN"] = token
    if auth_mode is not None:
        env["RAY_AUTH_MODE"] = auth_mode
    with RecordingServer(token) as server:
        answer = check_address_in_a_fresh_process(f"http://{ip}:{server.port}", env)
        message = answer.get("refused", "")
        assert "https://" in message and "ssh -N -L 8265:localhost:8265" in message, answer
        assert "kubectl port-forward" in message and "http://127.0.0.1:8265" in message
        assert token not in message
        if auth_mode is None:  # the cluster's 401 is what asked for it
            assert "asks for a token" in message and server.requests
        else:  # refused before anything is sent
            assert "RAY_AUTH_MODE=token" in message and server.requests == []
        assert not [r for r in server.requests if "Authorization" in r]

        # Over loopback (a tunnel's end) the token is sent, and the cluster answers.
        answer = check_address_in_a_fresh_process(f"http://127.0.0.1:{server.port}", env)
        assert answer == {"version": "2.60.0"}, answer
        assert server.requests[-1]["Authorization"] == f"Bearer {token}"


def test_submit_refuses_credentials_in_uris_and_sends_nothing(tmp_path):
    """A job's entrypoint and environment are kept in Ray's job metadata and the runtime-env agent's log: a URI
    with credentials is refused before anything is sent, even to a loopback cluster, naming the override and the
    fix (credentials from the nodes' own environment)."""
    secret = new_secret("submit")
    with RecordingServer() as server:
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "submit", "train", "cluster=ray",
             f"cluster.address=http://127.0.0.1:{server.port}", f"output_dir={tmp_path / 'out'}",
             f"tracking.uri=http://me:{secret}@mlflow.example:5000", "--no-wait"],
            capture_output=True, text=True, timeout=120, cwd=tmp_path, env=run_env())
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "tracking.uri carries credentials" in proc.stderr and "MLFLOW_TRACKING_USERNAME" in proc.stderr
        assert secret not in proc.stdout + proc.stderr
        assert server.requests == []  # nothing at all was sent


def test_mlflow_gets_the_credentials_of_the_uri_by_basic_auth():
    """The MLflow client is given the URI without its user info; the credentials still reach the server."""
    from pipeline.tracking import mlflow_client

    secret = new_secret("mlflow")
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    try:
        with RecordingServer() as server:
            client = mlflow_client(f"http://me:{secret}@127.0.0.1:{server.port}")
            assert secret not in client.tracking_uri
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
            with pytest.raises(Exception) as failed:  # the recording server answers 401
                client.get_experiment_by_name("x")
            assert secret not in str(failed.value)
            expected = "Basic " + base64.b64encode(f"me:{secret}".encode()).decode()
            assert server.requests and server.requests[0]["Authorization"] == expected
    finally:
        os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ----------------------------------------------------------------------- (d) the pipeline's own Ray


LISTENERS = """
import json, os, psutil, ray
from pipeline.cluster.ray_runtime import ensure_ray
from pipeline.config import ClusterConfig
ensure_ray(ClusterConfig(num_cpus=1))
ray.get(ray.remote(lambda: os.getpid()).remote())  # a worker process listens too
me = psutil.Process()
found = []
for proc in [me, *me.children(recursive=True)]:
    try:
        found += [[proc.name(), c.laddr.ip, c.laddr.port] for c in proc.net_connections(kind="inet")
                  if c.status == psutil.CONN_LISTEN]
    except psutil.Error:
        pass
print("LISTENERS " + json.dumps(found))
ray.shutdown()
"""


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


@pytest.mark.distributed
def test_the_ray_the_pipeline_starts_listens_on_loopback_only(tmp_path):
    proc = subprocess.run([sys.executable, "-c", LISTENERS], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    [line] = [x for x in proc.stdout.splitlines() if x.startswith("LISTENERS ")]
    listeners = json.loads(line.split(" ", 1)[1])
    names = {name for name, _, _ in listeners}
    assert {"gcs_server", "raylet"} <= names, listeners  # Ray's own servers were seen
    assert not [x for x in listeners if not is_loopback(x[1])], listeners


# ----------------------------------------------------------------- (a) and (b): a real run, a failing store


def start_moto(port: int, log: Path):
    return process([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], log, port, "moto")


def start_mlflow(root: Path, port: int):
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    return process([mlflow, "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                    "--default-artifact-root", (root / "artifacts").as_uri(), "--host", "127.0.0.1",
                    "--port", str(port), "--workers", "1"], root / "server.log", port, "mlflow server")


def wait_for_mlflow(port: int) -> None:
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return
        except OSError:
            assert time.time() < deadline, "the mlflow server does not answer"
            time.sleep(0.5)


def store_objects(endpoint: str) -> dict[str, bytes]:
    import pyarrow.fs

    fs = pyarrow.fs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1",
                                 access_key="any", secret_key="any")
    infos = fs.get_file_info(pyarrow.fs.FileSelector("bucket", recursive=True))
    out = {}
    for info in infos:
        if info.type == pyarrow.fs.FileType.File:
            with fs.open_input_stream(info.path) as f:
                out[info.path] = f.read()
    return out


@pytest.mark.distributed
def test_a_run_with_credentials_in_its_uris_writes_logs_and_prints_none_of_them(tmp_path):
    import pyarrow.fs
    from mlflow.tracking import MlflowClient

    tracking_secret, storage_secret = new_secret("A"), new_secret("B")
    needles = [tracking_secret, storage_secret]
    mlflow_root, mlflow_port, s3_port = tmp_path / "mlflow", free_port(), free_port()
    mlflow_root.mkdir()
    out = tmp_path / "out"
    with start_mlflow(mlflow_root, mlflow_port), start_moto(s3_port, tmp_path / "moto.log"):
        wait_for_mlflow(mlflow_port)
        endpoint = f"127.0.0.1:{s3_port}"
        pyarrow.fs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1", access_key="any",
                                secret_key="any", allow_bucket_creation=True).create_dir("bucket")
        tracking_uri = f"http://pipeline:{tracking_secret}@127.0.0.1:{mlflow_port}"
        options = f"endpoint_override={endpoint}&scheme=http&region=us-east-1"
        storage_uri = f"s3://AKIDTEST:{storage_secret}@bucket/p?{options}"
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "train", *TINY, f"output_dir={out}", f"tracking.uri={tracking_uri}",
             f"cluster.storage_uri='{storage_uri}'"],
            capture_output=True, text=True, timeout=900, cwd=tmp_path, env=run_env())
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, output[-6000:]
        objects = store_objects(endpoint)

    assert not [n for n in needles if n in output], "a secret was printed"
    assert not files_holding(out, needles)
    assert not files_holding(mlflow_root, needles)
    assert not [k for k, v in objects.items() if any(n.encode() in v for n in needles)]
    assert any("/checkpoints/" in k for k in objects)  # the store was used, with the URI's credentials

    client = MlflowClient(tracking_uri=f"http://127.0.0.1:{mlflow_port}")
    with start_mlflow(mlflow_root, mlflow_port):  # read back what the server kept
        wait_for_mlflow(mlflow_port)
        [run] = client.search_runs([client.get_experiment_by_name("pipeline").experiment_id])
    params, tags = run.data.params, run.data.tags
    assert params["model.n_layer"] == "1" and params["train.max_steps"] == "6"  # the params were logged
    assert params["tracking.uri"] == f"http://***@127.0.0.1:{mlflow_port}"
    assert params["cluster.storage_uri"] == f"s3://***@bucket/p?{options}"
    assert run.info.status == "FINISHED" and "train_loss" in run.data.metrics
    assert not [k for k, v in {**params, **tags}.items() if any(n in v for n in needles)]


def test_a_store_that_fails_is_named_without_its_credentials(tmp_path):
    secret, other = new_secret("down"), new_secret("query")
    closed = free_port()  # nothing listens there
    unreachable = f"s3://AKIDTEST:{secret}@bucket/p?endpoint_override=127.0.0.1:{closed}&scheme=http&region=us-east-1"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "train", *TINY, f"output_dir={tmp_path / 'out'}",
         f"cluster.storage_uri='{unreachable}'"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=run_env())
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-4000:]
    assert f"object store s3://***@bucket/p?endpoint_override=127.0.0.1:{closed}" in proc.stderr, output[-4000:]
    assert secret not in output

    invalid = f"s3://AKIDTEST:{secret}@bucket/p?secret_key={other}"  # pyarrow takes no keys in the query
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "train", *TINY, f"output_dir={tmp_path / 'out2'}",
         f"cluster.storage_uri='{invalid}'"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=run_env())
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-4000:]
    assert "cluster.storage_uri=s3://***@bucket/p?secret_key=*** cannot be opened" in proc.stderr, output[-4000:]
    assert secret not in output and other not in output


def test_a_password_with_a_slash_or_a_hash_is_redacted_too():
    """AWS secret keys often hold '/', which ends the authority for urlsplit: the secret must not survive in
    what looks like the URI's path."""
    secret = f"wJal/rX{new_secret('slash')}+FE"
    for uri in (f"s3://AKIAEXAMPLE:{secret}@bucket/prefix?region=us-east-1", f"https://me:{secret}#x@host/api"):
        assert secret not in redact_uri(uri) and "***@" in redact_uri(uri)
        assert secret not in scrub(f"cannot open {uri}: denied")
        assert secret in secrets_of(uri) or secret + "#x" in " ".join(secrets_of(uri))
