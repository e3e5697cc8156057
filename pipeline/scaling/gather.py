"""The runs of a sweep, read back from MLflow."""

from __future__ import annotations

from pipeline.redaction import redact_uri
from pipeline.scaling.fit_inputs import ScalingPoint, TrainingCurve


def _client(uri: str):
    from pipeline.tracking import mlflow_client

    return mlflow_client(uri)


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
        raise ValueError(f"no sweep {sweep_id!r} in {redact_uri(uri)}: pass the sweep id printed by `pipeline sweep` "
                         f"or its parent run id") from err


def _finished_children(uri: str, sweep_id: str) -> list:
    client = _client(uri)
    parent = parent_run(uri, sweep_id)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    return [run for run in runs if {"N", "D", "final_val_loss"} <= set(run.data.metrics)]


def gather_points(uri: str, sweep_id: str) -> list[ScalingPoint]:
    """The sweep's finished points: N, D, final validation loss, budget, and the epochs the loader counted."""
    points = []
    for run in _finished_children(uri, sweep_id):
        m = run.data.metrics
        points.append(ScalingPoint(N=m["N"], D=m["D"], loss=m["final_val_loss"], C=m.get("C_budget"),
                                   budget=run.info.run_name, N_nonembedding=m.get("N_nonembedding"),
                                   epochs=m.get("epochs")))
    if not points:
        raise ValueError(f"sweep {sweep_id!r} has no finished runs with N, D and final_val_loss in {redact_uri(uri)}")
    return sorted(points, key=lambda p: (p.compute(), p.N))


def gather_curves(uri: str, sweep_id: str) -> list[TrainingCurve]:
    """Each finished point's validation curve for approach 1: val_loss at every step it was scored (during
    training every train.eval_interval_steps, and at the end), tokens seen = step x tokens per step. A WSD
    branch's curve starts where it forked."""
    client = _client(uri)
    curves = []
    for run in _finished_children(uri, sweep_id):
        m = run.data.metrics
        final_step = client.get_metric_history(run.info.run_id, "final_val_loss")[-1].step
        by_step = {h.step: h.value for h in sorted(client.get_metric_history(run.info.run_id, "val_loss"),
                                                    key=lambda h: h.timestamp)}
        by_step[final_step] = m["final_val_loss"]
        steps = sorted(s for s in by_step if 0 < s <= final_step)
        per_step = m["D"] / final_step
        curves.append(TrainingCurve(run=run.info.run_name, N=m["N"], D=[s * per_step for s in steps],
                                    loss=[by_step[s] for s in steps], N_nonembedding=m.get("N_nonembedding")))
    return curves
