"""MLflow behind a small interface: log(metrics, step), log_params, log_artifact, close.

The driver opens (or re-opens) the run of a training job and records its id in the run directory, so
that train, evaluate and later resumes all write to the same MLflow run. Workers log through the same
class by run id; only rank 0 does.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.config import TrackingConfig

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id"


def tracking_uri(tracking: TrackingConfig, output_dir: str | Path) -> str:
    """The configured URI, or a SQLite store under output_dir."""
    if tracking.uri:
        return tracking.uri
    path = Path(output_dir).resolve() / "mlflow.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def artifact_root(output_dir: str | Path) -> str:
    return (Path(output_dir).resolve() / "mlartifacts").as_uri()


def ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on `uri`, runnable as printed: the `mlflow` of this environment
    (e.g. .venv/bin/mlflow after `make run`, which does not activate the virtualenv)."""
    beside = Path(sys.executable).with_name("mlflow")
    mlflow = str(beside) if beside.is_file() else "mlflow"
    return f"{mlflow} ui --backend-store-uri {uri} --port 5000"


class Tracker:
    """One MLflow run. Create with `Tracker.open(...)` on the driver or `Tracker(uri, run_id)` in a worker."""

    def __init__(self, uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri=uri)

    @classmethod
    def open(
        cls, tracking: TrackingConfig, output_dir: str | Path, run_dir: Path, run_name: str,
        tags: dict[str, str] | None = None,
    ) -> Tracker:
        """Re-open the run recorded in run_dir, or create one in the configured experiment."""
        from mlflow.tracking import MlflowClient

        uri = tracking_uri(tracking, output_dir)
        client = MlflowClient(tracking_uri=uri)
        id_file = run_dir / RUN_ID_FILE
        if id_file.exists():
            run_id = id_file.read_text().strip()
            try:
                run = client.get_run(run_id)
                if run.info.lifecycle_stage == "active":
                    if run.info.status != "RUNNING":
                        client.update_run(run_id, status="RUNNING")
                    return cls(uri, run_id)
            except Exception as err:  # a deleted store or a run from another store: start afresh
                log.warning("MLflow run %s recorded in %s is gone (%s); starting a new run", run_id, id_file, err)
        experiment = client.get_experiment_by_name(tracking.experiment)
        if experiment is None:
            experiment_id = client.create_experiment(
                tracking.experiment, artifact_location=artifact_root(output_dir) if not tracking.uri else None
            )
        else:
            experiment_id = experiment.experiment_id
        run = client.create_run(experiment_id, run_name=run_name, tags=tags)
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run.info.run_id)
        return cls(uri, run.info.run_id)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        fresh = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for start in range(0, len(fresh), 100):
            self.client.log_batch(self.run_id, params=fresh[start : start + 100])

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None and math.isfinite(v)]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, file_name: str) -> None:
        self.client.log_text(self.run_id, text, file_name)

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)
