"""A tracking server that goes away mid-run: a real `mlflow server` on loopback is killed (kill -9) while a real
training job runs, then started again. Training goes on; what was logged meanwhile is sent once the server
answers, so the run ends FINISHED with every training metric of every logging step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow_server import start_mlflow_server, stop_mlflow_server
from ports import free_port

pytestmark = pytest.mark.distributed

TINY = [
    "model.context_length=32", "model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.d_ff=64",
    "data.tokenizer.vocab_size=400", "train.max_steps=300", "train.warmup_steps=5", "train.micro_batch_size=4",
    "train.global_batch_tokens=128", "train.log_interval_steps=10", "train.save_interval_steps=0",
    "parallel.num_workers=1", "parallel.precision=fp32", "run_name=outage",
]


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_training_outlives_a_tracking_server_that_goes_away_and_comes_back(tmp_path):
    from mlflow.tracking import MlflowClient

    root, port = tmp_path / "mlflow", free_port()
    root.mkdir()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(root, port, proxy_artifacts=False)
    log_path = tmp_path / "train.log"
    with open(log_path, "wb") as out:
        train = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "train", *TINY, f"output_dir={tmp_path / 'out'}",
             f"tracking.uri={uri}"], stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)
    try:
        client = MlflowClient(tracking_uri=uri)
        # The driver opened the run (the server must answer then); the workers have not logged yet.
        wait_for(lambda: client.get_experiment_by_name("pipeline") is not None and client.search_runs(
            [client.get_experiment_by_name("pipeline").experiment_id]), 300, "the run to be created")
        stop_mlflow_server(server)
        wait_for(lambda: "does not answer" in log_path.read_text(errors="replace"), 300,
                 "the worker to notice the outage")
        time.sleep(3)
        server = start_mlflow_server(root, port, proxy_artifacts=False)
        assert train.wait(timeout=600) == 0, log_path.read_text(errors="replace")[-6000:]
        output = log_path.read_text(errors="replace")
        assert "answers again" in output, output[-4000:]
        (run,) = client.search_runs([client.get_experiment_by_name("pipeline").experiment_id])
        assert run.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
        assert sorted(steps) == list(range(10, 301, 10))  # nothing logged during the outage was lost
        assert not (tmp_path / "out" / "runs" / "outage" / "mlflow_unsent.jsonl").exists()
    finally:
        if train.poll() is None:
            os.killpg(train.pid, signal.SIGKILL)
            train.wait(timeout=60)
        stop_mlflow_server(server)
