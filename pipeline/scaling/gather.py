"""The runs of a sweep, read back from MLflow."""

from __future__ import annotations

from pipeline.scaling.fit import ScalingPoint


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def parent_run(uri: str, sweep_id: str) -> str:
    """The parent run of a sweep: named by the sweep id (or given directly as a run id)."""
    client = _client(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.sweep_id = '{sweep_id}' and "
                                                          f"attributes.run_name = '{sweep_id}'")
    if runs:
        return runs[0].info.run_id
    try:
        return client.get_run(sweep_id).info.run_id
    except Exception as err:
        raise ValueError(f"no sweep {sweep_id!r} in {uri}: pass the sweep id printed by `pipeline sweep` "
                         f"or its parent run id") from err


def gather_points(uri: str, sweep_id: str) -> list[ScalingPoint]:
    client = _client(uri)
    parent = parent_run(uri, sweep_id)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    points = []
    for run in runs:
        m = run.data.metrics
        if {"N", "D", "final_val_loss"} <= set(m):
            points.append(ScalingPoint(N=m["N"], D=m["D"], loss=m["final_val_loss"], C=m.get("C_budget"),
                                       budget=run.info.run_name, N_nonembedding=m.get("N_nonembedding")))
    if not points:
        raise ValueError(f"sweep {sweep_id!r} has no finished runs with N, D and final_val_loss in {uri}")
    return sorted(points, key=lambda p: (p.compute(), p.N))
