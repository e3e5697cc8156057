"""MLflow behind a small interface: log(metrics, step), log_params, log_artifact, close.

The driver opens (or re-opens) the run of a training job and records its id in the run directory, so
that train, evaluate and later resumes all write to the same MLflow run. Workers log through the same
class by run id; only rank 0 does.

A training worker's tracker sends in the background (`background=True`): training never waits for the
tracking server. When the server goes away, what was logged meanwhile waits in order and is sent once it
answers again (a warning says how much is waiting); what is still unsent when the worker ends (after
`flush_timeout_s`) is written to `mlflow_unsent.jsonl` in the run directory, never dropped silently.

Credentials of an MLflow server: MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in
the environment, as MLflow reads them. A tracking URI with user info (http://user:password@host) works too: the
client gets the URI without it and the credentials through those variables of this process, and every message,
param and tag shows the URI as http://***@host (pipeline.redaction).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config import TrackingConfig
from pipeline.redaction import redact_uri, redact_values, remember_secrets, scrub

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id"


def tracking_uri(tracking: TrackingConfig, output_dir: str | Path) -> str:
    """The configured URI, or a SQLite store under output_dir."""
    if tracking.uri:
        return tracking.uri
    path = Path(output_dir).resolve() / "mlflow.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def mlflow_client(uri: str):
    """An MlflowClient of uri. User info in an http(s) URI goes to MLflow through MLFLOW_TRACKING_USERNAME /
    MLFLOW_TRACKING_PASSWORD in this process's environment, not in the URI: MLflow puts the URI it was given into
    its error messages."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    from mlflow.tracking import MlflowClient

    remember_secrets(uri)  # a database URI keeps them (SQLAlchemy reads them there): out of logs at least
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https") and "@" in parts.netloc:
        userinfo, host = parts.netloc.rsplit("@", 1)
        user, _, password = userinfo.partition(":")
        os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(user)
        os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(password)
        uri = urlunsplit(parts._replace(netloc=host))
    return MlflowClient(tracking_uri=uri)


def artifact_root(output_dir: str | Path) -> str:
    return (Path(output_dir).resolve() / "mlartifacts").as_uri()


def ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on `uri`, runnable as printed: the `mlflow` of this environment
    (e.g. .venv/bin/mlflow after `make run`, which does not activate the virtualenv). Credentials in the URI are
    printed as ***: give them by MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD."""
    beside = Path(sys.executable).with_name("mlflow")
    mlflow = str(beside) if beside.is_file() else "mlflow"
    # MLflow's default of four server workers keeps restarting them on a small machine.
    workers = " --workers 1" if (os.cpu_count() or 1) <= 4 else ""
    return f"{mlflow} ui --backend-store-uri {redact_uri(uri)} --port 5000{workers}"


def run_page(uri: str, run_id: str, base: str = "http://127.0.0.1:5000") -> str:
    """The address of a run's page in the MLflow UI started by ui_command, in its machine-learning view
    (MLflow 3 opens the GenAI view unless the address asks for workflowType=machine_learning)."""
    experiment_id = mlflow_client(uri).get_run(run_id).info.experiment_id
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


UNSENT_FILE = "mlflow_unsent.jsonl"


class Tracker:
    """One MLflow run. Create with `Tracker.open(...)` on the driver or `Tracker(uri, run_id)` in a worker.

    With `background`, log / set_tags / log_text / log_artifact queue the call and return at once; a thread
    sends the queue in order, retrying a call that fails (server down) with a growing pause until it goes
    through. `flush()` waits for the queue (up to flush_timeout_s) and spills what is left to `spill_dir`."""

    def __init__(self, uri: str, run_id: str, background: bool = False, spill_dir: str | Path | None = None,
                 flush_timeout_s: float = 120.0):
        self.uri = uri  # with its credentials, for the workers' trackers; messages show `shown`
        self.shown = redact_uri(uri)
        self.run_id = run_id
        if background:
            # One short try per call: the sender thread does the retrying, without blocking anything.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.client = mlflow_client(uri)
        self.background, self.spill_dir, self.flush_timeout_s = background, spill_dir, flush_timeout_s
        self._queue: deque[tuple[str, Callable[[], None], Any]] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self._deadline = math.inf
        self._failing_since: float | None = None
        self.sent_after_outage = 0
        self._thread = None
        if background:
            self._thread = threading.Thread(target=self._send_loop, name="mlflow-sender", daemon=True)
            self._thread.start()

    def _call(self, kind: str, fn: Callable[[], None], record: Any = None) -> None:
        if not self.background:
            fn()
            return
        with self._wake:
            self._queue.append((kind, fn, record))
            self._wake.notify()

    def _send_loop(self) -> None:
        pause = 1.0
        while True:
            with self._wake:
                while not self._queue and not self._closing:
                    self._wake.wait()
                if not self._queue:
                    return
                kind, fn, _ = self._queue[0]
            try:
                fn()
            except Exception as err:  # noqa: BLE001 - the server is down or refuses: keep it, retry later
                if self._failing_since is None:
                    self._failing_since = time.time()
                    log.warning("MLflow at %s does not answer (%s): training goes on, %d calls wait and are "
                                "retried", self.shown, scrub(str(err).splitlines()[0][:200]), len(self._queue))
                with self._wake:
                    if self._closing and time.time() > self._deadline:
                        return
                    self._wake.wait(pause)
                pause = min(pause * 2, 30.0)
                continue
            with self._wake:
                self._queue.popleft()
                empty = not self._queue
            if self._failing_since is not None:
                self.sent_after_outage += 1
                if empty:
                    log.warning("MLflow at %s answers again after %.0fs: the %d calls that waited were sent",
                                self.shown, time.time() - self._failing_since, self.sent_after_outage)
                    self._failing_since = None
            pause = 1.0

    def flush(self) -> int:
        """Wait (up to flush_timeout_s) until every queued call went through; write what could not be sent to
        spill_dir/mlflow_unsent.jsonl. Returns the number of calls left unsent."""
        if not self.background or self._thread is None:
            return 0
        with self._wake:
            self._deadline = time.time() + self.flush_timeout_s
            self._closing = True
            self._wake.notify()
        self._thread.join(self.flush_timeout_s + 15)
        with self._wake:
            left = list(self._queue)
            self._queue.clear()
        self._thread = None
        if left:
            records = [{"kind": kind, "record": record} for kind, _, record in left]
            where = Path(self.spill_dir or ".") / UNSENT_FILE
            with open(where, "a") as f:
                for record in records:
                    f.write(scrub(json.dumps(record, default=str)) + "\n")
            log.warning("MLflow at %s did not answer within %.0fs: %d logging calls written to %s instead (run %s)",
                        self.shown, self.flush_timeout_s, len(left), where, self.run_id)
        return len(left)

    @classmethod
    def open(
        cls, tracking: TrackingConfig, output_dir: str | Path, run_dir: Path, run_name: str,
        tags: dict[str, str] | None = None, background: bool = False,
    ) -> Tracker:
        """Re-open the run recorded in run_dir, or create one in the configured experiment (the server must
        answer now; with `background` later calls are sent in the background, see the class)."""
        uri = tracking_uri(tracking, output_dir)
        client = mlflow_client(uri)
        id_file = run_dir / RUN_ID_FILE
        if id_file.exists():
            run_id = id_file.read_text().strip()
            try:
                run = client.get_run(run_id)
                if run.info.lifecycle_stage == "active":
                    if run.info.status != "RUNNING":
                        client.update_run(run_id, status="RUNNING")
                    return cls(uri, run_id, background=background, spill_dir=run_dir)
            except Exception as err:  # a deleted store or a run from another store: start afresh
                log.warning("MLflow run %s recorded in %s is gone (%s); starting a new run", run_id, id_file,
                            scrub(str(err)))
        experiment = client.get_experiment_by_name(tracking.experiment)
        if experiment is None:
            experiment_id = client.create_experiment(
                tracking.experiment, artifact_location=artifact_root(output_dir) if not tracking.uri else None
            )
        else:
            experiment_id = experiment.experiment_id
        run = client.create_run(experiment_id, run_name=run_name, tags=redact_values(tags))
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run.info.run_id)
        return cls(uri, run.info.run_id, background=background, spill_dir=run_dir)

    def log_params(self, params: dict[str, Any]) -> None:
        """Params not logged to the run before (a resumed run keeps its first values); in the background, like
        metrics, when the tracker sends in the background (a server that goes away meanwhile stalls nothing)."""
        from mlflow.entities import Param

        def send() -> None:
            existing = self.client.get_run(self.run_id).data.params
            fresh = [Param(k, scrub(str(v))[:6000]) for k, v in params.items() if k not in existing]
            for start in range(0, len(fresh), 100):
                self.client.log_batch(self.run_id, params=fresh[start : start + 100])

        self._call("params", send, dict(params))

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)  # when it was measured, not when it reached the server
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None and math.isfinite(v)]
        if batch:
            self._call("metrics", lambda: self.client.log_batch(self.run_id, metrics=batch),
                       {"step": step, "timestamp_ms": now, "metrics": {m.key: m.value for m in batch}})

    def set_tags(self, tags: dict[str, str]) -> None:
        tags = redact_values(tags)

        def send() -> None:
            for key, value in tags.items():
                self.client.set_tag(self.run_id, key, value)

        self._call("tags", send, tags)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call("artifact", lambda: self.client.log_artifact(self.run_id, str(path), artifact_path),
                   {"path": str(path), "artifact_path": artifact_path})

    def log_text(self, text: str, file_name: str) -> None:
        text = scrub(text)
        self._call("text", lambda: self.client.log_text(self.run_id, text, file_name), {"file": file_name, "text": text})

    def close(self, status: str = "FINISHED") -> None:
        self._call("terminated", lambda: self.client.set_terminated(self.run_id, status=status), {"status": status})
        self.flush()
