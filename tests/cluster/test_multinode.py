"""Submit prepare + train + evaluate to a two-node Ray cluster through the Jobs API, as a user would."""

from __future__ import annotations

import subprocess
import sys

import pytest
from test_end_to_end import TINY

pytestmark = pytest.mark.distributed


def test_submit_runs_training_across_both_nodes(two_node_ray_cluster, tmp_path):
    jobs_url, _ = two_node_ray_cluster
    out = tmp_path / "out"
    out.mkdir()
    submit = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "submit", "run", *TINY, "train.max_steps=10", "train.eval_interval_steps=0",
         "cluster=ray", f"cluster.address={jobs_url}", "cluster.placement_strategy=STRICT_SPREAD",
         f"output_dir={out}"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )
    assert submit.returncode == 0, submit.stdout[-6000:] + submit.stderr[-3000:]
    assert "submitted job" in submit.stdout and "SUCCEEDED" in submit.stdout

    jobs = subprocess.run([sys.executable, "-m", "pipeline.cli", "jobs", "list", "--address", jobs_url],
                          capture_output=True, text=True, timeout=60)
    assert jobs.returncode == 0 and "SUCCEEDED" in jobs.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("pipeline").experiment_id])
    assert run.info.status == "FINISHED"
    assert "val_loss" in run.data.metrics
    nodes = run.data.tags["ray_worker_nodes"].split(",")
    assert len(nodes) == 2 and len(set(nodes)) == 2, nodes  # one training worker on each node
